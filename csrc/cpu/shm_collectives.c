/*
 * Collectives over the per-rank double-buffered slots: barrier, all-reduce, reduce-scatter,
 * (all-)gather(v) and all-to-all(v). Every op runs the same number of lockstep steps on every
 * rank; the first step publishes a header so that mismatched calls fail loudly on all ranks
 * instead of corrupting data, and carries the byte counts that variable-size ops need.
 */
#include <stdio.h>
#include <string.h>

#include "shm.h"

static const char *op_name(uint32_t op) {
  switch (op) {
    case SHM_OP_BARRIER: return "barrier";
    case SHM_OP_ALLREDUCE: return "all_reduce";
    case SHM_OP_ALLREDUCE_PHASE2: return "all_reduce";
    case SHM_OP_REDUCE_SCATTER: return "reduce_scatter";
    case SHM_OP_ALL_GATHER: return "all_gather";
    case SHM_OP_GATHER: return "gather";
    case SHM_OP_ALL_TO_ALL: return "all_to_all";
    default: return "?";
  }
}

static inline char *slot(shm_handle *h, int rank, uint32_t step) {
  return h->coll + ((uint64_t)rank * 2 + (step & 1u)) * h->coll_half;
}

/* Wait until every peer has finished reading the step that last used this step's half. */
static int step_begin(shm_handle *h, const char *what) {
  if (shm_check_usable(h)) return -1;
  const uint32_t need = h->step - 1u;
  for (int p = 0; p < h->world; ++p) {
    if (p == h->rank) continue;
    if (shm_wait_ge(h, &h->ctl[p].consumed, &h->ctl[p].waiters, need, p, what)) return -1;
  }
  return 0;
}

static void step_publish(shm_handle *h, const shm_step_hdr *hd) {
  shm_rank_ctl *me = &h->ctl[h->rank];
  me->hdr[h->step & 1u] = *hd;
  shm_publish(&me->ready, &me->waiters, h->step + 1u);
}

static int step_wait_all(shm_handle *h, const char *what) {
  for (int p = 0; p < h->world; ++p) {
    if (p == h->rank) continue;
    if (shm_wait_ge(h, &h->ctl[p].ready, &h->ctl[p].waiters, h->step + 1u, p, what)) return -1;
  }
  return 0;
}

static void step_end(shm_handle *h) {
  shm_rank_ctl *me = &h->ctl[h->rank];
  shm_publish(&me->consumed, &me->waiters, h->step + 1u);
  h->step += 1u;
}

/* All peers must run the same op with compatible arguments; checked on the first step. */
static int check_headers(shm_handle *h, const shm_step_hdr *mine, int same_nbytes) {
  for (int p = 0; p < h->world; ++p) {
    if (p == h->rank) continue;
    const shm_step_hdr *o = &h->ctl[p].hdr[h->step & 1u];
    int bad = o->op != mine->op || o->dtype != mine->dtype || o->row_bytes != mine->row_bytes ||
              o->aux != mine->aux || (same_nbytes && o->nbytes != mine->nbytes);
    if (bad)
      return shm_fail(h, SHM_FAIL_ABORT,
                      "shm group '%s': collective mismatch: rank %d called %s(dtype=%u, "
                      "bytes=%llu, row_bytes=%llu, arg=%llu) but rank %d called %s(dtype=%u, "
                      "bytes=%llu, row_bytes=%llu, arg=%llu)",
                      h->name, h->rank, op_name(mine->op), mine->dtype,
                      (unsigned long long)mine->nbytes, (unsigned long long)mine->row_bytes,
                      (unsigned long long)mine->aux, p, op_name(o->op), o->dtype,
                      (unsigned long long)o->nbytes, (unsigned long long)o->row_bytes,
                      (unsigned long long)o->aux);
  }
  return 0;
}

static int check_no_pending(shm_handle *h, const char *what) {
  if (h->pend_op)
    return shm_fail(h, SHM_FAIL_ABORT,
                    "shm group '%s': %s called while %s is unfinished", h->name, what,
                    op_name((uint32_t)h->pend_op));
  return 0;
}

