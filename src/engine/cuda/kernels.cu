// The CUDA engine's kernels (everything but the matrix products, which go to cuBLAS).
// Compiled at run time with NVRTC for the device's architecture, once per process.
//
// Each kernel mirrors a method of the `Kernels` trait (src/engine/kernels.rs), whose CPU
// implementation (src/engine/cpu/) is the reference; `minimind selftest --device cuda` checks
// one against the other. Shapes: N rows, C channels, H/G query/key-value heads, D head dim,
// V vocabulary, E experts, K experts per token. Row-major throughout.

typedef long long i64;
#define INF __int_as_float(0x7f800000)

// Dynamic shared memory (the emulator in emu.cpp defines it its own way).
#ifndef MINIMIND_EMU
#define DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// ---------------------------------------------------------------------------------------
// Storage formats. Parameters, gradients, optimiser moments, norms and the residual stream
// are f32; activations are stored in the run's dtype X: float, bf16 or f16. Kernels read X
// into f32, compute in f32, and round once when they store (to nearest even), writing
// `X(value)`: the conversion from float is explicit, so a store that would round is visible.
// A kernel with X in its parameters is a template, compiled once per format as `name_f32`,
// `name_bf16` and `name_f16` (see INSTANTIATE).

#ifdef MINIMIND_EMU
#define MEMBER
#else
#define MEMBER __device__
// f16 through the hardware's conversions; the emulator defines these two in C++.
__device__ unsigned short f32_to_f16_bits(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ float f16_bits_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#endif

// bf16 is the top half of an f32: rounding adds half an ulp (ties to even); a NaN stays one.
__device__ unsigned short f32_to_bf16_bits(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

struct bf16 {
    unsigned short bits;
    MEMBER bf16() = default;
    MEMBER explicit bf16(float f) : bits(f32_to_bf16_bits(f)) {}
    MEMBER operator float() const { return __uint_as_float((unsigned)bits << 16); }
};

struct f16 {
    unsigned short bits;
    MEMBER f16() = default;
    MEMBER explicit f16(float f) : bits(f32_to_f16_bits(f)) {}
    MEMBER operator float() const { return f16_bits_to_f32(bits); }
};

namespace as_f32 { typedef float X; }
namespace as_bf16 { typedef bf16 X; }
namespace as_f16 { typedef f16 X; }

// The three kernels `kname_f32/_bf16/_f16` calling `call` (a template instantiated with X,
// in parentheses): `params` spells the parameter list with X, `args` passes them on.
#define INSTANTIATE_AS(kname, call, params, args) \
    namespace as_f32 { extern "C" __global__ void kname##_f32 params { call args; } } \
    namespace as_bf16 { extern "C" __global__ void kname##_bf16 params { call args; } } \
    namespace as_f16 { extern "C" __global__ void kname##_f16 params { call args; } }
// The three kernels of the template `name`.
#define INSTANTIATE(name, params, args) INSTANTIATE_AS(name, name<X>, params, args)

// ---------------------------------------------------------------------------------------
// Reductions inside a block (blockDim.x a power of two, at most 1024).

__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = threadIdx.x < warps ? shared[threadIdx.x] : 0.0f;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    v = shared[0];
    __syncthreads();
    return v;
}

__device__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffff, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = threadIdx.x < warps ? shared[threadIdx.x] : -INF;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffff, v, o));
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    v = shared[0];
    __syncthreads();
    return v;
}

__device__ double block_sum_f64(double v, double* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = threadIdx.x < warps ? shared[threadIdx.x] : 0.0;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    return v;  // valid in thread 0
}

// ---------------------------------------------------------------------------------------
// Elementwise

template <typename X>
__device__ void fill(X* x, float value, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) x[i] = X(value);
}
INSTANTIATE(fill, (X* x, float value, i64 n), (x, value, n))

// out = x rounded to X (activation gradients on their way into a matrix product; the
// weights' copy in X after AdamW changed them elsewhere).
template <typename X>
__device__ void cast(X* out, const float* x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = X(x[i]);
}
INSTANTIATE(cast, (X* out, const float* x, i64 n), (out, x, n))

extern "C" __global__ void add_f32(float* out, const float* x, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] += x[i];
}

// ---------------------------------------------------------------------------------------
// A stable counting sort of n positions by their key in [0, v) (token ids for the embedding
// backward, experts for MoE dispatch), in four passes with no atomics: many blocks count and
// rank, one thread per key scans the chunks, one block scans the keys, every position goes to
// its slot. Positions with equal keys keep their order.

// Positions per chunk: one block of SORT_CHUNK threads per chunk.
#define SORT_CHUNK 256

// Pass 1: per chunk of positions, each position's rank among the chunk's earlier positions
// with the same key, and the chunk's count of each key (counts [chunks, v], this chunk's row
// zeroed first).
extern "C" __global__ void sort_count(int* counts, int* rank, const int* keys, int n, int v) {
    __shared__ int chunk[SORT_CHUNK];
    int first = blockIdx.x * SORT_CHUNK, i = threadIdx.x, p = first + i;
    int* row = counts + (i64)blockIdx.x * v;
    for (int x = threadIdx.x; x < v; x += blockDim.x) row[x] = 0;
    chunk[i] = p < n ? keys[p] : -1;
    __syncthreads();
    if (p >= n) return;
    int id = chunk[i], before = 0, after = 0;
    for (int j = 0; j < SORT_CHUNK; j++) {
        before += j < i && chunk[j] == id;
        after += j > i && chunk[j] == id;
    }
    rank[p] = before;
    if (after == 0) row[id] = before + 1;  // the key's last position in the chunk writes its count
}

// Pass 2: per key, the chunks' counts become each chunk's first slot among the key's
// positions (an exclusive running sum over the chunks), and the key's total to totals[key].
extern "C" __global__ void sort_prefix(int* counts, int* totals, int chunks, int v) {
    for (int x = blockIdx.x * blockDim.x + threadIdx.x; x < v; x += gridDim.x * blockDim.x) {
        int run = 0;
        for (int c = 0; c < chunks; c++) {
            int k = counts[(i64)c * v + x];
            counts[(i64)c * v + x] = run;
            run += k;
        }
        totals[x] = run;
    }
}

// Pass 3, one block: offsets[x] = sum of totals[0..x] (offsets has v + 1 entries). Each
// thread scans a contiguous run of keys; the runs' sums are scanned in order by thread 0.
extern "C" __global__ void sort_offsets(int* offsets, const int* totals, int v) {
    __shared__ int run_sum[1024];
    int t = threadIdx.x, per = (v + blockDim.x - 1) / blockDim.x;
    int lo = min(t * per, v), hi = min(lo + per, v);
    int s = 0;
    for (int x = lo; x < hi; x++) s += totals[x];
    run_sum[t] = s;
    __syncthreads();
    if (t == 0) {
        int acc = 0;
        for (int u = 0; u < (int)blockDim.x; u++) {
            int k = run_sum[u];
            run_sum[u] = acc;
            acc += k;
        }
        offsets[v] = acc;
    }
    __syncthreads();
    s = run_sum[t];
    for (int x = lo; x < hi; x++) {
        offsets[x] = s;
        s += totals[x];
    }
}

// Pass 4: every position to its slot; within a key, slots follow the positions' order.
extern "C" __global__ void sort_place(int* order, const int* keys, const int* rank, const int* counts, const int* offsets, int n, int v) {
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < n; p += gridDim.x * blockDim.x) {
        int key = keys[p];
        order[offsets[key] + counts[(i64)(p / SORT_CHUNK) * v + key] + rank[p]] = p;
    }
}

// ---------------------------------------------------------------------------------------
// Embedding: out[n] = emb[ids[n]]. Backward adds each position's gradient row to its token's
// row without atomics: the positions are sorted by token id (the stable counting sort below),
// then one block owns each token and adds its positions' rows in position order, the order
// the CPU engine adds them in. So the sums do not depend on scheduling.

extern "C" __global__ void embed_forward(float* out, const float* emb, const int* ids, int n, int c) {
    int row = blockIdx.x;
    if (row >= n) return;
    const float* src = emb + (i64)ids[row] * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) out[(i64)row * c + j] = src[j];
}

// demb[x] += the gradient rows of token x's positions, in position order: one block per id.
extern "C" __global__ void embed_backward(float* demb, const float* dout, const int* order, const int* offsets, int v, int c) {
    for (int x = blockIdx.x; x < v; x += gridDim.x) {
        int lo = offsets[x], hi = offsets[x + 1];
        if (lo == hi) continue;
        for (int j = threadIdx.x; j < c; j += blockDim.x) {
            float acc = demb[(i64)x * c + j];
            for (int q = lo; q < hi; q++) acc += dout[(i64)order[q] * c + j];
            demb[(i64)x * c + j] = acc;
        }
    }
}

// ---------------------------------------------------------------------------------------
// RMSNorm: one block per row.

template <typename X>
__device__ void rmsnorm_forward(X* y, float* rstd, const float* x, const float* w, int n, int c, float eps) {
    __shared__ float shared[32];
    int row = blockIdx.x;
    if (row >= n) return;
    const float* xr = x + (i64)row * c;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss, shared);
    float r = rsqrtf(ss / c + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int j = threadIdx.x; j < c; j += blockDim.x) y[(i64)row * c + j] = X(w[j] * (xr[j] * r));
}
INSTANTIATE(rmsnorm_forward, (X* y, float* rstd, const float* x, const float* w, int n, int c, float eps), (y, rstd, x, w, n, c, eps))

// The residual add and the next norm in one pass over the row: sum += x (f32, the residual
// stream), then y = w * sum * rstd. The same arithmetic, in the same order, as add_f32 then
// rmsnorm_forward.
template <typename X>
__device__ void add_rmsnorm_forward(X* y, float* rstd, float* sum, const float* x, const float* w, int n, int c, float eps) {
    __shared__ float shared[32];
    int row = blockIdx.x;
    if (row >= n) return;
    float* sr = sum + (i64)row * c;
    const float* xr = x + (i64)row * c;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float v = sr[j] + xr[j];
        sr[j] = v;
        ss += v * v;
    }
    ss = block_sum(ss, shared);
    float r = rsqrtf(ss / c + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int j = threadIdx.x; j < c; j += blockDim.x) y[(i64)row * c + j] = X(w[j] * (sr[j] * r));
}
INSTANTIATE(add_rmsnorm_forward, (X* y, float* rstd, float* sum, const float* x, const float* w, int n, int c, float eps),
            (y, rstd, sum, x, w, n, c, eps))

// dx += r w dy - r^3 (sum_j dy w x) / c * x per row, and dw[j] += sum_n dy x r in two passes,
// dy and x read once: block b takes rows b, b + gridDim, ... in order, adding each row's
// dy x r into partial[b][j] (each thread its own columns); then one thread per column adds
// the partials in order. dy is in the activations' storage X; `act` (null for none) gets the
// new dx rounded to X: the copy the matrix products read, without a pass of its own.
template <typename X>
__device__ void rmsnorm_backward(float* dx, X* act, float* partial, const X* dy, const float* x, const float* w, const float* rstd, int n, int c) {
    __shared__ float shared[32];
    float* part = partial + (i64)blockIdx.x * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) part[j] = 0.0f;
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        const X* dyr = dy + (i64)row * c;
        const float* xr = x + (i64)row * c;
        float gx = 0.0f;
        for (int j = threadIdx.x; j < c; j += blockDim.x) gx += dyr[j] * w[j] * xr[j];
        gx = block_sum(gx, shared);
        float r = rstd[row];
        float k = r * r * r * gx / c;
        for (int j = threadIdx.x; j < c; j += blockDim.x) {
            float d = float(dyr[j]), xj = xr[j];
            float v = dx[(i64)row * c + j] + (r * w[j] * d - k * xj);
            dx[(i64)row * c + j] = v;
            if (act) act[(i64)row * c + j] = X(v);
            part[j] += d * xj * r;
        }
    }
}
INSTANTIATE(rmsnorm_backward, (float* dx, X* act, float* partial, const X* dy, const float* x, const float* w, const float* rstd, int n, int c),
            (dx, act, partial, dy, x, w, rstd, n, c))

