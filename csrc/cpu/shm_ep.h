/*
 * The expert-parallel token exchange over shared memory (shm_ep.c): the transport behind the
 * `shm` All2All manager.
 *
 * One manager owns one moe_ep segment (shm.h) whose user region holds the control words below;
 * each per-layer handle owns a data segment (mapped by Python) registered in a slot. Per handle
 * and receiver rank r the data segment holds two halves, so that two results can be live; each
 * dispatch names its half (the caller picks the half of the previous dispatch when that one is
 * combined, which keeps one half warm in the caches, and the other half otherwise):
 *
 *   x       [W * cap, row_bytes]      rows received by r: source 0's chunk, then source 1's, ...
 *   ids     [W * cap, k] int64        local expert of each slot, -1 elsewhere (TOKEN layout)
 *   weights [W * cap, k] float32      router weights, 0 where ids is -1
 *   scales  [W * cap, scale_bytes]    quantisation scales (scale_bytes may be 0)
 *   out     [W * cap, out_row_bytes]  expert outputs written in place by r (aliases x when
 *                                     out_row_bytes == row_bytes)
 *
 * Dispatch seq q in half b (every stamp below is half b's), one small exchange, then the
 * transfer:
 *   1. flow control: every rank's DONE >= p + 1, p the previous dispatch in half b (its combine
 *      finished reading half b);
 *   2. publish dh[b] = {seq, error, tokens, rows per destination} and COUNTS = q + 1; wait for
 *      every peer's; any error => every rank returns SHM_EP_REMOTE (nothing was written);
 *   3. copy rows, ids, weights, scales to each destination at the offset the counts give
 *      (sum of the lower sources' counts), publish DATA = q + 1, wait for every peer's.
 * Combine seq q: copy the expert outputs of the other sources' rows into out (unless the caller
 * computed them there), publish cerr[b] and OUT = q + 1, wait for every peer's; the caller then
 * sums its tokens from every owner's out. DONE = q + 1 is published by this rank's next call on
 * the handle: only a peer's next dispatch in half b waits for it, and that needs this rank's
 * next call anyway; it saves a native call per round trip.
 *
 * Every rank posts `cur` = (call number, slot, op, half, seq) when it enters a call, so a waiting
 * rank notices at once when a peer made a different call (skipped a combine, used another
 * handle or half, destroyed the manager) and the group is aborted with a message naming both
 * calls, instead of waiting for the timeout. Stamps are 32-bit and compared with wrap-around
 * arithmetic.
 */
#ifndef MOE_EP_SHM_EP_H
#define MOE_EP_SHM_EP_H

#include "shm.h"

#define SHM_EP_MAX_SLOTS 32
#define SHM_EP_REMOTE 1 /* a rank posted an error: see peer_err */

enum { SHM_EP_OP_DISPATCH = 1, SHM_EP_OP_COMBINE = 2, SHM_EP_OP_DESTROYED = 3,
       SHM_EP_OP_AGREE = 4 };

#define SHM_EP_AGREE_WORDS 96 /* int64 words of one rank's agreement header */

typedef struct {
  _Alignas(64) _Atomic uint64_t cur; /* call << 32 | slot << 27 | op << 24 | half << 23 | seq */
  _Atomic uint32_t waiters;          /* peers sleeping on this rank's stamps */
  _Alignas(64) _Atomic uint32_t agree_seq;         /* agreements published (seq + 1) */
  int64_t agree[2][SHM_EP_AGREE_WORDS];             /* header of agreement seq, by parity */
} shm_ep_rank_ctl;

typedef struct {
  uint64_t seq;
  int64_t err;
  int64_t ntok;
  int64_t counts[SHM_MAX_RANKS]; /* rows for each destination */
} shm_ep_hdr;

/* Stamps, per half: a dispatch and its combine use one half only, so the two live results of a
 * handle can be combined in either order; within a half, seqs only grow. */
enum { SHM_EP_COUNTS = 0, SHM_EP_DATA = 1, SHM_EP_OUT = 2, SHM_EP_DONE = 3 };

