/*
 * Weighted row sums and row gathers of the combine (and of the EXPERT_PACKED unpack). One
 * kernel body per accumulator type, instantiated per dtype with MOE_FOR_EACH_DTYPE; the hidden
 * dimension is cut in blocks so that the accumulator stays in L1.
 */
#include <string.h>

#include "../dtype.h"
#include "moe_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOE_BF16_AVX2 1
#endif

#define HBLOCK 1024 /* hidden elements per accumulator block */
#define MOE_MAX_SOURCES 64

/* The first term initialises the accumulator (no zeroing pass); a row with no term is 0. */
#define DEFINE_SEGMENT_SUM(CODE, SUF, ACC)                                                      \
  MOE_CLONES static void segment_sum_##SUF(char *out, uint64_t out_stride, uint64_t nseg,       \
                                           const int64_t *offsets, const int64_t *rows,         \
                                           const float *w, const char *src, uint64_t hidden,    \
                                           size_t es) {                                         \
    ACC acc[HBLOCK];                                                                            \
    for (uint64_t j = 0; j < nseg; ++j) {                                                       \
      const int64_t t0 = offsets[j], t1 = offsets[j + 1];                                       \
      for (uint64_t h0 = 0; h0 < hidden; h0 += HBLOCK) {                                        \
        const uint64_t m = hidden - h0 < HBLOCK ? hidden - h0 : HBLOCK;                         \
        char *o = out + (j * out_stride + h0) * es;                                             \
        if (t0 == t1) {                                                                         \
          memset(o, 0, m * es);                                                                 \
          continue;                                                                             \
        }                                                                                       \
        const char *s = src + ((uint64_t)rows[t0] * hidden + h0) * es;                          \
        const ACC w0 = w ? (ACC)w[t0] : (ACC)1;                                                 \
        for (uint64_t i = 0; i < m; ++i) acc[i] = w0 * (ACC)MOE_LOAD_##SUF(s, i);               \
        for (int64_t t = t0 + 1; t < t1; ++t) {                                                 \
          const ACC wt = w ? (ACC)w[t] : (ACC)1;                                                \
          s = src + ((uint64_t)rows[t] * hidden + h0) * es;                                     \
          for (uint64_t i = 0; i < m; ++i) acc[i] += wt * (ACC)MOE_LOAD_##SUF(s, i);            \
        }                                                                                       \
        for (uint64_t i = 0; i < m; ++i) MOE_STORE_##SUF(o, i, acc[i]);                         \
      }                                                                                         \
    }                                                                                           \
  }

/* One source: a copy (a single term rounds to itself); two: one fused pass; more: an fp32
 * accumulator. Sources are summed in d order in every case. */
#define DEFINE_GATHER_SUM(CODE, SUF, ACC)                                                       \
  MOE_CLONES static void gather_sum_##SUF(char *out, uint64_t n, int64_t nsrc,                  \
                                          const void *const *bases, const int64_t *rows,        \
                                          uint64_t hidden, size_t es) {                         \
    ACC acc[HBLOCK];                                                                            \
    const char *s[MOE_MAX_SOURCES];                                                             \
    const uint64_t row = hidden * es;                                                           \
    for (uint64_t r = 0; r < n; ++r) {                                                          \
      const int64_t *rr = rows + r * (uint64_t)nsrc;                                            \
      int ns = 0;                                                                               \
      for (int64_t d = 0; d < nsrc; ++d)                                                        \
        if (rr[d] >= 0) s[ns++] = (const char *)bases[d] + (uint64_t)rr[d] * row;               \
      char *o = out + r * row;                                                                  \
      if (ns == 0) {                                                                            \
        memset(o, 0, row);                                                                      \
        continue;                                                                               \
      }                                                                                         \
      if (ns == 1) {                                                                            \
        memcpy(o, s[0], row);                                                                   \
        continue;                                                                               \
      }                                                                                         \
      if (ns == 2) {                                                                            \
        const char *a = s[0], *b = s[1];                                                        \
        for (uint64_t i = 0; i < hidden; ++i)                                                   \
          MOE_STORE_##SUF(o, i, (ACC)MOE_LOAD_##SUF(a, i) + (ACC)MOE_LOAD_##SUF(b, i));         \
        continue;                                                                               \
      }                                                                                         \
      for (uint64_t h0 = 0; h0 < hidden; h0 += HBLOCK) {                                        \
        const uint64_t m = hidden - h0 < HBLOCK ? hidden - h0 : HBLOCK;                         \
        const char *a = s[0] + h0 * es, *b = s[1] + h0 * es;                                    \
        for (uint64_t i = 0; i < m; ++i)                                                        \
          acc[i] = (ACC)MOE_LOAD_##SUF(a, i) + (ACC)MOE_LOAD_##SUF(b, i);                       \
        for (int p = 2; p < ns; ++p) {                                                          \
          const char *c = s[p] + h0 * es;                                                       \
          for (uint64_t i = 0; i < m; ++i) acc[i] += (ACC)MOE_LOAD_##SUF(c, i);                 \
        }                                                                                       \
        char *oo = o + h0 * es;                                                                 \
        for (uint64_t i = 0; i < m; ++i) MOE_STORE_##SUF(oo, i, acc[i]);                        \
      }                                                                                         \
    }                                                                                           \
  }