extern "C" __global__ void rmsnorm_backward_dw_sum(float* dw, const float* partial, int parts, int c) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < c; j += gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int b = 0; b < parts; b++) acc += partial[(i64)b * c + j];
        dw[j] += acc;
    }
}

// ---------------------------------------------------------------------------------------
// RoPE over `heads` vectors of size d per row; row n at position first + n % period.

template <typename X>
__device__ void rope(X* x, const float* cosb, const float* sinb, int n, int heads, int d, int first, int period, int inverse) {
    int half = d / 2;
    i64 total = (i64)n * heads * half;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        int j = i % half;
        i64 vec = i / half;
        int row = vec / heads;
        int p = first + row % period;
        X* v = x + vec * d;
        const float* cs = cosb + (i64)p * d;
        const float* sn = sinb + (i64)p * d;
        float a = v[j], b = v[j + half];
        if (inverse) {
            v[j] = X(a * cs[j] + b * sn[half + j]);
            v[j + half] = X(b * cs[half + j] - a * sn[j]);
        } else {
            v[j] = X(a * cs[j] - b * sn[j]);
            v[j + half] = X(b * cs[half + j] + a * sn[half + j]);
        }
    }
}
INSTANTIATE(rope, (X* x, const float* cosb, const float* sinb, int n, int heads, int d, int first, int period, int inverse),
            (x, cosb, sinb, n, heads, d, first, period, inverse))

// ---------------------------------------------------------------------------------------
// Causal GQA attention, flash style: the [T, T] scores never exist. q/out [B*T, H*D], k/v
// [B*T, G*D], lse [B*H*T]. The tiled kernels below serve D <= 128 (MiniMind's heads are 64);
// these, one warp per row, serve D up to 256. Forward: one warp per (batch, head, query row),
// online softmax over the keys 0..=row, writing the output and the row's log-sum-exp.

#define MAX_D 256

template <typename X>
__device__ void attention_forward(X* out, float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= b * h * t) return;
    int row = warp % t, hi = (warp / t) % h, bi = warp / (t * h);
    int gi = hi / (h / g);
    int hd = h * d, gd = g * d;
    float scale = rsqrtf((float)d);
    const X* qr = q + ((i64)bi * t + row) * hd + hi * d;
    float qv[MAX_D / 32], acc[MAX_D / 32];
    #pragma unroll
    for (int e = 0; e < MAX_D / 32; e++) {
        int j = lane + 32 * e;
        qv[e] = j < d ? qr[j] : 0.0f;
        acc[e] = 0.0f;
    }
    float m = -INF, l = 0.0f;
    for (int s = 0; s <= row; s++) {
        const X* kr = k + ((i64)bi * t + s) * gd + gi * d;
        float dot = 0.0f;
        #pragma unroll
        for (int e = 0; e < MAX_D / 32; e++) {
            int j = lane + 32 * e;
            if (j < d) dot += qv[e] * kr[j];
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
        float sc = dot * scale;
        float mn = fmaxf(m, sc);
        float corr = __expf(m - mn), p = __expf(sc - mn);
        l = l * corr + p;
        const X* vr = v + ((i64)bi * t + s) * gd + gi * d;
        #pragma unroll
        for (int e = 0; e < MAX_D / 32; e++) {
            int j = lane + 32 * e;
            acc[e] = acc[e] * corr + (j < d ? p * vr[j] : 0.0f);
        }
        m = mn;
    }
    X* orow = out + ((i64)bi * t + row) * hd + hi * d;
    #pragma unroll
    for (int e = 0; e < MAX_D / 32; e++) {
        int j = lane + 32 * e;
        if (j < d) orow[j] = X(acc[e] / l);
    }
    if (lane == 0) lse[((i64)bi * h + hi) * t + row] = m + logf(l);
}
INSTANTIATE(attention_forward, (X* out, float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d),
            (out, lse, q, k, v, b, t, h, g, d))

// Backward, step 1: per query row, delta = sum_s P dP (= rowsum(dO * O)) and dq. One warp per
// (batch, head, row); P is recomputed from the saved log-sum-exp.
template <typename X>
__device__ void attention_backward_dq(X* dq, float* delta, const X* dout, const float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= b * h * t) return;
    int row = warp % t, hi = (warp / t) % h, bi = warp / (t * h);
    int gi = hi / (h / g);
    int hd = h * d, gd = g * d;
    float scale = rsqrtf((float)d);
    i64 qoff = ((i64)bi * t + row) * hd + hi * d;
    float L = lse[((i64)bi * h + hi) * t + row];
    float qv[MAX_D / 32], dov[MAX_D / 32], acc[MAX_D / 32];
    #pragma unroll
    for (int e = 0; e < MAX_D / 32; e++) {
        int j = lane + 32 * e;
        qv[e] = j < d ? q[qoff + j] : 0.0f;
        dov[e] = j < d ? dout[qoff + j] : 0.0f;
        acc[e] = 0.0f;
    }
    // delta = sum_s P_s (dO . v_s)
    float dl = 0.0f;
    for (int s = 0; s <= row; s++) {
        const X* kr = k + ((i64)bi * t + s) * gd + gi * d;
        const X* vr = v + ((i64)bi * t + s) * gd + gi * d;
        float qk = 0.0f, dv = 0.0f;
        #pragma unroll
        for (int e = 0; e < MAX_D / 32; e++) {
            int j = lane + 32 * e;
            if (j < d) { qk += qv[e] * kr[j]; dv += dov[e] * vr[j]; }
        }
        for (int o = 16; o > 0; o >>= 1) {
            qk += __shfl_xor_sync(0xffffffff, qk, o);
            dv += __shfl_xor_sync(0xffffffff, dv, o);
        }
        dl += __expf(qk * scale - L) * dv;
    }
    for (int s = 0; s <= row; s++) {
        const X* kr = k + ((i64)bi * t + s) * gd + gi * d;
        const X* vr = v + ((i64)bi * t + s) * gd + gi * d;
        float qk = 0.0f, dv = 0.0f;
        #pragma unroll
        for (int e = 0; e < MAX_D / 32; e++) {
            int j = lane + 32 * e;
            if (j < d) { qk += qv[e] * kr[j]; dv += dov[e] * vr[j]; }
        }
        for (int o = 16; o > 0; o >>= 1) {
            qk += __shfl_xor_sync(0xffffffff, qk, o);
            dv += __shfl_xor_sync(0xffffffff, dv, o);
        }
        float ds = __expf(qk * scale - L) * (dv - dl);
        #pragma unroll
        for (int e = 0; e < MAX_D / 32; e++) {
            int j = lane + 32 * e;
            if (j < d) acc[e] += scale * ds * kr[j];
        }
    }
    #pragma unroll
    for (int e = 0; e < MAX_D / 32; e++) {
        int j = lane + 32 * e;
        if (j < d) dq[qoff + j] = X(acc[e]);
    }
    if (lane == 0) delta[((i64)bi * h + hi) * t + row] = dl;
}
INSTANTIATE(attention_backward_dq,
            (X* dq, float* delta, const X* dout, const float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d),
            (dq, delta, dout, lse, q, k, v, b, t, h, g, d))

// Backward, step 2: per key row s of kv head gi, dk and dv gather from the query rows r >= s
// of the group's heads, in a fixed order (no atomics). One warp per (batch, kv head, row).
template <typename X>
__device__ void attention_backward_dkv(X* dk, X* dv, const float* delta, const X* dout, const float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= b * g * t) return;
    int s = warp % t, gi = (warp / t) % g, bi = warp / (t * g);
    int hd = h * d, gd = g * d, per_group = h / g;
    float scale = rsqrtf((float)d);
    i64 koff = ((i64)bi * t + s) * gd + gi * d;
    float kv[MAX_D / 32], vv[MAX_D / 32], dka[MAX_D / 32], dva[MAX_D / 32];
    #pragma unroll
    for (int e = 0; e < MAX_D / 32; e++) {
        int j = lane + 32 * e;
        kv[e] = j < d ? k[koff + j] : 0.0f;
        vv[e] = j < d ? v[koff + j] : 0.0f;
        dka[e] = 0.0f;
        dva[e] = 0.0f;
    }
    for (int hh = 0; hh < per_group; hh++) {
        int hi = gi * per_group + hh;
        for (int r = s; r < t; r++) {
            i64 qoff = ((i64)bi * t + r) * hd + hi * d;
            float qk = 0.0f, dpv = 0.0f;
            #pragma unroll
            for (int e = 0; e < MAX_D / 32; e++) {
                int j = lane + 32 * e;
                if (j < d) { qk += q[qoff + j] * kv[e]; dpv += dout[qoff + j] * vv[e]; }
            }
            for (int o = 16; o > 0; o >>= 1) {
                qk += __shfl_xor_sync(0xffffffff, qk, o);
                dpv += __shfl_xor_sync(0xffffffff, dpv, o);
            }
            i64 li = ((i64)bi * h + hi) * t + r;
            float p = __expf(qk * scale - lse[li]);
            float ds = p * (dpv - delta[li]);
            #pragma unroll
            for (int e = 0; e < MAX_D / 32; e++) {
                int j = lane + 32 * e;
                if (j < d) {
                    dka[e] += scale * ds * q[qoff + j];
                    dva[e] += p * dout[qoff + j];
                }
            }
        }
    }
    #pragma unroll
    for (int e = 0; e < MAX_D / 32; e++) {
        int j = lane + 32 * e;
        if (j < d) { dk[koff + j] = X(dka[e]); dv[koff + j] = X(dva[e]); }
    }
}
INSTANTIATE(attention_backward_dkv,
            (X* dk, X* dv, const float* delta, const X* dout, const float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d),
            (dk, dv, delta, dout, lse, q, k, v, b, t, h, g, d))

// ---------------------------------------------------------------------------------------
// Tiled causal attention (FlashAttention-2's loop order, f32 on the CUDA cores), for D <= 128.
// A block of 4 warps takes TILE = 32 rows: query rows in the forward and dq kernels, key rows
// in dkv. It walks the other side in tiles of 32 rows staged in shared memory, so each key or
// query row is read from global memory once per tile instead of once per row. Each warp owns
// TILE_ROWS of the block's rows and works on all of them at once: lane j owns column j of the
// warp's [TILE_ROWS, 32] score tile, and each element it reads from the other side's tile
// serves TILE_ROWS products (one shared-memory read per TILE_ROWS multiply-adds, not two per
// one). The rows' probabilities pass through shared memory to the lanes that own the head
// dimensions. Rows are padded to D + 1 floats so the lanes reading down a column of a tile hit
// different banks. Nothing is accumulated with atomics: every output element is summed by one
// thread in a fixed order.
//
// Each kernel is a template on the head dimension DD: 64 and 128 (compiled with every loop
// bound known, so the per-lane accumulators stay in registers), and 0, which reads D at run
// time (any D <= 128; the accumulators are still indexed only by unrolled loops). Blocks are
// numbered heaviest first: in causal attention the last query tile (forward, dq) and the
// first key tile (dkv) do the most work, and the GPU starts blocks in index order.

