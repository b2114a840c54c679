"""The dispatch / combine contract for every portable manager (naive, agrs, alltoallv, shm).

Scenario builders and the independent references live in `moe_ep.testing.scenarios`: every
rank builds every rank's input from a seed, so the expected outputs (reference MoE, routing
counts, received rows) are computed on each rank from the global data with plain torch and
Python loops that share no code with the managers. Each contract case runs through a handle
(`get_handle(EPSpec(...))`) and through the call without one. Many cases run inside one
distributed call per world size (spawning ranks is slow on 2 cores).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_ep.distributed import GroupCoordinator
from moe_ep.managers import (
    DispatchResult,
    EPSpec,
    Layout,
    RemoteInputError,
    apply_experts,
    build_manager,
    expert_placement,
)
from moe_ep.testing.reference import make_linear_experts, reference_moe
from moe_ep.testing.scenarios import (
    ATOL,
    CONSISTENCY_ERRORS,
    LOCAL_ERRORS,
    PORTABLE_MANAGERS,
    assert_contract,
    bad_case,
    contract_cases,
    decodable_inputs,
    placement_ranges,
    tokens_per_rank,
)

NUM_EXPERTS = (4, 8, 10)
TOPK = (1, 2, 6)
DTYPES = (torch.float32, torch.bfloat16)
HIDDEN = 32
GATHER_ALL = ("naive", "allgather_reducescatter")


def _group(info, use_shm: bool = True) -> GroupCoordinator:
    return GroupCoordinator([list(range(info.world_size))], "ep", use_shm=use_shm)


def _contract(info, managers, num_experts, topk, dtypes, use_shm, use_handles):
    group = _group(info, use_shm)
    try:
        return contract_cases(group, managers, num_experts, topk, dtypes, hidden=HIDDEN,
                              use_handles=use_handles)
    finally:
        group.destroy()


@pytest.mark.parametrize("use_handles", [False, True], ids=["no-handle", "handle"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_contract_matches_reference(dist_pool, world, use_handles):
    results = dist_pool(world).run(
        _contract, PORTABLE_MANAGERS, NUM_EXPERTS, TOPK, DTYPES, True, use_handles, timeout=300
    )
    want = len(PORTABLE_MANAGERS) * len(NUM_EXPERTS) * len(TOPK) * len(DTYPES)
    assert len(results[0]) == want
    assert_contract(results)


@pytest.mark.parametrize("world", [2, 4])
def test_contract_over_plain_gloo(dist_pool, world):
    """The same contract when the group's collectives go through gloo (the shm manager still
    exchanges through its own segments)."""
    results = dist_pool(world).run(_contract, PORTABLE_MANAGERS, (10,), (2, 6), DTYPES, False,
                                   True, timeout=180)
    assert_contract(results)


# ------------------------------------------------------------------------ decodable worker


def _expected_bytes(name, options, r, counts, ids, num_experts, topk, hidden, elem):
    """Bytes rank r sends in dispatch and combine, by counting routes in Python."""
    world = len(counts)
    owner = {}
    for q, experts in enumerate(placement_ranges(num_experts, world)):
        for e in experts:
            owner[e] = q
    row = hidden * elem
    if world == 1:
        return 0, 0
    sent_rows = recv_rows = 0
    dedup = options.get("dedup", True)
    for s, ids_s in enumerate(ids):
        for token in ids_s.tolist():
            dests = [owner[e] for e in token if e >= 0]
            if s == r:
                remote = [d for d in dests if d != r]
                sent_rows += len(set(remote)) if dedup else len(remote)
            elif r in dests:
                recv_rows += 1 if dedup else dests.count(r)
    if name == "shm":
        # One control header (seq, error, tokens, counts[W]) and one error word, each read by
        # W-1 peers; rows carry int64 ids and float32 weights.
        header = (world - 1) * 8 * (3 + world)
        return header + sent_rows * (row + 12 * topk), (world - 1) * 8 + recv_rows * row
    # Every dispatch and combine of the group managers all-gathers an int64 header.
    header = (world - 1) * 8 * (13 + 2 * world)
    meta = 8 * topk  # int32 ids + float32 weights per row
    if name == "alltoallv":
        return header + sent_rows * (row + meta), header + recv_rows * row
    if name == "allgather_reducescatter":
        dispatch = header + (world - 1) * counts[r] * (row + meta)
        combine = header + sum(n for q, n in enumerate(counts) if q != r) * row
        return dispatch, combine
    if name == "naive":
        dispatch = header + (world - 1) * counts[r] * (row + meta)
        combine = header + 2 * (world - 1) * sum(counts) * row // world
        return dispatch, combine
    raise AssertionError(name)


def _decodable(info) -> list[tuple]:
    """Received rows identify sender and token; counts, ids, weights and bytes match."""
    group = _group(info)
    r, world = info.rank, info.world_size
    report = []
    try:
        for name, options in PORTABLE_MANAGERS:
            mgr = build_manager(name, group, **options)
            for c, (num_experts, topk, dtype) in enumerate(
                itertools.product((4, 10), (2, 6), (torch.float32, torch.bfloat16))
            ):
                counts = tokens_per_rank(world, c)
                xs, ws, ids = decodable_inputs(counts, num_experts, topk, 77 + c, dtype)
                mine = placement_ranges(num_experts, world)[r]
                res = mgr.dispatch(xs[r], ws[r], ids[r], num_experts=num_experts)
                what = f"{name}{options} E={num_experts} K={topk} {dtype} counts={counts}"
                assert isinstance(res, DispatchResult) and res.layout is mgr.layout, what

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
                if res.layout is Layout.TOKEN:
                    # Gather-all: every token of every rank; shm: the tokens with an expert
                    # here, in (source, token) order.
                    rows = [
                        (s, t) for s in range(world) for t in range(counts[s])
                        if name in GATHER_ALL or any(e in mine for e in ids[s][t].tolist())
                    ]
                    assert decoded[:, :-1].tolist() == [[float(s)] * 7 for s, _ in rows], what
                    assert decoded[:, -1].tolist() == [float(t) for _, t in rows], what
                    got = sorted(
                        (s, t, le, w)
                        for (s, t), lids, wts in zip(
                            rows, res.topk_ids.tolist(), res.topk_weights.tolist(), strict=True
                        )
                        for le, w in zip(lids, wts, strict=True)
                        if le >= 0
                    )
                    # Slots of other ranks' experts carry id -1 and weight 0.
                    assert (res.topk_weights[res.topk_ids < 0] == 0).all(), what
                else:
                    senders = decoded[:, 0].tolist()
                    assert (decoded[:, :-1] == decoded[:, :1]).all(), what
                    got = sorted(
                        (int(s), int(t), le, w)
                        for s, t, le, w in zip(
                            senders, decoded[:, -1].tolist(), res.topk_ids.tolist(),
                            res.topk_weights.tolist(), strict=True,
                        )
                    )
                    # Rows are grouped by local expert, in (source, token) order within one.
                    keys = list(zip(res.topk_ids.tolist(), senders, decoded[:, -1].tolist(),
                                    strict=True))
                    assert keys == sorted(keys), what
                assert got == pairs, what

                # Identity experts: combine returns sum of the weights of valid ids times x.
                y = mgr.combine(apply_experts(res, lambda e, rows_: rows_), res)
                w_sum = torch.where(ids[r] >= 0, ws[r], 0).sum(dim=1, keepdim=True)
                want = (xs[r].float() * w_sum).to(dtype).float()
                tol = ATOL[dtype] * 50 if dtype == torch.bfloat16 else 1e-5
                assert torch.allclose(y.float(), want, atol=tol, rtol=1e-2), what

                got_bytes = (mgr.last_dispatch_bytes.total, mgr.last_combine_bytes.total)
                want_bytes = _expected_bytes(
                    name, options, r, counts, ids, num_experts, topk, 8, xs[r].element_size()
                )
                assert got_bytes == want_bytes, (what, got_bytes, want_bytes)
                sent = sum(
                    b.payload for b in (mgr.last_dispatch_bytes, mgr.last_combine_bytes)
                )
                report.append((name, tuple(options.items()), c, sent))
            mgr.destroy()
    finally:
        group.destroy()
    return report


@pytest.mark.parametrize("world", [1, 2, 4])
def test_decodable_rows_counts_and_bytes(dist_pool, world):
    results = dist_pool(world).run(_decodable, timeout=240)
    if world == 1:
        return
    # Rows summed over ranks: alltoallv never moves more than agrs and moves strictly less
    # over all cases; naive moves the most; dedup helps; shm moves alltoallv's rows.
    totals: dict[tuple, int] = {}
    for report in results:
        for name, options, case, sent in report:
            key = (name, options, case)
            totals[key] = totals.get(key, 0) + sent
    cases = sorted({case for _, _, case in totals})
    a2av = [totals[("alltoallv", (), c)] for c in cases]
    a2av_nodedup = [totals[("alltoallv", (("dedup", False),), c)] for c in cases]
    agrs = [totals[("allgather_reducescatter", (), c)] for c in cases]
    naive = [totals[("naive", (), c)] for c in cases]
    shm = [totals[("shm", (), c)] for c in cases]
    assert all(a <= b for a, b in zip(a2av, agrs, strict=True)), (a2av, agrs)
    assert sum(a2av) < sum(agrs), (a2av, agrs)
    assert all(a <= b for a, b in zip(a2av, a2av_nodedup, strict=True))
    assert sum(a2av) < sum(a2av_nodedup)
    assert all(a > b for a, b in zip(naive, agrs, strict=True)), (naive, agrs)
    assert shm == a2av


# --------------------------------------------------------------------------- bad inputs


def _bad_inputs(info, managers, use_handles) -> list[tuple]:
    """Each scenario on each manager: record what every rank raised, then prove the group is
    still in step with a valid round trip."""
    group = _group(info)
    r, world = info.rank, info.world_size
    bad = world - 1
    seen = []
    kinds = list(LOCAL_ERRORS) + (list(CONSISTENCY_ERRORS) if world > 1 else [])
    experts = make_linear_experts(8, HIDDEN, seed=3)
    first = placement_ranges(8, world)[r].start
    spec = EPSpec(hidden=HIDDEN, num_experts=8, topk=2, max_tokens_per_rank=16,
                  dtype=torch.float32)
    try:
        for name, options in managers:
            mgr = build_manager(name, group, **options)
            handle = mgr.get_handle(spec) if use_handles else None
            for kind in kinds:
                x, w, ids, num_experts = bad_case(kind, r, bad, world)
                try:
                    mgr.dispatch(x, w, ids, handle=handle, num_experts=num_experts)
                except Exception as exc:  # noqa: BLE001 - recorded, checked in the parent
                    seen.append(
                        (name, kind, type(exc).__name__, str(exc), getattr(exc, "bad_ranks", None))
                    )
                else:
                    seen.append((name, kind, None, "", None))
                # Still in step: a valid round trip right after.
                x, w, ids, num_experts = bad_case("none", r, bad, world)
                res = mgr.dispatch(x, w, ids, handle=handle, num_experts=num_experts)
                y = mgr.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
                assert torch.allclose(y, reference_moe(x, w, ids, experts), atol=1e-5), kind

            # Non-contiguous inputs are handled: same result as their contiguous copies.
            x, w, ids, num_experts = bad_case("none", r, bad, world)
            wide = torch.zeros(x.shape[0], 2 * HIDDEN)
            wide[:, ::2] = x
            res = mgr.dispatch(wide[:, ::2], w.t().contiguous().t(), ids.t().contiguous().t(),
                               handle=handle, num_experts=num_experts)
            y = mgr.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
            assert torch.allclose(y, reference_moe(x, w, ids, experts), atol=1e-5)

            # A wrong expert output shape fails the combine on every rank (all ranks pass a
            # wrong one here) and consumes the result: combining it again fails everywhere.
            res = mgr.dispatch(x, w, ids, handle=handle, num_experts=num_experts)
            try:
                mgr.combine(res.x[:, :-1], res)
            except ValueError as exc:
                assert "expert_out must be" in str(exc)
            else:
                raise AssertionError("combine accepted a wrong expert_out shape")
            try:
                mgr.combine(apply_experts(res, lambda e, q: q), res)
            except ValueError as exc:
                assert "already combined" in str(exc)
            else:
                raise AssertionError("a consumed result was combined again")

            # Destroyed managers refuse to work; destroy is idempotent.
            mgr.destroy()
            mgr.destroy()
            try:
                mgr.dispatch(x, w, ids, handle=handle, num_experts=num_experts)
            except RuntimeError as exc:
                assert "destroyed" in str(exc)
            else:
                raise AssertionError("a destroyed manager dispatched")
    finally:
        group.destroy()
    return seen


# With a handle, a shape that disagrees with the EPSpec is the bad rank's own error.
SPEC_ERRORS = {
    "hidden_differs": (ValueError, "(EPSpec.hidden)"),
    "dtype_differs": (TypeError, "(EPSpec.dtype)"),
    "num_experts_differs": (ValueError, "disagrees with the handle's EPSpec.num_experts"),
    "topk_differs": (ValueError, "(EPSpec.topk)"),
    "x_1d": (ValueError, "x must be [num_tokens, 32] (EPSpec.hidden)"),
    "int_x": (TypeError, "x must be torch.float32 (EPSpec.dtype)"),
    "fp8_x": (TypeError, "x must be torch.float32 (EPSpec.dtype)"),
}


@pytest.mark.parametrize("use_handles", [False, True], ids=["no-handle", "handle"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_bad_inputs_raise_on_every_rank(dist_pool, world, use_handles):
    results = dist_pool(world).run(_bad_inputs, PORTABLE_MANAGERS, use_handles, timeout=300)
    bad = world - 1
    for rank, seen in enumerate(results):
        for name, kind, exc_type, message, bad_ranks in seen:
            where = f"rank {rank}, {name}, {kind}: {exc_type}: {message}"
            assert exc_type is not None, f"{where}: no error raised"
            local = dict(LOCAL_ERRORS, **SPEC_ERRORS) if use_handles else LOCAL_ERRORS
            if kind in CONSISTENCY_ERRORS and not use_handles:
                assert exc_type == "ValueError" and CONSISTENCY_ERRORS[kind] in message, where
                assert f"rank {bad}:" in message, where
            elif rank == bad:
                want_type, fragment = local[kind]
                assert exc_type == want_type.__name__ and fragment in message, where
            else:
                assert exc_type == RemoteInputError.__name__, where
                assert bad_ranks == (bad,) and f"rank(s) {bad} passed invalid input" in message
                assert local[kind][0].__name__ in message, where


# --------------------------------------------------------------- gather-all router logits


def _router_logits(info) -> list[str]:
    group = _group(info)
    r, world = info.rank, info.world_size
    counts = tokens_per_rank(world, 1)
    gen = torch.Generator().manual_seed(9)
    # Small integers: every partial sum below is exact in bf16, so equality is exact.
    xs = [torch.randint(-8, 8, (n, HIDDEN), generator=gen).bfloat16() for n in counts]
    logits = [torch.randn(n, 5, generator=gen) for n in counts]
    done = []
    try:
        for name in ("naive", "agrs"):
            mgr = build_manager(name, group)
            got = mgr.dispatch_router_logits(xs[r], logits[r])
            assert torch.equal(got.x, torch.cat(xs)) and got.x.dtype == torch.bfloat16
            assert torch.equal(got.router_logits, torch.cat(logits))
            assert got.tokens_per_rank == tuple(counts)
            # Every rank contributes (rank + 1) * x_all; the owner gets the sum back.
            y = mgr.combine((got.x.float() * (r + 1)).bfloat16(), got)
            factor = world * (world + 1) // 2
            assert torch.equal(y, (xs[r].float() * factor).bfloat16()), name
            try:
                mgr.dispatch_router_logits(xs[r], logits[r][:, :4] if r == world - 1 else logits[r])
            except ValueError as exc:
                assert "number of router logits" in str(exc) or "rank(s)" in str(exc)
            else:
                assert world == 1, "mismatched router logits went through"
            mgr.destroy()
            done.append(name)
        alltoallv = build_manager("alltoallv", group)
        try:
            alltoallv.dispatch_router_logits(xs[r], logits[r])
        except NotImplementedError as exc:
            assert "gather-all" in str(exc)
            done.append("alltoallv refuses")
        alltoallv.destroy()
    finally:
        group.destroy()
    return done


@pytest.mark.parametrize("world", [1, 4])
def test_dispatch_router_logits(dist_pool, world):
    results = dist_pool(world).run(_router_logits, timeout=60)
    assert all(done == ["naive", "agrs", "alltoallv refuses"] for done in results)


# --------------------------------------------------------- single-process unit properties


@pytest.mark.parametrize(
    "num_experts,world", [(e, w) for e in (1, 3, 8, 10, 64) for w in (1, 2, 3, 4, 8)]
)
def test_expert_placement_contiguous(num_experts, world):
    p = expert_placement(num_experts, world)
    want = placement_ranges(num_experts, world)
    assert [p.local_range(r) for r in range(world)] == want
    assert sum(p.counts) == num_experts and p.max_local == max(len(x) for x in want)
    ids = torch.arange(-1, num_experts).unsqueeze(0)
    owners = p.owners(ids)[0].tolist()
    assert owners[0] == -1
    for e, q in zip(range(num_experts), owners[1:], strict=True):
        assert e in want[q]
        assert p.to_local(ids, q)[0, e + 1].item() == e - want[q].start
        others = [s for s in range(world) if s != q]
        assert all(p.to_local(ids, s)[0, e + 1].item() == -1 for s in others)
    assert p.owner_cpu.tolist() == owners[1:]
    assert p.local_index_cpu.tolist() == [e - want[q].start for e, q in enumerate(owners[1:])]
    assert torch.equal(p.local_table("cpu"), p.local_index_cpu)
    # One shared placement per shape: managers ask for it on every call.
    assert expert_placement(num_experts, world) is p
    assert p.owner_table("cpu") is p.owner_table(torch.device("cpu"))


def test_expert_placement_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        expert_placement(0, 2)
    with pytest.raises(TypeError, match="ep_size must be an int"):
        expert_placement(4, 2.0)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        expert_placement(True, 2)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        expert_placement([4], 2)


def _manual_result(layout: Layout) -> tuple[DispatchResult, torch.Tensor]:
    """A hand-built result for each layout and the expected expert output (loops)."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([2.0, -1.0, 0.5])
    if layout is Layout.TOKEN:
        x = torch.randn(4, 3, generator=gen)
        ids = torch.tensor([[0, 2], [-1, 1], [-1, -1], [2, 1]])
        w = torch.tensor([[0.5, 0.25], [0.0, 1.0], [0.0, 0.0], [0.3, 0.7]])
        want = torch.zeros(4, 3)
        for m in range(4):
            for k in range(2):
                if ids[m, k] >= 0:
                    want[m] += w[m, k] * x[m] * scale[ids[m, k]]
        counts = torch.tensor([1, 2, 2])
        return DispatchResult(layout, x, None, ids, w, counts, None), want
    if layout is Layout.EXPERT_PACKED:
        x = torch.randn(5, 3, generator=gen)
        counts = torch.tensor([2, 0, 3])
        want = torch.cat([x[:2] * scale[0], x[2:] * scale[2]])
        return DispatchResult(layout, x, None, None, None, counts, None), want
    x = torch.randn(3, 4, 3, generator=gen)
    counts = torch.tensor([1, 4, 0])
    want = torch.zeros_like(x)
    want[0, :1] = x[0, :1] * scale[0]
    want[1] = x[1] * scale[1]
    return DispatchResult(layout, x, None, None, None, counts, None), want


