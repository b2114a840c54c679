/*
 * moe_ep CPU shared-memory collectives: segment layout and internal API.
 *
 * One POSIX shared-memory segment per process group, created by group rank 0 and mapped by
 * every rank. Layout (all offsets page aligned):
 *
 *   shm_header                      job identity, sizes, abort flag, per-rank pid
 *   shm_rank_ctl[world]             per rank: `ready` / `consumed` step stamps, step headers
 *   shm_chan_ctl[world * world]     per ordered pair (src, dst): point-to-point stamps
 *   collective slots [world][2][coll_half]   double-buffered, written by their rank only
 *   p2p slots [world * world][2][p2p_half]   double-buffered, written by src, read by dst
 *
 * Collectives advance in lockstep "steps" (every rank runs the same number of steps per op).
 * Step s uses half (s & 1) of each rank's slot. A rank may write step s only once every peer
 * has finished reading step s - 2 (`consumed >= s - 1`), so two steps can be in flight; it
 * publishes `ready = s + 1` after writing and `consumed = s + 1` after reading. Stamps are
 * 32-bit and compared with wrap-around arithmetic so they may overflow freely.
 *
 * Waiting spins briefly, then yields, then sleeps on a futex (process-shared) with a short
 * timeout so that it can check whether peers are still alive and whether another rank has
 * aborted the group. This keeps ranks > cores from livelocking.
 */
#ifndef MOE_EP_SHM_H
#define MOE_EP_SHM_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define SHM_MAX_RANKS 64
#define SHM_MAGIC 0x3170656d6f65ULL /* identifies an initialised moe_ep segment */
#define SHM_ABI_VERSION 6u
#define SHM_ERR_LEN 512

enum shm_dtype { SHM_F32 = 0, SHM_BF16 = 1, SHM_F16 = 2, SHM_BYTES = 3 };

enum shm_op {
  SHM_OP_BARRIER = 1,
  SHM_OP_ALLREDUCE = 2,
  SHM_OP_ALLREDUCE_PHASE2 = 3,
  SHM_OP_REDUCE_SCATTER = 4,
  SHM_OP_ALL_GATHER = 5,
  SHM_OP_GATHER = 6,
  SHM_OP_ALL_TO_ALL = 7,
};

/* Published with every step so that peers can detect mismatched collectives. */
typedef struct {
  uint32_t op;
  uint32_t dtype;
  uint64_t nbytes;    /* this rank's payload for the whole op */
  uint64_t row_bytes; /* bytes per row (trailing dims must agree between ranks) */
  uint64_t aux;       /* op specific: numel for reductions, dst for gather */
} shm_step_hdr;

typedef struct {
  _Alignas(64) _Atomic uint32_t ready;    /* steps published by this rank */
  _Alignas(64) _Atomic uint32_t consumed; /* steps this rank has finished reading */
  _Alignas(64) _Atomic uint32_t waiters;  /* peers sleeping on this rank's stamps */
  _Alignas(64) shm_step_hdr hdr[2];       /* header of the step in each half */
  uint64_t a2a_bytes[2][SHM_MAX_RANKS];   /* all_to_all: bytes this rank sends to each rank */
  uint64_t a2a_head[2][SHM_MAX_RANKS];    /* ... of which this many are the head */
} shm_rank_ctl;

typedef struct {
  _Alignas(64) _Atomic uint32_t sent; /* chunks published by src */
  uint64_t len[2];                    /* bytes in the chunk held by each half */
  _Alignas(64) _Atomic uint32_t recvd; /* chunks consumed by dst */
  _Alignas(64) _Atomic uint32_t waiters;
} shm_chan_ctl;

typedef struct {
  _Atomic int32_t pid;
  _Atomic uint32_t joined;
  uint64_t pidns; /* inode of /proc/self/ns/pid: pids are only comparable in one namespace */
} shm_rank_info;

typedef struct {
  _Atomic uint64_t magic; /* written last by the creator */
  uint32_t abi;
  uint32_t world;
  uint64_t coll_half;
  uint64_t p2p_half;
  uint64_t total_bytes;
  uint64_t off_rank_ctl, off_chan_ctl, off_coll, off_p2p;
  uint64_t off_user, user_bytes; /* region owned by a layer above the collectives (shm_ep.c) */
  _Alignas(64) _Atomic uint32_t abort_flag;
  int32_t abort_rank;
  char abort_msg[SHM_ERR_LEN];
  _Alignas(64) shm_rank_info ranks[SHM_MAX_RANKS];
} shm_header;

