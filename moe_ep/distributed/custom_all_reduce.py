"""CUDA IPC custom all-reduce for small tensors on one node (binds csrc/custom_all_reduce.cu).

NCCL's all-reduce of a few KiB to a few MiB is latency bound; reading every peer's buffer
directly through CUDA IPC, after a flag barrier, takes one kernel (vLLM's custom all-reduce;
`csrc/custom_all_reduce.cuh` explains the kernels and the barrier). Contract:

* `CustomAllreduce(cpu_group, device, rank, world_size, same_node=...)` is collective over the
  gloo `cpu_group` (IPC handles are exchanged there). It never raises for an unsuitable group or
  machine: `disabled` is then True and `disabled_reason` says why (also logged); callers use
  NCCL.
* `should_custom_ar(x)` (the method) / `should_custom_ar(x, ...)` (the pure function) decide per
  tensor: fp32 / fp16 / bf16, a multiple of 16 bytes, 16-byte aligned, weakly contiguous, at
  most `max_size` bytes. The result equals the NCCL sum (accumulated in fp32, rank order,
  identical on every rank).
* Eager mode copies the input into a registered staging buffer. Inside `capture()` (around a
  CUDA-graph capture) inputs are recorded and registered with every peer after the capture;
  outside any capture, the warm-up runs of a graph (inside `capture()` but not capturing)
  return an uninitialised tensor of the right shape, as vLLM does.
* `close()` frees the IPC buffers (collective in effect: call it on every rank).

The native library (`moe_ep/_custom_ar*.so`) is built only where nvcc and a CUDA build of torch
are present; elsewhere `CustomAllreduce` is disabled with that reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from moe_ep.distributed.topology import nvlink_all_connected
from moe_ep.native_library import load_library

logger = logging.getLogger(__name__)

#: world sizes the kernels are instantiated for
CUSTOM_AR_WORLD_SIZES = (2, 4, 6, 8)
#: largest tensor (bytes) taken by default; NCCL wins above (vLLM's default)
DEFAULT_MAX_SIZE = 8 << 20
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_HANDLE_BYTES = 64
# Device scratch for RankData slots (64 bytes each): registered buffers + graph inputs.
_RANK_DATA_BYTES = 8 << 20


# ------------------------------------------------------------------------ decisions
def custom_ar_group_reason(
    *, world_size: int, same_node: bool, p2p_ok: bool, fully_connected: bool | None,
    library_reason: str = "",
) -> str:
    """Why a group cannot use the custom all-reduce, or "" when it can (pure).

    Args:
        world_size: ranks in the group.
        same_node: every rank is on one node (CUDA IPC does not cross nodes).
        p2p_ok: every pair of the group's GPUs can access each other (peer access).
        fully_connected: all GPUs NVLink-connected (None: unknown); needed beyond 2 ranks,
            where PCIe would be slower than NCCL.
        library_reason: why the native library cannot load ("" when it can).
    """
    if library_reason:
        return library_reason
    if world_size == 1:
        return "a group of one rank does not communicate"
    if world_size not in CUSTOM_AR_WORLD_SIZES:
        return f"world size {world_size} is not one of {CUSTOM_AR_WORLD_SIZES}"
    if not same_node:
        return "the group spans more than one node"
    if not p2p_ok:
        return "some GPUs of the group cannot access each other (P2P check failed)"
    if world_size > 2 and fully_connected is False:
        return f"{world_size} GPUs that are not fully NVLink-connected (PCIe would be slower)"
    return ""


def should_custom_ar(
    x: torch.Tensor, *, max_size: int = DEFAULT_MAX_SIZE, world_size: int = 2,
    same_node: bool = True, p2p_ok: bool = True, fully_connected: bool | None = True,
) -> tuple[bool, str]:
    """Whether the custom all-reduce takes `x`, and why not (pure; device not checked).

    `x`: any tensor; taken when fp32 / fp16 / bf16, a multiple of 16 bytes, 16-byte aligned,
    weakly contiguous (its elements fill the rest of its storage), at most `max_size` bytes,
    on a group that qualifies (`custom_ar_group_reason`). Returns `(ok, reason)`.
    """
    why = custom_ar_group_reason(
        world_size=world_size, same_node=same_node, p2p_ok=p2p_ok,
        fully_connected=fully_connected,
    )
    if why:
        return False, why
    if x.dtype not in _DTYPE_CODES:
        return False, f"dtype {x.dtype} is not float32, float16 or bfloat16"
    nbytes = x.numel() * x.element_size()
    if nbytes == 0:
        return False, "empty tensor"
    if nbytes % 16:
        return False, f"{nbytes} bytes is not a multiple of 16"
    if nbytes > max_size:
        return False, f"{nbytes} bytes is above max_size={max_size}"
    if not _weakly_contiguous(x):
        return False, "not (weakly) contiguous"
    if x.data_ptr() % 16:
        return False, "data pointer not 16-byte aligned"
    return True, ""


def _weakly_contiguous(x: torch.Tensor) -> bool:
    storage = x.untyped_storage().nbytes() - x.storage_offset() * x.element_size()
    return x.is_contiguous() or storage == x.numel() * x.element_size()


# ------------------------------------------------------------------------- library
@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The native library and "", or None and why it cannot be used here."""
    if not torch.cuda.is_available():
        return None, "CUDA is not available"
    i64, i32, cp = ctypes.c_int64, ctypes.c_int, ctypes.c_char_p
    p64 = ctypes.POINTER(ctypes.c_int64)
    sigs = {
        "car_last_error": (cp, []),
        "meta_size": (i64, []),
        "allocate_shared_buffer_and_handle": (i32, [i64, p64, cp]),
        "open_mem_handle": (i32, [cp, p64]),
        "close_mem_handle": (i32, [i64]),
        "free_shared_buffer": (i32, [i64]),
        "init_custom_ar": (i32, [p64, i32, i64, i64, i32, i32, p64]),
        "dispose": (None, [i64]),
        "register_buffer": (i32, [i64, p64]),
        "graph_buffer_count": (i64, [i64]),
        "get_graph_buffer_ipc_meta": (i32, [i64, cp, p64]),
        "register_graph_buffers": (i32, [i64, cp, p64, i64]),
        "all_reduce": (i32, [i64, i64, i64, i64, i32, i64, i64, i64]),
    }
    return load_library("moe_ep._custom_ar", sigs, not_built=(
        "the CUDA library moe_ep._custom_ar is not built (it needs nvcc and a CUDA build of "
        "torch at install time; reinstall with `pip install --no-build-isolation .`)"
    ))


