"""Contract tests of the vendor adapters (deepep_high_throughput, deepep_low_latency, pplx,
flashinfer_mnnvl) against the vendor contract models.

**These test the adapters, not the vendor kernels.** Each adapter runs unchanged with the
pure-torch model of its vendor API installed under the vendor's module name
(`moe_ep.testing.vendor_models`: CPU tensors over gloo stand in for CUDA tensors, and the
model is the one test-only exception to the adapters' CUDA requirement). Passing proves that
the adapter meets the moe_ep contract *given the vendor behaviour the models encode* (read from
the vendors' sources, see tests/test_vendor_models.py); it proves nothing about the CUDA
kernels, which have not run here.

The same scenario builders and independent references as the portable managers' contract
tests (`moe_ep.testing.scenarios`, `reference_moe`) are used, at W in {2, 4}, through handles
and through the call without one. Every vendor call the adapters make is bound against the
real vendor signature recorded in tests/vendor_signatures/snapshot.json
(`moe_ep.testing.vendor_models.recording`), and every name they read from a vendor module must
be one the real module exports.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moe_ep.distributed import GroupCoordinator, Topology
from moe_ep.managers import (
    EPSpec,
    Layout,
    ManagerUnavailableError,
    RemoteInputError,
    apply_experts,
    available_managers,
    build_manager,
    get_manager_class,
    resolve_name,
)
from moe_ep.managers.pplx import fill_missing_ids
from moe_ep.testing.reference import make_linear_experts, reference_moe
from moe_ep.testing.scenarios import (
    CONSISTENCY_ERRORS,
    LOCAL_ERRORS,
    assert_contract,
    bad_case,
    contract_cases,
    decodable_inputs,
    placement_ranges,
    tokens_per_rank,
)
from moe_ep.testing.vendor_models import installed
from moe_ep.testing.vendor_models.recording import recording

SNAPSHOT_PATH = Path(__file__).parent / "vendor_signatures" / "snapshot.json"
TIMEOUT = 300
BF16 = torch.bfloat16
MODULE = {"deepep_high_throughput": "deep_ep", "deepep_low_latency": "deep_ep",
          "pplx": "pplx_kernels", "flashinfer_mnnvl": "flashinfer"}
VENDORS = tuple(MODULE)
# Per backend: hidden size, expert counts, top-k values, dtypes of the contract cases. The LL
# kernels exist for a few hidden sizes only; FlashInfer's for some top-k values only.
SHAPES = {
    "deepep_high_throughput": (32, (8, 16), (1, 2, 6), (BF16,)),
    "deepep_low_latency": (2048, (8,), (2, 6), (BF16,)),
    "pplx": (32, (8, 16), (1, 2, 6), (BF16, torch.float16)),
    "flashinfer_mnnvl": (32, (8, 16), (1, 2, 6), (BF16, torch.float32)),
}
# (backend, options) variants of the contract cases; small implicit capacities keep the models
# fast.
VARIANTS = {
    "ht": ("deepep_high_throughput", {}),
    "ht-exact-rows": ("deepep_high_throughput", {"fixed_rows": False}),
    "ht-no-exchange": ("deepep_high_throughput", {"exchange": False}),
    "ll": ("deepep_low_latency", {"max_tokens_per_rank": 8}),
    "ll-no-exchange": ("deepep_low_latency", {"max_tokens_per_rank": 8, "exchange": False}),
    "pplx": ("pplx", {"max_tokens_per_rank": 8}),
    "pplx-internode": ("pplx", {"max_tokens_per_rank": 8, "internode": True}),
    "pplx-no-exchange": ("pplx", {"max_tokens_per_rank": 8, "exchange": False}),
    "flashinfer": ("flashinfer_mnnvl", {"max_tokens_per_rank": 8}),
    "flashinfer-no-exchange": ("flashinfer_mnnvl", {"max_tokens_per_rank": 8,
                                                    "exchange": False}),
}


def _snapshot() -> dict:
    return json.loads(SNAPSHOT_PATH.read_text())


def _group(info) -> GroupCoordinator:
    return GroupCoordinator([list(range(info.world_size))], "ep")


def _with_models(info, names, fn, *args):
    """`fn(info, group, *args)` with the models of `names` installed and every vendor call
    recorded; returns `(fn's result, the call log as plain data)`."""
    with installed(*names) as modules, recording(modules, _snapshot()) as log:
        group = _group(info)
        try:
            out = fn(info, group, *args)
        finally:
            group.destroy()
    summary = {"calls": sorted(set(log.calls)), "failures": log.failures,
               "unverified": sorted(set(log.unverified)),
               "attributes": {m: sorted(v) for m, v in log.attributes.items()}}
    return out, summary


def _check_calls(summaries: list[dict], must_call: set[tuple[str, str]] = frozenset()) -> None:
    """Every recorded vendor call bound to its real signature, none was unverified, every
    module attribute read is a real export, and the calls named in `must_call` happened."""
    snap = _snapshot()["packages"]
    called = set()
    for rank, s in enumerate(summaries):
        assert not s["failures"], f"rank {rank}: calls not matching the real API: {s['failures']}"
        assert not s["unverified"], f"rank {rank}: calls without a real signature: " \
                                    f"{s['unverified']}"
        for module, names in s["attributes"].items():
            package = module.split(".")[0]
            key = "<exports>" if module == package else f"<exports {module}>"
            real = {n for [n] in snap[package]["signatures"].get(key, [])}
            assert real, f"no recorded exports of {module}"
            assert set(names) <= real, f"rank {rank} read {sorted(set(names) - real)} from " \
                                       f"{module}, which the real module does not export"
        called |= {tuple(c) for c in s["calls"]}
    assert must_call <= called, f"expected vendor calls missing: {sorted(must_call - called)}"


# ------------------------------------------------------------------- contract vs reference
def _contract(info, group, name, options, use_handles):
    hidden, experts, topks, dtypes = SHAPES[name]
    return contract_cases(group, [(name, options)], experts, topks, dtypes, hidden=hidden,
                          use_handles=use_handles)


# The vendor entry points each adapter must have gone through (checked against the real API).
MUST_CALL = {
    "deepep_high_throughput": {("deep_ep", q) for q in (
        "Buffer.__init__", "Buffer.get_dispatch_config", "Buffer.get_combine_config",
        "Config.get_nvl_buffer_size_hint", "Buffer.get_dispatch_layout", "Buffer.dispatch",
        "Buffer.combine", "Buffer.destroy")},
    "deepep_low_latency": {("deep_ep", q) for q in (
        "Buffer.__init__", "Buffer.get_low_latency_rdma_size_hint",
        "Buffer.low_latency_dispatch", "Buffer.low_latency_combine", "Buffer.destroy")},
    "pplx": {("pplx_kernels", q) for q in (
        "AllToAll.dispatch", "AllToAll.combine", "AllToAll.destroy")},
    "flashinfer_mnnvl": {("flashinfer", q) for q in (
        "create_communication", "BootstrapConfig()", "MoEEpCommParams()",
        "NVLinkOneSidedConfig()", "NVLinkOneSidedAlltoAll.dispatch",
        "NVLinkOneSidedAlltoAll.combine", "NVLinkOneSidedAlltoAll.destroy")},
}
MUST_CALL_VARIANT = {
    "pplx": {("pplx_kernels", "AllToAll.intranode")},
    "pplx-internode": {("pplx_kernels", q) for q in (
        "AllToAll.internode", "nvshmem_get_unique_id", "nvshmem_alloc_empty_unique_id",
        "nvshmem_init", "nvshmem_finalize")},
}


@pytest.mark.parametrize("use_handles", [True, False], ids=["handle", "no-handle"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_contract_matches_reference(dist_pool, variant, world, use_handles):
    """dispatch -> apply_experts(linear experts) -> combine equals `reference_moe` on every
    rank, for uneven token counts (one rank with none), -1 ids, int32 and int64 ids."""
    name, options = VARIANTS[variant]
    results = dist_pool(world).run(_with_models, (MODULE[name],), _contract, name, options,
                                   use_handles, timeout=TIMEOUT)
    rows = [r for r, _ in results]
    hidden, experts, topks, dtypes = SHAPES[name]
    assert len(rows[0]) == len(experts) * len(topks) * len(dtypes)
    assert_contract(rows)
    _check_calls([s for _, s in results], MUST_CALL[name] | MUST_CALL_VARIANT.get(variant, set()))


# ------------------------------------------------------------------ decodable receive layout
def _filler_pairs(s, ids_s, num_experts, world):
    """pplx's filler slots of sender s, written out independently: each -1 slot of a token
    takes, in order, the experts of ranks s, s+1, ... (mod W) the token does not use."""
    ranges = placement_ranges(num_experts, world)
    order = [e for q in range(world) for e in ranges[(s + q) % world]]
    out = []
    for t, token in enumerate(ids_s.tolist()):
        free = [e for e in order if e not in token]
        for j in range(sum(1 for e in token if e < 0)):
            out.append((t, free[j]))
    return out


def _decodable(info, group, name, options):
    """Received rows identify sender and token (x = sender, last column = token index); the
    pairs, counts, ids and weights match an independent expectation; identity experts give
    y = x * (sum of the valid weights)."""
    r, world = info.rank, info.world_size
    hidden = SHAPES[name][0]
    report = []
    mgr = build_manager(name, group, **options)
    try:
        for c, (num_experts, topk) in enumerate(itertools.product((8,), (2, 6))):
            counts = tokens_per_rank(world, c)
            xs, ws, ids = decodable_inputs(counts, num_experts, topk, 31 + c, BF16, hidden)
            mine = placement_ranges(num_experts, world)[r]
            handle = mgr.get_handle(EPSpec(hidden=hidden, num_experts=num_experts, topk=topk,
                                           max_tokens_per_rank=max(counts), dtype=BF16))
            res = mgr.dispatch(xs[r], ws[r], ids[r], handle=handle)
            what = f"{name}{options} E={num_experts} K={topk} counts={counts}"
            assert res.layout is mgr.layout, what
            pairs = [(s, t, e - mine.start, float(ws[s][t, k]))
                     for s in range(world) for t in range(counts[s])
                     for k, e in enumerate(ids[s][t].tolist()) if e in mine]
            if name == "pplx":
                pairs += [(s, t, e - mine.start, 0.0) for s in range(world)
                          for t, e in _filler_pairs(s, ids[s], num_experts, world) if e in mine]
            per_expert = [sum(1 for p in pairs if p[2] == le) for le in range(len(mine))]
            assert res.tokens_per_expert.tolist() == per_expert, what
            x = res.x.float()
            # Fixed-size receive buffers, sized independently of the adapters: DeepEP HT
            # (num_worst_tokens) W * T rows; FlashInfer W * (the call's largest count);
            # pplx W * T per expert; DeepEP LL W * T' with T' >= T the first making W * T'
            # a multiple of 4.
            t_ll = next(t for t in itertools.count(max(counts)) if world * t % 4 == 0)
            want_rows = {"deepep_high_throughput": world * max(counts),
                         "flashinfer_mnnvl": world * max(counts), "pplx": world * max(counts),
                         "deepep_low_latency": world * t_ll}[name]
            assert res.x.shape[int(res.layout is Layout.EXPERT_PADDED)] == want_rows, what
            if res.layout is Layout.TOKEN:
                real = (res.topk_ids >= 0).any(dim=1)
                # Padding rows (fixed-size receive buffers) carry no expert and weight 0.
                assert (res.topk_weights[~real] == 0).all(), what
                assert (res.topk_weights[res.topk_ids < 0] == 0).all(), what
                rows = x[real]
                assert (rows[:, :-1] == rows[:, :1]).all(), what
                senders, tokens = rows[:, 0].tolist(), rows[:, -1].tolist()
                # A token arrives once per rank owning one of its experts.
                assert len(set(zip(senders, tokens))) == len(senders), what
                got = sorted(
                    (int(s), int(t), le, w)
                    for s, t, lids, wts in zip(senders, tokens, res.topk_ids[real].tolist(),
                                               res.topk_weights[real].tolist())
                    for le, w in zip(lids, wts) if le >= 0)
                assert got == sorted(pairs), what
            else:
                got = []
                for e, n in enumerate(res.tokens_per_expert.tolist()):
                    block = x[e, :n]
                    assert (block[:, :-1] == block[:, :1]).all(), what
                    got += [(int(s), int(t), e) for s, t in zip(block[:, 0].tolist(),
                                                                 block[:, -1].tolist())]
                assert sorted(got) == sorted((s, t, e) for s, t, e, _ in pairs), what
            y = mgr.combine(apply_experts(res, lambda e, q: q), res)
            w_sum = torch.where(ids[r] >= 0, ws[r], 0).sum(dim=1, keepdim=True)
            want = (xs[r].float() * w_sum)
            assert y.dtype == BF16 and torch.allclose(y.float(), want, atol=0.1, rtol=2e-2), what
            report.append((c, len(pairs)))
    finally:
        mgr.destroy()
    return report


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", VENDORS)
def test_adapter_receive_layout_is_decodable(dist_pool, name, world):
    options = {"max_tokens_per_rank": 8}
    results = dist_pool(world).run(_with_models, (MODULE[name],), _decodable, name, options,
                                   timeout=TIMEOUT)
    # Not vacuous: some rank received pairs in every case.
    for c in range(2):
        assert sum(rep[c][1] for rep, _ in results) > 0
    _check_calls([s for _, s in results], MUST_CALL[name])


def test_fill_missing_ids_never_repeats_an_expert():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        e, k = 8, int(torch.randint(1, 9, (1,), generator=gen))
        n = 7
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
        ids[torch.rand(n, k, generator=gen) < 0.4] = -1
        w = torch.rand(n, k, generator=gen)
        pref = torch.randperm(e, generator=gen)
        got_ids, got_w = fill_missing_ids(ids, w, pref)
        for t in range(n):
            token = ids[t].tolist()
            free = [p for p in pref.tolist() if p not in token]
            want = [v if v >= 0 else None for v in token]
            j = 0
            for slot, v in enumerate(want):
                if v is None:
                    want[slot] = free[j]
                    j += 1
            assert got_ids[t].tolist() == want, (trial, token)
            assert len(set(want)) == k
        assert torch.equal(got_w, torch.where(ids < 0, torch.zeros_like(w), w))


# ------------------------------------------------------------------------------ bad inputs
def _bf16_bad_case(kind, r, bad, world, hidden):
    """`scenarios.bad_case` in bfloat16 (every vendor combine is 16-bit): the differing dtype
    is float16 there."""
    x, w, ids, num_experts = bad_case(kind, r, bad, world, hidden)
    if kind == "dtype_differs" and r == bad:
        x = x.to(torch.float16)
    elif x.dtype == torch.float32:
        x = x.to(BF16)
    return x, w, ids, num_experts


def _bad_inputs(info, group, name, options, use_handles):
    """Each bad-input scenario raises on every rank; the group stays in step (a valid round
    trip after each); a failing combine or expert step fails every rank and leaves the manager
    usable; a consumed result cannot be combined again."""
    r, world = info.rank, info.world_size
    hidden = SHAPES[name][0]
    bad = world - 1
    seen = []
    experts = make_linear_experts(8, hidden, seed=3)
    first = placement_ranges(8, world)[r].start
    kinds = list(LOCAL_ERRORS) + list(CONSISTENCY_ERRORS)
    mgr = build_manager(name, group, **options)

    def ok_round_trip(what):
        x, w, ids, num_experts = _bf16_bad_case("none", r, bad, world, hidden)
        res = mgr.dispatch(x, w, ids, handle=handle, num_experts=num_experts)
        y = mgr.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
        want = reference_moe(x.float(), w, ids, experts)
        assert torch.allclose(y.float(), want, atol=0.05, rtol=2e-2), what
        return res

    def record(what, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - checked in the parent
            seen.append((what, type(exc).__name__, str(exc), getattr(exc, "bad_ranks", None)))
        else:
            seen.append((what, None, "", None))

    try:
        handle = mgr.get_handle(EPSpec(hidden=hidden, num_experts=8, topk=2,
                                       max_tokens_per_rank=8, dtype=BF16)) \
            if use_handles else None
        for kind in kinds:
            x, w, ids, num_experts = _bf16_bad_case(kind, r, bad, world, hidden)
            record(kind, mgr.dispatch, x, w, ids, handle=handle, num_experts=num_experts)
            ok_round_trip(kind)
        # A wrong expert output (every rank): fails everywhere, consumes the result, and the
        # vendor round it opened is closed, so the next round trip works.
        x, w, ids, num_experts = _bf16_bad_case("none", r, bad, world, hidden)
        res = mgr.dispatch(x, w, ids, handle=handle, num_experts=num_experts)
        record("expert_out_shape", mgr.combine, res.x[..., :-1], res)
        record("combined_twice", mgr.combine, apply_experts(res, lambda e, q: q), res)
        ok_round_trip("after a failed combine")
        # An expert step failing on one rank fails the combine on every rank (abort).
        res = mgr.dispatch(x, w, ids, handle=handle, num_experts=num_experts)

        def expert(e, q):
            if r == bad:
                raise RuntimeError("expert step failed")
            return q

        record("expert_raises", lambda: mgr.combine(apply_experts(res, expert), res))
        ok_round_trip("after a failed expert step")
    finally:
        mgr.destroy()
    record("after_destroy", mgr.dispatch, x, w, ids, handle=handle, num_experts=num_experts)
    return seen


SPEC_ERRORS = {
    "hidden_differs": (ValueError, "(EPSpec.hidden)"),
    "dtype_differs": (TypeError, "(EPSpec.dtype)"),
    "num_experts_differs": (ValueError, "disagrees with the handle's EPSpec.num_experts"),
    "topk_differs": (ValueError, "(EPSpec.topk)"),
    "x_1d": (ValueError, "(EPSpec.hidden)"),
    "int_x": (TypeError, "x must be torch.bfloat16 (EPSpec.dtype)"),
    "fp8_x": (TypeError, "x must be torch.bfloat16 (EPSpec.dtype)"),
}
# Without a handle, a shape one rank's backend cannot serve is that rank's own error (the
# backend's limit), before the cross-rank comparison.
VENDOR_REFUSES = {
    "hidden_differs": ("deepep_high_throughput", "deepep_low_latency", "pplx"),
    "dtype_differs": ("deepep_high_throughput", "deepep_low_latency"),
    "num_experts_differs": VENDORS,
}


@pytest.mark.parametrize("use_handles", [True, False], ids=["handle", "no-handle"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", VENDORS)
def test_adapter_bad_inputs_raise_on_every_rank(dist_pool, name, world, use_handles):
    results = dist_pool(world).run(_with_models, (MODULE[name],), _bad_inputs, name,
                                   {"max_tokens_per_rank": 8}, use_handles, timeout=TIMEOUT)
    bad = world - 1
    for rank, (seen, _) in enumerate(results):
        got = {what: (exc, msg, ranks) for what, exc, msg, ranks in seen}
        for kind in list(LOCAL_ERRORS) + list(CONSISTENCY_ERRORS):
            exc, msg, ranks = got[kind]
            where = f"rank {rank}, {name}, {kind}: {exc}: {msg}"
            assert exc is not None, f"{where}: no error raised"
            local = dict(LOCAL_ERRORS, **SPEC_ERRORS) if use_handles else LOCAL_ERRORS
            if kind in CONSISTENCY_ERRORS and not use_handles:
                if name in VENDOR_REFUSES.get(kind, ()):
                    if rank == bad:
                        assert exc in ("ValueError", "TypeError") and name in msg, where
                    else:
                        assert exc == "RemoteInputError" and ranks == (bad,), where
                else:
                    assert exc == "ValueError" and CONSISTENCY_ERRORS[kind] in msg, where
                    assert f"rank {bad}:" in msg, where
            elif rank == bad:
                want_type, fragment = local[kind]
                assert exc == want_type.__name__ and fragment in msg, where
            else:
                assert exc == RemoteInputError.__name__ and ranks == (bad,), where
                assert local[kind][0].__name__ in msg, where
        exc, msg, _ = got["expert_out_shape"]
        assert exc == "ValueError" and "expert_out must be" in msg, (rank, msg)
        exc, msg, _ = got["combined_twice"]
        assert exc == "ValueError" and "already combined" in msg, (rank, msg)
        exc, msg, ranks = got["expert_raises"]
        if rank == bad:
            assert exc == "RuntimeError" and "expert step failed" in msg, (rank, msg)
        else:
            assert exc == "RemoteInputError" and ranks == (bad,), (rank, msg)
        exc, msg, _ = got["after_destroy"]
        assert exc == "RuntimeError" and "destroyed" in msg, (rank, msg)
    _check_calls([s for _, s in results])


# ------------------------------------------------------------------------- limits at handles
LIMITS = {
    "deepep_high_throughput": [
        (dict(hidden=32, num_experts=8, topk=2, dtype=torch.float32), TypeError,
         "DeepEP combines bfloat16 only"),
        (dict(hidden=4, num_experts=8, topk=2), ValueError, "not a multiple of 16 bytes"),
        (dict(hidden=32, num_experts=7, topk=2), ValueError, "multiple of the"),
        (dict(hidden=32, num_experts=64, topk=33), ValueError, "EPSpec.topk=33 > 32"),
        (dict(hidden=32, num_experts=8, topk=2, dtype=BF16, scale_cols=1), TypeError,
         "scales only beside 1-byte"),
    ],
    "deepep_low_latency": [
        (dict(hidden=1024, num_experts=8, topk=2), ValueError, "EPSpec.hidden=1024 is not one"),
        (dict(hidden=2048, num_experts=16, topk=12), ValueError, "EPSpec.topk=12 > 11"),
        (dict(hidden=2048, num_experts=8, topk=2, max_tokens_per_rank=512), ValueError,
         "at most 511 tokens unless NVSHMEM_QP_DEPTH"),
        (dict(hidden=2048, num_experts=8, topk=2, dtype=torch.float8_e4m3fn, scale_cols=16),
         TypeError, "quantises inside its kernel"),
        (dict(hidden=2048, num_experts=8, topk=2, dtype=torch.float32), TypeError,
         "takes bfloat16 x"),
        (dict(hidden=2048, num_experts=8, topk=2, out_dtype=torch.float32), TypeError,
         "DeepEP combines bfloat16 only"),
    ],
    "pplx": [
        (dict(hidden=32, num_experts=4, topk=6), ValueError, "no empty slot"),
        (dict(hidden=32, num_experts=8, topk=2, dtype=torch.float32), TypeError,
         "combines into bfloat16 or float16 only"),
        (dict(hidden=4, num_experts=8, topk=2), ValueError, "not a multiple of 16 bytes"),
        (dict(hidden=32, num_experts=7, topk=2), ValueError, "multiple of the"),
    ],
    "flashinfer_mnnvl": [
        (dict(hidden=32, num_experts=8, topk=5), ValueError, "top-k in"),
        (dict(hidden=32, num_experts=8, topk=2, out_dtype=torch.float32), TypeError,
         "from one token dtype"),
        (dict(hidden=256, num_experts=8, topk=2, dtype=torch.float8_e4m3fn, scale_cols=1),
         ValueError, "EPSpec.scale_cols must be 2"),
        (dict(hidden=32, num_experts=7, topk=2), ValueError, "multiple of the"),
    ],
}
_BUILDS = {("deep_ep", "Buffer.__init__"), ("pplx_kernels", "AllToAll.intranode"),
           ("flashinfer", "create_communication")}


def _limits(info, group, name):
    """Every spec past a vendor limit raises on every rank at get_handle, before any vendor
    buffer is built; ranks passing different max tokens raise the same error naming each."""
    seen = []
    mgr = build_manager(name, group)
    try:
        for fields, _, _ in LIMITS[name]:
            spec = EPSpec(**{"max_tokens_per_rank": 8, "dtype": BF16, **fields})
            try:
                mgr.get_handle(spec)
            except Exception as exc:  # noqa: BLE001 - checked in the parent
                seen.append((type(exc).__name__, str(exc)))
            else:
                seen.append((None, ""))
        hidden = SHAPES[name][0]
        try:
            mgr.get_handle(EPSpec(hidden=hidden, num_experts=8, topk=2, dtype=BF16,
                                  max_tokens_per_rank=8 + 4 * info.rank))
        except ValueError as exc:
            seen.append(("ValueError", str(exc)))
        else:
            seen.append((None, ""))
    finally:
        mgr.destroy()
    return seen


@pytest.mark.parametrize("name", VENDORS)
def test_adapter_limits_checked_when_the_handle_is_made(dist_pool, name):
    results = dist_pool(2).run(_with_models, (MODULE[name],), _limits, name, timeout=TIMEOUT)
    for rank, (seen, summary) in enumerate(results):
        for (fields, exc_type, fragment), (exc, msg) in zip(LIMITS[name], seen):
            assert exc == exc_type.__name__ and fragment in msg, (rank, fields, exc, msg)
        exc, msg = seen[-1]
        assert exc == "ValueError" and "EPSpec.max_tokens_per_rank differs" in msg, msg
        assert "rank 0: 8, rank 1: 12" in msg, msg
        # No vendor buffer was ever built: the errors came first, on every rank.
        assert not {tuple(c) for c in summary["calls"]} & _BUILDS, summary["calls"]


# ------------------------------------------------------------------------------ live results
def _live(info, group, name):
    """LL: a third dispatch retires the oldest result. pplx / FlashInfer: a dispatch while a
    result is open is refused on every rank, naming it; then everything still works."""
    r, world = info.rank, info.world_size
    hidden = SHAPES[name][0]
    experts = make_linear_experts(8, hidden, seed=4)
    first = placement_ranges(8, world)[r].start
    xs, ws, ids = decodable_inputs([3] * world, 8, 2, 5, BF16, hidden)
    out = []
    mgr = build_manager(name, group)

    def expect(res):
        y = mgr.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
        want = reference_moe(xs[r].float(), ws[r], ids[r], experts)
        assert torch.allclose(y.float(), want, atol=0.05, rtol=2e-2), name

    try:
        h1 = mgr.get_handle(EPSpec(hidden=hidden, num_experts=8, topk=2, max_tokens_per_rank=4))
        h2 = mgr.get_handle(EPSpec(hidden=hidden, num_experts=8, topk=2, max_tokens_per_rank=3))
        a = mgr.dispatch(xs[r], ws[r], ids[r], handle=h1)
        if name == "deepep_low_latency":
            b = mgr.dispatch(xs[r], ws[r], ids[r], handle=h1)
            c = mgr.dispatch(xs[r], ws[r], ids[r], handle=h1)
            try:
                mgr.combine(apply_experts(a, lambda e, q: q), a)
            except ValueError as exc:
                out.append(str(exc))
            expect(b)
            expect(c)
        else:
            try:
                mgr.dispatch(xs[r], ws[r], ids[r], handle=h1)
            except ValueError as exc:
                out.append(str(exc))
            if name == "pplx":
                b = mgr.dispatch(xs[r], ws[r], ids[r], handle=h2)  # its own AllToAll
                expect(b)
                expect(a)
            else:
                try:
                    mgr.dispatch(xs[r], ws[r], ids[r], handle=h2)
                except ValueError as exc:
                    out.append(str(exc))
                expect(a)
                expect(mgr.dispatch(xs[r], ws[r], ids[r], handle=h2))
    finally:
        mgr.destroy()
    return out


def _foreign_result_in_a_failed_combine(info, group, name):
    """A combine that fails while the ranks do not have the same round open (rank 0 passes a
    foreign object) cannot close the vendor round: the manager becomes unusable everywhere."""
    r, world = info.rank, info.world_size
    xs, ws, ids = decodable_inputs([2] * world, 8, 2, 6, BF16, 32)
    mgr = build_manager(name, group)
    seen = []
    try:
        h = mgr.get_handle(EPSpec(hidden=32, num_experts=8, topk=2, max_tokens_per_rank=2))
        res = mgr.dispatch(xs[r], ws[r], ids[r], handle=h)
        for result in ((object() if r == 0 else res), res):
            try:
                mgr.combine(apply_experts(res, lambda e, q: q), result)
            except Exception as exc:  # noqa: BLE001 - checked in the parent
                seen.append((type(exc).__name__, str(exc)))
    finally:
        mgr.destroy()
    return seen


@pytest.mark.parametrize("name", ["pplx", "flashinfer_mnnvl"])
def test_adapter_unusable_when_a_failed_round_cannot_be_closed(dist_pool, name):
    results = dist_pool(2).run(_with_models, (MODULE[name],), _foreign_result_in_a_failed_combine,
                               name, timeout=TIMEOUT)
    (first0, second0), (first1, second1) = (seen for seen, _ in results)
    assert first0[0] == "TypeError" and "DispatchResult" in first0[1], first0
    assert first1[0] == "RemoteInputError", first1
    for exc, msg in (second0, second1):
        assert exc == "RuntimeError" and "unusable" in msg and "open rounds differ" in msg, msg


@pytest.mark.parametrize("name", ["deepep_low_latency", "pplx", "flashinfer_mnnvl"])
def test_adapter_live_results(dist_pool, name):
    results = dist_pool(2).run(_with_models, (MODULE[name],), _live, name, timeout=TIMEOUT)
    for rank, (out, _) in enumerate(results):
        if name == "deepep_low_latency":
            assert len(out) == 1 and "replaced by a later dispatch" in out[0], (rank, out)
        elif name == "pplx":
            # One AllToAll per handle: the other handle is free.
            assert len(out) == 1 and "dispatch #0 (handle 0) has not been combined" in out[0]
        else:
            # One workspace round at a time, across handles.
            assert len(out) == 2 and all("has not been combined" in m for m in out), out


# --------------------------------------------------------------------------- quantised input
def _fp8(info, group, name, options):
    """Float8 dispatch: what each backend does with quantised input (module docstrings)."""
    r = info.rank
    hidden = 2048 if name == "deepep_low_latency" else 256
    gen = torch.Generator().manual_seed(7 + r)
    n = 3 + r
    x = (torch.randn(n, hidden, generator=gen) * 2).to(BF16)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(n)])
    ids[0, 1] = -1
    w = torch.rand(n, 2, generator=gen)
    mgr = build_manager(name, group, **options)
    out = {}
    scales = None
    try:
        if name == "deepep_low_latency":
            # bf16 in, fp8 out: the kernel quantises per token and 128 channels.
            h = mgr.get_handle(EPSpec(hidden=hidden, num_experts=8, topk=2,
                                      max_tokens_per_rank=4, dtype=BF16))
            res = mgr.dispatch(x, w, ids, handle=h)
            assert res.x.dtype == torch.float8_e4m3fn and res.x_scales.dtype == torch.float32
            assert tuple(res.x_scales.shape) == (*res.x.shape[:2], hidden // 128)
            deq = []
            for e, c in enumerate(res.tokens_per_expert.tolist()):
                q = res.x[e, :c].float().view(c, hidden // 128, 128)
                deq.append((q * res.x_scales[e, :c].unsqueeze(-1)).view(c, hidden))
            out["dequantised"] = torch.cat(deq)
            out["scales"] = torch.cat([res.x_scales[e, :c] for e, c in
                                       enumerate(res.tokens_per_expert.tolist())])
            y = mgr.combine(apply_experts(res, lambda e, q: torch.zeros(
                q.shape, dtype=BF16)), res)
            out["y_zero"] = bool((y == 0).all())
        else:
            # Caller-quantised (fp8, scales): both pass through unchanged.
            cols = -(-hidden // 128) if name == "flashinfer_mnnvl" else 2
            scales = torch.rand(n, cols, generator=gen) + r
            q = x.to(torch.float8_e4m3fn)
            h = mgr.get_handle(EPSpec(hidden=hidden, num_experts=8, topk=2,
                                      max_tokens_per_rank=4, dtype=torch.float8_e4m3fn,
                                      scale_cols=cols))
            res = mgr.dispatch(q, w, ids, handle=h, x_scales=scales)
            assert res.x.dtype == torch.float8_e4m3fn, name
            assert res.x_scales.shape[-1] == cols, name
            if res.layout is Layout.TOKEN:
                real = (res.topk_ids >= 0).any(dim=1)
                rx, rs = res.x[real], res.x_scales[real]
            else:
                counts = res.tokens_per_expert.tolist()
                rx = torch.cat([res.x[e, :c] for e, c in enumerate(counts)])
                rs = torch.cat([res.x_scales[e, :c] for e, c in enumerate(counts)])
            out["rows"] = (rx.view(torch.uint8), rs)
            # Identity experts on the float8 values (cast up: torch has few float8 kernels):
            # y = float8(x) * the sum of the valid weights.
            up = dataclasses.replace(res, x=res.x.float().to(BF16))
            out["y"] = mgr.combine(apply_experts(up, lambda e, rows: rows), res)
        out["sent"] = (x, ids, w, scales)
    finally:
        mgr.destroy()
    return out


@pytest.mark.parametrize(("name", "options"), [
    ("deepep_high_throughput", {}), ("deepep_low_latency", {"use_fp8": True}),
    ("deepep_low_latency", {"use_fp8": True, "round_scale": True}), ("pplx", {}),
    ("flashinfer_mnnvl", {})], ids=["ht", "ll", "ll-round-scale", "pplx", "flashinfer"])
def test_adapter_float8_dispatch(dist_pool, name, options):
    results = dist_pool(2).run(_with_models, (MODULE[name],), _fp8, name, options,
                               timeout=TIMEOUT)
    outs = [o for o, _ in results]
    world = len(outs)
    ranges = placement_ranges(8, world)
    for r, o in enumerate(outs):
        # Rows this rank must have received (pplx adds weight-0 fillers for the -1 slot).
        want_rows = []
        for s, other in enumerate(outs):
            x, ids, _, _ = other["sent"]
            for t, token in enumerate(ids.tolist()):
                hits = [e for e in token if e in ranges[r]]
                if name == "pplx":
                    hits += [e for tt, e in _filler_pairs(s, ids, 8, world)
                             if tt == t and e in ranges[r]]
                per_rank = 1 if name in ("deepep_high_throughput", "flashinfer_mnnvl") else 0
                want_rows += [(s, t)] * (min(1, len(hits)) if per_rank else len(hits))
        if name == "deepep_low_latency":
            x_all = {(s, t): outs[s]["sent"][0][t].float() for s, t in want_rows}
            deq = o["dequantised"]
            assert deq.shape[0] == len(want_rows)
            # Every received row is one of the expected tokens within e4m3 precision (the
            # row order inside an expert is unspecified).
            for row in deq:
                err = min((row - v).abs().max().item() / max(v.abs().max().item(), 1e-3)
                          for v in x_all.values())
                assert err < 0.07, err
            if options.get("round_scale"):
                exps = torch.log2(o["scales"])
                assert torch.equal(exps, exps.round()), "round_scale: powers of two"
            assert o["y_zero"]
        else:
            rx, rs = o["rows"]
            assert rx.shape[0] == len(want_rows), (name, r)
            # x bytes and scales arrive unchanged: each received row is a sent token with its
            # own scales, and the multiset of (sender, token) is the expected one.
            sent = {}
            for s, other in enumerate(outs):
                x, _, _, scales = other["sent"]
                for t in range(x.shape[0]):
                    key = bytes(x[t].to(torch.float8_e4m3fn).view(torch.uint8).tolist())
                    sent[key] = (s, t, scales[t])
            got = []
            for row, scale_row in zip(rx, rs):
                s, t, want_scales = sent[bytes(row.tolist())]
                assert torch.equal(scale_row, want_scales), (name, s, t)
                got.append((s, t))
            assert sorted(got) == sorted(want_rows), name
            x, ids, w, _ = o["sent"]
            deq = x.to(torch.float8_e4m3fn).float()
            w_sum = torch.where(ids >= 0, w, 0).sum(dim=1, keepdim=True)
            assert torch.allclose(o["y"].float(), deq * w_sum, atol=0.1, rtol=2e-2), name


# ------------------------------------------------------------------- without the exchange
def _no_exchange(info, group, name):
    """exchange=False: no header crosses the wire; bad ids (on every rank here: a single bad
    rank would leave its peers waiting in the vendor kernel, by design) raise the device-side
    check's error and make the manager unusable."""
    r, world = info.rank, info.world_size
    hidden = SHAPES[name][0]
    xs, ws, ids = decodable_inputs([3] * world, 8, 2, 9, BF16, hidden)
    bytes_seen, errors = [], []
    for exchange in (True, False):
        mgr = build_manager(name, group, exchange=exchange)
        try:
            h = mgr.get_handle(EPSpec(hidden=hidden, num_experts=8, topk=2,
                                      max_tokens_per_rank=4))
            res = mgr.dispatch(xs[r], ws[r], ids[r], handle=h)
            mgr.combine(apply_experts(res, lambda e, q: q), res)
            bytes_seen.append((mgr.last_dispatch_bytes.total, mgr.last_combine_bytes.total))
            if not exchange:
                for bad_ids in (torch.full_like(ids[r], 8), torch.ones_like(ids[r])):
                    try:
                        mgr.dispatch(xs[r], ws[r], bad_ids, handle=h)
                    except RuntimeError as exc:
                        errors.append(str(exc))
                    try:
                        mgr.dispatch(xs[r], ws[r], ids[r], handle=h)
                    except RuntimeError as exc:
                        errors.append(str(exc))
                    mgr.destroy()
                    mgr = build_manager(name, group, exchange=False)
                    h = mgr.get_handle(EPSpec(hidden=hidden, num_experts=8, topk=2,
                                              max_tokens_per_rank=4))
        finally:
            mgr.destroy()
    return bytes_seen, errors


