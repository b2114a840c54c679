"""DeepSpeed as a peer in the benchmarks: set up its communication, and clean up after it.

Shared by `bench_collectives.py` and `bench_fused_moe.py` (scripts in this folder import it by
name). DeepSpeed's CPU shared-memory op sizes itself from LOCAL_SIZE (it segfaults without it),
names its segments after MASTER_ADDR / MASTER_PORT and rank, and never unlinks them: each job
gets a fresh port-like number, and `unlink_segments` removes this rank's after the job.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

_PREFIX = "deepspeed_allreduce_buffer_"


def init_deepspeed(world: int):
    """`deepspeed.comm`, initialised over the running gloo world (collective)."""
    os.environ["LOCAL_SIZE"] = str(world)
    os.environ["LOCAL_RANK"] = str(dist.get_rank())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    port = torch.randint(20000, 60000, (1,)) if dist.get_rank() == 0 else torch.zeros(1).long()
    dist.broadcast(port, src=0)
    os.environ["MASTER_PORT"] = str(int(port))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as dcomm

    deepspeed.init_distributed(dist_backend="gloo")
    return dcomm


def unlink_segments() -> None:
    """Remove this rank's DeepSpeed segments of this job from /dev/shm (call after a barrier)."""
    suffix = f"_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{dist.get_rank()}"
    for name in os.listdir("/dev/shm"):
        if name.startswith(_PREFIX) and name.endswith(suffix):
            os.unlink(os.path.join("/dev/shm", name))
