/*
 * Routing bookkeeping of dispatch and combine in linear passes (counting sorts), so that a
 * dispatch does not pay for dozens of small tensor operations. The pure-torch twins live in
 * moe_ep/managers/planning.py; tests compare the two on random routings.
 */
#include <stdlib.h>
#include <string.h>

#include "moe_kernels.h"

uint32_t moe_kernels_abi(void) { return MOE_KERNELS_ABI; }

int moe_plan_dispatch(const moe_plan_args *a) {
  const int64_t *ids = a->ids, *owner = a->owner, *local = a->local;
  const float *weights = a->weights;
  const int64_t n = a->n, k = a->k, num_experts = a->num_experts, world = a->world;
  int64_t *send_counts = a->send_counts, *send_token = a->send_token, *row_ids = a->row_ids;
  int64_t *token_rows = a->token_rows, *bad = a->bad;
  float *row_weights = a->row_weights;
  /* Pass 1: validate, count rows per destination, note each token's row in each chunk. */
  for (int64_t d = 0; d < world; ++d) send_counts[d] = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t *it = ids + t * k;
    int64_t *tr = token_rows + t * world;
    for (int64_t d = 0; d < world; ++d) tr[d] = -1;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = it[j];
      if (e < -1 || e >= num_experts) {
        bad[0] = t;
        bad[1] = j;
        return MOE_ERR_RANGE;
      }
      if (e < 0) continue;
      for (int64_t i = 0; i < j; ++i) {
        if (it[i] == e) {
          bad[0] = t;
          bad[1] = j;
          return MOE_ERR_REPEAT;
        }
      }
      const int64_t d = owner[e];
      if (tr[d] < 0) tr[d] = send_counts[d]++;
    }
  }
  /* Pass 2: rows in destination-major, token-ascending order with their slot metadata. */
  int64_t start[world > 0 ? world : 1];
  int64_t acc = 0;
  for (int64_t d = 0; d < world; ++d) {
    start[d] = acc;
    acc += send_counts[d];
  }
  for (int64_t s = 0; s < acc; ++s) {
    for (int64_t j = 0; j < k; ++j) {
      row_ids[s * k + j] = -1;
      row_weights[s * k + j] = 0.0f;
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    const int64_t *tr = token_rows + t * world;
    for (int64_t d = 0; d < world; ++d)
      if (tr[d] >= 0) send_token[start[d] + tr[d]] = t;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = ids[t * k + j];
      if (e < 0) continue;
      const int64_t d = owner[e];
      const int64_t s = start[d] + tr[d];
      row_ids[s * k + j] = local[e];
      row_weights[s * k + j] = weights[t * k + j];
    }
  }
  return MOE_OK;
}

int moe_count_experts(const int64_t *row_ids, int64_t m, int64_t k, int64_t num_local,
                      int64_t *tokens_per_expert, int64_t *bad) {
  for (int64_t e = 0; e < num_local; ++e) tokens_per_expert[e] = 0;
  for (int64_t i = 0; i < m * k; ++i) {
    const int64_t e = row_ids[i];
    if (e < -1 || e >= num_local) {
      bad[0] = i;
      return MOE_ERR_BOUNDS;
    }
    if (e >= 0) tokens_per_expert[e] += 1;
  }
  return MOE_OK;
}

int moe_packed_layout(const int64_t *row_ids, const float *row_weights, int64_t m, int64_t k,
                      int64_t num_local, int64_t *tokens_per_expert, int64_t *packed_row,
                      int64_t *packed_local, float *packed_weight, int64_t *row_offsets,
                      int64_t *row_order, float *row_weight, int64_t *num_pairs, int64_t *bad) {
  int rc = moe_count_experts(row_ids, m, k, num_local, tokens_per_expert, bad);
  if (rc) return rc;
  int64_t *fill = malloc(sizeof(int64_t) * (size_t)(num_local > 0 ? num_local : 1));
  if (!fill) return MOE_ERR_NOMEM;
  int64_t total = 0;
  for (int64_t e = 0; e < num_local; ++e) {
    fill[e] = total;
    total += tokens_per_expert[e];
  }
  /* Rows are visited in order, so each expert's segment comes out sorted by row (stable). */
  row_offsets[0] = 0;
  for (int64_t r = 0, q = 0; r < m; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = row_ids[r * k + j];
      if (e < 0) continue;
      const int64_t p = fill[e]++;
      packed_row[p] = r;
      packed_local[p] = e;
      packed_weight[p] = row_weights[r * k + j];
      row_order[q] = p;
      row_weight[q] = row_weights[r * k + j];
      ++q;
    }
    row_offsets[r + 1] = 0; /* filled below */
  }
  /* CSR by row: slots of row r in slot order (j ascending) = the q order above. */
  int64_t q = 0;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < k; ++j) q += row_ids[r * k + j] >= 0;
    row_offsets[r + 1] = q;
  }
  *num_pairs = total;
  free(fill);
  return MOE_OK;
}
