"""What is particular to the `shm` manager (its contract cases run in tests/test_managers.py).

* TOKEN results are the receiver's shared block, read in place; two results per handle stay
  live (two micro-batches in flight); a third dispatch retires the oldest, and combining that
  one raises on every rank while the live ones still combine correctly. Consecutive round
  trips reuse one buffer half; a dispatch with a result live takes the other.
* The EXPERT_PACKED layout moves the same rows as `alltoallv` and gives the same outputs.
* Large rows (H = 4096 bf16, hundreds of tokens), fp16 and fp64.
* A handle's capacity: exceeded with an explicit handle it is the caller's error on every
  rank; without a handle the manager grows its implicit handle collectively.
* /dev/shm keeps nothing of a job; availability follows the topology; options are checked.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

from moe_ep.distributed import GroupCoordinator, Topology
from moe_ep.distributed.shm import ShmCommunicator
from moe_ep.managers import (
    EPSpec,
    Layout,
    ManagerUnavailableError,
    RemoteInputError,
    apply_experts,
    available_managers,
    build_manager,
)
from moe_ep.managers.shm import ShmAll2AllOptions
from moe_ep.testing.reference import make_scaling_experts, reference_moe
from moe_ep.testing.scenarios import global_inputs, placement_ranges

pytestmark = pytest.mark.skipif(
    not ShmCommunicator.available()[0], reason=ShmCommunicator.available()[1]
)


def _group(info, use_shm: bool = True) -> GroupCoordinator:
    return GroupCoordinator([list(range(info.world_size))], "ep", use_shm=use_shm)


def _inputs(r: int, world: int, n: int, hidden: int, num_experts: int, topk: int, dtype, seed):
    counts = [n + (3 * q) % 5 for q in range(world)]
    xs, ws, ids = global_inputs(seed, counts, num_experts, topk, dtype, hidden)
    return xs, ws, ids, counts


def _in_place_and_live_results(info) -> list[str]:
    group = _group(info)
    r, world = info.rank, info.world_size
    mgr = build_manager("shm", group)
    notes = []
    try:
        hidden, num_experts, topk = 16, 8, 3
        spec = EPSpec(hidden=hidden, num_experts=num_experts, topk=topk, max_tokens_per_rank=12,
                      dtype=torch.float32)
        handle = mgr.get_handle(spec)
        assert mgr.get_handle(spec) is handle  # cached by the spec
        experts = make_scaling_experts(num_experts, hidden, seed=4)
        first = placement_ranges(num_experts, world)[r].start
        batches = [_inputs(r, world, 5 + b, hidden, num_experts, topk, torch.float32, 40 + b)
                   for b in range(3)]
        results = [mgr.dispatch(xs[r], ws[r], ids[r], handle=handle)
                   for xs, ws, ids, _ in batches[:2]]
        # TOKEN rows are the handle's shared block, read in place (not a copy).
        block = handle.buffer.x[0]
        assert results[0].layout is Layout.TOKEN
        assert results[0].x.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
        notes.append("in place")

        def run(res, batch):
            xs, ws, ids, counts = batch
            y = mgr.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
            ref = reference_moe(torch.cat(xs), torch.cat(ws), torch.cat(ids), experts)
            start = sum(counts[:r])
            return (y - ref[start:start + counts[r]]).abs().max().item()

        # Two live results combine in dispatch order and out of it.
        assert run(results[1], batches[1]) < 1e-5 and run(results[0], batches[0]) < 1e-5
        notes.append("two live")
        # A third dispatch retires the oldest of three.
        results = [mgr.dispatch(xs[r], ws[r], ids[r], handle=handle) for xs, ws, ids, _ in batches]
        with pytest.raises(ValueError, match="replaced by a later dispatch"):
            mgr.combine(apply_experts(results[0], lambda e, q: q), results[0])
        assert run(results[1], batches[1]) < 1e-5 and run(results[2], batches[2]) < 1e-5
        notes.append("retired")

        # Round trip after round trip reuses one buffer half (its lines stay in the caches);
        # with a result live the next dispatch takes the other half; combines interleaved
        # with dispatches stay exact.
        def dispatch(b):
            xs, ws, ids, _ = batches[b]
            return mgr.dispatch(xs[r], ws[r], ids[r], handle=handle)

        trip = dispatch(0)
        assert run(trip, batches[0]) < 1e-5
        a = dispatch(1)
        assert a.x.data_ptr() == trip.x.data_ptr()
        b = dispatch(2)  # a is live
        assert b.x.data_ptr() != a.x.data_ptr()
        assert run(a, batches[1]) < 1e-5
        c = dispatch(0)  # b is live: a's half again
        assert c.x.data_ptr() == a.x.data_ptr()
        assert run(c, batches[0]) < 1e-5 and run(b, batches[2]) < 1e-5
        notes.append("halves")
    finally:
        mgr.destroy()
        group.destroy()
    return notes


@pytest.mark.parametrize("world", [2, 3])
def test_results_in_place_two_live_and_retired(dist_pool, world):
    results = dist_pool(world).run(_in_place_and_live_results, timeout=120)
    assert all(notes == ["in place", "two live", "retired", "halves"] for notes in results)


def _halves_disagree(info) -> tuple[str, str, float]:
    """The half is chosen from the sequence of calls alone; if the ranks' choices ever differed
    (simulated: the last rank flips its record), the dispatch fails on every rank as a
    mismatch instead of writing into a half its peers do not read."""
    group = _group(info)
    r, world = info.rank, info.world_size
    mgr = build_manager("shm", group)
    try:
        spec = EPSpec(hidden=16, num_experts=8, topk=2, max_tokens_per_rank=8,
                      dtype=torch.float32)
        handle = mgr.get_handle(spec)
        xs, ws, ids, _ = _inputs(r, world, 4, 16, 8, 2, torch.float32, 3)
        res = mgr.dispatch(xs[r], ws[r], ids[r], handle=handle)
        mgr.combine(res.x, res)
        if r == world - 1:
            handle._last_half ^= 1
        group.barrier()
        start = time.monotonic()
        try:
            mgr.dispatch(xs[r], ws[r], ids[r], handle=handle)
            return "none", "", time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 - the outcome is the result
            return type(exc).__name__, str(exc), time.monotonic() - start
    finally:
        mgr.destroy()
        group.destroy()


def test_ranks_that_pick_different_halves_fail_as_a_mismatch(dist_pool):
    for kind, message, elapsed in dist_pool(2).run(_halves_disagree, timeout=120):
        assert kind in ("CallMismatchError", "ShmError"), (kind, message)
        assert "buffer half" in message and elapsed < 5, (message, elapsed)


def _same_as_alltoallv(info) -> list[float]:
    """Far more rows than one step of the collectives holds: packed shm moves exactly the rows
    of alltoallv, and both layouts give alltoallv's output."""
    group = _group(info)
    r, world = info.rank, info.world_size
    errors = []
    managers = [build_manager("shm", group, layout="expert_packed"), build_manager("shm", group),
                build_manager("alltoallv", group)]
    try:
        for n, hidden, dtype in ((300, 4096, torch.bfloat16), (7, 4096, torch.float32),
                                 (9, 64, torch.float16), (9, 64, torch.float64)):
            xs, ws, ids, counts = _inputs(r, world, n, hidden, 16, 4, dtype, 10 + n)
            first = placement_ranges(16, world)[r].start
            outs = []
            for mgr in managers:
                res = mgr.dispatch(xs[r], ws[r], ids[r], num_experts=16)
                # Cheap experts that differ per global expert (big linear layers cost seconds).
                out = apply_experts(res, lambda e, q, f=first: q * (f + e + 1) - 0.5 * q.square())
                outs.append((res, mgr.combine(out, res)))
            (res_p, y_p), (_, y_t), (res_a, y_a) = outs
            assert torch.equal(res_p.x, res_a.x) and torch.equal(res_p.topk_ids, res_a.topk_ids)
            assert torch.equal(res_p.tokens_per_expert, res_a.tokens_per_expert)
            assert y_p.dtype == y_t.dtype == dtype
            errors.append(max((y_p.float() - y_a.float()).abs().max().item(),
                              (y_t.float() - y_a.float()).abs().max().item()))
    finally:
        for mgr in managers:
            mgr.destroy()
        group.destroy()
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_same_rows_and_outputs_as_alltoallv(dist_pool, world):
    for errs in dist_pool(world).run(_same_as_alltoallv, timeout=240):
        assert errs[0] <= 2e-2 and errs[1] <= 1e-4 and errs[2] <= 5e-3 and errs[3] <= 1e-12, errs


