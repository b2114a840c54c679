"""run_distributed: results, errors with tracebacks, fail-fast, timeouts, crashes, no leftovers."""

from __future__ import annotations

import os
import time

import pytest
import torch.distributed as dist

from moe_ep.testing import (
    DistributedPool,
    DistributedTimeoutError,
    RemoteTraceback,
    WorkerCrashedError,
    run_distributed,
)


def _whoami(info, tag):
    return (tag, info.rank, info.world_size, dist.get_rank(), dist.get_world_size(), os.getpid())


def _raise_on_rank1_others_wait(info):
    if info.rank == 1:
        raise KeyError("rank one says no")
    dist.barrier()  # would wait forever for rank 1


def _hang(info, pid_dir):
    with open(os.path.join(pid_dir, f"{info.rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(3600)


def _die_on_rank0(info):
    if info.rank == 0:
        os._exit(3)
    time.sleep(3600)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_results_in_rank_order_and_pool_reuse():
    with DistributedPool(2) as pool:
        first = pool.run(_whoami, "a")
        second = pool.run(_whoami, "b")
    assert [r[:5] for r in first] == [("a", r, 2, r, 2) for r in range(2)]
    assert [r[5] for r in first] == [r[5] for r in second], "workers were not reused"
    assert not any(_alive(r[5]) for r in first)


def test_worker_error_fails_fast_with_type_and_traceback():
    start = time.monotonic()
    with pytest.raises(KeyError, match="rank one says no") as err:
        run_distributed(2, _raise_on_rank1_others_wait, timeout=60)
    assert time.monotonic() - start < 30, "did not fail fast"
    cause = err.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "_raise_on_rank1_others_wait" in str(cause) and "[rank 1]" in str(cause)


def test_hanging_worker_times_out_and_leaves_no_process(tmp_path):
    pool = DistributedPool(2)
    try:
        start = time.monotonic()
        with pytest.raises(DistributedTimeoutError, match=r"ranks \[0, 1\]"):
            pool.run(_hang, str(tmp_path), timeout=3)
        assert time.monotonic() - start < 20
        assert pool.broken
        pids = [int((tmp_path / f"{r}.pid").read_text()) for r in range(2)]
        assert pids == pool.pids
        assert not any(_alive(p) for p in pids), "a rank survived the timeout"
    finally:
        pool.close()


def test_crashed_rank_is_reported_and_others_killed():
    pool = DistributedPool(2)
    try:
        with pytest.raises(WorkerCrashedError, match=r"rank 0 died \(exit code 3\)"):
            pool.run(_die_on_rank0, timeout=60)
        assert not any(_alive(p) for p in pool.pids)
        with pytest.raises(RuntimeError, match="broken"):
            pool.run(_whoami, "x")
    finally:
        pool.close()
