/*
 * Data kernels: fp32-accumulating sums over W shared buffers (fp32 / bf16 / fp16), and copies
 * out of contiguous or row-indexed sources. Hot loops are compiled for several x86-64 levels
 * and picked at load time (target_clones), so a built wheel runs on any x86-64 CPU and still
 * uses AVX2 / AVX-512 where present.
 */
#include <string.h>

#include "dtype.h"
#include "shm.h"

#define SHM_CLONES MOE_CLONES

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

/* out[i] = sum_p srcs[p][i], accumulated in fp32 in rank order, rounded once; out2 gets a copy.
 * One body per dtype through MOE_LOAD_* / MOE_STORE_* (dtype.h). */
#define DEFINE_REDUCE(SUF, T)                                                                  \
  SHM_CLONES static void reduce_##SUF(T *out, T *out2, const T *const *s, int ns, size_t n) {  \
    float acc[BLOCK];                                                                          \
    for (size_t b = 0; b < n; b += BLOCK) {                                                    \
      const size_t m = n - b < BLOCK ? n - b : BLOCK;                                          \
      for (size_t i = 0; i < m; ++i) acc[i] = MOE_LOAD_##SUF(s[0] + b, i);                     \
      for (int p = 1; p < ns; ++p)                                                             \
        for (size_t i = 0; i < m; ++i) acc[i] += MOE_LOAD_##SUF(s[p] + b, i);                  \
      for (size_t i = 0; i < m; ++i) MOE_STORE_##SUF(out + b, i, acc[i]);                      \
      if (out2) memcpy(out2 + b, out + b, m * sizeof(T));                                      \
    }                                                                                          \
  }

DEFINE_REDUCE(F32, float)
DEFINE_REDUCE(BF16, uint16_t)
DEFINE_REDUCE(F16, moe_half)

void shm_reduce(int dtype, void *out, void *out2, const void *const *srcs, int nsrc, size_t n) {
  if (n == 0) return;
  switch (dtype) {
    case SHM_F32:
      reduce_F32((float *)out, (float *)out2, (const float *const *)srcs, nsrc, n);
      break;
    case SHM_BF16:
      reduce_BF16((uint16_t *)out, (uint16_t *)out2, (const uint16_t *const *)srcs, nsrc, n);
      break;
    case SHM_F16:
      reduce_F16((moe_half *)out, (moe_half *)out2, (const moe_half *const *)srcs, nsrc, n);
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
