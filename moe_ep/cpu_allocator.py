"""Keep freed CPU memory for reuse, so large per-call tensors stop paying page faults.

glibc serves allocations above its mmap threshold (at most 32 MiB, adapted at run time) with a
fresh `mmap` and returns them to the kernel on free, so every dispatch that allocates a large
packed tensor first faults in every page of it. On the 2-core VM this project is developed on a
fault costs ~2.5 us per 4 KiB page: allocating and touching 32 MiB takes ~17 ms against ~2 ms
for the copy itself. CPU inference stacks avoid this with tcmalloc or jemalloc (vLLM's CPU
backend preloads tcmalloc); `retain_freed_memory` gets the same effect from glibc alone. It is
process-wide. The benchmark calls it in every rank, for every backend alike; the transports
whose calls return fresh CPU tensors (a shared-memory group, a TCP KV pipe) call
`retain_freed_memory_once` when they are built, which logs it once per process;
`set_retain_freed_memory(False)` beforehand opts out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(mmap_threshold_bytes: int = 1 << 30) -> bool:
    """Serve allocations below `mmap_threshold_bytes` from the heap and never trim it.

    Returns True when glibc accepted both settings, False elsewhere (another libc or OS), where
    nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold_bytes)) == 1
    ok_trim = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return ok_mmap and ok_trim


_POLICY = {"enabled": True, "done": False}
_POLICY_LOCK = threading.Lock()


def set_retain_freed_memory(enabled: bool) -> None:
    """Whether the library's transports may call `retain_freed_memory` when they are built
    (default True). Call it before building groups or pipes to leave the allocator alone."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    with _POLICY_LOCK:
        _POLICY["enabled"] = enabled


def retain_freed_memory_once(by: str) -> bool:
    """`retain_freed_memory()` the first time a transport asks (unless opted out), logged with
    `by` (who asked). Returns True when this call changed the allocator."""
    with _POLICY_LOCK:
        if _POLICY["done"] or not _POLICY["enabled"]:
            return False
        _POLICY["done"] = True
    if retain_freed_memory():
        logger.info(
            "%s: glibc malloc now keeps freed memory for reuse (mmap threshold 1 GiB, no trim), "
            "so per-call CPU outputs do not page-fault; opt out with "
            "moe_ep.distributed.set_retain_freed_memory(False) before building groups", by,
        )
        return True
    logger.info("%s: could not tune the allocator (not glibc); outputs may page-fault", by)
    return False
