"""MoE layers built on the All2All managers."""

from moe_ep.layer.fused_moe import FusedMoE, route

__all__ = ["FusedMoE", "route"]