@pytest.mark.parametrize("layout", list(Layout))
def test_apply_experts_layouts(layout):
    result, want = _manual_result(layout)
    scale = torch.tensor([2.0, -1.0, 0.5])
    calls = []

    def fn(e, rows):
        calls.append(e)
        return rows * scale[e]

    out = apply_experts(result, fn)
    assert out.shape == result.x.shape and out.dtype == result.x.dtype
    assert torch.allclose(out, want, atol=1e-6)
    empty = [e for e, n in enumerate(result.tokens_per_expert.tolist()) if n == 0]
    assert not set(calls) & set(empty), "an expert with no rows was called"


def test_apply_experts_keeps_float64_precision():
    """fp64 rows are summed in fp64 (a float32 sum would lose these 1e-12 differences)."""
    x = torch.tensor([[1.0 + 1e-12, 1.0], [3.0, 4.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 1], [1, -1]])
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    res = DispatchResult(Layout.TOKEN, x, None, ids, w, torch.tensor([1, 2]), None)
    out = apply_experts(res, lambda e, rows: rows * (e + 1) / 3)
    want = torch.stack([0.5 * x[0] / 3 + 0.5 * x[0] * 2 / 3, x[1] * 2 / 3])
    assert out.dtype == torch.float64
    assert torch.equal(out, want) or (out - want).abs().max() < 1e-15