#define TILE 32
#define TILE_WARPS 4
#define TILE_ROWS (TILE / TILE_WARPS)
#define TILED_MAX_D 128

__device__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// The head dimension a DD-kernel works with, and the lane's accumulators per row.
#define HEAD_DIM(DD, d) ((DD) ? (DD) : (d))
#define LANE_DIMS(DD) ((DD) ? (DD) / 32 : TILED_MAX_D / 32)

// The grid is [tiles][groups] ((batch, head) pairs), heaviest tile first: block
// `blockIdx.x` works on tile rank blockIdx.x / groups (0 the heaviest) of pair
// blockIdx.x % groups.

// Copies rows first..first+TILE of a [B*T, width] matrix (this sequence's, head offset `col`)
// into a [TILE, ld] tile; rows past the sequence become zeros.
template <typename X>
__device__ void load_tile(float* tile, int ld, const X* x, i64 base_row, int first, int t, int width, int col, int d) {
    for (int e = threadIdx.x; e < TILE * d; e += blockDim.x) {
        int r = e / d, j = e % d;
        tile[r * ld + j] = first + r < t ? x[(base_row + first + r) * width + col + j] : 0.0f;
    }
}

// The warp's TILE_ROWS rows of a tile against one row `x`: s[rr] += rows[rr] . x, over the
// first d columns in order. `rows` are the same for every lane (broadcast reads). Inlined,
// so the caller's arrays stay in registers.
__device__ __forceinline__ void rows_dot(float* s, const float* rows, const float* x, int ld, int d) {
    for (int j = 0; j < d; j++) {
        float xj = x[j];
        #pragma unroll
        for (int rr = 0; rr < TILE_ROWS; rr++) s[rr] += rows[rr * ld + j] * xj;
    }
}

// The warp's TILE_ROWS rows of weights `w` [TILE_ROWS, TILE] times column j of a tile:
// a[rr] += sum over c of w[rr][c] tile[c][j], c in order.
__device__ __forceinline__ void rows_times_tile(float* a, const float* w, const float* tile, int ld, int j) {
    #pragma unroll 4
    for (int c = 0; c < TILE; c++) {
        float tj = tile[c * ld + j];
        #pragma unroll
        for (int rr = 0; rr < TILE_ROWS; rr++) a[rr] += w[rr * TILE + c] * tj;
    }
}

// Forward: out [B*T, H*D] and lse [B*H*T] for one (batch, head, tile of query rows) per block.
template <typename X, int DD>
__device__ void attention_forward_tiled(X* out, float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d_arg) {
    constexpr int PER = LANE_DIMS(DD);
    const int d = HEAD_DIM(DD, d_arg);
    DYNAMIC_SHARED(float, smem);
    const int ld = d + 1;
    float* qs = smem;
    float* ks = qs + TILE * ld;
    float* vs = ks + TILE * ld;
    float* ps = vs + TILE * ld;  // [TILE_WARPS][TILE_ROWS][TILE]: each row's probabilities
    int tiles = (t + TILE - 1) / TILE, rank = blockIdx.x / (b * h), bh = blockIdx.x % (b * h);
    int q0 = (tiles - 1 - rank) * TILE;
    int hi = bh % h, bi = bh / h, gi = hi / (h / g);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int hd = h * d, gd = g * d;
    float scale = rsqrtf((float)d);
    i64 base = (i64)bi * t;
    const float* qw = qs + warp * TILE_ROWS * ld;  // this warp's query rows
    float* pw = ps + warp * TILE_ROWS * TILE;
    load_tile(qs, ld, q, base, q0, t, hd, hi * d, d);
    float m[TILE_ROWS], l[TILE_ROWS], acc[TILE_ROWS][PER];
    #pragma unroll
    for (int rr = 0; rr < TILE_ROWS; rr++) {
        m[rr] = -INF;
        l[rr] = 0.0f;
        #pragma unroll
        for (int e = 0; e < PER; e++) acc[rr][e] = 0.0f;
    }
    int last = min(q0 + TILE, t) - 1;
    for (int k0 = 0; k0 <= last; k0 += TILE) {
        __syncthreads();  // the previous tile is no longer read
        load_tile(ks, ld, k, base, k0, t, gd, gi * d, d);
        load_tile(vs, ld, v, base, k0, t, gd, gi * d, d);
        __syncthreads();
        int col = k0 + lane;
        float s[TILE_ROWS];
        #pragma unroll
        for (int rr = 0; rr < TILE_ROWS; rr++) s[rr] = 0.0f;
        rows_dot(s, qw, ks + lane * ld, ld, d);
        float corr[TILE_ROWS];
        #pragma unroll
        for (int rr = 0; rr < TILE_ROWS; rr++) {
            int row = q0 + warp * TILE_ROWS + rr;
            float p = 0.0f;
            corr[rr] = 1.0f;
            if (row < t) {  // the same for the whole warp; key k0 <= row is in this tile
                float sc = col <= row ? s[rr] * scale : -INF;
                float mn = fmaxf(m[rr], warp_max(sc));
                p = col <= row ? __expf(sc - mn) : 0.0f;
                corr[rr] = __expf(m[rr] - mn);
                l[rr] = l[rr] * corr[rr] + warp_sum(p);
                m[rr] = mn;
            }
            pw[rr * TILE + lane] = p;
        }
        __syncwarp();
        #pragma unroll
        for (int e = 0; e < PER; e++) {
            int j = lane + 32 * e;
            if (j < d) {
                float a[TILE_ROWS];
                #pragma unroll
                for (int rr = 0; rr < TILE_ROWS; rr++) a[rr] = acc[rr][e] * corr[rr];
                rows_times_tile(a, pw, vs, ld, j);
                #pragma unroll
                for (int rr = 0; rr < TILE_ROWS; rr++) acc[rr][e] = a[rr];
            }
        }
        __syncwarp();  // the probabilities are read before the next tile writes them
    }
    #pragma unroll
    for (int rr = 0; rr < TILE_ROWS; rr++) {
        int row = q0 + warp * TILE_ROWS + rr;
        if (row < t) {
            X* orow = out + (base + row) * hd + hi * d;
            #pragma unroll
            for (int e = 0; e < PER; e++) {
                int j = lane + 32 * e;
                if (j < d) orow[j] = X(acc[rr][e] / l[rr]);
            }
            if (lane == 0) lse[((i64)bi * h + hi) * t + row] = m[rr] + logf(l[rr]);
        }
    }
}
#define ATTENTION_FORWARD_PARAMS (X* out, float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d)
#define ATTENTION_FORWARD_ARGS (out, lse, q, k, v, b, t, h, g, d)
INSTANTIATE_AS(attention_forward_tiled, (attention_forward_tiled<X, 0>), ATTENTION_FORWARD_PARAMS, ATTENTION_FORWARD_ARGS)
INSTANTIATE_AS(attention_forward_tiled_d64, (attention_forward_tiled<X, 64>), ATTENTION_FORWARD_PARAMS, ATTENTION_FORWARD_ARGS)
INSTANTIATE_AS(attention_forward_tiled_d128, (attention_forward_tiled<X, 128>), ATTENTION_FORWARD_PARAMS, ATTENTION_FORWARD_ARGS)

// Backward, step 1: delta = rowsum(dO * O) per (batch, head, row), one warp per row.
template <typename X>
__device__ void attention_delta(float* delta, const X* dout, const X* out, int b, int t, int h, int d) {
    int w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (w >= b * h * t) return;
    int row = w % t, hi = (w / t) % h, bi = w / (t * h);
    i64 off = ((i64)bi * t + row) * h * d + hi * d;
    float s = 0.0f;
    for (int j = lane; j < d; j += 32) s += dout[off + j] * out[off + j];
    s = warp_sum(s);
    if (lane == 0) delta[((i64)bi * h + hi) * t + row] = s;
}
INSTANTIATE(attention_delta, (float* delta, const X* dout, const X* out, int b, int t, int h, int d), (delta, dout, out, b, t, h, d))

// Backward, step 2: dq for one (batch, head, tile of query rows) per block.
// dS = P (dP - delta), dq = scale dS K, with P recomputed from the saved log-sum-exp.
template <typename X, int DD>
__device__ void attention_backward_dq_tiled(X* dq, const float* delta, const X* dout, const float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d_arg) {
    constexpr int PER = LANE_DIMS(DD);
    const int d = HEAD_DIM(DD, d_arg);
    DYNAMIC_SHARED(float, smem);
    const int ld = d + 1;
    float* qs = smem;
    float* dos = qs + TILE * ld;
    float* ks = dos + TILE * ld;
    float* vs = ks + TILE * ld;
    float* ps = vs + TILE * ld;  // [TILE_WARPS][TILE_ROWS][TILE]: each row's dS
    int tiles = (t + TILE - 1) / TILE, rank = blockIdx.x / (b * h), bh = blockIdx.x % (b * h);
    int q0 = (tiles - 1 - rank) * TILE;
    int hi = bh % h, bi = bh / h, gi = hi / (h / g);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int hd = h * d, gd = g * d;
    float scale = rsqrtf((float)d);
    i64 base = (i64)bi * t;
    const float* qw = qs + warp * TILE_ROWS * ld;  // this warp's query rows
    const float* dow = dos + warp * TILE_ROWS * ld;
    float* pw = ps + warp * TILE_ROWS * TILE;
    load_tile(qs, ld, q, base, q0, t, hd, hi * d, d);
    load_tile(dos, ld, dout, base, q0, t, hd, hi * d, d);
    float acc[TILE_ROWS][PER], L[TILE_ROWS], dlt[TILE_ROWS];
    #pragma unroll
    for (int rr = 0; rr < TILE_ROWS; rr++) {
        int row = q0 + warp * TILE_ROWS + rr;
        i64 li = ((i64)bi * h + hi) * t + row;
        L[rr] = row < t ? lse[li] : 0.0f;
        dlt[rr] = row < t ? delta[li] : 0.0f;
        #pragma unroll
        for (int e = 0; e < PER; e++) acc[rr][e] = 0.0f;
    }
    int last = min(q0 + TILE, t) - 1;
    for (int k0 = 0; k0 <= last; k0 += TILE) {
        __syncthreads();
        load_tile(ks, ld, k, base, k0, t, gd, gi * d, d);
        load_tile(vs, ld, v, base, k0, t, gd, gi * d, d);
        __syncthreads();
        int col = k0 + lane;
        float qk[TILE_ROWS], dp[TILE_ROWS];
        #pragma unroll
        for (int rr = 0; rr < TILE_ROWS; rr++) qk[rr] = dp[rr] = 0.0f;
        rows_dot(qk, qw, ks + lane * ld, ld, d);
        rows_dot(dp, dow, vs + lane * ld, ld, d);
        #pragma unroll
        for (int rr = 0; rr < TILE_ROWS; rr++) {
            int row = q0 + warp * TILE_ROWS + rr;
            float ds = 0.0f;
            if (row < t && col <= row) {
                float p = __expf(qk[rr] * scale - L[rr]);
                ds = p * (dp[rr] - dlt[rr]);
            }
            pw[rr * TILE + lane] = ds;
        }
        __syncwarp();
        #pragma unroll
        for (int e = 0; e < PER; e++) {
            int j = lane + 32 * e;
            if (j < d) {
                float a[TILE_ROWS];
                #pragma unroll
                for (int rr = 0; rr < TILE_ROWS; rr++) a[rr] = 0.0f;
                rows_times_tile(a, pw, ks, ld, j);
                #pragma unroll
                for (int rr = 0; rr < TILE_ROWS; rr++) acc[rr][e] += scale * a[rr];
            }
        }
        __syncwarp();
    }
    #pragma unroll
    for (int rr = 0; rr < TILE_ROWS; rr++) {
        int row = q0 + warp * TILE_ROWS + rr;
        if (row < t) {
            #pragma unroll
            for (int e = 0; e < PER; e++) {
                int j = lane + 32 * e;
                if (j < d) dq[(base + row) * hd + hi * d + j] = X(acc[rr][e]);
            }
        }
    }
}
#define ATTENTION_DQ_PARAMS (X* dq, const float* delta, const X* dout, const float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d)
#define ATTENTION_DQ_ARGS (dq, delta, dout, lse, q, k, v, b, t, h, g, d)
INSTANTIATE_AS(attention_backward_dq_tiled, (attention_backward_dq_tiled<X, 0>), ATTENTION_DQ_PARAMS, ATTENTION_DQ_ARGS)
INSTANTIATE_AS(attention_backward_dq_tiled_d64, (attention_backward_dq_tiled<X, 64>), ATTENTION_DQ_PARAMS, ATTENTION_DQ_ARGS)
INSTANTIATE_AS(attention_backward_dq_tiled_d128, (attention_backward_dq_tiled<X, 128>), ATTENTION_DQ_PARAMS, ATTENTION_DQ_ARGS)