def _capacity(info) -> list[str]:
    group = _group(info)
    r, world = info.rank, info.world_size
    bad = world - 1
    mgr = build_manager("shm", group, max_tokens_per_rank=4)
    seen = []
    try:
        handle = mgr.get_handle(EPSpec(hidden=8, num_experts=4, topk=2, max_tokens_per_rank=4,
                                       dtype=torch.float32))
        xs, ws, ids, counts = _inputs(r, world, 3, 8, 4, 2, torch.float32, 1)
        n = 5 if r == bad else 3
        x, w, i = torch.randn(n, 8), torch.rand(n, 2), torch.tensor([[0, 1]] * n)
        try:
            mgr.dispatch(x, w, i, handle=handle)
        except RemoteInputError as exc:
            seen.append(("remote", exc.bad_ranks))
        except ValueError as exc:
            assert "max_tokens_per_rank=4" in str(exc)
            seen.append(("local", None))
        # Without a handle the manager grows its implicit handle (collectively) as needed.
        experts = make_scaling_experts(4, 8, seed=2)
        first = placement_ranges(4, world)[r].start
        for size in (3, 40, 7):
            xs, ws, ids, counts = _inputs(r, world, size, 8, 4, 2, torch.float32, size)
            res = mgr.dispatch(xs[r], ws[r], ids[r], num_experts=4)
            y = mgr.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
            ref = reference_moe(torch.cat(xs), torch.cat(ws), torch.cat(ids), experts)
            start = sum(counts[:r])
            assert torch.allclose(y, ref[start:start + counts[r]], atol=1e-5), size
        caps = sorted(h.spec.max_tokens_per_rank for h in mgr._implicit.values())
        seen.append(("grown", tuple(caps)))
    finally:
        mgr.destroy()
        group.destroy()
    return seen


