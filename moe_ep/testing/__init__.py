"""Test helpers: the multi-process harness and the pure-torch reference MoE."""

from moe_ep.launch import (
    DistributedPool,
    DistributedTimeoutError,
    RankInfo,
    RemoteTraceback,
    WorkerCrashedError,
    run_distributed,
)
from moe_ep.testing.reference import make_linear_experts, make_scaling_experts, reference_moe

__all__ = [
    "DistributedPool",
    "DistributedTimeoutError",
    "RankInfo",
    "RemoteTraceback",
    "WorkerCrashedError",
    "make_linear_experts",
    "make_scaling_experts",
    "reference_moe",
    "run_distributed",
]