// Backward, step 3: dk and dv for one (batch, kv head, tile of key rows) per block, summed
// over the group's query heads and the query rows at or after each key, in that order.
// Lane i owns query row i of the staged query tile; warp w the key rows w * TILE_ROWS + rr.
template <typename X, int DD>
__device__ void attention_backward_dkv_tiled(X* dk, X* dv, const float* delta, const X* dout, const float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d_arg) {
    constexpr int PER = LANE_DIMS(DD);
    const int d = HEAD_DIM(DD, d_arg);
    DYNAMIC_SHARED(float, smem);
    const int ld = d + 1;
    float* qs = smem;
    float* dos = qs + TILE * ld;
    float* ks = dos + TILE * ld;
    float* vs = ks + TILE * ld;
    float* ps = vs + TILE * ld;                       // [TILE_WARPS][TILE_ROWS][TILE]: P of each key row
    float* dss = ps + TILE_WARPS * TILE_ROWS * TILE;  // the same for dS
    float* ls = dss + TILE_WARPS * TILE_ROWS * TILE;  // [TILE]: lse of the staged query rows
    float* dl = ls + TILE;                            // [TILE]: their delta
    int rank = blockIdx.x / (b * g), bg = blockIdx.x % (b * g);
    int k0 = rank * TILE;
    int gi = bg % g, bi = bg / g, per_group = h / g;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int hd = h * d, gd = g * d;
    float scale = rsqrtf((float)d);
    i64 base = (i64)bi * t;
    const float* kw = ks + warp * TILE_ROWS * ld;  // this warp's key rows
    const float* vw = vs + warp * TILE_ROWS * ld;
    float* pw = ps + warp * TILE_ROWS * TILE;
    float* dsw = dss + warp * TILE_ROWS * TILE;
    load_tile(ks, ld, k, base, k0, t, gd, gi * d, d);
    load_tile(vs, ld, v, base, k0, t, gd, gi * d, d);
    float dka[TILE_ROWS][PER], dva[TILE_ROWS][PER];
    #pragma unroll
    for (int rr = 0; rr < TILE_ROWS; rr++) {
        #pragma unroll
        for (int e = 0; e < PER; e++) {
            dka[rr][e] = 0.0f;
            dva[rr][e] = 0.0f;
        }
    }
    for (int hh = 0; hh < per_group; hh++) {
        int hi = gi * per_group + hh;
        for (int q0 = k0; q0 < t; q0 += TILE) {
            __syncthreads();
            load_tile(qs, ld, q, base, q0, t, hd, hi * d, d);
            load_tile(dos, ld, dout, base, q0, t, hd, hi * d, d);
            for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
                i64 li = ((i64)bi * h + hi) * t + q0 + i;
                ls[i] = q0 + i < t ? lse[li] : 0.0f;
                dl[i] = q0 + i < t ? delta[li] : 0.0f;
            }
            __syncthreads();
            int row = q0 + lane;
            float qk[TILE_ROWS], dp[TILE_ROWS];
            #pragma unroll
            for (int rr = 0; rr < TILE_ROWS; rr++) qk[rr] = dp[rr] = 0.0f;
            rows_dot(qk, kw, qs + lane * ld, ld, d);
            rows_dot(dp, vw, dos + lane * ld, ld, d);
            #pragma unroll
            for (int rr = 0; rr < TILE_ROWS; rr++) {
                int key = k0 + warp * TILE_ROWS + rr;
                float p = 0.0f, ds = 0.0f;
                if (key < t && row < t && row >= key) {
                    p = __expf(qk[rr] * scale - ls[lane]);
                    ds = p * (dp[rr] - dl[lane]);
                }
                pw[rr * TILE + lane] = p;
                dsw[rr * TILE + lane] = ds;
            }
            __syncwarp();
            #pragma unroll
            for (int e = 0; e < PER; e++) {
                int j = lane + 32 * e;
                if (j < d) {
                    float a[TILE_ROWS], bs[TILE_ROWS];
                    #pragma unroll
                    for (int rr = 0; rr < TILE_ROWS; rr++) a[rr] = bs[rr] = 0.0f;
                    rows_times_tile(a, dsw, qs, ld, j);
                    rows_times_tile(bs, pw, dos, ld, j);
                    #pragma unroll
                    for (int rr = 0; rr < TILE_ROWS; rr++) {
                        dka[rr][e] += scale * a[rr];
                        dva[rr][e] += bs[rr];
                    }
                }
            }
            __syncwarp();
        }
    }
    #pragma unroll
    for (int rr = 0; rr < TILE_ROWS; rr++) {
        int key = k0 + warp * TILE_ROWS + rr;
        if (key < t) {
            #pragma unroll
            for (int e = 0; e < PER; e++) {
                int j = lane + 32 * e;
                if (j < d) {
                    dk[(base + key) * gd + gi * d + j] = X(dka[rr][e]);
                    dv[(base + key) * gd + gi * d + j] = X(dva[rr][e]);
                }
            }
        }
    }
}
#define ATTENTION_DKV_PARAMS (X* dk, X* dv, const float* delta, const X* dout, const float* lse, const X* q, const X* k, const X* v, int b, int t, int h, int g, int d)
#define ATTENTION_DKV_ARGS (dk, dv, delta, dout, lse, q, k, v, b, t, h, g, d)
INSTANTIATE_AS(attention_backward_dkv_tiled, (attention_backward_dkv_tiled<X, 0>), ATTENTION_DKV_PARAMS, ATTENTION_DKV_ARGS)
INSTANTIATE_AS(attention_backward_dkv_tiled_d64, (attention_backward_dkv_tiled<X, 64>), ATTENTION_DKV_PARAMS, ATTENTION_DKV_ARGS)
INSTANTIATE_AS(attention_backward_dkv_tiled_d128, (attention_backward_dkv_tiled<X, 128>), ATTENTION_DKV_PARAMS, ATTENTION_DKV_ARGS)

// ---------------------------------------------------------------------------------------
// Attention on the tensor cores (bf16/f16 runs): the six [T, T, D] products go to cuBLAS
// (strided batched GEMMs, f32 accumulation) and these kernels do what lies between them,
// llm.c's layout. Q, K and V are copied head-major ([B, H, T, D], [B, G, T, D]), so the R = H/G
// query heads of a group are R*T consecutive rows that share their K/V block: one product per
// (sequence, group) covers them all, and dK, dV sum the group's heads inside the product. The
// scores S (f32) and probabilities P (16-bit) of a chunk of sequences are materialised
// [B, H, T, T]; the causal mask is applied here (the products compute the whole square).

// dst [c, heads, T, D] from src rows [c*T, heads*D] (to_heads), or back.
template <typename X>
__device__ void attn_heads(X* dst, const X* src, int c, int t, int heads, int d, int to_heads) {
    i64 total = (i64)c * heads * t * d;
    for (i64 x = blockIdx.x * (i64)blockDim.x + threadIdx.x; x < total; x += (i64)gridDim.x * blockDim.x) {
        int e = x % d;
        i64 rest = x / d;
        int i = rest % t;
        i64 bh = rest / t;
        int hh = bh % heads;
        i64 bb = bh / heads;
        i64 row_major = (bb * t + i) * heads * d + (i64)hh * d + e;
        if (to_heads) dst[x] = src[row_major];
        else dst[row_major] = src[x];
    }
}
INSTANTIATE(attn_heads, (X* dst, const X* src, int c, int t, int heads, int d, int to_heads), (dst, src, c, t, heads, d, to_heads))

// The same copies with RoPE fused in (q and k): to heads, each pair (j, j + D/2) of row i of a
// sequence rotated by position i; back from heads (the gradients), rotated by the inverse.
// One thread per pair; the arithmetic of `rope`, rounded once.
template <typename X>
__device__ void attn_heads_rope(X* dst, const X* src, const float* cosb, const float* sinb, int c, int t, int heads, int d, int to_heads) {
    int half = d / 2;
    i64 total = (i64)c * heads * t * half;
    for (i64 x = blockIdx.x * (i64)blockDim.x + threadIdx.x; x < total; x += (i64)gridDim.x * blockDim.x) {
        int j = x % half;
        i64 rest = x / half;
        int i = rest % t;
        i64 bh = rest / t;
        int hh = bh % heads;
        i64 bb = bh / heads;
        i64 head_major = (bh * t + i) * d;
        i64 row_major = (bb * t + i) * heads * d + (i64)hh * d;
        const float* cs = cosb + (i64)i * d;
        const float* sn = sinb + (i64)i * d;
        if (to_heads) {
            float a = src[row_major + j], b = src[row_major + j + half];
            dst[head_major + j] = X(a * cs[j] - b * sn[j]);
            dst[head_major + j + half] = X(b * cs[half + j] + a * sn[half + j]);
        } else {
            float a = src[head_major + j], b = src[head_major + j + half];
            dst[row_major + j] = X(a * cs[j] + b * sn[half + j]);
            dst[row_major + j + half] = X(b * cs[half + j] - a * sn[j]);
        }
    }
}
INSTANTIATE(attn_heads_rope, (X* dst, const X* src, const float* cosb, const float* sinb, int c, int t, int heads, int d, int to_heads),
            (dst, src, cosb, sinb, c, t, heads, d, to_heads))

