"""The expert-parallel token exchange over CPU shared memory (binds csrc/cpu/shm_ep.c).

This is transport only: it moves routed rows and their metadata into the receivers' shared
buffers and back, with one small exchange of counts, errors and call identity per dispatch
(layout and protocol: csrc/cpu/shm_ep.h). Routing plans and sums are the callers' (the `shm`
manager and `moe_ep.kernels`).

* `ShmExchange` (one per manager, collective to build): a moe_ep segment whose user region holds
  every rank's control words, plus up to 32 registered buffers.
* `ShmExchangeBuffer` (one per per-layer handle, collective to open): a `SharedBuffer` sized
  from the layer's shape, two halves per receiver so that two dispatch results can be live.

Failure modes: a peer that dies, stalls past the timeout, or makes a different call (another
handle, a skipped combine, a destroyed manager) aborts the exchange on every rank with a
`ShmError` naming it; an input error posted by one rank comes back as per-rank error codes so
that the caller raises on every rank. Waits sleep on futexes, so ranks > cores do not livelock.
"""

from __future__ import annotations

import logging
import ctypes
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_ep.distributed.shm import (
    DEFAULT_TIMEOUT_S,
    SharedBuffer,
    ShmCommunicator,
    ShmError,
    ShmUnavailableError,
    native_library,
)

logger = logging.getLogger(__name__)

__all__ = ["ExchangeGeometry", "MAX_BUFFERS", "REMOTE_ERROR", "ShmExchange",
           "ShmExchangeBuffer"]

MAX_BUFFERS = 32  # SHM_EP_MAX_SLOTS
_REMOTE = 1
#: what `dispatch` / `combine` return when some rank posted an error (see `peer_errors`).
REMOTE_ERROR = -1
_X, _IDS, _WEIGHTS, _SCALES, _OUT = range(5)


class _Geometry(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("cap", "row_bytes", "k", "scale_bytes", "out_row_bytes", "num_local")]


class _DispatchArgs(ctypes.Structure):
    _fields_ = [
        ("call", ctypes.c_uint64), ("seq", ctypes.c_uint64), ("half", ctypes.c_uint64),
        ("prev_seq", ctypes.c_int64), ("err", ctypes.c_int64), ("ntok", ctypes.c_int64),
        ("send_counts", ctypes.c_void_p),
        ("token_rows", ctypes.c_void_p), ("x", ctypes.c_void_p), ("row_ids", ctypes.c_void_p),
        ("row_weights", ctypes.c_void_p), ("scales", ctypes.c_void_p),
        ("recv_counts", ctypes.c_void_p), ("peer_err", ctypes.c_void_p),
        ("tokens_per_expert", ctypes.c_void_p), ("received", ctypes.c_int64),
    ]