def library_unavailable_reason() -> str:
    """"" when the native custom all-reduce library loads here, else why not."""
    return _load()[1]


class CustomAllreduceError(RuntimeError):
    """A native custom all-reduce call failed (the message is CUDA's)."""


def _check(lib: ctypes.CDLL, rc: int, what: str) -> None:
    if rc:
        raise CustomAllreduceError(f"{what}: {lib.car_last_error().decode(errors='replace')}")


# ----------------------------------------------------------------------- the class
class CustomAllreduce:
    """The custom all-reduce of one group of CUDA ranks on one node.

    Args:
        group: the group's gloo process group (handles are exchanged there).
        device: this rank's CUDA device.
        rank, world_size: this rank's index in the group and the group's size.
        same_node: every rank of the group is on one node (decided by the caller, collectively).
        max_size: largest all-reduce in bytes (the staging and tmp buffers are this large).
        group_name: label for logs.
    """

    def __init__(
        self,
        group: ProcessGroup,
        device: torch.device,
        rank: int,
        world_size: int,
        *,
        same_node: bool,
        max_size: int = DEFAULT_MAX_SIZE,
        group_name: str = "",
    ):
        self.group = group
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.max_size = max_size
        self.group_name = group_name
        self.disabled = True
        self._capturing = False
        self._fa = 0
        self._own: list[int] = []
        self._opened: list[int] = []
        lib, lib_reason = _load()
        p2p, connected = self._p2p() if lib is not None and world_size > 1 else (False, None)
        reason = custom_ar_group_reason(
            world_size=world_size, same_node=same_node, p2p_ok=p2p, fully_connected=connected,
            library_reason=lib_reason,
        )
        # Every rank must agree, or the next all-reduce would take two paths.
        reasons = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(reasons, reason, group=group)
        else:
            reasons = [reason]
        bad = [f"rank {r}: {why}" for r, why in enumerate(reasons) if why]
        if bad:
            self.disabled_reason = "; ".join(bad)
            logger.info("group %r: custom all-reduce disabled (%s); all-reduce uses NCCL",
                        group_name, self.disabled_reason)
            return
        self.disabled_reason = ""
        self._lib = lib
        with torch.cuda.device(self.device):
            self.meta_ptrs = self._create_shared_buffer(lib.meta_size() + max_size)
            self.buffer_ptrs = self._create_shared_buffer(max_size)
            self._rank_data = torch.empty(_RANK_DATA_BYTES, dtype=torch.uint8, device=self.device)
            fa = ctypes.c_int64()
            _check(lib, lib.init_custom_ar(
                (ctypes.c_int64 * world_size)(*self.meta_ptrs), world_size,
                self._rank_data.data_ptr(), _RANK_DATA_BYTES, rank, int(bool(connected)),
                ctypes.byref(fa),
            ), "init_custom_ar")
            self._fa = fa.value
            _check(lib, lib.register_buffer(self._fa, (ctypes.c_int64 * world_size)(
                *self.buffer_ptrs)), "register_buffer")
        self.disabled = False
        logger.info("group %r: custom all-reduce enabled (%d ranks, up to %d bytes)",
                    group_name, world_size, max_size)

    def _p2p(self) -> tuple[bool, bool | None]:
        """(peer access between every pair of visible GPUs, NVLink all-to-all or None)."""
        n = torch.cuda.device_count()
        try:
            ok = all(
                torch.cuda.can_device_access_peer(a, b)
                for a in range(n) for b in range(n) if a != b
            )
        except RuntimeError:
            ok = False
        # One GPU shared by every rank: IPC within a device needs no peer access.
        return ok, nvlink_all_connected(n) if n > 1 else True

    def _create_shared_buffer(self, size: int) -> list[int]:
        """Allocate `size` bytes here, map every peer's; their addresses in rank order."""
        lib = self._lib
        ptr, handle = ctypes.c_int64(), ctypes.create_string_buffer(_HANDLE_BYTES)
        _check(lib, lib.allocate_shared_buffer_and_handle(size, ctypes.byref(ptr), handle),
               "allocate_shared_buffer_and_handle")
        self._own.append(ptr.value)
        handles = [None] * self.world_size
        dist.all_gather_object(handles, handle.raw, group=self.group)
        ptrs = []
        for r, h in enumerate(handles):
            if r == self.rank:
                ptrs.append(ptr.value)
                continue
            peer = ctypes.c_int64()
            _check(lib, lib.open_mem_handle(h, ctypes.byref(peer)), "open_mem_handle")
            self._opened.append(peer.value)
            ptrs.append(peer.value)
        return ptrs

    # -------------------------------------------------------------------- decisions
    def should_custom_ar(self, x: torch.Tensor) -> bool:
        """Whether `x` takes this path (see the module docstring)."""
        if self.disabled:
            return False
        ok, why = should_custom_ar(x, max_size=self.max_size, world_size=self.world_size)
        if not ok:
            logger.debug("group %r: NCCL all-reduce for this tensor: %s", self.group_name, why)
        return ok

    # ------------------------------------------------------------------- graph mode
    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Wrap a CUDA-graph capture: inputs met inside are registered with the peers after it
        (collective: every rank captures the same all-reduces)."""
        try:
            self._capturing = True
            yield
        finally:
            self._capturing = False
            if not self.disabled:
                self.register_graph_buffers()

    def register_graph_buffers(self) -> None:
        lib, fa = self._lib, self._fa
        n = int(lib.graph_buffer_count(fa))
        handles = ctypes.create_string_buffer(max(n, 1) * _HANDLE_BYTES)
        offsets = (ctypes.c_int64 * max(n, 1))()
        _check(lib, lib.get_graph_buffer_ipc_meta(fa, handles, offsets),
               "get_graph_buffer_ipc_meta")
        mine = (handles.raw[: n * _HANDLE_BYTES], list(offsets)[:n])
        every = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.group)
        if any(len(o) != n for _, o in every):
            raise CustomAllreduceError(
                f"register_graph_buffers: ranks captured different numbers of all-reduces "
                f"{[len(o) for _, o in every]}"
            )
        all_handles = b"".join(h for h, _ in every)
        all_offsets = (ctypes.c_int64 * max(n * self.world_size, 1))(
            *[v for _, o in every for v in o]
        )
        _check(lib, lib.register_graph_buffers(fa, all_handles, all_offsets, n),
               "register_graph_buffers")
        logger.debug("group %r: registered %d graph buffers", self.group_name, n)

    # -------------------------------------------------------------------- the op
    def all_reduce(
        self, x: torch.Tensor, out: torch.Tensor | None = None, *, registered: bool = False
    ) -> torch.Tensor:
        """Sum of `x` over the group into `out` (new when None). `registered=True` reads `x` in
        place (it must be registered, or be met while capturing); otherwise it is copied into
        the staging buffer first."""
        if registered and out is x:
            # Peers read x while this rank would write it: sum elsewhere, then copy back.
            return x.copy_(self.all_reduce(x, registered=True))
        if out is None:
            out = torch.empty_like(x)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        staging = 0 if registered else self.buffer_ptrs[self.rank]
        _check(self._lib, self._lib.all_reduce(
            self._fa, x.data_ptr(), out.data_ptr(), x.numel(), _DTYPE_CODES[x.dtype], staging,
            self.max_size, stream,
        ), "all_reduce")
        return out

    def custom_all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The all-reduce in the current mode (eager, capturing, or a graph's warm-up)."""
        if self._capturing:
            if torch.cuda.is_current_stream_capturing():
                return self.all_reduce(x, out, registered=True)
            # Warm-up run before the capture: the result is not used, only its shape.
            return torch.empty_like(x) if out is None else out
        return self.all_reduce(x, out, registered=False)

    def close(self) -> None:
        """Free the buffers (idempotent)."""
        if self.disabled or not self._fa:
            return
        lib = self._lib
        lib.dispose(self._fa)
        self._fa = 0
        for p in self._opened:
            lib.close_mem_handle(p)
        for p in self._own:
            lib.free_shared_buffer(p)
        self._opened, self._own = [], []
        self.disabled = True
        self.disabled_reason = "closed"