// P = causal softmax of the scaled scores S, one warp per row (row r of [c*H, T] is query
// r % T): with from_lse, P = exp(S - lse[r]) (backward recomputes the forward's P); else lse
// is written. Above the diagonal P is 0.
template <typename X>
__device__ void attn_softmax(X* p, float* lse, const float* s, i64 rows, int t, int from_lse) {
    int lane = threadIdx.x & 31;
    i64 first = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 r = first; r < rows; r += warps) {
        int i = r % t;
        const float* sr = s + r * t;
        X* pr = p + r * t;
        float m, inv = 1.0f;
        if (from_lse) {
            m = lse[r];
        } else {
            m = -INF;
            for (int j = lane; j <= i; j += 32) m = fmaxf(m, sr[j]);
            m = warp_max(m);
            float l = 0.0f;
            for (int j = lane; j <= i; j += 32) l += __expf(sr[j] - m);
            l = warp_sum(l);
            inv = 1.0f / l;
            if (lane == 0) lse[r] = m + logf(l);
        }
        for (int j = lane; j < t; j += 32) pr[j] = X(j <= i ? __expf(sr[j] - m) * inv : 0.0f);
    }
}
INSTANTIATE(attn_softmax, (X* p, float* lse, const float* s, i64 rows, int t, int from_lse), (p, lse, s, rows, t, from_lse))

// dS = P (dP - delta[r]) on and below the diagonal, 0 above, in place of P.
template <typename X>
__device__ void attn_dsoftmax(X* p, const float* dp, const float* delta, i64 rows, int t) {
    int lane = threadIdx.x & 31;
    i64 first = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 r = first; r < rows; r += warps) {
        int i = r % t;
        float dl = delta[r];
        X* pr = p + r * t;
        const float* dr = dp + r * t;
        for (int j = lane; j < t; j += 32) pr[j] = X(j <= i ? (float)pr[j] * (dr[j] - dl) : 0.0f);
    }
}
INSTANTIATE(attn_dsoftmax, (X* p, const float* dp, const float* delta, i64 rows, int t), (p, dp, delta, rows, t))

// ---------------------------------------------------------------------------------------
// Flash attention on the tensor cores (bf16/f16 runs, heads 64 or 128 wide, sm_80 and
// later): FlashAttention-2's loop on `mma.sync`, so the [T, T] scores never reach memory.
// Forward and dq: one block of 4 warps per (batch, head, 64 query rows), each warp 16 rows,
// over tiles of FLASH_BC keys staged in shared memory; dkv: one block per (batch, group, 64
// keys), each warp 16 keys, over the group's heads and the query tiles at or below the
// diagonal. Products accumulate in f32; P and dS are rounded to X before their products, as
// the cuBLAS path (attn_softmax, attn_dsoftmax) stores them. With `rope`, q and k are rotated
// as they are read (`attn_heads_rope`'s arithmetic) and dq, dk leave through the inverse, so
// the model's buffers stay un-rotated. Heaviest blocks first, as the tiled kernels.

// Tensor cores, one warp at a time: D += A B, mma.sync.aligned.m16n8k16.row.col.f32 with
// bf16 or f16 operands. Fragments as the PTX ISA lays them out ("Matrix Fragments for
// mma.m16n8k16 with floating point type"): with g = lane / 4 and c = lane % 4,
//   A [16 x 16] row-major, 4 registers of two: a[0] row g, cols 2c, 2c+1; a[1] row g+8,
//     the same cols; a[2] row g, cols 2c+8, 2c+9; a[3] row g+8, cols 2c+8, 2c+9;
//   B [16 x 8] (k x n), 2 registers: b[0] rows 2c, 2c+1 of col g; b[1] rows 2c+8, 2c+9;
//   C, D [16 x 8] f32: d[0], d[1] row g, cols 2c, 2c+1; d[2], d[3] row g+8.
// The lower-numbered element of a pair sits in the low 16 bits. Every lane of the warp must
// call it together. The emulator (emu.cpp) computes the same sums in f32 from that layout.
#ifdef MINIMIND_EMU
__device__ void mma16816(float* d, const unsigned* a, const unsigned* b, bf16) { emu_mma16816(d, a, b, true); }
__device__ void mma16816(float* d, const unsigned* a, const unsigned* b, f16) { emu_mma16816(d, a, b, false); }
#else
__device__ __forceinline__ void mma16816(float* d, const unsigned* a, const unsigned* b, bf16) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // the engine launches these kernels on sm_80 and later only
#endif
}
__device__ __forceinline__ void mma16816(float* d, const unsigned* a, const unsigned* b, f16) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}
#endif

template <typename X>
__device__ __forceinline__ unsigned pack2(X lo, X hi) {
    return (unsigned)lo.bits | ((unsigned)hi.bits << 16);
}

// Element `col` of row `x` (DD wide), rotated by RoPE at the row's position when `cs` (that
// position's cos row; `sn` its sin row) is given: `attn_heads_rope`'s arithmetic.
template <typename X, int DD>
__device__ __forceinline__ X rotated(const X* x, const float* cs, const float* sn, int col) {
    constexpr int HALF = DD / 2;
    if (!cs) return x[col];
    if (col < HALF) return X((float)x[col] * cs[col] - (float)x[col + HALF] * sn[col]);
    return X((float)x[col] * cs[col] + (float)x[col - HALF] * sn[col]);
}

// The A fragments of a warp's 16 rows r0.. of `x` (row i at x + i * stride; rows at or past
// t are zeros), DD wide: KS = DD/16 steps of depth 16, rotated when `cosb` is given.
template <typename X, int DD>
__device__ void load_rows_a(unsigned (*f)[4], const X* x, i64 stride, int r0, int t, const float* cosb, const float* sinb) {
    int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    #pragma unroll
    for (int s = 0; s < DD / 16; s++) {
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            int row = r0 + g + 8 * (i & 1), col = s * 16 + 2 * c + 8 * (i >> 1);
            X lo(0.0f), hi(0.0f);
            if (row < t) {
                const float* cs = cosb ? cosb + (i64)row * DD : nullptr;
                const float* sn = cosb ? sinb + (i64)row * DD : nullptr;
                lo = rotated<X, DD>(x + row * stride, cs, sn, col);
                hi = rotated<X, DD>(x + row * stride, cs, sn, col + 1);
            }
            f[s][i] = pack2(lo, hi);
        }
    }
}

// Rows first..first+ROWS of `x` into a shared tile [ROWS][DD + 8] (8 elements of padding
// keep the fragment reads of a warp on 32 distinct banks); rows at or past t are zeros.
// Unrolled by 2 (in all three flash kernels): the dkv kernel at D 128 is at 255 registers,
// and with q and dout at strides of their own (packed q|k|v) the compiler's deeper
// unrolling spilled there.
template <typename X, int DD, int ROWS>
__device__ void load_rows_shared(X (*tile)[DD + 8], const X* x, i64 stride, int first, int t, const float* cosb, const float* sinb) {
    #pragma unroll 2
    for (int e = threadIdx.x; e < ROWS * DD; e += blockDim.x) {
        int r = e / DD, col = e % DD, row = first + r;
        X val(0.0f);
        if (row < t) {
            const float* cs = cosb ? cosb + (i64)row * DD : nullptr;
            const float* sn = cosb ? sinb + (i64)row * DD : nullptr;
            val = rotated<X, DD>(x + row * stride, cs, sn, col);
        }
        tile[r][col] = val;
    }
}

// B fragments from a shared tile [n][k] (B's column n is tile row n): b[0], b[1] of the
// 16 x 8 block at rows n0.., depth k0.. are two consecutive pairs of a row.
template <typename X, int LD>
__device__ __forceinline__ void frag_b_rows(unsigned* b, const X (*tile)[LD], int n0, int k0) {
    int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    b[0] = pack2(tile[n0 + g][k0 + 2 * c], tile[n0 + g][k0 + 2 * c + 1]);
    b[1] = pack2(tile[n0 + g][k0 + 2 * c + 8], tile[n0 + g][k0 + 2 * c + 9]);
}

// B fragments from a shared tile [k][n] (B itself, row-major): column n0 + g, rows k0..
template <typename X, int LD>
__device__ __forceinline__ void frag_b_cols(unsigned* b, const X (*tile)[LD], int k0, int n0) {
    int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    b[0] = pack2(tile[k0 + 2 * c][n0 + g], tile[k0 + 2 * c + 1][n0 + g]);
    b[1] = pack2(tile[k0 + 2 * c + 8][n0 + g], tile[k0 + 2 * c + 9][n0 + g]);
}

// A fragment of depth step kk from accumulators laid out as C (16 rows x 8-column tiles
// 2kk and 2kk+1), rounded to X: FlashAttention-2's register reuse, no shuffle.
template <typename X>
__device__ __forceinline__ void frag_a_from_c(unsigned* a, const float (*acc)[4], int kk) {
    a[0] = pack2(X(acc[2 * kk][0]), X(acc[2 * kk][1]));
    a[1] = pack2(X(acc[2 * kk][2]), X(acc[2 * kk][3]));
    a[2] = pack2(X(acc[2 * kk + 1][0]), X(acc[2 * kk + 1][1]));
    a[3] = pack2(X(acc[2 * kk + 1][2]), X(acc[2 * kk + 1][3]));
}

// The inverse rotation of RoPE on accumulators laid out as C (DD/8 column tiles): column j
// pairs with j + DD/2, which is tile n + DD/16 of the same lane. `attn_heads_rope`'s
// arithmetic on the values rounded to X, as the cuBLAS path rounds them first.
template <typename X, int DD>
__device__ void unrotate_c(float (*acc)[4], int r0, int t, const float* cosb, const float* sinb) {
    constexpr int HALF = DD / 2, NH = DD / 16;
    int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    #pragma unroll
    for (int n = 0; n < NH; n++) {
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            int row = min(r0 + g + 8 * (i >> 1), t - 1), j = n * 8 + 2 * c + (i & 1);
            const float* cs = cosb + (i64)row * DD;
            const float* sn = sinb + (i64)row * DD;
            float a = (float)X(acc[n][i]), b = (float)X(acc[n + NH][i]);
            acc[n][i] = a * cs[j] + b * sn[HALF + j];
            acc[n + NH][i] = b * cs[HALF + j] - a * sn[j];
        }
    }
}

// Stores accumulators laid out as C (16 rows r0.., DD wide) times `mul` into rows of `x`.
template <typename X, int DD>
__device__ void store_c(X* x, i64 stride, const float (*acc)[4], int r0, int t, const float* mul) {
    int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    #pragma unroll
    for (int half = 0; half < 2; half++) {
        int row = r0 + g + 8 * half;
        if (row >= t) continue;
        #pragma unroll
        for (int n = 0; n < DD / 8; n++) {
            x[row * stride + n * 8 + 2 * c] = X(acc[n][2 * half] * mul[half]);
            x[row * stride + n * 8 + 2 * c + 1] = X(acc[n][2 * half + 1] * mul[half]);
        }
    }
}

// out = A Bᵀ, laid out as C over N/8 column tiles: A the warp's 16 rows (DD/16 fragments of
// depth 16), B the rows of a shared tile [N][LD]. S = Q Kᵀ, dP = dO Vᵀ and their transposes.
template <typename X, int DD, int N, int LD>
__device__ __forceinline__ void mma_rows_bt(float (*out)[4], const unsigned (*a)[4], const X (*tile)[LD]) {
    #pragma unroll
    for (int j = 0; j < N / 8; j++) {
        out[j][0] = out[j][1] = out[j][2] = out[j][3] = 0.0f;
        #pragma unroll
        for (int st = 0; st < DD / 16; st++) {
            unsigned bf[2];
            frag_b_rows<X, LD>(bf, tile, j * 8, st * 16);
            mma16816(out[j], a[st], bf, X());
        }
    }
}