@pytest.mark.parametrize("world", [2, 3])
def test_capacity_checked_and_grown(dist_pool, world):
    results = dist_pool(world).run(_capacity, timeout=120)
    for rank, seen in enumerate(results):
        assert seen[0] == (("local", None) if rank == world - 1 else ("remote", (world - 1,)))
        # 40 + (3 r) % 5 tokens need a power of two >= 44: 64.
        assert seen[1] == ("grown", (64,))


def _leaves_nothing(info) -> list[str]:
    group = _group(info)
    mgr = build_manager("shm", group)
    mgr.get_handle(EPSpec(hidden=8, num_experts=4, topk=1, max_tokens_per_rank=8,
                          dtype=torch.float32))
    # This job's names carry its rank 0's pid (other jobs may run beside it).
    creator = group.broadcast_object(os.getpid(), src=0)
    mine = [f for f in os.listdir("/dev/shm") if f.startswith(f"moe_ep_{creator}_")]
    mgr.destroy()
    group.destroy()
    return mine


def test_dev_shm_keeps_nothing(dist_pool):
    # Names are unlinked as soon as every rank has mapped them, while the job still runs.
    for files in dist_pool(2).run(_leaves_nothing, timeout=60):
        assert files == []


def test_availability_follows_the_topology():
    ok, reason = available_managers(Topology(device="cpu", world_size=2, same_node=(True, True)))[
        "shm"
    ]
    assert ok, reason
    ok, reason = available_managers(
        Topology(device="cpu", world_size=2, same_node=(True, False))
    )["shm"]
    assert not ok and "one node" in reason
    ok, reason = available_managers(
        Topology(device="cuda", world_size=8, same_node=(True,) * 8, nvlink=True, gpus_per_node=8)
    )["shm"]
    assert not ok and "CPU" in reason


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="layout"):
        ShmAll2AllOptions(layout="padded")
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        ShmAll2AllOptions(max_tokens_per_rank=0)
    with pytest.raises(TypeError, match="max_tokens_per_rank"):
        ShmAll2AllOptions(max_tokens_per_rank=2.0)


