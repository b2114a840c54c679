"""The ``shm`` manager against the properties the portable managers are held to.

The contract cases (W in {1, 2, 4}, E in {4, 8, 10}, topk in {1, 2, 6}, uneven tokens with 0 on
one rank, -1 ids, fp32 / bf16, dispatch -> apply_experts -> combine vs reference_moe) and the
scenario builders are those of tests/test_managers.py, reused as they are; the decodable-data
and bad-input workers below apply the same checks to ``shm``, whose routing equals
deduplicated ``alltoallv`` (so its byte counts are alltoallv's minus the header's split sizes).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from test_managers import (
    ATOL,
    CONSISTENCY_ERRORS,
    DTYPES,
    HIDDEN,
    LOCAL_ERRORS,
    NUM_EXPERTS,
    TOPK,
    _assert_contract,
    _bad_case,
    _contract,
    _decodable_inputs,
    _expected_bytes,
    _group,
    _placement,
    _tokens_per_rank,
)

from moe_ep.distributed import GroupCoordinator
from moe_ep.distributed.shm import ShmCommunicator
from moe_ep.distributed.topology import Topology
from moe_ep.managers import (
    Layout,
    ManagerUnavailableError,
    RemoteInputError,
    apply_experts,
    available_managers,
    build_manager,
)
from moe_ep.testing.reference import make_linear_experts, reference_moe

pytestmark = pytest.mark.skipif(
    not ShmCommunicator.available()[0], reason=ShmCommunicator.available()[1]
)

SHM = (("shm", {}),)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_contract_matches_reference(dist_pool, world):
    results = dist_pool(world).run(_contract, SHM, NUM_EXPERTS, TOPK, DTYPES, True, timeout=240)
    assert len(results[0]) == len(NUM_EXPERTS) * len(TOPK) * len(DTYPES)
    _assert_contract(results)


@pytest.mark.parametrize("world", [2, 4])
def test_contract_with_its_own_segment(dist_pool, world):
    """A group without shared memory: the manager maps a segment of its own."""
    results = dist_pool(world).run(_contract, SHM, (10,), (2, 6), DTYPES, False, timeout=120)
    _assert_contract(results)


def _decodable(info) -> list[tuple]:
    """Received rows identify sender and token; counts, ids, weights and bytes match."""
    group = _group(info)
    r, world = info.rank, info.world_size
    mgr = build_manager("shm", group)
    seen = []
    try:
        assert mgr.layout is Layout.EXPERT_PACKED
        cases = itertools.product((4, 10), (2, 6), (torch.float32, torch.bfloat16))
        for c, (num_experts, topk, dtype) in enumerate(cases):
            counts = _tokens_per_rank(world, c)
            xs, ws, ids = _decodable_inputs(counts, num_experts, topk, 77 + c, dtype)
            mine = _placement(num_experts, world)[r]
            res = mgr.dispatch(xs[r], ws[r], ids[r], num_experts=num_experts)
            what = f"E={num_experts} K={topk} {dtype} counts={counts}"
            # Independent expectation: (sender, token, local expert, weight) per pair.
            pairs = sorted(
                (s, t, e - mine.start, float(ws[s][t, k]))
                for s in range(world)
                for t in range(counts[s])
                for k, e in enumerate(ids[s][t].tolist())
                if e in mine
            )
            per_expert = [sum(1 for p in pairs if p[2] == le) for le in range(len(mine))]
            assert res.tokens_per_expert.tolist() == per_expert, what
            decoded = res.x.float()
            assert (decoded[:, :-1] == decoded[:, :1]).all(), what
            got = sorted(
                (int(s), int(t), le, w)
                for s, t, le, w in zip(
                    decoded[:, 0].tolist(), decoded[:, -1].tolist(), res.topk_ids.tolist(),
                    res.topk_weights.tolist(), strict=True,
                )
            )
            assert got == pairs, what
            assert res.topk_ids.tolist() == sorted(res.topk_ids.tolist()), what
            # Within an expert, rows come in (source rank, token) order.
            keys = list(zip(res.topk_ids.tolist(), decoded[:, 0].tolist(), decoded[:, -1].tolist()))
            assert keys == sorted(keys), what

            y = mgr.combine(apply_experts(res, lambda e, rows_: rows_), res)
            w_sum = torch.where(ids[r] >= 0, ws[r], 0).sum(dim=1, keepdim=True)
            want = (xs[r].float() * w_sum).to(dtype).float()
            tol = ATOL[dtype] * 50 if dtype == torch.bfloat16 else 1e-5
            assert y.dtype == dtype and torch.allclose(y.float(), want, atol=tol, rtol=1e-2), what

            dispatch_bytes, combine_bytes = _expected_bytes(
                "alltoallv", {}, r, counts, ids, num_experts, topk, 8, xs[r].element_size()
            )
            if world > 1:
                dispatch_bytes -= (world - 1) * 4 * 2 * world  # alltoallv's split sizes
            got_bytes = (mgr.last_dispatch_bytes.total, mgr.last_combine_bytes.total)
            assert got_bytes == (dispatch_bytes, combine_bytes), (what, got_bytes)
            seen.append(what)
    finally:
        mgr.destroy()
        group.destroy()
    return seen


@pytest.mark.parametrize("world", [1, 2, 4])
def test_decodable_rows_counts_and_bytes(dist_pool, world):
    results = dist_pool(world).run(_decodable, timeout=180)
    assert all(len(seen) == 8 for seen in results)


def _large_and_matching(info) -> list[float]:
    """Far more rows than the manager's own small segment holds per step (many chunks each
    way); the dispatched rows and the combined output equal alltoallv's over gloo."""
    gloo = GroupCoordinator([list(range(info.world_size))], "ep_gloo", use_shm=False)
    r = info.rank
    errors = []
    shm_mgr = build_manager("shm", gloo, buffer_bytes=64 << 10)
    a2av = build_manager("alltoallv", gloo)
    try:
        for n, hidden, dtype in ((300, 2048, torch.bfloat16), (7, 4096, torch.float32)):
            gen = torch.Generator().manual_seed(10 + r)
            x = torch.randn(n, hidden, generator=gen).to(dtype)
            ids = torch.rand(n, 16, generator=gen).argsort(dim=1)[:, :4]
            w = torch.rand(n, 4, generator=gen)
            first = _placement(16, info.world_size)[r].start
            outs = []
            for mgr in (shm_mgr, a2av):
                res = mgr.dispatch(x, w, ids, num_experts=16)
                # Cheap experts that differ per global expert (big linear layers cost seconds).
                out = apply_experts(res, lambda e, q, f=first: q * (f + e + 1) - 0.5 * q.square())
                outs.append((res, mgr.combine(out, res)))
            (res_s, y_s), (res_a, y_a) = outs
            assert torch.equal(res_s.x, res_a.x) and torch.equal(res_s.topk_ids, res_a.topk_ids)
            assert torch.equal(res_s.tokens_per_expert, res_a.tokens_per_expert)
            errors.append((y_s.float() - y_a.float()).abs().max().item())
    finally:
        shm_mgr.destroy()
        a2av.destroy()
        gloo.destroy()
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_many_chunks_and_same_rows_as_alltoallv(dist_pool, world):
    results = dist_pool(world).run(_large_and_matching, timeout=180)
    for errs in results:
        assert errs[0] <= 2e-2 and errs[1] <= 1e-4, errs


