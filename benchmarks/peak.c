/* Instruction ceilings of this CPU: independent chains of the widest multiply-add each number format has.
 *
 * fp32: vfmadd (AVX-512, else AVX2 FMA); bf16: vdpbf16ps (AVX512-BF16); int8: vpdpbusd (AVX512-VNNI).
 * Each thread runs CHAINS independent accumulators, enough to hide the instruction latency, so the loop
 * is limited only by how many of these instructions the cores retire per cycle. Run with OMP_NUM_THREADS
 * set to the physical cores; prints one "name GFLOP/s" line per format the compiler and CPU support.
 * Built and run by benchmarks/peak.py (gcc -O3 -march=native -fopenmp).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 12
#define ITERS 40000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMADD _mm512_fmadd_ps
#define STORE _mm512_storeu_ps
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMADD _mm256_fmadd_ps
#define STORE _mm256_storeu_ps
#endif

#ifdef LANES
static float fp32_chain(long iters) {
    vec acc[CHAINS], a = SET1(0.999999f), b = SET1(1e-7f);
    for (int i = 0; i < CHAINS; i++) acc[i] = SET1((float)i);
    for (long it = 0; it < iters; it++)
        for (int i = 0; i < CHAINS; i++) acc[i] = FMADD(a, acc[i], b);
    float out[LANES], s = 0;
    for (int i = 0; i < CHAINS; i++) {
        STORE(out, acc[i]);
        for (int j = 0; j < LANES; j++) s += out[j];
    }
    return s;
}
#endif

#if defined(__AVX512BF16__)
static float bf16_chain(long iters) {
    __m512 acc[CHAINS];
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3380);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < iters; it++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    float s = 0;
    for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_ps(acc[i]);
    return s;
}
#endif

#if defined(__AVX512VNNI__)
static int int8_chain(long iters) {
    __m512i acc[CHAINS], a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(1);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_epi32(i);
    for (long it = 0; it < iters; it++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    int s = 0;
    for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_epi32(acc[i]);
    return s;
}
#endif

/* flops_per_instruction: multiply-adds per instruction x 2 */
#define MEASURE(name, fn, flops_per_instruction)                                   \
    do {                                                                             \
        double sink = 0, start = now();                                              \
        int threads = 1;                                                             \
        _Pragma("omp parallel reduction(+ : sink)") {                                \
            sink += (double)fn(ITERS);                                               \
            _Pragma("omp single") threads = omp_get_num_threads();                   \
        }                                                                            \
        double seconds = now() - start;                                              \
        double flops = (double)ITERS * CHAINS * (flops_per_instruction) * threads;   \
        printf("%s %.1f threads=%d checksum=%g\n", name, flops / seconds / 1e9, threads, sink); \
    } while (0)

int main(void) {
#ifdef LANES
    MEASURE("fp32", fp32_chain, LANES * 2);
#endif
#if defined(__AVX512BF16__)
    MEASURE("bf16", bf16_chain, 32 * 2);
#endif
#if defined(__AVX512VNNI__)
    MEASURE("int8", int8_chain, 64 * 2);
#endif
    return 0;
}
