"""Gather-all managers: every rank sees every token (TOKEN layout).

:class:`GatherAllManager` holds what the two gather-all backends share; they differ only in
the collectives used to gather the tokens and to sum the expert outputs back:

* ``allgather_reducescatter`` (:class:`AgRsAll2AllManager`, alias ``agrs``): dispatch is one
  ``all_gatherv`` of the packed rows ``[x | topk_ids | topk_weights]`` (ids as int32 and
  weights as float32 travel bit-for-bit inside the activation dtype, so tokens and routing
  need a single collective); combine is one ``reduce_scatterv`` of the ``[T, H]`` partial
  outputs. With equal token counts these are plain all-gather / reduce-scatter.
* ``naive`` (:class:`moe_ep.managers.naive.NaiveAll2AllManager`): one broadcast per rank,
  then an all-reduce and a slice.

After the gather each rank keeps the global rows and converts the ids to local expert ids
(-1 for experts it does not own); the experts step multiplies by the router weights
(:func:`moe_ep.managers.base.apply_experts`), and the combine sums the partial outputs of all
ranks, so ``y[n] = sum_k w[n, k] f_{ids[n, k]}(x[n])``.

Bytes per token a rank sends (W ranks, B = H * element size, K = topk): dispatch
``(W-1) (B + 8K)`` (ids int32 + weights fp32), combine ``(W-1) B``; plus one header of
``4 * 6`` bytes per call to each other rank.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moe_ep.managers.base import (
    _DTYPE_CODES,
    _F_EXPERTS,
    _NUM_FIXED,
    All2AllManager,
    DispatchResult,
    GatheredTokens,
    Layout,
    WireCounter,
    _check_device,
    _describe,
    expert_placement,
)

__all__ = ["AgRsAll2AllManager", "GatherAllManager", "GatherHandle"]

_PORTABLE_REASON = "portable: runs on any torch.distributed backend (gloo on CPU, NCCL on CUDA)"


@dataclass(frozen=True, eq=False)
class GatherHandle:
    """What the gather-all combine needs.

    Attributes:
        tokens_per_rank: ``[W]`` rows each rank contributed to the gathered buffer.
        rank: this rank (in the group).
        dtype: dtype of the caller's x (the combine returns it).
        hidden: H.
    """

    tokens_per_rank: tuple[int, ...]
    rank: int
    dtype: torch.dtype
    hidden: int

    @property
    def total(self) -> int:
        return sum(self.tokens_per_rank)

    @property
    def offset(self) -> int:
        """First row of this rank's tokens in the gathered buffer."""
        return sum(self.tokens_per_rank[: self.rank])

    @property
    def num_tokens(self) -> int:
        return self.tokens_per_rank[self.rank]