// acc += C B over DD/8 column tiles: C the warp's 16 x K accumulators laid out as C (rounded to
// X as they become A fragments), B a shared tile [K][LD] row-major. O += P V, dq += dS K and
// the dkv kernel's two.
template <typename X, int DD, int K, int LD>
__device__ __forceinline__ void mma_c_b(float (*acc)[4], const float (*c)[4], const X (*tile)[LD]) {
    #pragma unroll
    for (int kk = 0; kk < K / 16; kk++) {
        unsigned a[4];
        frag_a_from_c<X>(a, c, kk);
        #pragma unroll
        for (int n = 0; n < DD / 8; n++) {
            unsigned bf[2];
            frag_b_cols<X, LD>(bf, tile, kk * 16, n * 8);
            mma16816(acc[n], a, bf, X());
        }
    }
}

// A gradient's accumulators laid out as C, times `scale` and rounded to X (as the cuBLAS
// path's products store them), through RoPE's inverse when `cosb` is given, into rows of `x`.
template <typename X, int DD>
__device__ void store_gradient_c(X* x, i64 stride, float (*acc)[4], int r0, int t, float scale, const float* cosb, const float* sinb) {
    #pragma unroll
    for (int n = 0; n < DD / 8; n++)
        #pragma unroll
        for (int i = 0; i < 4; i++) acc[n][i] = (float)X(acc[n][i] * scale);
    if (cosb) unrotate_c<X, DD>(acc, r0, t, cosb, sinb);
    float one[2] = {1.0f, 1.0f};
    store_c<X, DD>(x, stride, acc, r0, t, one);
}

#define FLASH_ROWS 64
#define FLASH_WARPS 4
// Keys (forward, dq) or queries (dkv) per staged tile: fewer for wide heads, whose
// accumulators take more registers.
#define FLASH_BC(DD) ((DD) > 64 ? 32 : 64)

__device__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}

__device__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffff, v, 1);
    return v + __shfl_xor_sync(0xffffffff, v, 2);
}

// Forward: out [B*T, H*D], lse [B*H*T] (the scaled scores' log-sum-exp per row). q's rows
// are `qld` apart and k's and v's `kld` (H*D and G*D, or both (H+2G)*D when q, k and v are
// the column blocks of one fused projection's output); dq, dk, dv in backward likewise.
template <typename X, int DD>
__device__ void flash_forward(X* out, float* lse, const X* q, const X* k, const X* v, const float* cosb, const float* sinb, int b, int t, int h, int g, int qld, int kld, int rope) {
    constexpr int BC = FLASH_BC(DD), NT = DD / 8, LD = DD + 8;
    __shared__ X ks[BC][LD];
    __shared__ X vs[BC][LD];
    int tiles = (t + FLASH_ROWS - 1) / FLASH_ROWS, rank = blockIdx.x / (b * h), bh = blockIdx.x % (b * h);
    int qt = tiles - 1 - rank, hi = bh % h, bi = bh / h, gi = hi / (h / g);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, c = lane & 3;
    int r0 = qt * FLASH_ROWS + warp * 16;
    const float* cs = rope ? cosb : nullptr;
    i64 qstride = qld, kstride = kld, ostride = (i64)h * DD;
    const X* qb = q + (i64)bi * t * qstride + hi * DD;
    const X* kb = k + (i64)bi * t * kstride + gi * DD;
    const X* vb = v + (i64)bi * t * kstride + gi * DD;
    float scale = 1.0f / sqrtf((float)DD);
    unsigned qf[DD / 16][4];
    load_rows_a<X, DD>(qf, qb, qstride, r0, t, cs, sinb);
    float o[NT][4], m[2] = {-INF, -INF}, l[2] = {0.0f, 0.0f};
    #pragma unroll
    for (int n = 0; n < NT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    int last = (min(t, (qt + 1) * FLASH_ROWS) - 1) / BC;
    for (int kt = 0; kt <= last; kt++) {
        __syncthreads();  // the previous tiles are no longer read
        load_rows_shared<X, DD, BC>(ks, kb, kstride, kt * BC, t, cs, sinb);
        load_rows_shared<X, DD, BC>(vs, vb, kstride, kt * BC, t, nullptr, nullptr);
        __syncthreads();
        if (kt * BC > r0 + 15) continue;  // every key of the tile is after the warp's rows
        float s[BC / 8][4];
        mma_rows_bt<X, DD, BC, LD>(s, qf, ks);
        float mx[2] = {m[0], m[1]};
        #pragma unroll
        for (int j = 0; j < BC / 8; j++) {
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                int row = r0 + gr + 8 * (i >> 1), key = kt * BC + j * 8 + 2 * c + (i & 1);
                float x = key <= row && key < t ? s[j][i] * scale : -INF;
                s[j][i] = x;
                mx[i >> 1] = fmaxf(mx[i >> 1], x);
            }
        }
        float corr[2];
        #pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = quad_max(mx[r]);  // key 0 is in tile 0, so a row's maximum is finite
            corr[r] = __expf(m[r] - mx[r]);
            m[r] = mx[r];
            l[r] *= corr[r];
        }
        #pragma unroll
        for (int j = 0; j < BC / 8; j++) {
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                float p = __expf(s[j][i] - m[i >> 1]);
                l[i >> 1] += p;
                s[j][i] = p;
            }
        }
        #pragma unroll
        for (int n = 0; n < NT; n++) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
        mma_c_b<X, DD, BC, LD>(o, s, vs);
    }
    float inv[2];
    #pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] = quad_sum(l[r]);
        inv[r] = 1.0f / l[r];
        int row = r0 + gr + 8 * r;
        if (c == 0 && row < t) lse[((i64)bi * h + hi) * t + row] = m[r] + logf(l[r]);
    }
    store_c<X, DD>(out + (i64)bi * t * ostride + hi * DD, ostride, o, r0, t, inv);
}

// Backward, dq: per (batch, head, 64 query rows), delta = rowsum(dO O) (written for the dkv
// kernel), P recomputed from lse, dP = dO Vᵀ, dS = P (dP - delta), dq = scale dS K (then
// RoPE's inverse).
template <typename X, int DD>
__device__ void flash_backward_dq(X* dq, float* delta, const X* out, const X* dout, const float* lse, const X* q, const X* k, const X* v, const float* cosb, const float* sinb, int b, int t, int h, int g, int qld, int kld, int rope) {
    constexpr int BC = FLASH_BC(DD), NT = DD / 8, LD = DD + 8;
    __shared__ X ks[BC][LD];
    __shared__ X vs[BC][LD];
    int tiles = (t + FLASH_ROWS - 1) / FLASH_ROWS, rank = blockIdx.x / (b * h), bh = blockIdx.x % (b * h);
    int qt = tiles - 1 - rank, hi = bh % h, bi = bh / h, gi = hi / (h / g);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, c = lane & 3;
    int r0 = qt * FLASH_ROWS + warp * 16;
    const float* cs = rope ? cosb : nullptr;
    i64 qstride = qld, kstride = kld, ostride = (i64)h * DD;
    i64 qoff = (i64)bi * t * qstride + hi * DD, ooff = (i64)bi * t * ostride + hi * DD;
    const X* kb = k + (i64)bi * t * kstride + gi * DD;
    const X* vb = v + (i64)bi * t * kstride + gi * DD;
    float scale = 1.0f / sqrtf((float)DD);
    unsigned qf[DD / 16][4], dof[DD / 16][4];
    load_rows_a<X, DD>(qf, q + qoff, qstride, r0, t, cs, sinb);
    load_rows_a<X, DD>(dof, dout + ooff, ostride, r0, t, nullptr, nullptr);
    // delta = rowsum(dO * O) of the warp's rows, here rather than in a pass of its own: the
    // four lanes of a row (c) take every fourth value, then sum across the quad; written for
    // the dkv kernel that follows.
    float lr[2], dr[2];
    #pragma unroll
    for (int r = 0; r < 2; r++) {
        int at = r0 + gr + 8 * r, row = min(at, t - 1);
        lr[r] = lse[((i64)bi * h + hi) * t + row];
        const X* dor = dout + ooff + (i64)row * ostride;
        const X* orow = out + ooff + (i64)row * ostride;
        float sum = 0.0f;
        for (int j = c; j < DD; j += 4) sum += float(dor[j]) * float(orow[j]);
        dr[r] = quad_sum(sum);
        if (c == 0 && at < t) delta[((i64)bi * h + hi) * t + at] = dr[r];
    }
    float acc[NT][4];
    #pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    int last = (min(t, (qt + 1) * FLASH_ROWS) - 1) / BC;
    for (int kt = 0; kt <= last; kt++) {
        __syncthreads();
        load_rows_shared<X, DD, BC>(ks, kb, kstride, kt * BC, t, cs, sinb);
        load_rows_shared<X, DD, BC>(vs, vb, kstride, kt * BC, t, nullptr, nullptr);
        __syncthreads();
        if (kt * BC > r0 + 15) continue;
        float s[BC / 8][4], dp[BC / 8][4];
        mma_rows_bt<X, DD, BC, LD>(s, qf, ks);
        mma_rows_bt<X, DD, BC, LD>(dp, dof, vs);
        #pragma unroll
        for (int j = 0; j < BC / 8; j++) {
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                int row = r0 + gr + 8 * (i >> 1), key = kt * BC + j * 8 + 2 * c + (i & 1);
                float p = key <= row && row < t ? (float)X(__expf(s[j][i] * scale - lr[i >> 1])) : 0.0f;
                s[j][i] = p * (dp[j][i] - dr[i >> 1]);  // dS, rounded as it is packed
            }
        }
        mma_c_b<X, DD, BC, LD>(acc, s, ks);
    }
    store_gradient_c<X, DD>(dq + qoff, qstride, acc, r0, t, scale, cs, sinb);
}

