/*
 * moe_ep CUDA IPC custom all-reduce: data structures and kernels (header-only, included by
 * custom_all_reduce.cu).
 *
 * Every rank of one node owns two IPC-shared device buffers that every peer maps:
 *
 *   meta   [Signal][tmp area of max_size bytes]    barrier flags + the two-shot scratch
 *   data   [max_size bytes]                         the eager-mode staging buffer
 *
 * A kernel reads the peers' inputs directly through their mapped pointers (RankData holds, per
 * registered input buffer, the address of that buffer in every rank's address space).
 *
 * Barrier (per block, no peer atomics: PCIe P2P lacks them): block b of rank r keeps a local
 * counter _flag[b]. To synchronise, thread t < world stores the next counter value into
 * peer t's start[b][r] (or end[b][r]) with a system-scope release store, then spins with
 * system-scope acquire loads on its own start[b][t] until peer t has stored the same value.
 * Values only grow, so a flag never needs resetting and a late store from the previous round
 * can never be mistaken for the current one. Release/acquire makes the writes before the store
 * (the staging copy, the two-shot partial sums) visible to the peer that sees the flag.
 *
 * One-shot: after the start barrier every rank sums all ranks' inputs itself, in rank order in
 * fp32 (the same bits on every rank), then an end barrier keeps every rank in the kernel until
 * all have finished reading (so nobody overwrites its staging buffer early).
 * Two-shot: rank r reduces its 1/world slice into its tmp area (the last rank also takes the
 * remainder), a release/acquire barrier, then every rank copies every slice from the peers' tmp
 * areas. Block b only ever reads what block b of the peers wrote, so per-block barriers suffice
 * (every rank launches the same grid for the same size).
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace moe_ep_car {

constexpr int kMaxBlocks = 36;
constexpr int kThreads = 512;
constexpr int kMaxRanks = 8;

struct Signal {
  alignas(128) uint32_t start[kMaxBlocks][kMaxRanks];
  alignas(128) uint32_t end[kMaxBlocks][kMaxRanks];
  alignas(128) uint32_t flag[kMaxBlocks]; /* local to the owning rank */
};

struct __align__(16) RankData {
  const void *ptrs[kMaxRanks];
};

struct __align__(16) RankSignals {
  Signal *signals[kMaxRanks];
};

/* 16 bytes of T, and an fp32 accumulator of as many elements. */
template <typename T, int N>
struct __align__(alignof(T) * N) Vec {
  T data[N];
};
template <typename T>
struct Packed {
  static constexpr int N = 16 / sizeof(T);
  using P = Vec<T, N>;
  using A = Vec<float, N>;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ half from_float<half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ nv_bfloat16 from_float<nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ void st_release_sys(uint32_t *p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%1], %0;" ::"r"(v), "l"(p) : "memory");
}
__device__ __forceinline__ uint32_t ld_acquire_sys(uint32_t *p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

/* Sum element `idx` (in packs) of every rank's buffer, in rank order, in fp32. */
template <typename T, int W>
__device__ __forceinline__ typename Packed<T>::P packed_sum(const RankData &dp, int idx) {
  using P = typename Packed<T>::P;
  using A = typename Packed<T>::A;
  constexpr int N = Packed<T>::N;
  A acc;
  const P first = reinterpret_cast<const P *>(dp.ptrs[0])[idx];
#pragma unroll
  for (int j = 0; j < N; ++j) acc.data[j] = to_float(first.data[j]);
#pragma unroll
  for (int r = 1; r < W; ++r) {
    const P v = reinterpret_cast<const P *>(dp.ptrs[r])[idx];
#pragma unroll
    for (int j = 0; j < N; ++j) acc.data[j] += to_float(v.data[j]);
  }
  P out;
#pragma unroll
  for (int j = 0; j < N; ++j) out.data[j] = from_float<T>(acc.data[j]);
  return out;
}

/* The barrier described at the top; `which` is Signal::start or Signal::end. */
template <int W>
__device__ __forceinline__ void block_barrier(const RankSignals &sg, Signal *self, int rank,
                                              bool at_start) {
  __syncthreads(); /* every thread of the block is done with what the barrier publishes */
  const uint32_t flag = self->flag[blockIdx.x] + 1;
  if (threadIdx.x < W) {
    Signal *peer = sg.signals[threadIdx.x];
    uint32_t *theirs = at_start ? &peer->start[blockIdx.x][rank] : &peer->end[blockIdx.x][rank];
    uint32_t *mine = at_start ? &self->start[blockIdx.x][threadIdx.x]
                              : &self->end[blockIdx.x][threadIdx.x];
    st_release_sys(theirs, flag);
    while (ld_acquire_sys(mine) != flag) {
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) self->flag[blockIdx.x] = flag;
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads, 1)
    one_shot_all_reduce(const RankData *dp_ptr, RankSignals sg, Signal *self, T *__restrict__ out,
                        int rank, int packs) {
  using P = typename Packed<T>::P;
  const RankData dp = *dp_ptr;
  block_barrier<W>(sg, self, rank, true);
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < packs; idx += gridDim.x * blockDim.x)
    reinterpret_cast<P *>(out)[idx] = packed_sum<T, W>(dp, idx);
  block_barrier<W>(sg, self, rank, false);
}

template <typename P>
__device__ __forceinline__ P *tmp_area(Signal *s) {
  return reinterpret_cast<P *>(s + 1);
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads, 1)
    two_shot_all_reduce(const RankData *dp_ptr, RankSignals sg, Signal *self, T *__restrict__ out,
                        int rank, int packs) {
  using P = typename Packed<T>::P;
  const int tid = blockIdx.x * blockDim.x + threadIdx.x;
  const int stride = gridDim.x * blockDim.x;
  const int part = packs / W;
  const int start = rank * part;
  const int end = rank == W - 1 ? packs : start + part;
  const int largest = part + packs % W;
  RankData dp = *dp_ptr;
  block_barrier<W>(sg, self, rank, true);
  P *mine = tmp_area<P>(sg.signals[rank]);
  for (int idx = start + tid; idx < end; idx += stride) mine[idx - start] = packed_sum<T, W>(dp, idx);
  block_barrier<W>(sg, self, rank, false);
  for (int idx = tid; idx < largest; idx += stride) {
#pragma unroll
    for (int r = 0; r < W; ++r) {
      if (idx < part || r == W - 1)
        reinterpret_cast<P *>(out)[r * part + idx] = tmp_area<P>(sg.signals[r])[idx];
    }
  }
}

}  // namespace moe_ep_car
