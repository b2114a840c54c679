/*
 * The expert-parallel token exchange (see shm_ep.h for the layout and the protocol).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shm_ep.h"

#define ALIGN64(x) (((x) + 63u) / 64u * 64u)
#define PAGE_ALIGN(x) (((x) + 4095u) / 4096u * 4096u)

typedef struct {
  int used;
  uint64_t pending_done; /* seq + 1 of a combine whose DONE is not published yet, or 0 */
  uint32_t pending_half; /* ... and its half */
  shm_ep_geometry g;
  char *base;
  uint64_t half_bytes;
  uint64_t off[5]; /* x, ids, weights, scales, out inside one (receiver, half) block */
} ep_slot;

struct shm_ep {
  shm_handle *h;
  shm_ep_rank_ctl *ranks;  /* [world] */
  shm_ep_slot_ctl *slots;  /* [world][SHM_EP_MAX_SLOTS] */
  ep_slot local[SHM_EP_MAX_SLOTS];
};

static const char *op_name(uint64_t op) {
  switch (op) {
    case SHM_EP_OP_DISPATCH: return "dispatch";
    case SHM_EP_OP_COMBINE: return "combine";
    case SHM_EP_OP_DESTROYED: return "destroy";
    case SHM_EP_OP_AGREE: return "dispatch without a handle (agreeing on one)";
    default: return "nothing yet";
  }
}

static inline shm_ep_slot_ctl *slot_ctl(shm_ep *ep, int rank, int slot) {
  return &ep->slots[(size_t)rank * SHM_EP_MAX_SLOTS + (size_t)slot];
}

uint64_t shm_ep_control_bytes(int world) {
  return ALIGN64((uint64_t)world * sizeof(shm_ep_rank_ctl)) +
         (uint64_t)world * SHM_EP_MAX_SLOTS * sizeof(shm_ep_slot_ctl);
}

shm_ep *shm_ep_attach(shm_handle *h) {
  if (!h->user || h->user_bytes < shm_ep_control_bytes(h->world)) {
    shm_fail(h, SHM_FAIL_ARG, "shm group '%s': the segment has no room for the EP control words",
             h->name);
    return NULL;
  }
  shm_ep *ep = calloc(1, sizeof *ep);
  if (!ep) {
    shm_fail(h, SHM_FAIL_ARG, "out of memory");
    return NULL;
  }
  ep->h = h;
  ep->ranks = (shm_ep_rank_ctl *)h->user;
  ep->slots = (shm_ep_slot_ctl *)(h->user + ALIGN64((uint64_t)h->world * sizeof(shm_ep_rank_ctl)));
  return ep;
}

void shm_ep_detach(shm_ep *ep) { free(ep); }

static void block_offsets(int world, const shm_ep_geometry *g, uint64_t off[5], uint64_t *half) {
  const uint64_t rows = (uint64_t)world * g->cap;
  uint64_t o = 0;
  off[0] = o;
  o = PAGE_ALIGN(o + rows * g->row_bytes);
  off[1] = o;
  o = ALIGN64(o + rows * g->k * 8);
  off[2] = o;
  o = ALIGN64(o + rows * g->k * 4);
  off[3] = o;
  o = PAGE_ALIGN(o + rows * g->scale_bytes);
  if (g->out_row_bytes == g->row_bytes) {
    off[4] = off[0]; /* the outputs overwrite the rows they were computed from */
  } else {
    off[4] = o;
    o = PAGE_ALIGN(o + rows * g->out_row_bytes);
  }
  *half = o;
}

uint64_t shm_ep_data_bytes(int world, const shm_ep_geometry *g) {
  uint64_t off[5], half;
  block_offsets(world, g, off, &half);
  return half * 2 * (uint64_t)world;
}

int shm_ep_register(shm_ep *ep, int slot, const shm_ep_geometry *g, void *base) {
  shm_handle *h = ep->h;
  if (slot < 0 || slot >= SHM_EP_MAX_SLOTS)
    return shm_fail(h, SHM_FAIL_ARG, "EP slot %d outside [0, %d)", slot, SHM_EP_MAX_SLOTS);
  if (g->cap == 0 || g->row_bytes == 0 || g->k == 0 || g->out_row_bytes == 0 || !base)
    return shm_fail(h, SHM_FAIL_ARG, "EP slot %d: empty geometry", slot);
  ep_slot *L = &ep->local[slot];
  memset(L, 0, sizeof *L);
  L->g = *g;
  L->base = (char *)base;
  block_offsets(h->world, g, L->off, &L->half_bytes);
  /* A reused slot starts from zero stamps; the peers reset theirs before the collective that
   * ends the handle's creation, so nobody reads a stale stamp. */
  shm_ep_slot_ctl *me = slot_ctl(ep, h->rank, slot);
  for (int i = 0; i < 4; ++i)
    for (int b = 0; b < 2; ++b) atomic_store(&me->stamp[i][b], 0u);
  memset(me->dh, 0, sizeof me->dh);
  memset(me->cerr, 0, sizeof me->cerr);
  L->used = 1;
  return 0;
}