@pytest.mark.parametrize("name", VENDORS)
def test_adapter_without_exchange(dist_pool, name):
    results = dist_pool(2).run(_with_models, (MODULE[name],), _no_exchange, name,
                               timeout=TIMEOUT)
    for (bytes_seen, errors), _ in results:
        (with_d, with_c), (without_d, without_c) = bytes_seen
        assert with_d > 0 and with_c > 0, bytes_seen  # the header
        assert without_d == 0 and without_c == 0, bytes_seen
        assert len(errors) == 4, errors
        assert "topk_ids must be in [-1, num_experts=8)" in errors[0], errors
        assert "unusable" in errors[1], errors
        assert "must be distinct" in errors[2], errors
        assert "unusable" in errors[3], errors


# ------------------------------------------------------------------------- pplx and NVSHMEM
def _nvshmem_lifecycle(info, group):
    import pplx_kernels  # the model: what the adapter imported

    from moe_ep.testing.vendor_models import pplx_model

    states = []
    a = build_manager("pplx", group, internode=True)
    states.append(pplx_model._NVSHMEM.initialised)
    b = build_manager("pplx", group, internode=True)  # joins the process's NVSHMEM job
    h = b.get_handle(EPSpec(hidden=32, num_experts=8, topk=2, max_tokens_per_rank=4))
    a.destroy()
    states.append(pplx_model._NVSHMEM.initialised)  # b still uses it
    xs, ws, ids = decodable_inputs([2] * info.world_size, 8, 2, 3, BF16, 32)
    res = b.dispatch(xs[info.rank], ws[info.rank], ids[info.rank], handle=h)
    b.combine(apply_experts(res, lambda e, q: q), res)
    b.destroy()
    states.append(pplx_model._NVSHMEM.initialised)  # finalised after the last handle
    assert pplx_kernels.__moe_ep_contract_model__
    return states