int shm_barrier(shm_handle *h) {
  if (check_no_pending(h, "barrier") || step_begin(h, "barrier")) return -1;
  shm_step_hdr hd = {.op = SHM_OP_BARRIER};
  step_publish(h, &hd);
  if (step_wait_all(h, "barrier") || check_headers(h, &hd, 1)) return -1;
  step_end(h);
  return 0;
}

/* Split n elements into world parts whose boundaries fall on 64-byte lines. */
static void split_range(uint64_t n, size_t es, int world, int r, uint64_t *lo, uint64_t *hi) {
  const uint64_t unit = 64 / es ? 64 / es : 1;
  const uint64_t units = (n + unit - 1) / unit;
  const uint64_t base = units / (uint64_t)world, rem = units % (uint64_t)world;
  uint64_t a = ((uint64_t)r * base + ((uint64_t)r < rem ? (uint64_t)r : rem)) * unit;
  uint64_t b = a + (base + ((uint64_t)r < rem)) * unit;
  *lo = a < n ? a : n;
  *hi = b < n ? b : n;
}

int shm_allreduce(shm_handle *h, const void *in, void *out, uint64_t numel, int dtype) {
  const size_t es = shm_dtype_size(dtype);
  if (check_no_pending(h, "all_reduce")) return -1;
  if (es == 0 || dtype == SHM_BYTES)
    return shm_fail(h, SHM_FAIL_ARG, "all_reduce: unsupported dtype code %d", dtype);
  const char *src = (const char *)in;
  char *dst = (char *)out;
  const uint64_t chunk = h->coll_half / es;
  const void *srcs[SHM_MAX_RANKS];
  uint64_t off = 0;
  int first = 1;
  do {
    const uint64_t n = numel - off < chunk ? numel - off : chunk;
    if (step_begin(h, "all_reduce")) return -1;
    memcpy(slot(h, h->rank, h->step), src + off * es, n * es);
    shm_step_hdr hd = {.op = SHM_OP_ALLREDUCE, .dtype = (uint32_t)dtype, .nbytes = numel * es,
                       .aux = numel};
    step_publish(h, &hd);
    if (step_wait_all(h, "all_reduce")) return -1;
    if (first && check_headers(h, &hd, 1)) return -1;
    first = 0;
    for (int p = 0; p < h->world; ++p) srcs[p] = slot(h, p, h->step);
    if (n * es <= h->naive_max || h->world == 1) {
      /* Small: every rank sums all slots itself (one synchronisation, rank order => identical
       * bits everywhere). */
      shm_reduce(dtype, dst + off * es, NULL, srcs, h->world, n);
      step_end(h);
    } else {
      /* Large: rank r sums its slice into its next half, then everyone copies the slices.
       * Writing the next half is safe: ready >= step + 1 of every peer implies it finished
       * reading the step that used that half before. */
      uint64_t lo, hi;
      split_range(n, es, h->world, h->rank, &lo, &hi);
      for (int p = 0; p < h->world; ++p) srcs[p] = (const char *)srcs[p] + lo * es;
      shm_reduce(dtype, dst + (off + lo) * es, slot(h, h->rank, h->step + 1u) + lo * es, srcs,
                 h->world, hi - lo);
      step_end(h);
      if (step_begin(h, "all_reduce")) return -1;
      shm_step_hdr hd2 = {.op = SHM_OP_ALLREDUCE_PHASE2, .dtype = (uint32_t)dtype,
                          .nbytes = numel * es, .aux = numel};
      step_publish(h, &hd2);
      if (step_wait_all(h, "all_reduce")) return -1;
      for (int p = 0; p < h->world; ++p) {
        if (p == h->rank) continue;
        uint64_t plo, phi;
        split_range(n, es, h->world, p, &plo, &phi);
        memcpy(dst + (off + plo) * es, slot(h, p, h->step) + plo * es, (phi - plo) * es);
      }
      step_end(h);
    }
    off += n;
  } while (off < numel);
  return 0;
}