int shm_ep_unregister(shm_ep *ep, int slot) {
  if (slot < 0 || slot >= SHM_EP_MAX_SLOTS) return -1;
  ep->local[slot].used = 0;
  return 0;
}

static inline char *region(ep_slot *L, int receiver, int half, int which) {
  return L->base + ((uint64_t)receiver * 2 + (uint64_t)half) * L->half_bytes + L->off[which];
}

void *shm_ep_region(shm_ep *ep, int slot, int receiver, int half, int which) {
  if (slot < 0 || slot >= SHM_EP_MAX_SLOTS || !ep->local[slot].used) return NULL;
  if (receiver < 0 || receiver >= ep->h->world || half < 0 || half > 1 || which < 0 || which > 4)
    return NULL;
  return region(&ep->local[slot], receiver, half, which);
}

/* ---- calls and mismatch detection ---- */

static inline uint64_t cur_word(uint64_t call, int slot, uint64_t op, uint64_t seq,
                                uint32_t half) {
  return (call << 32) | ((uint64_t)slot << 27) | (op << 24) | ((uint64_t)(half & 1u) << 23) |
         (seq & 0x7fffffu);
}

static inline uint64_t cur_op(uint64_t c) { return (c >> 24) & 7u; }

static void describe(uint64_t c, char *buf, size_t n) {
  const uint64_t op = cur_op(c);
  if (op == SHM_EP_OP_DISPATCH || op == SHM_EP_OP_COMBINE)
    snprintf(buf, n, "%s on handle slot %llu, dispatch #%llu in buffer half %llu (call %llu)",
             op_name(op), (unsigned long long)((c >> 27) & 31u),
             (unsigned long long)(c & 0x7fffffu), (unsigned long long)((c >> 23) & 1u),
             (unsigned long long)(c >> 32));
  else
    snprintf(buf, n, "%s (call %llu)", op_name(op), (unsigned long long)(c >> 32));
}

typedef struct {
  shm_ep *ep;
  uint64_t mine;
  int peer;
  _Atomic uint32_t *word;
  uint32_t target;
} wait_ctx;

static int check_peer(shm_handle *h, void *p) {
  wait_ctx *w = (wait_ctx *)p;
  const uint64_t c = atomic_load_explicit(&w->ep->ranks[w->peer].cur, memory_order_acquire);
  if (c == w->mine) return 0;
  const int32_t ahead = (int32_t)((uint32_t)(c >> 32) - (uint32_t)(w->mine >> 32));
  if (ahead < 0 && cur_op(c) != SHM_EP_OP_DESTROYED) return 0; /* still on an earlier call */
  /* A dispatch without a handle agrees on one first, under the same call number. */
  if (ahead == 0 && cur_op(c) == SHM_EP_OP_AGREE && cur_op(w->mine) == SHM_EP_OP_DISPATCH)
    return 0;
  /* The peer posts its stamp before its next call: if it moved on, the stamp may just have
   * arrived. */
  if (shm_stamp_ge(atomic_load_explicit(w->word, memory_order_acquire), w->target)) return 0;
  char a[128], b[128];
  describe(w->mine, a, sizeof a);
  describe(c, b, sizeof b);
  return shm_fail(h, SHM_FAIL_ABORT,
                  "shm EP group '%s': the ranks made different calls: rank %d is in %s, rank %d "
                  "in %s (every rank must dispatch and combine the same handles in the same "
                  "order; this manager is unusable now)",
                  h->name, h->rank, a, w->peer, b);
}

static int wait_peer(shm_ep *ep, int peer, _Atomic uint32_t *word, uint32_t target, uint64_t mine,
                     const char *what) {
  wait_ctx w = {.ep = ep, .mine = mine, .peer = peer, .word = word, .target = target};
  return shm_wait_ge_checked(ep->h, word, &ep->ranks[peer].waiters, target, peer, what,
                             check_peer, &w);
}