def test_pplx_internode_initialises_and_finalises_nvshmem(dist_pool):
    results = dist_pool(2).run(_with_models, ("pplx_kernels",), _nvshmem_lifecycle,
                               timeout=TIMEOUT)
    for states, _ in results:
        assert states == [True, True, False]
    _check_calls([s for _, s in results], MUST_CALL_VARIANT["pplx-internode"])


# ------------------------------------------------------------- availability and building
CPU4 = Topology(device="cpu", world_size=4)
HGX8 = Topology(device="cuda", world_size=8, nvlink=True, gpus_per_node=8)
PCIE4 = Topology(device="cuda", world_size=4, nvlink=False, gpus_per_node=4)
TWO_NODES = Topology(device="cuda", world_size=16, local_world_size=8,
                     same_node=(True,) * 8 + (False,) * 8, nvlink=True, gpus_per_node=8)
TRAYS = Topology(device="cuda", world_size=16, local_world_size=4,
                 same_node=(True,) * 4 + (False,) * 12, nvlink=True, gpus_per_node=4)


def test_availability_without_the_packages():
    """Here the vendor packages are absent: each backend says so first, then the device."""
    for name in VENDORS:
        module = MODULE[name]
        if sys.modules.get(module) is not None or _installed(module):
            pytest.skip(f"{module} is installed here")
        ok, reason = available_managers(CPU4)[name]
        assert not ok and reason.startswith(f"{module} is not installed"), reason
        assert "needs CUDA devices" in reason, reason
        ok, reason = available_managers(HGX8)[name]
        assert not ok and reason.startswith(f"{module} is not installed"), reason
        assert "needs CUDA" not in reason