// Backward, dk and dv: per (batch, group, 64 keys), over the group's heads and the query
// tiles from the diagonal on: Pᵀ from lse, dv += Pᵀ dO, dPᵀ = V dOᵀ, dSᵀ = Pᵀ (dPᵀ - delta),
// dk += dSᵀ Q; dk = scale dk (then RoPE's inverse). The heads sum in f32, rounded once.
template <typename X, int DD>
__device__ void flash_backward_dkv(X* dk, X* dv, const float* delta, const X* dout, const float* lse, const X* q, const X* k, const X* v, const float* cosb, const float* sinb, int b, int t, int h, int g, int qld, int kld, int rope) {
    constexpr int BR = FLASH_BC(DD), NT = DD / 8, LD = DD + 8;
    __shared__ X qs[BR][LD];
    __shared__ X dos[BR][LD];
    __shared__ float ls[BR], ds[BR];
    int kt = blockIdx.x / (b * g), bg = blockIdx.x % (b * g);  // key tile 0 has the most queries
    int gi = bg % g, bi = bg / g, r = h / g;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, c = lane & 3;
    int k0 = kt * FLASH_ROWS + warp * 16;
    const float* cs = rope ? cosb : nullptr;
    i64 koff = (i64)bi * t * kld + gi * DD;
    float scale = 1.0f / sqrtf((float)DD);
    unsigned kf[DD / 16][4], vf[DD / 16][4];
    load_rows_a<X, DD>(kf, k + koff, kld, k0, t, cs, sinb);
    load_rows_a<X, DD>(vf, v + koff, kld, k0, t, nullptr, nullptr);
    float dka[NT][4], dva[NT][4];
    #pragma unroll
    for (int n = 0; n < NT; n++)
        #pragma unroll
        for (int i = 0; i < 4; i++) dka[n][i] = dva[n][i] = 0.0f;
    int first = kt * FLASH_ROWS / BR, qtiles = (t + BR - 1) / BR;
    for (int hh = 0; hh < r; hh++) {
        int hi = gi * r + hh;
        i64 qoff = (i64)bi * t * qld + hi * DD, ooff = ((i64)bi * t * h + hi) * DD;
        i64 rows = ((i64)bi * h + hi) * t;
        for (int qt = first; qt < qtiles; qt++) {
            int q0 = qt * BR;
            __syncthreads();
            load_rows_shared<X, DD, BR>(qs, q + qoff, qld, q0, t, cs, sinb);
            load_rows_shared<X, DD, BR>(dos, dout + ooff, h * DD, q0, t, nullptr, nullptr);
            for (int e = threadIdx.x; e < BR; e += blockDim.x) {
                ls[e] = q0 + e < t ? lse[rows + q0 + e] : 0.0f;
                ds[e] = q0 + e < t ? delta[rows + q0 + e] : 0.0f;
            }
            __syncthreads();
            if (k0 > q0 + BR - 1) continue;  // every query of the tile is before the warp's keys
            float p[BR / 8][4], dp[BR / 8][4];
            mma_rows_bt<X, DD, BR, LD>(p, kf, qs);
            mma_rows_bt<X, DD, BR, LD>(dp, vf, dos);
            #pragma unroll
            for (int j = 0; j < BR / 8; j++) {
                #pragma unroll
                for (int i = 0; i < 4; i++) {
                    int key = k0 + gr + 8 * (i >> 1), qi = j * 8 + 2 * c + (i & 1), query = q0 + qi;
                    float pv = query >= key && query < t && key < t ? (float)X(__expf(p[j][i] * scale - ls[qi])) : 0.0f;
                    p[j][i] = pv;
                    dp[j][i] = pv * (dp[j][i] - ds[qi]);  // dSᵀ, rounded as it is packed
                }
            }
            mma_c_b<X, DD, BR, LD>(dva, p, dos);
            mma_c_b<X, DD, BR, LD>(dka, dp, qs);
        }
    }
    store_gradient_c<X, DD>(dk + koff, kld, dka, k0, t, scale, cs, sinb);
    store_gradient_c<X, DD>(dv + koff, kld, dva, k0, t, 1.0f, nullptr, nullptr);
}

// The kernels, for bf16 and f16: float32 runs keep the tiled kernels' exact path, so each
// `_f32` form exists only to give every typed kernel its three names, and is never launched.
#define INSTANTIATE_16(kname, call, params, args) \
    namespace as_f32 { extern "C" __global__ void kname##_f32 params {} } \
    namespace as_bf16 { extern "C" __global__ void kname##_bf16 params { call args; } } \
    namespace as_f16 { extern "C" __global__ void kname##_f16 params { call args; } }
#define FLASH_FORWARD_PARAMS (X* out, float* lse, const X* q, const X* k, const X* v, const float* cosb, const float* sinb, int b, int t, int h, int g, int qld, int kld, int rope)
#define FLASH_FORWARD_ARGS (out, lse, q, k, v, cosb, sinb, b, t, h, g, qld, kld, rope)
INSTANTIATE_16(flash_forward_d64, (flash_forward<X, 64>), FLASH_FORWARD_PARAMS, FLASH_FORWARD_ARGS)
INSTANTIATE_16(flash_forward_d128, (flash_forward<X, 128>), FLASH_FORWARD_PARAMS, FLASH_FORWARD_ARGS)
#define FLASH_DQ_PARAMS (X* dq, float* delta, const X* out, const X* dout, const float* lse, const X* q, const X* k, const X* v, const float* cosb, const float* sinb, int b, int t, int h, int g, int qld, int kld, int rope)
#define FLASH_DQ_ARGS (dq, delta, out, dout, lse, q, k, v, cosb, sinb, b, t, h, g, qld, kld, rope)
INSTANTIATE_16(flash_backward_dq_d64, (flash_backward_dq<X, 64>), FLASH_DQ_PARAMS, FLASH_DQ_ARGS)
INSTANTIATE_16(flash_backward_dq_d128, (flash_backward_dq<X, 128>), FLASH_DQ_PARAMS, FLASH_DQ_ARGS)
#define FLASH_DKV_PARAMS (X* dk, X* dv, const float* delta, const X* dout, const float* lse, const X* q, const X* k, const X* v, const float* cosb, const float* sinb, int b, int t, int h, int g, int qld, int kld, int rope)
#define FLASH_DKV_ARGS (dk, dv, delta, dout, lse, q, k, v, cosb, sinb, b, t, h, g, qld, kld, rope)
INSTANTIATE_16(flash_backward_dkv_d64, (flash_backward_dkv<X, 64>), FLASH_DKV_PARAMS, FLASH_DKV_ARGS)
INSTANTIATE_16(flash_backward_dkv_d128, (flash_backward_dkv<X, 128>), FLASH_DKV_PARAMS, FLASH_DKV_ARGS)

// The tensor cores' fragment layout, checked: D [16 x 8] = A [16 x 16] B [16 x 8] for one
// warp, A row-major and B given as Bᵀ [8 x 16] (row n is column n), read through the same
// fragment helpers as the flash kernels. A test compares it with a plain product.
extern "C" __global__ void mma_probe(float* d, const bf16* a, const bf16* bt) {
    __shared__ bf16 bs[8][16];
    for (int e = threadIdx.x; e < 128; e += blockDim.x) bs[e / 16][e % 16] = bt[e];
    __syncthreads();
    unsigned af[1][4], bf[2];
    load_rows_a<bf16, 16>(af, a, 16, 0, 16, nullptr, nullptr);
    frag_b_rows<bf16, 16>(bf, bs, 0, 0);
    float acc[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
    mma16816(acc[0], af[0], bf, bf16());
    int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    for (int i = 0; i < 4; i++) d[(g + 8 * (i >> 1)) * 8 + 2 * c + (i & 1)] = acc[0][i];
}

// One decoding step: one warp per query head against `len` cached positions.
template <typename X>
__device__ void attention_decode(X* out, const X* q, const X* k, const X* v, int len, int h, int g, int d) {
    int hi = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (hi >= h) return;
    int gi = hi / (h / g);
    int gd = g * d;
    float scale = rsqrtf((float)d);
    float qv[MAX_D / 32], acc[MAX_D / 32];
    #pragma unroll
    for (int e = 0; e < MAX_D / 32; e++) {
        int j = lane + 32 * e;
        qv[e] = j < d ? q[hi * d + j] : 0.0f;
        acc[e] = 0.0f;
    }
    float m = -INF, l = 0.0f;
    for (int s = 0; s < len; s++) {
        const X* kr = k + (i64)s * gd + gi * d;
        float dot = 0.0f;
        #pragma unroll
        for (int e = 0; e < MAX_D / 32; e++) {
            int j = lane + 32 * e;
            if (j < d) dot += qv[e] * kr[j];
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
        float sc = dot * scale;
        float mn = fmaxf(m, sc);
        float corr = __expf(m - mn), p = __expf(sc - mn);
        l = l * corr + p;
        const X* vr = v + (i64)s * gd + gi * d;
        #pragma unroll
        for (int e = 0; e < MAX_D / 32; e++) {
            int j = lane + 32 * e;
            acc[e] = acc[e] * corr + (j < d ? p * vr[j] : 0.0f);
        }
        m = mn;
    }
    #pragma unroll
    for (int e = 0; e < MAX_D / 32; e++) {
        int j = lane + 32 * e;
        if (j < d) out[hi * d + j] = X(acc[e] / l);
    }
}
INSTANTIATE(attention_decode, (X* out, const X* q, const X* k, const X* v, int len, int h, int g, int d), (out, q, k, v, len, h, g, d))

// ---------------------------------------------------------------------------------------
// SwiGLU: gu rows are [gate (i) | up (i)].

template <typename X>
__device__ void swiglu_forward(X* act, const X* gu, i64 rows, int i) {
    i64 total = rows * i;
    for (i64 x = blockIdx.x * (i64)blockDim.x + threadIdx.x; x < total; x += (i64)gridDim.x * blockDim.x) {
        i64 r = x / i;
        int j = x % i;
        float gv = gu[r * 2 * i + j], uv = gu[r * 2 * i + i + j];
        act[x] = X(gv / (1.0f + __expf(-gv)) * uv);
    }
}
INSTANTIATE(swiglu_forward, (X* act, const X* gu, i64 rows, int i), (act, gu, rows, i))

template <typename X>
__device__ void swiglu_backward(X* dgu, const X* dact, const X* gu, i64 rows, int i) {
    i64 total = rows * i;
    for (i64 x = blockIdx.x * (i64)blockDim.x + threadIdx.x; x < total; x += (i64)gridDim.x * blockDim.x) {
        i64 r = x / i;
        int j = x % i;
        float gv = gu[r * 2 * i + j], uv = gu[r * 2 * i + i + j];
        float sig = 1.0f / (1.0f + __expf(-gv));
        float da = dact[x];
        dgu[r * 2 * i + i + j] = X(da * gv * sig);
        dgu[r * 2 * i + j] = X(da * uv * sig * (1.0f + gv * (1.0f - sig)));
    }
}
INSTANTIATE(swiglu_backward, (X* dgu, const X* dact, const X* gu, i64 rows, int i), (dgu, dact, gu, rows, i))

// ---------------------------------------------------------------------------------------
// Cross-entropy, one block per row, in place: the row becomes scale * (softmax - onehot).

template <typename X>
__device__ void cross_entropy(X* logits, float* losses, const int* targets, int rows, int vocab, float scale) {
    __shared__ float shared[32];
    int row = blockIdx.x;
    if (row >= rows) return;
    X* z = logits + (i64)row * vocab;
    int target = targets[row];
    if (target < 0) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) z[j] = X(0.0f);
        if (threadIdx.x == 0) losses[row] = 0.0f;
        return;
    }
    float m = -INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, z[j]);
    m = block_max(m, shared);
    float zt = z[target] - m;
    float sum = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += __expf(z[j] - m);
    sum = block_sum(sum, shared);
    float inv = scale / sum;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) z[j] = X(__expf(z[j] - m) * inv);
    __syncthreads();
    if (threadIdx.x == 0) {
        z[target] = X(z[target] - scale);
        losses[row] = logf(sum) - zt;
    }
}
INSTANTIATE(cross_entropy, (X* logits, float* losses, const int* targets, int rows, int vocab, float scale),
            (logits, losses, targets, rows, vocab, scale))

// ---------------------------------------------------------------------------------------
// The f64 accumulators.

// acc[slot] = sum(x), one block.
extern "C" __global__ void sum_to_acc(double* acc, int slot, const float* x, i64 n) {
    __shared__ double shared[32];
    double s = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) s += (double)x[i];
    s = block_sum_f64(s, shared);
    if (threadIdx.x == 0) acc[slot] = s;
}

