"""MoE layers built on the All2All managers: FusedMoE, its router, experts kernels, FP8 helpers."""

from moe_ep.layer.experts import ExpertsKernel, expert_mlp, fused_experts
from moe_ep.layer.fused_moe import FusedMoE, Router
from moe_ep.layer.quant import DispatchQuant, dequantize, quantize
from moe_ep.layer.router import RoutingConfig, route

__all__ = [
    "DispatchQuant",
    "ExpertsKernel",
    "FusedMoE",
    "Router",
    "RoutingConfig",
    "dequantize",
    "expert_mlp",
    "fused_experts",
    "quantize",
    "route",
]
