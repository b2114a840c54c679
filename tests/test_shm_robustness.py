"""Segment lifecycle and failure behaviour of the shared-memory layer.

* A rank SIGKILLed mid-run: the survivors raise ShmError naming it well within the timeout,
  and /dev/shm keeps nothing of the job (also when the kill lands during set-up).
* A peer that never arrives (timeout) or calls another collective (mismatch) fails every rank
  instead of hanging or corrupting data.
* Ranks outnumbering cores (4 on this 2-core machine) still beat gloo by far.
* Segments are private (mode 0600, O_EXCL, refused when foreign) and distinct per group and
  per job; TP-like and DP-like groups run interleaved without interference.

The kill tests spawn their own processes (the shared pool kills every rank when one dies).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import stat
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moe_ep.distributed import GroupCoordinator
from moe_ep.distributed.shm import (
    ShmCommunicator,
    ShmError,
    ShmUnavailableError,
    _lib,
    _unlink,
    init_shm_manager,
)
from moe_ep.testing import run_distributed

pytestmark = pytest.mark.skipif(
    not ShmCommunicator.available()[0], reason=ShmCommunicator.available()[1]
)


def _job_files(pid: int) -> list[str]:
    """Entries of /dev/shm created by a communicator whose rank 0 had this pid."""
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"moe_ep_{pid}_")]


# ------------------------------------------------------------------------- kill mid-run
def _crash_worker(rank: int, world: int, store: str, setup_kill: bool, q) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=timedelta(seconds=20),
    )
    q.put(("pid", rank, os.getpid(), time.monotonic()))
    if setup_kill and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # dies before joining the segment
    try:
        comm = ShmCommunicator(
            dist.group.WORLD, rank, world, "crash", buffer_bytes=16 << 10, timeout_s=30.0
        )
        q.put(("ready", rank, comm.segment_name, time.monotonic()))
        x = torch.ones(200_000)  # many chunks per op: the kill lands inside an operation
        while True:
            y = comm.all_reduce(x)
            if float(y[0]) != world:
                q.put(("wrong", rank, float(y[0]), time.monotonic()))
                return
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put(("error", rank, f"{type(e).__name__}: {e}", time.monotonic()))


def _spawn(world: int, tmp_path, setup_kill: bool):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [
        ctx.Process(target=_crash_worker, args=(r, world, store, setup_kill, q), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    return procs, q


def _drain(q, want: int, timeout: float, until=None) -> list[tuple]:
    """Up to `want` messages (or until `until(messages)` holds) within `timeout` seconds."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < want and not (until and until(got)) and time.monotonic() < deadline:
        try:
            got.append(q.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            break
    return got


def _reap(procs) -> None:
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()


def test_sigkill_mid_run_fails_survivors_fast_and_leaks_nothing(tmp_path):
    world, victim = 3, 1
    procs, q = _spawn(world, tmp_path, setup_kill=False)
    try:
        msgs = _drain(q, 2 * world, timeout=120)
        pids = {m[1]: m[2] for m in msgs if m[0] == "pid"}
        ready = {m[1]: m[2] for m in msgs if m[0] == "ready"}
        assert len(ready) == world, msgs
        name = ready[0]
        assert len(set(ready.values())) == 1 and name.startswith(f"/moe_ep_{pids[0]}_")
        # Set-up unlinked the name already: nothing in /dev/shm even while the job runs.
        assert not _job_files(pids[0])
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(procs[victim].pid, signal.SIGKILL)  # a zombie until reaped: must count as dead
        errors = [m for m in _drain(q, world - 1, timeout=60) if m[0] != "pid"]
        assert sorted(m[1] for m in errors) == [0, 2], errors
        for kind, rank, text, at in errors:
            assert kind == "error" and text.startswith("ShmError"), (rank, text)
            assert f"rank {victim} (pid {pids[victim]}) died" in text, (rank, text)
            # Liveness is polled every 50 ms; the 30 s timeout must play no part.
            assert at - killed_at < 10.0, (rank, at - killed_at, text)
    finally:
        _reap(procs)
    assert not _job_files(pids[0])


def test_sigkill_during_setup_leaks_nothing(tmp_path):
    world = 2
    procs, q = _spawn(world, tmp_path, setup_kill=True)
    try:
        # (rank 1's own "pid" message may die with it, unflushed)
        msgs = _drain(
            q, world + 1, timeout=120,
            until=lambda got: any(m[1] == 0 and m[0] != "pid" for m in got),
        )
        pids = {m[1]: m[2] for m in msgs if m[0] == "pid"}
        outcome = [m for m in msgs if m[1] == 0 and m[0] != "pid"]
        assert 0 in pids and outcome, msgs
        assert outcome[0][0] == "error", outcome  # rank 0 could not finish set-up
    finally:
        _reap(procs)
    assert not _job_files(pids[0])


# --------------------------------------------------------------- timeout and mismatch
def _stuck_and_mismatch(info) -> list[str]:
    W, r = info.world_size, info.rank
    seen = []
    comm = ShmCommunicator(dist.group.WORLD, r, W, "stuck", timeout_s=1.0)
    try:
        # Rank 1 is late by more than the timeout: rank 0 times out and aborts the group;
        # rank 1 then finds the group aborted instead of waiting.
        if r == 1:
            time.sleep(2.5)
        t0 = time.monotonic()
        try:
            comm.all_reduce(torch.ones(4))
        except ShmError as e:
            seen.append(f"{time.monotonic() - t0:.2f} {e}")
        with pytest.raises(ShmError):
            comm.barrier()  # broken for good
    finally:
        comm.destroy()
    dist.barrier()
    comm = ShmCommunicator(dist.group.WORLD, r, W, "mismatch", timeout_s=20.0)
    try:
        t0 = time.monotonic()
        try:
            if r == 0:
                comm.all_reduce(torch.ones(4))
            else:
                comm.all_gather(torch.ones(4))
        except ShmError as e:
            seen.append(f"{time.monotonic() - t0:.2f} {e}")
    finally:
        comm.destroy()
    dist.barrier()
    # The process group is intact: a fresh communicator works.
    comm = ShmCommunicator(dist.group.WORLD, r, W, "after")
    try:
        assert torch.equal(comm.all_reduce(torch.ones(3)), torch.full((3,), float(W)))
    finally:
        comm.destroy()
    return seen


def test_timeout_and_mismatch_fail_every_rank(dist_pool):
    results = dist_pool(2).run(_stuck_and_mismatch, timeout=120)
    for rank, seen in enumerate(results):
        assert len(seen) == 2, (rank, seen)
        elapsed, text = seen[0].split(" ", 1)
        if rank == 0:
            assert "timed out after 1.0 s waiting for rank 1" in text and float(elapsed) < 2.4
        else:
            assert "aborted the group" in text and "timed out" in text and float(elapsed) < 1
        elapsed, text = seen[1].split(" ", 1)
        assert "collective mismatch" in text and float(elapsed) < 5, text
        assert "all_reduce" in text and "all_gather" in text


# ----------------------------------------------------------------- oversubscription
def _shm_vs_gloo_speed(info) -> tuple[float, float]:
    W, r = info.world_size, info.rank
    comm = ShmCommunicator(dist.group.WORLD, r, W, "speed")
    x = torch.ones(2048)  # 8 KiB
    try:
        times = []
        for fn in (lambda: comm.all_reduce(x), lambda: dist.all_reduce(torch.zeros(2048))):
            for _ in range(5):
                fn()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            times.append((time.perf_counter() - t0) / 200)
        assert torch.equal(comm.all_reduce(x), torch.full((2048,), float(W)))
    finally:
        comm.destroy()
    return tuple(times)


def test_more_ranks_than_cores_stay_fast(dist_pool):
    """4 ranks on (typically) 2 cores: waiting yields / sleeps instead of spinning forever."""
    results = dist_pool(4).run(_shm_vs_gloo_speed, timeout=120)
    shm = max(t[0] for t in results)
    gloo = max(t[1] for t in results)
    assert shm < gloo / 3, (shm, gloo)


# ------------------------------------------------------------ privacy and uniqueness
def test_segment_is_private_and_exclusive():
    name = f"/moe_ep_{os.getpid()}_unit_{time.monotonic_ns()}"
    handle = init_shm_manager(name, 2, 0, buffer_bytes=4096)
    try:
        mode = stat.S_IMODE(os.stat(f"/dev/shm{name}").st_mode)
        assert mode == 0o600
        with pytest.raises(ShmUnavailableError, match="File exists"):
            init_shm_manager(name, 2, 0, buffer_bytes=4096)
        # A joiner maps the creator's segment, and refuses a mismatched world size.
        joiner = init_shm_manager(name, 2, 1)
        _lib().shm_destroy(joiner)
        with pytest.raises(ShmUnavailableError, match="created for 2 ranks"):
            init_shm_manager(name, 3, 1)
    finally:
        _lib().shm_destroy(handle)
        _unlink(name)
    assert not os.path.exists(f"/dev/shm{name}")
    # A segment someone else could read is refused.
    foreign = f"/moe_ep_{os.getpid()}_foreign_{time.monotonic_ns()}"
    fd = os.open(f"/dev/shm{foreign}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.ftruncate(fd, 1 << 20)
        with pytest.raises(ShmUnavailableError, match="not private"):
            init_shm_manager(foreign, 2, 1)
    finally:
        os.close(fd)
        os.unlink(f"/dev/shm{foreign}")


def _two_groups(info) -> list[str]:
    """TP-like [[0,1],[2,3]] and DP-like [[0,2],[1,3]] groups, interleaved."""
    r = info.rank
    tp = GroupCoordinator([[0, 1], [2, 3]], "tp")
    dp = GroupCoordinator([[0, 2], [1, 3]], "dp")
    try:
        assert tp.shm is not None and dp.shm is not None
        names = [tp.shm.segment_name, dp.shm.segment_name]
        assert names[0] != names[1]
        for i in range(50):
            a = tp.all_reduce(torch.full((1000,), float(r + i)))
            b = dp.all_reduce(torch.full((3000,), float(10 * r + i)))
            tp_peers = [0, 1] if r < 2 else [2, 3]
            dp_peers = [0, 2] if r % 2 == 0 else [1, 3]
            assert torch.all(a == sum(p + i for p in tp_peers))
            assert torch.all(b == sum(10 * p + i for p in dp_peers))
        return names
    finally:
        tp.destroy()
        dp.destroy()


def test_groups_never_share_a_segment(dist_pool):
    names = dist_pool(4).run(_two_groups, timeout=120)
    tp_names = {n[0] for n in names}
    dp_names = {n[1] for n in names}
    assert len(tp_names) == 2 and len(dp_names) == 2 and not tp_names & dp_names


def _job(info, base: float) -> tuple[str, bool]:
    comm = ShmCommunicator(dist.group.WORLD, info.rank, info.world_size, "job")
    try:
        ok = all(
            torch.all(comm.all_reduce(torch.full((5000,), base + i)) == 2 * (base + i))
            for i in range(300)
        )
        return comm.segment_name, ok
    finally:
        comm.destroy()


def test_two_jobs_at_once_stay_apart():
    """Two independent jobs (same group name) run concurrently on this machine."""
    out: dict[int, list] = {}

    def launch(k: int) -> None:
        out[k] = run_distributed(2, _job, 1000.0 * (k + 1), timeout=120)

    threads = [threading.Thread(target=launch, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(out) == {0, 1}
    assert all(ok for res in out.values() for _, ok in res)
    assert out[0][0][0] != out[1][0][0]
