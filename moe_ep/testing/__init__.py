"""Test helpers: the multi-process harness and the pure-torch reference MoE."""

from moe_ep.testing.harness import (
    DistributedPool,
    DistributedTimeoutError,
    RankInfo,
    RemoteTraceback,
    WorkerCrashedError,
    run_distributed,
)

__all__ = [
    "DistributedPool",
    "DistributedTimeoutError",
    "RankInfo",
    "RemoteTraceback",
    "WorkerCrashedError",
    "run_distributed",
]
