"""Keep freed CPU memory for reuse, so large per-call tensors stop paying page faults.

glibc serves allocations above its mmap threshold (at most 32 MiB, adapted at run time) with a
fresh `mmap` and returns them to the kernel on free, so every combine that returns a large
`[N, H]` tensor first faults in every page of it. On the 2-core VM this project is developed on
a fault costs ~2.5 us per 4 KiB page: allocating and touching 32 MiB takes ~17 ms against ~2 ms
for the copy itself. CPU inference stacks avoid this with tcmalloc or jemalloc (vLLM's CPU
backend preloads tcmalloc).

The library does it itself: `tune_cpu_allocator()` runs once per process when the first CPU
manager or group is built (the caller sets nothing), says so in one INFO log line, and can be
turned off before that with `keep_system_allocator()` or the environment variable
`MOE_EP_SYSTEM_MALLOC=1` (for a process that already preloads tcmalloc / jemalloc, or that
must not grow its heap). `retain_freed_memory` is the mechanism (glibc `mallopt`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

__all__ = ["keep_system_allocator", "retain_freed_memory", "tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LOG = logging.getLogger(__name__)
_LOCK = threading.Lock()
_STATE: dict[str, bool | None] = {"decided": None}


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


def keep_system_allocator() -> None:
    """Opt out: the library will not call `retain_freed_memory` in this process."""
    with _LOCK:
        if _STATE["decided"] is None:
            _STATE["decided"] = False


def tune_cpu_allocator() -> bool:
    """Once per process: keep freed memory for reuse unless opted out; True when it is on."""
    with _LOCK:
        if _STATE["decided"] is not None:
            return bool(_STATE["decided"])
        if os.environ.get("MOE_EP_SYSTEM_MALLOC", "") not in ("", "0"):
            _STATE["decided"] = False
            _LOG.info("moe_ep: keeping the system allocator (MOE_EP_SYSTEM_MALLOC is set)")
            return False
        ok = retain_freed_memory()
        _STATE["decided"] = ok
        if ok:
            _LOG.info(
                "moe_ep: glibc malloc set to keep freed memory (M_MMAP_THRESHOLD=1 GiB, no "
                "trimming) so per-call CPU tensors reuse pages instead of faulting them in; "
                "opt out with moe_ep.cpu_allocator.keep_system_allocator() or "
                "MOE_EP_SYSTEM_MALLOC=1")
        return ok
