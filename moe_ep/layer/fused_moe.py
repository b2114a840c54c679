"""FusedMoE: route -> prepare (quantise + dispatch) -> experts -> finalize (combine).

Each EP rank holds only the experts ``expert_placement(E, W)`` assigns to it, in the fused
layout ``w13 [E_local, 2I, H]`` (gate rows first, then up) and ``w2 [E_local, H, I]``; the
router (``gate``) and the optional shared experts are replicated. One forward::

    logits, topk_weights, topk_ids = layer.route(x)     # gate, then moe_ep.layer.router (pure)
    result = layer.prepare(x, topk_weights, topk_ids)   # quantise (FP8 option) + dispatch
    expert_out = layer.compute_experts(result)          # the swappable kernel, per layout
    y = layer.finalize(expert_out, result)              # combine
    y = layer.add_shared(x, y)    # + [sigmoid(shared_expert_gate(x)) *] shared_experts(x)

``prepare`` and ``finalize`` are the only steps that communicate; ``compute_experts`` calls
``layer.experts_kernel`` (default :func:`moe_ep.layer.experts.fused_experts`), so a different
expert kernel plugs in by passing ``experts_kernel=`` without touching the communication (the
split vLLM users know as prepare / experts / finalize).

The layer declares its shape to the manager once (``manager.get_handle(EPSpec(...))`` at
construction, so building a layer is collective) and dispatches through that handle.

Failure modes: ``prepare`` and ``finalize`` are collective over ``manager.group``; a bad input on
one rank fails the call on every rank (none is left waiting in the dispatch). Inference only:
every step runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from moe_ep.layer.experts import ACTIVATIONS, ExpertsKernel, fused_experts
from moe_ep.layer.quant import DispatchQuant
from moe_ep.layer.router import RoutingConfig
from moe_ep.managers import (
    All2AllManager,
    DispatchResult,
    EPHandle,
    EPSpec,
    Layout,
    expert_placement,
)
from moe_ep.managers.expert_ops import fail_together

__all__ = ["FusedMoE", "Router"]

logger = logging.getLogger(__name__)


class Router(nn.Module):
    """The router's linear map, ``x [N, H] -> logits [N, E]`` in ``weight``'s dtype.

    Parameters / buffers (named as in transformers, so checkpoints map one to one):
        weight: ``[E, H]``.
        e_score_correction_bias: ``[E] float32`` buffer, only with ``correction_bias=True``
            (DeepSeek-V3); steers the choice of experts, not their weights.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        *,
        correction_bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype,
                                               device=device))
        self.e_score_correction_bias: torch.Tensor | None
        if correction_bias:
            self.register_buffer(
                "e_score_correction_bias",
                torch.zeros(num_experts, dtype=torch.float32, device=device),
            )
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight)


