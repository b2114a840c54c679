"""The single-process reference MoE every backend is compared with, and simple test experts.

``reference_moe`` evaluates the contract's formula directly,
``y[n] = sum_k topk_weights[n, k] * f_{topk_ids[n, k]}(x[n])`` with ids of -1 adding
nothing, on one process, with no communication and no layout. Experts receive rows in the
dtype of ``x`` (as they do behind every manager); the weighted sum is taken in float32 and the
result cast to the dtype of ``x``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["make_linear_experts", "make_scaling_experts", "reference_moe"]

Expert = Callable[[torch.Tensor], torch.Tensor]


def reference_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: Sequence[Expert],
) -> torch.Tensor:
    """Compute the MoE output on one process.

    Args:
        x: ``[N, H]`` floating point.
        topk_weights: ``[N, K]`` floating point router weights (ignored where the id is -1).
        topk_ids: ``[N, K]`` integer global expert ids, -1 = none. A repeated id counts once
            per occurrence.
        experts: ``experts[e](rows [n, H]) -> [n, H]`` for every global expert id e.

    Returns:
        ``[N, H]`` in the dtype of ``x``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [num_tokens, hidden] tensor, got {x!r:.80}")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError("topk_ids must be a [num_tokens, topk] tensor")
    if topk_ids.is_floating_point():
        raise TypeError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if topk_ids.shape[0] != x.shape[0] or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"shapes disagree: x {tuple(x.shape)}, topk_weights {tuple(topk_weights.shape)}, "
            f"topk_ids {tuple(topk_ids.shape)}"
        )
    ids = topk_ids.long()
    if ids.numel() and (ids.min() < -1 or ids.max() >= len(experts)):
        raise ValueError(f"topk_ids must be in [-1, {len(experts)}), got {ids.unique().tolist()}")
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids[ids >= 0].unique().tolist():
        hit = ids == e  # [N, K]
        rows = hit.any(dim=1).nonzero().squeeze(1)
        weight = (topk_weights.float() * hit).sum(dim=1)[rows]
        out = experts[e](x[rows])
        if tuple(out.shape) != (rows.numel(), x.shape[1]):
            raise ValueError(f"expert {e} returned shape {tuple(out.shape)}")
        y[rows] += weight[:, None] * out.float()
    return y.to(x.dtype)


def make_linear_experts(
    num_experts: int, hidden: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> list[Expert]:
    """``num_experts`` distinct linear maps ``f_e(x) = (x @ A_e)`` (float32 math, x's dtype out).

    ``A_e`` is ``[H, H]`` with N(0, 1/H) entries drawn from ``seed`` alone, so every rank that
    calls this with the same arguments builds the same experts. Memory: ``4 E H^2`` bytes.
    """
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_experts, hidden, hidden, generator=gen) / hidden**0.5
    weights = weights.to(device)

    def expert(e: int) -> Expert:
        return lambda rows: (rows.float() @ weights[e]).to(rows.dtype)

    return [expert(e) for e in range(num_experts)]


def make_scaling_experts(
    num_experts: int, hidden: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> list[Expert]:
    """Cheap distinct experts ``f_e(x) = x * a_e + b_e`` (``a_e, b_e`` ``[H]``, per expert).

    For large hidden sizes where ``make_linear_experts`` would need ``4 E H^2`` bytes; every
    expert still maps each row differently, so a row sent to the wrong expert is detected.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = (torch.rand(num_experts, hidden, generator=gen) + 0.5).to(device)
    shift = (torch.randn(num_experts, hidden, generator=gen) * 0.1).to(device)

    def expert(e: int) -> Expert:
        return lambda rows: (rows.float() * scale[e] + shift[e]).to(rows.dtype)

    return [expert(e) for e in range(num_experts)]
