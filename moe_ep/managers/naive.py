"""`naive`: vLLM's debugging baseline, gather-all by broadcasts.

Dispatch: every rank allocates the `[T, C]` gathered buffer of wire rows (T = tokens of the
whole group, known from the header), copies its rows into its slice, and each rank in turn
broadcasts its slice (ranks with no tokens are skipped: every rank knows every count, so all
skip the same ones). Combine: an all-reduce of the `[T, H]` partial outputs, then each rank
keeps its own slice.

It sends W broadcasts per dispatch and all-reduces the whole group's tokens, so it moves the
most bytes of all managers; it exists as a simple, obviously correct baseline.

Bytes per token a rank sends (W ranks, B = H * element size, K = topk): dispatch
`(W-1) (B + 8K)` (flat broadcast from the owner), combine `2 (W-1) B` (ring all-reduce of
`[W N, H]`: `2 (W-1)/W` of it per rank, i.e. `2 (W-1) B` per own token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from moe_ep.managers.accounting import WireCounter
from moe_ep.managers.agrs import GatherAllManager, GatherState

__all__ = ["NaiveAll2AllManager"]


class NaiveAll2AllManager(GatherAllManager):
    """`naive`: one broadcast per rank to gather, all-reduce + slice to combine."""

    name: ClassVar[str] = "naive"

    def _gather_rows(self, rows: torch.Tensor, sizes: Sequence[int], payload_cols: int,
                     counter: WireCounter) -> torch.Tensor:
        buf = rows.new_empty((sum(sizes), rows.shape[1]))
        offset = sum(sizes[: self.rank])
        buf[offset : offset + rows.shape[0]] = rows
        cols = rows.shape[1]
        start = 0
        for src, n in enumerate(sizes):
            if n:
                # A dim-0 slice of a contiguous buffer is contiguous: broadcast fills it in place.
                self.group.broadcast(buf[start : start + n], src=src)
                counter.broadcast(src, n * payload_cols, n * (cols - payload_cols))
            start += n
        return buf

    def _sum_to_owner(self, out: torch.Tensor, state: GatherState,
                      counter: WireCounter) -> torch.Tensor:
        summed = self.group.all_reduce(out)
        counter.all_reduce(out.numel() * out.element_size())
        return summed[state.offset : state.offset + state.num_tokens]

    @classmethod
    def wire_bytes_per_token(cls, *, world_size: int, hidden: int, elem_size: int, topk: int,
                             num_experts: int, **options: Any) -> float:
        b = hidden * elem_size
        return float((world_size - 1) * (b + 8 * topk) + 2 * (world_size - 1) * b)