/* Wait for stamp `which` of `half` to reach `target` on every peer. */
static int wait_all(shm_ep *ep, int slot, int which, uint32_t half, uint32_t target,
                    uint64_t mine, const char *what) {
  shm_handle *h = ep->h;
  for (int p = 0; p < h->world; ++p) {
    if (p == h->rank) continue;
    _Atomic uint32_t *word = &slot_ctl(ep, p, slot)->stamp[which][half];
    if (wait_peer(ep, p, word, target, mine, what)) return -1;
  }
  return 0;
}

/* Publish stamp `which` = seq + 1 in `half` (the half dispatch seq used). */
static inline void publish(shm_ep *ep, int slot, int which, uint32_t half, uint64_t seq) {
  shm_ep_slot_ctl *me = slot_ctl(ep, ep->h->rank, slot);
  _Atomic uint32_t *word = &me->stamp[which][half & 1u];
  const uint32_t value = (uint32_t)seq + 1u;
  /* Stamps only move forward (a retired or failed call may already have set a later one). */
  if (!shm_stamp_ge(atomic_load_explicit(word, memory_order_relaxed), value))
    shm_publish(word, &ep->ranks[ep->h->rank].waiters, value);
}

/* First row of this rank's chunk in destination d's block (half b): the lower sources'
 * counts for d, from the headers of the dispatch that used half b. */
static int64_t chunk_offset(shm_ep *ep, int slot, uint32_t b, int d) {
  int64_t off = 0;
  for (int s = 0; s < ep->h->rank; ++s) off += slot_ctl(ep, s, slot)->dh[b].counts[d];
  return off;
}

static void publish_pending_done(shm_ep *ep, int slot, ep_slot *L);

/* The slot, after publishing what its last combine left pending; NULL (error set) if unusable. */
static ep_slot *usable_slot(shm_ep *ep, int slot) {
  if (shm_check_usable(ep->h)) return NULL;
  if (slot < 0 || slot >= SHM_EP_MAX_SLOTS || !ep->local[slot].used) {
    shm_fail(ep->h, SHM_FAIL_ARG, "EP slot %d is not registered", slot);
    return NULL;
  }
  ep_slot *L = &ep->local[slot];
  publish_pending_done(ep, slot, L);
  return L;
}

static void publish_pending_done(shm_ep *ep, int slot, ep_slot *L) {
  if (L->pending_done) {
    publish(ep, slot, SHM_EP_DONE, L->pending_half, L->pending_done - 1u);
    L->pending_done = 0;
  }
}

int shm_ep_retire(shm_ep *ep, int slot, uint64_t seq, uint32_t half) {
  if (!usable_slot(ep, slot)) return -1;
  if (half > 1u) return shm_fail(ep->h, SHM_FAIL_ARG, "EP retire: half %u outside [0, 2)", half);
  publish(ep, slot, SHM_EP_DATA, half, seq);
  publish(ep, slot, SHM_EP_OUT, half, seq);
  publish(ep, slot, SHM_EP_DONE, half, seq);
  return 0;
}

void shm_ep_post_destroyed(shm_ep *ep, uint64_t call) {
  atomic_store_explicit(&ep->ranks[ep->h->rank].cur,
                        cur_word(call, 0, SHM_EP_OP_DESTROYED, 0, 0), memory_order_release);
}

static void post_cur(shm_ep *ep, uint64_t c) {
  atomic_store_explicit(&ep->ranks[ep->h->rank].cur, c, memory_order_release);
}

