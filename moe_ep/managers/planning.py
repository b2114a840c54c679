"""Pure planners: routing -> per-destination rows, send order, receive layout.

Functions of tensors only (no group, no communication), so they are tested in one process.
Each has a native twin in `moe_ep.kernels` (one pass in C, used for CPU tensors); tests compare
the two on random routings. The shared vocabulary:

* a *row* is one token sent to one destination rank (a token goes once to each rank owning at
  least one of its experts, whatever the number of its experts there);
* `row_ids [S, K]`: per row, the local expert of each of the token's K slots on that
  destination, -1 for slots whose expert lives elsewhere (the TOKEN layout's `topk_ids`);
* the receiver's rows are the chunks of every source in rank order.
"""

from __future__ import annotations

import torch

from moe_ep import kernels
from moe_ep.kernels.native import DispatchPlan, PackedLayout
from moe_ep.managers.placement import ExpertPlacement

__all__ = ["DispatchPlan", "PackedLayout", "count_experts", "destinations", "layout",
           "packed_layout", "plan", "plan_dispatch", "plan_dispatch_pairs", "send_counts"]


def destinations(topk_ids: torch.Tensor, placement: ExpertPlacement
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(dst [N, K] owner rank of each slot or -1, hit [N, W] token has an expert on rank)`:
    what `send_counts` and `plan_dispatch` both start from (a caller calling both computes it
    once and passes it as `dests`)."""
    owner = placement.owner_table(topk_ids.device)
    e = topk_ids.clamp(min=0)
    dst = torch.where(topk_ids >= 0, owner[e], torch.full_like(e, -1))
    ranks = torch.arange(placement.ep_size, device=topk_ids.device)
    return dst, (dst.unsqueeze(-1) == ranks).any(dim=1)


def send_counts(topk_ids: torch.Tensor, placement: ExpertPlacement,
                dests: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`[2W] int64` on ids' device: the rows for each destination (tokens with >= 1 expert
    there), then the (token, expert) pairs for each (one `.tolist()` brings both to the host)."""
    dst, hit = destinations(topk_ids, placement) if dests is None else dests
    ranks = torch.arange(placement.ep_size, device=topk_ids.device)
    return torch.cat([hit.sum(dim=0), (dst.unsqueeze(-1) == ranks).sum(dim=(0, 1))])


def plan_dispatch(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, placement: ExpertPlacement,
    total_rows: int | None = None, dests: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DispatchPlan:
    """Where each token goes (torch, any device; the same as `moe_ep.kernels.plan_dispatch`).

    Args:
        topk_ids: `[N, K] int64` global expert ids in `[-1, E)` (checked by the caller), -1 =
            none, distinct per token.
        topk_weights: `[N, K] float32`.
        placement: the expert placement of the group.
        total_rows: S = `send_counts(...).sum()` when the caller knows it on the host already
            (then no device-to-host synchronisation happens here).
        dests: `destinations(topk_ids, placement)` when the caller has it already.
    Returns: `DispatchPlan` (send_counts `[W]`, send_token `[S]`, row_ids / row_weights
    `[S, K]`, token_rows `[N, W]`).
    """
    device = topk_ids.device
    local = placement.local_table(device)
    e = topk_ids.clamp(min=0)
    dst, hit = destinations(topk_ids, placement) if dests is None else dests
    send_counts = hit.sum(dim=0)
    token_rows = torch.where(hit, torch.cumsum(hit, dim=0) - 1, torch.full_like(dst[:, :1], -1))
    # [S, 2] (destination, token), destination-major.
    if total_rows is None:
        dst_token = hit.t().nonzero()
    else:
        dst_token = torch.nonzero_static(hit.t(), size=total_rows)
    row_dst, send_token = dst_token[:, 0], dst_token[:, 1]
    here = dst.index_select(0, send_token) == row_dst.unsqueeze(1)  # [S, K]
    row_ids = torch.where(here, local[e].index_select(0, send_token),
                          torch.full_like(here, -1, dtype=torch.int64))
    row_weights = torch.where(here, topk_weights.index_select(0, send_token),
                              torch.zeros((), dtype=torch.float32, device=device))
    return DispatchPlan(send_counts, send_token, row_ids, row_weights, token_rows)


def packed_layout(row_ids: torch.Tensor, row_weights: torch.Tensor, num_local: int,
                  num_pairs: int | None = None) -> PackedLayout:
    """EXPERT_PACKED order of received TOKEN rows (torch; twin of `kernels.packed_layout`).

    Args:
        row_ids: `[M, K] int64` local expert ids in `[-1, num_local)`.
        row_weights: `[M, K] float32`.
        num_pairs: R, the valid slots, when the caller knows it on the host (the senders'
            headers say it): then nothing here synchronises the device with the host.
    Returns: `PackedLayout`: rows grouped by local expert (rows ascending within one), and
    the CSR by row of the packed positions.
    """
    device = row_ids.device
    valid = row_ids >= 0
    flat = valid.flatten()
    pairs = flat.nonzero() if num_pairs is None else torch.nonzero_static(flat, size=num_pairs)
    pairs = pairs[:, 0]  # (row, slot) order
    pair_row = torch.div(pairs, row_ids.shape[1], rounding_mode="floor")
    pair_local = row_ids.flatten().index_select(0, pairs)
    pair_weight = row_weights.flatten().index_select(0, pairs)
    order = torch.argsort(pair_local, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=device)
    row_offsets = torch.zeros(row_ids.shape[0] + 1, dtype=torch.int64, device=device)
    torch.cumsum(valid.sum(dim=1), 0, out=row_offsets[1:])
    return PackedLayout(
        tokens_per_expert=torch.bincount(pair_local, minlength=num_local),
        packed_row=pair_row[order],
        packed_local=pair_local[order],
        packed_weight=pair_weight[order],
        row_offsets=row_offsets,
        row_order=position,
        row_weight=pair_weight,
    )


def count_experts(row_ids: torch.Tensor, num_local: int) -> torch.Tensor:
    """`[num_local] int64`: slots of `row_ids [M, K]` naming each local expert."""
    return torch.bincount(row_ids[row_ids >= 0], minlength=num_local)


def native(t: torch.Tensor) -> bool:
    """Whether `plan` / `layout` run in C for `t` (a CPU tensor, kernels built)."""
    return t.is_cpu and kernels.available()[0]


def plan(topk_ids: torch.Tensor, topk_weights: torch.Tensor, placement: ExpertPlacement
         ) -> DispatchPlan:
    """`plan_dispatch`, in C for CPU tensors when the kernels are built."""
    if native(topk_ids):
        return kernels.plan_dispatch(topk_ids, topk_weights, placement.owner_cpu,
                                     placement.local_index_cpu, placement.ep_size)
    return plan_dispatch(topk_ids, topk_weights, placement)


def layout(row_ids: torch.Tensor, row_weights: torch.Tensor, num_local: int,
           num_pairs: int | None = None) -> PackedLayout:
    """`packed_layout`, in C for CPU tensors when the kernels are built."""
    if native(row_ids):
        return kernels.packed_layout(row_ids.contiguous(), row_weights.contiguous(), num_local)
    return packed_layout(row_ids, row_weights, num_local, num_pairs)


def plan_dispatch_pairs(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, placement: ExpertPlacement,
    total_pairs: int | None = None,
) -> DispatchPlan:
    """Like `plan_dispatch`, but one row per (token, expert) pair (no deduplication).

    Rows are destination-major, (token, slot) ordered within one; each row's `row_ids` holds
    one valid slot. `token_rows [N, K]` is the absolute row of each (token, slot), -1 = none.
    `total_pairs`, when known on the host, avoids a device-to-host synchronisation.
    """
    device = topk_ids.device
    n, k = topk_ids.shape
    valid = topk_ids >= 0
    where = (valid.nonzero() if total_pairs is None
             else torch.nonzero_static(valid, size=total_pairs))
    pair_token, pair_slot = where.unbind(1)
    expert = topk_ids[pair_token, pair_slot]
    dst = placement.owner_table(device)[expert]
    order = torch.argsort(dst, stable=True)
    pair_token, pair_slot, expert = pair_token[order], pair_slot[order], expert[order]
    s = pair_token.numel()
    rows = torch.arange(s, device=device)
    row_ids = torch.full((s, k), -1, dtype=torch.int64, device=device)
    row_ids[rows, pair_slot] = placement.local_table(device)[expert]
    row_weights = torch.zeros((s, k), dtype=torch.float32, device=device)
    row_weights[rows, pair_slot] = topk_weights[pair_token, pair_slot]
    token_rows = torch.full((n, k), -1, dtype=torch.int64, device=device)
    token_rows[pair_token, pair_slot] = rows
    send_counts = torch.bincount(dst, minlength=placement.ep_size)
    return DispatchPlan(send_counts, pair_token, row_ids, row_weights, token_rows)