int shm_reduce_scatter(shm_handle *h, const void *in, void *out, uint64_t numel, uint64_t lo,
                       uint64_t hi, int dtype) {
  const size_t es = shm_dtype_size(dtype);
  if (check_no_pending(h, "reduce_scatter")) return -1;
  if (es == 0 || dtype == SHM_BYTES)
    return shm_fail(h, SHM_FAIL_ARG, "reduce_scatter: unsupported dtype code %d", dtype);
  if (lo > hi || hi > numel)
    return shm_fail(h, SHM_FAIL_ARG, "reduce_scatter: slice [%llu, %llu) outside [0, %llu)",
                    (unsigned long long)lo, (unsigned long long)hi, (unsigned long long)numel);
  const char *src = (const char *)in;
  char *dst = (char *)out;
  const uint64_t chunk = h->coll_half / es;
  const void *srcs[SHM_MAX_RANKS];
  uint64_t off = 0;
  int first = 1;
  do {
    const uint64_t n = numel - off < chunk ? numel - off : chunk;
    if (step_begin(h, "reduce_scatter")) return -1;
    memcpy(slot(h, h->rank, h->step), src + off * es, n * es);
    shm_step_hdr hd = {.op = SHM_OP_REDUCE_SCATTER, .dtype = (uint32_t)dtype,
                       .nbytes = numel * es, .aux = numel};
    step_publish(h, &hd);
    if (step_wait_all(h, "reduce_scatter")) return -1;
    if (first && check_headers(h, &hd, 1)) return -1;
    first = 0;
    const uint64_t a = lo > off ? lo : off, b = hi < off + n ? hi : off + n;
    if (a < b) {
      for (int p = 0; p < h->world; ++p) srcs[p] = slot(h, p, h->step) + (a - off) * es;
      shm_reduce(dtype, dst + (a - lo) * es, NULL, srcs, h->world, b - a);
    }
    step_end(h);
    off += n;
  } while (off < numel);
  return 0;
}

/* ---- gather / all_gather: begin publishes sizes + first chunk, finish copies ---- */

static int gather_begin(shm_handle *h, int op, int dst, const void *in, uint64_t nbytes,
                        uint64_t row_bytes, int dtype, uint64_t *sizes_out) {
  const char *what = op_name((uint32_t)op);
  if (check_no_pending(h, what)) return -1;
  if (dst < 0 || dst >= h->world)
    return shm_fail(h, SHM_FAIL_ARG, "%s: dst %d outside [0, %d)", what, dst, h->world);
  if (step_begin(h, what)) return -1;
  const uint64_t first = nbytes < h->coll_half ? nbytes : h->coll_half;
  memcpy(slot(h, h->rank, h->step), in, first);
  shm_step_hdr hd = {.op = (uint32_t)op, .dtype = (uint32_t)dtype, .nbytes = nbytes,
                     .row_bytes = row_bytes, .aux = (uint64_t)dst};
  step_publish(h, &hd);
  /* Full synchronisation on the first step, also for gather: every rank learns every size and
   * a mismatch fails on all ranks. */
  if (step_wait_all(h, what) || check_headers(h, &hd, 0)) return -1;
  uint64_t maxb = 0;
  for (int p = 0; p < h->world; ++p) {
    uint64_t b = p == h->rank ? nbytes : h->ctl[p].hdr[h->step & 1u].nbytes;
    sizes_out[p] = b;
    h->pend_recv[p] = b;
    if (b > maxb) maxb = b;
  }
  h->pend_op = op;
  h->pend_dst = dst;
  h->pend_chunk = h->coll_half;
  h->pend_steps = maxb == 0 ? 1u : (uint32_t)((maxb + h->coll_half - 1) / h->coll_half);
  h->pend_src[h->rank] = (shm_src){.ptr = (const char *)in, .nbytes = nbytes};
  return 0;
}

int shm_gather_begin(shm_handle *h, int dst, const void *in, uint64_t nbytes, uint64_t row_bytes,
                     int dtype, uint64_t *sizes_out) {
  return gather_begin(h, SHM_OP_GATHER, dst, in, nbytes, row_bytes, dtype, sizes_out);
}