MOE_FOR_EACH_DTYPE(DEFINE_SEGMENT_SUM)
MOE_FOR_EACH_DTYPE(DEFINE_GATHER_SUM)

#ifdef MOE_BF16_AVX2
/* The bf16 gather sum by hand: the compiler's vectorisation of the scalar convert / add /
 * round loop above is bound by its instruction count (about 20 GB/s even from L1), and this
 * sum is the combine's last step. 16 elements per step: widen to fp32 by interleaving zero
 * halves, add the sources in d order, round to nearest even with the canonical NaN, narrow.
 * The sums and their order are those of gather_sum_BF16, so both give the same bits. */
#define AVX2 __attribute__((target("avx2")))

AVX2 static inline __m256i round_bf16(__m256 f) {
  const __m256i s = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(s, 16), _mm256_set1_epi32(1));
  const __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(s, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
}

AVX2 static void gather_sum_bf16_avx2(char *out, uint64_t n, int64_t nsrc,
                                      const void *const *bases, const int64_t *rows,
                                      uint64_t hidden) {
  const char *s[MOE_MAX_SOURCES];
  const uint64_t row = hidden * 2;
  const __m256i zero = _mm256_setzero_si256();
  for (uint64_t r = 0; r < n; ++r) {
    const int64_t *rr = rows + r * (uint64_t)nsrc;
    int ns = 0;
    for (int64_t d = 0; d < nsrc; ++d)
      if (rr[d] >= 0) s[ns++] = (const char *)bases[d] + (uint64_t)rr[d] * row;
    char *o = out + r * row;
    if (ns < 2) {
      if (ns) memcpy(o, s[0], row);
      else memset(o, 0, row);
      continue;
    }
    uint64_t i = 0;
    for (; i + 16 <= hidden; i += 16) {
      /* Unpacking within 128-bit lanes and packing back within them keeps the order. */
      __m256i v = _mm256_loadu_si256((const __m256i *)(s[0] + 2 * i));
      __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
      __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
      for (int p = 1; p < ns; ++p) {
        v = _mm256_loadu_si256((const __m256i *)(s[p] + 2 * i));
        lo = _mm256_add_ps(lo, _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)));
        hi = _mm256_add_ps(hi, _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)));
      }
      _mm256_storeu_si256((__m256i *)(o + 2 * i),
                          _mm256_packus_epi32(round_bf16(lo), round_bf16(hi)));
    }
    for (; i < hidden; ++i) {
      float acc = MOE_LOAD_BF16(s[0], i);
      for (int p = 1; p < ns; ++p) acc += MOE_LOAD_BF16(s[p], i);
      MOE_STORE_BF16(o, i, acc);
    }
  }
}
#undef AVX2
#endif

