// The CUDA emulator: `kernels.cu` compiled as C++ for the CPU, so CI (which has no GPU) runs
// every kernel, through the same launch code as the GPU, against the CPU engine.
//
// A launch runs its blocks one after another. Inside a block every CUDA thread is a coroutine
// on the calling OS thread (a few instructions of assembly switch stacks on x86-64; ucontext,
// which costs two system calls a switch, elsewhere), run until it waits: at `__syncthreads` (every live
// thread of the block), or inside a warp shuffle (every live lane of its warp). The scheduler
// runs each ready thread in turn, then releases whichever barrier is complete; when none is,
// the kernel has deadlocked, which the launch reports. Being one OS thread, it is
// deterministic, and atomics are plain adds. `__shared__` memory is a static variable: blocks
// do not overlap, so one copy per kernel is the block's own.
//
// A GPU runs blocks in no fixed order, and the threads of a block interleave as its warps
// are scheduled. A launch with a shuffle seed models that: its blocks run in a seeded random
// order, and in every round of the scheduler the ready threads run in a fresh random order
// (so atomics land in another order too). A kernel whose results depend on either gives
// different bits under two seeds; the determinism tests run every kernel that way.
//
// What it does not model: memory outside the arguments is not checked (an out-of-bounds
// index reads host memory), warps do not run in lockstep (code that relies on implicit warp
// synchrony without a shuffle or barrier would pass here and fail there; the kernels use
// none), and `__expf` is `expf`.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

struct dim3 {
    unsigned x, y, z;
};

namespace emu {

enum State { READY, AT_BLOCK, AT_WARP, DONE };

constexpr unsigned MAX_THREADS = 1024;
// Kernels keep a few hundred bytes of locals (the tiled attention's accumulators); libm needs
// little more.
constexpr size_t STACK = 32 * 1024;

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *from,
// and resumes the stack `to` (saved the same way). The SSE/x87 control words are not saved:
// kernels never change rounding modes, and loading them costs more than the rest together.
extern "C" void minimind_emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl minimind_emu_switch
    .type minimind_emu_switch, @function
minimind_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size minimind_emu_switch, .-minimind_emu_switch
)");

struct Context {
    void* sp = nullptr;
};
#else
struct Context {
    ucontext_t ctx;
};
#endif

struct Lane {
    Context ctx;
    State state;
};

// splitmix64: the shuffles' random numbers.
struct Rng {
    uint64_t state;
    uint64_t next() {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    // Fisher-Yates over order[0..n).
    void shuffle(unsigned* order, unsigned n) {
        for (unsigned i = n; i > 1; i--) {
            unsigned j = static_cast<unsigned>(next() % i);
            unsigned t = order[i - 1];
            order[i - 1] = order[j];
            order[j] = t;
        }
    }
};

// The block being run (one launch at a time: the Rust side holds a lock).
struct Block {
    Lane lanes[MAX_THREADS];
    Context scheduler;
    unsigned current = 0;
    unsigned threads = 0;
    dim3 block_idx{0, 0, 0}, block_dim{1, 1, 1}, grid_dim{1, 1, 1};
    uint64_t exchange[MAX_THREADS];
    void (*invoke)(const uint64_t*) = nullptr;
    const uint64_t* args = nullptr;
    std::vector<unsigned char> dynamic_shared;
    // The lanes' stacks, one block of MAX_THREADS * STACK bytes (allocated at first use).
    char* stacks = nullptr;
    // With a shuffle seed: the order the ready lanes run in, redrawn every round.
    bool shuffled = false;
    Rng rng{0};
    unsigned order[MAX_THREADS];
};

static Block block;

static dim3 thread_idx() { return dim3{block.current, 0, 0}; }

static void switch_to(Context& from, Context& to) {
#if defined(__x86_64__)
    minimind_emu_switch(&from.sp, to.sp);
#else
    swapcontext(&from.ctx, &to.ctx);
#endif
}

static void wait(State at) {
    Lane& me = block.lanes[block.current];
    me.state = at;
    switch_to(me.ctx, block.scheduler);
}

static void entry() {
    block.invoke(block.args);
    Lane& me = block.lanes[block.current];
    me.state = DONE;
    switch_to(me.ctx, block.scheduler);  // never resumed
}

// Makes lane `i` start at `entry` on its own stack.
static void start(Lane& l, char* stack) {
#if defined(__x86_64__)
    // The frame minimind_emu_switch pops: a padding word, six registers, then `entry` as the
    // return address. Above it a null return address for `entry`, so it starts with the stack
    // aligned as after a call (rsp + 8 a multiple of 16).
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + STACK) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 9;
    for (int r = 0; r <= 6; r++) sp[r] = 0;
    sp[7] = reinterpret_cast<uint64_t>(&entry);
    sp[8] = 0;  // `entry` never returns
    l.ctx.sp = sp;
#else
    getcontext(&l.ctx.ctx);
    l.ctx.ctx.uc_stack.ss_sp = stack;
    l.ctx.ctx.uc_stack.ss_size = STACK;
    l.ctx.ctx.uc_link = nullptr;
    makecontext(&l.ctx.ctx, entry, 0);
#endif
}

