"""Test helpers: the multi-process harness and the pure-torch reference MoE."""

from moe_ep.launch import (
    DistributedPool,
    DistributedTimeoutError,
    RankInfo,
    RemoteTraceback,
    WorkerCrashedError,
    run_distributed,
)
from moe_ep.testing.reference import (
    dense_moe_reference,
    make_linear_experts,
    make_scaling_experts,
    reference_moe,
    reference_routing,
)

__all__ = [
    "DistributedPool",
    "DistributedTimeoutError",
    "RankInfo",
    "RemoteTraceback",
    "WorkerCrashedError",
    "dense_moe_reference",
    "make_linear_experts",
    "make_scaling_experts",
    "reference_moe",
    "reference_routing",
    "run_distributed",
]