int shm_all_gather_begin(shm_handle *h, const void *in, uint64_t nbytes, uint64_t row_bytes,
                         int dtype, uint64_t *sizes_out) {
  return gather_begin(h, SHM_OP_ALL_GATHER, 0, in, nbytes, row_bytes, dtype, sizes_out);
}

/* Copy stream bytes [off, off + len) of one rank to its destination: contiguous when block is
 * 0, else byte k lands at dst + (k / block) * stride + k % block (an all-gather along an inner
 * dim writes each rank's rows straight into their interleaved place in the caller's output). */
static void copy_out(char *dst, uint64_t block, uint64_t stride, uint64_t off, const char *src,
                     uint64_t len) {
  if (block == 0) {
    memcpy(dst + off, src, len);
    return;
  }
  while (len) {
    const uint64_t b = off / block, o = off % block;
    const uint64_t take = block - o < len ? block - o : len;
    memcpy(dst + b * stride + o, src, take);
    src += take;
    off += take;
    len -= take;
  }
}

int shm_gather_finish_strided(shm_handle *h, void *const *outs, uint64_t block, uint64_t stride) {
  const int op = h->pend_op;
  if (op != SHM_OP_GATHER && op != SHM_OP_ALL_GATHER)
    return shm_fail(h, SHM_FAIL_ABORT,
                    "shm group '%s': gather_finish without gather_begin", h->name);
  const char *what = op_name((uint32_t)op);
  const int reader = op == SHM_OP_ALL_GATHER || h->pend_dst == h->rank;
  const uint64_t C = h->pend_chunk;
  const shm_src *mine = &h->pend_src[h->rank];
  for (uint32_t k = 0; k < h->pend_steps; ++k) {
    const uint64_t off = (uint64_t)k * C;
    if (k > 0) {
      if (step_begin(h, what)) return -1;
      if (mine->nbytes > off) {
        const uint64_t len = mine->nbytes - off < C ? mine->nbytes - off : C;
        memcpy(slot(h, h->rank, h->step), mine->ptr + off, len);
      }
      shm_step_hdr hd = {.op = (uint32_t)op};
      step_publish(h, &hd);
      if (reader && step_wait_all(h, what)) return -1;
    }
    if (reader) {
      for (int p = 0; p < h->world; ++p) {
        const uint64_t b = h->pend_recv[p];
        if (b <= off) continue;
        const uint64_t len = b - off < C ? b - off : C;
        const char *from = p == h->rank ? mine->ptr + off : slot(h, p, h->step);
        copy_out((char *)outs[p], block, stride, off, from, len);
      }
    }
    step_end(h);
  }
  h->pend_op = 0;
  return 0;
}

int shm_gather_finish(shm_handle *h, void *const *outs) {
  return shm_gather_finish_strided(h, outs, 0, 0);
}

/* ---- all_to_all(v): rank r's slot half is cut into `world` sub-buffers, one per receiver ---- */

