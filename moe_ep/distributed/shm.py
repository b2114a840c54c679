"""CPU shared-memory collectives for the ranks of one node (binds the C library in csrc/cpu).

gloo moves CPU tensors through TCP sockets even between processes on one machine; here every
group gets one POSIX shared-memory segment and the data moves with plain memory copies. The C
library (`moe_ep._shm_native`, built by `pip install`, loaded with ctypes) implements the
protocol; this module loads it, checks arguments, allocates outputs and owns the segment's
lifecycle:

* Rank 0 creates the segment (`O_CREAT | O_EXCL`, mode 0600) under a name that carries its pid
  and a random token, so two groups or two jobs never share one. The other ranks map it, and
  once every rank has mapped it every rank unlinks the name: from then on nothing can leak into
  `/dev/shm`, whatever happens to the processes. Before that point a failure unlinks the name
  on the ranks that know it (and an `atexit` hook covers an orderly exit).
* Every wait spins briefly, yields, then sleeps on a futex, checking that the peers' processes
  are alive, that no rank aborted the group, and a timeout; a dead or stuck peer makes the
  survivors raise `ShmError` naming it instead of hanging.

The seven module-level functions carry the names of vLLM's CPU communicator ops
(`init_shm_manager`, `join_shm_manager`, `shm_allreduce`, `shm_gather`, `shm_all_gather`,
`shm_send_tensor_list`, `shm_recv_tensor_list`); `ShmCommunicator` is the object
`GroupCoordinator` uses. A handle is not thread safe: one thread per rank issues its ops, in the
same order on every rank (like any process group).
"""

from __future__ import annotations

import array
import atexit
import ctypes
import math
import mmap
import os
import re
import secrets
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

from moe_ep.native_library import load_library

__all__ = [
    "CARRIED_DTYPES",
    "REDUCE_DTYPES",
    "RowsExchange",
    "ShmCommunicator",
    "ShmError",
    "ShmUnavailableError",
    "init_shm_manager",
    "join_shm_manager",
    "SharedBuffer",
    "native_library",
    "shm_all_gather",
    "shm_allreduce",
    "shm_gather",
    "shm_recv_tensor_list",
    "shm_send_tensor_list",
]

_ABI_VERSION = 6
_MAX_RANKS = 64
_PAGE = 4096
# Per rank: two halves of this size. 16 MiB tensors then take a few steps; more buys little
# (the copies dominate) and costs world * 2 * this of shared memory.
DEFAULT_BUFFER_BYTES = 4 << 20
# Point-to-point channels exist for every ordered pair (world^2 of them), so they stay smaller.
DEFAULT_P2P_BUFFER_BYTES = 256 << 10
_P2P_BUDGET_BYTES = 64 << 20
# All-reduce chunks up to this size use one step in which every rank sums every slot; larger
# ones reduce-scatter + all-gather through the slots (less memory traffic, one more sync).
DEFAULT_NAIVE_MAX_BYTES = 256 << 10
DEFAULT_TIMEOUT_S = 300.0

_REDUCE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Codes for the dtypes that data-movement ops and tensor lists carry (order is wire format).
_DTYPES: tuple[torch.dtype, ...] = tuple(
    d
    for d in (
        torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
        getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None),
        getattr(torch, "uint16", None), getattr(torch, "uint32", None),
        getattr(torch, "uint64", None),
    )
    if d is not None
)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
#: dtypes the reductions sum natively (accumulating in fp32)
REDUCE_DTYPES: tuple[torch.dtype, ...] = tuple(_REDUCE_CODES)
#: dtypes the data-movement ops (gathers, all-to-all, tensor lists) carry
CARRIED_DTYPES: tuple[torch.dtype, ...] = _DTYPES


@dataclass(frozen=True, eq=False)
class RowsExchange:
    """What `ShmCommunicator.all_to_all_rows` delivers, per source rank (rank order).

    Attributes:
        flat: `[sum m_s, *trailing]` every received row, in source-rank order.
        rows: `[m_s, *trailing]` the rows rank s sent here (views of `flat`).
        heads: `[b_s] uint8` the head bytes rank s sent here (64-byte aligned views, so
            `.view(dtype)` works for any dtype whose size divides b_s).
    """

    flat: torch.Tensor
    rows: tuple[torch.Tensor, ...]
    heads: tuple[torch.Tensor, ...]


class ShmError(RuntimeError):
    """A shared-memory collective failed: a peer died, timed out, or called another op.

    The communicator is unusable afterwards (its peers were left mid-operation); every rank of
    the group fails, because the failing rank aborts the group.
    """


class ShmUnavailableError(RuntimeError):
    """The shared-memory layer cannot be used here (raised consistently on every rank)."""


