/*
 * moe_ep CUDA IPC custom all-reduce: the C ABI (loaded with ctypes by
 * moe_ep/distributed/custom_all_reduce.py). The seven operations carry vLLM's names:
 * init_custom_ar, register_buffer, get_graph_buffer_ipc_meta, register_graph_buffers,
 * all_reduce, allocate_shared_buffer_and_handle, open_mem_handle. Kernels and the barrier are in
 * custom_all_reduce.cuh. Every function returns 0 on success and -1 with a message for
 * car_last_error() on failure (no exceptions cross the C boundary).
 *
 * Pointers cross the boundary as int64. IPC handles are CUDA_IPC_HANDLE_SIZE (64) bytes.
 * Graph mode: inputs met during a stream capture are recorded (their RankData slot is reserved
 * then, filled by register_graph_buffers after the capture, before any replay).
 */
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <map>
#include <vector>

#include "custom_all_reduce.cuh"

using namespace moe_ep_car;

#define CAR_API extern "C" __attribute__((visibility("default")))

static thread_local char g_err[512];

static int fail(const char *what, cudaError_t e) {
  snprintf(g_err, sizeof g_err, "%s: %s", what, cudaGetErrorString(e));
  return -1;
}
static int fail_msg(const char *msg) {
  snprintf(g_err, sizeof g_err, "%s", msg);
  return -1;
}
#define CUDA_TRY(call)                                   \
  do {                                                   \
    cudaError_t e_ = (call);                             \
    if (e_ != cudaSuccess) return fail(#call, e_);       \
  } while (0)

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

namespace {

struct CustomAr {
  int rank = 0, world = 0;
  bool fully_connected = true;
  RankSignals sg{};
  Signal *self_sg = nullptr;
  RankData *d_rank_data = nullptr; /* device array of RankData slots */
  size_t rank_data_slots = 0, used_slots = 0;
  std::map<uintptr_t, RankData *> buffers;      /* my buffer address -> its slot */
  std::vector<uintptr_t> graph_unregistered;    /* inputs recorded during capture */
  std::vector<void *> opened;                   /* peers' graph buffers opened here */
};

int next_slot(CustomAr *c, RankData **slot) {
  if (c->used_slots >= c->rank_data_slots)
    return fail_msg("custom all-reduce: out of RankData slots (rank_data buffer too small)");
  *slot = c->d_rank_data + c->used_slots++;
  return 0;
}

template <typename T>
int launch(CustomAr *c, RankData *ptrs, T *out, int64_t numel, cudaStream_t stream) {
  constexpr int N = Packed<T>::N;
  if (numel % N) return fail_msg("custom all-reduce: size must be a multiple of 16 bytes");
  const int64_t packs64 = numel / N;
  if (packs64 > INT32_MAX) return fail_msg("custom all-reduce: tensor too large");
  const int packs = (int)packs64;
  int blocks = (packs + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  const int64_t bytes = numel * (int64_t)sizeof(T);
#define CAR_CASE(W)                                                                           \
  case W:                                                                                     \
    if (W == 2 || (W <= 4 && bytes < 512 * 1024) || (W <= 8 && bytes < 256 * 1024) ||         \
        !c->fully_connected)                                                                  \
      one_shot_all_reduce<T, W>                                                               \
          <<<blocks, kThreads, 0, stream>>>(ptrs, c->sg, c->self_sg, out, c->rank, packs);    \
    else                                                                                      \
      two_shot_all_reduce<T, W>                                                               \
          <<<blocks, kThreads, 0, stream>>>(ptrs, c->sg, c->self_sg, out, c->rank, packs);    \
    break;
  switch (c->world) {
    CAR_CASE(2)
    CAR_CASE(4)
    CAR_CASE(6)
    CAR_CASE(8)
    default:
      return fail_msg("custom all-reduce: world size must be 2, 4, 6 or 8");
  }
#undef CAR_CASE
  CUDA_TRY(cudaGetLastError());
  return 0;
}

}  // namespace

CAR_API const char *car_last_error(void) { return g_err; }
CAR_API int64_t meta_size(void) { return (int64_t)sizeof(Signal); }

/* Allocate `size` zeroed device bytes and their IPC handle (64 bytes into handle_out). */
CAR_API int allocate_shared_buffer_and_handle(int64_t size, int64_t *ptr_out, char *handle_out) {
  void *p = nullptr;
  CUDA_TRY(cudaMalloc(&p, (size_t)size));
  cudaError_t e = cudaMemset(p, 0, (size_t)size);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  cudaIpcMemHandle_t h;
  if (e == cudaSuccess) e = cudaIpcGetMemHandle(&h, p);
  if (e != cudaSuccess) {
    cudaFree(p);
    return fail("allocate_shared_buffer_and_handle", e);
  }
  memcpy(handle_out, &h, sizeof h);
  *ptr_out = (int64_t)(uintptr_t)p;
  return 0;
}

/* Map a peer's buffer from its 64-byte IPC handle. */
CAR_API int open_mem_handle(const char *handle, int64_t *ptr_out) {
  cudaIpcMemHandle_t h;
  memcpy(&h, handle, sizeof h);
  void *p = nullptr;
  CUDA_TRY(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
  *ptr_out = (int64_t)(uintptr_t)p;
  return 0;
}

CAR_API int close_mem_handle(int64_t ptr) {
  CUDA_TRY(cudaIpcCloseMemHandle((void *)(uintptr_t)ptr));
  return 0;
}

CAR_API int free_shared_buffer(int64_t ptr) {
  CUDA_TRY(cudaFree((void *)(uintptr_t)ptr));
  return 0;
}

/* signals[r]: rank r's meta buffer as mapped here; rank_data: device scratch for RankData. */
CAR_API int init_custom_ar(const int64_t *signals, int world, int64_t rank_data,
                           int64_t rank_data_bytes, int rank, int fully_connected,
                           int64_t *fa_out) {
  if (world < 2 || world > kMaxRanks || world % 2)
    return fail_msg("init_custom_ar: world size must be 2, 4, 6 or 8");
  if (rank < 0 || rank >= world) return fail_msg("init_custom_ar: rank out of range");
  CustomAr *c = new CustomAr();
  c->rank = rank;
  c->world = world;
  c->fully_connected = fully_connected != 0;
  for (int r = 0; r < world; ++r) c->sg.signals[r] = (Signal *)(uintptr_t)signals[r];
  c->self_sg = c->sg.signals[rank];
  c->d_rank_data = (RankData *)(uintptr_t)rank_data;
  c->rank_data_slots = (size_t)rank_data_bytes / sizeof(RankData);
  *fa_out = (int64_t)(uintptr_t)c;
  return 0;
}

CAR_API void dispose(int64_t fa) {
  CustomAr *c = (CustomAr *)(uintptr_t)fa;
  if (!c) return;
  for (void *p : c->opened) cudaIpcCloseMemHandle(p);
  delete c;
}

/* ptrs[r]: rank r's buffer as mapped here (ptrs[rank] is mine). */
CAR_API int register_buffer(int64_t fa, const int64_t *ptrs) {
  CustomAr *c = (CustomAr *)(uintptr_t)fa;
  RankData host{};
  for (int r = 0; r < c->world; ++r) host.ptrs[r] = (const void *)(uintptr_t)ptrs[r];
  RankData *slot;
  if (next_slot(c, &slot)) return -1;
  CUDA_TRY(cudaMemcpy(slot, &host, sizeof host, cudaMemcpyHostToDevice));
  c->buffers[(uintptr_t)ptrs[c->rank]] = slot;
  return 0;
}

CAR_API int64_t graph_buffer_count(int64_t fa) {
  return (int64_t)((CustomAr *)(uintptr_t)fa)->graph_unregistered.size();
}

/* For each input recorded during capture: its allocation's IPC handle (64 bytes each, into
 * handles) and its offset in that allocation (into offsets). Room for graph_buffer_count. */
CAR_API int get_graph_buffer_ipc_meta(int64_t fa, char *handles, int64_t *offsets) {
  CustomAr *c = (CustomAr *)(uintptr_t)fa;
  void *entry = nullptr;
  cudaDriverEntryPointQueryResult q;
  CUDA_TRY(cudaGetDriverEntryPointByVersion("cuPointerGetAttribute", &entry, 12000,
                                            cudaEnableDefault, &q));
  if (!entry || q != cudaDriverEntryPointSuccess)
    return fail_msg("get_graph_buffer_ipc_meta: cuPointerGetAttribute unavailable");
  auto get_attr = (CUresult(*)(void *, CUpointer_attribute, CUdeviceptr))entry;
  for (size_t i = 0; i < c->graph_unregistered.size(); ++i) {
    const uintptr_t p = c->graph_unregistered[i];
    CUdeviceptr base = 0;
    if (get_attr(&base, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, (CUdeviceptr)p) != CUDA_SUCCESS)
      return fail_msg("get_graph_buffer_ipc_meta: cannot find the allocation of an input");
    cudaIpcMemHandle_t h;
    CUDA_TRY(cudaIpcGetMemHandle(&h, (void *)base));
    memcpy(handles + i * sizeof h, &h, sizeof h);
    offsets[i] = (int64_t)(p - (uintptr_t)base);
  }
  return 0;
}

/* handles: [world][n] 64-byte handles, offsets: [world][n] (every rank's meta, rank order). */
CAR_API int register_graph_buffers(int64_t fa, const char *handles, const int64_t *offsets,
                                   int64_t n) {
  CustomAr *c = (CustomAr *)(uintptr_t)fa;
  if ((size_t)n != c->graph_unregistered.size())
    return fail_msg("register_graph_buffers: count differs from the inputs recorded here");
  std::vector<RankData> host(n);
  for (int64_t i = 0; i < n; ++i) {
    for (int r = 0; r < c->world; ++r) {
      if (r == c->rank) {
        host[i].ptrs[r] = (const void *)c->graph_unregistered[i];
        continue;
      }
      cudaIpcMemHandle_t h;
      memcpy(&h, handles + ((size_t)r * n + i) * sizeof h, sizeof h);
      void *base = nullptr;
      CUDA_TRY(cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess));
      c->opened.push_back(base);
      host[i].ptrs[r] = (const char *)base + offsets[(size_t)r * n + i];
    }
  }
  /* The slots were reserved, in order, when the inputs were recorded. */
  RankData *first = c->d_rank_data + (c->used_slots - (size_t)n);
  if (n) CUDA_TRY(cudaMemcpy(first, host.data(), sizeof(RankData) * n, cudaMemcpyHostToDevice));
  for (int64_t i = 0; i < n; ++i) c->buffers[c->graph_unregistered[i]] = first + i;
  c->graph_unregistered.clear();
  return 0;
}

/* out = sum over ranks of inp (numel elements of dtype). With reg_buffer (a registered
 * buffer of reg_bytes), inp is first copied into it (eager mode); otherwise inp itself must be
 * registered, or be recorded now because `stream` is capturing a graph. */
CAR_API int all_reduce(int64_t fa, int64_t inp, int64_t out, int64_t numel, int dtype,
                       int64_t reg_buffer, int64_t reg_bytes, int64_t stream_handle) {
  CustomAr *c = (CustomAr *)(uintptr_t)fa;
  cudaStream_t stream = (cudaStream_t)(uintptr_t)stream_handle;
  const int64_t es = dtype == DT_F32 ? 4 : 2;
  if (dtype < DT_F32 || dtype > DT_BF16) return fail_msg("all_reduce: dtype must be f32/f16/bf16");
  const int64_t bytes = numel * es;
  RankData *ptrs = nullptr;
  if (reg_buffer) {
    if (bytes > reg_bytes) return fail_msg("all_reduce: input larger than the staging buffer");
    auto it = c->buffers.find((uintptr_t)reg_buffer);
    if (it == c->buffers.end()) return fail_msg("all_reduce: staging buffer not registered");
    CUDA_TRY(cudaMemcpyAsync((void *)(uintptr_t)reg_buffer, (const void *)(uintptr_t)inp,
                             (size_t)bytes, cudaMemcpyDeviceToDevice, stream));
    ptrs = it->second;
  } else {
    auto it = c->buffers.find((uintptr_t)inp);
    if (it != c->buffers.end()) {
      ptrs = it->second;
    } else {
      cudaStreamCaptureStatus st;
      CUDA_TRY(cudaStreamIsCapturing(stream, &st));
      if (st != cudaStreamCaptureStatusActive)
        return fail_msg("all_reduce: input is not registered and the stream is not capturing");
      if (next_slot(c, &ptrs)) return -1;
      c->graph_unregistered.push_back((uintptr_t)inp);
    }
  }
  void *o = (void *)(uintptr_t)out;
  switch (dtype) {
    case DT_F32: return launch<float>(c, ptrs, (float *)o, numel, stream);
    case DT_F16: return launch<half>(c, ptrs, (half *)o, numel, stream);
    default: return launch<nv_bfloat16>(c, ptrs, (nv_bfloat16 *)o, numel, stream);
  }
}