// Exchanges `bits` with lane `from(lane)` of this warp; a lane outside the warp, or one that
// has exited, gives back the caller's own value (CUDA leaves that undefined).
template <typename F>
static uint64_t exchange(uint64_t bits, F from) {
    unsigned me = block.current, base = me & ~31u, lane = me & 31u;
    block.exchange[me] = bits;
    wait(AT_WARP);
    unsigned src = from(lane);
    uint64_t got = bits;
    if (src < 32 && base + src < block.threads && block.lanes[base + src].state != DONE) {
        got = block.exchange[base + src];
    }
    wait(AT_WARP);  // every lane has read before any writes again
    return got;
}

template <typename T>
static uint64_t to_bits(T v) {
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}

template <typename T>
static T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// Runs one block to completion; false (with `err`) on a deadlock.
static bool run_block(char* err, size_t errlen) {
    unsigned n = block.threads;
    if (!block.stacks) {
        block.stacks = static_cast<char*>(std::malloc(MAX_THREADS * STACK));
        if (!block.stacks) {
            std::snprintf(err, errlen, "no memory for the emulated threads' stacks");
            return false;
        }
    }
    for (unsigned i = 0; i < n; i++) {
        start(block.lanes[i], block.stacks + i * STACK);
        block.lanes[i].state = READY;
    }
    for (unsigned i = 0; i < n; i++) block.order[i] = i;
    for (;;) {
        if (block.shuffled) block.rng.shuffle(block.order, n);
        for (unsigned o = 0; o < n; o++) {
            unsigned i = block.order[o];
            if (block.lanes[i].state != READY) continue;
            block.current = i;
            switch_to(block.scheduler, block.lanes[i].ctx);
        }
        bool live = false, released = false, all_at_block = true;
        for (unsigned w = 0; w < n; w += 32) {
            bool any = false, all_at_warp = true;
            for (unsigned i = w; i < n && i < w + 32; i++) {
                State s = block.lanes[i].state;
                if (s == DONE) continue;
                any = true;
                live = true;
                all_at_warp = all_at_warp && s == AT_WARP;
                all_at_block = all_at_block && s == AT_BLOCK;
            }
            if (any && all_at_warp) {
                for (unsigned i = w; i < n && i < w + 32; i++)
                    if (block.lanes[i].state == AT_WARP) block.lanes[i].state = READY;
                released = true;
            }
        }
        if (!live) return true;
        if (released) continue;
        if (all_at_block) {
            for (unsigned i = 0; i < n; i++)
                if (block.lanes[i].state == AT_BLOCK) block.lanes[i].state = READY;
            continue;
        }
        std::snprintf(err, errlen,
                      "block %u deadlocked: some threads wait at __syncthreads, others in a warp shuffle",
                      block.block_idx.x);
        return false;
    }
}

