"""Misuse of dispatch / combine on one rank fails every rank promptly (issues 8 and 9).

A table of scenarios, each run on every portable manager at W=2 and W=3 with the last rank
misbehaving. For each, every rank must raise (never hang, never abort the process) within
10 s, with the error its role calls for, and the group must stay usable afterwards: a new
manager on it does a correct round trip (the manager itself either still works, or says it is
unusable). The table of what every rank raised, and when, is printed with `-s`.
"""

from __future__ import annotations

import time

import pytest
import torch

from moe_ep.distributed import GroupCoordinator
from moe_ep.managers import (
    CallMismatchError,
    RemoteInputError,
    apply_experts,
    build_manager,
)
from moe_ep.testing import run_distributed
from moe_ep.testing.reference import make_scaling_experts, reference_moe
from moe_ep.testing.scenarios import PORTABLE_MANAGERS, global_inputs, placement_ranges

LIMIT_S = 10.0
E, K, H = 8, 2, 16


def _inputs(r: int, world: int, seed: int):
    counts = [3 + q for q in range(world)]
    xs, ws, ids = global_inputs(seed, counts, E, K, torch.float32, H)
    return xs[r], ws[r], ids[r]


def _scenario(kind: str, mgr, r: int, bad: bool, world: int) -> None:
    """Run scenario `kind` on this rank (`bad`: the misbehaving one); raise what it raises."""
    x, w, ids = _inputs(r, world, 3)
    ident = lambda e, q: q  # noqa: E731
    if kind == "bad ids in dispatch":
        if bad:
            ids = ids.clone()
            ids[0, 0] = E
        mgr.dispatch(x, w, ids, num_experts=E)
        return
    res = mgr.dispatch(x, w, ids, num_experts=E)
    if kind == "wrong expert_out shape":
        out = apply_experts(res, ident)
        mgr.combine(out[:, :-1] if bad else out, res)
    elif kind == "less precise expert_out":
        out = apply_experts(res, ident)
        mgr.combine(out.bfloat16() if bad else out, res)
    elif kind == "experts step raises":
        def fn(e, q):
            if bad:
                raise ArithmeticError("expert blew up")
            return q
        mgr.combine(apply_experts(res, fn), res)
    elif kind == "skipped combine":
        if bad:
            mgr.dispatch(x, w, ids, num_experts=E)
        else:
            mgr.combine(apply_experts(res, ident), res)
    elif kind == "combine after destroy":
        out = apply_experts(res, ident)
        if bad:
            mgr.destroy()
        mgr.combine(out, res)
    elif kind == "stale result":
        mgr.combine(apply_experts(res, ident), res)
        newer = mgr.dispatch(x, w, ids, num_experts=E)
        stale = res if bad else newer
        mgr.combine(apply_experts(stale, ident), stale)
    elif kind == "results swapped":
        second = mgr.dispatch(x, w, ids, num_experts=E)
        first_res, then = (second, res) if bad else (res, second)
        mgr.combine(apply_experts(first_res, ident), first_res)
        mgr.combine(apply_experts(then, ident), then)
    else:
        raise AssertionError(kind)


SCENARIOS = ("bad ids in dispatch", "wrong expert_out shape", "less precise expert_out",
             "experts step raises", "skipped combine", "combine after destroy", "stale result",
             "results swapped")


def _misuse(info, managers) -> list[tuple]:
    group = GroupCoordinator([list(range(info.world_size))], "ep")
    r, world = info.rank, info.world_size
    bad = r == world - 1
    rows = []
    experts = make_scaling_experts(E, H, seed=1)
    first = placement_ranges(E, world)[r].start
    try:
        for name, options in managers:
            for kind in SCENARIOS:
                mgr = build_manager(name, group, **options)
                group.barrier()
                start = time.monotonic()
                try:
                    _scenario(kind, mgr, r, bad, world)
                    outcome = ("none", "")
                except Exception as exc:  # noqa: BLE001 - the outcome is the result
                    outcome = (type(exc).__name__, str(exc))
                elapsed = time.monotonic() - start
                # Does the manager still work, or say why not? A new one must work.
                x, w, ids = _inputs(r, world, 9)
                try:
                    res = mgr.dispatch(x, w, ids, num_experts=E)
                    y = mgr.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
                    still = "works" if torch.allclose(y, reference_moe(x, w, ids, experts),
                                                      atol=1e-5) else "WRONG"
                except RemoteInputError as exc:
                    # This rank's manager is fine; the misbehaving rank's says it is not.
                    still = "peer unusable" if exc.bad_ranks == (world - 1,) else f"error: {exc}"
                except Exception as exc:  # noqa: BLE001 - checked in the parent
                    said = isinstance(exc, RuntimeError) and any(
                        w in str(exc) for w in ("unusable", "destroyed", "aborted the group"))
                    still = "unusable" if said else f"error: {type(exc).__name__}: {exc}"
                mgr.destroy()
                fresh = build_manager(name, group, **options)
                res = fresh.dispatch(x, w, ids, num_experts=E)
                y = fresh.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
                fresh_ok = torch.allclose(y, reference_moe(x, w, ids, experts), atol=1e-5)
                fresh.destroy()
                rows.append((f"{name}{options or ''}", kind, r, bad, *outcome, elapsed, still,
                             fresh_ok))
    finally:
        group.destroy()
    return rows


