"""Gather-all managers: every rank sees every token (TOKEN layout).

`GatherAllManager` holds what the two gather-all backends share; they differ only in the
collectives used to gather the tokens and to sum the expert outputs back:

* `allgather_reducescatter` (`AgRsAll2AllManager`, alias `agrs`): dispatch is one
  `all_gatherv` of the wire rows `[ids | weights | scales | x]` (bytes: tokens and routing
  need a single collective); combine is one `reduce_scatterv` of the `[T, H]` partial
  outputs. With equal token counts these are plain all-gather / reduce-scatter.
* `naive` (`moe_ep.managers.naive.NaiveAll2AllManager`): one broadcast per rank, then an
  all-reduce and a slice.

After the gather each rank keeps the global rows and converts the ids to local expert ids
(-1 for experts it does not own); the experts step multiplies by the router weights
(`apply_experts`), and the combine sums the partial outputs of all ranks, so
`y[n] = sum_k w[n, k] f_{ids[n, k]}(x[n])`. The token counts come from the per-call header.

Bytes per token a rank sends (W ranks, B = H * element size, K = topk, S scale columns):
dispatch `(W-1) (B + 8K + 4S)` (ids int32, weights fp32, padded to 8 bytes), combine
`(W-1) B`; plus the header (`8 (13 + 2W)` bytes to each other rank) per call.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moe_ep.managers import protocol
from moe_ep.managers.accounting import WireCounter
from moe_ep.managers.contract import (
    CombineState,
    DispatchResult,
    EPHandle,
    EPSpec,
    GatheredTokens,
    Layout,
)
from moe_ep.managers.group_exchange import GroupExchangeManager, pack_rows, unpack_rows
from moe_ep.managers.inputs import CheckedInputs, describe
from moe_ep.managers.placement import expert_placement

__all__ = ["AgRsAll2AllManager", "GatherAllManager", "GatherState"]


@dataclass(eq=False)
class GatherState(CombineState):
    """What the gather-all combine needs.

    Attributes:
        tokens_per_rank: `[W]` rows each rank contributed to the gathered buffer.
    """

    tokens_per_rank: tuple[int, ...] = ()

    @property
    def offset(self) -> int:
        """First row of this rank's tokens in the gathered buffer."""
        return sum(self.tokens_per_rank[: self.manager.rank])