/* Creation-time options (sizes are used by the creator only; joiners read them). */
typedef struct {
  uint64_t coll_half;  /* bytes per half of a rank's collective slot */
  uint64_t p2p_half;   /* bytes per half of a point-to-point channel */
  double timeout_s;    /* give up waiting for a peer after this long */
  double spin_us;      /* busy-wait this long before yielding (0: choose from core count) */
  double yield_us;     /* then sched_yield this long before sleeping on the futex */
  uint64_t naive_max;  /* all-reduce chunks up to this size: one step, every rank sums all */
  uint64_t user_bytes; /* extra zeroed region after the slots (0: none), see shm_handle.user */
} shm_options;

/* One rank's outgoing stream for gathers / all_to_all: an optional contiguous head (e.g. the
 * shm manager's routing records), then the body: contiguous bytes, or rows picked by index
 * from a base matrix (the shm manager writes routed rows straight into shared memory). */
typedef struct {
  const char *head;    /* contiguous head, or NULL */
  uint64_t head_bytes;
  const char *ptr;     /* contiguous body, or base of the row matrix when idx != NULL */
  uint64_t nbytes;     /* total bytes: head_bytes + body bytes */
  const int64_t *idx;  /* row indices into ptr, or NULL */
  uint64_t row_bytes;  /* bytes per row when indexed */
} shm_src;

typedef struct shm_handle {
  char name[256];
  int rank, world, creator;
  void *base;
  size_t size;
  shm_header *hdr;
  shm_rank_ctl *ctl;
  shm_chan_ctl *chan;
  char *coll;
  char *p2p;
  char *user; /* the segment's user region (user_bytes), NULL when none */
  uint64_t coll_half, p2p_half, user_bytes;

  uint32_t step; /* collective steps completed by this rank */
  uint32_t send_seq[SHM_MAX_RANKS];
  uint32_t recv_seq[SHM_MAX_RANKS];
  uint64_t recv_off[SHM_MAX_RANKS];

  int64_t timeout_ns, spin_ns, yield_ns;
  uint64_t naive_max;
  uint64_t my_pidns;
  int64_t last_liveness_ns;

  /* State of a begin/finish pair (all_gather, gather, all_to_all). */
  int pend_op;
  int pend_dst;
  uint32_t pend_steps;
  uint64_t pend_chunk;
  shm_src pend_src[SHM_MAX_RANKS];
  uint64_t pend_recv[SHM_MAX_RANKS];
  uint64_t pend_recv_head[SHM_MAX_RANKS];

  int broken;
  int interrupted; /* the last failure came from the interrupt check */
  char err[SHM_ERR_LEN];
} shm_handle;

/* ---- segment / waiting (shm_segment.c) ---- */
enum { SHM_FAIL_ARG = 0, SHM_FAIL_ABORT = 1, SHM_FAIL_BROKEN = 2 };
/* Records an error (shm_last_error). ARG: bad argument, nothing published, handle usable.
 * ABORT: handle unusable and the whole group is aborted (peers fail fast). BROKEN: handle
 * unusable (the group was already aborted by someone else). Always returns -1. */
