/* mixserve: y [M, N] = x [M, K] @ w.T, w stored in one byte (or half a byte) per weight, or in bfloat16, for the
 * few rows per matrix of a decode step on a CPU. Weight rows are decoded in registers, 2 or 4 at a time, and
 * multiplied into up to 8 (or 4) rows of x at once, so the matrix is read once per 8 rows of x and never written out
 * in float (workers/quant/cpu_kernel.py builds and calls this).
 *
 * Letters: M rows of x, N output features (rows of w), K input features.
 * kind 0: w [N, K] holds float8 e4m3fn bytes, kind 1: int8 values; scale: float32 [N] (per_row) or [1].
 * kind 2: w [N, K / 2] holds 4-bit values 0..15, column 2i in the low nibble of byte i; scale: float16 bits and
 * zero: uint8, [N, K / G] for groups of G columns (G a multiple of 16), the weight (q - zero) * scale.
 * kind 3: w [N, K] holds bfloat16 bits (widened to float32 by a 16-bit shift); scale as kinds 0 and 1.
 * Builds: AVX-512 (F, BW, VL) + F16C, AVX2 + FMA + F16C, or portable C, whichever the compiler targets first.
 * The AVX2 build takes kind 2 16 columns per step from 8 bytes: widened to 32-bit lanes, the low nibbles (columns
 * k, k + 2, ..., k + 14) masked and the high ones (k + 1, ..., k + 15) shifted down; x is copied once per call with
 * each 16 columns' even ones first (permute_pairs), so both halves meet their columns of x in order. It sums q x per
 * group and applies the group's scale and zero once per group: s * (sum of q x) - s z (sum of x), the sums of x per
 * group taken in the same copy. Those two terms cancel where x has a large mean, so this rounds up to ~1e-5 of the
 * output's scale (a dense float32 matmul ~3e-7; bfloat16 itself 4e-3); for 1.5-1.8x the speed of a per-weight
 * q * s - z * s at one row. At one row of x (or two that were bfloat16 or float16) with groups of a multiple of 32
 * columns (of at most 256, or of a multiple of 256), it multiplies x in fixed point with integer multiply-adds instead
 * (tile_int4_one), 32 columns per step; so it does kind 1 at one row of x that was bfloat16 or float16
 * (tile_int8_one).
 * In both SIMD builds a float8 byte b, sign-extended to 16 bits, becomes the float16 whose bits are (b << 7) &
 * 0xBF80 (sign to bit 15, exponent and mantissa to bits 7-13): the same number times 2^-8 for every finite e4m3fn
 * value, subnormals included, so the row sum is multiplied by 256 once. The portable build looks each byte's value up
 * in a 256-entry table. The two NaN bytes (0x7F, 0xFF) decode to +-480 in every build (a checkpoint stores no NaN
 * weights).
 * Example: b = 0x38 (1.0 in e4m3fn) -> 0x1C00, the float16 2^-8; b = 0xB8 (-1.0), sign-extended 0xFFB8 -> 0x9C00.
 */
#ifdef _OPENMP
#include <omp.h>
#else
#include <pthread.h>
#endif
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__) && \
    !defined(MIXSERVE_PORTABLE)
#include <immintrin.h>
#define MIXSERVE_AVX512 1
#define MT_MAX 8 /* rows of x per pass over a weight row */
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(MIXSERVE_PORTABLE)
#include <immintrin.h>
#define MIXSERVE_AVX2 1
#define MT_MAX 4
#endif

#define MAX_THREADS 256
#define UNROLL _Pragma("GCC unroll 16")

typedef struct {
    int kind, M, K, N, per_row, group, n0, n1, failed;
    const float* x;
    const uint8_t* w;
    const float* scale;        /* kinds 0, 1, 3 */
    const uint16_t* gscale;    /* kind 2: float16 bits [N, K / G] */
    const uint8_t* zero;       /* kind 2: [N, K / G] */
    const float* xsum; /* kind 2 in the AVX2 build: x's sums per group of columns, [M, K / G] */
    const int8_t* digits; /* kinds 1 and 2 at one or two rows of x in the AVX2 build: x in fixed point (x_digits), D
                             per column, [M, K D] */
    const float* unit;    /* [M, K / B]: the value of 1 in each block of B columns of those digits */
    const float* total;   /* [M, K / B]: each block's sum of x as the digits hold it */
    const float* group_total; /* kind 2: [M, K / G], each group's (the sum of its blocks') */
    int block;            /* B */
    int depth;            /* D: digits per column, 3 or 2 */
    int spread;           /* kind 2: 1, rows in order; 4, in tiles of 4 rows (kind 4): byte b of a row at 4 (b - b % 16)
                             + b % 16 from its first */
    float* out;
} job_t;

/* bytes of w before column k of a row (k even for kind 2) */
static inline int64_t offset(const int kind, int64_t k) {
    return kind == 2 ? k / 2 : kind == 3 ? 2 * k : k;
}
static inline int64_t row_bytes(const job_t* j) { return offset(j->kind, j->K); }