def _bad_inputs(info) -> list[tuple]:
    """Each bad-input scenario: what every rank raised, then a valid round trip in step."""
    group = _group(info)
    r, world = info.rank, info.world_size
    bad = world - 1
    seen = []
    kinds = list(LOCAL_ERRORS) + (list(CONSISTENCY_ERRORS) if world > 1 else [])
    experts = make_linear_experts(8, HIDDEN, seed=3)
    first = _placement(8, world)[r].start
    mgr = build_manager("shm", group)
    try:
        for kind in kinds:
            x, w, ids, num_experts = _bad_case(kind, r, bad, world)
            try:
                mgr.dispatch(x, w, ids, num_experts=num_experts)
            except Exception as exc:  # noqa: BLE001 - recorded, checked in the parent
                seen.append((kind, type(exc).__name__, str(exc), getattr(exc, "bad_ranks", None)))
            else:
                seen.append((kind, None, "", None))
            x, w, ids, num_experts = _bad_case("none", r, bad, world)
            res = mgr.dispatch(x, w, ids, num_experts=num_experts)
            y = mgr.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
            assert torch.allclose(y, reference_moe(x, w, ids, experts), atol=1e-5), kind
        res = mgr.dispatch(x, w, ids, num_experts=num_experts)
        with pytest.raises(ValueError, match="expert_out must be"):
            mgr.combine(res.x[:, :-1], res)
        mgr.combine(apply_experts(res, lambda e, q: q), res)
        mgr.destroy()
        mgr.destroy()
        with pytest.raises(RuntimeError, match="destroyed"):
            mgr.dispatch(x, w, ids, num_experts=num_experts)
    finally:
        mgr.destroy()
        group.destroy()
    return seen