class _CombineArgs(ctypes.Structure):
    _fields_ = [
        ("call", ctypes.c_uint64), ("seq", ctypes.c_uint64), ("half", ctypes.c_uint64),
        ("err", ctypes.c_int64), ("out", ctypes.c_void_p), ("peer_err", ctypes.c_void_p),
        ("bases", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class ExchangeGeometry:
    """What a buffer is sized from (one layer's fixed shape).

    Attributes:
        capacity: tokens one rank may dispatch per call (rows it may send to one destination).
        hidden: H; dtype: dtype of the dispatched rows; topk: K;
        scale_cols: float32 scales per row sent beside it (0: none);
        out_dtype: dtype of the expert outputs the combine returns;
        num_local: experts this rank owns (the received ids are local ids).
    """

    capacity: int
    hidden: int
    dtype: torch.dtype
    topk: int
    scale_cols: int
    out_dtype: torch.dtype
    num_local: int

    def native(self) -> _Geometry:
        es, oes = self.dtype.itemsize, self.out_dtype.itemsize
        return _Geometry(self.capacity, self.hidden * es, self.topk, 4 * self.scale_cols,
                         self.hidden * oes, self.num_local)


class ShmExchange:
    """The control segment of one manager's token exchange (collective constructor).

    Args:
        cpu_group, rank_in_group, world_size, label: the group (>= 2 ranks, one node).
        timeout_s: how long a wait for a peer may last before the exchange is aborted.
    Raises:
        ShmUnavailableError: on every rank alike when shared memory cannot be set up.
    """

    def __init__(self, cpu_group: dist.ProcessGroup, rank_in_group: int, world_size: int,
                 label: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._lib = native_library()
        self.cpu_group, self.rank, self.world_size = cpu_group, rank_in_group, world_size
        self.label = label
        self._comm = ShmCommunicator(
            cpu_group, rank_in_group, world_size, label, buffer_bytes=4096 * world_size,
            p2p_buffer_bytes=4096, timeout_s=timeout_s,
            user_bytes=int(self._lib.shm_ep_control_bytes(world_size)),
        )
        self._ep = self._lib.shm_ep_attach(self._comm.native_handle)
        if not self._ep:
            message = self._error()
            self._comm.destroy()
            raise ShmUnavailableError(message)
        self._free = list(range(MAX_BUFFERS))
        self._agreements = 0

    def _error(self) -> str:
        raw = self._lib.shm_last_error(self._comm.native_handle)
        return (raw or b"unknown shared-memory error").decode(errors="replace")

    def fail(self) -> ShmError:
        """The exception for the last failed call (the exchange is unusable afterwards); a
        SIGINT that interrupted a wait raises KeyboardInterrupt from here."""
        return self._comm.failure()

    def open_buffer(self, geometry: ExchangeGeometry, label: str) -> ShmExchangeBuffer:
        """Collective: a buffer for `geometry` in the lowest free slot (the same on every rank,
        since every rank opens and closes buffers in the same order)."""
        if self._ep is None:
            raise RuntimeError(f"ShmExchange {self.label!r} is destroyed")
        if not self._free:
            raise RuntimeError(
                f"ShmExchange {self.label!r}: {MAX_BUFFERS} handles are open; destroy one first")
        slot = self._free.pop(0)
        try:
            return ShmExchangeBuffer(self, slot, geometry, label)
        except BaseException:
            self._free.insert(0, slot)
            raise

    def _release(self, slot: int) -> None:
        if self._ep is not None:
            self._lib.shm_ep_unregister(self._ep, slot)
            self._free.append(slot)
            self._free.sort()

    def agree(self, call: int, values: list[int]) -> list[list[int]]:
        """A small all-gather of int64 `values` (at most 96) for call `call`: every rank's
        values in rank order. Mismatched calls are detected as in dispatch / combine."""
        if self._ep is None:
            raise RuntimeError(f"ShmExchange {self.label!r} is destroyed")
        n = len(values)
        mine = (ctypes.c_int64 * n)(*values)
        out = (ctypes.c_int64 * (n * self.world_size))()
        seq, self._agreements = self._agreements, self._agreements + 1
        if self._lib.shm_ep_agree(self._ep, call, seq, mine, n, out):
            raise self.fail()
        return [list(out[r * n:(r + 1) * n]) for r in range(self.world_size)]

    def abort(self, message: str) -> None:
        """Abort the exchange: every peer's current or next wait raises ShmError(message)."""
        if self._ep is not None:
            self._lib.shm_abort(self._comm.native_handle, message.encode())

    def post_destroyed(self, call: int) -> None:
        """Tell waiting peers this rank makes no further call (they fail instead of waiting)."""
        if self._ep is not None:
            self._lib.shm_ep_post_destroyed(self._ep, call)

    def destroy(self) -> None:
        """Detach and unmap (idempotent, local). Buffers' tensors stay valid memory."""
        ep, self._ep = self._ep, None
        if ep is not None:
            self._lib.shm_ep_detach(ep)
        self._comm.destroy()


class ShmExchangeBuffer:
    """One handle's receive buffers (see the module docstring); built by `ShmExchange`.

    Views (per half b in {0, 1}, `W * capacity` rows each, the received rows first):
        x[b] `[rows, H]` dtype; ids[b] `[rows, K] int64`; weights[b] `[rows, K] float32`;
        scales[b] `[rows, scale_cols] float32` or None; out[b] `[rows, H]` out_dtype;
        tokens_per_expert[b] `[num_local] int64`, filled by the dispatch that used half b.
    """

    def __init__(self, exchange: ShmExchange, slot: int, geometry: ExchangeGeometry,
                 label: str) -> None:
        self._x = exchange
        self._lib = exchange._lib
        self.slot, self.geometry = slot, geometry
        self.rank, self.world_size = exchange.rank, exchange.world_size
        g = geometry.native()
        self._geometry = g
        nbytes = int(self._lib.shm_ep_data_bytes(self.world_size, ctypes.byref(g)))
        self._buf = SharedBuffer(exchange.cpu_group, self.rank, self.world_size, label, nbytes)
        try:
            if self._lib.shm_ep_register(exchange._ep, slot, ctypes.byref(g),
                                         ctypes.c_void_p(self._buf.address)):
                raise exchange.fail()
            # Every rank has reset its control words for this slot before anyone may use it.
            errors = [None] * self.world_size
            dist.all_gather_object(errors, None, group=exchange.cpu_group)
            rows = self.world_size * geometry.capacity
            self.x, self.ids, self.weights, self.scales, self.out = [], [], [], [], []
            for b in range(2):
                self.x.append(self._view(self.rank, b, _X, rows * g.row_bytes)
                              .view(geometry.dtype).view(rows, geometry.hidden))
                self.ids.append(self._view(self.rank, b, _IDS, rows * g.k * 8)
                                .view(torch.int64).view(rows, geometry.topk))
                self.weights.append(self._view(self.rank, b, _WEIGHTS, rows * g.k * 4)
                                    .view(torch.float32).view(rows, geometry.topk))
                self.scales.append(None if not g.scale_bytes else
                                   self._view(self.rank, b, _SCALES, rows * g.scale_bytes)
                                   .view(torch.float32).view(rows, geometry.scale_cols))
                self.out.append(self._view(self.rank, b, _OUT, rows * g.out_row_bytes)
                                .view(geometry.out_dtype).view(rows, geometry.hidden))
        except BaseException:
            self._lib.shm_ep_unregister(exchange._ep, slot)
            self._buf.destroy()
            raise
        # Call arguments and outputs, built once: the hot path only sets a few fields.
        w = self.world_size
        self._dargs, self._cargs = _DispatchArgs(), _CombineArgs()
        self._recv = (ctypes.c_int64 * w)()
        self._perr = (ctypes.c_int64 * w)()
        #: after a successful combine: where this rank's rows' outputs are at each owner.
        self.bases = (ctypes.c_void_p * w)()
        self._dargs.peer_err = self._cargs.peer_err = ctypes.addressof(self._perr)
        self._dargs.recv_counts = ctypes.addressof(self._recv)
        self.tokens_per_expert = [torch.zeros(geometry.num_local, dtype=torch.int64)
                                  for _ in range(2)]
        self._tpe_ptr = [t.data_ptr() for t in self.tokens_per_expert]
        self._cargs.bases = ctypes.addressof(self.bases)
        self._dref, self._cref = ctypes.byref(self._dargs), ctypes.byref(self._cargs)
        self.nbytes = nbytes
        self.destroyed = False
        self._received_views: dict[tuple[int, int], tuple] = {}
        #: per half, the last dispatch that used it (-1: none yet); the next one waits for its
        #: combine to be read everywhere.
        self._last_in_half = [-1, -1]

    def received(self, half: int, rows: int) -> tuple:
        """`(x, ids, weights, scales)` of half `half`'s first `rows` received rows (views).

        Cached per (half, rows): four slices cost ~10 us per decode call on a slow core, and a
        layer sees few distinct row counts. Callers must not change the views' shape in place.
        """
        key = (half, rows)
        views = self._received_views.get(key)
        if views is None:
            if len(self._received_views) >= 256:
                self._received_views.clear()
            scales = self.scales[half]
            views = (self.x[half][:rows], self.ids[half][:rows], self.weights[half][:rows],
                     None if scales is None else scales[:rows])
            self._received_views[key] = views
        return views

    def _region(self, receiver: int, half: int, which: int) -> int:
        return int(self._lib.shm_ep_region(self._x._ep, self.slot, receiver, half, which))

    def _view(self, receiver: int, half: int, which: int, nbytes: int) -> torch.Tensor:
        return self._buf.view(self._region(receiver, half, which) - self._buf.address, nbytes)

    def dispatch(self, call: int, seq: int, half: int, err: int, x: torch.Tensor | None,
                 planner, scales: torch.Tensor | None) -> int:
        """Move this rank's planned rows (`planner`: a `moe_ep.kernels.DispatchPlanner` that
        planned `x`'s tokens) into the receivers' half `half` (0 or 1; every rank must pass
        the same, else the exchange fails as a mismatch); `err` != 0 posts an input error
        instead. Returns the rows received (views: `x[half][:rows]`, ...), or `REMOTE_ERROR`
        when some rank posted an error (`peer_errors()` says which). Raises ShmError when the
        exchange fails."""
        a = self._dargs
        a.call, a.seq, a.half, a.err = call, seq, half, err
        a.prev_seq = self._last_in_half[half]
        self._last_in_half[half] = seq
        a.tokens_per_expert = self._tpe_ptr[half]
        if not err:
            a.ntok = x.shape[0]
            a.x = x.data_ptr()
            a.send_counts = planner.send_counts_ptr
            a.token_rows = planner.token_rows_ptr
            a.row_ids = planner.row_ids_ptr
            a.row_weights = planner.row_weights_ptr
            a.scales = scales.data_ptr() if scales is not None else None
        rc = self._lib.shm_ep_dispatch(self._x._ep, self.slot, self._dref)
        if rc < 0:
            raise self._x.fail()
        return REMOTE_ERROR if rc == _REMOTE else a.received

    def peer_errors(self) -> tuple[int, ...]:
        """The error code each rank posted in the last dispatch or combine."""
        return tuple(self._perr)

    def combine(self, call: int, seq: int, half: int, err: int, out: torch.Tensor | None
                ) -> int:
        """Post this rank's expert outputs (`out`, the rows it received in order, or None with
        `err` != 0) and wait for every owner's. Returns 0 (then `bases` holds where this rank's
        rows' outputs are at each owner) or `REMOTE_ERROR` (`peer_errors()`)."""
        a = self._cargs
        a.call, a.seq, a.half, a.err = call, seq, half, err
        a.out = out.data_ptr() if out is not None else None
        rc = self._lib.shm_ep_combine(self._x._ep, self.slot, self._cref)
        if rc < 0:
            raise self._x.fail()
        return REMOTE_ERROR if rc == _REMOTE else 0

    def retire(self, seq: int, half: int) -> None:
        """Dispatch `seq` (in `half`) will never be combined (its result was dropped)."""
        if self._lib.shm_ep_retire(self._x._ep, self.slot, seq, half):
            raise self._x.fail()

    def destroy(self) -> None:
        """Free the slot and drop the mapping (idempotent, local)."""
        if not self.destroyed:
            self.destroyed = True
            self._x._release(self.slot)
            self._buf.destroy()