class FusedMoE(nn.Module):
    """A MoE layer whose experts are spread over the ranks of ``manager.group`` (inference only).

    Args:
        num_experts: E, global number of routed experts.
        top_k: experts per token.
        hidden_size: H.
        intermediate_size: I, the width of each routed expert's MLP.
        manager: an :class:`~moe_ep.managers.All2AllManager` built on the expert-parallel group.
        scoring, renormalize, n_group, topk_group, routed_scaling_factor: routing options, see
            :func:`moe_ep.layer.router.route`.
        correction_bias: route with the router's ``e_score_correction_bias`` ``[E]`` (DeepSeek-V3;
            a new :class:`Router` gets that buffer).
        router_dtype: dtype of a new router's weight and logits; None = ``dtype`` (DeepSeek-V3
            keeps its router in float32).
        gate: an existing router module to use instead of a new :class:`Router`: ``gate(x [N,
            H])`` returns the logits ``[N, E]``, or a tuple whose first element they are (the
            routers of transformers 5.x, kept so that their output hooks still fire); with
            ``correction_bias`` it must have an ``e_score_correction_bias`` tensor.
        activation: the experts' activation, a key of :data:`moe_ep.layer.experts.ACTIVATIONS`.
        shared_experts: optional module ``[N, H] -> [N, H]`` run on every token (replicated).
        shared_expert_gate: optional module ``[N, H] -> [N, 1]``; the shared output is scaled
            by its sigmoid (Qwen2-MoE).
        quant: optional :class:`~moe_ep.layer.quant.DispatchQuant`: send FP8 activations with
            fp32 scales and dequantise before the experts.
        max_tokens_per_rank: the most tokens one rank passes to one forward (the handle's
            ``EPSpec.max_tokens_per_rank``: managers with buffers, ``shm``, size them from it).
        experts_kernel: the experts step (default :func:`~moe_ep.layer.experts.fused_experts`).
        dtype: parameter and activation dtype.
        device: where the parameters live; None = the group's device. ``"meta"`` builds the
            layer without memory (for loading a checkpoint afterwards).

    Parameters (this rank's share):
        gate: a :class:`Router` (``gate.weight [E, H]``, replicated), or the given module.
        w13: ``[E_local, 2I, H]``; w2: ``[E_local, H, I]``.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        manager: All2AllManager,
        *,
        scoring: str = "softmax",
        renormalize: bool = True,
        n_group: int | None = None,
        topk_group: int | None = None,
        routed_scaling_factor: float = 1.0,
        correction_bias: bool = False,
        router_dtype: torch.dtype | None = None,
        activation: str = "silu",
        gate: nn.Module | None = None,
        shared_experts: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        quant: DispatchQuant | None = None,
        max_tokens_per_rank: int = 4096,
        experts_kernel: ExpertsKernel | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(manager, All2AllManager):
            raise TypeError(f"manager must be an All2AllManager, got {type(manager).__name__}")
        for arg, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                           ("max_tokens_per_rank", max_tokens_per_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got "
                             f"{activation!r}")
        if shared_expert_gate is not None and shared_experts is None:
            raise ValueError("shared_expert_gate needs shared_experts")
        if quant is not None and not isinstance(quant, DispatchQuant):
            raise TypeError(f"quant must be a DispatchQuant or None, got {type(quant).__name__}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.routing = RoutingConfig(num_experts, top_k, scoring, renormalize, n_group,
                                     topk_group, float(routed_scaling_factor))
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.activation = activation
        self.quant = quant
        self.max_tokens_per_rank = max_tokens_per_rank
        self.experts_kernel: ExpertsKernel = experts_kernel or fused_experts
        self.manager = manager
        self.placement = expert_placement(num_experts, manager.world_size)
        self.local_experts = self.placement.local_range(manager.rank)
        device = manager.group.device if device is None else device
        n, h, i = len(self.local_experts), hidden_size, intermediate_size
        self.correction_bias = correction_bias
        own_router = gate is None
        if own_router:
            gate = Router(num_experts, h, correction_bias=correction_bias,
                          dtype=router_dtype or dtype, device=device)
        elif not isinstance(gate, nn.Module):
            raise TypeError(f"gate must be an nn.Module or None, got {type(gate).__name__}")
        elif correction_bias and not isinstance(
            getattr(gate, "e_score_correction_bias", None), torch.Tensor
        ):
            raise ValueError("correction_bias=True needs a gate with an e_score_correction_bias "
                             f"tensor; {type(gate).__name__} has none")
        self.gate = gate
        self.w13 = nn.Parameter(torch.empty(n, 2 * i, h, dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(n, h, i, dtype=dtype, device=device))
        self.shared_experts = shared_experts
        self.shared_expert_gate = shared_expert_gate
        if torch.device(device).type != "meta":
            for p in [self.w13, self.w2] + ([self.gate.weight] if own_router else []):
                nn.init.normal_(p, std=h**-0.5)
        self.handle: EPHandle | None = None
        self.declare_handle()  # collective: every rank builds its layers in the same order

    @property
    def num_local_experts(self) -> int:
        return len(self.local_experts)

    # ---- the manager's handle ------------------------------------------------------------------

    def spec(self, dtype: torch.dtype) -> EPSpec:
        """The :class:`~moe_ep.managers.EPSpec` of this layer for activations of ``dtype``.

        Quantised: float8 rows with ``quant.scale_cols(H)`` scales, combined in ``dtype``.
        """
        q = self.quant
        return EPSpec(
            hidden=self.hidden_size, num_experts=self.num_experts, topk=self.top_k,
            max_tokens_per_rank=self.max_tokens_per_rank, dtype=q.dtype if q else dtype,
            scale_cols=q.scale_cols(self.hidden_size) if q else 0, out_dtype=dtype,
        )

    def declare_handle(self) -> EPHandle:
        """The manager's handle for this layer's shape, declared once (collective then).

        Declared at construction for the parameters' dtype, and again only when that dtype
        changes (``model.to(torch.bfloat16)`` on every rank): the manager caches handles by
        spec, so layers of one shape share one.
        """
        dtype = self.w13.dtype
        if self.handle is None or self.handle.spec.combine_dtype != dtype:
            self.handle = self.manager.get_handle(self.spec(dtype))
            logger.debug("FusedMoE: handle %d of %s for %s", self.handle.index,
                         self.manager.name, self.handle.spec)
        return self.handle

    # ---- weights -----------------------------------------------------------------------------

    @torch.no_grad()
    def load_global_weights(
        self,
        gate: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        *,
        e_score_correction_bias: torch.Tensor | None = None,
    ) -> None:
        """Copy this rank's slice of full-model weights (any dtype / device; cast on copy).

        Args:
            gate: ``[E, H]`` router weight.
            w13: ``[E, 2I, H]`` every expert's gate (first I rows) and up projection
                (transformers' ``experts.gate_up_proj``); only this rank's experts are read.
            w2: ``[E, H, I]`` every expert's down projection (``experts.down_proj``).
            e_score_correction_bias: ``[E]``, for a layer built with ``correction_bias=True``.
        """
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size  # noqa: N806
        for name, t, shape in (("gate", gate, (E, H)), ("w13", w13, (E, 2 * I, H)),
                               ("w2", w2, (E, H, I))):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape {shape}, got {got}")
        mine = slice(self.local_experts.start, self.local_experts.stop)
        self.gate.weight.copy_(gate)
        self.w13.copy_(w13[mine])
        self.w2.copy_(w2[mine])
        bias = self._correction_bias()
        if (e_score_correction_bias is None) != (bias is None):
            raise ValueError(
                "e_score_correction_bias must be given exactly when the layer was built with "
                f"correction_bias=True (it was built with correction_bias={bias is not None})"
            )
        if bias is not None:
            bias.copy_(e_score_correction_bias)

    # ---- the steps -----------------------------------------------------------------------------

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [N, H]`` -> ``(router_logits [N, E], topk_weights [N, K] fp32, topk_ids [N, K])``.

        Local; no communication.
        """
        out = self.gate(x)
        logits = out[0] if isinstance(out, tuple) else out
        weights, ids = self.routing.route(logits, self._correction_bias())
        return logits, weights, ids

    def _correction_bias(self) -> torch.Tensor | None:
        return self.gate.e_score_correction_bias if self.correction_bias else None

    @torch.no_grad()
    def prepare(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> DispatchResult:
        """Quantise (when ``quant`` is set) and dispatch. Collective.

        Args:
            x: ``[N, H]`` in the layer's activation dtype; N may be 0 and differ between ranks.
            topk_weights: ``[N, K]`` float; topk_ids: ``[N, K]`` int global ids, -1 = none.
        Returns:
            the manager's :class:`~moe_ep.managers.DispatchResult` (``x`` in FP8 with
            ``x_scales`` when quantised).
        """
        handle = self.declare_handle()
        if self.quant is None:
            return self.manager.dispatch(x, topk_weights, topk_ids, handle=handle)
        xq, scales = self.quant.quantize(x)
        return self.manager.dispatch(xq, topk_weights, topk_ids, handle=handle, x_scales=scales)

    @torch.no_grad()
    def compute_experts(self, result: DispatchResult) -> torch.Tensor:
        """The local experts on ``result``: the expert output ``finalize`` expects. Local;
        if the kernel raises, the other ranks' combine fails too (they are not left waiting).

        The default kernel writes its output over ``result.x`` when the layout and dtype allow
        (the contract lets the experts step overwrite it): no new tensor per call, and ``shm``'s
        TOKEN combine then copies nothing."""
        dtype = self.handle.spec.combine_dtype
        kernel, x = self.experts_kernel, result.x
        if (kernel is fused_experts and result.layout is not Layout.EXPERT_PADDED
                and x.dtype == dtype and x.dim() == 2 and (x.shape[0] == 0 or x.stride(1) == 1)):
            kernel = functools.partial(fused_experts, out=x)
        return fail_together(result, lambda: kernel(
            result, self.w13, self.w2, activation=self.activation, out_dtype=dtype,
            quant=self.quant,
        ))

    @torch.no_grad()
    def finalize(self, expert_out: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        """Combine: ``[N, H]`` in the order of the dispatched x, router weights applied.

        Collective. For TOKEN results the weights were applied by the experts step, for the
        expert layouts the combine applies them (the manager knows which).
        """
        return self.manager.combine(expert_out, result)

    @torch.no_grad()  # inference-only: dispatch and combine are not differentiable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., H]`` (any number of tokens, 0 included, differing between ranks) -> same shape.

        Collective over the manager's group. A bad ``x`` on one rank fails the call on every
        rank.
        """
        return self.forward_with_router_logits(x)[0]

    @torch.no_grad()
    def forward_with_router_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`, also returning the router logits ``[prod(x.shape[:-1]), E]``."""
        dtype = self.declare_handle().spec.combine_dtype
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.hidden_size:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            self.manager.abort(ValueError(f"x must be [..., {self.hidden_size}], got {got}"),
                               handle=self.handle)
        if x.dtype != dtype:
            self.manager.abort(TypeError(f"x must have the layer's dtype {dtype}, got {x.dtype}"),
                               handle=self.handle)
        flat = x.reshape(-1, self.hidden_size)
        logits, weights, ids = self.route(flat)
        result = self.prepare(flat, weights, ids)
        y = self.finalize(self.compute_experts(result), result)
        return self.add_shared(flat, y).view(x.shape), logits

    @torch.no_grad()
    def add_shared(self, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """``routed + [sigmoid(shared_expert_gate(x)) *] shared_experts(x)``; local."""
        if self.shared_experts is None:
            return routed
        shared = self.shared_experts(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return routed + shared

    def extra_repr(self) -> str:
        r = self.routing
        return (
            f"num_experts={self.num_experts}, local_experts={self.local_experts.start}.."
            f"{self.local_experts.stop - 1}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, scoring={r.scoring}, "
            f"renormalize={r.renormalize}, n_group={r.n_group}, manager={self.manager.name}, "
            f"quant={self.quant}"
        )

