"""The dispatch / combine contract for the portable managers (naive, agrs, alltoallv).

Every rank builds every rank's input from a seed, so the expected outputs (reference MoE,
routing counts, received rows, wire bytes) are computed independently on each rank from the
global data, with plain torch and Python loops that share no code with the managers.
Many cases run inside one distributed call per world size (spawning ranks is slow on 2 cores).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_ep.distributed import GroupCoordinator
from moe_ep.managers import (
    DispatchResult,
    Layout,
    RemoteInputError,
    apply_experts,
    build_manager,
    expert_placement,
)
from moe_ep.testing.reference import make_linear_experts, reference_moe

MANAGERS = (
    ("naive", {}),
    ("allgather_reducescatter", {}),
    ("alltoallv", {}),
    ("alltoallv", {"dedup": False}),
)
NUM_EXPERTS = (4, 8, 10)
TOPK = (1, 2, 6)
DTYPES = (torch.float32, torch.bfloat16)
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
HIDDEN = 32


# ------------------------------------------------------------------------------ global data


def _placement(num_experts: int, world: int) -> list[range]:
    """Contiguous placement written out independently of moe_ep: first E % W ranks get +1."""
    out, start = [], 0
    for r in range(world):
        n = num_experts // world + (1 if r < num_experts % world else 0)
        out.append(range(start, start + n))
        start += n
    return out


def _tokens_per_rank(world: int, case: int) -> list[int]:
    """Differing counts; one rank (rotating with the case) has none. W=1 alternates 0 / n."""
    if world == 1:
        return [0 if case % 2 == 0 else 5 + case % 4]
    zero = case % world
    return [0 if r == zero else 1 + (3 * r + case) % 6 for r in range(world)]


def _routing(n: int, num_experts: int, topk: int, gen: torch.Generator):
    """ids [n, topk] distinct per token, ~20% -1 (always -1 beyond E); garbage weights at -1."""
    real = min(topk, num_experts)
    ids = torch.full((n, topk), -1, dtype=torch.int64)
    if n:
        ids[:, :real] = torch.rand(n, num_experts, generator=gen).argsort(dim=1)[:, :real]
        ids[torch.rand(n, topk, generator=gen) < 0.2] = -1
        ids = ids.gather(1, torch.rand(n, topk, generator=gen).argsort(dim=1))
    weights = torch.rand(n, topk, generator=gen)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-6)
    weights[ids < 0] = 7.0  # must be ignored
    return weights, ids


def _global_inputs(seed: int, counts: list[int], num_experts: int, topk: int, dtype):
    gen = torch.Generator().manual_seed(seed)
    xs, ws, ids = [], [], []
    for n in counts:
        xs.append((torch.randn(n, HIDDEN, generator=gen) * 0.25).to(dtype))
        w, i = _routing(n, num_experts, topk, gen)
        ws.append(w)
        ids.append(i.to(torch.int32 if len(ids) % 2 else torch.int64))
    return xs, ws, ids


def _group(info, use_shm: bool = True) -> GroupCoordinator:
    return GroupCoordinator([list(range(info.world_size))], "ep", use_shm=use_shm)


# ------------------------------------------------------------------------- contract worker


def _contract(info, managers, num_experts_list, topk_list, dtypes, use_shm) -> list[tuple]:
    """Every case: dispatch -> apply_experts(linear) -> combine vs reference_moe on global data."""
    group = _group(info, use_shm)
    r, world = info.rank, info.world_size
    rows = []
    try:
        for m, (name, options) in enumerate(managers):
            mgr = build_manager(name, group, **options)
            cases = itertools.product(num_experts_list, topk_list, dtypes)
            for c, (num_experts, topk, dtype) in enumerate(cases):
                seed = 1000 * m + c
                counts = _tokens_per_rank(world, c)
                xs, ws, ids = _global_inputs(seed, counts, num_experts, topk, dtype)
                experts = make_linear_experts(num_experts, HIDDEN, seed=seed)
                first = _placement(num_experts, world)[r].start
                res = mgr.dispatch(xs[r], ws[r], ids[r], num_experts=num_experts)
                out = apply_experts(res, lambda e, rows_, f=first, ex=experts: ex[f + e](rows_))
                y = mgr.combine(out, res)
                ref_all = reference_moe(torch.cat(xs), torch.cat(ws), torch.cat(ids), experts)
                start = sum(counts[:r])
                ref = ref_all[start : start + counts[r]]
                err = (y.float() - ref.float()).abs().max().item() if y.numel() else 0.0
                scale = ref_all.float().abs().max().item() if ref_all.numel() else 0.0
                rows.append(
                    (
                        f"{name}{options} E={num_experts} K={topk} {dtype} counts={counts}",
                        tuple(y.shape) == tuple(xs[r].shape) and y.dtype == dtype,
                        err,
                        ATOL[dtype],
                        scale,
                    )
                )
            mgr.destroy()
    finally:
        group.destroy()
    return rows


def _assert_contract(results: list[list[tuple]]) -> None:
    scales = []
    for rank, rows in enumerate(results):
        for what, shape_ok, err, atol, scale in rows:
            assert shape_ok, f"rank {rank}: {what}: wrong output shape or dtype"
            assert err <= atol, f"rank {rank}: {what}: max error {err:.3g} > {atol}"
            scales.append(scale)
    # The comparison is not vacuous: the reference outputs are far from zero.
    assert max(scales) > 0.1


@pytest.mark.parametrize("world", [1, 2, 4])
def test_contract_matches_reference(dist_pool, world):
    results = dist_pool(world).run(
        _contract, MANAGERS, NUM_EXPERTS, TOPK, DTYPES, True, timeout=240
    )
    assert len(results[0]) == len(MANAGERS) * len(NUM_EXPERTS) * len(TOPK) * len(DTYPES)
    _assert_contract(results)


@pytest.mark.parametrize("world", [2, 4])
def test_contract_over_plain_gloo(dist_pool, world):
    """The same contract when the group's collectives go through gloo (no shared memory)."""
    results = dist_pool(world).run(_contract, MANAGERS, (10,), (2, 6), DTYPES, False, timeout=120)
    _assert_contract(results)


