"""`shm`: dispatch / combine through CPU shared memory, for the ranks of one node.

Each per-layer handle owns a shared buffer sized from its `EPSpec` (`max_tokens_per_rank`
rows per source and destination, two halves so that two results can be live); the transport
is `moe_ep.distributed.shm_exchange` (protocol: csrc/cpu/shm_ep.h). A dispatch is:

1. plan (`moe_ep.kernels.DispatchPlanner`, one C pass that also validates the ids): the rows
   for each destination (a token goes once to each rank owning at least one of its experts),
   their per-slot local ids and weights, and each token's row at each destination;
2. one small exchange of per-destination counts, an error code and the call's identity;
3. the transfer: every rank copies its rows, ids and weights straight into each destination's
   buffer at the offset the counts give, so the receiver's rows are one contiguous block.

Layouts (option `layout`):

* `token` (default): the result *is* the receiver's block, read in place: `x [M, H]`,
  `topk_ids [M, K]` local ids (-1 elsewhere), `topk_weights [M, K]` (one row per (token,
  destination), as DeepEP's normal mode). The experts step applies the weights; combine copies
  each output row once into the owner's block (nothing when the experts wrote it there), and
  every source sums its tokens' rows from the owners' blocks in one native pass.
* `expert_packed`: rows regrouped by local expert (`x [R, H]`, one copy per (token, local
  expert)); the combine's weighted per-row sums are written straight into the owner's block by
  the native segment-sum kernel, then summed per token as above.

TOKEN is what reaches the memory-bandwidth floor: a token crosses to each destination once and
is never replicated per expert. Results are views of the handle's buffers: valid until the
handle's second next dispatch, or its next one once combined (a dispatch reuses the half of a
combined result, so that a layer's round trips keep one half warm in the caches; a third
dispatch retires the oldest result, and combining it then raises on every rank). All sums
accumulate in fp32 (fp64 for fp64) and round once.

Bytes per token a rank writes for other ranks: those of deduplicated `alltoallv`
(`d (B + 8K)` dispatch, `d B` combine), plus one control line per call.
"""

from __future__ import annotations

import logging
import ctypes
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moe_ep import kernels
from moe_ep.managers import protocol
from moe_ep.managers.accounting import WireBytes
from moe_ep.managers.contract import (
    All2AllManager,
    CombineState,
    DispatchResult,
    EPHandle,
    EPSpec,
    Layout,
    ManagerUnavailableError,
)
from moe_ep.managers.inputs import CheckedInputs
from moe_ep.managers.options import ShmAll2AllOptions
from moe_ep.managers.placement import expert_placement

logger = logging.getLogger(__name__)

__all__ = ["ShmAll2AllManager", "ShmAll2AllOptions", "ShmHandle", "ShmState"]

class ShmHandle(EPHandle):
    """A layer's shared buffers and per-half routing plans.

    Attributes:
        buffer: the `ShmExchangeBuffer` (None with one rank; it also holds the received
        `tokens_per_expert` per half); planners: per half b, the `DispatchPlanner` of the
        dispatch using half b; half_of: the half of each live result's dispatch.
    """

    def __init__(self, manager: ShmAll2AllManager, spec: EPSpec, index: int) -> None:
        super().__init__(manager, spec, index)
        placement = expert_placement(spec.num_experts, manager.world_size)
        self.num_local = placement.num_local(manager.rank)
        self.planners = [
            kernels.DispatchPlanner(placement.owner_cpu, placement.local_index_cpu,
                                    manager.world_size, spec.topk, spec.max_tokens_per_rank)
            for _ in range(2)
        ]
        self.half_of: dict[int, int] = {}
        self._last_half = 0
        self.buffer = None
        if manager.world_size > 1:
            from moe_ep.distributed.shm_exchange import ExchangeGeometry

            geometry = ExchangeGeometry(
                capacity=spec.max_tokens_per_rank, hidden=spec.hidden, dtype=spec.dtype,
                topk=spec.topk, scale_cols=spec.scale_cols, out_dtype=spec.combine_dtype,
                num_local=self.num_local)
            self.buffer = manager.exchange.open_buffer(
                geometry, f"{manager.group_name}-ep{manager.uid}-h{index}")
            logger.info("shm manager on group %r: handle %d maps %.1f MiB of shared memory "
                        "(%d tokens per rank, H=%d %s)", manager.group_name, index,
                        self.buffer.nbytes / 2**20, spec.max_tokens_per_rank, spec.hidden,
                        str(spec.dtype).removeprefix("torch."))

    def pick_half(self) -> int:
        """The buffer half of the next dispatch (the caller has retired down to one live
        result): the last dispatch's half when nothing is live, so that a layer called round
        trip after round trip keeps one half warm in the caches instead of two; otherwise the
        half the live result does not use. The same on every rank, since it depends only on
        the sequence of calls."""
        half = self._last_half if not self.live else 1 - self.half_of[self.live[0]]
        self._last_half = half
        return half

    def _release(self) -> None:
        if self.buffer is not None:
            self.buffer.destroy()