int shm_fail(shm_handle *h, int mode, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int shm_check_usable(shm_handle *h);
int shm_wait_ge(shm_handle *h, _Atomic uint32_t *word, _Atomic uint32_t *waiters,
                uint32_t target, int peer, const char *what);
/* shm_wait_ge that also calls check(ctx) whenever it stops spinning (yield and sleep phases);
 * a non-zero return ends the wait with -1 (check records the error itself). */
typedef int (*shm_wait_check)(shm_handle *h, void *ctx);
int shm_wait_ge_checked(shm_handle *h, _Atomic uint32_t *word, _Atomic uint32_t *waiters,
                        uint32_t target, int peer, const char *what, shm_wait_check check,
                        void *ctx);
void shm_publish(_Atomic uint32_t *word, _Atomic uint32_t *waiters, uint32_t value);
static inline int shm_stamp_ge(uint32_t a, uint32_t b) { return (int32_t)(a - b) >= 0; }

/* ---- kernels (shm_kernels.c) ---- */
size_t shm_dtype_size(int dtype);
/* out[i] = sum_p srcs[p][i] accumulated in fp32 in rank order; out2 (optional) gets a copy. */
void shm_reduce(int dtype, void *out, void *out2, const void *const *srcs, int nsrc, size_t n);
/* Copy bytes [off, off + len) of a source stream (head, then body) to dst. */
void shm_src_copy(const shm_src *s, uint64_t off, uint64_t len, char *dst);


/* ---- exported C ABI (loaded with ctypes by moe_ep/distributed/shm.py) ---- */
#define SHM_API __attribute__((visibility("default")))

SHM_API uint32_t shm_abi_version(void);
SHM_API const char *shm_init_error(void);
SHM_API const char *shm_last_error(shm_handle *h);
SHM_API shm_handle *init_shm_manager(const char *name, int group_size, int rank,
                                     const shm_options *opts);
SHM_API int join_shm_manager(shm_handle *h, const char *name, char *desc, size_t desc_cap);
SHM_API int shm_unlink_name(const char *name);
SHM_API void shm_destroy(shm_handle *h);
SHM_API void shm_abort(shm_handle *h, const char *msg);
SHM_API uint64_t shm_segment_bytes(shm_handle *h);
SHM_API int shm_group_size(shm_handle *h);
SHM_API int shm_group_rank(shm_handle *h);

SHM_API int shm_barrier(shm_handle *h);
SHM_API int shm_allreduce(shm_handle *h, const void *in, void *out, uint64_t numel, int dtype);
SHM_API int shm_reduce_scatter(shm_handle *h, const void *in, void *out, uint64_t numel,
                               uint64_t lo, uint64_t hi, int dtype);
SHM_API int shm_gather_begin(shm_handle *h, int dst, const void *in, uint64_t nbytes,
                             uint64_t row_bytes, int dtype, uint64_t *sizes_out);
SHM_API int shm_all_gather_begin(shm_handle *h, const void *in, uint64_t nbytes,
                                 uint64_t row_bytes, int dtype, uint64_t *sizes_out);
SHM_API int shm_gather_finish(shm_handle *h, void *const *outs);
/* As shm_gather_finish, but rank p's byte k lands at outs[p] + (k / block) * stride + k % block
 * (block 0: contiguous). */
SHM_API int shm_gather_finish_strided(shm_handle *h, void *const *outs, uint64_t block,
                                      uint64_t stride);
/* Called by every rank's waits about every 20 ms while asleep (NULL: none). A non-zero return
 * fails the op with an "interrupted" error, aborts the group (peers fail too) and sets
 * shm_interrupted(h). Python registers PyOS_InterruptOccurred, so SIGINT reaches a waiting rank. */
SHM_API void shm_set_interrupt_check(int (*check)(void));
SHM_API int shm_interrupted(shm_handle *h);
/* all_to_all(v): rank d receives [head[d] (head_bytes[d])][body]; body = body_bytes[d] bytes at
 * body[d], or, with body_idx, the rows body[d][body_idx[d][i] * row_bytes ...]. heads / body_idx
 * may be NULL. begin returns, per source rank, the head and body bytes to expect; finish
 * copies them to head_out[p] / body_out[p] (head_out may be NULL when no head arrives). */
SHM_API int shm_all_to_all_begin(shm_handle *h, const void *const *heads,
                                 const uint64_t *head_bytes, const void *const *body,
                                 const uint64_t *body_bytes, const int64_t *const *body_idx,
                                 uint64_t row_bytes, int dtype, uint64_t *recv_head_out,
                                 uint64_t *recv_body_out);
SHM_API int shm_all_to_all_finish(shm_handle *h, void *const *head_out, void *const *body_out);
SHM_API int shm_send_tensor_list(shm_handle *h, int dst, int n, const void *const *ptrs,
                                 const uint64_t *nbytes, const void *meta, uint64_t meta_len);
SHM_API int shm_recv_begin(shm_handle *h, int src, uint64_t *meta_len, uint64_t *data_len);
SHM_API int shm_recv_bytes(shm_handle *h, int src, void *buf, uint64_t n);

#endif /* MOE_EP_SHM_H */