# ------------------------------------------------------------------------ decodable worker


def _decodable_inputs(counts: list[int], num_experts: int, topk: int, seed: int, dtype):
    """x[s] = s everywhere except the last column = token index; routing from the seed."""
    gen = torch.Generator().manual_seed(seed)
    xs, ws, ids = [], [], []
    for s, n in enumerate(counts):
        x = torch.full((n, 8), float(s))
        x[:, -1] = torch.arange(n, dtype=torch.float32)
        xs.append(x.to(dtype))
        w, i = _routing(n, num_experts, topk, gen)
        ws.append(w)
        ids.append(i)
    return xs, ws, ids


def _expected_bytes(name, options, r, counts, ids, num_experts, topk, hidden, elem):
    """Bytes rank r sends in dispatch and combine, by counting routes in Python."""
    world = len(counts)
    owner = {}
    for q, experts in enumerate(_placement(num_experts, world)):
        for e in experts:
            owner[e] = q
    row = hidden * elem
    if world == 1:
        return 0, 0
    if name == "alltoallv":
        header = (world - 1) * 4 * (6 + 2 * world)
        dedup = options.get("dedup", True)
        sent_rows = sent_pairs = recv_rows = 0
        for s, ids_s in enumerate(ids):
            for token in ids_s.tolist():
                dests = [owner[e] for e in token if e >= 0]
                if s == r:
                    remote = [d for d in dests if d != r]
                    sent_pairs += len(remote)
                    sent_rows += len(set(remote)) if dedup else len(remote)
                elif r in dests:
                    recv_rows += 1 if dedup else dests.count(r)
        return header + sent_rows * row + 8 * sent_pairs, recv_rows * row
    header = (world - 1) * 4 * 6
    meta = 8 * topk
    if name == "allgather_reducescatter":
        dispatch = header + (world - 1) * counts[r] * (row + meta)
        combine = sum(n for q, n in enumerate(counts) if q != r) * row
        return dispatch, combine
    if name == "naive":
        dispatch = header + (world - 1) * counts[r] * (row + meta)
        combine = 2 * (world - 1) * sum(counts) * row // world
        return dispatch, combine
    raise AssertionError(name)


def _decodable(info) -> list[tuple]:
    """Received rows identify sender and token; counts, ids, weights and bytes match."""
    group = _group(info)
    r, world = info.rank, info.world_size
    report = []
    try:
        for name, options in MANAGERS:
            mgr = build_manager(name, group, **options)
            for c, (num_experts, topk, dtype) in enumerate(
                itertools.product((4, 10), (2, 6), (torch.float32, torch.bfloat16))
            ):
                counts = _tokens_per_rank(world, c)
                xs, ws, ids = _decodable_inputs(counts, num_experts, topk, 77 + c, dtype)
                mine = _placement(num_experts, world)[r]
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
                    senders = [s for s in range(world) for _ in range(counts[s])]
                    tokens = [t for s in range(world) for t in range(counts[s])]
                    assert decoded[:, :-1].tolist() == [[float(s)] * 7 for s in senders], what
                    assert decoded[:, -1].tolist() == [float(t) for t in tokens], what
                    got = sorted(
                        (senders[j], tokens[j], le, w)
                        for j in range(len(senders))
                        for le, w in zip(
                            res.topk_ids[j].tolist(), res.topk_weights[j].tolist(), strict=True
                        )
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
                            senders,
                            decoded[:, -1].tolist(),
                            res.topk_ids.tolist(),
                            res.topk_weights.tolist(),
                            strict=True,
                        )
                    )
                    # Rows are grouped by local expert.
                    assert res.topk_ids.tolist() == sorted(res.topk_ids.tolist()), what
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
                    b.payload + b.metadata
                    for b in (mgr.last_dispatch_bytes, mgr.last_combine_bytes)
                )
                report.append((name, tuple(options.items()), c, sent))
            mgr.destroy()
    finally:
        group.destroy()
    return report