/* the float16 whose bits are h, exactly. Example: 0x3C00 -> 1.0, 0x0001 -> 2^-24 */
static inline float half_value(uint16_t h) {
#if defined(MIXSERVE_AVX512) || defined(MIXSERVE_AVX2)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
    if (e == 0) { /* zero or subnormal: m 2^-24 */
        const float v = (float)m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    const uint32_t bits = sign | (e == 31 ? 0x7F800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    float v;
    memcpy(&v, &bits, 4);
    return v;
#endif
}

/* 1 when built with OpenMP (threads from the process's OpenMP runtime), 0 when with threads of its own */
int mixserve_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int mixserve_simd(void) {
#if defined(MIXSERVE_AVX512)
    return 512;
#elif defined(MIXSERVE_AVX2)
    return 256;
#else
    return 0;
#endif
}

#ifdef MIXSERVE_AVX512
/* the 16 weights of a row (its bytes p) from column k (mask: those < K), int4 before its scale and zero */
static inline __attribute__((always_inline)) __m512 decode16(const int kind, const uint8_t* p, int k, __mmask16 mask) {
    if (kind == 2) {
        const __m128i b = _mm_loadl_epi64((const __m128i*)(p + k / 2)), low = _mm_set1_epi8(0x0F);
        const __m128i q = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
    }
    if (kind == 3) {
        const __m256i h = _mm256_maskz_loadu_epi16(mask, p + 2 * (int64_t)k);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    const __m128i b = _mm_maskz_loadu_epi8(mask, p + k);
    if (kind == 0) {
        __m256i h = _mm256_cvtepi8_epi16(b);
        h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBF80));
        return _mm512_cvtph_ps(h);
    }
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

/* out[m0 .. m0 + MT, n .. n + count] from weight rows n .. n + NR (count: how many of them are this job's; the rest
 * repeat row n and are not stored). NR 4 for up to 4 rows of x (4 weight streams in flight: a Mixtral row is 4 KiB
 * of fp8 or int8, 8 KiB of bf16, and the hardware prefetcher stops at each 4 KiB page), else 2; 16 accumulators
 * either way. */
static inline __attribute__((always_inline)) void tile(const int kind, const int NR, const int MT, const job_t* j,
                                                       int n, int m0, int count) {
    const int K = j->K, G = kind == 2 ? j->group : K, groups = K / G;
    const float* x = j->x + (int64_t)m0 * K;
    const int64_t rb = row_bytes(j);
    const uint8_t* w[4];
    const uint16_t* scale[4]; /* kind 2 only */
    const uint8_t* zero[4];
    for (int r = 0; r < NR; r++) {
        const int64_t row = r < count ? n + r : n;
        w[r] = j->w + row * rb;
        scale[r] = kind == 2 ? j->gscale + row * groups : 0;
        zero[r] = kind == 2 ? j->zero + row * groups : 0;
    }
    const uint8_t* next = j->w + (int64_t)(n + NR) * rb; /* the next rows, fetched while these are multiplied */
    const int ahead = n + 2 * NR <= j->n1;
    __m512 acc[16]; /* [NR][MT], NR * MT <= 16: in registers */
    UNROLL for (int i = 0; i < NR * MT; i++) acc[i] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 s[4], z[4];
        for (int r = 0; r < NR && kind == 2; r++)
            s[r] = _mm512_set1_ps(half_value(scale[r][g])), z[r] = _mm512_set1_ps((float)zero[r][g]);
        for (int k = g * G; k < (g + 1) * G; k += 16) {
            const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            const int64_t at = offset(kind, k); /* 16 columns span 8 to 32 bytes: one line per 64 */
            if (ahead && (at & 63) == 0)
                for (int r = 0; r < NR; r++) _mm_prefetch((const char*)next + r * rb + at, _MM_HINT_T0);
            __m512 v[4];
            UNROLL for (int r = 0; r < NR; r++) {
                v[r] = decode16(kind, w[r], k, mask);
                if (kind == 2) v[r] = _mm512_mul_ps(_mm512_sub_ps(v[r], z[r]), s[r]);
            }
            UNROLL for (int m = 0; m < MT; m++) {
                const __m512 xv = _mm512_maskz_loadu_ps(mask, x + (int64_t)m * K + k);
                UNROLL for (int r = 0; r < NR; r++) acc[r * MT + m] = _mm512_fmadd_ps(v[r], xv, acc[r * MT + m]);
            }
        }
    }
    const float unit = kind == 0 ? 256.0f : 1.0f; /* kind 2: scaled as decoded */
    UNROLL for (int r = 0; r < NR; r++) { /* every loop over r and m unrolled: acc stays in registers */
        if (r >= count) continue;
        const float f = kind == 2 ? 1.0f : j->scale[j->per_row ? n + r : 0] * unit;
        UNROLL for (int m = 0; m < MT; m++) {
            j->out[(int64_t)(m0 + m) * j->N + n + r] = _mm512_reduce_add_ps(acc[r * MT + m]) * f;
        }
    }
}

#define TILES(kind)                                                                                                   \
    if (nr == 4) {                                                                                                     \
        switch (mt) {                                                                                                  \
            case 1: tile(kind, 4, 1, j, n, m0, count); break;                                                          \
            case 2: tile(kind, 4, 2, j, n, m0, count); break;                                                          \
            case 3: tile(kind, 4, 3, j, n, m0, count); break;                                                          \
            default: tile(kind, 4, 4, j, n, m0, count); break;                                                         \
        }                                                                                                              \
    } else {                                                                                                           \
        switch (mt) {                                                                                                  \
            case 1: tile(kind, 2, 1, j, n, m0, count); break;                                                          \
            case 2: tile(kind, 2, 2, j, n, m0, count); break;                                                          \
            case 3: tile(kind, 2, 3, j, n, m0, count); break;                                                          \
            case 4: tile(kind, 2, 4, j, n, m0, count); break;                                                          \
            case 5: tile(kind, 2, 5, j, n, m0, count); break;                                                          \
            case 6: tile(kind, 2, 6, j, n, m0, count); break;                                                          \
            case 7: tile(kind, 2, 7, j, n, m0, count); break;                                                          \
            default: tile(kind, 2, 8, j, n, m0, count); break;                                                         \
        }                                                                                                              \
    }

#define SMALL_M 4 /* rows of x up to which tiles take 4 weight rows */
#elif defined(MIXSERVE_AVX2)
/* AVX2 (with FMA and F16C): kinds 1 and 3 8 columns per step, kind 0 16 (8 after the last whole 16), a column tail (K
 * not a multiple of 8) copied into zero-padded buffers; kind 2 in tile_int4. 16 registers: up to 8 accumulators, NR 4
 * x MT 2 or NR 2 x MT 4, and each weight row is multiplied into every row of x before the next one is decoded. */
static inline __attribute__((always_inline)) __m256 decode8(const int kind, const uint8_t* p, int64_t k) {
    if (kind == 3) {
        const __m128i h = _mm_loadu_si128((const __m128i*)(p + 2 * k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    const __m128i b = _mm_loadl_epi64((const __m128i*)(p + k));
    if (kind == 0) {
        const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16((short)0xBF80));
        return _mm256_cvtph_ps(h);
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* kinds 0, 1 and 3 */
static inline __attribute__((always_inline)) void tile(const int kind, const int NR, const int MT, const job_t* j,
                                                       int n, int m0, int count) {
    const int K = j->K, full = K - K % 8;
    const float* x = j->x + (int64_t)m0 * K;
    const int64_t rb = row_bytes(j);
    const uint8_t* w[4];
    for (int r = 0; r < NR; r++) w[r] = j->w + (r < count ? n + r : n) * rb;
    const uint8_t* next = j->w + (int64_t)(n + NR) * rb;
    const int ahead = n + 2 * NR <= j->n1;
    __m256 acc[8]; /* [NR][MT] */
    UNROLL for (int i = 0; i < NR * MT; i++) acc[i] = _mm256_setzero_ps();
    int k = 0;
    for (; kind == 0 && k + 16 <= K; k += 16) { /* float8: 16 columns from 16 bytes, widened to 16-bit lanes at once */
        if (ahead && (k & 63) == 0)
            for (int r = 0; r < NR; r++) _mm_prefetch((const char*)next + r * rb + k, _MM_HINT_T0);
        UNROLL for (int r = 0; r < NR; r++) {
            const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w[r] + k)));
            const __m256i h = _mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16((short)0xBF80));
            const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
            const __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
            UNROLL for (int m = 0; m < MT; m++) { /* in the order of two 8-column steps: the same sums */
                const float* xm = x + (int64_t)m * K + k;
                acc[r * MT + m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xm), acc[r * MT + m]);
                acc[r * MT + m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xm + 8), acc[r * MT + m]);
            }
        }
    }
    for (; k < full; k += 8) {
        const int64_t at = offset(kind, k);
        if (ahead && (at & 63) == 0)
            for (int r = 0; r < NR; r++) _mm_prefetch((const char*)next + r * rb + at, _MM_HINT_T0);
        UNROLL for (int r = 0; r < NR; r++) {
            const __m256 v = decode8(kind, w[r], k);
            UNROLL for (int m = 0; m < MT; m++)
                acc[r * MT + m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + (int64_t)m * K + k), acc[r * MT + m]);
        }
    }
    if (full < K) { /* the last K % 8 columns, zero-padded (a zero byte decodes to 0 in each kind) */
        uint8_t pad[16] = {0};
        float xt[8] = {0};
        UNROLL for (int r = 0; r < NR; r++) {
            memcpy(pad, w[r] + offset(kind, full), offset(kind, K - full));
            const __m256 v = decode8(kind, pad, 0);
            UNROLL for (int m = 0; m < MT; m++) {
                memcpy(xt, x + (int64_t)m * K + full, sizeof(float) * (K - full));
                acc[r * MT + m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xt), acc[r * MT + m]);
            }
        }
    }
    const float unit = kind == 0 ? 256.0f : 1.0f;
    UNROLL for (int r = 0; r < NR; r++) {
        if (r >= count) continue;
        const float f = j->scale[j->per_row ? n + r : 0] * unit;
        UNROLL for (int m = 0; m < MT; m++) j->out[(int64_t)(m0 + m) * j->N + n + r] = sum8(acc[r * MT + m]) * f;
    }
}

