/*
 * Element load / store helpers shared by the native CPU libraries (the shared-memory transport
 * and the MoE kernels): every floating dtype is read into an accumulator type and written back
 * with one rounding, so a kernel is written once per accumulator instead of once per dtype.
 *
 * bf16 rounds to nearest even and maps NaN to the canonical quiet NaN, as torch does; fp16 uses
 * the compiler's _Float16 where it exists and a portable IEEE binary16 conversion otherwise.
 */
#ifndef MOE_EP_DTYPE_H
#define MOE_EP_DTYPE_H

#include <stdint.h>

typedef union {
  uint32_t u;
  float f;
} moe_f32bits;

static inline float moe_bf16_to_f32(uint16_t v) {
  moe_f32bits b = {.u = (uint32_t)v << 16};
  return b.f;
}

static inline uint16_t moe_f32_to_bf16(float f) {
  moe_f32bits b = {.f = f};
  /* Branch-free (a select, not a jump), so that loops over it vectorise. */
  const uint32_t rounded = (b.u + 0x7fffu + ((b.u >> 16) & 1u)) >> 16;
  return (uint16_t)(((b.u & 0x7fffffffu) > 0x7f800000u) ? 0x7fc0u : rounded);
}

#if defined(__FLT16_MAX__)
typedef _Float16 moe_half;
static inline float moe_f16_to_f32(moe_half v) { return (float)v; }
static inline moe_half moe_f32_to_f16(float f) { return (moe_half)f; }
#else
typedef uint16_t moe_half;
static inline float moe_f16_to_f32(moe_half h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  moe_f32bits b;
  if (exp == 0) {
    b.f = (float)man * 5.9604644775390625e-8f; /* 2^-24 */
    b.u |= sign;
    return b.f;
  }
  if (exp == 31) b.u = sign | 0x7f800000u | (man << 13);
  else b.u = sign | ((exp + 112) << 23) | (man << 13);
  return b.f;
}
static inline moe_half moe_f32_to_f16(float f) {
  moe_f32bits b = {.f = f};
  uint32_t sign = (b.u >> 16) & 0x8000, a = b.u & 0x7fffffffu;
  if (a > 0x7f800000u) return (moe_half)(sign | 0x7e00);
  if (a >= 0x477ff000u) return (moe_half)(sign | 0x7c00); /* rounds to >= 65520: inf */
  if (a < 0x38800000u) {                                 /* subnormal or zero in fp16 */
    moe_f32bits t = {.u = a};
    t.f += 0.5f; /* the fp32 adder rounds to nearest even at 2^-24 granularity */
    return (moe_half)(sign | (t.u - 0x3f000000u));
  }
  uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u); /* rebias exponent, round nearest even */
  return (moe_half)(sign | (r >> 13));
}
#endif

/* Per-dtype load into the accumulator and store with one rounding (used by X-macros). */
#define MOE_LOAD_F32(p, i) (((const float *)(p))[i])
#define MOE_STORE_F32(p, i, v) (((float *)(p))[i] = (v))
#define MOE_LOAD_BF16(p, i) moe_bf16_to_f32(((const uint16_t *)(p))[i])
#define MOE_STORE_BF16(p, i, v) (((uint16_t *)(p))[i] = moe_f32_to_bf16(v))
#define MOE_LOAD_F16(p, i) moe_f16_to_f32(((const moe_half *)(p))[i])
#define MOE_STORE_F16(p, i, v) (((moe_half *)(p))[i] = moe_f32_to_f16(v))
#define MOE_LOAD_F64(p, i) (((const double *)(p))[i])
#define MOE_STORE_F64(p, i, v) (((double *)(p))[i] = (v))

/* Dtype codes shared with Python (moe_ep/kernels/native.py and the shm EP exchange). */
enum moe_dtype { MOE_F32 = 0, MOE_BF16 = 1, MOE_F16 = 2, MOE_F64 = 3 };

/* X-macro: one entry per dtype (code, suffix, accumulator type). */
#define MOE_FOR_EACH_DTYPE(X) \
  X(MOE_F32, F32, float)      \
  X(MOE_BF16, BF16, float)    \
  X(MOE_F16, F16, float)      \
  X(MOE_F64, F64, double)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
/* Hot loops are compiled for several x86-64 levels and picked at load time, so a built wheel
 * runs on any x86-64 CPU and still uses AVX2 / AVX-512 where present. */
#define MOE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOE_CLONES
#endif

#endif /* MOE_EP_DTYPE_H */