int shm_all_to_all_begin(shm_handle *h, const void *const *heads, const uint64_t *head_bytes,
                         const void *const *body, const uint64_t *body_bytes,
                         const int64_t *const *body_idx, uint64_t row_bytes, int dtype,
                         uint64_t *recv_head_out, uint64_t *recv_body_out) {
  if (check_no_pending(h, "all_to_all") || step_begin(h, "all_to_all")) return -1;
  const uint64_t sub = (h->coll_half / (uint64_t)h->world) / 64 * 64;
  const uint32_t half = h->step & 1u;
  shm_rank_ctl *me = &h->ctl[h->rank];
  for (int d = 0; d < h->world; ++d) {
    shm_src *s = &h->pend_src[d];
    const uint64_t hb = heads ? head_bytes[d] : 0;
    *s = (shm_src){.head = heads ? (const char *)heads[d] : NULL, .head_bytes = hb,
                   .ptr = (const char *)body[d], .nbytes = hb + body_bytes[d],
                   .idx = body_idx ? body_idx[d] : NULL, .row_bytes = row_bytes};
    me->a2a_bytes[half][d] = s->nbytes;
    me->a2a_head[half][d] = hb;
    if (d != h->rank)
      shm_src_copy(s, 0, s->nbytes < sub ? s->nbytes : sub, slot(h, h->rank, h->step) + d * sub);
  }
  shm_step_hdr hd = {.op = SHM_OP_ALL_TO_ALL, .dtype = (uint32_t)dtype, .row_bytes = row_bytes};
  step_publish(h, &hd);
  if (step_wait_all(h, "all_to_all") || check_headers(h, &hd, 0)) return -1;
  uint64_t maxb = 0;
  for (int p = 0; p < h->world; ++p) {
    for (int d = 0; d < h->world; ++d) {
      const uint64_t b = h->ctl[p].a2a_bytes[half][d];
      if (d != p && b > maxb) maxb = b;
    }
    h->pend_recv[p] = h->ctl[p].a2a_bytes[half][h->rank];
    h->pend_recv_head[p] = h->ctl[p].a2a_head[half][h->rank];
    recv_head_out[p] = h->pend_recv_head[p];
    recv_body_out[p] = h->pend_recv[p] - h->pend_recv_head[p];
  }
  h->pend_op = SHM_OP_ALL_TO_ALL;
  h->pend_chunk = sub;
  h->pend_steps = maxb == 0 ? 1u : (uint32_t)((maxb + sub - 1) / sub);
  return 0;
}

/* Copy stream bytes [off, off + len) from `from` into the head / body destinations. */
static void split_copy(char *head_out, uint64_t head_bytes, char *body_out, uint64_t off,
                       uint64_t len, const char *from) {
  if (off < head_bytes) {
    const uint64_t take = head_bytes - off < len ? head_bytes - off : len;
    memcpy(head_out + off, from, take);
    from += take;
    len -= take;
    off += take;
  }
  if (len) memcpy(body_out + (off - head_bytes), from, len);
}

int shm_all_to_all_finish(shm_handle *h, void *const *head_out, void *const *body_out) {
  if (h->pend_op != SHM_OP_ALL_TO_ALL)
    return shm_fail(h, SHM_FAIL_ABORT, "shm group '%s': all_to_all_finish without begin",
                    h->name);
  const uint64_t C = h->pend_chunk;
  const int me = h->rank;
  /* Our own stream never passes through shared memory (and does not count towards steps). */
  {
    const shm_src *s = &h->pend_src[me];
    if (s->head_bytes) memcpy(head_out[me], s->head, s->head_bytes);
    shm_src body = *s;
    body.head_bytes = 0;
    body.head = NULL;
    shm_src_copy(&body, 0, s->nbytes - s->head_bytes, (char *)body_out[me]);
  }
  for (uint32_t k = 0; k < h->pend_steps; ++k) {
    const uint64_t off = (uint64_t)k * C;
    if (k > 0) {
      if (step_begin(h, "all_to_all")) return -1;
      for (int d = 0; d < h->world; ++d) {
        const shm_src *s = &h->pend_src[d];
        if (d == me || s->nbytes <= off) continue;
        const uint64_t len = s->nbytes - off < C ? s->nbytes - off : C;
        shm_src_copy(s, off, len, slot(h, me, h->step) + (uint64_t)d * C);
      }
      shm_step_hdr hd = {.op = SHM_OP_ALL_TO_ALL};
      step_publish(h, &hd);
      if (step_wait_all(h, "all_to_all")) return -1;
    }
    for (int p = 0; p < h->world; ++p) {
      const uint64_t b = h->pend_recv[p];
      if (p == me || b <= off) continue;
      const uint64_t len = b - off < C ? b - off : C;
      split_copy(head_out ? (char *)head_out[p] : NULL, h->pend_recv_head[p], (char *)body_out[p],
                 off, len, slot(h, p, h->step) + (uint64_t)me * C);
    }
    step_end(h);
  }
  h->pend_op = 0;
  return 0;
}