def test_apply_experts_rejects_bad_expert_output():
    result, _ = _manual_result(Layout.EXPERT_PACKED)
    with pytest.raises(ValueError, match="local expert 0 must return a tensor of shape"):
        apply_experts(result, lambda e, rows: rows[:, :2])
    with pytest.raises(TypeError, match="DispatchResult"):
        apply_experts(object(), lambda e, rows: rows)


def test_grad_message_names_the_tensors_that_require_grad():
    from moe_ep.managers.inputs import check_dispatch

    spec = EPSpec(hidden=4, num_experts=4, topk=2, dtype=torch.float32)
    x, w, ids = torch.randn(3, 4), torch.rand(3, 2), torch.tensor([[0, 1]] * 3)
    cases = ((x.clone().requires_grad_(), w, "x requires grad"),
             (x, w.clone().requires_grad_(), "topk_weights requires grad"))
    for xx, ww, fragment in cases:
        with pytest.raises(ValueError, match=fragment):
            check_dispatch(spec, xx, ww, ids, None, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="x and topk_weights require grad"):
        check_dispatch(spec, x.clone().requires_grad_(), w.clone().requires_grad_(), ids, None,
                       device=torch.device("cpu"))
    with torch.no_grad():
        check_dispatch(spec, x.clone().requires_grad_(), w, ids, None, device=torch.device("cpu"))