@pytest.mark.parametrize("world", [1, 2, 4])
def test_bad_inputs_raise_on_every_rank(dist_pool, world):
    results = dist_pool(world).run(_bad_inputs, timeout=180)
    bad = world - 1
    for rank, seen in enumerate(results):
        for kind, exc_type, message, bad_ranks in seen:
            where = f"rank {rank}, {kind}: {exc_type}: {message}"
            assert exc_type is not None, f"{where}: no error raised"
            if kind in CONSISTENCY_ERRORS:
                assert exc_type == "ValueError" and CONSISTENCY_ERRORS[kind] in message, where
            elif rank == bad:
                want_type, fragment = LOCAL_ERRORS[kind]
                assert exc_type == want_type.__name__ and fragment in message, where
            else:
                assert exc_type == RemoteInputError.__name__ and bad_ranks == (bad,), where


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
    with pytest.raises(TypeError, match="unexpected option"):
        build_manager("shm", _FakeGroup(), nope=1)
    with pytest.raises(ValueError, match="buffer_bytes"):
        build_manager("shm", _FakeGroup(), buffer_bytes=1000)


class _FakeGroup:
    """Enough of a one-rank group for option checks (no communication at W=1)."""

    world_size, rank_in_group, cpu_group, device, name, shm = 1, 0, None, "cpu", "fake", None


def test_unavailable_on_a_cuda_group():
    group = _FakeGroup()
    group.world_size, group.device = 2, "cuda"
    with pytest.raises(ManagerUnavailableError, match="CPU group"):
        build_manager("shm", group)


def _refusals(info) -> list[str]:
    """The manager's own segment when one rank lacks the native library, then when the ranks
    are on different nodes (simulated: the same-node probe answers per rank)."""
    from unittest import mock

    from moe_ep.distributed import group as group_module

    gloo = GroupCoordinator([list(range(info.world_size))], "ep_gloo", use_shm=False)
    seen = []
    try:
        missing = staticmethod(lambda: (False, "no native library (simulated)"))
        with mock.patch.object(ShmCommunicator, "available", missing) if info.rank == 1 \
                else contextlib.nullcontext():
            with pytest.raises(ManagerUnavailableError) as exc:
                build_manager("shm", gloo)
        seen.append(str(exc.value))
        apart = [r == 0 for r in range(info.world_size)]
        with mock.patch.object(group_module, "in_the_same_node_as", lambda g, s=0: apart):
            with pytest.raises(ManagerUnavailableError) as exc:
                build_manager("shm", gloo)
        seen.append(str(exc.value))
        mgr = build_manager("shm", gloo)  # the group is still usable
        mgr.destroy()
    finally:
        gloo.destroy()
    return seen


def test_own_segment_refused_alike_on_every_rank(dist_pool):
    """One rank without the library (or ranks on other nodes) makes every rank refuse at once,
    instead of leaving the others in the segment set-up until the timeout."""
    results = dist_pool(2).run(_refusals, timeout=60)
    for no_lib, apart in results:
        assert "rank 1: no native library (simulated)" in no_lib
        assert "ranks [1] are not on the node of rank 0" in apart