def test_topo_lists_the_vendor_backends_unavailable_with_the_reason(capsys):
    from moe_ep.cli import main

    assert main(["topo"]) == 0
    out = capsys.readouterr().out
    for name in VENDORS:
        line = next(x for x in out.splitlines() if x.split()[:1] == [name])
        if not _installed(MODULE[name]):
            assert line.split()[1] == "no", line
            assert f"{MODULE[name]} is not installed" in line, line
        if not torch.cuda.is_available():
            assert line.split()[1] == "no" and "needs CUDA devices" in line, line


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize(("name", "topology", "ok", "fragment"), [
    ("deepep_high_throughput", HGX8, True, "NVLink (8 ranks, one node)"),
    ("deepep_high_throughput", PCIE4, False, "connected by NVLink"),
    ("deepep_high_throughput", Topology(device="cuda", world_size=6), False,
     "normal kernels run on (2, 4, 8, 16"),
    ("deepep_high_throughput", TWO_NODES, True, "NVLink and RDMA"),
    ("deepep_high_throughput", TRAYS, False, "8 GPUs per node"),
    ("deepep_low_latency", TWO_NODES, True, "NVLink and RDMA"),
    ("deepep_low_latency", Topology(device="cuda", world_size=12), False,
     "fewer than 8 ranks or a multiple of 8"),
    ("deepep_low_latency", Topology(device="cuda", world_size=1), False, "at least 2 ranks"),
    ("pplx", HGX8, True, "CUDA IPC"),
    ("pplx", TWO_NODES, True, "NVSHMEM"),
    ("pplx", PCIE4, False, "peer access"),
    ("flashinfer_mnnvl", TRAYS, True, "MNNVL"),
    ("flashinfer_mnnvl", Topology(device="cuda", world_size=300), False, "at most 256"),
    ("flashinfer_mnnvl", PCIE4, False, "MNNVL needs NVLink"),
    ("pplx", CPU4, False, "needs CUDA devices"),
])
def test_availability_rules(name, topology, ok, fragment):
    """With the package present (the model stands in for it) the reason is the topology's."""
    with installed(MODULE[name]):
        got_ok, reason = get_manager_class(name).availability(topology)
    assert (got_ok, fragment in reason) == (ok, True), reason
    assert "not installed" not in reason