def test_wire_rows_round_trip_for_odd_hidden_and_one_token():
    """The old wire format crashed on bf16 / fp16 with an odd hidden size and one row (an
    int32 view at an odd byte offset); every field must come back bit for bit."""
    from moe_ep.managers.group_exchange import pack_rows, unpack_rows

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for n in (0, 1, 3):
            x = torch.randn(n, 7).to(dtype)
            ids = torch.randint(-1, 5, (n, 3))
            w = torch.rand(n, 3)
            s = torch.rand(n, 2)
            got = unpack_rows(pack_rows(x, ids, w, s), 7, dtype, 3, 2)
            for a, b in zip(got, (x, ids, w, s), strict=True):
                assert torch.equal(a, b), (dtype, n)


def _identity_outputs(info) -> list[str]:
    from moe_ep.bench.dispatch_latency import identity_experts

    group = _group(info)
    r, world = info.rank, info.world_size
    done = []
    try:
        for name, options in PORTABLE_MANAGERS:
            mgr = build_manager(name, group, **options)
            xs, ws, ids = decodable_inputs(tokens_per_rank(world, 3), 8, 3, 5, torch.float32)
            res = mgr.dispatch(xs[r], ws[r], ids[r], num_experts=8)
            want = apply_experts(res, lambda e, q: q)
            assert torch.allclose(identity_experts(res), want, atol=1e-6), name
            mgr.combine(want, res)
            mgr.destroy()
            done.append(name)
    finally:
        group.destroy()
    return done


def test_benchmark_identity_experts_equal_apply_experts(dist_pool):
    """The benchmark's fast identity experts give apply_experts' output on every layout."""
    assert all(len(d) == len(PORTABLE_MANAGERS) for d in dist_pool(2).run(_identity_outputs,
                                                                          timeout=120))
