"""`alltoallv`: sparse dispatch, only the rows a rank needs cross the wire (EXPERT_PACKED).

The Megatron all-to-all-v recipe, adapted to send each token **once per destination rank**
(option `dedup=True`, the default) instead of once per (token, expert):

1. Plan locally (`moe_ep.managers.planning`: C for CPU tensors, torch elsewhere): the rows
   for each destination (tokens with at least one expert there, sorted by token) and, per row,
   the local ids and router weights of the token's slots on that destination.
2. The per-destination row counts ride in the call's header (`moe_ep.managers.protocol`), so
   every rank learns its receive split sizes without a separate count exchange.
3. One `all_to_all_single` of wire rows `[ids int32 K | weights float32 K | scales | x]`.
4. The receiver regroups the rows by local expert (`planning.packed_layout`): `x [R, H]` in
   `tokens_per_expert` segments, rows of one expert in (source rank, token) order.

Combine: the expert outputs `[R, H]` (unweighted `f_e(row)`) are multiplied by their router
weights and summed, in float32, per received row (the partial sum over the experts of that
token on this rank), sent back with the reversed split sizes (one row per (token,
destination) again), and summed per token by the sender: `y[n] = sum_k w[n, k]
f_{ids[n, k]}(x[n])`. Applying the weights on the expert side keeps the return trip
deduplicated and the result exact.

Bytes per token a rank sends (B = H * element size, K = topk, d = distinct *other* ranks the
token's experts live on, p = its (token, expert) pairs on other ranks):

* `dedup=True`:  dispatch `d (B + 8K)`, combine `d B`.
* `dedup=False`: dispatch `p (B + 8K)`, combine `p B`.

plus the header. With uniform random routing over E experts (L = E/W per rank),
`d = (W-1) (1 - C(E-L, K) / C(E, K))` and `p = K (W-1)/W`; `allgather_reducescatter` sends
`(W-1) (B + 8K) + (W-1) B`, which alltoallv undercuts whenever `d < W-1` (K small against W,
many ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moe_ep.managers import planning
from moe_ep.managers.accounting import WireCounter
from moe_ep.managers.contract import (
    CombineState,
    DispatchResult,
    EPHandle,
    Layout,
)
from moe_ep.managers.expert_ops import gather_sum, segment_sum
from moe_ep.managers.group_exchange import GroupExchangeManager, pack_rows, unpack_rows
from moe_ep.managers.inputs import CheckedInputs
from moe_ep.managers.options import AllToAllVOptions
from moe_ep.managers.placement import expert_placement

__all__ = ["AllToAllVManager", "AllToAllVOptions", "AllToAllVState"]


@dataclass(eq=False)
class AllToAllVState(CombineState):
    """What the combine needs (shapes as on this rank).

    Attributes:
        send_counts: `[W]` rows sent to each rank; recv_counts: `[W]` rows received.
        token_rows: `[N, C] int64` per token its rows among those sent (C = W with dedup:
            row inside each destination's chunk; C = K without: absolute row), -1 = none.
        row_offsets, row_order, row_weight: CSR by received row of the packed rows.
    """

    send_counts: tuple[int, ...] = ()
    recv_counts: tuple[int, ...] = ()
    token_rows: torch.Tensor | None = None
    row_offsets: torch.Tensor | None = None
    row_order: torch.Tensor | None = None
    row_weight: torch.Tensor | None = None


class AllToAllVManager(GroupExchangeManager):
    """Sparse all-to-all-v dispatch / combine on any torch.distributed backend."""

    name: ClassVar[str] = "alltoallv"
    layout: ClassVar[Layout] = Layout.EXPERT_PACKED
    options_cls: ClassVar[type] = AllToAllVOptions

    def checks_ids_in_python(self, x: object) -> bool:
        # The native planner validates the ids in its pass (CPU, deduplicated rows).
        return not (self.options.dedup and isinstance(x, torch.Tensor) and planning.native(x))

    def _plan(self, handle: EPHandle, checked: CheckedInputs):
        placement = expert_placement(handle.spec.num_experts, self.world_size)
        ids, weights = checked.topk_ids, checked.topk_weights
        w = self.world_size
        if self.options.dedup and planning.native(ids):
            # One C pass plans and checks the ids; the rows per destination come with it,
            # the (token, expert) pairs per destination are one bincount.
            plan = planning.plan(ids, weights, placement)
            pairs = torch.bincount(placement.owner_cpu[ids[ids >= 0]], minlength=w)
            return plan, tuple(plan.send_counts.tolist() + pairs.tolist())
        # The split sizes must reach the host (all_to_all_single takes them there): one
        # synchronisation for rows and pairs together, and none after it.
        dests = planning.destinations(ids, placement)
        counts = tuple(planning.send_counts(ids, placement, dests).tolist())
        if not self.options.dedup:
            counts = counts[w:] + counts[w:]  # one row per pair
            plan = planning.plan_dispatch_pairs(ids, weights, placement, sum(counts[:w]))
        else:
            plan = planning.plan_dispatch(ids, weights, placement, total_rows=sum(counts[:w]),
                                          dests=dests)
        return plan, counts

    def _transfer(self, call: int, seq: int, handle: EPHandle, checked: CheckedInputs,
                  plan: planning.DispatchPlan, rows: list[list[int]],
                  counter: WireCounter) -> DispatchResult:
        """Send each token's row to the ranks owning its experts; see the module docstring.

        Returns an EXPERT_PACKED result: `x [R, H]` one row per (token, local expert) in
        `tokens_per_expert [E_local] int64` segments; `topk_ids [R] int64` local expert of
        each row; `topk_weights [R] float32` its router weight (applied by the combine).
        """
        spec, me, w = handle.spec, self.rank, self.world_size
        peers = self._peer_counts(rows)
        send = peers[me][:w]
        recv = tuple(counts[me] for counts in peers)
        pairs = sum(counts[w + me] for counts in peers)
        x = checked.x.index_select(0, plan.send_token)
        scales = (None if checked.x_scales is None
                  else checked.x_scales.index_select(0, plan.send_token))
        wire = pack_rows(x, plan.row_ids, plan.row_weights, scales)
        received = self.group.all_to_all_single(wire, output_split_sizes=list(recv),
                                                input_split_sizes=list(send))
        payload = spec.row_bytes()
        counter.to_others([n * payload for n in send],
                          [n * (wire.shape[1] - payload) for n in send])
        recv_x, recv_ids, recv_w, recv_scales = unpack_rows(
            received, spec.hidden, spec.dtype, spec.topk, spec.scale_cols)
        placement = expert_placement(spec.num_experts, self.world_size)
        packed = planning.layout(recv_ids, recv_w, placement.num_local(me), pairs)
        state = AllToAllVState(
            self, handle, call, seq, checked.num_tokens, (int(packed.packed_row.numel()),),
            send_counts=send, recv_counts=recv, token_rows=plan.token_rows,
            row_offsets=packed.row_offsets, row_order=packed.row_order,
            row_weight=packed.row_weight,
        )
        return DispatchResult(
            layout=Layout.EXPERT_PACKED,
            x=recv_x.index_select(0, packed.packed_row),
            x_scales=(None if recv_scales is None
                      else recv_scales.index_select(0, packed.packed_row)),
            topk_ids=packed.packed_local,
            topk_weights=packed.packed_weight,
            tokens_per_expert=packed.tokens_per_expert,
            handle=state,
        )

    def _return_trip(self, state: AllToAllVState, expert_out: torch.Tensor,
                     counter: WireCounter) -> torch.Tensor:
        """Weight and sum per received row, send back, sum per token: `[N, H]`."""
        partial = segment_sum(expert_out, state.row_order, state.row_offsets, state.row_weight)
        back = self.group.all_to_all_single(partial, output_split_sizes=list(state.send_counts),
                                            input_split_sizes=list(state.recv_counts))
        row_bytes = partial.shape[1] * partial.element_size()
        counter.to_others([n * row_bytes for n in state.recv_counts])
        if self.options.dedup:
            sources = list(back.split(list(state.send_counts)))
        else:
            sources = [back] * state.token_rows.shape[1]
        return gather_sum(sources, state.token_rows)

    @classmethod
    def wire_bytes_per_token(cls, *, world_size: int, hidden: int, elem_size: int, topk: int,
                             num_experts: int, dedup: bool = True, **options: Any) -> float:
        """Expected bytes per token for uniform random routing (see the module docstring),
        averaged over the source ranks of the contiguous placement."""
        placement = expert_placement(num_experts, world_size)
        k = min(topk, num_experts)
        b = hidden * elem_size
        total_ways = math.comb(num_experts, k)
        per_rank = []
        for src in range(world_size):
            d = sum(
                1 - math.comb(num_experts - placement.counts[r], k) / total_ways
                for r in range(world_size) if r != src
            )
            p = k * (num_experts - placement.counts[src]) / num_experts
            rows = d if dedup else p
            per_rank.append(rows * (b + 8 * topk) + rows * b)
        return sum(per_rank) / world_size
