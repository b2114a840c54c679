"""``alltoallv``: sparse dispatch, only the rows a rank needs cross the wire (EXPERT_PACKED).

The Megatron all-to-all-v recipe, adapted to send each token **once per destination rank**
(option ``dedup=True``, the default) instead of once per (token, expert):

Dispatch (rank ``s``, N tokens, top-k K, W ranks, contiguous expert placement):

1. Locally, list the valid (token, k) pairs, their owner rank and local expert. With
   ``dedup`` the rows to send are the distinct (destination, token) pairs, sorted by
   destination then token; without it every pair is its own row. Each pair is encoded as one
   int32 ``row_in_destination_chunk * max_local_experts + local_expert`` plus its float32
   router weight (8 bytes per pair; ids of -1 send nothing).
2. The per-destination row and pair counts ride in the dispatch header (the int32 all-gather
   every dispatch starts with, :mod:`moe_ep.managers.base`), so every rank learns its receive
   split sizes without a separate count exchange.
3. One ``all_to_all_single`` of bytes: the chunk for rank d is its rows ``[S_d, H]`` followed
   by its pair records ``[P_d, 2] int32``; both sizes are known from the header, so nothing is
   padded and a dispatch costs two collectives (header + this one), like agrs.
4. The receiver decodes the pairs, orders them stably by local expert and gathers one row per
   (token, local expert): ``x [R, H]`` in ``tokens_per_expert`` segments, rows of one expert in
   (source rank, token) order.

Combine: the expert outputs ``[R, H]`` (unweighted ``f_e(row)``) are multiplied by their router
weights and summed, in float32, per received row (the partial sum over the experts of that
token on this rank), cast to the activation dtype, sent back with the reversed split sizes
(one row per (token, destination) again), and summed in float32 into ``[N, H]`` by the
sender. Applying the weights on the expert side is what keeps the return trip deduplicated
and the result exact: ``y[n] = sum_k w[n, k] f_{ids[n, k]}(x[n])``, -1 ids adding nothing.

Bytes per token a rank sends (B = H * element size, d = number of distinct *other* ranks the
token's experts live on, p = number of its (token, expert) pairs on other ranks):

* ``dedup=True``:  dispatch ``d B + 8 p``, combine ``d B``.
* ``dedup=False``: dispatch ``p (B + 8)``, combine ``p B``.

plus one header of ``4 (6 + 2W)`` bytes per call to each other rank (agrs: ``4 * 6``). With
uniform random routing over E experts (L = E/W per rank), ``d = (W-1) (1 - C(E-L, K) / C(E, K))``
and ``p = K (W-1)/W``. ``allgather_reducescatter`` sends ``(W-1) (B + 8K) + (W-1) B`` per token.
Since ``d <= W-1`` and ``E[p] = K (W-1)/W < K (W-1)``, alltoallv moves fewer bytes per token
in expectation whenever W > 1, and far fewer when ``d < W-1`` (K small against W, many ranks).
Per call it can only tie with agrs on rows and metadata, when every token reaches every other
rank and (W = 2) all its pairs are remote. Example, H = 2048 bf16, E = 64, K = 8: W = 2 gives
``d = 0.998``, 8 205 vs 8 256 B/token; W = 4 gives ``d = 2.75``, 22 529 vs 24 768 B/token
(W = 8: 38 997 vs 57 792).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moe_ep.managers.base import (
    _INT32_MAX,
    All2AllManager,
    CheckedDispatchInputs,
    DispatchResult,
    Layout,
    check_option_type,
    expert_placement,
    weighted_row_sum,
)

__all__ = ["AllToAllVHandle", "AllToAllVManager", "AllToAllVOptions"]


@dataclass(frozen=True)
class AllToAllVOptions:
    """Options of ``alltoallv``.

    Attributes:
        dedup: send a token once per destination rank (True) rather than once per
            (token, expert) (False). Both are exact; True moves fewer bytes when a token has
            several experts on one rank.
    """

    dedup: bool = True

    def __post_init__(self) -> None:
        check_option_type("dedup", self.dedup, (bool,))


@dataclass(frozen=True, eq=False)
class AllToAllVHandle:
    """State the combine needs (shapes as on this rank).

    Attributes:
        num_tokens: N, tokens this rank dispatched.
        hidden: H.
        dtype: dtype of the dispatched x (wire and output dtype of the combine).
        send_token: ``[S] int64`` token index of each row sent, in send order.
        send_rows: ``[W]`` rows sent to each rank.
        recv_rows: ``[W]`` rows received from each rank.
        packed_row: ``[R] int64`` received row behind each expert-packed row.
        packed_weight: ``[R] float32`` router weight of each expert-packed row.
    """

    num_tokens: int
    hidden: int
    dtype: torch.dtype
    send_token: torch.Tensor
    send_rows: tuple[int, ...]
    recv_rows: tuple[int, ...]
    packed_row: torch.Tensor
    packed_weight: torch.Tensor


@dataclass(frozen=True, eq=False)
class _SendPlan:
    send_token: torch.Tensor  # [S] int64
    send_rows: tuple[int, ...]  # [W]
    send_pairs: tuple[int, ...]  # [W]
    pairs: torch.Tensor  # [P_send, 2] int32: code, weight bits


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


class AllToAllVManager(All2AllManager):
    """Sparse all-to-all-v dispatch / combine on any torch.distributed backend."""

    name: ClassVar[str] = "alltoallv"
    layout: ClassVar[Layout] = Layout.EXPERT_PACKED
    options_cls: ClassVar[type] = AllToAllVOptions

    def __init__(self, group: Any, **options: Any) -> None:
        super().__init__(group, **options)
        # (num_experts, device) -> placement tables, so dispatch does not rebuild them.
        self._tables: dict[tuple[int, str], tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def header_extra_ints(self) -> int:
        # Rows and routing records this rank sends to each rank: the receive split sizes.
        return 2 * self.world_size

    @classmethod
    def availability(cls, topology: Any) -> tuple[bool, str]:
        return True, "portable: runs on any torch.distributed backend (gloo on CPU, NCCL on CUDA)"

    # ---- planning (local, before the header) -------------------------------------------------

    def _placement_tables(self, num_experts: int, device: torch.device):
        """Cached ``(placement, owner [E] int64, starts [W] int64)`` on ``device``."""
        key = (num_experts, str(device))
        tables = self._tables.get(key)
        if tables is None:
            placement = expert_placement(num_experts, self.world_size)
            tables = (
                placement,
                placement.owner_table(device),
                torch.tensor(placement.starts, dtype=torch.int64, device=device),
            )
            self._tables[key] = tables
        return tables

    def _plan(self, checked: CheckedDispatchInputs) -> tuple[list[int], _SendPlan]:
        w_size = self.world_size
        ids, n = checked.topk_ids, checked.num_tokens
        device = ids.device
        placement, owner_of, starts = self._placement_tables(checked.num_experts, device)
        max_local = placement.max_local
        valid = ids >= 0
        # Pairs in row-major (token, k) order.
        p_token = torch.arange(n, device=device).unsqueeze(1).expand_as(ids)[valid]
        p_expert = ids[valid]
        p_dst = owner_of[p_expert]
        p_local = p_expert - starts[p_dst]
        p_weight = checked.topk_weights[valid]
        # Group the pairs by destination; within one, (token, k) order is kept.
        order = torch.argsort(p_dst, stable=True)
        p_token, p_dst, p_local, p_weight = (
            p_token[order],
            p_dst[order],
            p_local[order],
            p_weight[order],
        )
        send_pairs = torch.bincount(p_dst, minlength=w_size)
        if self.options.dedup:
            # One row per distinct (destination, token), destination-major, token-ascending.
            hit = torch.zeros((w_size, n), dtype=torch.bool, device=device)
            hit[p_dst, p_token] = True
            dst_token = hit.nonzero()
            send_token = dst_token[:, 1]
            send_rows = hit.sum(dim=1)
            row_in_chunk = (torch.cumsum(hit, dim=1) - 1)[p_dst, p_token]
        else:
            send_token = p_token
            send_rows = send_pairs
            row_in_chunk = (
                torch.arange(p_dst.numel(), device=device) - (_exclusive_cumsum(send_pairs)[p_dst])
            )
        counts = torch.cat([send_rows, send_pairs]).tolist()
        if max(counts[:w_size], default=0) * max_local > _INT32_MAX:
            raise ValueError(
                f"alltoallv cannot encode {max(counts[:w_size])} rows per destination with "
                f"{max_local} local experts in int32; dispatch fewer tokens per call"
            )
        code = (row_in_chunk * max_local + p_local).to(torch.int32)
        pairs = torch.stack([code, p_weight.float().view(torch.int32)], dim=1)
        plan = _SendPlan(
            send_token=send_token,
            send_rows=tuple(counts[:w_size]),
            send_pairs=tuple(counts[w_size:]),
            pairs=pairs,
        )
        return counts, plan

    # ---- the contract -------------------------------------------------------------------------

    def dispatch(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        num_experts: int,
    ) -> DispatchResult:
        """Send each token's row to the ranks owning its experts; see the module docstring.

        Returns an EXPERT_PACKED result: ``x [R, H]`` one row per (token, local expert) in
        ``tokens_per_expert [E_local] int64`` segments; ``topk_ids [R] int64`` local expert of
        each row; ``topk_weights [R] float32`` its router weight (applied by the combine).
        """
        counter = self._new_counter()
        w_size, me = self.world_size, self.rank
        checked, headers, plan = self._checked_dispatch(
            x, topk_weights, topk_ids, num_experts, counter, num_extra=self.header_extra_ints(),
            plan=self._plan,
        )
        recv_rows = tuple(headers.extra[src][me] for src in range(w_size))
        recv_pairs = tuple(headers.extra[src][w_size + me] for src in range(w_size))
        hidden, dtype = checked.hidden, checked.x.dtype
        row_bytes = hidden * checked.x.element_size()
        device = checked.x.device

        # Rows and pair records travel in one all-to-all of bytes: the chunk for rank d is
        # [its rows | its pair records]. Both sizes are known everywhere from the header, so
        # no padding is needed and the dispatch costs two collectives (header + this one).
        send_bytes = [
            r * row_bytes + 8 * p for r, p in zip(plan.send_rows, plan.send_pairs, strict=True)
        ]
        recv_bytes = [r * row_bytes + 8 * p for r, p in zip(recv_rows, recv_pairs, strict=True)]
        send = torch.empty(sum(send_bytes), dtype=torch.uint8, device=device)
        pair_bytes = plan.pairs.view(torch.uint8).reshape(-1)
        offset = row = pair = 0
        for d in range(w_size):
            rows, npairs = plan.send_rows[d], plan.send_pairs[d]
            if rows:
                # Chunk offsets are multiples of the element size, so the byte view is legal.
                out = send[offset : offset + rows * row_bytes].view(dtype).view(rows, hidden)
                torch.index_select(checked.x, 0, plan.send_token[row : row + rows], out=out)
            offset += rows * row_bytes
            send[offset : offset + 8 * npairs] = pair_bytes[8 * pair : 8 * (pair + npairs)]
            offset, row, pair = offset + 8 * npairs, row + rows, pair + npairs
        recv = self.group.all_to_all_single(
            send, output_split_sizes=recv_bytes, input_split_sizes=send_bytes
        )
        counter.to_others([r * row_bytes for r in plan.send_rows], [8 * p for p in plan.send_pairs])
        row_parts, pair_parts = [], []
        offset = 0
        for s in range(w_size):
            end_rows = offset + recv_rows[s] * row_bytes
            row_parts.append(recv[offset:end_rows].view(dtype).view(recv_rows[s], hidden))
            pair_parts.append(recv[end_rows : end_rows + 8 * recv_pairs[s]])
            offset = end_rows + 8 * recv_pairs[s]
        recv_x = torch.cat(row_parts) if w_size > 1 else row_parts[0]
        # cat copies into a fresh, aligned tensor, so the int32 view is legal.
        recv_pair = torch.cat(pair_parts).view(torch.int32).view(-1, 2)

        placement, _, _ = self._placement_tables(checked.num_experts, device)
        code = recv_pair[:, 0].long()
        weight = recv_pair[:, 1].contiguous().view(torch.float32)
        source = torch.repeat_interleave(
            torch.arange(w_size, device=device),
            torch.tensor(recv_pairs, dtype=torch.int64, device=device),
        )
        row_start = _exclusive_cumsum(torch.tensor(recv_rows, dtype=torch.int64, device=device))
        received_row = row_start[source] + torch.div(
            code, placement.max_local, rounding_mode="floor"
        )
        local = torch.remainder(code, placement.max_local)
        order = torch.argsort(local, stable=True)
        packed_row, packed_weight, packed_local = received_row[order], weight[order], local[order]
        tokens_per_expert = torch.bincount(local, minlength=placement.num_local(me))
        handle = AllToAllVHandle(
            num_tokens=checked.num_tokens,
            hidden=hidden,
            dtype=dtype,
            send_token=plan.send_token,
            send_rows=plan.send_rows,
            recv_rows=recv_rows,
            packed_row=packed_row,
            packed_weight=packed_weight,
        )
        self.last_dispatch_bytes = counter.freeze()
        return DispatchResult(
            layout=Layout.EXPERT_PACKED,
            x=recv_x.index_select(0, packed_row),
            x_scales=None,
            topk_ids=packed_local,
            topk_weights=packed_weight,
            tokens_per_expert=tokens_per_expert,
            handle=handle,
        )

    def combine(self, expert_out: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        """Weight, reduce per received row, send back, sum per token: ``[N, H]``."""
        handle = self._combine_checks(
            expert_out, result, AllToAllVHandle, lambda h: h.packed_row.numel(),
            "one row per dispatched (token, expert) row",
        )
        counter = self._new_counter()
        partial = weighted_row_sum(
            expert_out, handle.packed_row, handle.packed_weight, sum(handle.recv_rows),
            handle.dtype,
        )
        back = self.group.all_to_all_single(
            partial,
            output_split_sizes=list(handle.send_rows),
            input_split_sizes=list(handle.recv_rows),
        )
        es = torch.empty((), dtype=handle.dtype).element_size()
        counter.to_others([r * handle.hidden * es for r in handle.recv_rows])
        y = weighted_row_sum(back, handle.send_token, None, handle.num_tokens, handle.dtype)
        self.last_combine_bytes = counter.freeze()
        return y

    # ---- cost model --------------------------------------------------------------------------

    @classmethod
    def wire_bytes_per_token(
        cls,
        *,
        world_size: int,
        hidden: int,
        elem_size: int,
        topk: int,
        num_experts: int,
        dedup: bool = True,
    ) -> float:
        """Expected bytes per token for uniform random routing (see the module docstring).

        Averaged over the source ranks of the contiguous placement (uneven when W does not
        divide E).
        """
        placement = expert_placement(num_experts, world_size)
        k = min(topk, num_experts)
        b = hidden * elem_size
        total_ways = math.comb(num_experts, k)
        per_rank = []
        for src in range(world_size):
            d = sum(
                1 - math.comb(num_experts - placement.counts[r], k) / total_ways
                for r in range(world_size)
                if r != src
            )
            p = k * (num_experts - placement.counts[src]) / num_experts
            if dedup:
                per_rank.append(d * b + 8 * p + d * b)
            else:
                per_rank.append(p * (b + 8) + p * b)
        return sum(per_rank) / world_size