/* kind 2: the bytes, scales and zeros of weight rows n .. n + NR (count of them this job's; the rest repeat row n) */
static inline void int4_rows(const job_t* j, int NR, int n, int count, const uint8_t** w, const uint16_t** scale,
                             const uint8_t** zero) {
    const int groups = j->K / j->group;
    for (int r = 0; r < NR; r++) {
        const int64_t row = r < count ? n + r : n;
        w[r] = j->spread == 1 ? j->w + row * (j->K / 2) : j->w + (row & ~3) * (j->K / 2) + (row & 3) * 16;
        scale[r] = j->gscale + row * groups;
        zero[r] = j->zero + row * groups;
    }
}

/* kind 2, groups of GC columns (0: j->group, known only at run time). A group's sum of (q - z) s x is taken as
 * s * (sum of q x) - s z (sum of x), the sums of x per group (j->xsum) once per call, so 16 columns cost a load, a
 * widening, 2 integer ops, 2 conversions and 2 multiply-adds per row of x. The 8 bytes of a step hold 16 columns: low
 * nibbles the even ones, high the odd, each half 8 lanes; x is permuted to match (permute_pairs). Example, one group
 * of 16 columns with q = 1 and z = 8, s = 0.5, x all 1: 0.5 * 16 - 0.5 * 8 * 16 = -56 = 16 * (1 - 8) * 0.5. */
static inline __attribute__((always_inline)) void tile_int4(const int GC, const int NR, const int MT, const job_t* j,
                                                            int n, int m0, int count) {
    const int K = j->K, G = GC ? GC : j->group, groups = K / G, two = NR * MT <= 4; /* two: lo and hi summed apart */
    const float* x = j->x + (int64_t)m0 * K;
    const float* xsum = j->xsum + (int64_t)m0 * groups; /* [MT, groups] */
    const int64_t rb = K / 2;
    const uint8_t* w[4];
    const uint16_t* scale[4];
    const uint8_t* zero[4];
    int4_rows(j, NR, n, count, w, scale, zero);
    const int sp = j->spread;
    /* the next rows; tiled, the tile holding them (with 2 rows per tile, every other time the one being read) */
    const uint8_t* next = j->w + (int64_t)(sp == 1 ? n + NR : (n + NR) & ~3) * rb;
    const int ahead = n + 2 * NR <= j->n1;
    const __m256i low = _mm256_set1_epi32(15);
    __m256 acc[8]; /* [NR][MT]: the scaled sums of the groups so far */
    float shift[8] = {0}; /* [NR][MT]: the sum of s z (sum of x) over those groups */
    UNROLL for (int i = 0; i < NR * MT; i++) acc[i] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const int64_t at = (int64_t)g * G / 2; /* the group's first byte in a row */
        const float* xg = x + (int64_t)g * G;
        if (ahead && sp == 1)
            for (int64_t b = (at + 63) & ~(int64_t)63; b < at + G / 2; b += 64)
                UNROLL for (int r = 0; r < NR; r++) _mm_prefetch((const char*)next + r * rb + b, _MM_HINT_T0);
        if (ahead && sp == 4)
            for (int64_t b = (4 * at + 63) & ~(int64_t)63; b < 4 * (at + G / 2); b += 64)
                _mm_prefetch((const char*)next + b, _MM_HINT_T0);
        __m256 lo_sum[8], hi_sum[8]; /* [NR][MT]: this group's sums of q x over its even and odd columns */
        UNROLL for (int i = 0; i < NR * MT; i++) lo_sum[i] = _mm256_setzero_ps(), hi_sum[i] = _mm256_setzero_ps();
        UNROLL for (int c = 0; c < G / 2; c += 8) {
            const int64_t b16 = sp * ((at + c) & ~(int64_t)15) + ((at + c) & 15); /* byte at + c of a row */
            UNROLL for (int r = 0; r < NR; r++) {
                const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(w[r] + b16)));
                const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
                const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
                UNROLL for (int m = 0; m < MT; m++) {
                    const float* xm = xg + (int64_t)m * K + 2 * c;
                    const int i = r * MT + m;
                    lo_sum[i] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xm), lo_sum[i]);
                    if (two) hi_sum[i] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xm + 8), hi_sum[i]);
                    else lo_sum[i] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xm + 8), lo_sum[i]);
                }
            }
        }
        UNROLL for (int r = 0; r < NR; r++) {
            const float s = half_value(scale[r][g]), sz = s * zero[r][g];
            UNROLL for (int m = 0; m < MT; m++) {
                const int i = r * MT + m;
                const __m256 sum = two ? _mm256_add_ps(lo_sum[i], hi_sum[i]) : lo_sum[i];
                acc[i] = _mm256_fmadd_ps(sum, _mm256_set1_ps(s), acc[i]);
                shift[i] += sz * xsum[m * groups + g];
            }
        }
    }
    UNROLL for (int r = 0; r < NR; r++) {
        if (r >= count) continue;
        UNROLL for (int m = 0; m < MT; m++)
            j->out[(int64_t)(m0 + m) * j->N + n + r] = sum8(acc[r * MT + m]) - shift[r * MT + m];
    }
}