# Allowed outcomes (exception type names) per scenario, for the bad rank and for the others.
EXPECTED = {
    "bad ids in dispatch": ({"ValueError"}, {"RemoteInputError"}),
    "wrong expert_out shape": ({"ValueError"}, {"RemoteInputError"}),
    "less precise expert_out": ({"TypeError"}, {"RemoteInputError"}),
    "experts step raises": ({"ArithmeticError"}, {"RemoteInputError"}),
    "skipped combine": ({"CallMismatchError", "ShmError"}, {"CallMismatchError", "ShmError"}),
    "combine after destroy": ({"RuntimeError"}, {"RemoteInputError", "ShmError"}),
    "stale result": ({"ValueError"}, {"RemoteInputError", "ShmError"}),
    "results swapped": ({"CallMismatchError", "ShmError"}, {"CallMismatchError", "ShmError"}),
}


@pytest.mark.parametrize("world", [2, 3])
def test_misuse_fails_every_rank_promptly(dist_pool, world):
    results = dist_pool(world).run(_misuse, PORTABLE_MANAGERS, timeout=600)
    lines = [f"W={world}: manager | scenario | rank | raised | seconds | manager after"]
    for rows in results:
        for name, kind, rank, bad, exc_type, message, elapsed, still, fresh_ok in rows:
            where = f"{name}, {kind}, rank {rank}: {exc_type}: {message}"
            lines.append(f"{name} | {kind} | {rank}{' (bad)' if bad else ''} | {exc_type} | "
                         f"{elapsed:.3f} | {still}")
            want = EXPECTED[kind][0 if bad else 1]
            assert exc_type in want, where
            assert elapsed < LIMIT_S, where
            assert fresh_ok, f"{where}: a new manager on the group gave a wrong result"
            assert still in ("works", "unusable", "peer unusable"), f"{where}: afterwards {still}"
            if exc_type == "RemoteInputError":
                assert f"rank(s) {world - 1}" in message, where
    print("\n".join(lines))


def test_error_types_are_exported():
    assert issubclass(RemoteInputError, ValueError)
    assert issubclass(CallMismatchError, RuntimeError)


def _stalled_peer(info, name):
    """The last rank builds the manager, then never joins the dispatch: over gloo the others
    get an error naming the group, the rank and its timeout within that timeout, and the group
    (so the manager) refuses further calls at once instead of deadlocking."""
    group = GroupCoordinator([list(range(info.world_size))], "ep_gloo", use_shm=False,
                             timeout_s=2.0)
    try:
        mgr = build_manager(name, group)
        if info.rank == info.world_size - 1:
            time.sleep(4.0)  # past the timeout; then leave without a collective
            return None
        x, w, ids = _inputs(info.rank, info.world_size, 3)
        start = time.monotonic()
        try:
            mgr.dispatch(x, w, ids, num_experts=E)
            return ("none", "", 0.0, "", "")
        except Exception as exc:  # noqa: BLE001 - checked in the parent
            first = (type(exc).__name__, str(exc), time.monotonic() - start,
                     type(exc.__cause__).__name__)
        start = time.monotonic()
        try:
            mgr.dispatch(x, w, ids, num_experts=E)
            after = "works"
        except RuntimeError as exc:
            after = str(exc)
        return (*first, after, time.monotonic() - start)
    finally:
        group.destroy()


@pytest.mark.parametrize("name", ["naive", "alltoallv"])
def test_stalled_peer_over_gloo_times_out_in_the_groups_terms(name):
    # Fresh processes: a gloo group that timed out leaves torn pairs; keep it off the pool.
    exc_type, message, elapsed, cause, after, after_s = run_distributed(
        2, _stalled_peer, name, timeout=120)[0]
    assert exc_type == cause, (exc_type, cause, message)  # gloo's own type, chained
    assert "group 'ep_gloo' (rank 0 of 2, global rank 0)" in message, message
    assert "unreachable, dead or stalled past the group's timeout (2 s)" in message, message
    assert elapsed < LIMIT_S, elapsed
    assert "is unusable" in after and "stalled past" in after and after_s < 1.0, after


def _different_managers(info, names, use_shm):
    """Rank r builds `names[r]` (every rank must raise); then a manager that every rank builds
    must still work on the same group."""
    group = GroupCoordinator([list(range(info.world_size))], "ep_mixed", use_shm=use_shm)
    start = time.monotonic()
    try:
        mgr = build_manager(names[info.rank], group)
    except Exception as exc:  # noqa: BLE001 - checked in the parent
        outcome = (type(exc).__name__, str(exc), time.monotonic() - start)
    else:
        outcome = ("built", "", time.monotonic() - start)
        mgr.destroy()
    # The group itself is still usable: a manager every rank builds works on it.
    experts = make_scaling_experts(E, H, seed=1)
    first = placement_ranges(E, info.world_size)[info.rank].start
    mgr = build_manager("naive", group)
    x, w, ids = _inputs(info.rank, info.world_size, 3)
    res = mgr.dispatch(x, w, ids, num_experts=E)
    y = mgr.combine(apply_experts(res, lambda e, rows: experts[first + e](rows)), res)
    group.destroy()
    return (*outcome, torch.allclose(y, reference_moe(x, w, ids, experts), atol=1e-5))


@pytest.mark.parametrize("names, use_shm", [
    (("naive", "alltoallv"), False),  # over gloo mismatched collectives used to abort
    (("alltoallv", "allgather_reducescatter"), True),
    (("shm", "alltoallv"), True),
    (("naive", "shm"), True),
])
def test_ranks_that_build_different_managers_all_raise(dist_pool, names, use_shm):
    """Issue 9, defect 3: no abort, no hang; every rank's error lists every rank's manager."""
    for exc_type, message, elapsed, group_ok in dist_pool(2).run(
            _different_managers, names, use_shm, timeout=120):
        assert exc_type == "CallMismatchError", (exc_type, message)
        assert f"rank 0: {names[0]} " in message and f"rank 1: {names[1]} " in message, message
        assert elapsed < LIMIT_S, elapsed
        assert group_ok
