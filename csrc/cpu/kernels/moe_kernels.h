/*
 * moe_ep native CPU kernels: the local (communication-free) steps of dispatch and combine.
 *
 *   routing.c      moe_plan_dispatch   routing -> rows per destination, send order, per-row local
 *                                      ids and weights, token -> row map (validates the ids)
 *                  moe_packed_layout   TOKEN rows -> EXPERT_PACKED order + the combine's CSR
 *                  moe_count_experts   tokens per local expert of TOKEN rows
 *   reduce.c       moe_segment_sum     out[j] = sum_t w[t] src[rows[t]] over CSR segments
 *                  moe_gather_sum      out[n] = sum_d base_d[rows[n, d]] (the combine's last step)
 *                  moe_gather_rows     out[i] = src[rows[i]] (bytes)
 *   gemm.c         moe_linear_nt       out = x @ w^T in fp32 for few rows of x (an expert's
 *                                      share of a small batch)
 *                  moe_linear_nt_bf16  the same in bf16 (fp32 sums, w widened as it is read)
 *
 * Every kernel validates the indices it dereferences before it writes anything and returns a
 * negative code with the offending position instead of reading out of bounds. Loaded with
 * ctypes by moe_ep/kernels/native.py (the one loader); each function has a pure-torch twin in
 * moe_ep/managers/planning.py or moe_ep/managers/expert_ops.py that tests compare it with.
 */
#ifndef MOE_EP_KERNELS_H
#define MOE_EP_KERNELS_H

#include <stdint.h>

#define MOE_KERNELS_ABI 4u
#define MOE_API __attribute__((visibility("default")))

enum {
  MOE_OK = 0,
  MOE_ERR_RANGE = -1,  /* an expert id outside [-1, num_experts): bad[0] token, bad[1] slot */
  MOE_ERR_REPEAT = -2, /* a token routed to one expert twice: bad[0] token, bad[1] slot */
  MOE_ERR_BOUNDS = -3, /* a row / offset index outside its tensor: bad[0] position */
  MOE_ERR_DTYPE = -4,  /* unsupported dtype code */
  MOE_ERR_NOMEM = -5,
};

MOE_API uint32_t moe_kernels_abi(void);

/* ids [n, k] int64 (-1 = none), weights [n, k] f32, owner/local [E]: owner rank and local index
 * of each expert. Outputs (caller-sized, S <= n * min(k, world) rows):
 *   send_counts [world]    rows for each destination (tokens with >= 1 expert there)
 *   send_token [S]         token of each row, destination-major, tokens ascending
 *   row_ids [S, k] int64   local expert of slot j when it lives on the row's destination, else -1
 *   row_weights [S, k] f32 its router weight, 0 where row_ids is -1
 *   token_rows [n, world]  row of token t inside destination d's chunk, -1 when none
 * The arguments come in a struct: a planner keeps one per set of buffers and sets only ids,
 * weights and n per call (ctypes converts each scalar argument at ~0.3 us, which a decode
 * step would pay a dozen times).
 * Returns MOE_OK, MOE_ERR_RANGE or MOE_ERR_REPEAT (bad = {token, slot}). */
typedef struct {
  const int64_t *ids;
  const float *weights;
  int64_t n, k;
  const int64_t *owner, *local;
  int64_t num_experts, world;
  int64_t *send_counts, *send_token, *row_ids;
  float *row_weights;
  int64_t *token_rows, *bad;
} moe_plan_args;

MOE_API int moe_plan_dispatch(const moe_plan_args *a);

/* TOKEN rows (row_ids [m, k], -1 = not here; row_weights [m, k]) -> EXPERT_PACKED:
 *   tokens_per_expert [num_local]; packed_row / packed_local / packed_weight [R]: the rows
 *   grouped by local expert, rows ascending within one; row_offsets [m + 1], row_order [R],
 *   row_weight [R]: CSR by row of the packed positions (the combine's weighted partial sums).
 * *num_pairs receives R. Returns MOE_OK or MOE_ERR_BOUNDS (bad[0] = flat position). */
MOE_API int moe_packed_layout(const int64_t *row_ids, const float *row_weights, int64_t m,
                              int64_t k, int64_t num_local, int64_t *tokens_per_expert,
                              int64_t *packed_row, int64_t *packed_local, float *packed_weight,
                              int64_t *row_offsets, int64_t *row_order, float *row_weight,
                              int64_t *num_pairs, int64_t *bad);

MOE_API int moe_count_experts(const int64_t *row_ids, int64_t m, int64_t k, int64_t num_local,
                              int64_t *tokens_per_expert, int64_t *bad);

/* out[j * out_stride ...] = sum_{t in [offsets[j], offsets[j+1])} w[t] * src[rows[t]] (w NULL = 1),
 * rows of `hidden` elements, accumulated in fp32 (fp64 for fp64) in t order, rounded once.
 * offsets must be non-decreasing within [0, num_rows]; rows in [0, src_rows). */
MOE_API int moe_segment_sum(int dtype, void *out, uint64_t out_stride, uint64_t nseg,
                            const int64_t *offsets, const int64_t *rows, uint64_t num_rows,
                            const float *weights, const void *src, uint64_t src_rows,
                            uint64_t hidden, int64_t *bad);

/* out[i] = sum over d < nsrc with rows[i * nsrc + d] >= 0 of bases[d][rows[i * nsrc + d]],
 * in source order, accumulated like moe_segment_sum (0 when no source holds the row);
 * rows[.] < src_rows[d]. The combine's final sum over the ranks a token went to. Arguments
 * in a struct, as for moe_plan_dispatch (the planner's sum runs once per combine). */
typedef struct {
  int64_t dtype;
  void *out;
  uint64_t n;
  int64_t nsrc;
  const void *const *bases;
  const int64_t *src_rows, *rows;
  uint64_t hidden;
  int64_t *bad;
} moe_gather_args;

MOE_API int moe_gather_sum(const moe_gather_args *a);

/* out [m, n] = x [m, k] @ w [n, k]^T, fp32, all row-major and contiguous (the caller checks
 * shapes). MOE_ERR_DTYPE when this CPU lacks AVX2 + FMA (use another kernel then). */
MOE_API int moe_linear_nt(float *out, const float *x, const float *w, uint64_t m, uint64_t n,
                          uint64_t k);
/* The same in bf16 (x, w, out; fp32 sums, one rounding per output); MOE_ERR_NOMEM when the
 * fp32 copy of x cannot be allocated. */
MOE_API int moe_linear_nt_bf16(uint16_t *out, const uint16_t *x, const uint16_t *w, uint64_t m,
                               uint64_t n, uint64_t k);

/* out[i] = src[rows[i]] for i < n, rows of row_bytes bytes; rows in [0, src_rows). */
MOE_API int moe_gather_rows(void *out, const void *src, const int64_t *rows, uint64_t n,
                            uint64_t src_rows, uint64_t row_bytes, int64_t *bad);

#endif /* MOE_EP_KERNELS_H */