/* tile_int4_one's per-group values of its 4 (weight row, row of x) pairs for up to 64 groups from g0 (a multiple
 * of 64), 8 groups at a time: the scales, float16 widened, into buf [64 groups][4 pairs] (4 rows of 8 transposed), so
 * a block takes its pairs' scales in one load; and each pair's zero points' term s z (sum of u X) for those groups,
 * added to sz[pair] (lane l: the groups l mod 8; the last groups % 8 groups' scales are widened one at a time, their
 * terms left to the caller). Example: weight rows a, a, b, b (2 weight rows times 2 rows of x) -> buf[g] = a[g], a[g],
 * b[g], b[g]. */
static inline __attribute__((always_inline)) void group_values(const uint16_t* const* scale, const uint8_t* const* zero,
                                                               const float* const* total, int g0, int groups,
                                                               float* buf, float* sz) {
    const int n = groups - g0 < 64 ? groups - g0 : 64;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const int g = g0 + i;
        __m256 r[4];
        UNROLL for (int p = 0; p < 4; p++) {
            r[p] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scale[p] + g)));
            const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(zero[p] + g))));
            const __m256 sz_p = _mm256_load_ps(sz + 8 * p);
            _mm256_store_ps(sz + 8 * p, _mm256_fmadd_ps(_mm256_mul_ps(r[p], z), _mm256_loadu_ps(total[p] + g), sz_p));
        }
        const __m256 lo01 = _mm256_unpacklo_ps(r[0], r[1]), hi01 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 lo23 = _mm256_unpacklo_ps(r[2], r[3]), hi23 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t[4] = {_mm256_shuffle_ps(lo01, lo23, 0x44), _mm256_shuffle_ps(lo01, lo23, 0xEE),
                             _mm256_shuffle_ps(hi01, hi23, 0x44), _mm256_shuffle_ps(hi01, hi23, 0xEE)};
        UNROLL for (int c = 0; c < 4; c++) { /* t[c]: groups i + c and i + c + 4 */
            _mm_store_ps(buf + 4 * (i + c), _mm256_castps256_ps128(t[c]));
            _mm_store_ps(buf + 4 * (i + c + 4), _mm256_extractf128_ps(t[c], 1));
        }
    }
    for (; i < n; i++)
        UNROLL for (int p = 0; p < 4; p++) buf[4 * i + p] = half_value(scale[p][g0 + i]);
}

/* kind 2 at one row of x (4 weight rows at a time), or two rows of x that was bfloat16 or float16 (2 weight rows
 * times both), where decoding each weight to float (tile_int4) bounds the speed: x in fixed point, times the 4-bit
 * values with integer multiply-adds, 32 columns per step. x_digits writes each block of B columns of x as
 * integers X = x / u (u a power of 2 per block) in D signed 8-bit digits: D = 3, |X| <= 2^20, X = 16384 a + 128 b + c
 * (a in -64..64, b and c in -64..63); D = 2 (x of at most 11 significant bits: bfloat16, float16), |X| <= 2^13, X =
 * 128 a + b. A step loads 16 bytes of a weight row (32 columns) into both halves of a register and keeps the low
 * half's low nibbles and the high half's high ones: columns 2i, then 2i + 1, the order of the digits. maddubs
 * multiplies them into each digit's 32 bytes, adjacent pairs summed into 16-bit lanes (at most 2 * 15 * 64 = 1920
 * each, so 16 steps fit). At the end of a block the digits' sums are combined exactly in 32-bit lanes (16384 A + 128 B
 * + C, or 128 A + B), the 4 (weight row, row of x) pairs' lanes added across in each 128-bit half (hadd: at most 128
 * columns of 15 * 2^20 in a lane, below 2^31), converted to float once and multiplied by the 4 pairs' s u at once:
 * y += s u (sum of q X); y -= s z (sum of u X) over the groups, taken with the scales (group_values). X differs from
 * x / u by at most 1/2, so each x is used to within 2^-20 (D = 3) or 2^-13 (D = 2) of its block's largest |x|.
 * Example, D = 3, 32 columns of x = 0.75 (the largest, 0.75 * 2^0: u = 2^-20, X = 786432 = 16384 * 48, a = 48,
 * b = c = 0), q = 2, s = 1, z = 0: each 16-bit lane of A is 2 * 48 + 2 * 48 = 192, 8 lanes of 16384 * 2 * 192 =
 * 6291456, whose sum 50331648 times u is 48 = 32 * 2 * 0.75. */