int shm_ep_dispatch(shm_ep *ep, int slot, shm_ep_dispatch_args *a) {
  shm_handle *h = ep->h;
  ep_slot *L = usable_slot(ep, slot);
  if (!L) return -1;
  const int W = h->world, me = h->rank;
  const uint32_t q = (uint32_t)a->seq, b = (uint32_t)a->half;
  if (a->half > 1u || a->prev_seq >= (int64_t)a->seq)
    return shm_fail(h, SHM_FAIL_ARG, "EP dispatch #%llu: half %llu / previous user #%lld",
                    (unsigned long long)a->seq, (unsigned long long)a->half,
                    (long long)a->prev_seq);
  const uint64_t mine = cur_word(a->call, slot, SHM_EP_OP_DISPATCH, a->seq, b);
  const shm_ep_geometry *g = &L->g;
  if (!a->err) {
    if ((uint64_t)a->ntok > g->cap)
      return shm_fail(h, SHM_FAIL_ARG, "EP dispatch: %lld tokens exceed the handle's %llu",
                      (long long)a->ntok, (unsigned long long)g->cap);
    for (int d = 0; d < W; ++d)
      if (a->send_counts[d] < 0 || a->send_counts[d] > a->ntok)
        return shm_fail(h, SHM_FAIL_ARG, "EP dispatch: bad row count %lld for rank %d",
                        (long long)a->send_counts[d], d);
  }
  post_cur(ep, mine);
  /* 1. Half b was last used by dispatch prev_seq: wait until every rank has read its outputs. */
  if (a->prev_seq >= 0 && wait_all(ep, slot, SHM_EP_DONE, b, (uint32_t)a->prev_seq + 1u, mine,
                                   "dispatch (previous combine)"))
    return -1;
  /* 2. The one small exchange: counts, error, identity. */
  shm_ep_slot_ctl *my = slot_ctl(ep, me, slot);
  shm_ep_hdr *hd = &my->dh[b];
  hd->seq = a->seq;
  hd->err = a->err;
  hd->ntok = a->err ? 0 : a->ntok;
  for (int d = 0; d < W; ++d) hd->counts[d] = a->err ? 0 : a->send_counts[d];
  publish(ep, slot, SHM_EP_COUNTS, b, a->seq);
  if (wait_all(ep, slot, SHM_EP_COUNTS, b, q + 1u, mine, "dispatch")) return -1;
  int remote = 0;
  for (int p = 0; p < W; ++p) {
    const shm_ep_hdr *o = &slot_ctl(ep, p, slot)->dh[b];
    if (o->seq != a->seq)
      return shm_fail(h, SHM_FAIL_ABORT,
                      "shm EP group '%s': rank %d published dispatch #%llu, rank %d expected #%llu",
                      h->name, p, (unsigned long long)o->seq, me, (unsigned long long)a->seq);
    a->peer_err[p] = o->err;
    remote |= o->err != 0;
  }
  if (remote) {
    shm_ep_retire(ep, slot, a->seq, b);
    return SHM_EP_REMOTE;
  }
  /* 3. The transfer: my chunk at destination d starts after the lower sources' chunks. */
  a->received = 0;
  for (int d = 0; d < W; ++d) {
    a->recv_counts[d] = slot_ctl(ep, d, slot)->dh[b].counts[me];
    a->received += a->recv_counts[d];
  }
  const uint64_t rb = g->row_bytes, sb = g->scale_bytes, k = g->k;
  char *xr[SHM_MAX_RANKS], *sr[SHM_MAX_RANKS];
  int64_t start = 0;
  for (int d = 0; d < W; ++d) {
    const int64_t n = a->send_counts[d], off = chunk_offset(ep, slot, b, d);
    xr[d] = region(L, d, (int)b, 0) + (uint64_t)off * rb;
    sr[d] = region(L, d, (int)b, 3) + (uint64_t)off * sb;
    if (n) {
      memcpy(region(L, d, (int)b, 1) + (uint64_t)off * k * 8, a->row_ids + (uint64_t)start * k,
             (uint64_t)n * k * 8);
      memcpy(region(L, d, (int)b, 2) + (uint64_t)off * k * 4, a->row_weights + (uint64_t)start * k,
             (uint64_t)n * k * 4);
    }
    start += n;
  }
  /* Token-major: a token's row is read once (then from L1) for all its destinations. */
  const int copy_scales = sb && a->scales;
  for (int64_t t = 0; t < a->ntok; ++t) {
    const int64_t *rows = a->token_rows + (uint64_t)t * (uint64_t)W;
    const char *src = a->x + (uint64_t)t * rb;
    for (int d = 0; d < W; ++d) {
      const int64_t r = rows[d];
      if (r < 0) continue;
      memcpy(xr[d] + (uint64_t)r * rb, src, rb);
      if (copy_scales) memcpy(sr[d] + (uint64_t)r * sb, a->scales + (uint64_t)t * sb, sb);
    }
  }
  publish(ep, slot, SHM_EP_DATA, b, a->seq);
  if (wait_all(ep, slot, SHM_EP_DATA, b, q + 1u, mine, "dispatch (rows)")) return -1;
  /* What the receiver's experts need first: (row, slot) pairs per local expert. */
  const int64_t *ids = (const int64_t *)region(L, me, (int)b, 1);
  for (uint64_t e = 0; e < g->num_local; ++e) a->tokens_per_expert[e] = 0;
  for (int64_t i = 0; i < a->received * (int64_t)k; ++i) {
    const int64_t e = ids[i];
    if (e >= (int64_t)g->num_local)
      return shm_fail(h, SHM_FAIL_ABORT, "shm EP group '%s': a received id %lld is not a local "
                      "expert of rank %d (corrupt rows)", h->name, (long long)e, me);
    if (e >= 0) a->tokens_per_expert[e] += 1;
  }
  return 0;
}