typedef struct {
  _Alignas(64) _Atomic uint32_t stamp[4][2]; /* [SHM_EP_*][half]: last seq + 1 published */
  _Alignas(64) shm_ep_hdr dh[2];
  _Alignas(64) int64_t cerr[2];
} shm_ep_slot_ctl;

typedef struct {
  uint64_t cap;           /* rows one source may send to one destination (max tokens per rank) */
  uint64_t row_bytes;     /* bytes of one dispatched row */
  uint64_t k;             /* top-k */
  uint64_t scale_bytes;   /* bytes of one row's scales (0: unquantised) */
  uint64_t out_row_bytes; /* bytes of one expert-output row */
  uint64_t num_local;     /* experts this rank owns (received ids are in [-1, num_local)) */
} shm_ep_geometry;

typedef struct shm_ep shm_ep;

/* Per call (ctypes structures mirror these in moe_ep/distributed/shm_exchange.py). */
typedef struct {
  uint64_t call;              /* the manager's call number (same on every rank) */
  uint64_t seq;               /* the handle's dispatch number */
  uint64_t half;              /* the buffer half this dispatch uses (0 or 1) */
  int64_t prev_seq;           /* the previous dispatch that used `half` (< seq), or -1 */
  int64_t err;                /* this rank's input error code (0: none) */
  int64_t ntok;               /* tokens this rank dispatches */
  const int64_t *send_counts; /* [W] rows for each destination */
  const int64_t *token_rows;  /* [ntok, W] row of token n in this rank's chunk at d, or -1 */
  const char *x;              /* [ntok, row_bytes] */
  const int64_t *row_ids;     /* [S, k] */
  const float *row_weights;   /* [S, k] */
  const char *scales;         /* [ntok, scale_bytes] or NULL */
  int64_t *recv_counts;       /* out [W]: rows received from each source */
  int64_t *peer_err;          /* out [W]: the error code each rank posted */
  int64_t *tokens_per_expert; /* out [num_local]: received (row, slot) pairs per local expert */
  int64_t received;           /* out: rows received in all (this rank's block holds them) */
} shm_ep_dispatch_args;

typedef struct {
  uint64_t call, seq;
  uint64_t half;    /* the half of dispatch seq */
  int64_t err;
  const char *out;  /* [M, out_row_bytes] expert outputs of the rows received, or NULL on error */
  int64_t *peer_err; /* out [W] */
  const void **bases; /* out [W]: where this rank's rows' outputs are at each owner (its chunk
                         of the owner's block; its own from `out` unless `out` is the block) */
} shm_ep_combine_args;

SHM_API uint64_t shm_ep_control_bytes(int world);
SHM_API shm_ep *shm_ep_attach(shm_handle *h);
SHM_API void shm_ep_detach(shm_ep *ep);
SHM_API uint64_t shm_ep_data_bytes(int world, const shm_ep_geometry *g);
SHM_API int shm_ep_register(shm_ep *ep, int slot, const shm_ep_geometry *g, void *base);
SHM_API int shm_ep_unregister(shm_ep *ep, int slot);
/* Address of one region of (receiver, half): which = 0 x, 1 ids, 2 weights, 3 scales, 4 out. */
SHM_API void *shm_ep_region(shm_ep *ep, int slot, int receiver, int half, int which);
SHM_API int shm_ep_dispatch(shm_ep *ep, int slot, shm_ep_dispatch_args *a);
SHM_API int shm_ep_combine(shm_ep *ep, int slot, shm_ep_combine_args *a);
/* Mark dispatch `seq` (in `half`) finished without a combine (its result was retired or failed). */
SHM_API int shm_ep_retire(shm_ep *ep, int slot, uint64_t seq, uint32_t half);
/* Tell the peers this rank will make no further call (they fail at once if they wait on it). */
SHM_API void shm_ep_post_destroyed(shm_ep *ep, uint64_t call);
/* A small all-gather of `words` int64 (<= SHM_EP_AGREE_WORDS) for call `call`: the agreement
 * a dispatch without a handle makes before it picks one. `out` receives [world][words]. The
 * same mismatch detection as dispatch / combine applies. */
SHM_API int shm_ep_agree(shm_ep *ep, uint64_t call, uint64_t seq, const int64_t *mine,
                         int words, int64_t *out);

#endif /* MOE_EP_SHM_EP_H */