def test_availability_imports_no_vendor_module(tmp_path):
    """availability() finds the packages without importing them (a fake deep_ep that raises on
    import, with the sgl wheel's build info; a flashinfer-python too old for the adapter)."""
    pkg = tmp_path / "deep_ep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('deep_ep was imported')\n")
    (pkg / "_build_info.py").write_text('EXPECTED_CUDA_MAJOR = 13\nCUDA_TAG = "cu130"\n')
    fi = tmp_path / "flashinfer"
    fi.mkdir()
    (fi / "__init__.py").write_text("raise ImportError('flashinfer was imported')\n")
    dist = tmp_path / "flashinfer_python-0.6.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flashinfer-python\n"
                                   "Version: 0.6.1\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        from moe_ep.distributed import Topology
        from moe_ep.managers import available_managers
        torch.version.cuda = "12.8"  # as a CUDA 12 torch reports it
        report = available_managers(Topology(device="cuda", world_size=8, nvlink=True))
        assert "deep_ep" not in sys.modules and "flashinfer" not in sys.modules
        for name in ("deepep_high_throughput", "deepep_low_latency", "flashinfer_mnnvl"):
            print(name, report[name])
    """)
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    for line in lines[:2]:
        assert "(False, 'this deep_ep build needs a CUDA 13 torch; this torch has CUDA 12.8')" \
            in line, line
    assert "flashinfer-python 0.6.1 is installed; the adapter needs the flashinfer.moe_ep " \
        "API of >=0.7.4,<0.8" in lines[2], lines[2]


def _build_on_cpu(info, group, name):
    try:
        build_manager(name, group)
    except ManagerUnavailableError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", VENDORS)
def test_building_on_a_cpu_group_fails_on_every_rank(dist_pool, name):
    """Without a contract model a CPU group is refused: every rank raises, with every rank's
    reasons (the real package would need CUDA)."""
    results = dist_pool(2).run(_with_models, (), _build_on_cpu, name, timeout=TIMEOUT)
    for msg, _ in results:
        assert msg is not None and f"manager {name!r} is unavailable" in msg, msg
        assert "rank 0:" in msg and "rank 1:" in msg and "needs CUDA devices" in msg, msg


def test_vllm_name_of_flashinfer_is_an_alias():
    assert resolve_name("flashinfer_all2allv") == "flashinfer_mnnvl"
    assert get_manager_class("flashinfer_all2allv").name == "flashinfer_mnnvl"


def test_configs_check_the_adapters_own_options():
    """The registry's option classes (what configs validate against, without importing a
    backend) are the ones the adapters take."""
    from moe_ep.managers.registry import options_class

    for name in VENDORS:
        assert options_class(name) is get_manager_class(name).options_cls, name


def test_adapters_read_only_real_quant_formats():
    """The FlashInfer adapter names QuantFormat.DeepSeekFp8: a member of the real enum."""
    members = dict(_snapshot()["packages"]["flashinfer"]["signatures"]["QuantFormat[]"])
    assert "DeepSeekFp8" in members