@pytest.mark.parametrize("world", [1, 2, 4])
def test_decodable_rows_counts_and_bytes(dist_pool, world):
    results = dist_pool(world).run(_decodable, timeout=180)
    if world == 1:
        return
    # Rows + routing metadata (headers aside), summed over ranks: alltoallv never moves more
    # than agrs and moves strictly less over all cases; naive moves the most; dedup helps.
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
    assert all(a <= b for a, b in zip(a2av, agrs, strict=True)), (a2av, agrs)
    assert sum(a2av) < sum(agrs), (a2av, agrs)
    assert all(a <= b for a, b in zip(a2av, a2av_nodedup, strict=True))
    assert sum(a2av) < sum(a2av_nodedup)
    assert all(a > b for a, b in zip(naive, agrs, strict=True)), (naive, agrs)


# --------------------------------------------------------------------------- bad inputs


def _bad_case(kind: str, r: int, bad: int, world: int):
    """(x, weights, ids, num_experts) of rank r for scenario `kind`; rank `bad` misbehaves."""
    gen = torch.Generator().manual_seed(5 + r)
    n, num_experts, topk = 3 + r, 8, 2
    x = torch.randn(n, HIDDEN, generator=gen)
    w, ids = _routing(n, num_experts, topk, gen)
    ids[0] = torch.tensor([1, 2])
    if r != bad or kind == "none":
        return x, w, ids, num_experts
    if kind == "id_too_large":
        ids[1, 0] = num_experts
    elif kind == "id_below_minus_one":
        ids[1, 1] = -2
    elif kind == "float_ids":
        ids = ids.float()
    elif kind == "bool_ids":
        ids = ids > 0
    elif kind == "weights_shape":
        w = w[:, :1]
    elif kind == "rows_mismatch":
        x = x[:-1]
    elif kind == "x_1d":
        x = x[0]
    elif kind == "int_x":
        x = x.long()
    elif kind == "fp8_x":
        x = x.to(torch.float8_e4m3fn)
    elif kind == "duplicate_ids":
        ids[0] = torch.tensor([3, 3])
    elif kind == "num_experts_not_int":
        num_experts = 8.0
    elif kind == "not_a_tensor":
        w = w.tolist()
    elif kind == "hidden_differs":
        x = torch.randn(n, HIDDEN + 1, generator=gen)
    elif kind == "dtype_differs":
        x = x.bfloat16()
    elif kind == "num_experts_differs":
        num_experts = 9
    elif kind == "topk_differs":
        w, ids = _routing(n, num_experts, topk + 1, gen)
    else:
        raise AssertionError(kind)
    return x, w, ids, num_experts


# scenario -> (exception on the bad rank, message fragment); None: every rank raises alike.
LOCAL_ERRORS = {
    "id_too_large": (ValueError, "topk_ids must be in [-1, num_experts=8)"),
    "id_below_minus_one": (ValueError, "got -2"),
    "float_ids": (TypeError, "topk_ids must be an integer tensor"),
    "bool_ids": (TypeError, "topk_ids must be an integer tensor"),
    "weights_shape": (ValueError, "topk_weights must have the shape of topk_ids"),
    "rows_mismatch": (ValueError, "rows but x has"),
    "x_1d": (ValueError, "x must be [num_tokens, hidden]"),
    "int_x": (TypeError, "x must have a floating dtype"),
    "fp8_x": (TypeError, "x dtype torch.float8_e4m3fn is not supported"),
    "duplicate_ids": (ValueError, "same expert twice"),
    "num_experts_not_int": (TypeError, "num_experts must be an int"),
    "not_a_tensor": (TypeError, "topk_weights must be a torch.Tensor"),
}
CONSISTENCY_ERRORS = {
    "hidden_differs": "hidden size (x.shape[1]) differs across ranks",
    "dtype_differs": "x dtype differs across ranks",
    "num_experts_differs": "num_experts differs across ranks",
    "topk_differs": "topk (topk_ids.shape[1]) differs across ranks",
}