static inline __attribute__((always_inline)) void tile_int4_one(const int BC, const int D, const int NR,
                                                                const job_t* j, int n, int count) {
    /* NR 4 weight rows (count of them this job's) times one row of x, or 2 times both rows of x (D = 2): 4 pairs */
    const int K = j->K, G = j->group, B = BC ? BC : j->block, MT = 4 / NR, blocks = K / B, groups = K / G;
    const int64_t rb = K / 2;
    const uint8_t* w[4];
    const uint16_t* scale[4];
    const uint8_t* zero[4];
    int4_rows(j, NR, n, count, w, scale, zero);
    const int sp = j->spread;
    const uint8_t* next = j->w + (int64_t)(n + NR) * rb; /* the next rows (rows in order only) */
    const int ahead = n + 2 * NR <= j->n1;
    const __m256i low = _mm256_set1_epi8(15), halves = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    const __m256i wa = _mm256_set1_epi16(D == 3 ? 16384 : 128), wb = _mm256_set1_epi16(D == 3 ? 128 : 1);
    __m256 acc = _mm256_setzero_ps(); /* [2 halves of the columns][4 pairs]: the scaled sums of the blocks so far */
    const int per = BC ? 1 : G / B; /* blocks per group (no division in the loop: it showed in the time) */
    const uint16_t* pair_scale[4]; /* [4 pairs]: the pair's weight row's scales and zero points, its row of x's */
    const uint8_t* pair_zero[4];
    const float* pair_total[4];
    UNROLL for (int i = 0; i < 4; i++) {
        pair_scale[i] = scale[i / MT], pair_zero[i] = zero[i / MT];
        pair_total[i] = j->group_total + (int64_t)(i % MT) * groups;
    }
    /* [4 pairs][8 lanes]: their zero points' terms so far (in memory: held in 4 registers through the blocks, they
     * made them ~5% slower) */
    float sz[32] __attribute__((aligned(32))) = {0};
    float widened[4 * 64] __attribute__((aligned(16))); /* [64 groups][4 pairs] from group g0 */
    int k0 = 0, b = 0, g = 0, left = per;
    for (int g0 = 0; g0 < groups; g0 += 64) { /* each 64 groups' values before their blocks, out of the loop below */
        group_values(pair_scale, pair_zero, pair_total, g0, groups, widened, sz);
        for (const int end = (g0 + 64 < groups ? g0 + 64 : groups) * G; k0 < end; k0 += B, b++) { /* block b, group g */
            const int8_t* d[2]; /* [MT]: 32 D bytes per 32 columns */
            UNROLL for (int m = 0; m < MT; m++) d[m] = j->digits + (int64_t)m * K * D + (int64_t)k0 * D;
            if (ahead && sp == 1)
                for (int64_t b = ((k0 / 2) + 63) & ~(int64_t)63; b < (k0 + B) / 2; b += 64)
                    UNROLL for (int r = 0; r < NR; r++) _mm_prefetch((const char*)next + r * rb + b, _MM_HINT_T0);
            if (sp == 4) /* tiled: one run of bytes, fetched 4 KiB ahead (into the next tile near the end) */
                for (int64_t b = 2 * (int64_t)k0; b < 2 * (int64_t)(k0 + B); b += 64)
                    _mm_prefetch((const char*)w[0] + b + 4096, _MM_HINT_T0);
            __m256i sa[4], sb[4], sc[4]; /* [NR][MT]: the block's sums of q times each digit, in 16-bit lanes */
            UNROLL for (int i = 0; i < 4; i++) sa[i] = sb[i] = sc[i] = _mm256_setzero_si256();
            UNROLL for (int c = 0; c < B / 32; c++) {
                __m256i da[2], db[2], dc[2];
                UNROLL for (int m = 0; m < MT; m++) {
                    da[m] = _mm256_load_si256((const __m256i*)(d[m] + 32 * D * c));
                    db[m] = _mm256_load_si256((const __m256i*)(d[m] + 32 * D * c + 32));
                    dc[m] = D == 3 ? _mm256_load_si256((const __m256i*)(d[m] + 32 * D * c + 64)) : db[m];
                }
                UNROLL for (int r = 0; r < NR; r++) {
                    const __m128i b = _mm_loadu_si128((const __m128i*)(w[r] + sp * (k0 / 2 + 16 * c)));
                    const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_broadcastsi128_si256(b), halves), low);
                    UNROLL for (int m = 0; m < MT; m++) {
                        const int i = r * MT + m;
                        sa[i] = _mm256_add_epi16(sa[i], _mm256_maddubs_epi16(q, da[m]));
                        sb[i] = _mm256_add_epi16(sb[i], _mm256_maddubs_epi16(q, db[m]));
                        /* each sum in a register, added to in order: left alone, the compiler regroups these integer
                         * additions into trees and spills their terms (as slow as tile_int4) */
                        if (D == 3) {
                            sc[i] = _mm256_add_epi16(sc[i], _mm256_maddubs_epi16(q, dc[m]));
                            __asm__("" : "+x"(sa[i]), "+x"(sb[i]), "+x"(sc[i]));
                        } else {
                            __asm__("" : "+x"(sa[i]), "+x"(sb[i]));
                        }
                    }
                }
            }
            __m256i sum[4]; /* [NR][MT]: the block's sums of q X, in 32-bit lanes */
            UNROLL for (int i = 0; i < 4; i++) {
                sum[i] = _mm256_add_epi32(_mm256_madd_epi16(sa[i], wa), _mm256_madd_epi16(sb[i], wb));
                if (D == 3) sum[i] = _mm256_add_epi32(sum[i], _mm256_madd_epi16(sc[i], _mm256_set1_epi16(1)));
            }
            const __m256i pairs =
                _mm256_hadd_epi32(_mm256_hadd_epi32(sum[0], sum[1]), _mm256_hadd_epi32(sum[2], sum[3]));
            const float* u = j->unit + b; /* row m of x's at u[m * blocks] */
            const __m128 s4 = _mm_load_ps(widened + 4 * (g - g0));
            const __m128 su =
                _mm_mul_ps(s4, NR == 4 ? _mm_set1_ps(u[0]) : _mm_setr_ps(u[0], u[blocks], u[0], u[blocks]));
            const __m256 su8 = _mm256_insertf128_ps(_mm256_castps128_ps256(su), su, 1);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pairs), su8, acc);
            if (--left == 0) left = per, g++;
        }
    }
    float y[4];
    _mm_storeu_ps(y, _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)));
    UNROLL for (int i = 0; i < 4; i++) {
        const int r = i / MT, m = i % MT;
        if (r >= count) continue;
        float shift = sum8(_mm256_load_ps(sz + 8 * i)); /* the sum of s z (sum of u X) over the groups */
        for (int g = groups & ~7; g < groups; g++) shift += half_value(scale[r][g]) * zero[r][g] * pair_total[i][g];
        j->out[(int64_t)m * j->N + n + r] = y[i] - shift;
    }
}

/* kind 1 at one row of x that was bfloat16 or float16, where widening each weight to float bounds the speed: x in two
 * digits per column (x_digits, in column order, blocks of B = 128, 64 or 32 columns: X = 128 a + b, |X| <= 2^13, each
 * x to within 2^-13 of its block's largest |x|), times the weights with integer multiply-adds, 32 columns per step.
 * maddubs takes an unsigned byte, so each weight is read as w + 128 (its top bit flipped): pairs of (w + 128) a sum to
 * at most 2 * 255 * 64 = 32640, so each step widens them at once (madd by 128 for a, by 1 for b) into 32-bit lanes,
 * converted to float once per block: y = s (sum over blocks of u (sum of (w + 128) X)) - 128 s (sum of u X). Example:
 * x = 0.5 in every column of a block (0.5 * 2^0: u = 2^-13, X = 4096, a = 32, b = 0), w = 3: (3 + 128) * 4096 per
 * column is 536576, times u is 65.5 = (3 + 128) * 0.5, less 128 * 0.5: 1.5 = w x per column. */