def _handle_needs_capacity(info) -> str:
    group = _group(info)
    mgr = build_manager("shm", group)
    try:
        mgr.get_handle(EPSpec(hidden=8, num_experts=4, topk=1, dtype=torch.float32))
    except ValueError as exc:
        return str(exc)
    finally:
        mgr.destroy()
        group.destroy()
    return "accepted"


def test_handle_without_capacity_is_refused(dist_pool):
    for message in dist_pool(2).run(_handle_needs_capacity, timeout=60):
        assert "max_tokens_per_rank must be set" in message


def _refusals(info) -> list[str]:
    """One rank lacks the native library, then the ranks are on different nodes (simulated:
    the same-node probe answers per rank): every rank refuses alike."""
    from unittest import mock

    gloo = GroupCoordinator([list(range(info.world_size))], "ep_gloo", use_shm=False)
    seen = []
    try:
        missing = staticmethod(lambda: (False, "no native library (simulated)"))
        with mock.patch.object(ShmCommunicator, "available", missing) if info.rank == 1 \
                else contextlib.nullcontext():
            with pytest.raises(ManagerUnavailableError) as exc:
                build_manager("shm", gloo)
        seen.append(str(exc.value))
        with mock.patch.object(gloo, "same_node", False):
            with pytest.raises(ManagerUnavailableError) as exc:
                build_manager("shm", gloo)
        seen.append(str(exc.value))
        mgr = build_manager("shm", gloo)  # the group is still usable
        mgr.destroy()
    finally:
        gloo.destroy()
    return seen


def test_refused_alike_on_every_rank(dist_pool):
    """One rank without the library (or ranks on other nodes) makes every rank refuse at once,
    instead of leaving the others in the segment set-up until the timeout."""
    results = dist_pool(2).run(_refusals, timeout=60)
    for no_lib, apart in results:
        assert "rank 1: no native library (simulated)" in no_lib
        assert "on one node (the group spans several)" in apart


# --------------------------------------------------------------- a peer killed mid-dispatch
def _ep_crash_worker(rank: int, world: int, store: str, q) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        group = GroupCoordinator([list(range(world))], "ep", timeout_s=30.0)
        mgr = build_manager("shm", group)
        handle = mgr.get_handle(EPSpec(hidden=4096, num_experts=16, topk=4,
                                       max_tokens_per_rank=256, dtype=torch.bfloat16))
        xs, ws, ids, _ = _inputs(rank, world, 200, 4096, 16, 4, torch.bfloat16, 5)
        q.put(("ready", rank, os.getpid(), time.monotonic()))
        while True:  # the kill lands inside a dispatch or a combine
            res = mgr.dispatch(xs[rank], ws[rank], ids[rank], handle=handle)
            mgr.combine(apply_experts(res, lambda e, q_: q_), res)
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put(("error", rank, f"{type(e).__name__}: {e}", time.monotonic()))


def test_peer_killed_mid_dispatch_is_named_and_leaks_nothing(tmp_path):
    import multiprocessing as mp
    import queue
    import signal

    world, victim = 3, 1
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ep_crash_worker, args=(r, world, str(tmp_path / "store"), q),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        ready = {}
        deadline = time.monotonic() + 120
        while len(ready) < world and time.monotonic() < deadline:
            kind, rank, pid, _ = q.get(timeout=max(0.1, deadline - time.monotonic()))
            assert kind == "ready", (kind, rank, pid)
            ready[rank] = pid
        assert len(ready) == world
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(procs[victim].pid, signal.SIGKILL)
        errors = []
        while len(errors) < world - 1:
            try:
                errors.append(q.get(timeout=60))
            except queue.Empty:
                break
        assert sorted(m[1] for m in errors) == [0, 2], errors
        for kind, rank, text, at in errors:
            assert kind == "error" and text.startswith("ShmError"), (rank, text)
            assert f"rank {victim} (pid {ready[victim]}) died" in text, (rank, text)
            assert at - killed_at < 10.0, (rank, at - killed_at, text)  # timeout is 30 s
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"moe_ep_{ready[0]}_")]