def _pack_rows(x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``[N, H]`` x and ``[N, m]`` int32 metadata -> ``[N, H + c]`` rows in x's dtype.

    The metadata's bytes are reinterpreted, not converted, so they survive any transport that
    copies bytes (all collectives used here do; none does arithmetic on these rows).
    """
    if meta.shape[1] * 4 % x.element_size():
        meta = torch.cat([meta, meta.new_zeros(meta.shape[0], 1)], dim=1)
    return torch.cat([x, meta.view(x.dtype)], dim=1)


def _unpack_rows(rows: torch.Tensor, hidden: int, meta_cols: int) -> tuple[torch.Tensor, ...]:
    x = rows[:, :hidden].contiguous()
    meta = rows[:, hidden:].contiguous().view(torch.int32)[:, :meta_cols]
    return x, meta


class GatherAllManager(All2AllManager):
    """Base of the gather-all backends (layout TOKEN, no options, always available)."""

    layout: ClassVar[Layout] = Layout.TOKEN

    @classmethod
    def availability(cls, topology: Any) -> tuple[bool, str]:
        return True, _PORTABLE_REASON

    @abstractmethod
    def _gather_rows(
        self, rows: torch.Tensor, sizes: Sequence[int], hidden: int, counter: WireCounter
    ) -> torch.Tensor:
        """``[N, C]`` local rows -> ``[T, C]`` every rank's rows in rank order.

        The first ``hidden`` columns are payload, the rest packed metadata (for the counter).
        """

    @abstractmethod
    def _sum_to_owner(
        self, out: torch.Tensor, handle: GatherHandle, counter: WireCounter
    ) -> torch.Tensor:
        """``[T, H]`` partial outputs -> ``[N, H]`` this rank's rows summed over all ranks."""

    def _gather(
        self, x: torch.Tensor, meta: torch.Tensor, sizes: tuple[int, ...], counter: WireCounter
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world_size == 1:
            return x, meta
        rows = self._gather_rows(_pack_rows(x, meta), sizes, x.shape[1], counter)
        return _unpack_rows(rows, x.shape[1], meta.shape[1])

    def _handle(self, sizes: tuple[int, ...], x: torch.Tensor) -> GatherHandle:
        return GatherHandle(
            tokens_per_rank=sizes,
            rank=self.rank,
            dtype=x.dtype,
            hidden=int(x.shape[1]),
        )

    def dispatch(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        num_experts: int,
    ) -> DispatchResult:
        """Gather every rank's tokens; see :meth:`All2AllManager.dispatch`.

        Returns a TOKEN-layout result: ``x [T, H]`` (T = tokens of the whole group, rank
        order), ``topk_ids [T, K] int64`` local ids (-1 elsewhere), ``topk_weights [T, K]
        float32`` (0 where the id is -1), ``tokens_per_expert [E_local] int64``.
        """
        counter = self._new_counter()
        checked, headers, _ = self._checked_dispatch(
            x, topk_weights, topk_ids, num_experts, counter
        )
        sizes = headers.tokens_per_rank
        meta = torch.cat([checked.topk_ids.int(), checked.topk_weights.view(torch.int32)], dim=1)
        x_all, meta_all = self._gather(checked.x, meta, sizes, counter)
        k = checked.topk
        ids_all = meta_all[:, :k].long()
        w_all = meta_all[:, k : 2 * k].contiguous().view(torch.float32)
        placement = expert_placement(checked.num_experts, self.world_size)
        local_ids = placement.to_local(ids_all, self.rank)
        mine = local_ids >= 0
        weights = torch.where(mine, w_all, torch.zeros_like(w_all))
        tokens_per_expert = torch.bincount(
            local_ids[mine], minlength=placement.num_local(self.rank)
        )
        self.last_dispatch_bytes = counter.freeze()
        return DispatchResult(
            layout=Layout.TOKEN,
            x=x_all,
            x_scales=None,
            topk_ids=local_ids,
            topk_weights=weights,
            tokens_per_expert=tokens_per_expert,
            handle=self._handle(sizes, checked.x),
        )

    def dispatch_router_logits(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor
    ) -> GatheredTokens:
        """Gather every rank's ``[N, H]`` hidden states and ``[N, E]`` router logits.

        Returns :class:`GatheredTokens` with ``x [T, H]`` and ``router_logits [T, E] float32``
        in rank order. The caller routes all T tokens, runs its local experts (weights
        applied), and passes the ``[T, H]`` partial output to :meth:`combine`.
        """
        self._check_alive()
        counter = self._new_counter()
        error: BaseException | None = None
        fields = [-1] * (_NUM_FIXED - 1)
        hs = logits = None
        try:
            for name, t in (("hidden_states", hidden_states), ("router_logits", router_logits)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
                if not t.is_floating_point():
                    raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
                if t.dim() != 2:
                    raise ValueError(f"{name} must be 2-D, got {_describe(t)}")
                _check_device(name, t, self.group.device)
            if hidden_states.dtype not in self.supported_dtypes:
                raise TypeError(
                    f"hidden_states dtype {hidden_states.dtype} is not supported; use one of "
                    f"{list(self.supported_dtypes)}"
                )
            if router_logits.shape[0] != hidden_states.shape[0]:
                raise ValueError(
                    f"router_logits has {router_logits.shape[0]} rows but hidden_states has "
                    f"{hidden_states.shape[0]} tokens"
                )
            hs = hidden_states.contiguous()
            logits = router_logits.float().contiguous()
            fields = [hs.shape[0], hs.shape[1], _DTYPE_CODES[hs.dtype], 0, logits.shape[1]]
        except Exception as exc:  # noqa: BLE001 - reported to every rank via the header
            error = exc
        headers = self._exchange_header(
            "dispatch_router_logits",
            fields,
            error,
            [],
            counter,
            labels={_F_EXPERTS: "number of router logits (router_logits.shape[1])"},
        )
        if hs is None or logits is None:  # unreachable: _exchange_header raised
            raise RuntimeError("dispatch_router_logits input check produced no result")
        sizes = headers.tokens_per_rank
        x_all, meta_all = self._gather(hs, logits.view(torch.int32), sizes, counter)
        self.last_dispatch_bytes = counter.freeze()
        return GatheredTokens(
            x=x_all,
            router_logits=meta_all.contiguous().view(torch.float32),
            tokens_per_rank=sizes,
            handle=self._handle(sizes, hs),
        )

    def combine(
        self, expert_out: torch.Tensor, result: DispatchResult | GatheredTokens
    ) -> torch.Tensor:
        """Sum the ``[T, H]`` partial outputs of all ranks; return this rank's ``[N, H]``."""
        handle = self._combine_checks(
            expert_out, result, GatherHandle, lambda h: h.total, "one row per gathered token"
        )
        counter = self._new_counter()
        out = expert_out.to(handle.dtype).contiguous()
        if self.world_size == 1:
            y = out
        else:
            y = self._sum_to_owner(out, handle, counter)
        self.last_combine_bytes = counter.freeze()
        return y


class AgRsAll2AllManager(GatherAllManager):
    """``allgather_reducescatter``: all_gatherv of tokens + routing, reduce_scatterv back."""

    name: ClassVar[str] = "allgather_reducescatter"

    def _gather_rows(
        self, rows: torch.Tensor, sizes: Sequence[int], hidden: int, counter: WireCounter
    ) -> torch.Tensor:
        gathered = self.group.all_gatherv(rows, dim=0, sizes=list(sizes))
        es = rows.element_size()
        counter.all_gather(
            rows.shape[0] * hidden * es, rows.shape[0] * (rows.shape[1] - hidden) * es
        )
        return gathered

    def _sum_to_owner(
        self, out: torch.Tensor, handle: GatherHandle, counter: WireCounter
    ) -> torch.Tensor:
        y = self.group.reduce_scatterv(out, dim=0, sizes=list(handle.tokens_per_rank))
        row_bytes = handle.hidden * out.element_size()
        counter.to_others([n * row_bytes for n in handle.tokens_per_rank])
        return y

    @classmethod
    def wire_bytes_per_token(
        cls,
        *,
        world_size: int,
        hidden: int,
        elem_size: int,
        topk: int,
        num_experts: int,
        **options: Any,
    ) -> float:
        b = hidden * elem_size
        return float((world_size - 1) * (b + 8 * topk) + (world_size - 1) * b)
