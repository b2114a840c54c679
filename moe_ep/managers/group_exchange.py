"""Base of the managers whose transfer runs over the group's collectives (naive, agrs,
alltoallv): any torch.distributed backend, CPU or CUDA.

Their one exchange per call is the header all-gather of `moe_ep.managers.protocol` (which also
carries their split sizes); then the transfer (`_transfer`) and, in combine, the return trip
(`_return_trip`). The planning step (`_plan`) is local and may fail: its error travels in the
header like any bad input.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch

from moe_ep.managers import protocol
from moe_ep.managers.accounting import WireCounter
from moe_ep.managers.contract import All2AllManager, CombineState, DispatchResult, EPHandle
from moe_ep.managers.inputs import CheckedInputs

__all__ = ["GroupExchangeManager", "PORTABLE_REASON", "pack_rows", "unpack_rows"]

PORTABLE_REASON = "portable: runs on any torch.distributed backend (gloo on CPU, NCCL on CUDA)"


class GroupExchangeManager(All2AllManager):
    """Dispatch = header exchange + `_transfer`; combine = header exchange + `_return_trip`."""

    #: results kept combinable per handle (they own no buffers; older ones are dropped).
    max_live_results: ClassVar[int] = 64

    @classmethod
    def availability(cls, topology: Any) -> tuple[bool, str]:
        return True, PORTABLE_REASON

    def _dispatch(self, call: int, handle: EPHandle | None, checked: CheckedInputs | None,
                  error: Exception | None) -> DispatchResult:
        counter = self._new_counter()
        plan, counts = None, ()
        if error is None:
            try:
                plan, counts = self._plan(handle, checked)
            except Exception as exc:  # noqa: BLE001 - reported to every rank in the header
                error = exc
        rows = protocol.exchange(
            self, protocol.OP_DISPATCH, call, handle, -1, error,
            handle.spec if handle is not None else None,
            checked.num_tokens if checked is not None else 0, counts, counter,
        )
        seq = handle.dispatches
        handle.dispatches += 1
        handle.live.append(seq)
        del handle.live[: -self.max_live_results]
        result = self._transfer(call, seq, handle, checked, plan, rows, counter)
        self._dispatch_bytes = counter.freeze()
        return result

    def _combine(self, call: int, state: CombineState | None, expert_out: torch.Tensor | None,
                 error: Exception | None) -> torch.Tensor:
        counter = self._new_counter()
        if state is not None:
            self._finish(state)
        protocol.exchange(
            self, protocol.OP_COMBINE, call, state.handle if state is not None else None,
            state.call if state is not None else -1, error, None, 0, (), counter,
        )
        y = self._return_trip(state, expert_out, counter)
        self._combine_bytes = counter.freeze()
        return y

    def _peer_counts(self, rows: list[list[int]]) -> list[list[int]]:
        """`[W][2W]`: the counts each rank put in its header (see `protocol`)."""
        w = self.world_size
        return [row[protocol.NUM_FIXED:protocol.NUM_FIXED + 2 * w] for row in rows]

    @abstractmethod
    def _plan(self, handle: EPHandle, checked: CheckedInputs) -> tuple[Any, tuple[int, ...]]:
        """Local routing: `(plan, counts per destination for the header)`."""

    @abstractmethod
    def _transfer(self, call: int, seq: int, handle: EPHandle, checked: CheckedInputs,
                  plan: Any, rows: list[list[int]], counter: WireCounter) -> DispatchResult:
        """Move the tokens (every rank's header is in `rows`); the result's `CombineState`
        carries `call` / `seq` (its identity) and what `_return_trip` needs."""

    @abstractmethod
    def _return_trip(self, state: CombineState, expert_out: torch.Tensor,
                     counter: WireCounter) -> torch.Tensor:
        """Bring `expert_out` back and sum it per token: `[N, H]`."""


# ------------------------------------------------------------------------ row packing
def pack_rows(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              scales: torch.Tensor | None) -> torch.Tensor:
    """`[N, T] uint8` wire rows `[ids int32 K | weights float32 K | scales float32 S | pad |
    x bytes]`: the 4-byte fields first and x at an 8-byte aligned offset, so that every
    field of a received row can be viewed in its dtype whatever H and the dtype of x are."""
    n = x.shape[0]
    if n == 0:  # (empty tensors may carry strides that refuse a byte view)
        cols = packed_meta_bytes(ids.shape[1], 0 if scales is None else scales.shape[1])
        return torch.empty((0, cols + x.shape[1] * x.element_size()), dtype=torch.uint8,
                           device=x.device)
    meta = [ids.to(torch.int32).view(torch.uint8), weights.view(torch.uint8)]
    if scales is not None:
        meta.append(scales.view(torch.uint8))
    meta_bytes = sum(m.shape[1] for m in meta)
    pad = -meta_bytes % 8
    if pad:
        meta.append(torch.zeros((n, pad), dtype=torch.uint8, device=x.device))
    return torch.cat([*meta, x.view(torch.uint8).reshape(n, x.shape[1] * x.element_size())],
                     dim=1)


def unpack_rows(rows: torch.Tensor, hidden: int, dtype: torch.dtype, topk: int, scale_cols: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of `pack_rows`: `x [M, H] dtype`, `ids [M, K] int64`, `weights [M, K]
    float32`, `scales [M, S] float32` or None."""
    k4, s4 = 4 * topk, 4 * scale_cols
    meta = packed_meta_bytes(topk, scale_cols)
    ids = _field(rows, 0, k4, torch.int32).long()
    weights = _field(rows, k4, k4, torch.float32)
    scales = _field(rows, 2 * k4, s4, torch.float32) if scale_cols else None
    x = _field(rows, meta, hidden * dtype.itemsize, dtype)
    return x, ids, weights, scales


def _field(rows: torch.Tensor, start: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes `[start, start + nbytes)` of every row viewed as `[M, nbytes / size] dtype`. The
    flattening copies unless the slice is one contiguous run (one row), which then starts at
    an aligned offset by construction of `pack_rows`."""
    m = rows.shape[0]
    cols = nbytes // dtype.itemsize
    return rows[:, start:start + nbytes].reshape(-1).view(dtype).view(m, cols)


def packed_meta_bytes(topk: int, scale_cols: int) -> int:
    """Bytes of a wire row before x (see `pack_rows`), scales included."""
    meta = 8 * topk + 4 * scale_cols
    return meta + (-meta % 8)