# ------------------------------------------------------------------------------ library
class _Options(ctypes.Structure):
    _fields_ = [
        ("coll_half", ctypes.c_uint64),
        ("p2p_half", ctypes.c_uint64),
        ("timeout_s", ctypes.c_double),
        ("spin_us", ctypes.c_double),
        ("yield_us", ctypes.c_double),
        ("naive_max", ctypes.c_uint64),
        ("user_bytes", ctypes.c_uint64),
    ]


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The native library and "" or None and why it cannot be used."""
    if not sys.platform.startswith("linux"):
        return None, f"shared-memory collectives need Linux (this is {sys.platform})"
    vp, u64, i32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int
    sigs = {
        "shm_abi_version": (ctypes.c_uint32, []),
        "shm_init_error": (ctypes.c_char_p, []),
        "shm_last_error": (ctypes.c_char_p, [vp]),
        "init_shm_manager": (vp, [ctypes.c_char_p, i32, i32, ctypes.POINTER(_Options)]),
        "join_shm_manager": (i32, [vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]),
        "shm_unlink_name": (i32, [ctypes.c_char_p]),
        "shm_destroy": (None, [vp]),
        "shm_abort": (None, [vp, ctypes.c_char_p]),
        "shm_segment_bytes": (u64, [vp]),
        "shm_group_size": (i32, [vp]),
        "shm_group_rank": (i32, [vp]),
        "shm_barrier": (i32, [vp]),
        "shm_allreduce": (i32, [vp, vp, vp, u64, i32]),
        "shm_reduce_scatter": (i32, [vp, vp, vp, u64, u64, u64, i32]),
        "shm_gather_begin": (i32, [vp, i32, vp, u64, u64, i32, vp]),
        "shm_all_gather_begin": (i32, [vp, vp, u64, u64, i32, vp]),
        "shm_gather_finish": (i32, [vp, vp]),
        "shm_gather_finish_strided": (i32, [vp, vp, u64, u64]),
        "shm_set_interrupt_check": (None, [vp]),
        "shm_interrupted": (i32, [vp]),
        "shm_all_to_all_begin": (i32, [vp, vp, vp, vp, vp, vp, u64, i32, vp, vp]),
        "shm_all_to_all_finish": (i32, [vp, vp, vp]),
        "shm_ep_control_bytes": (u64, [i32]),
        "shm_ep_attach": (vp, [vp]),
        "shm_ep_detach": (None, [vp]),
        "shm_ep_data_bytes": (u64, [i32, vp]),
        "shm_ep_register": (i32, [vp, i32, vp, vp]),
        "shm_ep_unregister": (i32, [vp, i32]),
        "shm_ep_region": (vp, [vp, i32, i32, i32, i32]),
        "shm_ep_dispatch": (i32, [vp, i32, vp]),
        "shm_ep_combine": (i32, [vp, i32, vp]),
        "shm_ep_retire": (i32, [vp, i32, u64, ctypes.c_uint32]),
        "shm_ep_post_destroyed": (None, [vp, u64]),
        "shm_ep_agree": (i32, [vp, u64, u64, vp, i32, vp]),
        "shm_send_tensor_list": (i32, [vp, i32, i32, vp, vp, vp, u64]),
        "shm_recv_begin": (i32, [vp, i32, vp, vp]),
        "shm_recv_bytes": (i32, [vp, i32, vp, u64]),
    }
    lib, why = load_library("moe_ep._shm_native", sigs, not_built=(
        "the native library moe_ep._shm_native is not built (no C compiler at install "
        "time?); reinstall with `pip install -e .` or `pip install .`"
    ), abi=("shm_abi_version", _ABI_VERSION))
    if lib is None:
        return None, why
    if not os.path.isdir("/dev/shm"):
        return None, "/dev/shm is missing"
    lib.shm_set_interrupt_check(ctypes.cast(_INTERRUPT_CHECK, ctypes.c_void_p))
    return lib, ""


# Polled by every sleeping wait (about every 20 ms). A ctypes callback takes the GIL, and
# PyOS_InterruptOccurred (C, so no Python frame in which the SIGINT handler could raise and be
# lost) says whether SIGINT arrived for the main thread, clearing it; `_failure` re-delivers it
# to Python's handler once the op has failed (KeyboardInterrupt by default).
_INTERRUPT_CHECK = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.pythonapi.PyOS_InterruptOccurred)


def native_library() -> ctypes.CDLL:
    """The loaded transport library (csrc/cpu/shm_*.c), for the layers built on a segment
    (`moe_ep.distributed.shm_exchange`). Raises `ShmUnavailableError` when it cannot load."""
    lib, reason = _load()
    if lib is None:
        raise ShmUnavailableError(reason)
    return lib


_lib = native_library


def _error(handle: int | None) -> str:
    lib = _lib()
    raw = lib.shm_last_error(handle) if handle else lib.shm_init_error()
    return (raw or b"unknown error").decode(errors="replace")


def _failure(handle: int) -> ShmError:
    """The error of a failed op on `handle`. An op that failed because SIGINT arrived while it
    waited (the group is aborted, so the peers fail too) hands the signal back to Python's
    handler first: KeyboardInterrupt is raised from here unless the handler does otherwise."""
    if _lib().shm_interrupted(handle):
        signal.raise_signal(signal.SIGINT)
    return ShmError(_error(handle))


# Names created or learned but not yet unlinked: unlinked at interpreter exit if still there.
_PENDING_NAMES: set[str] = set()
_PENDING_LOCK = threading.Lock()


def _unlink(name: str) -> None:
    lib, _ = _load()
    if lib is not None:
        lib.shm_unlink_name(name.encode())
    with _PENDING_LOCK:
        _PENDING_NAMES.discard(name)


@atexit.register
def _unlink_pending() -> None:
    for name in list(_PENDING_NAMES):
        _unlink(name)


# ------------------------------------------------------------- vLLM-named operations
def init_shm_manager(
    name: str,
    group_size: int,
    rank: int,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    p2p_buffer_bytes: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    naive_max_bytes: int = DEFAULT_NAIVE_MAX_BYTES,
    user_bytes: int = 0,
) -> int:
    """Map the group's segment and return a handle: rank 0 creates it, the others open it.

    Args:
        name: "/<name>" segment name, unique to this job and group.
        group_size, rank: the group's size and this rank's index in it.
        buffer_bytes: size of each half of a rank's collective slot (multiple of 4096).
        p2p_buffer_bytes: half size of a point-to-point channel (None: from the budget).
        timeout_s: how long a wait for a peer may last before the group is aborted.
        naive_max_bytes: all-reduce chunks up to this size take the one-step algorithm.
        user_bytes: size of a zeroed region after the slots for a layer above (0: none).
    The other ranks must open the segment only after rank 0's call returned.
    """
    lib = _lib()
    if p2p_buffer_bytes is None:
        p2p_buffer_bytes = _default_p2p_bytes(group_size)
    opts = _Options(buffer_bytes, p2p_buffer_bytes, float(timeout_s), 0.0, 0.0, naive_max_bytes,
                    user_bytes)
    handle = lib.init_shm_manager(name.encode(), group_size, rank, ctypes.byref(opts))
    if not handle:
        raise ShmUnavailableError(_error(None))
    return handle


def join_shm_manager(handle: int, name: str) -> str:
    """Register this process (pid, for peers' liveness checks) in the segment; a description."""
    buf = ctypes.create_string_buffer(512)
    if _lib().join_shm_manager(handle, name.encode(), buf, len(buf)):
        raise _failure(handle)
    return buf.value.decode()


def shm_allreduce(handle: int, data: torch.Tensor) -> None:
    """Sum `data` (contiguous CPU fp32 / bf16 / fp16, any shape) over the group, in place."""
    _check_reduce_input(data, "data")
    if _lib().shm_allreduce(handle, data.data_ptr(), data.data_ptr(), data.numel(),
                            _REDUCE_CODES[data.dtype]):
        raise _failure(handle)


def shm_gather(
    handle: int, data: torch.Tensor, outputs: Sequence[torch.Tensor] | None, dst: int
) -> None:
    """Copy every rank's `data` (same shape and dtype everywhere) into `outputs[r]` on rank
    `dst`; `outputs` is None on the other ranks. Contiguous CPU tensors."""
    lib = _lib()
    _check_data_input(data, "data")
    world = lib.shm_group_size(handle)
    if outputs is not None:
        outputs = list(outputs)
        if len(outputs) != world:
            raise ValueError(f"outputs must hold {world} tensors, got {len(outputs)}")
        for r, o in enumerate(outputs):
            _check_cpu_contiguous(o, f"outputs[{r}]")
            if _nbytes(o) != _nbytes(data):
                raise ValueError(f"outputs[{r}] holds {_nbytes(o)} bytes, data {_nbytes(data)}")
    sizes = (ctypes.c_uint64 * _MAX_RANKS)()
    if lib.shm_gather_begin(handle, dst, data.data_ptr(), _nbytes(data), _row_bytes(data),
                            _DTYPE_CODE[data.dtype], sizes):
        raise _failure(handle)
    if any(sizes[r] != _nbytes(data) for r in range(world)):
        _abort(handle, f"shm_gather: ranks sent different sizes {list(sizes[:world])}")
    ptrs = None
    if outputs is not None:
        ptrs = (ctypes.c_void_p * world)(*[o.data_ptr() for o in outputs])
    if lib.shm_gather_finish(handle, ptrs):
        raise _failure(handle)


def shm_all_gather(handle: int, data: torch.Tensor, output: torch.Tensor) -> None:
    """Every rank's `data` (same shape everywhere) into `output` (`world * data.numel()`
    elements of data's dtype, contiguous, rank order)."""
    lib = _lib()
    _check_data_input(data, "data")
    world, n = lib.shm_group_size(handle), _nbytes(data)
    _check_cpu_contiguous(output, "output")
    if output.dtype != data.dtype or _nbytes(output) != world * n:
        raise ValueError(
            f"output must be {data.dtype} with {world} x {data.numel()} elements, got "
            f"{output.dtype} with {output.numel()}"
        )
    sizes = (ctypes.c_uint64 * _MAX_RANKS)()
    if lib.shm_all_gather_begin(handle, data.data_ptr(), n, _row_bytes(data),
                                _DTYPE_CODE[data.dtype], sizes):
        raise _failure(handle)
    if any(sizes[r] != n for r in range(world)):
        _abort(handle, f"shm_all_gather: ranks sent different sizes {list(sizes[:world])}")
    base = output.data_ptr()
    ptrs = (ctypes.c_void_p * world)(*[base + r * n for r in range(world)])
    if lib.shm_gather_finish(handle, ptrs):
        raise _failure(handle)


def shm_send_tensor_list(handle: int, tensors: Sequence[torch.Tensor], dst: int) -> None:
    """Send CPU tensors (any dtype / shape, empty allowed) to rank `dst` of the group."""
    tensors = [t.contiguous() for t in tensors]
    meta = array.array("q", [len(tensors)])
    for t in tensors:
        if not t.is_cpu or t.dtype not in _DTYPE_CODE:
            raise TypeError(f"shm_send_tensor_list: cannot send {t.dtype} tensor on {t.device}")
        meta.extend([_DTYPE_CODE[t.dtype], t.dim(), *t.shape])
    raw = meta.tobytes()
    n = len(tensors)
    ptrs = (ctypes.c_void_p * max(n, 1))(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_uint64 * max(n, 1))(*[_nbytes(t) for t in tensors])
    if _lib().shm_send_tensor_list(handle, dst, n, ptrs, sizes, raw, len(raw)):
        raise _failure(handle)


def shm_recv_tensor_list(handle: int, src: int) -> list[torch.Tensor]:
    """The tensors rank `src` sent with `shm_send_tensor_list` (new CPU tensors)."""
    return _recv_tensor_list(handle, src, None)


def _recv_tensor_list(
    handle: int, src: int, into: Sequence[torch.Tensor] | None
) -> list[torch.Tensor]:
    """Receive a tensor list into new tensors, or into `into` (contiguous CPU tensors whose
    dtypes and shapes must be the sent ones: a mismatch aborts the group, as the rest of the
    message cannot be skipped)."""
    lib = _lib()
    meta_len, data_len = ctypes.c_uint64(), ctypes.c_uint64()
    if lib.shm_recv_begin(handle, src, ctypes.byref(meta_len), ctypes.byref(data_len)):
        raise _failure(handle)
    raw = ctypes.create_string_buffer(max(meta_len.value, 1))
    if lib.shm_recv_bytes(handle, src, raw, meta_len.value):
        raise _failure(handle)
    meta = array.array("q")
    meta.frombytes(raw.raw[: meta_len.value])
    specs, i = [], 1
    for _ in range(meta[0]):
        dtype, ndim = _DTYPES[meta[i]], meta[i + 1]
        specs.append((dtype, tuple(meta[i + 2 : i + 2 + ndim])))
        i += 2 + ndim
    if into is None:
        out = [torch.empty(shape, dtype=dtype) for dtype, shape in specs]
    else:
        out = list(into)
        if [(t.dtype, tuple(t.shape)) for t in out] != specs or not all(
            t.is_cpu and t.is_contiguous() for t in out
        ):
            _abort(handle, f"shm_recv_tensor_list: rank {src} sent {specs}, the receiver "
                           f"expected {[(t.dtype, tuple(t.shape)) for t in out]} (contiguous CPU)")
    if sum(_nbytes(t) for t in out) != data_len.value:
        _abort(handle, f"shm_recv_tensor_list: metadata from rank {src} does not match its data")
    for t in out:
        if t.numel() and lib.shm_recv_bytes(handle, src, t.data_ptr(), _nbytes(t)):
            raise _failure(handle)
    return out


# ----------------------------------------------------------------------- communicator
class ShmCommunicator:
    """Shared-memory collectives for one CPU process group whose ranks share a node.

    Constructed collectively by every rank of `cpu_group` (it talks over `cpu_group` once, to
    agree on the segment). Inputs are contiguous CPU tensors; outputs are new tensors.

    Args:
        cpu_group: the gloo group of these ranks.
        rank_in_group, world_size: this rank's index in the group and the group's size (>= 2).
        group_name: label for the segment name and error messages ("tp", "ep", ...).
        buffer_bytes: half of each rank's collective slot; larger tensors move in chunks.
        p2p_buffer_bytes: half of each point-to-point channel (None: up to 256 KiB, within a
            64 MiB budget for all world * (world - 1) channels).
        timeout_s: a wait for a peer longer than this aborts the group with `ShmError`.
        user_bytes: a zeroed region of this size after the slots, for a layer built on the
            segment (the MoE token exchange keeps its control words there).
    Raises:
        ShmUnavailableError: on every rank alike, when the segment cannot be set up (the
            caller may fall back to gloo).
    """

    @staticmethod
    def available() -> tuple[bool, str]:
        """(True, "") when the native library loads on this host, else (False, reason)."""
        lib, reason = _load()
        return lib is not None, reason

    def __init__(
        self,
        cpu_group: dist.ProcessGroup,
        rank_in_group: int,
        world_size: int,
        group_name: str,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        p2p_buffer_bytes: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        naive_max_bytes: int = DEFAULT_NAIVE_MAX_BYTES,
        user_bytes: int = 0,
    ):
        _check_int(world_size, "world_size", 2, _MAX_RANKS)
        _check_int(rank_in_group, "rank_in_group", 0, world_size - 1)
        if not isinstance(group_name, str):
            raise TypeError(f"group_name must be a str, got {type(group_name).__name__}")
        _check_int(buffer_bytes, "buffer_bytes", _PAGE, 1 << 40)
        if buffer_bytes % _PAGE:
            raise ValueError(f"buffer_bytes must be a multiple of {_PAGE}, got {buffer_bytes}")
        if p2p_buffer_bytes is None:
            p2p_buffer_bytes = _default_p2p_bytes(world_size)
        _check_int(p2p_buffer_bytes, "p2p_buffer_bytes", _PAGE, 1 << 40)
        if p2p_buffer_bytes % _PAGE:
            raise ValueError(
                f"p2p_buffer_bytes must be a multiple of {_PAGE}, got {p2p_buffer_bytes}"
            )
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
            timeout_s > 0
        ):
            raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        _check_int(naive_max_bytes, "naive_max_bytes", 0, 1 << 40)
        _check_int(user_bytes, "user_bytes", 0, 1 << 40)

        self.group_name = group_name
        self.rank_in_group = rank_in_group
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self._lib = _lib()
        self._handle: int | None = None
        group_ranks = dist.get_process_group_ranks(cpu_group)
        if len(group_ranks) != world_size:
            raise ValueError(
                f"world_size={world_size} but cpu_group has {len(group_ranks)} ranks"
            )

        # 1. Rank 0 names the segment; the name is known to all before it exists, so whoever
        #    survives a crash during set-up can unlink it.
        self.segment_name: str = _agree_on_name(cpu_group, group_ranks[0], group_name)
        opts = {
            "buffer_bytes": buffer_bytes,
            "p2p_buffer_bytes": p2p_buffer_bytes,
            "timeout_s": timeout_s,
            "naive_max_bytes": naive_max_bytes,
            "user_bytes": user_bytes,
        }
        try:
            # 2. Rank 0 creates; everyone learns whether that worked.
            err = self._try_open(rank_in_group == 0, opts)
            errors = _all_gather_object(err, cpu_group, world_size)
            if errors[0]:
                raise ShmUnavailableError(f"rank 0 could not create the segment: {errors[0]}")
            # 3. The others open it; every rank registers its pid.
            if rank_in_group != 0:
                err = self._try_open(True, opts)
            if self._handle is not None:
                try:
                    self.description = join_shm_manager(self._handle, self.segment_name)
                except ShmError as e:
                    err = str(e)
            errors = _all_gather_object(err, cpu_group, world_size)
            bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
            if bad:
                raise ShmUnavailableError("could not map the shm segment: " + "; ".join(bad))
        except BaseException:
            self.destroy()
            raise
        # 4. Every rank has mapped the segment: drop its name so nothing can leak.
        _unlink(self.segment_name)
        self.segment_bytes = int(self._lib.shm_segment_bytes(self._handle))

    def _try_open(self, really: bool, opts: dict) -> str:
        if not really:
            return ""
        try:
            self._handle = init_shm_manager(
                self.segment_name, self.world_size, self.rank_in_group, **opts
            )
        except ShmUnavailableError as e:
            return str(e)
        return ""

    # ------------------------------------------------------------------ lifecycle
    def destroy(self) -> None:
        """Unmap the segment and unlink its name if still present (idempotent, local)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._lib.shm_destroy(handle)
        name = getattr(self, "segment_name", None)
        if name is not None:
            _unlink(name)

    @property
    def native_handle(self) -> int:
        """The C handle of the mapped segment (for `native_library()` calls of the layers built
        on it); raises RuntimeError once destroyed."""
        return self._h()

    def _h(self) -> int:
        if self._handle is None:
            raise RuntimeError(f"ShmCommunicator({self.group_name!r}) is destroyed")
        return self._handle

    def _fail(self) -> ShmError:
        return _failure(self._handle)

    def failure(self) -> ShmError:
        """The `ShmError` of the last failed native call on this segment (for the layers built
        on it). A SIGINT that interrupted the wait is re-delivered first, so KeyboardInterrupt
        propagates from here by default."""
        return _failure(self._h())

    # ----------------------------------------------------------------- collectives
    def barrier(self) -> None:
        """Wait until every rank of the group arrives."""
        if self._lib.shm_barrier(self._h()):
            raise self._fail()

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of `x` over the group, written to `out` (a new tensor when None; `out=x` sums
        in place, as vLLM's `shm_allreduce` does); returns `out`.

        `x`: contiguous CPU fp32 / bf16 / fp16 (accumulated in fp32, summed in rank order, the
        same bits on every rank). Other dtypes raise TypeError (use gloo). `out`: contiguous,
        x's shape and dtype.
        """
        h = self._h()
        _check_reduce_input(x, "x")
        if out is None:
            out = torch.empty_like(x)
        elif out is not x:
            _check_like(out, x, "out")
        if self._lib.shm_allreduce(h, x.data_ptr(), out.data_ptr(), x.numel(),
                                   _REDUCE_CODES[x.dtype]):
            raise self._fail()
        return out

    def reduce_scatter(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Sum flat `x` ([sum(counts)], fp32 / bf16 / fp16) over the group; this rank's slice.

        Rank r gets elements `[sum(counts[:r]), sum(counts[:r + 1]))` of the sum, `[counts[r]]`.
        """
        h = self._h()
        _check_reduce_input(x, "x")
        counts = list(counts)
        if len(counts) != self.world_size or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts
        ):
            raise ValueError(f"counts must hold {self.world_size} ints >= 0, got {counts}")
        if sum(counts) != x.numel():
            raise ValueError(f"sum(counts)={sum(counts)} must equal x.numel()={x.numel()}")
        lo = sum(counts[: self.rank_in_group])
        hi = lo + counts[self.rank_in_group]
        out = x.new_empty(hi - lo)
        if self._lib.shm_reduce_scatter(h, x.data_ptr(), out.data_ptr(), x.numel(), lo, hi,
                                        _REDUCE_CODES[x.dtype]):
            raise self._fail()
        return out

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` in rank order (all_gatherv): extents along dim 0 may differ, the
        dtype and trailing dims must agree. The results are views of one contiguous buffer."""
        flat, rows = self._gather(x, None)
        return _split_rows(flat, rows, x.dim() == 0)

    def all_gather_into(self, x: torch.Tensor, out: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's `x` (same shape everywhere) concatenated along `dim` into `out`, copied
        once, from shared memory straight to its place in `out`; returns `out`.

        `x`: contiguous CPU `[..., n, ...]` (n at `dim`); `out`: contiguous, x's dtype,
        `[..., world * n, ...]`. Ranks whose shapes differ fail the op on every rank (ShmError).
        """
        h = self._h()
        _check_data_input(x, "x")
        if x.dim() == 0:
            raise ValueError("x must have at least one dimension")
        _check_cpu_contiguous(out, "out")
        dim = dim % x.dim()
        want = (*x.shape[:dim], self.world_size * x.shape[dim], *x.shape[dim + 1 :])
        if out.dtype != x.dtype or tuple(out.shape) != want:
            raise ValueError(
                f"out must be {x.dtype} {want} (x's shape with dim {dim} times world_size), "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        n = _nbytes(x)
        sizes = (ctypes.c_uint64 * _MAX_RANKS)()
        if self._lib.shm_all_gather_begin(h, x.data_ptr(), n, _row_bytes(x),
                                          _DTYPE_CODE[x.dtype], sizes):
            raise self._fail()
        if any(sizes[r] != n for r in range(self.world_size)):
            _abort(h, f"all_gather: ranks sent different sizes {list(sizes[:self.world_size])}")
        # Rank p's rows of `block` bytes go every `stride` bytes, starting at p * block.
        block = math.prod(x.shape[dim:]) * x.element_size()
        outer = math.prod(x.shape[:dim])
        base = out.data_ptr()
        ptrs = (ctypes.c_void_p * self.world_size)(
            *[base + p * block for p in range(self.world_size)]
        )
        contiguous = outer == 1 or block == 0
        if self._lib.shm_gather_finish_strided(
            h, ptrs, 0 if contiguous else block, 0 if contiguous else self.world_size * block
        ):
            raise self._fail()
        return out

    def all_gather_flat(self, x: torch.Tensor) -> torch.Tensor:
        """`torch.cat(all_gather(x))` without the extra copy (`[world]` for 0-dim inputs)."""
        return self._gather(x, None)[0]

    def gather(self, x: torch.Tensor, dst: int) -> list[torch.Tensor] | None:
        """Every rank's `x` (as in `all_gather`) on rank `dst`; None on the other ranks."""
        _check_int(dst, "dst", 0, self.world_size - 1)
        flat, rows = self._gather(x, dst)
        return None if flat is None else _split_rows(flat, rows, x.dim() == 0)

    def _gather(self, x: torch.Tensor, dst: int | None) -> tuple[torch.Tensor | None, list[int]]:
        """All ranks' `x` concatenated along dim 0 (on `dst` only, if given) and row counts."""
        h = self._h()
        _check_data_input(x, "x")
        trailing = tuple(x.shape[1:])
        row_bytes = _row_bytes(x)
        sizes = (ctypes.c_uint64 * _MAX_RANKS)()
        code = _DTYPE_CODE[x.dtype]
        if dst is None:
            rc = self._lib.shm_all_gather_begin(h, x.data_ptr(), _nbytes(x), row_bytes, code,
                                                sizes)
        else:
            rc = self._lib.shm_gather_begin(h, dst, x.data_ptr(), _nbytes(x), row_bytes, code,
                                            sizes)
        if rc:
            raise self._fail()
        if dst is not None and dst != self.rank_in_group:
            if self._lib.shm_gather_finish(h, None):
                raise self._fail()
            return None, []
        # row_bytes is 0 only for rows of zero elements: then every rank's extent is unknown
        # from bytes, and all must equal ours (the group checks shapes in that case).
        n0 = x.shape[0] if x.dim() else 1
        rows = [sizes[r] // row_bytes if row_bytes else n0 for r in range(self.world_size)]
        flat = x.new_empty((sum(rows), *trailing))
        ptrs, base, off = (ctypes.c_void_p * self.world_size)(), flat.data_ptr(), 0
        for r in range(self.world_size):
            ptrs[r] = base + off
            off += sizes[r]
        if self._lib.shm_gather_finish(h, ptrs):
            raise self._fail()
        return flat, rows

    def all_to_all(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`chunks[r]` goes to rank r; returns what each rank sent to this one, in rank order.

        `chunks`: one contiguous CPU tensor per rank, `[n_r, *trailing]`, same dtype and
        trailing dims on every rank (n_r may be 0). Results are views of one buffer.
        """
        h = self._h()
        chunks = list(chunks)
        if len(chunks) != self.world_size:
            raise ValueError(f"chunks must hold {self.world_size} tensors, got {len(chunks)}")
        for i, c in enumerate(chunks):
            _check_data_input(c, f"chunks[{i}]")
            if c.dim() == 0:
                raise ValueError(f"chunks[{i}] must have a row dimension, got a 0-dim tensor")
            if c.dtype != chunks[0].dtype or c.shape[1:] != chunks[0].shape[1:]:
                raise ValueError(
                    f"chunks[{i}] is {c.dtype} {tuple(c.shape)}, chunks[0] is "
                    f"{chunks[0].dtype} {tuple(chunks[0].shape)}: dtype and trailing dims "
                    "must agree"
                )
        body = (ctypes.c_void_p * self.world_size)(*[c.data_ptr() for c in chunks])
        nbytes = (ctypes.c_uint64 * self.world_size)(*[_nbytes(c) for c in chunks])
        return self._all_to_all(h, chunks[0], body, nbytes, None).rows

    def all_to_all_single(self, x: torch.Tensor, send_rows: Sequence[int]) -> torch.Tensor:
        """Rows `x[sum(send_rows[:r]) : sum(send_rows[:r + 1])]` go to rank r; returns the rows
        every rank sent here, concatenated in source-rank order (`[sum received, *trailing]`,
        as `torch.cat(all_to_all(list(x.split(send_rows))))` without the extra copy)."""
        h = self._h()
        _check_data_input(x, "x")
        if x.dim() == 0:
            raise ValueError("x must have a row dimension")
        send_rows = list(send_rows)
        if len(send_rows) != self.world_size or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in send_rows
        ) or sum(send_rows) != x.shape[0]:
            raise ValueError(
                f"send_rows must hold {self.world_size} ints >= 0 summing to x.shape[0]="
                f"{x.shape[0]}, got {send_rows}"
            )
        row_bytes = _row_bytes(x)
        base, ptrs, off = x.data_ptr(), [], 0
        for n in send_rows:
            ptrs.append(base + off)
            off += n * row_bytes
        body = (ctypes.c_void_p * self.world_size)(*ptrs)
        nbytes = (ctypes.c_uint64 * self.world_size)(*[n * row_bytes for n in send_rows])
        return self._all_to_all(h, x, body, nbytes, None, flat_only=True)

    def all_to_all_rows(
        self,
        x: torch.Tensor,
        row_ids: Sequence[torch.Tensor],
        heads: Sequence[torch.Tensor] | None = None,
    ) -> RowsExchange:
        """Rows `x[row_ids[r]]` go to rank r, copied from `x` straight into shared memory,
        each preceded by the raw bytes of `heads[r]` (small per-destination metadata).

        Args:
            x: `[N, *trailing]` contiguous CPU tensor.
            row_ids: per rank, `[n_r]` contiguous int64 CPU row indices into x (each in
                [0, N): the caller guarantees it, they are not checked element-wise).
            heads: per rank, a contiguous CPU tensor of any dtype (sent as bytes), or None.
        Returns: a `RowsExchange`: per source rank, the rows it sent here and its head bytes.
        """
        h = self._h()
        _check_data_input(x, "x")
        if x.dim() == 0:
            raise ValueError("x must have a row dimension")
        row_ids = list(row_ids)
        if len(row_ids) != self.world_size:
            raise ValueError(f"row_ids must hold {self.world_size} tensors, got {len(row_ids)}")
        for i, r in enumerate(row_ids):
            if not isinstance(r, torch.Tensor) or r.dtype != torch.int64 or r.dim() != 1 or (
                not r.is_contiguous() or not r.is_cpu
            ):
                raise ValueError(f"row_ids[{i}] must be a contiguous 1-D int64 CPU tensor")
        head_ptrs = head_bytes = None
        if heads is not None:
            heads = list(heads)
            if len(heads) != self.world_size:
                raise ValueError(f"heads must hold {self.world_size} tensors, got {len(heads)}")
            for i, t in enumerate(heads):
                _check_cpu_contiguous(t, f"heads[{i}]")
            head_ptrs = (ctypes.c_void_p * self.world_size)(*[t.data_ptr() for t in heads])
            head_bytes = (ctypes.c_uint64 * self.world_size)(*[_nbytes(t) for t in heads])
        row_bytes = _row_bytes(x)
        body = (ctypes.c_void_p * self.world_size)(*([x.data_ptr()] * self.world_size))
        nbytes = (ctypes.c_uint64 * self.world_size)(*[r.numel() * row_bytes for r in row_ids])
        idx = (ctypes.c_void_p * self.world_size)(*[r.data_ptr() for r in row_ids])
        return self._all_to_all(h, x, body, nbytes, idx, (head_ptrs, head_bytes))

    def _all_to_all(self, h, like, body, nbytes, idx, heads=None, *, flat_only=False):
        """Run one all-to-all; returns the `[sum received, *trailing]` rows alone when
        `flat_only` (no per-rank views, no head buffer: each torch call costs microseconds
        here), else a `RowsExchange`."""
        trailing = tuple(like.shape[1:])
        row_bytes = _row_bytes(like)
        head_ptrs, head_bytes = heads if heads is not None else (None, None)
        recv_head = (ctypes.c_uint64 * _MAX_RANKS)()
        recv_body = (ctypes.c_uint64 * _MAX_RANKS)()
        if self._lib.shm_all_to_all_begin(h, head_ptrs, head_bytes, body, nbytes, idx, row_bytes,
                                          _DTYPE_CODE[like.dtype], recv_head, recv_body):
            raise self._fail()
        W = self.world_size
        received = recv_body[:W]
        flat = like.new_empty((sum(received) // row_bytes if row_bytes else 0, *trailing))
        body_out, off = (ctypes.c_void_p * W)(), flat.data_ptr()
        for r in range(W):
            body_out[r] = off
            off += received[r]
        head_buf, head_out, starts = None, None, [0] * (W + 1)
        if heads is not None:
            # Heads land at 64-byte aligned offsets so that callers can view them as any dtype.
            for r in range(W):
                starts[r + 1] = starts[r] + (recv_head[r] + 63) // 64 * 64
            head_buf = torch.empty(starts[W], dtype=torch.uint8)
            base = head_buf.data_ptr()
            head_out = (ctypes.c_void_p * W)(*[base + starts[r] for r in range(W)])
        if self._lib.shm_all_to_all_finish(h, head_out, body_out):
            raise self._fail()
        if flat_only:
            return flat
        rows = [b // row_bytes if row_bytes else 0 for b in received]
        return RowsExchange(
            flat=flat,
            rows=tuple(flat.split(rows)),
            heads=tuple(head_buf[starts[r] : starts[r] + recv_head[r]] for r in range(W))
            if head_buf is not None else (torch.empty(0, dtype=torch.uint8),) * W,
        )

    # -------------------------------------------------------------- point to point
    def send_tensor_list(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        """Send CPU tensors (any dtype / shape, empty allowed) to rank `dst` of the group."""
        _check_int(dst, "dst", 0, self.world_size - 1)
        if dst == self.rank_in_group:
            raise ValueError(f"dst={dst} is this rank")
        shm_send_tensor_list(self._h(), tensors, dst)

    def recv_tensor_list(self, src: int) -> list[torch.Tensor]:
        """The tensors rank `src` sent with `send_tensor_list`, as new CPU tensors."""
        _check_int(src, "src", 0, self.world_size - 1)
        if src == self.rank_in_group:
            raise ValueError(f"src={src} is this rank")
        return shm_recv_tensor_list(self._h(), src)

    def recv_tensor_list_into(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        """Receive what rank `src` sent with `send_tensor_list` straight into `tensors`
        (contiguous CPU tensors of the sent dtypes and shapes; otherwise ShmError on both)."""
        _check_int(src, "src", 0, self.world_size - 1)
        if src == self.rank_in_group:
            raise ValueError(f"src={src} is this rank")
        _recv_tensor_list(self._h(), src, tensors)

    def __repr__(self) -> str:
        return (
            f"ShmCommunicator(group={self.group_name!r}, rank={self.rank_in_group}/"
            f"{self.world_size}, segment={getattr(self, 'segment_name', None)!r}, "
            f"live={self._handle is not None})"
        )


# ----------------------------------------------------------------------- shared buffer
class SharedBuffer:
    """`nbytes` of POSIX shared memory mapped by every rank of a CPU group (collective).

    Rank 0 creates the file (`O_CREAT | O_EXCL`, mode 0600, pages reserved with
    `posix_fallocate` so that a full /dev/shm fails here, not with SIGBUS later); every rank maps
    it (`MAP_SHARED | MAP_POPULATE`: no page faults on the hot path) and, once all have, every
    rank unlinks the name, as for `ShmCommunicator`. The mapping is a Python `mmap` object:
    tensors from `view` keep it alive, so a tensor that outlives `destroy()` stays valid memory
    (its contents are simply no longer maintained).

    Args:
        cpu_group: the gloo group of these ranks; rank_in_group, world_size: this rank's index
            and the group size; label: for the name and messages; nbytes: size (> 0).
    Raises:
        ShmUnavailableError: on every rank alike, when the buffer cannot be created or mapped.
    """

    def __init__(self, cpu_group: dist.ProcessGroup, rank_in_group: int, world_size: int,
                 label: str, nbytes: int):
        _check_int(nbytes, "nbytes", 1, 1 << 44)
        self.nbytes = nbytes
        self._mm: mmap.mmap | None = None
        group_ranks = dist.get_process_group_ranks(cpu_group)
        self.name = _agree_on_name(cpu_group, group_ranks[0], label)
        try:
            err = self._open(create=True) if rank_in_group == 0 else ""
            errors = _all_gather_object(err, cpu_group, world_size)
            if errors[0]:
                raise ShmUnavailableError(f"rank 0 could not create {self.name}: {errors[0]}")
            if rank_in_group != 0:
                err = self._open(create=False)
            errors = _all_gather_object(err, cpu_group, world_size)
            bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
            if bad:
                raise ShmUnavailableError(f"could not map {self.name}: " + "; ".join(bad))
        except BaseException:
            self.destroy()
            raise
        _unlink(self.name)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))

    def _open(self, create: bool) -> str:
        path = "/dev/shm" + self.name
        try:
            if create:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                if create:
                    os.posix_fallocate(fd, 0, self.nbytes)
                else:
                    st = os.fstat(fd)
                    # Refuse a file another user could have planted or can read.
                    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                        return f"{path} is not private to this user"
                    if st.st_size != self.nbytes:
                        return f"{path} holds {st.st_size} bytes, expected {self.nbytes}"
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                self._mm = mmap.mmap(fd, self.nbytes, flags=flags)
            finally:
                os.close(fd)
        except OSError as e:
            return f"{path}: {e.strerror or e} ({self.nbytes} bytes)"
        return ""

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """`[nbytes] uint8` tensor over bytes `[offset, offset + nbytes)` of the mapping."""
        if self._mm is None:
            raise RuntimeError(f"SharedBuffer {self.name} is destroyed")
        if not 0 <= offset <= offset + nbytes <= self.nbytes:
            raise ValueError(f"view [{offset}, {offset + nbytes}) outside [0, {self.nbytes})")
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._mm, dtype=torch.uint8, count=nbytes, offset=offset)

    def destroy(self) -> None:
        """Drop this object's mapping (idempotent, local). Tensors from `view` keep it mapped
        until they die; the name is unlinked if set-up did not get that far."""
        self._mm = None
        _unlink(self.name)

    def __repr__(self) -> str:
        return f"SharedBuffer({self.name!r}, {self.nbytes} bytes, live={self._mm is not None})"


# --------------------------------------------------------------------------- helpers
def _default_p2p_bytes(world: int) -> int:
    pairs = max(world * (world - 1), 1)
    per_half = _P2P_BUDGET_BYTES // (2 * pairs) // _PAGE * _PAGE
    return max(_PAGE, min(DEFAULT_P2P_BUFFER_BYTES, per_half))


def _check_int(value, arg: str, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{arg} must be an int in [{lo}, {hi}], got {value!r}")


def _check_cpu_contiguous(x, arg: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_cpu:  # (.is_cpu costs a quarter of building x.device and reading its type)
        raise ValueError(f"{arg} must be a CPU tensor, got one on {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"{arg} must be contiguous")


def _check_like(out, x: torch.Tensor, arg: str) -> None:
    _check_cpu_contiguous(out, arg)
    if out.dtype != x.dtype or out.shape != x.shape:
        raise ValueError(
            f"{arg} must be {x.dtype} {tuple(x.shape)} like x, got {out.dtype} {tuple(out.shape)}"
        )


def _check_reduce_input(x, arg: str) -> None:
    _check_cpu_contiguous(x, arg)
    if x.dtype not in _REDUCE_CODES:
        raise TypeError(
            f"{arg} must be float32, bfloat16 or float16 for shared-memory reductions, "
            f"got {x.dtype}"
        )


def _check_data_input(x, arg: str) -> None:
    _check_cpu_contiguous(x, arg)
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(f"{arg} has dtype {x.dtype}, which the shm layer does not carry")


def _split_rows(flat: torch.Tensor, rows: list[int], scalar: bool) -> list[torch.Tensor]:
    parts = list(flat.split(rows))
    return [p.view(()) for p in parts] if scalar else parts


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size() if t.dim() else t.element_size()


def _abort(handle: int, msg: str) -> None:
    _lib().shm_abort(handle, msg.encode())
    raise _failure(handle)


def _agree_on_name(cpu_group: dist.ProcessGroup, src: int, label: str) -> str:
    """Collective: rank `src`'s fresh, unpredictable segment name, registered for unlinking."""
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:48]
    box = [f"/moe_ep_{os.getpid()}_{secrets.token_hex(8)}_{label}"]
    dist.broadcast_object_list(box, src=src, group=cpu_group)
    with _PENDING_LOCK:
        _PENDING_NAMES.add(box[0])
    return box[0]


def _all_gather_object(obj, group: dist.ProcessGroup, world: int) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out