def _bad_inputs(info) -> list[tuple]:
    """Each scenario on each manager: record what every rank raised, then prove the group is
    still in step with a valid round trip."""
    group = _group(info)
    r, world = info.rank, info.world_size
    bad = world - 1
    seen = []
    kinds = list(LOCAL_ERRORS) + (list(CONSISTENCY_ERRORS) if world > 1 else [])
    experts = make_linear_experts(8, HIDDEN, seed=3)
    first = _placement(8, world)[r].start
    try:
        for name, options in MANAGERS:
            mgr = build_manager(name, group, **options)
            for kind in kinds:
                x, w, ids, num_experts = _bad_case(kind, r, bad, world)
                try:
                    mgr.dispatch(x, w, ids, num_experts=num_experts)
                except Exception as exc:  # noqa: BLE001 - recorded, checked in the parent
                    seen.append(
                        (name, kind, type(exc).__name__, str(exc), getattr(exc, "bad_ranks", None))
                    )
                else:
                    seen.append((name, kind, None, "", None))
                # Still in step: a valid round trip right after.
                x, w, ids, num_experts = _bad_case("none", r, bad, world)
                res = mgr.dispatch(x, w, ids, num_experts=num_experts)
                y = mgr.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
                assert torch.allclose(y, reference_moe(x, w, ids, experts), atol=1e-5), kind

            # Non-contiguous inputs are handled: same result as their contiguous copies.
            x, w, ids, num_experts = _bad_case("none", r, bad, world)
            wide = torch.zeros(x.shape[0], 2 * HIDDEN)
            wide[:, ::2] = x
            res = mgr.dispatch(
                wide[:, ::2],
                w.t().contiguous().t(),
                ids.t().contiguous().t(),
                num_experts=num_experts,
            )
            y = mgr.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
            assert torch.allclose(y, reference_moe(x, w, ids, experts), atol=1e-5)

            # A wrong expert output shape is rejected locally (all ranks pass a wrong one here).
            res = mgr.dispatch(x, w, ids, num_experts=num_experts)
            try:
                mgr.combine(res.x[:, :-1], res)
            except ValueError as exc:
                assert "expert_out must be" in str(exc)
            else:
                raise AssertionError("combine accepted a wrong expert_out shape")
            mgr.combine(apply_experts(res, lambda e, q: q), res)

            # Destroyed managers refuse to work; destroy is idempotent.
            mgr.destroy()
            mgr.destroy()
            try:
                mgr.dispatch(x, w, ids, num_experts=num_experts)
            except RuntimeError as exc:
                assert "destroyed" in str(exc)
            else:
                raise AssertionError("a destroyed manager dispatched")
    finally:
        group.destroy()
    return seen


@pytest.mark.parametrize("world", [1, 2, 4])
def test_bad_inputs_raise_on_every_rank(dist_pool, world):
    results = dist_pool(world).run(_bad_inputs, timeout=180)
    bad = world - 1
    for rank, seen in enumerate(results):
        for name, kind, exc_type, message, bad_ranks in seen:
            where = f"rank {rank}, {name}, {kind}: {exc_type}: {message}"
            assert exc_type is not None, f"{where}: no error raised"
            if kind in CONSISTENCY_ERRORS:
                assert exc_type == "ValueError" and CONSISTENCY_ERRORS[kind] in message, where
                assert f"rank {bad}:" in message, where
            elif rank == bad:
                want_type, fragment = LOCAL_ERRORS[kind]
                assert exc_type == want_type.__name__ and fragment in message, where
            else:
                assert exc_type == RemoteInputError.__name__, where
                assert bad_ranks == (bad,) and f"rank(s) {bad} passed invalid input" in message
                assert LOCAL_ERRORS[kind][0].__name__ in message, where


# --------------------------------------------------------------- gather-all router logits


def _router_logits(info) -> list[str]:
    group = _group(info)
    r, world = info.rank, info.world_size
    counts = _tokens_per_rank(world, 1)
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
            y = mgr.combine(got.x.float() * (r + 1), got)
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
    want = _placement(num_experts, world)
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


def test_expert_placement_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        expert_placement(0, 2)
    with pytest.raises(TypeError, match="ep_size must be an int"):
        expert_placement(4, 2.0)


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


def test_apply_experts_rejects_bad_expert_output():
    result, _ = _manual_result(Layout.EXPERT_PACKED)
    with pytest.raises(ValueError, match="local expert 0 must return a tensor of shape"):
        apply_experts(result, lambda e, rows: rows[:, :2])
    with pytest.raises(TypeError, match="DispatchResult"):
        apply_experts(object(), lambda e, rows: rows)
