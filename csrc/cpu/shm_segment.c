/*
 * Segment lifecycle (create / open / join / destroy), error reporting, and the wait primitive
 * shared by every operation: spin, then yield, then sleep on a process-shared futex, checking
 * peer liveness, the group's abort flag and the timeout while asleep.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "shm.h"

#define PAGE 4096ULL
#define ALIGN_UP(x, a) (((x) + (a) - 1) / (a) * (a))
/* Sleep at most this long per futex wait, so a dead peer or an abort is noticed quickly. */
#define FUTEX_SLICE_NS (20LL * 1000 * 1000)
#define LIVENESS_PERIOD_NS (50LL * 1000 * 1000)

static __thread char g_init_error[SHM_ERR_LEN];
static int (*_Atomic g_interrupt_check)(void);

void shm_set_interrupt_check(int (*check)(void)) { atomic_store(&g_interrupt_check, check); }
int shm_interrupted(shm_handle *h) { return h ? h->interrupted : 0; }

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield" ::: "memory");
#endif
}

static long futex_wait(_Atomic uint32_t *addr, uint32_t expected, int64_t timeout_ns) {
  struct timespec ts = {.tv_sec = timeout_ns / 1000000000LL, .tv_nsec = timeout_ns % 1000000000LL};
  /* Not FUTEX_PRIVATE: the word lives in memory shared between processes. */
  return syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, expected, &ts, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *addr) {
  syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

void shm_publish(_Atomic uint32_t *word, _Atomic uint32_t *waiters, uint32_t value) {
  /* seq_cst store + seq_cst load pairs with the waiter's increment-then-recheck, so either the
   * waiter sees the new value or we see the waiter and wake it (no lost wake-up). The locked
   * store also orders any preceding non-temporal stores of the payload. */
  atomic_store_explicit(word, value, memory_order_seq_cst);
  if (atomic_load_explicit(waiters, memory_order_seq_cst) != 0) futex_wake_all(word);
}

static uint64_t self_pidns(void) {
  struct stat st;
  if (stat("/proc/self/ns/pid", &st) != 0) return 0;
  return (uint64_t)st.st_ino;
}

/* 1 alive, 0 dead (gone or zombie). A zombie still answers kill(pid, 0) until its parent reaps
 * it, so the state letter in /proc/<pid>/stat decides. */
static int pid_alive(int32_t pid) {
  if (pid <= 0) return 1;
  if (kill(pid, 0) != 0 && errno == ESRCH) return 0;
  char path[64], buf[512];
  snprintf(path, sizeof path, "/proc/%d/stat", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno == ENOENT ? 0 : 1;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 1;
  buf[n] = 0;
  char *p = strrchr(buf, ')');
  if (p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X')) return 0;
  return 1;
}

static void wake_everyone(shm_handle *h) {
  for (int p = 0; p < h->world; ++p) {
    futex_wake_all(&h->ctl[p].ready);
    futex_wake_all(&h->ctl[p].consumed);
  }
  for (int i = 0; i < h->world * h->world; ++i) {
    futex_wake_all(&h->chan[i].sent);
    futex_wake_all(&h->chan[i].recvd);
  }
}

static void set_abort(shm_handle *h, const char *msg) {
  uint32_t expected = 0;
  if (atomic_compare_exchange_strong(&h->hdr->abort_flag, &expected, 2u)) {
    /* 2 = message being written; readers wait for 1 before trusting abort_msg. */
    h->hdr->abort_rank = h->rank;
    snprintf(h->hdr->abort_msg, sizeof h->hdr->abort_msg, "%s", msg);
    atomic_store(&h->hdr->abort_flag, 1u);
  }
  wake_everyone(h);
}

int shm_fail(shm_handle *h, int mode, const char *fmt, ...) {
  char msg[SHM_ERR_LEN];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  snprintf(h->err, sizeof h->err, "%s", msg);
  /* An argument error leaves the stamps consistent (nothing was published): the handle stays
   * usable. Anything else leaves peers mid-operation: the handle is dead for good. */
  if (mode != SHM_FAIL_ARG) h->broken = 1;
  if (mode == SHM_FAIL_ABORT) set_abort(h, msg);
  return -1;
}

static int check_abort(shm_handle *h) {
  uint32_t f = atomic_load_explicit(&h->hdr->abort_flag, memory_order_acquire);
  if (f == 0) return 0;
  for (int i = 0; f == 2 && i < 100000; ++i) {
    cpu_relax();
    f = atomic_load_explicit(&h->hdr->abort_flag, memory_order_acquire);
  }
  char msg[SHM_ERR_LEN];
  snprintf(msg, sizeof msg, "%s", f == 1 ? h->hdr->abort_msg : "(no message)");
  return shm_fail(h, SHM_FAIL_BROKEN, "shm group '%s': rank %d aborted the group: %s", h->name,
                  h->hdr->abort_rank, msg);
}

int shm_check_usable(shm_handle *h) {
  if (h->broken) return -1;
  return check_abort(h);
}

/* Returns the first peer found dead, or -1. */
static int find_dead_peer(shm_handle *h) {
  for (int p = 0; p < h->world; ++p) {
    if (p == h->rank) continue;
    shm_rank_info *ri = &h->hdr->ranks[p];
    if (!atomic_load(&ri->joined) || ri->pidns != h->my_pidns || h->my_pidns == 0) continue;
    if (!pid_alive(atomic_load(&ri->pid))) return p;
  }
  return -1;
}

int shm_wait_ge(shm_handle *h, _Atomic uint32_t *word, _Atomic uint32_t *waiters,
                uint32_t target, int peer, const char *what) {
  return shm_wait_ge_checked(h, word, waiters, target, peer, what, NULL, NULL);
}

int shm_wait_ge_checked(shm_handle *h, _Atomic uint32_t *word, _Atomic uint32_t *waiters,
                        uint32_t target, int peer, const char *what, shm_wait_check check,
                        void *ctx) {
  if (shm_stamp_ge(atomic_load_explicit(word, memory_order_acquire), target)) return 0;
  int64_t start = now_ns();
  int64_t t = start;
  /* Phase 1: spin (cheap when the peer runs on another core right now). */
  for (unsigned i = 1;; ++i) {
    cpu_relax();
    if (shm_stamp_ge(atomic_load_explicit(word, memory_order_acquire), target)) return 0;
    if ((i & 63) == 0) {
      t = now_ns();
      if (t - start >= h->spin_ns) break;
    }
  }
  /* Phase 2: yield, so that a peer sharing this core gets to run. */
  while (t - start < h->spin_ns + h->yield_ns) {
    sched_yield();
    if (shm_stamp_ge(atomic_load_explicit(word, memory_order_acquire), target)) return 0;
    if (check && check(h, ctx)) return -1;
    t = now_ns();
  }
  /* Phase 3: sleep on the futex in short slices. */
  for (;;) {
    atomic_fetch_add_explicit(waiters, 1, memory_order_seq_cst);
    uint32_t v = atomic_load_explicit(word, memory_order_seq_cst);
    if (!shm_stamp_ge(v, target)) futex_wait(word, v, FUTEX_SLICE_NS);
    atomic_fetch_sub_explicit(waiters, 1, memory_order_seq_cst);
    if (shm_stamp_ge(atomic_load_explicit(word, memory_order_acquire), target)) return 0;
    if (check_abort(h)) return -1;
    int (*interrupt_check)(void) = atomic_load(&g_interrupt_check);
    if (interrupt_check && interrupt_check()) {
      h->interrupted = 1;
      return shm_fail(h, SHM_FAIL_ABORT,
                      "shm group '%s': rank %d was interrupted (SIGINT) while waiting for rank %d "
                      "in %s", h->name, h->rank, peer, what);
    }
    if (check && check(h, ctx)) return -1;
    t = now_ns();
    if (t - h->last_liveness_ns >= LIVENESS_PERIOD_NS) {
      h->last_liveness_ns = t;
      int dead = find_dead_peer(h);
      if (dead >= 0)
        return shm_fail(h, SHM_FAIL_ABORT,
                        "shm group '%s': rank %d (pid %d) died while rank %d was waiting for "
                        "rank %d in %s",
                        h->name, dead, (int)atomic_load(&h->hdr->ranks[dead].pid), h->rank,
                        peer, what);
    }
    if (t - start >= h->timeout_ns)
      return shm_fail(h, SHM_FAIL_ABORT,
                      "shm group '%s': rank %d timed out after %.1f s waiting for rank %d in %s "
                      "(a peer is stuck or called a different collective)",
                      h->name, h->rank, (double)h->timeout_ns / 1e9, peer, what);
  }
}

/* ------------------------------------------------------------------------------------------ */

uint32_t shm_abi_version(void) { return SHM_ABI_VERSION; }
const char *shm_init_error(void) { return g_init_error; }
const char *shm_last_error(shm_handle *h) { return h ? h->err : g_init_error; }
uint64_t shm_segment_bytes(shm_handle *h) { return h->size; }
int shm_group_size(shm_handle *h) { return h->world; }
int shm_group_rank(shm_handle *h) { return h->rank; }

static void layout(shm_header *hd, int world, uint64_t coll_half, uint64_t p2p_half,
                   uint64_t user_bytes) {
  uint64_t off = ALIGN_UP(sizeof(shm_header), PAGE);
  hd->off_rank_ctl = off;
  off = ALIGN_UP(off + (uint64_t)world * sizeof(shm_rank_ctl), PAGE);
  hd->off_chan_ctl = off;
  off = ALIGN_UP(off + (uint64_t)world * world * sizeof(shm_chan_ctl), PAGE);
  hd->off_coll = off;
  off += (uint64_t)world * 2 * coll_half;
  hd->off_p2p = off;
  off += (uint64_t)world * world * 2 * p2p_half;
  off = ALIGN_UP(off, PAGE);
  hd->off_user = off;
  off += user_bytes;
  hd->total_bytes = ALIGN_UP(off, PAGE);
}

static void bind_pointers(shm_handle *h) {
  char *b = (char *)h->base;
  h->hdr = (shm_header *)b;
  h->ctl = (shm_rank_ctl *)(b + h->hdr->off_rank_ctl);
  h->chan = (shm_chan_ctl *)(b + h->hdr->off_chan_ctl);
  h->coll = b + h->hdr->off_coll;
  h->p2p = b + h->hdr->off_p2p;
  h->user_bytes = h->hdr->user_bytes;
  h->user = h->user_bytes ? b + h->hdr->off_user : NULL;
  h->coll_half = h->hdr->coll_half;
  h->p2p_half = h->hdr->p2p_half;
}

static shm_handle *init_fail(shm_handle *h, int fd, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static shm_handle *init_fail(shm_handle *h, int fd, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_init_error, sizeof g_init_error, fmt, ap);
  va_end(ap);
  if (fd >= 0) close(fd);
  if (h) {
    if (h->base && h->base != MAP_FAILED) munmap(h->base, h->size);
    free(h);
  }
  return NULL;
}

shm_handle *init_shm_manager(const char *name, int group_size, int rank, const shm_options *o) {
  g_init_error[0] = 0;
  if (!name || name[0] != '/' || strlen(name) >= 250 || strchr(name + 1, '/'))
    return init_fail(NULL, -1, "segment name must be '/<name>' without further '/', < 250 chars");
  if (group_size < 1 || group_size > SHM_MAX_RANKS)
    return init_fail(NULL, -1, "group_size must be in [1, %d], got %d", SHM_MAX_RANKS, group_size);
  if (rank < 0 || rank >= group_size)
    return init_fail(NULL, -1, "rank must be in [0, %d), got %d", group_size, rank);
  if (!o || o->coll_half < PAGE || o->coll_half % PAGE || o->p2p_half < PAGE ||
      o->p2p_half % PAGE)
    return init_fail(NULL, -1, "buffer sizes must be positive multiples of %llu bytes",
                     (unsigned long long)PAGE);
  if (o->coll_half / (uint64_t)group_size < 64)
    return init_fail(NULL, -1, "coll_half too small for %d ranks", group_size);

  shm_handle *h = calloc(1, sizeof *h);
  if (!h) return init_fail(NULL, -1, "out of memory");
  snprintf(h->name, sizeof h->name, "%s", name);
  h->rank = rank;
  h->world = group_size;
  h->creator = rank == 0;
  h->timeout_ns = (int64_t)(o->timeout_s * 1e9);
  if (h->timeout_ns <= 0) h->timeout_ns = 300LL * 1000000000LL;
  cpu_set_t cs;
  int ncpu = sched_getaffinity(0, sizeof cs, &cs) == 0 ? CPU_COUNT(&cs) : 1;
  /* With more ranks than cores a spinning waiter steals the core its peer needs: spin only
   * briefly then. */
  double spin_us = o->spin_us > 0 ? o->spin_us : (group_size > ncpu ? 2.0 : 50.0);
  double yield_us = o->yield_us > 0 ? o->yield_us : (group_size > ncpu ? 50.0 : 100.0);
  h->spin_ns = (int64_t)(spin_us * 1e3);
  h->yield_ns = (int64_t)(yield_us * 1e3);
  h->naive_max = o->naive_max;
  h->my_pidns = self_pidns();

  int fd;
  if (h->creator) {
    fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) return init_fail(h, -1, "shm_open(%s, O_CREAT|O_EXCL): %s", name, strerror(errno));
    fchmod(fd, 0600);
    shm_header tmp;
    memset(&tmp, 0, sizeof tmp);
    layout(&tmp, group_size, o->coll_half, o->p2p_half, o->user_bytes);
    h->size = tmp.total_bytes;
    /* Reserve the pages now: on a full tmpfs, touching an unreserved page raises SIGBUS later. */
    int rc = posix_fallocate(fd, 0, (off_t)h->size);
    if (rc != 0) {
      shm_unlink(name);
      return init_fail(h, fd, "cannot reserve %llu bytes of shared memory for %s: %s",
                       (unsigned long long)h->size, name, strerror(rc));
    }
    h->base = mmap(NULL, h->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (h->base == MAP_FAILED) {
      shm_unlink(name);
      return init_fail(h, fd, "mmap(%s): %s", name, strerror(errno));
    }
    close(fd);
    shm_header *hd = (shm_header *)h->base;
    hd->abi = SHM_ABI_VERSION;
    hd->world = (uint32_t)group_size;
    hd->coll_half = o->coll_half;
    hd->p2p_half = o->p2p_half;
    hd->off_rank_ctl = tmp.off_rank_ctl;
    hd->off_chan_ctl = tmp.off_chan_ctl;
    hd->off_coll = tmp.off_coll;
    hd->off_p2p = tmp.off_p2p;
    hd->off_user = tmp.off_user;
    hd->user_bytes = o->user_bytes;
    hd->total_bytes = tmp.total_bytes;
    atomic_store_explicit(&hd->magic, SHM_MAGIC, memory_order_release);
  } else {
    fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) return init_fail(h, -1, "shm_open(%s): %s", name, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) return init_fail(h, fd, "fstat(%s): %s", name, strerror(errno));
    /* Refuse a segment that another user could have planted or can read. */
    if (st.st_uid != geteuid() || (st.st_mode & 077))
      return init_fail(h, fd, "segment %s is not private to this user (uid %d, mode %o)", name,
                       (int)st.st_uid, (unsigned)(st.st_mode & 0777));
    if ((uint64_t)st.st_size < sizeof(shm_header))
      return init_fail(h, fd, "segment %s is truncated (%lld bytes)", name, (long long)st.st_size);
    h->size = (size_t)st.st_size;
    h->base = mmap(NULL, h->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (h->base == MAP_FAILED) return init_fail(h, fd, "mmap(%s): %s", name, strerror(errno));
    close(fd);
    shm_header *hd = (shm_header *)h->base;
    if (atomic_load_explicit(&hd->magic, memory_order_acquire) != SHM_MAGIC ||
        hd->abi != SHM_ABI_VERSION)
      return init_fail(h, -1, "segment %s is not an initialised moe_ep shm segment (abi %u)",
                       name, hd->abi);
    if (hd->world != (uint32_t)group_size || hd->total_bytes != h->size)
      return init_fail(h, -1, "segment %s was created for %u ranks, this rank expects %d", name,
                       hd->world, group_size);
  }
  bind_pointers(h);
  h->last_liveness_ns = now_ns();
  return h;
}

int join_shm_manager(shm_handle *h, const char *name, char *desc, size_t desc_cap) {
  if (!h) return -1;
  if (name && strcmp(name, h->name) != 0)
    return shm_fail(h, SHM_FAIL_ARG,
                    "join_shm_manager: handle belongs to %s, not %s", h->name, name);
  shm_rank_info *ri = &h->hdr->ranks[h->rank];
  ri->pidns = h->my_pidns;
  atomic_store(&ri->pid, (int32_t)getpid());
  atomic_store_explicit(&ri->joined, 1u, memory_order_release);
  if (desc && desc_cap)
    snprintf(desc, desc_cap,
             "%s rank %d/%d pid %d, %llu bytes (collective half %llu, p2p half %llu)",
             h->name, h->rank, h->world, (int)getpid(), (unsigned long long)h->size,
             (unsigned long long)h->coll_half, (unsigned long long)h->p2p_half);
  return 0;
}

int shm_unlink_name(const char *name) {
  if (shm_unlink(name) == 0 || errno == ENOENT) return 0;
  snprintf(g_init_error, sizeof g_init_error, "shm_unlink(%s): %s", name, strerror(errno));
  return -1;
}

void shm_abort(shm_handle *h, const char *msg) {
  if (!h) return;
  shm_fail(h, SHM_FAIL_ABORT,
           "shm group '%s': rank %d aborted: %s", h->name, h->rank, msg ? msg : "");
}

void shm_destroy(shm_handle *h) {
  if (!h) return;
  if (h->base && h->base != MAP_FAILED) munmap(h->base, h->size);
  free(h);
}