// Kernel arguments arrive as 8-byte slots (as `cuLaunchKernel` reads them on the GPU side).
template <typename T>
static T from_slot(uint64_t s) {
    if constexpr (std::is_pointer_v<T>) {
        return reinterpret_cast<T>(static_cast<uintptr_t>(s));
    } else if constexpr (std::is_same_v<T, float>) {
        return from_bits<float>(s & 0xffffffffu);
    } else if constexpr (std::is_same_v<T, double>) {
        return from_bits<double>(s);
    } else if constexpr (std::is_same_v<T, int>) {
        return static_cast<int>(static_cast<uint32_t>(s));
    } else {
        static_assert(std::is_same_v<T, long long>, "kernel parameters are pointers, int, i64, float or double");
        return static_cast<long long>(s);
    }
}

template <typename T>
constexpr char code() {
    if constexpr (std::is_pointer_v<T>) return 'p';
    else if constexpr (std::is_same_v<T, int>) return 'i';
    else if constexpr (std::is_same_v<T, long long>) return 'l';
    else if constexpr (std::is_same_v<T, float>) return 'f';
    else return 'd';
}

template <typename... A, size_t... I>
static void call(void (*f)(A...), const uint64_t* s, std::index_sequence<I...>) {
    f(from_slot<A>(s[I])...);
}

template <auto F>
static void invoke(const uint64_t* s) {
    [&]<typename... A>(void (*f)(A...)) { call(f, s, std::index_sequence_for<A...>{}); }(F);
}

template <typename... A>
static const char* signature(void (*)(A...)) {
    static const char s[] = {code<A>()..., '\0'};
    return s;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------
// What kernels.cu sees of CUDA.

#define MINIMIND_EMU 1
#define __global__
#define __device__ static inline
#define __forceinline__
#define __shared__ static
#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block.block_idx)
#define blockDim (emu::block.block_dim)
#define gridDim (emu::block.grid_dim)
#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emu::block.dynamic_shared.data())

static inline void __syncthreads() { emu::wait(emu::AT_BLOCK); }
static inline void __syncwarp(unsigned = 0xffffffff) { emu::wait(emu::AT_WARP); }

template <typename T>
static inline T __shfl_down_sync(unsigned, T v, int delta) {
    return emu::from_bits<T>(emu::exchange(emu::to_bits(v), [&](unsigned lane) { return lane + delta; }));
}

template <typename T>
static inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return emu::from_bits<T>(emu::exchange(emu::to_bits(v), [&](unsigned lane) { return lane ^ mask; }));
}

static inline float __int_as_float(int x) { return emu::from_bits<float>(static_cast<uint32_t>(x)); }
static inline float __uint_as_float(unsigned x) { return emu::from_bits<float>(x); }
static inline unsigned __float_as_uint(float x) { return static_cast<uint32_t>(emu::to_bits(x)); }
// f16 through the compiler's own half type (round to nearest even, as the GPU's cvt.rn).
static inline unsigned short f32_to_f16_bits(float f) {
    _Float16 h = static_cast<_Float16>(f);
    unsigned short b;
    std::memcpy(&b, &h, 2);
    return b;
}
static inline float f16_bits_to_f32(unsigned short b) {
    _Float16 h;
    std::memcpy(&h, &b, 2);
    return static_cast<float>(h);
}
static inline float emu_expf(float x) { return expf(x); }
#define __expf emu_expf
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <typename T>
static inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <typename A, typename B>
static inline auto min(A a, B b) {
    return a < b ? a : b;
}
template <typename A, typename B>
static inline auto max(A a, B b) {
    return a > b ? a : b;
}

