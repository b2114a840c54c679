"""The single-process reference MoE every backend is compared with, and simple test experts.

``reference_moe`` evaluates the contract's formula directly,
``y[n] = sum_k topk_weights[n, k] * f_{topk_ids[n, k]}(x[n])`` with ids of -1 adding
nothing, on one process, with no communication and no layout. Experts receive rows in the
dtype of ``x`` (as they do behind every manager); the weighted sum is taken in float32 and the
result cast to the dtype of ``x``.

``dense_moe_reference`` is the oracle of the whole FusedMoE layer (routing included): every
expert on every token in float64, with :func:`reference_routing` choosing experts by Python
sorting, token by token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "dense_moe_reference",
    "make_linear_experts",
    "make_scaling_experts",
    "reference_moe",
    "reference_routing",
]

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


def reference_routing(
    router_logits: torch.Tensor,
    *,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> torch.Tensor:
    """Routing, token by token with Python sorting: ``[N, E]`` float64 dense weights.

    Shares no code with :mod:`moe_ep.layer.router` (no ``torch.topk``): softmax or sigmoid
    scores; ``choice = scores + correction_bias``; with ``n_group``, groups scored by the sum of
    their two best choices (their best without a bias), the best ``topk_group`` groups
    eligible; the ``top_k`` best eligible experts chosen; their uncorrected scores,
    renormalised if asked, times ``routed_scaling_factor``. Unchosen experts weigh 0.
    """
    logits = router_logits.double()
    num_tokens, num_experts = logits.shape
    dense = torch.zeros(num_tokens, num_experts, dtype=torch.float64)
    bias = [0.0] * num_experts if correction_bias is None else correction_bias.double().tolist()
    for n in range(num_tokens):
        row = logits[n].tolist()
        if scoring == "softmax":
            top = max(row)
            exps = [math.exp(v - top) for v in row]
            scores = [v / sum(exps) for v in exps]
        elif scoring == "sigmoid":
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        else:
            raise ValueError(f"unknown scoring {scoring!r}")
        choice = [s + b for s, b in zip(scores, bias)]
        eligible = list(range(num_experts))
        if n_group is not None and n_group > 1:
            size = num_experts // n_group
            groups = [choice[g * size : (g + 1) * size] for g in range(n_group)]
            if correction_bias is None:
                group_score = [max(g) for g in groups]
            else:
                group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
            best = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
            eligible = [e for g in sorted(best) for e in range(g * size, (g + 1) * size)]
        chosen = sorted(eligible, key=lambda e: -choice[e])[:top_k]
        weights = [scores[e] for e in chosen]
        if renormalize:
            total = sum(weights)
            weights = [w / total for w in weights]
        for e, w in zip(chosen, weights):
            dense[n, e] = w * routed_scaling_factor
    return dense


def dense_moe_reference(
    x: torch.Tensor,
    gate: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    router_logits: torch.Tensor | None = None,
    shared: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **routing: Any,
) -> torch.Tensor:
    """A whole SwiGLU (silu) MoE layer, densely, on one process, in float64: FusedMoE's oracle.

    Every expert runs on every token; each token's output is the sum over all E experts of its
    :func:`reference_routing` weight (0 for unchosen experts) times the expert's output
    ``(silu(x W_gate^T) * x W_up^T) W_down^T``.

    Args:
        x: ``[N, H]``; gate: ``[E, H]``; w13: ``[E, 2I, H]`` (gate rows, then up rows);
            w2: ``[E, H, I]``.
        router_logits: ``[N, E]`` to route on instead of ``x @ gate.T`` (e.g. logits the layer
            computed in a lower precision, so both choose the same experts).
        shared: ``shared(x [N, H]) -> [N, H]`` added to the routed output (shared experts).
        **routing: the keyword arguments of :func:`reference_routing` (``top_k`` required).

    Returns:
        ``[N, H]`` float64.
    """
    xd = x.double()
    logits = (xd @ gate.double().T) if router_logits is None else router_logits
    dense = reference_routing(logits, **routing)
    inter = w13.shape[1] // 2
    w13d, w2d = w13.double(), w2.double()
    gate_proj = torch.einsum("nh,eih->nei", xd, w13d[:, :inter])
    up_proj = torch.einsum("nh,eih->nei", xd, w13d[:, inter:])
    expert_out = torch.einsum("nei,ehi->neh", torch.nn.functional.silu(gate_proj) * up_proj, w2d)
    y = torch.einsum("ne,neh->nh", dense, expert_out)
    if shared is not None:
        y = y + shared(x).double()
    return y