static size_t dtype_size(int dtype) {
  switch (dtype) {
    case MOE_F32: return 4;
    case MOE_BF16: return 2;
    case MOE_F16: return 2;
    case MOE_F64: return 8;
    default: return 0;
  }
}

int moe_segment_sum(int dtype, void *out, uint64_t out_stride, uint64_t nseg,
                    const int64_t *offsets, const int64_t *rows, uint64_t num_rows,
                    const float *weights, const void *src, uint64_t src_rows, uint64_t hidden,
                    int64_t *bad) {
  const size_t es = dtype_size(dtype);
  if (!es) return MOE_ERR_DTYPE;
  /* Validate every index before touching memory: a stale or foreign plan must raise, not read
   * another tensor's bytes. */
  if (offsets[0] < 0) {
    bad[0] = 0;
    return MOE_ERR_BOUNDS;
  }
  for (uint64_t j = 0; j < nseg; ++j) {
    if (offsets[j + 1] < offsets[j] || (uint64_t)offsets[j + 1] > num_rows) {
      bad[0] = (int64_t)j + 1;
      return MOE_ERR_BOUNDS;
    }
  }
  const uint64_t last = nseg ? (uint64_t)offsets[nseg] : 0;
  for (uint64_t t = (uint64_t)offsets[0]; t < last; ++t) {
    if (rows[t] < 0 || (uint64_t)rows[t] >= src_rows) {
      bad[0] = (int64_t)t;
      return MOE_ERR_BOUNDS;
    }
  }
  switch (dtype) {
#define CASE(CODE, SUF, ACC)                                                                     \
  case CODE:                                                                                    \
    segment_sum_##SUF((char *)out, out_stride, nseg, offsets, rows, weights, (const char *)src, \
                      hidden, es);                                                              \
    break;
    MOE_FOR_EACH_DTYPE(CASE)
#undef CASE
  }
  return MOE_OK;
}

int moe_gather_sum(const moe_gather_args *a) {
  const int dtype = (int)a->dtype;
  void *out = a->out;
  const uint64_t n = a->n, hidden = a->hidden;
  const int64_t nsrc = a->nsrc;
  const void *const *bases = a->bases;
  const int64_t *src_rows = a->src_rows, *rows = a->rows;
  int64_t *bad = a->bad;
  const size_t es = dtype_size(dtype);
  if (!es) return MOE_ERR_DTYPE;
  if (nsrc < 1 || nsrc > MOE_MAX_SOURCES) {
    bad[0] = nsrc;
    return MOE_ERR_BOUNDS;
  }
  for (uint64_t i = 0; i < n * (uint64_t)nsrc; ++i) {
    const int64_t r = rows[i];
    if (r < -1 || (r >= 0 && r >= src_rows[i % (uint64_t)nsrc])) {
      bad[0] = (int64_t)i;
      return MOE_ERR_BOUNDS;
    }
  }
#ifdef MOE_BF16_AVX2
  if (dtype == MOE_BF16 && __builtin_cpu_supports("avx2")) {
    gather_sum_bf16_avx2((char *)out, n, nsrc, bases, rows, hidden);
    return MOE_OK;
  }
#endif
  switch (dtype) {
#define CASE(CODE, SUF, ACC)                                                                     \
  case CODE:                                                                                    \
    gather_sum_##SUF((char *)out, n, nsrc, bases, rows, hidden, es);                            \
    break;
    MOE_FOR_EACH_DTYPE(CASE)
#undef CASE
  }
  return MOE_OK;
}

int moe_gather_rows(void *out, const void *src, const int64_t *rows, uint64_t n,
                    uint64_t src_rows, uint64_t row_bytes, int64_t *bad) {
  for (uint64_t i = 0; i < n; ++i) {
    if (rows[i] < 0 || (uint64_t)rows[i] >= src_rows) {
      bad[0] = (int64_t)i;
      return MOE_ERR_BOUNDS;
    }
  }
  for (uint64_t i = 0; i < n; ++i)
    memcpy((char *)out + i * row_bytes, (const char *)src + (uint64_t)rows[i] * row_bytes,
           row_bytes);
  return MOE_OK;
}
