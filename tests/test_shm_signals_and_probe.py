"""Issue 9 in the distributed layer: SIGINT reaches a rank waiting in a shared-memory collective
(and its peers fail too); the same-node probe file never outlives a source rank that dies
inside the probe; the group's timeout reaches the shared-memory layer.

These tests spawn their own processes: the shared pool kills every rank when one dies.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moe_ep.distributed import GroupCoordinator
from moe_ep.distributed.shm import ShmCommunicator

needs_shm = pytest.mark.skipif(
    not ShmCommunicator.available()[0], reason=ShmCommunicator.available()[1]
)


def _init(rank: int, store: str, timeout_s: float = 60) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=timeout_s))


def _spawn(target, store: str, q, *extra):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, store, q, *extra), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    return procs


def _reap(procs) -> None:
    for p in procs:
        p.join(timeout=20)
        if p.is_alive():
            p.kill()
            p.join()


# ------------------------------------------------------------------------------ SIGINT
def _interrupt_worker(rank: int, store: str, q) -> None:
    # As in an interactive process: a shell starts background jobs (and so whatever runs the
    # suite there) with SIGINT ignored, and Python then installs no handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _init(rank, store)
    g = GroupCoordinator([[0, 1]], "sigint", timeout_s=120)
    q.put(("ready", rank, os.getpid()))
    if rank == 1:
        time.sleep(4)  # late: rank 0 waits inside the all-reduce meanwhile
    t0 = time.monotonic()
    try:
        g.all_reduce(torch.ones(1000))
        q.put(("done", rank, time.monotonic() - t0))
    except KeyboardInterrupt:
        q.put(("KeyboardInterrupt", rank, time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put((f"{type(e).__name__}: {e}", rank, time.monotonic() - t0))


@needs_shm
def test_sigint_interrupts_a_waiting_rank_and_fails_its_peers(tmp_path):
    q = mp.get_context("spawn").Queue()
    procs = _spawn(_interrupt_worker, str(tmp_path / "store"), q)
    try:
        pids = {}
        while len(pids) < 2:
            _, rank, pid = q.get(timeout=120)
            pids[rank] = pid
        time.sleep(1.0)
        os.kill(pids[0], signal.SIGINT)
        results = {}
        while len(results) < 2:
            kind, rank, elapsed = q.get(timeout=60)
            results[rank] = (kind, elapsed)
    except queue.Empty:
        pytest.fail("a rank neither finished nor failed")
    finally:
        _reap(procs)
    kind, elapsed = results[0]
    assert kind == "KeyboardInterrupt" and elapsed < 3.0, results  # not the 120 s timeout
    kind, elapsed = results[1]
    assert kind.startswith("ShmError") and "interrupted (SIGINT)" in kind, results
    assert elapsed < 2.0, results


# ------------------------------------------------------------------------- probe leak
def _probe_worker(rank: int, store: str, q) -> None:
    _init(rank, store, timeout_s=20)
    from moe_ep.distributed import group as group_module

    real = group_module._write_probe

    def write_then_die(path, magic):
        ok = real(path, magic)
        q.put(("probe", rank, path))
        q.close()
        q.join_thread()  # flushed before the kill
        os.kill(os.getpid(), signal.SIGKILL)  # dies inside the probe, file on disk
        return ok

    if rank == 0:
        group_module._write_probe = write_then_die
    else:
        time.sleep(2)  # the peer is late
    try:
        GroupCoordinator([[0, 1]], "probe", use_shm=False)
        q.put(("built", rank, ""))
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put(("error", rank, f"{type(e).__name__}: {e}"))


def test_probe_file_does_not_outlive_a_source_killed_inside_the_probe(tmp_path):
    q = mp.get_context("spawn").Queue()
    procs = _spawn(_probe_worker, str(tmp_path / "store"), q)
    try:
        seen: dict = {}
        deadline = time.monotonic() + 120
        while ("error", 1) not in seen and ("built", 1) not in seen:
            kind, rank, text = q.get(timeout=max(1, deadline - time.monotonic()))
            seen[(kind, rank)] = text
    except queue.Empty:
        pytest.fail(f"rank 1 neither failed nor finished: {seen}")
    finally:
        _reap(procs)
    path = seen[("probe", 0)]
    assert path.startswith("/dev/shm/moe_ep_probe_"), path
    assert ("error", 1) in seen, seen  # the source died: the peer must fail, not hang
    assert not os.path.exists(path), f"{path} leaked"


# ------------------------------------------------------------------------------ timeout
def _timeouts(info) -> tuple:
    g = GroupCoordinator([[0, 1]], "t", timeout_s=7.5)
    d = GroupCoordinator([[0, 1]], "d")
    try:
        shm = (g.shm.timeout_s, d.shm.timeout_s) if g.shm is not None else None
        return g.timeout_s, d.timeout_s, g.same_node, shm
    finally:
        g.destroy()
        d.destroy()


def test_group_timeout_reaches_the_shm_layer(dist_pool):
    for timeout, default, same_node, shm in dist_pool(2).run(_timeouts):
        # The pool initialises the world with a 120 s timeout (its start_timeout).
        assert timeout == 7.5 and default == 120.0 and same_node is True
        assert shm is None or shm == (7.5, 120.0)
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        GroupCoordinator([[0]], "x", timeout_s=-1)
