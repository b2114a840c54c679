/*
 * Routing bookkeeping of the shm MoE manager, in two linear passes each (counting sorts), so
 * that a dispatch does not pay for dozens of small tensor operations:
 *
 *   shm_moe_plan    sender side: distinct (destination, token) rows, sorted by destination then
 *                   token; one routing record per valid (token, k) pair, grouped like the rows;
 *                   the CSR of the sent rows by token (for the combine's final sum).
 *   shm_moe_decode  receiver side: records of every source -> rows grouped stably by local
 *                   expert (EXPERT_PACKED order), tokens per expert, and the CSR of the packed
 *                   rows by received row (for the combine's weighted partial sums).
 *
 * A record is two int32: row_in_destination_chunk * max_local + local_expert, and the float32
 * router weight's bits. Inputs were validated in Python (ids in [-1, E), distinct per token).
 */
#include <stdlib.h>
#include <string.h>

#include "shm.h"

int shm_moe_plan(const int64_t *ids, const float *weights, int64_t n, int64_t k,
                 const int64_t *owner, const int64_t *local, int world, int64_t max_local,
                 int64_t *send_rows, int64_t *send_pairs, int64_t *send_token,
                 int32_t *records, int64_t *token_offsets, int64_t *token_order) {
  int64_t *last = malloc(sizeof(int64_t) * (size_t)world * 5);
  if (!last) return -1;
  int64_t *row_base = last + world, *pair_base = last + 2 * world;
  int64_t *row_fill = last + 3 * world, *pair_fill = last + 4 * world;
  for (int d = 0; d < world; ++d) {
    last[d] = -1;
    send_rows[d] = send_pairs[d] = 0;
  }
  /* Pass 1: counts per destination and per token. */
  token_offsets[0] = 0;
  for (int64_t t = 0; t < n; ++t) {
    int64_t distinct = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = ids[t * k + j];
      if (e < 0) continue;
      const int64_t d = owner[e];
      send_pairs[d] += 1;
      if (last[d] != t) {
        last[d] = t;
        send_rows[d] += 1;
        distinct += 1;
      }
    }
    token_offsets[t + 1] = token_offsets[t] + distinct;
  }
  int64_t rs = 0, ps = 0;
  for (int d = 0; d < world; ++d) {
    row_base[d] = rs;
    pair_base[d] = ps;
    rs += send_rows[d];
    ps += send_pairs[d];
    row_fill[d] = pair_fill[d] = 0;
    last[d] = -1;
  }
  /* Pass 2: rows and records. Tokens are visited in order, so each destination's rows come
   * out sorted by token and its records in (token, k) order. */
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = ids[t * k + j];
      if (e < 0) continue;
      const int64_t d = owner[e];
      if (last[d] != t) {
        last[d] = t;
        send_token[row_base[d] + row_fill[d]] = t;
        row_fill[d] += 1;
      }
      int32_t *rec = records + 2 * (pair_base[d] + pair_fill[d]);
      rec[0] = (int32_t)((row_fill[d] - 1) * max_local + local[e]);
      memcpy(&rec[1], &weights[t * k + j], sizeof(float));
      pair_fill[d] += 1;
    }
  }
  /* CSR by token over the sent rows: within a token, rows in destination order. */
  int64_t *fill = malloc(sizeof(int64_t) * (size_t)(n > 0 ? n : 1));
  if (!fill) {
    free(last);
    return -1;
  }
  memset(fill, 0, sizeof(int64_t) * (size_t)(n > 0 ? n : 1));
  for (int64_t i = 0; i < rs; ++i) {
    const int64_t t = send_token[i];
    token_order[token_offsets[t] + fill[t]] = i;
    fill[t] += 1;
  }
  free(fill);
  free(last);
  return 0;
}

int shm_moe_decode(const int32_t *records, const int64_t *pairs_per_src,
                   const int64_t *rows_per_src, int world, int64_t max_local, int64_t num_local,
                   int64_t *packed_row, float *packed_weight, int64_t *packed_local,
                   int64_t *tokens_per_expert, int64_t *row_offsets, int64_t *row_order,
                   float *row_weights) {
  int64_t total_pairs = 0, total_rows = 0;
  for (int s = 0; s < world; ++s) {
    total_pairs += pairs_per_src[s];
    total_rows += rows_per_src[s];
  }
  int64_t *start = malloc(sizeof(int64_t) * (size_t)(num_local + 1 + total_rows + 1));
  if (!start) return -1;
  int64_t *row_fill = start + num_local + 1;
  for (int64_t e = 0; e < num_local; ++e) tokens_per_expert[e] = 0;
  for (int64_t i = 0; i < total_pairs; ++i) {
    const int64_t loc = (int64_t)records[2 * i] % max_local;
    if (loc < 0 || loc >= num_local) {
      free(start);
      return -2; /* a record for an expert this rank does not own: corrupt input */
    }
    tokens_per_expert[loc] += 1;
  }
  start[0] = 0;
  for (int64_t e = 0; e < num_local; ++e) start[e + 1] = start[e] + tokens_per_expert[e];
  /* Stable counting sort by local expert; records are in (source, token, k) order. */
  for (int64_t i = 0, s = 0, seen = 0, row0 = 0; i < total_pairs; ++i) {
    while (i - seen >= pairs_per_src[s]) {
      seen += pairs_per_src[s];
      row0 += rows_per_src[s];
      ++s;
    }
    const int64_t code = (int64_t)records[2 * i];
    const int64_t loc = code % max_local, row = row0 + code / max_local;
    if (row < row0 || row >= row0 + rows_per_src[s]) {
      free(start);
      return -2;
    }
    const int64_t p = start[loc]++;
    packed_row[p] = row;
    packed_local[p] = loc;
    memcpy(&packed_weight[p], &records[2 * i + 1], sizeof(float));
  }
  /* CSR of the packed rows by received row (packed order within a row). */
  for (int64_t j = 0; j <= total_rows; ++j) row_offsets[j] = 0;
  for (int64_t p = 0; p < total_pairs; ++p) row_offsets[packed_row[p] + 1] += 1;
  for (int64_t j = 0; j < total_rows; ++j) {
    row_offsets[j + 1] += row_offsets[j];
    row_fill[j] = row_offsets[j];
  }
  for (int64_t p = 0; p < total_pairs; ++p) {
    const int64_t q = row_fill[packed_row[p]]++;
    row_order[q] = p;
    row_weights[q] = packed_weight[p];
  }
  free(start);
  return 0;
}