@dataclass(eq=False)
class ShmState(CombineState):
    """What the combine needs (backend-private).

    Attributes:
        half: the buffer half the dispatch used; received: M, rows of this rank's block;
        packed: the EXPERT_PACKED regrouping, or None.
    """

    half: int = 0
    received: int = 0
    packed: Any = None


class ShmAll2AllManager(All2AllManager):
    """Dispatch / combine through CPU shared memory, for the ranks of one node."""

    name: ClassVar[str] = "shm"
    layout: Layout = Layout.TOKEN
    options_cls: ClassVar[type] = ShmAll2AllOptions
    collective_handles: ClassVar[bool] = True
    max_live_results: ClassVar[int] = 2

    @classmethod
    def availability(cls, topology: Any) -> tuple[bool, str]:
        from moe_ep.distributed.shm import ShmCommunicator

        if topology.device != "cpu":
            return False, f"CPU shared memory only (this topology's device is {topology.device!r})"
        if topology.internode:
            return False, "needs every rank on one node (this topology spans several nodes)"
        for ok, reason in (ShmCommunicator.available(), kernels.available()):
            if not ok:
                return False, reason
        return True, "CPU ranks on one node: rows move through shared-memory buffers"

    def __init__(self, group: Any, **options: Any) -> None:
        super().__init__(group, **options)
        self.layout = Layout(self.options.layout)
        self.implicit_capacity = self.options.max_tokens_per_rank
        self.exchange = None
        # What the wire-byte counters are computed from, on demand (off the hot path).
        self._sent: tuple[ShmHandle, int] | None = None
        self._returned: tuple[ShmHandle, ShmState] | None = None
        if torch.device(group.device).type != "cpu":
            raise ManagerUnavailableError(
                f"manager 'shm' needs a CPU group, group {self.group_name!r} is on {group.device}")
        if self.world_size == 1:
            ok, reason = kernels.available()
            if not ok:
                raise ManagerUnavailableError(f"manager 'shm' is unavailable: {reason}")
            return
        from moe_ep.distributed.shm import ShmCommunicator, ShmUnavailableError
        from moe_ep.distributed.shm_exchange import ShmExchange

        # Decided collectively, so that every rank refuses alike instead of leaving its peers
        # in the segment set-up below: ranks on other hosts cannot map a segment made in this
        # host's /dev/shm (the group decided `same_node` for all its ranks when it was built),
        # and the native libraries may be missing on one host.
        if not group.same_node:
            raise ManagerUnavailableError(
                f"manager 'shm' needs every rank of group {self.group_name!r} on one node "
                "(the group spans several)")
        usable = group.all_gather_object(
            [reason for ok, reason in (ShmCommunicator.available(), kernels.available()) if not ok])
        missing = [f"rank {r}: {'; '.join(why)}" for r, why in enumerate(usable) if why]
        if missing:
            raise ManagerUnavailableError(f"manager 'shm' is unavailable: {'; '.join(missing)}")

        try:
            self.exchange = ShmExchange(group.cpu_group, self.rank, self.world_size,
                                        f"{self.group_name}-ep{self.uid}",
                                        timeout_s=group.timeout_s)
        except ShmUnavailableError as e:  # raised on every rank alike
            raise ManagerUnavailableError(f"manager 'shm' is unavailable: {e}") from e

    def checks_ids_in_python(self, x: object) -> bool:
        return False  # the native planner validates them in the same pass

    def _gather_header(self, call: int, values: list[int]) -> list[list[int]]:
        # Through the manager's own exchange, not the group: a peer in a dispatch or combine
        # of this manager then sees the different call at once instead of waiting elsewhere.
        self._check_usable()  # a broken exchange cannot carry the error: say why here
        try:
            return self.exchange.agree(call, values)
        except Exception as exc:
            self._transport_failed(exc)
            raise

    def _create_handle(self, spec: EPSpec, index: int) -> ShmHandle:
        return ShmHandle(self, spec, index)

    def destroy(self) -> None:
        """Free the handles and the exchange (idempotent). Peers still waiting on this rank
        fail at once instead of timing out."""
        if self.destroyed:
            return
        if self.exchange is not None:
            self.exchange.post_destroyed(self._calls + 1)
        super().destroy()
        if self.exchange is not None:
            self.exchange.destroy()
            self.exchange = None

    # ---- failures ------------------------------------------------------------------------

    def _transport_failed(self, error: BaseException) -> None:
        self._mark_broken(f"its shared-memory exchange failed: {error}")

    def _fail_unrouted(self, error: BaseException) -> None:
        """A rank that cannot name the handle its peers wait on aborts the exchange: they
        raise ShmError with this message at once; the manager is unusable afterwards."""
        if self.exchange is not None and not self.destroyed:
            self.exchange.abort(f"rank {self.rank}: {type(error).__name__}: {error}")
            self._mark_broken(f"rank {self.rank} aborted it: {error}")
        raise error

    # ---- dispatch ------------------------------------------------------------------------

    def _dispatch(self, call: int, handle: EPHandle | None, checked: CheckedInputs | None,
                  error: Exception | None) -> DispatchResult:
        if not isinstance(handle, ShmHandle) or handle.destroyed or (
            self.world_size > 1 and self.exchange is None
        ):
            self._fail_unrouted(error or RuntimeError("dispatch: no usable handle"))
        seq = handle.dispatches
        handle.dispatches += 1
        # A third live result would overwrite a half: retire the oldest (it becomes stale).
        while len(handle.live) >= self.max_live_results:
            old = handle.live.pop(0)
            old_half = handle.half_of.pop(old)
            if handle.buffer is not None:
                try:
                    handle.buffer.retire(old, old_half)
                except Exception as exc:
                    self._transport_failed(exc)
                    raise
        half = handle.pick_half()
        planner = handle.planners[half]
        if error is None:
            try:
                planner.plan(checked.topk_ids, checked.topk_weights)
            except ValueError as exc:
                error = exc
        if self.world_size == 1:
            if error is not None:
                raise error
            return self._dispatch_local(call, seq, half, handle, checked, planner)
        code = protocol.error_code(error)
        buf = handle.buffer
        try:
            received = buf.dispatch(call, seq, half, code, checked.x if code == 0 else None,
                                    planner, checked.x_scales if code == 0 else None)
        except Exception as exc:
            self._transport_failed(exc)
            raise
        if received < 0 or error is not None:
            protocol.raise_for_errors(self, "dispatch", buf.peer_errors(), error)
        handle.live.append(seq)
        handle.half_of[seq] = half
        self._sent = (handle, half)
        state = ShmState(self, handle, call, seq, checked.num_tokens, (received,), half=half,
                         received=received)
        return self._result(state, *buf.received(half, received), buf.tokens_per_expert[half])

    def _dispatch_local(self, call: int, seq: int, half: int, handle: ShmHandle,
                        checked: CheckedInputs, planner: kernels.DispatchPlanner
                        ) -> DispatchResult:
        """One rank: the rows are the tokens with an expert (copies, nothing to exchange)."""
        handle.live.append(seq)
        handle.half_of[seq] = half
        m = int(planner.send_counts[0])
        rows = planner.send_token[:m]
        state = ShmState(self, handle, call, seq, checked.num_tokens, (m,), half=half,
                         received=m)
        scales = None if checked.x_scales is None else checked.x_scales.index_select(0, rows)
        row_ids = planner.row_ids[:m].clone()
        return self._result(state, checked.x.index_select(0, rows), row_ids,
                            planner.row_weights[:m].clone(), scales,
                            kernels.count_experts(row_ids, handle.num_local))

    def _result(self, state: ShmState, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                scales: torch.Tensor | None, tpe: torch.Tensor) -> DispatchResult:
        num_local = state.handle.num_local
        if self.layout is Layout.TOKEN:
            return DispatchResult(Layout.TOKEN, x, scales, ids, weights, tpe, state)
        packed = kernels.packed_layout(ids, weights, num_local)
        state.packed = packed
        state.rows = (int(packed.packed_row.numel()),)
        return DispatchResult(
            Layout.EXPERT_PACKED, kernels.gather_rows(x, packed.packed_row),
            None if scales is None else kernels.gather_rows(scales, packed.packed_row),
            packed.packed_local, packed.packed_weight, packed.tokens_per_expert, state,
        )

    # ---- combine -------------------------------------------------------------------------

    def _combine(self, call: int, state: CombineState | None, expert_out: torch.Tensor | None,
                 error: Exception | None) -> torch.Tensor:
        if not isinstance(state, ShmState) or state.handle.destroyed or (
            self.world_size > 1 and self.exchange is None
        ):
            self._fail_unrouted(error or RuntimeError("combine: no usable result"))
        handle: ShmHandle = state.handle
        code = protocol.error_code(error)
        if error is not None and state.seq not in handle.live and self.world_size > 1:
            # A stale result: post the call (peers waiting in another combine of this handle
            # see the mismatch at once and abort) but wait for nobody; when every rank passes
            # the same stale result they all just raise, and the live results stay usable.
            try:
                handle.buffer.combine(call, state.seq, state.half, code, None)
            except Exception as exc:
                self._transport_failed(exc)
                raise
            raise error
        self._finish(state)
        handle.half_of.pop(state.seq, None)
        half = state.half
        if self.world_size == 1:
            if error is not None:
                raise error
            return self._combine_sum(state, handle, expert_out, None)
        out = None
        if error is None:
            out = expert_out
            if self.layout is Layout.EXPERT_PACKED:
                # Weighted partial sum per received row, written straight into this rank's
                # block where the sources read it.
                block = handle.buffer.out[half][: state.received]
                p = state.packed
                kernels.segment_sum(expert_out, p.row_order, p.row_offsets, p.row_weight,
                                    out=block)
                out = block
        buf = handle.buffer
        try:
            rc = buf.combine(call, state.seq, half, code, out)
        except Exception as exc:
            self._transport_failed(exc)
            raise
        if rc < 0 or error is not None:
            protocol.raise_for_errors(self, "combine", buf.peer_errors(), error)
        self._returned = (handle, state)
        return self._combine_sum(state, handle, out, buf.bases)

    def _combine_sum(self, state: ShmState, handle: ShmHandle, out: torch.Tensor,
                     bases) -> torch.Tensor:
        """`[N, H]`: each token's rows summed from the owners (`bases`, the transport's
        addresses; None with one rank: the rows are `out` itself)."""
        planner = handle.planners[state.half]
        spec = handle.spec
        if bases is None:
            if self.layout is Layout.EXPERT_PACKED:
                p = state.packed
                out = kernels.segment_sum(out, p.row_order, p.row_offsets, p.row_weight)
            bases = (ctypes.c_void_p * 1)(out.data_ptr())
        # Sizes as separate arguments: torch parses them faster than a tuple (every decode step).
        y = torch.empty(state.num_tokens, spec.hidden, dtype=spec.combine_dtype)
        return planner.sum_back(y, bases, spec.hidden)

    # ---- wire accounting -----------------------------------------------------------------

    @property
    def last_dispatch_bytes(self) -> WireBytes:
        """Rows, ids (int64) and weights written for other ranks, and the control header."""
        if self._sent is None or self.world_size == 1:
            return WireBytes()
        handle, half = self._sent
        spec, counts = handle.spec, handle.planners[half].send_counts.tolist()
        counter = self._new_counter()
        counter.header_exchange(8 * (3 + self.world_size))
        counter.to_others([n * spec.row_bytes() for n in counts],
                          [n * 12 * spec.topk for n in counts])
        return counter.freeze()

    @property
    def last_combine_bytes(self) -> WireBytes:
        """Output rows of the other sources' tokens, and the error word."""
        if self._returned is None or self.world_size == 1:
            return WireBytes()
        handle, state = self._returned
        spec = handle.spec
        # The other sources' rows: all received rows but this rank's own.
        own = int(handle.planners[state.half].send_counts[self.rank])
        counter = self._new_counter()
        counter.header_exchange(8)
        es = spec.combine_dtype.itemsize
        counter.sent((state.received - own) * spec.hidden * es)
        return counter.freeze()

    # ---- cost model ----------------------------------------------------------------------

    @classmethod
    def wire_bytes_per_token(cls, *, world_size: int, hidden: int, elem_size: int, topk: int,
                             num_experts: int, **options: Any) -> float:
        """Those of deduplicated `alltoallv` (the same rows and metadata cross ranks)."""
        from moe_ep.managers.alltoallv import AllToAllVManager

        return AllToAllVManager.wire_bytes_per_token(
            world_size=world_size, hidden=hidden, elem_size=elem_size, topk=topk,
            num_experts=num_experts, dedup=True)

