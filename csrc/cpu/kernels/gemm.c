/*
 * out[M, N] = x[M, K] @ w[N, K]^T in fp32 for few rows (an expert's share of a small batch).
 *
 * With M of 1-64 and K, N in the hundreds or thousands, a BLAS sgemm spends most of its time
 * packing w, which it reads once anyway: torch's CPU matmul runs at 5-25 GFLOP/s there on the
 * development VM's core. This kernel reads w in place: dot products along K, 3 rows of x by 4
 * rows of w per block (12 AVX2 FMA accumulators), so each w line is loaded once per 3 rows.
 * Each output is one dot product summed in 8 fp32 lanes and then across them; the order
 * differs from a BLAS one (fp32 rounding, not bits). x86-64 with AVX2 + FMA only: without them
 * moe_linear_nt returns MOE_ERR_DTYPE and the caller uses torch.
 */
#include <stddef.h>
#include <stdint.h>

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

/* The dot products of R (<= 3) rows of x with 4 rows of w: out rows m.., columns n..n+3. */
#define BLOCK(R)                                                                               \
  FMA_TARGET static void block_##R(float *out, uint64_t ldo, const float *x, const float *w,  \
                                   uint64_t k) {                                              \
    __m256 acc[R][4];                                                                         \
    for (int r = 0; r < R; ++r)                                                               \
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_setzero_ps();                            \
    uint64_t i = 0;                                                                           \
    for (; i + 8 <= k; i += 8) {                                                              \
      const __m256 b0 = _mm256_loadu_ps(w + i), b1 = _mm256_loadu_ps(w + k + i);              \
      const __m256 b2 = _mm256_loadu_ps(w + 2 * k + i), b3 = _mm256_loadu_ps(w + 3 * k + i);  \
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
        for (uint64_t j = i; j < k; ++j) s += x[r * k + j] * w[c * k + j];                    \
        out[r * ldo + c] = s;                                                                 \
      }                                                                                       \
  }
BLOCK(1)
BLOCK(2)
BLOCK(3)

FMA_TARGET static void linear_nt(float *out, const float *x, const float *w, uint64_t m,
                                 uint64_t n, uint64_t k) {
  uint64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    const float *wc = w + c * k;
    uint64_t r = 0;
    for (; r + 3 <= m; r += 3) block_3(out + r * n + c, n, x + r * k, wc, k);
    if (m - r == 2) block_2(out + r * n + c, n, x + r * k, wc, k);
    else if (m - r == 1) block_1(out + r * n + c, n, x + r * k, wc, k);
  }
  for (; c < n; ++c) /* the last n % 4 columns */
    for (uint64_t r = 0; r < m; ++r) {
      float s = 0.f;
      for (uint64_t j = 0; j < k; ++j) s += x[r * k + j] * w[c * k + j];
      out[r * n + c] = s;
    }
}
#endif

int moe_linear_nt(float *out, const float *x, const float *w, uint64_t m, uint64_t n,
                  uint64_t k) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    linear_nt(out, x, w, m, n, k);
    return MOE_OK;
  }
#endif
  (void)out, (void)x, (void)w, (void)m, (void)n, (void)k;
  return MOE_ERR_DTYPE;
}