// mma.sync.aligned.m16n8k16 (kernels.cu's `mma16816`): every lane of the warp leaves its A
// and B fragments, then each computes its four elements of D from the warp's fragments in
// the PTX ISA's layout (see kernels.cu), summing k in order in f32.
namespace emu {
struct Fragments {
    unsigned a[4], b[2];
};
static Fragments fragments[MAX_THREADS];
}  // namespace emu

static inline void emu_mma16816(float* d, const unsigned* a, const unsigned* b, bool is_bf16) {
    unsigned me = emu::block.current, base = me & ~31u, lane = me & 31u;
    for (int i = 0; i < 4; i++) emu::fragments[me].a[i] = a[i];
    for (int i = 0; i < 2; i++) emu::fragments[me].b[i] = b[i];
    emu::wait(emu::AT_WARP);
    for (unsigned l = base; l < base + 32; l++) {
        if (l >= emu::block.threads || emu::block.lanes[l].state == emu::DONE) {
            std::fprintf(stderr, "emulator: mma.sync in block %u without all 32 lanes of warp %u\n",
                         emu::block.block_idx.x, base / 32);
            std::abort();
        }
    }
    auto value = [&](unsigned reg, int k) {
        unsigned short bits = (k & 1) ? static_cast<unsigned short>(reg >> 16) : static_cast<unsigned short>(reg);
        return is_bf16 ? emu::from_bits<float>(static_cast<uint64_t>(bits) << 16) : f16_bits_to_f32(bits);
    };
    // Element (row, k) of A is in lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) +
    // 2 (k >= 8); element (k, n) of B in lane n * 4 + (k % 8) / 2, register (k >= 8).
    auto at_a = [&](int row, int k) {
        return value(emu::fragments[base + (row % 8) * 4 + (k % 8) / 2].a[(row >= 8) + 2 * (k >= 8)], k);
    };
    auto at_b = [&](int k, int n) { return value(emu::fragments[base + n * 4 + (k % 8) / 2].b[k >= 8], k); };
    int g = static_cast<int>(lane / 4), c = static_cast<int>(lane % 4);
    float out[4];
    for (int i = 0; i < 4; i++) {
        int row = g + 8 * (i >> 1), col = 2 * c + (i & 1);
        float s = d[i];
        for (int k = 0; k < 16; k++) s += at_a(row, k) * at_b(k, col);
        out[i] = s;
    }
    emu::wait(emu::AT_WARP);  // every lane has read the fragments before any leaves new ones
    for (int i = 0; i < 4; i++) d[i] = out[i];
}

#include "kernels.cu"

// ---------------------------------------------------------------------------------------
// The table of kernels and the C entry points the Rust side calls.