int shm_ep_combine(shm_ep *ep, int slot, shm_ep_combine_args *a) {
  shm_handle *h = ep->h;
  ep_slot *L = usable_slot(ep, slot);
  if (!L) return -1;
  const int W = h->world, me = h->rank;
  const uint32_t q = (uint32_t)a->seq, b = (uint32_t)a->half;
  if (a->half > 1u)
    return shm_fail(h, SHM_FAIL_ARG, "EP combine: half %llu outside [0, 2)",
                    (unsigned long long)a->half);
  const uint64_t mine = cur_word(a->call, slot, SHM_EP_OP_COMBINE, a->seq, b);
  post_cur(ep, mine);
  shm_ep_slot_ctl *my = slot_ctl(ep, me, slot);
  my->cerr[b] = a->err;
  char *out = region(L, me, (int)b, 4);
  if (!a->err && a->out && a->out != out) {
    /* The other sources read their rows' outputs from here; this rank's own rows are summed
     * straight from the caller's tensor. */
    const uint64_t orb = L->g.out_row_bytes;
    int64_t off = 0;
    for (int s = 0; s < W; ++s) {
      const int64_t n = slot_ctl(ep, s, slot)->dh[b].counts[me];
      if (s != me && n) memcpy(out + (uint64_t)off * orb, a->out + (uint64_t)off * orb, (uint64_t)n * orb);
      off += n;
    }
  }
  publish(ep, slot, SHM_EP_OUT, b, a->seq);
  if (wait_all(ep, slot, SHM_EP_OUT, b, q + 1u, mine, "combine")) return -1;
  int remote = 0;
  for (int p = 0; p < W; ++p) {
    a->peer_err[p] = slot_ctl(ep, p, slot)->cerr[b];
    remote |= a->peer_err[p] != 0;
  }
  if (remote) {
    publish(ep, slot, SHM_EP_DONE, b, a->seq);
    return SHM_EP_REMOTE;
  }
  const uint64_t orb = L->g.out_row_bytes;
  for (int d = 0; d < W; ++d) {
    const char *base = d == me && a->out != out ? a->out : region(L, d, (int)b, 4);
    a->bases[d] = base + (uint64_t)chunk_offset(ep, slot, b, d) * orb;
  }
  L->pending_done = a->seq + 1u; /* published by the next call, once the caller has summed */
  L->pending_half = b;
  return 0;
}

int shm_ep_agree(shm_ep *ep, uint64_t call, uint64_t seq, const int64_t *mine, int words,
                 int64_t *out) {
  shm_handle *h = ep->h;
  if (shm_check_usable(h)) return -1;
  if (words < 1 || words > SHM_EP_AGREE_WORDS)
    return shm_fail(h, SHM_FAIL_ARG, "EP agreement of %d words outside [1, %d]", words,
                    SHM_EP_AGREE_WORDS);
  const uint64_t c = cur_word(call, 0, SHM_EP_OP_AGREE, seq, 0);
  post_cur(ep, c);
  shm_ep_rank_ctl *me = &ep->ranks[h->rank];
  /* A rank writes parity seq & 1 only after every peer published seq - 1, i.e. finished
   * reading seq - 2 (it reads right after its wait and before publishing again). */
  memcpy(me->agree[seq & 1u], mine, (size_t)words * sizeof(int64_t));
  shm_publish(&me->agree_seq, &me->waiters, (uint32_t)seq + 1u);
  for (int p = 0; p < h->world; ++p) {
    if (p == h->rank) continue;
    if (wait_peer(ep, p, &ep->ranks[p].agree_seq, (uint32_t)seq + 1u, c, "agreement")) return -1;
  }
  for (int p = 0; p < h->world; ++p)
    memcpy(out + (size_t)p * (size_t)words, ep->ranks[p].agree[seq & 1u],
           (size_t)words * sizeof(int64_t));
  return 0;
}