class GatherAllManager(GroupExchangeManager):
    """Base of the gather-all backends (layout TOKEN, no options, always available)."""

    layout: ClassVar[Layout] = Layout.TOKEN

    @abstractmethod
    def _gather_rows(self, rows: torch.Tensor, sizes: Sequence[int], payload_cols: int,
                     counter: WireCounter) -> torch.Tensor:
        """`[N, C] uint8` local wire rows -> `[T, C]` every rank's rows in rank order; the
        `payload_cols` bytes of a row are payload (x and scales), the rest metadata (ids,
        weights, padding), for the counter."""

    @abstractmethod
    def _sum_to_owner(self, out: torch.Tensor, state: GatherState,
                      counter: WireCounter) -> torch.Tensor:
        """`[T, H]` partial outputs -> `[N, H]` this rank's rows summed over all ranks."""

    def _plan(self, handle: EPHandle, checked: CheckedInputs) -> tuple[Any, tuple[int, ...]]:
        return None, ()

    def _gather(self, rows: torch.Tensor, sizes: tuple[int, ...], payload_cols: int,
                counter: WireCounter) -> torch.Tensor:
        if self.world_size == 1:
            return rows
        return self._gather_rows(rows, sizes, payload_cols, counter)

    def _transfer(self, call: int, seq: int, handle: EPHandle, checked: CheckedInputs,
                  plan: Any, rows: list[list[int]], counter: WireCounter) -> DispatchResult:
        """Gather every rank's tokens.

        Returns a TOKEN-layout result: `x [T, H]` (T = tokens of the whole group, rank
        order), `topk_ids [T, K] int64` local ids (-1 elsewhere), `topk_weights [T, K]
        float32` (0 where the id is -1), `tokens_per_expert [E_local] int64`, `x_scales
        [T, S]` for a quantised dispatch.
        """
        spec = handle.spec
        sizes = tuple(row[protocol.F_TOKENS] for row in rows)
        wire = pack_rows(checked.x, checked.topk_ids, checked.topk_weights, checked.x_scales)
        # Scales are payload (the activations' other half), ids and weights metadata.
        payload = spec.row_bytes()
        gathered = self._gather(wire, sizes, payload, counter)
        x_all, ids_all, w_all, scales_all = unpack_rows(
            gathered, spec.hidden, spec.dtype, spec.topk, spec.scale_cols)
        placement = expert_placement(spec.num_experts, self.world_size)
        local_ids = placement.to_local(ids_all, self.rank)
        mine = local_ids >= 0
        weights = torch.where(mine, w_all, torch.zeros_like(w_all))
        tokens_per_expert = torch.bincount(local_ids[mine],
                                           minlength=placement.num_local(self.rank))
        state = GatherState(self, handle, call, seq, checked.num_tokens, (sum(sizes),), sizes)
        return DispatchResult(
            layout=Layout.TOKEN, x=x_all, x_scales=scales_all, topk_ids=local_ids,
            topk_weights=weights, tokens_per_expert=tokens_per_expert, handle=state,
        )

    def dispatch_router_logits(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor
    ) -> GatheredTokens:
        """Gather every rank's `[N, H]` hidden states and `[N, E]` router logits.

        Returns `GatheredTokens` with `x [T, H]` and `router_logits [T, E] float32` in rank
        order. The caller routes all T tokens, runs its local experts (weights applied), and
        passes the `[T, H]` partial output to `combine`.
        """
        call = self._begin_call()
        counter = self._new_counter()
        error: Exception | None = None
        spec = handle = None
        hs = logits = None
        try:
            self._check_usable()
            for name, t in (("hidden_states", hidden_states), ("router_logits", router_logits)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
                if not t.is_floating_point():
                    raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
                if t.dim() != 2 or t.shape[1] < 1:
                    raise ValueError(f"{name} must be 2-D with >= 1 column, got {describe(t)}")
                if t.device.type != self.group.device.type:
                    raise ValueError(f"{name} must be on the group's device {self.group.device}")
            if router_logits.shape[0] != hidden_states.shape[0]:
                raise ValueError(
                    f"router_logits has {router_logits.shape[0]} rows but hidden_states has "
                    f"{hidden_states.shape[0]} tokens")
            spec = EPSpec(hidden=int(hidden_states.shape[1]),
                          num_experts=int(router_logits.shape[1]), topk=1,
                          dtype=hidden_states.dtype)
            self._check_spec(spec)
            handle = self._cache.get_or_create(spec.cache_key(), self._new_handle)
            hs = hidden_states.contiguous()
            logits = router_logits.float().contiguous()
        except Exception as exc:  # noqa: BLE001 - reported to every rank via the header
            error = exc
        rows = protocol.exchange(self, protocol.OP_LOGITS, call, handle, -1, error, spec,
                                 hs.shape[0] if hs is not None else 0, (), counter)
        sizes = tuple(row[protocol.F_TOKENS] for row in rows)
        wire = torch.cat([logits.view(torch.uint8), hs.view(torch.uint8)], dim=1)
        gathered = self._gather(wire, sizes, hs.shape[1] * hs.element_size(), counter)
        e4 = 4 * spec.num_experts
        seq = handle.dispatches
        handle.dispatches += 1
        handle.live.append(seq)
        del handle.live[: -self.max_live_results]
        self._dispatch_bytes = counter.freeze()
        return GatheredTokens(
            x=gathered[:, e4:].contiguous().view(hs.dtype).view(-1, spec.hidden),
            router_logits=gathered[:, :e4].contiguous().view(torch.float32),
            tokens_per_rank=sizes,
            handle=GatherState(self, handle, call, seq, hs.shape[0], (sum(sizes),), sizes),
        )

    def _return_trip(self, state: GatherState, expert_out: torch.Tensor,
                     counter: WireCounter) -> torch.Tensor:
        if self.world_size == 1:
            return expert_out
        return self._sum_to_owner(expert_out, state, counter)


class AgRsAll2AllManager(GatherAllManager):
    """`allgather_reducescatter`: all_gatherv of tokens + routing, reduce_scatterv back."""

    name: ClassVar[str] = "allgather_reducescatter"

    def _gather_rows(self, rows: torch.Tensor, sizes: Sequence[int], payload_cols: int,
                     counter: WireCounter) -> torch.Tensor:
        gathered = self.group.all_gatherv(rows, dim=0, sizes=list(sizes))
        n = rows.shape[0]
        counter.all_gather(n * payload_cols, n * (rows.shape[1] - payload_cols))
        return gathered

    def _sum_to_owner(self, out: torch.Tensor, state: GatherState,
                      counter: WireCounter) -> torch.Tensor:
        y = self.group.reduce_scatterv(out, dim=0, sizes=list(state.tokens_per_rank))
        row_bytes = out.shape[1] * out.element_size()
        counter.to_others([n * row_bytes for n in state.tokens_per_rank])
        return y

    @classmethod
    def wire_bytes_per_token(cls, *, world_size: int, hidden: int, elem_size: int, topk: int,
                             num_experts: int, **options: Any) -> float:
        b = hidden * elem_size
        return float((world_size - 1) * (b + 8 * topk) + (world_size - 1) * b)
