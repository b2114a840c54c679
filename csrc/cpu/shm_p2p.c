/*
 * Point-to-point tensor lists over one channel per ordered pair (src, dst): a byte stream cut
 * into chunks of at most p2p_half bytes, double buffered. A message is
 *   [u64 meta_len][u64 data_len][meta][tensor 0 bytes][tensor 1 bytes]...
 * and always ends on a chunk boundary, so the receiver can read it piecewise (header, then
 * metadata, then each tensor straight into its freshly allocated storage).
 */
#include <string.h>

#include "shm.h"

static inline shm_chan_ctl *chan(shm_handle *h, int src, int dst) {
  return &h->chan[src * h->world + dst];
}

static inline char *chan_half(shm_handle *h, int src, int dst, uint32_t seq) {
  return h->p2p + ((uint64_t)(src * h->world + dst) * 2 + (seq & 1u)) * h->p2p_half;
}

typedef struct {
  const char *ptr;
  uint64_t len;
} piece;

int shm_send_tensor_list(shm_handle *h, int dst, int n, const void *const *ptrs,
                         const uint64_t *nbytes, const void *meta, uint64_t meta_len) {
  if (shm_check_usable(h)) return -1;
  if (dst < 0 || dst >= h->world || dst == h->rank)
    return shm_fail(h, SHM_FAIL_ARG, "send: dst %d must be another rank in [0, %d)", dst, h->world);
  if (n < 0) return shm_fail(h, SHM_FAIL_ARG, "send: negative tensor count %d", n);
  uint64_t head[2] = {meta_len, 0};
  for (int i = 0; i < n; ++i) head[1] += nbytes[i];

  shm_chan_ctl *c = chan(h, h->rank, dst);
  /* Pieces: header, metadata, tensors; walked with (pi, po) as a cursor. */
  int npieces = n + 2, pi = 0;
  uint64_t po = 0;
  uint64_t remaining = sizeof head + meta_len + head[1];
  while (remaining) {
    const uint32_t seq = h->send_seq[dst];
    if (shm_wait_ge(h, &c->recvd, &c->waiters, seq - 1u, dst, "send")) return -1;
    char *buf = chan_half(h, h->rank, dst, seq);
    uint64_t fill = 0;
    while (fill < h->p2p_half && pi < npieces) {
      piece pc;
      if (pi == 0) pc = (piece){(const char *)head, sizeof head};
      else if (pi == 1) pc = (piece){(const char *)meta, meta_len};
      else pc = (piece){(const char *)ptrs[pi - 2], nbytes[pi - 2]};
      uint64_t take = pc.len - po;
      if (take > h->p2p_half - fill) take = h->p2p_half - fill;
      memcpy(buf + fill, pc.ptr + po, take);
      fill += take;
      po += take;
      if (po == pc.len) {
        ++pi;
        po = 0;
      }
    }
    c->len[seq & 1u] = fill;
    shm_publish(&c->sent, &c->waiters, seq + 1u);
    h->send_seq[dst] = seq + 1u;
    remaining -= fill;
  }
  return 0;
}

static int recv_read(shm_handle *h, int src, char *out, uint64_t n) {
  shm_chan_ctl *c = chan(h, src, h->rank);
  while (n) {
    const uint32_t seq = h->recv_seq[src];
    if (shm_wait_ge(h, &c->sent, &c->waiters, seq + 1u, src, "recv")) return -1;
    const uint64_t len = c->len[seq & 1u];
    uint64_t take = len - h->recv_off[src];
    if (take > n) take = n;
    memcpy(out, chan_half(h, src, h->rank, seq) + h->recv_off[src], take);
    out += take;
    n -= take;
    h->recv_off[src] += take;
    if (h->recv_off[src] == len) {
      h->recv_off[src] = 0;
      h->recv_seq[src] = seq + 1u;
      shm_publish(&c->recvd, &c->waiters, seq + 1u);
    }
  }
  return 0;
}

int shm_recv_begin(shm_handle *h, int src, uint64_t *meta_len, uint64_t *data_len) {
  if (shm_check_usable(h)) return -1;
  if (src < 0 || src >= h->world || src == h->rank)
    return shm_fail(h, SHM_FAIL_ARG, "recv: src %d must be another rank in [0, %d)", src, h->world);
  if (h->recv_off[src] != 0)
    return shm_fail(h, SHM_FAIL_ABORT,
                    "shm group '%s': recv from %d started inside an unfinished message",
                    h->name, src);
  uint64_t head[2];
  if (recv_read(h, src, (char *)head, sizeof head)) return -1;
  *meta_len = head[0];
  *data_len = head[1];
  return 0;
}

int shm_recv_bytes(shm_handle *h, int src, void *buf, uint64_t n) {
  if (shm_check_usable(h)) return -1;
  if (src < 0 || src >= h->world || src == h->rank)
    return shm_fail(h, SHM_FAIL_ARG, "recv: src %d must be another rank in [0, %d)", src, h->world);
  return recv_read(h, src, (char *)buf, n);
}