// partial[block] = sum of squares of this block's elements (grid-stride).
extern "C" __global__ void sum_squares_partial(double* partial, const float* x, i64 n) {
    __shared__ double shared[32];
    double s = 0.0;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        double v = (double)x[i];
        s += v * v;
    }
    s = block_sum_f64(s, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// acc[slot] = sum(partial[0..parts]), in order.
extern "C" __global__ void sum_partials(double* acc, int slot, const double* partial, int parts) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        double s = 0.0;
        for (int i = 0; i < parts; i++) s += partial[i];
        acc[slot] = s;
    }
}

extern "C" __global__ void zero_acc(double* acc, int from, int to) {
    int i = from + threadIdx.x;
    if (i < to) acc[i] = 0.0;
}

extern "C" __global__ void fold_acc(double* acc, int src, int dst, double div1, double div2) {
    if (threadIdx.x == 0) acc[dst] += acc[src] / div1 / div2;
}

// PyTorch's clip_grad_norm_, on unscaled gradients (inv_scale undoes a loss scale).
extern "C" __global__ void clip_coef(double* acc, int sum_sq, int norm, int coef, float max_norm, double inv_scale) {
    if (threadIdx.x != 0) return;
    double nrm = sqrt(acc[sum_sq]) * inv_scale;
    acc[norm] = nrm;
    double c = max_norm > 0.0f ? fmin((double)max_norm / (nrm + 1e-6), 1.0) : 1.0;
    acc[coef] = c * inv_scale;
}

// AdamW over flat buffers; the gradients are consumed (left at zero). `px`, when not null,
// receives the new weights rounded to X: the copy the matrix products read.
template <typename X>
__device__ void adamw(float* p, X* px, float* g, float* m, float* v, i64 n, float beta1, float beta2, float eps,
                                 float step_size, float bc2_sqrt, float decay, const double* acc, int coef) {
    float scale = (float)acc[coef];
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float gi = g[i] * scale;
        g[i] = 0.0f;
        float pi = p[i] * decay;
        float mi = m[i] + (1.0f - beta1) * (gi - m[i]);
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float np = pi - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        p[i] = np;
        if (px) px[i] = X(np);
    }
}
INSTANTIATE(adamw,
            (float* p, X* px, float* g, float* m, float* v, i64 n, float beta1, float beta2, float eps, float step_size, float bc2_sqrt,
             float decay, const double* acc, int coef),
            (p, px, g, m, v, n, beta1, beta2, eps, step_size, bc2_sqrt, decay, acc, coef))

// ---------------------------------------------------------------------------------------
// Mixture of experts. Routing: softmax scores, top-k (highest first, ties to the lower
// index), normalised weights; then a stable counting sort of the N*K slots by expert.

extern "C" __global__ void moe_topk(float* scores, int* expert, float* weight, const float* logits, int n, int e, int k, int norm_topk) {
    for (int tok = blockIdx.x * blockDim.x + threadIdx.x; tok < n; tok += gridDim.x * blockDim.x) {
        const float* z = logits + (i64)tok * e;
        float* s = scores + (i64)tok * e;
        float m = -INF;
        for (int x = 0; x < e; x++) m = fmaxf(m, z[x]);
        float sum = 0.0f;
        for (int x = 0; x < e; x++) { s[x] = __expf(z[x] - m); sum += s[x]; }
        for (int x = 0; x < e; x++) s[x] /= sum;
        float wsum = 0.0f;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int x = 0; x < e; x++) {
                bool taken = false;
                for (int q = 0; q < j; q++) taken |= expert[(i64)tok * k + q] == x;
                if (!taken && (best < 0 || s[x] > s[best])) best = x;
            }
            expert[(i64)tok * k + j] = best;
            weight[(i64)tok * k + j] = s[best];
            wsum += s[best];
        }
        if (k > 1 && norm_topk)
            for (int j = 0; j < k; j++) weight[(i64)tok * k + j] /= wsum + 1e-20f;
    }
}

// Dispatch: the N*K slots sorted by expert (the stable counting sort above, keyed by expert)
// give `order` (sorted position -> slot); each slot's position and each position's token.
extern "C" __global__ void moe_place(int* pos, int* rows, const int* order, int slots, int k) {
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < slots; p += gridDim.x * blockDim.x) {
        int i = order[p];
        pos[i] = p;
        rows[p] = i / k;
    }
}

// The aux loss and its (constant per sequence and expert) gradient wrt the scores:
// seq_aux: c[b,e] = count(e in sequence b) * E / (T*K), aux = alpha mean_b sum_e c * mean_t s,
// grad = alpha c / (B*T); else over all tokens. One block per (row of aux_grad, expert):
// its threads count the group's slots that chose the expert and sum its scores, reduced in a
// fixed tree; then thread 0 of a second launch (moe_aux_sum) adds the terms in order.
extern "C" __global__ void moe_aux_terms(float* aux_grad, double* terms, const float* scores, const int* expert, int b, int t, int e, int k, float alpha, int seq_aux) {
    __shared__ double shared[32];
    int groups = seq_aux ? b : 1;
    int tokens = seq_aux ? t : b * t;
    for (int id = blockIdx.x; id < groups * e; id += gridDim.x) {
        int grp = id / e, x = id % e;
        i64 first = seq_aux ? (i64)grp * t : 0;
        double count = 0.0, sum = 0.0;
        for (i64 slot = first * k + threadIdx.x; slot < (first + tokens) * k; slot += blockDim.x) count += expert[slot] == x;
        for (i64 tok = first + threadIdx.x; tok < first + tokens; tok += blockDim.x) sum += (double)scores[tok * e + x];
        count = block_sum_f64(count, shared);
        __syncthreads();
        sum = block_sum_f64(sum, shared);
        __syncthreads();
        if (threadIdx.x == 0) {
            int n = (int)count;
            double mean_s = sum / tokens;
            float c = seq_aux ? n * (float)e / (t * k) : n / (float)(tokens * k) * e;
            aux_grad[id] = alpha * c / (seq_aux ? (float)(b * t) : (float)tokens);
            terms[id] = (double)c * mean_s;
        }
    }
}

extern "C" __global__ void moe_aux_sum(double* acc, int slot, const double* terms, int count, double divisor, float alpha) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double total = 0.0;
    for (int i = 0; i < count; i++) total += terms[i];
    acc[slot] += (double)((float)(total / divisor) * alpha);
}

// out[i] = x[rows[i]], rows of width c.
template <typename X>
__device__ void gather_rows(X* out, const X* x, const int* rows, int count, int c) {
    int i = blockIdx.x;
    if (i >= count) return;
    const X* src = x + (i64)rows[i] * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) out[(i64)i * c + j] = src[j];
}
INSTANTIATE(gather_rows, (X* out, const X* x, const int* rows, int count, int c), (out, x, rows, count, c))

// out[n] (+)= sum_j w * y[pos[n*k + j]], in slot order, summed in f32 and rounded once to O:
// f32 for the residual stream (`combine_rows`), X for a gradient the products read next
// (`combine_rows_act`).
template <typename X, typename O>
__device__ void combine_rows(O* out, const X* y, const int* pos, const float* weight, int n, int k, int c, int weighted, int accumulate) {
    int row = blockIdx.x;
    if (row >= n) return;
    for (int col = threadIdx.x; col < c; col += blockDim.x) {
        float acc = accumulate ? out[(i64)row * c + col] : 0.0f;
        for (int j = 0; j < k; j++) {
            int p = pos[(i64)row * k + j];
            float w = weighted ? weight[(i64)row * k + j] : 1.0f;
            acc += w * y[(i64)p * c + col];
        }
        out[(i64)row * c + col] = O(acc);
    }
}
INSTANTIATE_AS(combine_rows, (combine_rows<X, float>), (float* out, const X* y, const int* pos, const float* weight, int n, int k, int c, int weighted, int accumulate),
               (out, y, pos, weight, n, k, c, weighted, accumulate))
INSTANTIATE_AS(combine_rows_act, (combine_rows<X, X>), (X* out, const X* y, const int* pos, const float* weight, int n, int k, int c, int weighted, int accumulate),
               (out, y, pos, weight, n, k, c, weighted, accumulate))

// out[s] = <dy[s / k], y[pos[s]]>, one block per slot.
template <typename X>
__device__ void slot_dots(float* out, const X* dy, const X* y, const int* pos, int slots, int k, int c) {
    __shared__ float shared[32];
    int s = blockIdx.x;
    if (s >= slots) return;
    const X* a = dy + (i64)(s / k) * c;
    const X* b = y + (i64)pos[s] * c;
    float acc = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) acc += a[j] * b[j];
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) out[s] = acc;
}
INSTANTIATE(slot_dots, (float* out, const X* dy, const X* y, const int* pos, int slots, int k, int c), (out, dy, y, pos, slots, k, c))

// out[pos[s]] = weight[s] * dy[s / k].
template <typename X>
__device__ void spread_rows(X* out, const X* dy, const int* pos, const float* weight, int slots, int k, int c) {
    int s = blockIdx.x;
    if (s >= slots) return;
    const X* src = dy + (i64)(s / k) * c;
    float w = weight[s];
    X* dst = out + (i64)pos[s] * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) dst[j] = X(w * src[j]);
}
INSTANTIATE(spread_rows, (X* out, const X* dy, const int* pos, const float* weight, int slots, int k, int c), (out, dy, pos, weight, slots, k, c))

// Router-logit gradients from the slot-weight gradients, plus the aux term; one thread per
// token (grid-stride). The gradient wrt the scores, ds[x] = aux(x) + the slots that chose x,
// is recomputed for each expert instead of kept in an array (which would live in local
// memory): softmax backward needs dot = sum_x ds[x] s[x] first, then s[x] (ds[x] - dot).
__device__ float router_ds(int x, const int* chosen, const float* dw, int k, int norm, float sum, float wdot, const float* ag,
                           float aux_scale) {
    float ds = 0.0f;
    for (int j = 0; j < k; j++)
        if (chosen[j] == x) ds += norm ? (dw[j] - wdot) / sum : dw[j];
    return ag ? ds + ag[x] * aux_scale : ds;
}

extern "C" __global__ void moe_router_backward(float* dlogits, const float* scores, const int* expert, const float* weight, const float* slot_dw, const float* aux_grad,
                                              int n, int t, int e, int k, int norm_topk, int seq_aux, int has_aux, float aux_scale) {
    for (int tok = blockIdx.x * blockDim.x + threadIdx.x; tok < n; tok += gridDim.x * blockDim.x) {
        const float* s = scores + (i64)tok * e;
        const int* chosen = expert + (i64)tok * k;
        const float* dw = slot_dw + (i64)tok * k;
        const float* wt = weight + (i64)tok * k;
        int norm = k > 1 && norm_topk;
        float sum = 1e-20f, wdot = 0.0f;
        if (norm) {
            for (int j = 0; j < k; j++) sum += s[chosen[j]];
            for (int j = 0; j < k; j++) wdot += dw[j] * wt[j];
        }
        const float* ag = has_aux ? aux_grad + (seq_aux ? (i64)(tok / t) * e : 0) : nullptr;
        float dot = 0.0f;
        for (int x = 0; x < e; x++) dot += router_ds(x, chosen, dw, k, norm, sum, wdot, ag, aux_scale) * s[x];
        for (int x = 0; x < e; x++)
            dlogits[(i64)tok * e + x] = s[x] * (router_ds(x, chosen, dw, k, norm, sum, wdot, ag, aux_scale) - dot);
    }
}
