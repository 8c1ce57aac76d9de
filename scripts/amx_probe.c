// The AMX product's ceiling on this machine, without our packing: a C probe of the same
// 2 x 2-tile micro-kernel (`src/engine/cpu/amx.rs`), on operands already packed in its
// layout, the output f32 written in place by the tiles. It tells how much of `tdpbf16ps`'s
// peak a product of MiniMind's shapes can reach here, and what holds it back (BENCHMARKS.md,
// "The products alone"). Not built by cargo or the tests; needs gcc >= 11 and an AMX CPU:
//
//   gcc -O2 -march=sapphirerapids -fopenmp scripts/amx_probe.c -o /tmp/amx_probe
//   OMP_NUM_THREADS=2 OMP_PROC_BIND=true /tmp/amx_probe 1024 2816 512 [mode]
//
// M N K: the product dst[M, N] = lhs[M, K] rhs[K, N] (M, N multiples of 32, K of 32).
// mode: warm (default: the same buffers product after product), cold (64 MiB written between
// products, so operands and output come from memory as in a training step), cold-prefetch
// (cold, asking for the output block two blocks ahead into L2 as the engine does), cold-nostore
// (cold, the output never stored: what the stores cost).
// Prints the median of 21 products in GFLOP/s and as a share of 6231 GFLOP/s (the 2-thread
// peak `minimind bench --matmul` measured on this project's Xeon).
// Shapes: MC = 64 rows per worker block, KC = 512 (k blocks accumulate in the tiles).

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { T = 32, MC = 64, KC = 512, STEP_A = 1024 /* u16 per A step */, STEP_B = 512 /* u32 per B step */ };

struct tilecfg {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static void configure(void) {
    struct tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    _tile_loadconfig(&c);
}

static int prefetch, nostore;

// The 32 x 32 block at c (rows ld floats apart) (+)= `steps` k steps of packed a and b.
static void micro(const uint16_t *a, const uint32_t *b, int steps, float *c, long ld, int load) {
    if (load) {
        _tile_loadd(0, c, ld * 4);
        _tile_loadd(1, c + 16, ld * 4);
        _tile_loadd(2, c + 16 * ld, ld * 4);
        _tile_loadd(3, c + 16 * ld + 16, ld * 4);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int s = 0; s < steps; s++, a += STEP_A, b += STEP_B) {
        _tile_loadd(4, a, 64);
        _tile_loadd(6, b, 64);
        _tile_loadd(5, a + 512, 64);
        _tile_loadd(7, b + 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    if (nostore) return;
    _tile_stored(0, c, ld * 4);
    _tile_stored(1, c + 16, ld * 4);
    _tile_stored(2, c + 16 * ld, ld * 4);
    _tile_stored(3, c + 16 * ld + 16, ld * 4);
}

static int cmp(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s M N K [warm|cold|cold-prefetch|cold-nostore]\n", argv[0]);
        return 2;
    }
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
        fprintf(stderr, "the kernel refused the AMX tile state\n");
        return 1;
    }
    int M = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]);
    const char *mode = argc > 4 ? argv[4] : "warm";
    int cold = strncmp(mode, "cold", 4) == 0;
    prefetch = strcmp(mode, "cold-prefetch") == 0;
    nostore = strcmp(mode, "cold-nostore") == 0;
    if (M % (2 * T) || N % T || K % T) {
        fprintf(stderr, "M must be a multiple of 64, N and K of 32\n");
        return 2;
    }
    int steps = K / 32, tiles = M / T, panels = N / T;
    // A: [tile][step][half][16][32] bf16; B: [panel][step][half][16][16] u32 (k pairs); C f32.
    uint16_t *A = aligned_alloc(64, (size_t)M * K * 2);
    uint32_t *B = aligned_alloc(64, (size_t)N * K * 2);
    float *C = aligned_alloc(64, (size_t)M * N * 4);
    size_t flush_bytes = (size_t)64 << 20;
    char *flush = malloc(flush_bytes);
    srand(1);
    for (size_t i = 0; i < (size_t)M * K; i++) A[i] = 0x3f00 + (rand() & 0xff);     // ~[0.5, 1)
    for (size_t i = 0; i < (size_t)N * K / 2; i++) B[i] = 0x3f003f00 + (rand() & 0xff);
    memset(C, 0, (size_t)M * N * 4);
    enum { ROUNDS = 21 };
    double times[ROUNDS];
    for (int r = 0; r < ROUNDS; r++) {
        if (cold) memset(flush, r, flush_bytes);
        double t0 = omp_get_wtime();
        for (int k0 = 0; k0 < steps; k0 += KC / 32) {
            int ks = steps - k0 < KC / 32 ? steps - k0 : KC / 32;
#pragma omp parallel
            {
                configure();
#pragma omp for schedule(static)
                for (int rb = 0; rb < tiles / 2; rb++) {
                    for (int p = 0; p < panels; p++) {
                        for (int t = 2 * rb; t < 2 * rb + 2; t++) {
                            if (prefetch) {
                                // Two blocks ahead in this order: (p, t) -> (p + 1, t).
                                if (p + 1 < panels) {
                                    const float *next = C + (size_t)t * T * N + (p + 1) * T;
                                    for (int q = 0; q < T; q++) {
                                        _mm_prefetch((const char *)(next + (size_t)q * N), _MM_HINT_T1);
                                        _mm_prefetch((const char *)(next + (size_t)q * N + 16), _MM_HINT_T1);
                                    }
                                }
                            }
                            micro(A + (size_t)t * steps * STEP_A + (size_t)k0 * STEP_A,
                                  B + (size_t)p * steps * STEP_B + (size_t)k0 * STEP_B, ks,
                                  C + (size_t)t * T * N + p * T, N, k0 > 0);
                        }
                    }
                }
                _tile_release();
            }
        }
        times[r] = omp_get_wtime() - t0;
    }
    qsort(times, ROUNDS, sizeof times[0], cmp);
    double gflops = 2.0 * M * N * K / times[ROUNDS / 2] / 1e9;
    printf("%dx%dx%d %s: %.0f GFLOP/s (%.0f%% of 6231), %.3f ms\n", M, N, K, mode, gflops,
           100.0 * gflops / 6231.0, times[ROUNDS / 2] * 1e3);
    return 0;
}
