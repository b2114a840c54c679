/*
 * out[M, N] = x[M, K] @ w[N, K]^T in fp32 for few rows (an expert's share of a small batch).
 *
 * With M of 1-64 and K, N in the hundreds or thousands, a BLAS sgemm spends most of its time
 * packing w, which it reads once anyway: torch's CPU matmul runs at 5-25 GFLOP/s there on the
 * development VM's core. This kernel reads w in place: dot products along K, 3 rows of x by 4
 * rows of w per block (12 AVX2 FMA accumulators), so each w line is loaded once per 3 rows.
 * Each output is one dot product summed in 8 fp32 lanes and then across them; the order
 * differs from a BLAS one (fp32 rounding, not bits). x86-64 with AVX2 + FMA only: without them
 * both entry points return MOE_ERR_DTYPE and the caller uses torch.
 *
 * moe_linear_nt_bf16 is the same for bf16 x, w and out: w is widened to fp32 in registers as it
 * is read (so it streams half the bytes), the sums are fp32 and each output is rounded to bf16
 * once, as torch's bf16 matmul does. On a CPU without bf16 dot products (AVX2 only) torch's
 * bf16 matmul runs at a few GFLOP/s, so there this kernel also serves the rows where the fp32
 * one would not pay.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "../dtype.h"
#include "moe_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FMA_TARGET __attribute__((target("avx2,fma")))

FMA_TARGET static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* Loads 8 weights as fp32: in place for fp32, widened in registers for bf16 (its bits are the
 * top half of the fp32 ones). */
#define LOAD_F32(p) _mm256_loadu_ps(p)
#define LOAD_BF16(p)                                                                           \
  _mm256_castsi256_ps(                                                                         \
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define STORE_F32(p, v) (*(p) = (v))
#define STORE_BF16(p, v) (*(p) = moe_f32_to_bf16(v))

/* The dot products of R (<= 3) fp32 rows of x with 4 rows of w (WT): out rows m.., columns
 * n..n+3, stored as OT. */
#define BLOCK(SUF, WT, OT, R)                                                                  \
  FMA_TARGET static void block_##SUF##_##R(OT *out, uint64_t ldo, const float *x,             \
                                           const WT *w, uint64_t k) {                         \
    __m256 acc[R][4];                                                                         \
    for (int r = 0; r < R; ++r)                                                               \
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();                            \
    uint64_t i = 0;                                                                           \
    for (; i + 8 <= k; i += 8) {                                                              \
      const __m256 b0 = LOAD_##SUF(w + i), b1 = LOAD_##SUF(w + k + i);                        \
      const __m256 b2 = LOAD_##SUF(w + 2 * k + i), b3 = LOAD_##SUF(w + 3 * k + i);            \
      for (int r = 0; r < R; ++r) {                                                           \
        const __m256 a = _mm256_loadu_ps(x + r * k + i);                                      \
        acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);                                        \
        acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);                                        \
        acc[r][2] = _mm256_fmadd_ps(a, b2, acc[r][2]);                                        \
        acc[r][3] = _mm256_fmadd_ps(a, b3, acc[r][3]);                                        \
      }                                                                                       \
    }                                                                                         \
    for (int r = 0; r < R; ++r)                                                               \
      for (int c = 0; c < 4; ++c) {                                                           \
        float s = hsum(acc[r][c]);                                                            \
        for (uint64_t j = i; j < k; ++j) s += x[r * k + j] * MOE_LOAD_##SUF(w + c * k, j);    \
        STORE_##SUF(out + r * ldo + c, s);                                                    \
      }                                                                                       \
  }

/* out [m, n] (OT) = x [m, k] (fp32) @ w [n, k]^T (WT), blocks of 3 x 4, then the tails. */
#define LINEAR(SUF, WT, OT)                                                                    \
  BLOCK(SUF, WT, OT, 1)                                                                       \
  BLOCK(SUF, WT, OT, 2)                                                                       \
  BLOCK(SUF, WT, OT, 3)                                                                       \
  FMA_TARGET static void linear_nt_##SUF(OT *out, const float *x, const WT *w, uint64_t m,    \
                                         uint64_t n, uint64_t k) {                            \
    uint64_t c = 0;                                                                           \
    for (; c + 4 <= n; c += 4) {                                                              \
      const WT *wc = w + c * k;                                                               \
      uint64_t r = 0;                                                                         \
      for (; r + 3 <= m; r += 3) block_##SUF##_3(out + r * n + c, n, x + r * k, wc, k);       \
      if (m - r == 2) block_##SUF##_2(out + r * n + c, n, x + r * k, wc, k);                  \
      else if (m - r == 1) block_##SUF##_1(out + r * n + c, n, x + r * k, wc, k);             \
    }                                                                                         \
    for (; c < n; ++c) /* the last n % 4 columns */                                           \
      for (uint64_t r = 0; r < m; ++r) {                                                      \
        float s = 0.f;                                                                        \
        for (uint64_t j = 0; j < k; ++j) s += x[r * k + j] * MOE_LOAD_##SUF(w + c * k, j);    \
        STORE_##SUF(out + r * n + c, s);                                                      \
      }                                                                                       \
  }
LINEAR(F32, float, float)
LINEAR(BF16, uint16_t, uint16_t)
#endif

static int fma_cpu(void) {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return 0;
#endif
}

int moe_linear_nt(float *out, const float *x, const float *w, uint64_t m, uint64_t n,
                  uint64_t k) {
  (void)out, (void)x, (void)w, (void)m, (void)n, (void)k;
  if (!fma_cpu()) return MOE_ERR_DTYPE;
#if defined(__x86_64__) && defined(__GNUC__)
  linear_nt_F32(out, x, w, m, n, k);
#endif
  return MOE_OK;
}

int moe_linear_nt_bf16(uint16_t *out, const uint16_t *x, const uint16_t *w, uint64_t m,
                       uint64_t n, uint64_t k) {
  (void)out, (void)x, (void)w, (void)m, (void)n, (void)k;
  if (!fma_cpu()) return MOE_ERR_DTYPE;
#if defined(__x86_64__) && defined(__GNUC__)
  /* x is small (m <= 64 rows): widen it once; w is widened 8 at a time as it is read. */
  float *xf = malloc(m * k * sizeof(float));
  if (!xf) return MOE_ERR_NOMEM;
  for (uint64_t i = 0; i < m * k; ++i) xf[i] = moe_bf16_to_f32(x[i]);
  linear_nt_BF16(out, xf, w, m, n, k);
  free(xf);
#endif
  return MOE_OK;
}
