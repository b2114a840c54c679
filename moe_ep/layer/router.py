"""Routing as pure functions: router logits -> (top-k weights, top-k expert ids).

One function, :func:`route`, covers the routers of the MoE models moe_ep targets:

=================  ========  ===========  =======================================  =========
model              scoring   renormalise  grouped top-k                            scaling
=================  ========  ===========  =======================================  =========
Mixtral            softmax   yes          no                                       1
Qwen2-MoE          softmax   config       no                                       1
Qwen3-MoE          softmax   config       no                                       1
DeepSeek-V3        sigmoid   config       ``n_group`` / ``topk_group`` + bias      config
=================  ========  ===========  =======================================  =========

Grouped top-k (DeepSeek-V3, vLLM's ``grouped_topk``): the experts are split into ``n_group``
equal groups; each group is scored by the sum of its two best choice scores (by its best score
when there is no correction bias); only the ``topk_group`` best groups stay eligible; the
top-k is taken among their experts. The choice scores are ``scores + correction_bias``; the
weights returned are the *uncorrected* scores of the chosen experts (the bias steers the
choice for load balance only), renormalised if asked, then times ``routed_scaling_factor``.

Nothing here communicates or keeps state. :class:`RoutingConfig` holds the options a layer
routes with, validated once when it is made, and routes; :func:`route` makes one per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SCORINGS", "RoutingConfig", "route"]

#: Scoring functions turning router logits into expert scores.
SCORINGS = ("softmax", "sigmoid")

# Keeps a renormalisation finite when every chosen score is 0 (sigmoid scores underflow for
# logits below ~-88 in fp32); it is below fp32 resolution for any realistic sum, so it leaves
# the result bit-identical to a plain division (DeepSeek-V3's reference adds the same term).
_RENORM_EPS = 1e-20


@dataclass(frozen=True)
class RoutingConfig:
    """How a layer routes; see :func:`route` for the meaning of each field.

    Raises:
        TypeError / ValueError naming the field on a bad value (``num_experts`` is checked
        against the group options too).
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        _check_routing(
            self.num_experts, self.top_k, self.scoring, self.renormalize, self.n_group,
            self.topk_group, self.routed_scaling_factor,
        )

    def route(
        self, router_logits: torch.Tensor, correction_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`route` with this config's options (validated once, when it was made)."""
        _check_logits(router_logits, self.num_experts)
        num_experts, top_k, n_group = self.num_experts, self.top_k, self.n_group
        grouped = n_group is not None and n_group > 1
        logits = router_logits.float()
        if self.scoring == "softmax" and self.renormalize and correction_bias is None and (
            not grouped
        ):
            # The softmax renormalised over the k chosen experts is the softmax of their k
            # logits (the common denominator cancels) and the softmax keeps the order: two ops
            # instead of five on every decode step, equal to the long form up to fp32 rounding.
            top, ids = torch.topk(logits, top_k, dim=-1)
            return self._scaled(torch.softmax(top, dim=-1)), ids
        scores = torch.softmax(logits, dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores
        if correction_bias is not None:
            if not isinstance(correction_bias, torch.Tensor) or tuple(correction_bias.shape) != (
                num_experts,
            ):
                raise ValueError(f"correction_bias must be a [{num_experts}] tensor, got "
                                 f"{getattr(correction_bias, 'shape', type(correction_bias))}")
            choice = scores + correction_bias.float()
        if grouped:
            per_group = num_experts // n_group
            by_group = choice.view(-1, n_group, per_group)
            if correction_bias is not None:
                # min(): a group of one expert is scored by that expert.
                group_scores = by_group.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
            else:
                group_scores = by_group.amax(dim=-1)
            keep = torch.topk(group_scores, self.topk_group, dim=-1).indices  # [N, topk_group]
            eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            eligible = eligible.unsqueeze(-1).expand(-1, n_group, per_group).reshape(
                -1, num_experts)
            choice = choice.masked_fill(~eligible, float("-inf"))
        if choice is scores:
            weights, ids = torch.topk(scores, top_k, dim=-1)
        else:
            ids = torch.topk(choice, top_k, dim=-1).indices
            weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + _RENORM_EPS)
        return self._scaled(weights), ids

    def _scaled(self, weights: torch.Tensor) -> torch.Tensor:
        f = self.routed_scaling_factor
        return weights if f == 1.0 else weights * f


def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's top-k experts and their weights.

    Args:
        router_logits: ``[N, E]`` any floating dtype (scores are computed in float32).
        top_k: experts per token, ``1 <= top_k <= E`` (``<=`` the eligible experts when grouped).
        scoring: ``"softmax"`` over the E logits, or ``"sigmoid"`` of each logit.
        renormalize: rescale each token's k weights to sum to 1.
        correction_bias: ``[E]`` float, added to the scores for the choice only (DeepSeek-V3's
            ``e_score_correction_bias``), or None.
        n_group: split the experts into this many equal groups for grouped top-k; None or 1
            = no grouping.
        topk_group: with ``n_group``: how many groups stay eligible.
        routed_scaling_factor: multiplies the final weights.

    Returns:
        ``(topk_weights [N, top_k] float32, topk_ids [N, top_k] int64)``; the ids of a token
        are distinct. N may be 0.
    """
    _check_logits(router_logits)
    config = RoutingConfig(int(router_logits.shape[1]), top_k, scoring, renormalize, n_group,
                           topk_group, routed_scaling_factor)
    return config.route(router_logits, correction_bias)


def _check_logits(router_logits: object, num_experts: int | None = None) -> None:
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2 or (
        num_experts is not None and router_logits.shape[1] != num_experts
    ):
        got = (tuple(router_logits.shape) if isinstance(router_logits, torch.Tensor)
               else type(router_logits).__name__)
        want = "num_experts" if num_experts is None else num_experts
        raise ValueError(f"router_logits must be [num_tokens, {want}], got {got}")
    if not router_logits.is_floating_point():
        raise TypeError(f"router_logits must be floating point, got {router_logits.dtype}")


def _check_routing(
    num_experts: object,
    top_k: object,
    scoring: object,
    renormalize: object,
    n_group: object,
    topk_group: object,
    routed_scaling_factor: object,
) -> None:
    for name, value in (("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {renormalize!r}")
    if isinstance(routed_scaling_factor, bool) or not isinstance(
        routed_scaling_factor, (int, float)
    ) or not routed_scaling_factor > 0:
        raise ValueError(f"routed_scaling_factor must be a number > 0, got "
                         f"{routed_scaling_factor!r}")
    eligible = num_experts
    if n_group is not None and n_group != 1:
        if isinstance(n_group, bool) or not isinstance(n_group, int) or n_group < 1:
            raise ValueError(f"n_group must be None or an int >= 1, got {n_group!r}")
        if num_experts % n_group:
            raise ValueError(f"n_group={n_group} must divide num_experts={num_experts}")
        if isinstance(topk_group, bool) or not isinstance(topk_group, int) or not (
            1 <= topk_group <= n_group
        ):
            raise ValueError(f"topk_group must be an int in [1, n_group={n_group}] when "
                             f"n_group is set, got {topk_group!r}")
        eligible = topk_group * (num_experts // n_group)
    if top_k > eligible:
        where = (f"topk_group * num_experts / n_group = {eligible}" if eligible < num_experts
                 else f"num_experts={num_experts}")
        raise ValueError(f"top_k must be in [1, {where}], got {top_k}")
