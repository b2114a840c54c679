/*
 * Data kernels: fp32-accumulating sums over W shared buffers (fp32 / bf16 / fp16), and copies
 * out of contiguous or row-indexed sources. Hot loops are compiled for several x86-64 levels
 * and picked at load time (target_clones), so a built wheel runs on any x86-64 CPU and still
 * uses AVX2 / AVX-512 where present.
 */
#include <string.h>

#include "shm.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define SHM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SHM_CLONES
#endif

/* Elements summed per block: small enough for the fp32 accumulator to stay in L1. */
#define BLOCK 512

size_t shm_dtype_size(int dtype) {
  switch (dtype) {
    case SHM_F32: return 4;
    case SHM_BF16: return 2;
    case SHM_F16: return 2;
    case SHM_BYTES: return 1;
    default: return 0;
  }
}

typedef union {
  uint32_t u;
  float f;
} f32bits;

static inline float bf16_to_f32(uint16_t v) {
  f32bits b = {.u = (uint32_t)v << 16};
  return b.f;
}

/* Round to nearest even, NaN -> canonical quiet NaN (as torch does). */
static inline uint16_t f32_to_bf16(float f) {
  f32bits b = {.f = f};
  if ((b.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (uint16_t)((b.u + 0x7fffu + ((b.u >> 16) & 1u)) >> 16);
}

#if defined(__FLT16_MAX__)
typedef _Float16 half_t;
static inline float f16_to_f32(half_t v) { return (float)v; }
static inline half_t f32_to_f16(float f) { return (half_t)f; }
#else
/* Portable IEEE binary16 conversions for compilers without _Float16. */
typedef uint16_t half_t;
static inline float f16_to_f32(half_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  f32bits b;
  if (exp == 0) {
    b.f = (float)man * 5.9604644775390625e-8f; /* 2^-24 */
    b.u |= sign;
    return b.f;
  }
  if (exp == 31) b.u = sign | 0x7f800000u | (man << 13);
  else b.u = sign | ((exp + 112) << 23) | (man << 13);
  return b.f;
}
static inline half_t f32_to_f16(float f) {
  f32bits b = {.f = f};
  uint32_t sign = (b.u >> 16) & 0x8000, a = b.u & 0x7fffffffu;
  if (a > 0x7f800000u) return (half_t)(sign | 0x7e00);
  if (a >= 0x477ff000u) return (half_t)(sign | 0x7c00); /* rounds to >= 65520: inf */
  if (a < 0x38800000u) {                                /* subnormal or zero in fp16 */
    f32bits t = {.u = a};
    t.f += 0.5f; /* the fp32 adder rounds to nearest even at 2^-24 granularity */
    return (half_t)(sign | (t.u - 0x3f000000u));
  }
  uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u); /* rebias exponent, round nearest even */
  return (half_t)(sign | (r >> 13));
}
#endif

SHM_CLONES
static void reduce_f32(float *out, float *out2, const float *const *s, int ns, size_t n) {
  float acc[BLOCK];
  for (size_t b = 0; b < n; b += BLOCK) {
    size_t m = n - b < BLOCK ? n - b : BLOCK;
    const float *s0 = s[0] + b;
    for (size_t i = 0; i < m; ++i) acc[i] = s0[i];
    for (int p = 1; p < ns; ++p) {
      const float *sp = s[p] + b;
      for (size_t i = 0; i < m; ++i) acc[i] += sp[i];
    }
    memcpy(out + b, acc, m * sizeof(float));
    if (out2) memcpy(out2 + b, acc, m * sizeof(float));
  }
}

SHM_CLONES
static void reduce_bf16(uint16_t *out, uint16_t *out2, const uint16_t *const *s, int ns,
                        size_t n) {
  float acc[BLOCK];
  uint16_t res[BLOCK];
  for (size_t b = 0; b < n; b += BLOCK) {
    size_t m = n - b < BLOCK ? n - b : BLOCK;
    const uint16_t *s0 = s[0] + b;
    for (size_t i = 0; i < m; ++i) acc[i] = bf16_to_f32(s0[i]);
    for (int p = 1; p < ns; ++p) {
      const uint16_t *sp = s[p] + b;
      for (size_t i = 0; i < m; ++i) acc[i] += bf16_to_f32(sp[i]);
    }
    for (size_t i = 0; i < m; ++i) res[i] = f32_to_bf16(acc[i]);
    memcpy(out + b, res, m * 2);
    if (out2) memcpy(out2 + b, res, m * 2);
  }
}

SHM_CLONES
static void reduce_f16(half_t *out, half_t *out2, const half_t *const *s, int ns, size_t n) {
  float acc[BLOCK];
  half_t res[BLOCK];
  for (size_t b = 0; b < n; b += BLOCK) {
    size_t m = n - b < BLOCK ? n - b : BLOCK;
    const half_t *s0 = s[0] + b;
    for (size_t i = 0; i < m; ++i) acc[i] = f16_to_f32(s0[i]);
    for (int p = 1; p < ns; ++p) {
      const half_t *sp = s[p] + b;
      for (size_t i = 0; i < m; ++i) acc[i] += f16_to_f32(sp[i]);
    }
    for (size_t i = 0; i < m; ++i) res[i] = f32_to_f16(acc[i]);
    memcpy(out + b, res, m * 2);
    if (out2) memcpy(out2 + b, res, m * 2);
  }
}

void shm_reduce(int dtype, void *out, void *out2, const void *const *srcs, int nsrc, size_t n) {
  if (n == 0) return;
  switch (dtype) {
    case SHM_F32:
      reduce_f32((float *)out, (float *)out2, (const float *const *)srcs, nsrc, n);
      break;
    case SHM_BF16:
      reduce_bf16((uint16_t *)out, (uint16_t *)out2, (const uint16_t *const *)srcs, nsrc, n);
      break;
    case SHM_F16:
      reduce_f16((half_t *)out, (half_t *)out2, (const half_t *const *)srcs, nsrc, n);
      break;
    default:
      break;
  }
}

void shm_src_copy(const shm_src *s, uint64_t off, uint64_t len, char *dst) {
  if (len == 0) return;
  if (off < s->head_bytes) {
    const uint64_t take = s->head_bytes - off < len ? s->head_bytes - off : len;
    memcpy(dst, s->head + off, take);
    dst += take;
    len -= take;
    off += take;
    if (len == 0) return;
  }
  off -= s->head_bytes;
  if (!s->idx) {
    memcpy(dst, s->ptr + off, len);
    return;
  }
  const uint64_t rb = s->row_bytes;
  uint64_t row = off / rb, within = off % rb;
  while (len) {
    uint64_t take = rb - within < len ? rb - within : len;
    memcpy(dst, s->ptr + (uint64_t)s->idx[row] * rb + within, take);
    dst += take;
    len -= take;
    within = 0;
    ++row;
  }
}

/* ---- weighted segment sums (the shm manager's combine) ---- */

#define HBLOCK 1024 /* hidden elements per fp32 accumulator block (stays in L1) */

SHM_CLONES
static void segsum_f32(float *out, uint64_t nseg, const int64_t *offsets, const int64_t *rows,
                       const float *w, const float *src, uint64_t hidden) {
  float acc[HBLOCK];
  for (uint64_t j = 0; j < nseg; ++j) {
    for (uint64_t h0 = 0; h0 < hidden; h0 += HBLOCK) {
      const uint64_t m = hidden - h0 < HBLOCK ? hidden - h0 : HBLOCK;
      for (uint64_t i = 0; i < m; ++i) acc[i] = 0.0f;
      for (int64_t t = offsets[j]; t < offsets[j + 1]; ++t) {
        const float wt = w ? w[t] : 1.0f;
        const float *s = src + (uint64_t)rows[t] * hidden + h0;
        for (uint64_t i = 0; i < m; ++i) acc[i] += wt * s[i];
      }
      memcpy(out + j * hidden + h0, acc, m * sizeof(float));
    }
  }
}

SHM_CLONES
static void segsum_bf16(uint16_t *out, uint64_t nseg, const int64_t *offsets, const int64_t *rows,
                        const float *w, const uint16_t *src, uint64_t hidden) {
  float acc[HBLOCK];
  for (uint64_t j = 0; j < nseg; ++j) {
    for (uint64_t h0 = 0; h0 < hidden; h0 += HBLOCK) {
      const uint64_t m = hidden - h0 < HBLOCK ? hidden - h0 : HBLOCK;
      for (uint64_t i = 0; i < m; ++i) acc[i] = 0.0f;
      for (int64_t t = offsets[j]; t < offsets[j + 1]; ++t) {
        const float wt = w ? w[t] : 1.0f;
        const uint16_t *s = src + (uint64_t)rows[t] * hidden + h0;
        for (uint64_t i = 0; i < m; ++i) acc[i] += wt * bf16_to_f32(s[i]);
      }
      uint16_t *o = out + j * hidden + h0;
      for (uint64_t i = 0; i < m; ++i) o[i] = f32_to_bf16(acc[i]);
    }
  }
}

SHM_CLONES
static void segsum_f16(half_t *out, uint64_t nseg, const int64_t *offsets, const int64_t *rows,
                       const float *w, const half_t *src, uint64_t hidden) {
  float acc[HBLOCK];
  for (uint64_t j = 0; j < nseg; ++j) {
    for (uint64_t h0 = 0; h0 < hidden; h0 += HBLOCK) {
      const uint64_t m = hidden - h0 < HBLOCK ? hidden - h0 : HBLOCK;
      for (uint64_t i = 0; i < m; ++i) acc[i] = 0.0f;
      for (int64_t t = offsets[j]; t < offsets[j + 1]; ++t) {
        const float wt = w ? w[t] : 1.0f;
        const half_t *s = src + (uint64_t)rows[t] * hidden + h0;
        for (uint64_t i = 0; i < m; ++i) acc[i] += wt * f16_to_f32(s[i]);
      }
      half_t *o = out + j * hidden + h0;
      for (uint64_t i = 0; i < m; ++i) o[i] = f32_to_f16(acc[i]);
    }
  }
}

int shm_segment_sum(int dtype, void *out, uint64_t nseg, const int64_t *offsets,
                    const int64_t *rows, const float *weights, const void *src, uint64_t hidden) {
  switch (dtype) {
    case SHM_F32:
      segsum_f32((float *)out, nseg, offsets, rows, weights, (const float *)src, hidden);
      return 0;
    case SHM_BF16:
      segsum_bf16((uint16_t *)out, nseg, offsets, rows, weights, (const uint16_t *)src, hidden);
      return 0;
    case SHM_F16:
      segsum_f16((half_t *)out, nseg, offsets, rows, weights, (const half_t *)src, hidden);
      return 0;
    default:
      return -1;
  }
}