static inline __attribute__((always_inline)) void tile_int8_one(const int NR, const job_t* j, int n, int count) {
    const int K = j->K, B = j->block;
    const uint8_t* w[4];
    float s[4];
    UNROLL for (int r = 0; r < NR; r++) {
        const int64_t row = r < count ? n + r : n;
        w[r] = j->w + row * K;
        s[r] = j->scale[j->per_row ? row : 0];
    }
    const uint8_t* next = j->w + (int64_t)(n + NR) * K;
    const int ahead = n + 2 * NR <= j->n1;
    const __m256i flip = _mm256_set1_epi8((char)0x80), by128 = _mm256_set1_epi16(128), by1 = _mm256_set1_epi16(1);
    __m256 acc[4];
    UNROLL for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    float shift = 0.0f; /* the sum of u X over the blocks so far */
    for (int k0 = 0, b = 0; k0 < K; k0 += B, b++) {
        const int8_t* d = j->digits + (int64_t)k0 * 2; /* 64 bytes per 32 columns */
        if (ahead)
            for (int64_t o = (k0 + 63) & ~(int64_t)63; o < k0 + B; o += 64)
                UNROLL for (int r = 0; r < NR; r++) _mm_prefetch((const char*)next + r * K + o, _MM_HINT_T0);
        __m256i t[4]; /* [NR]: the block's sums of (w + 128) X, in 32-bit lanes */
        UNROLL for (int r = 0; r < NR; r++) t[r] = _mm256_setzero_si256();
        for (int c = 0; c < B / 32; c++) {
            const __m256i da = _mm256_load_si256((const __m256i*)(d + 64 * c));
            const __m256i db = _mm256_load_si256((const __m256i*)(d + 64 * c + 32));
            UNROLL for (int r = 0; r < NR; r++) {
                const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w[r] + k0 + 32 * c)), flip);
                const __m256i pa = _mm256_madd_epi16(_mm256_maddubs_epi16(q, da), by128);
                const __m256i pb = _mm256_madd_epi16(_mm256_maddubs_epi16(q, db), by1);
                t[r] = _mm256_add_epi32(t[r], _mm256_add_epi32(pa, pb));
            }
        }
        const __m256 u = _mm256_set1_ps(j->unit[b]);
        UNROLL for (int r = 0; r < NR; r++) acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[r]), u, acc[r]);
        shift += j->total[b];
    }
    UNROLL for (int r = 0; r < count && r < NR; r++) j->out[n + r] = s[r] * (sum8(acc[r]) - 128.0f * shift);
}

#define SMALL_M 2
#define ONE_NR 4 /* weight rows per tile_int8_one (tile_int4_one takes 4 at one row of x, 2 at two) */
/* TILE(A, NR, MT, j, n, m0, count) for this pass's tile shape: 4 weight rows x 1-2 rows of x, or 2 x 1-4 */
#define SHAPES(TILE, A)                                                                                                \
    if (nr == 4) {                                                                                                     \
        if (mt == 1) TILE(A, 4, 1, j, n, m0, count);                                                                   \
        else TILE(A, 4, 2, j, n, m0, count);                                                                           \
    } else {                                                                                                           \
        switch (mt) {                                                                                                  \
            case 1: TILE(A, 2, 1, j, n, m0, count); break;                                                             \
            case 2: TILE(A, 2, 2, j, n, m0, count); break;                                                             \
            case 3: TILE(A, 2, 3, j, n, m0, count); break;                                                             \
            default: TILE(A, 2, 4, j, n, m0, count); break;                                                            \
        }                                                                                                              \
    }
#define TILES(kind) SHAPES(tile, kind)
#define INT4_SHAPES(G) SHAPES(tile_int4, G) /* kind 2's tiles, unrolled for the common group sizes */
/* a job of kind 2 with groups of GC columns, in one function per group size that the compiler lays out alone (one
 * function holding every size ran the 128-column one ~10% slower) */
static inline __attribute__((always_inline)) void int4_job(const int GC, const job_t* j) {
    if (GC % 32 == 0 && j->digits) { /* one or two rows of x, blocks of GC columns (0: j->block) */
        const int nr = j->M == 1 ? 4 : 2;
        for (int n = j->n0; n < j->n1; n += nr) {
            const int count = j->n1 - n < nr ? j->n1 - n : nr;
            if (nr == 2) tile_int4_one(GC, 2, 2, j, n, count);
            else if (j->depth == 2) tile_int4_one(GC, 2, 4, j, n, count);
            else tile_int4_one(GC, 3, 4, j, n, count);
        }
        return;
    }
    const int nr = j->M <= SMALL_M ? 4 : 2;
    for (int n = j->n0; n < j->n1; n += nr) {
        const int count = j->n1 - n < nr ? j->n1 - n : nr;
        for (int m0 = 0; m0 < j->M; m0 += MT_MAX) {
            const int mt = j->M - m0 < MT_MAX ? j->M - m0 : MT_MAX;
            INT4_SHAPES(GC)
        }
    }
}
static __attribute__((noinline)) void int4_job_16(const job_t* j) { int4_job(16, j); }
static __attribute__((noinline)) void int4_job_32(const job_t* j) { int4_job(32, j); }
static __attribute__((noinline)) void int4_job_64(const job_t* j) { int4_job(64, j); }
static __attribute__((noinline)) void int4_job_128(const job_t* j) { int4_job(128, j); }
static __attribute__((noinline)) void int4_job_any(const job_t* j) { int4_job(0, j); }
#endif

#if defined(MIXSERVE_AVX512) || defined(MIXSERVE_AVX2)
/* this job's rows of w in tiles of 4 weight rows (up to SMALL_M rows of x) or 2, each over x in passes of MT_MAX */
static void* run(void* arg) {
    const job_t* j = (const job_t*)arg;
#ifdef MIXSERVE_AVX2
    if (j->kind == 1 && j->digits) { /* one row of bfloat16 or float16 x */
        for (int n = j->n0; n < j->n1; n += ONE_NR)
            tile_int8_one(ONE_NR, j, n, j->n1 - n < ONE_NR ? j->n1 - n : ONE_NR);
        return 0;
    }
    if (j->kind == 2) {
        if (j->group == 16) int4_job_16(j);
        else if (j->group == 32) int4_job_32(j);
        else if (j->group == 64) int4_job_64(j);
        else if (j->group == 128) int4_job_128(j);
        else int4_job_any(j);
        return 0;
    }
#endif
    const int nr = j->M <= SMALL_M ? 4 : 2;
    for (int n = j->n0; n < j->n1; n += nr) {
        const int count = j->n1 - n < nr ? j->n1 - n : nr;
        for (int m0 = 0; m0 < j->M; m0 += MT_MAX) {
            const int mt = j->M - m0 < MT_MAX ? j->M - m0 : MT_MAX;
            if (j->kind == 0) {
                TILES(0)
            } else if (j->kind == 1) {
                TILES(1)
#ifndef MIXSERVE_AVX2 /* the AVX2 build took kind 2 above */
            } else if (j->kind == 2) {
                TILES(2)
#endif
            } else {
                TILES(3)
            }
        }
    }
    return 0;
}
#else
static float fp8_value(int b) {
    const int e = (b >> 3) & 15, m = b & 7;
    float v = e ? (float)(8 + m) : (float)m; /* times 2^(e - 10), or 2^-9 for a subnormal */
    for (int i = 0; i < (e ? e : 1); i++) v *= 2.0f;
    v *= 1.0f / 1024.0f;
    return (b & 0x80) ? -v : v;
}

