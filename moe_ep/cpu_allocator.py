"""Keep freed CPU memory for reuse, so large per-call tensors stop paying page faults.

glibc serves allocations above its mmap threshold (at most 32 MiB, adapted at run time) with a
fresh `mmap` and returns them to the kernel on free, so every combine that returns a large
`[N, H]` tensor first faults in every page of it. On the 2-core VM this project is developed on
a fault costs ~2.5 us per 4 KiB page: allocating and touching 32 MiB takes ~17 ms against ~2 ms
for the copy itself. CPU inference stacks avoid this with tcmalloc or jemalloc (vLLM's CPU
backend preloads tcmalloc).

The library does it itself: `tune_cpu_allocator(by)` runs once per process when the first
transport or manager whose calls return fresh CPU tensors is built (a shared-memory group, a
TCP KV pipe, a CPU manager), so the caller sets nothing; it says so in one INFO log line. Opt
out before that with `set_retain_freed_memory(False)` (also exported by `moe_ep.distributed`)
or the environment variable `MOE_EP_SYSTEM_MALLOC=1`, for a process that already preloads
tcmalloc / jemalloc or must not grow its heap. `retain_freed_memory` is the mechanism (glibc
`mallopt`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

__all__ = ["retain_freed_memory", "set_retain_freed_memory", "tune_cpu_allocator"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_POLICY = {"enabled": True, "done": False, "tuned": False}
_POLICY_LOCK = threading.Lock()


def retain_freed_memory(mmap_threshold_bytes: int = 1 << 30) -> bool:
    """Serve allocations below `mmap_threshold_bytes` from the heap and never trim it.

    Returns True when glibc accepted both settings, False elsewhere (another libc or OS), where
    nothing changes. Process-wide.
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


def set_retain_freed_memory(enabled: bool) -> None:
    """Whether the library may call `retain_freed_memory` when its first CPU transport or
    manager is built (default True). Call it before building groups to leave malloc alone."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    with _POLICY_LOCK:
        _POLICY["enabled"] = enabled


def tune_cpu_allocator(by: str = "moe_ep") -> bool:
    """Once per process: `retain_freed_memory()` unless opted out, logged with `by` (who
    asked). Returns whether the allocator keeps freed memory (now or from an earlier call)."""
    with _POLICY_LOCK:
        if _POLICY["done"]:
            return bool(_POLICY["tuned"])
        if not _POLICY["enabled"]:
            return False  # opted out for now; a later call after re-enabling may still tune
        _POLICY["done"] = True
        if os.environ.get("MOE_EP_SYSTEM_MALLOC", "") not in ("", "0"):
            logger.info("%s: keeping the system allocator (MOE_EP_SYSTEM_MALLOC is set)", by)
            return False
        _POLICY["tuned"] = retain_freed_memory()
    if _POLICY["tuned"]:
        logger.info(
            "%s: glibc malloc now keeps freed memory for reuse (mmap threshold 1 GiB, no trim), "
            "so per-call CPU outputs do not page-fault; opt out with "
            "moe_ep.distributed.set_retain_freed_memory(False) or MOE_EP_SYSTEM_MALLOC=1 before "
            "building groups", by)
    else:
        logger.info("%s: could not tune the allocator (not glibc); outputs may page-fault", by)
    return bool(_POLICY["tuned"])