namespace {
struct Kernel {
    const char* name;
    void (*invoke)(const uint64_t*);
    const char* signature;
};

#define K(f) Kernel{#f, &emu::invoke<&f>, emu::signature(&f)}
// A template's three kernels, in the order of `Store` (f32, bf16, f16).
#define KX(f)                                                                          \
    Kernel{#f "_f32", &emu::invoke<&as_f32::f##_f32>, emu::signature(&as_f32::f##_f32)},     \
        Kernel{#f "_bf16", &emu::invoke<&as_bf16::f##_bf16>, emu::signature(&as_bf16::f##_bf16)}, \
        Kernel{#f "_f16", &emu::invoke<&as_f16::f##_f16>, emu::signature(&as_f16::f##_f16)}
const Kernel KERNEL_TABLE[] = {
    K(add_f32),
    K(sort_count),
    K(sort_prefix),
    K(sort_offsets),
    K(sort_place),
    K(embed_forward),
    K(embed_backward),
    K(rmsnorm_backward_dw_sum),
    K(sum_to_acc),
    K(sum_squares_partial),
    K(sum_partials),
    K(zero_acc),
    K(fold_acc),
    K(clip_coef),
    K(moe_topk),
    K(moe_place),
    K(moe_aux_terms),
    K(moe_aux_sum),
    K(moe_router_backward),
    K(mma_probe),
    KX(fill),
    KX(cast),
    KX(rmsnorm_forward),
    KX(add_rmsnorm_forward),
    KX(rmsnorm_backward),
    KX(rope),
    KX(attention_forward),
    KX(attention_backward_dq),
    KX(attention_backward_dkv),
    KX(attention_forward_tiled),
    KX(attention_forward_tiled_d64),
    KX(attention_forward_tiled_d128),
    KX(attention_delta),
    KX(attention_backward_dq_tiled),
    KX(attention_backward_dq_tiled_d64),
    KX(attention_backward_dq_tiled_d128),
    KX(attention_backward_dkv_tiled),
    KX(attention_backward_dkv_tiled_d64),
    KX(attention_backward_dkv_tiled_d128),
    KX(attn_heads),
    KX(attn_heads_rope),
    KX(attn_softmax),
    KX(attn_dsoftmax),
    KX(attention_decode),
    KX(swiglu_forward),
    KX(swiglu_backward),
    KX(cross_entropy),
    KX(adamw),
    KX(gather_rows),
    KX(combine_rows),
    KX(combine_rows_act),
    KX(slot_dots),
    KX(spread_rows),
    KX(flash_forward_d64),
    KX(flash_forward_d128),
    KX(flash_backward_dq_d64),
    KX(flash_backward_dq_d128),
    KX(flash_backward_dkv_d64),
    KX(flash_backward_dkv_d128),
};
#undef K
#undef KX
}  // namespace

extern "C" int minimind_emu_kernels() { return sizeof(KERNEL_TABLE) / sizeof(KERNEL_TABLE[0]); }

extern "C" const char* minimind_emu_name(int i) { return KERNEL_TABLE[i].name; }

extern "C" const char* minimind_emu_signature(int i) { return KERNEL_TABLE[i].signature; }

// Runs kernel `i` on `grid` blocks of `threads`; 0 on success, else 1 with `err` filled.
// `shuffle` 0 runs blocks and threads in order; any other value is the seed of a shuffled
// run (see the top of this file).
extern "C" int minimind_emu_launch(int i, unsigned grid, unsigned threads, unsigned shared, const uint64_t* args,
                                   uint64_t shuffle, char* err, size_t errlen) {
    if (threads == 0 || threads > emu::MAX_THREADS) {
        std::snprintf(err, errlen, "%u threads per block (1 to %u)", threads, emu::MAX_THREADS);
        return 1;
    }
    emu::block.invoke = KERNEL_TABLE[i].invoke;
    emu::block.args = args;
    emu::block.threads = threads;
    emu::block.block_dim = dim3{threads, 1, 1};
    emu::block.grid_dim = dim3{grid, 1, 1};
    // A guard band past the dynamic shared memory the launch asked for: a kernel that writes
    // into it would overrun a GPU's allocation too.
    constexpr unsigned GUARD = 4096;
    constexpr unsigned char MARK = 0xa5;
    emu::block.dynamic_shared.assign(shared + GUARD, MARK);
    emu::block.shuffled = shuffle != 0;
    emu::block.rng = emu::Rng{shuffle};
    std::vector<unsigned> blocks(grid);
    for (unsigned b = 0; b < grid; b++) blocks[b] = b;
    if (emu::block.shuffled) emu::block.rng.shuffle(blocks.data(), grid);
    for (unsigned b : blocks) {
        emu::block.block_idx = dim3{b, 0, 0};
        if (!emu::run_block(err, errlen)) return 1;
        for (unsigned g = 0; g < GUARD; g++) {
            if (emu::block.dynamic_shared[shared + g] != MARK) {
                std::snprintf(err, errlen, "block %u wrote past its %u bytes of dynamic shared memory", b, shared);
                return 1;
            }
        }
    }
    return 0;
}