static void* run(void* arg) {
    const job_t* j = (const job_t*)arg;
    float table[256];
    for (int b = 0; b < 256; b++) table[b] = j->kind == 0 ? fp8_value(b) : (float)(int8_t)b;
    float* row = malloc(sizeof(float) * j->K); /* row n of w, decoded */
    if (!row) {
        ((job_t*)arg)->failed = 1;
        return 0;
    }
    const int groups = j->kind == 2 ? j->K / j->group : 0;
    for (int n = j->n0; n < j->n1; n++) {
        const uint8_t* w = j->w + (int64_t)n * row_bytes(j);
        const float s = j->kind == 2 ? 1.0f : j->scale[j->per_row ? n : 0];
        for (int g = 0; g < groups; g++) { /* kind 2 */
            const float gs = half_value(j->gscale[(int64_t)n * groups + g]), gz = j->zero[(int64_t)n * groups + g];
            for (int k = g * j->group; k < (g + 1) * j->group; k += 2) {
                row[k] = ((float)(w[k / 2] & 15) - gz) * gs;
                row[k + 1] = ((float)(w[k / 2] >> 4) - gz) * gs;
            }
        }
        for (int k = 0; k < j->K && j->kind == 3; k++) {
            const uint32_t bits = (uint32_t)((const uint16_t*)w)[k] << 16;
            memcpy(&row[k], &bits, 4);
        }
        for (int k = 0; k < j->K && j->kind < 2; k++) row[k] = table[w[k]];
        for (int m = 0; m < j->M; m++) {
            const float* x = j->x + (int64_t)m * j->K;
            float lanes[16] = {0};
            int k = 0;
            for (; k + 16 <= j->K; k += 16)
                for (int l = 0; l < 16; l++) lanes[l] += row[k + l] * x[k + l];
            for (; k < j->K; k++) lanes[0] += row[k] * x[k];
            float sum = 0.0f;
            for (int l = 0; l < 16; l++) sum += lanes[l];
            j->out[(int64_t)m * j->N + n] = sum * s;
        }
    }
    free(row);
    return 0;
}
#endif

#ifdef MIXSERVE_AVX2
/* x [M, K] (K a multiple of 16) with each 16 columns reordered even ones first: 0, 2, ..., 14, 1, 3, ..., 15,
 * followed by the sum of each group of G columns of x, [M, K / G] */
static float* permute_pairs(const float* x, int M, int K, int G) {
    const int64_t n = (int64_t)M * K;
    void* at = 0; /* on a cache line: a heap block (16-byte aligned) split every other 32-byte load of x in two */
    if (posix_memalign(&at, 64, sizeof(float) * (size_t)(n + n / G))) return 0;
    float* out = at;
    for (int64_t i = 0; i < n; i += 16)
        for (int c = 0; c < 8; c++) out[i + c] = x[i + 2 * c], out[i + 8 + c] = x[i + 2 * c + 1];
    for (int64_t i = 0; i < n / G; i++) {
        float t = 0.0f;
        for (int c = 0; c < G; c++) t += x[i * G + c];
        out[n + i] = t;
    }
    return out;
}

/* a row x [K] as the D digits per column tile_int4_one / tile_int8_one multiply (K a multiple of B, B of 32): per
 * block of B columns, u = 2^(e - P) for its largest |x| = f 2^e (f in [0.5, 1)), P = 20 for D = 3 and 13 for D = 2,
 * and X = x / u rounded to nearest (|X| <= 2^P), then per 32 columns (paired: the 16 even ones, then the 16 odd, as
 * kind 2 holds them; else in order) 32 bytes of each digit, the highest first; unit [K / B] = u, total [K / B] = u
 * (sum of X). 0 where a block holds a value that is not finite, or a largest |x| below 2^-100 but not 0: the float
 * path takes those. */
/* 2^n for n in -126..127 */
static inline float power2(int n) {
    const uint32_t bits = (uint32_t)(n + 127) << 23;
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

static int x_digits(const float* x, int K, int B, int D, int paired, int8_t* digits, float* unit, float* total) {
    const int P = D == 3 ? 20 : 13;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)), huge = _mm256_set1_ps(FLT_MAX);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), half = _mm256_set1_epi32(64);
    const __m256i seven = _mm256_set1_epi32(127);
    for (int k0 = 0; k0 < K; k0 += B) {
        __m256 top = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int k = k0; k < k0 + B; k += 8) {
            const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + k), magnitude);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, huge, _CMP_NLE_UQ)); /* > FLT_MAX, or NaN */
            top = _mm256_max_ps(top, a);
        }
        if (_mm256_movemask_ps(bad)) return 0;
        float lanes[8], largest = 0.0f;
        _mm256_storeu_ps(lanes, top);
        for (int i = 0; i < 8; i++) largest = lanes[i] > largest ? lanes[i] : largest;
        uint32_t bits;
        memcpy(&bits, &largest, 4);
        const int e = (int)(bits >> 23) - 126; /* largest = f 2^e, f in [0.5, 1), for a normal float */
        if (largest > 0.0f && e < -100) return 0;
        const __m256 inv = _mm256_set1_ps(largest > 0.0f ? power2(P - e) : 0.0f);
        __m256i count = _mm256_setzero_si256(); /* the sum of X, in 8 lanes of at most 2^P * B / 8 */
        for (int k = k0; k < k0 + B; k += 32) {
            float p[32];
            if (paired)
                for (int i = 0; i < 16; i++) p[i] = x[k + 2 * i], p[16 + i] = x[k + 2 * i + 1];
            else
                memcpy(p, x + k, sizeof(p));
            __m256i da[4], db[4], dc[4];
            for (int v = 0; v < 4; v++) { /* the lowest digit in -64..63, then the next, ... */
                const __m256i X = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + 8 * v), inv));
                count = _mm256_add_epi32(count, X);
                const __m256i c = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(X, half), seven), half);
                const __m256i t = _mm256_srai_epi32(_mm256_sub_epi32(X, c), 7);
                if (D == 2) {
                    da[v] = t, db[v] = c;
                    continue;
                }
                dc[v] = c;
                db[v] = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(t, half), seven), half);
                da[v] = _mm256_srai_epi32(_mm256_sub_epi32(t, db[v]), 7);
            }
            __m256i* out = (__m256i*)(digits + (int64_t)k * D);
            const __m256i* each[3] = {da, db, dc};
            for (int i = 0; i < D; i++) {
                const __m256i* d = each[i];
                const __m256i lo = _mm256_packs_epi32(d[0], d[1]), hi = _mm256_packs_epi32(d[2], d[3]);
                _mm256_store_si256(out + i, _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), order));
            }
        }
        int32_t sums[8];
        _mm256_storeu_si256((__m256i*)sums, count);
        int64_t sum = 0;
        for (int i = 0; i < 8; i++) sum += sums[i];
        unit[k0 / B] = largest > 0.0f ? power2(e - P) : 0.0f;
        total[k0 / B] = (float)((double)sum * unit[k0 / B]);
    }
    return 1;
}
#endif

