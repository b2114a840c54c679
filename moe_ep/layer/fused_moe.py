"""FusedMoE: router -> dispatch -> local experts -> combine, on any All2All manager.

Each EP rank holds only the experts `expert_placement(E, W)` assigns to it; the router is
replicated. The experts are SwiGLU MLPs (Mixtral / Qwen-MoE / DeepSeek style):
`f_e(x) = (silu(x W_gate_e^T) * (x W_up_e^T)) W_down_e^T`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_ep.managers import All2AllManager, apply_experts, expert_placement


def route(
    router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing.

    Args:
        router_logits: `[N, E]` any floating dtype.
        top_k: experts per token (1 <= top_k <= E).
        renormalize: rescale the k weights of each token to sum to 1 (Mixtral does).
    Returns:
        `(topk_weights [N, top_k] float32, topk_ids [N, top_k] int64)`.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [num_tokens, num_experts], got "
                         f"{tuple(router_logits.shape)}")
    if not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError(f"top_k must be in [1, num_experts={router_logits.shape[1]}], got {top_k}")
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """A MoE layer whose experts are spread over the ranks of `manager.group` (inference only).

    Args:
        num_experts: E, global number of experts.
        top_k: experts per token.
        hidden_size: H.
        intermediate_size: I, the width of each expert's MLP.
        manager: an `All2AllManager` built on the expert-parallel group.
        renormalize: see `route`.
        dtype: parameter and activation dtype.

    Parameters (this rank's share):
        gate: `[E, H]` router weight (replicated on every rank).
        w_gate, w_up: `[E_local, I, H]`; w_down: `[E_local, H, I]`.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        manager: All2AllManager,
        *,
        renormalize: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(manager, All2AllManager):
            raise TypeError(f"manager must be an All2AllManager, got {type(manager).__name__}")
        for arg, value in (("num_experts", num_experts), ("top_k", top_k),
                           ("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.manager = manager
        placement = expert_placement(num_experts, manager.world_size)
        self.local_experts = placement.local_range(manager.rank)
        n, h, i = len(self.local_experts), hidden_size, intermediate_size
        device = manager.group.device
        self.gate = nn.Parameter(torch.empty(num_experts, h, dtype=dtype, device=device))
        self.w_gate = nn.Parameter(torch.empty(n, i, h, dtype=dtype, device=device))
        self.w_up = nn.Parameter(torch.empty(n, i, h, dtype=dtype, device=device))
        self.w_down = nn.Parameter(torch.empty(n, h, i, dtype=dtype, device=device))
        for p in self.parameters():
            nn.init.normal_(p, std=h**-0.5)

    @torch.no_grad()
    def load_global_weights(
        self,
        gate: torch.Tensor,
        w_gate: torch.Tensor,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
    ) -> None:
        """Copy this rank's slice of full-model weights.

        Args: gate `[E, H]`, w_gate / w_up `[E, I, H]`, w_down `[E, H, I]` (any dtype/device).
        """
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size  # noqa: E741
        for name, t, shape in (("gate", gate, (E, H)), ("w_gate", w_gate, (E, I, H)),
                               ("w_up", w_up, (E, I, H)), ("w_down", w_down, (E, H, I))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        mine = slice(self.local_experts.start, self.local_experts.stop)
        self.gate.copy_(gate)
        self.w_gate.copy_(w_gate[mine])
        self.w_up.copy_(w_up[mine])
        self.w_down.copy_(w_down[mine])

    @classmethod
    def from_mixtral_block(
        cls, block: nn.Module, manager: All2AllManager, *, top_k: int | None = None
    ) -> FusedMoE:
        """Build from a Hugging Face `MixtralSparseMoeBlock`-shaped module.

        Reads `block.gate` (Linear H -> E) and `block.experts[e].w1 / w3 / w2` (gate, up,
        down projections), and `block.top_k` unless `top_k` is given.
        """
        experts: Sequence[nn.Module] = block.experts
        top_k = top_k if top_k is not None else int(block.top_k)
        w1 = torch.stack([e.w1.weight for e in experts])
        w3 = torch.stack([e.w3.weight for e in experts])
        w2 = torch.stack([e.w2.weight for e in experts])
        layer = cls(len(experts), top_k, w1.shape[2], w1.shape[1], manager, dtype=w1.dtype)
        layer.load_global_weights(block.gate.weight, w1, w3, w2)
        return layer

    def expert(self, local: int, rows: torch.Tensor) -> torch.Tensor:
        """Local expert `local` on `rows [n, H]` -> `[n, H]`."""
        h = F.silu(rows @ self.w_gate[local].T) * (rows @ self.w_up[local].T)
        return h @ self.w_down[local].T

    @torch.no_grad()  # inference-only: dispatch and combine are not differentiable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [N, H]` (N may differ between ranks, 0 included) -> `[N, H]`, same dtype.

        Collective over the manager's group. A bad `x` on one rank fails the call on every
        rank (none is left waiting in the dispatch).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.hidden_size:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            self.manager.abort(
                ValueError(f"x must be [num_tokens, {self.hidden_size}], got {got}")
            )
        weights, ids = route(x @ self.gate.T, self.top_k, renormalize=self.renormalize)
        result = self.manager.dispatch(x, weights, ids, num_experts=self.num_experts)
        return self.manager.combine(apply_experts(result, self.expert), result)