/* 0 when done; -1 for a kind or size it does not take, or when memory ran out. Rows of w are split across `threads`
 * threads (the caller's one included), in blocks of a multiple of 4. scale: float32 (kinds 0, 1, 3) or float16 bits
 * (kind 2); zero and group: kind 2 only. x_bits: the significant bits each x had before it was widened to float32
 * (24 float32, 8 bfloat16, 11 float16); at most 11 lets the AVX2 build's one-row int4 path hold x in 2 digits (13
 * bits per block) instead of 3 (20 bits), and its two-row int4 and one-row int8 paths run (float32 x takes the float
 * loops there). */
int mixserve_qlinear(int kind, const float* x, int M, int K, const uint8_t* w, int N, const void* scale, int per_row,
                     const uint8_t* zero, int group, float* out, int threads, int x_bits) {
    if (kind < 0 || kind > 4 || M < 1 || K < 1 || N < 1) return -1;
    const int spread = kind == 4 ? 4 : 1; /* kind 4: kind 2 in tiles of 4 rows (the AVX2 build only) */
#ifndef MIXSERVE_AVX2
    if (kind == 4) return -1;
#endif
    if (kind == 4) kind = 2;
    if (kind == 2 && (group < 16 || group % 16 || K % group || !zero || !per_row)) return -1;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    float* pairs = 0; /* x as the AVX2 build's int4 path reads it, then its sums per group */
    const float* xsum = 0;
    int8_t* digits = 0; /* rows of x in fixed point (x_digits), then the unit, total and group total of each row */
    const int depth = x_bits <= 11 ? 2 : 3;
    int block = group <= 256 ? group : group % 256 == 0 ? 256 : 0; /* kind 2's blocks of digits; kind 1's below */
#ifdef MIXSERVE_AVX2
    if (kind == 2 && (M == 1 || (M == 2 && depth == 2)) && group % 32 == 0 && block) {
        void* at = 0;
        const int blocks = K / block, groups = K / group;
        const size_t floats = (size_t)M * (2 * blocks + groups); /* unit, total, group_total: [M, ...] each */
        if (posix_memalign(&at, 64, (size_t)M * K * depth + sizeof(float) * floats)) return -1;
        digits = at;
        float* unit = (float*)(digits + (int64_t)M * K * depth);
        float *total = unit + M * blocks, *group_total = total + M * blocks;
        for (int m = 0; m < M && digits; m++)
            if (!x_digits(x + (int64_t)m * K, K, block, depth, 1, digits + (int64_t)m * K * depth, unit + m * blocks,
                          total + m * blocks)) {
                free(digits);
                digits = 0;
            }
        for (int g = 0; digits && g < M * groups; g++) { /* blocks of a group are in a row of x */
            double t = 0.0;
            for (int b = g * (group / block); b < (g + 1) * (group / block); b++) t += total[b];
            group_total[g] = (float)t;
        }
    }
    if (kind == 1 && M == 1 && depth == 2 && K % 32 == 0) {
        block = K % 128 == 0 ? 128 : K % 64 == 0 ? 64 : 32;
        void* at = 0;
        if (posix_memalign(&at, 64, (size_t)K * 2 + 2 * sizeof(float) * (size_t)(K / block))) return -1;
        digits = at;
        float* unit = (float*)(digits + (int64_t)K * 2);
        if (!x_digits(x, K, block, 2, 0, digits, unit, unit + K / block)) {
            free(digits);
            digits = 0;
        }
    }
    if (kind == 2 && !digits) {
        if (!(pairs = permute_pairs(x, M, K, group))) return -1;
        x = pairs;
        xsum = pairs + (int64_t)M * K;
    }
#endif
    const int64_t per = (((int64_t)N + threads - 1) / threads + 3) & ~(int64_t)3; /* whole tiles of rows */
    job_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        const int n0 = t * per < N ? (int)(t * per) : N, n1 = n0 + per < N ? (int)(n0 + per) : N;
        jobs[t] = (job_t){kind,  M,     K,    N,    per_row, group, n0,    n1,    0,     x,      w,
                          kind == 2 ? 0 : (const float*)scale, kind == 2 ? (const uint16_t*)scale : 0,
                          zero,  xsum,  digits, 0,  0,       0,     block, depth, spread, out};
        if (digits) { /* [M, K / B] each (kind 1: M is 1) */
            jobs[t].unit = (const float*)(digits + (int64_t)M * K * depth);
            jobs[t].total = jobs[t].unit + M * (K / block);
            jobs[t].group_total = kind == 2 ? jobs[t].total + M * (K / block) : 0;
        }
    }
#ifdef _OPENMP
    /* on the threads of the process's OpenMP runtime: torch's own (its libgomp.so.1 is the one loaded), whose
     * threads spin for a while after each of torch's parallel ops; threads of our own would share the cores with
     * them (2-3x slower at 3-8 rows on 2 cores) */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) run(&jobs[t]);
#else
    pthread_t tid[MAX_THREADS];
    int made[MAX_THREADS];
    for (int t = 1; t < threads; t++) {
        made[t] = jobs[t].n0 < jobs[t].n1 && pthread_create(&tid[t], 0, run, &jobs[t]) == 0;
        if (jobs[t].n0 < jobs[t].n1 && !made[t]) run(&jobs[t]);
    }
    run(&jobs[0]);
    for (int t = 1; t < threads; t++)
        if (made[t]) pthread_join(tid[t], 0);
#endif
    free(pairs);
    free(digits);
    for (int t = 0; t < threads; t++)
        if (jobs[t].failed) return -1;
    return 0;
}
