"""Tests of the vendor contract models (moe_ep.testing.vendor_models) and their signature checks.

The models stand in for deep_ep, pplx_kernels and flashinfer.moe_ep so that adapters can be
tested on CPU; these tests pin the models to the vendors' documented behaviour. Every rank
builds every rank's input from a seed, so the expected receive layouts, counts and combine
results are computed here, independently of the models, with plain torch and Python loops.
They are contract tests: they say nothing about the CUDA kernels themselves.

Data is decodable (DeepEP test style): token ``n`` of rank ``r`` is ``r + 1`` in every column
but the last, which holds ``n``; expert ``e`` computes ``f_e(x) = (e + 1) x``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_ep.testing.vendor_models import (
    ModelNotImplementedError,
    SimulatedHang,
    VendorContractError,
    installed,
    run_with_models,
)
from moe_ep.testing.vendor_models import signatures as sigs

SNAPSHOT = Path(__file__).parent / "vendor_signatures" / "snapshot.json"
# Where the signature test looks for the real artifacts (wheels, a pplx-kernels git dir).
CACHE = Path(os.environ.get("MOE_EP_VENDOR_CACHE", Path.home() / ".cache" / "moe_ep" / "vendor"))
WORLDS = (2, 4)
TIMEOUT = 180


# ------------------------------------------------------------------------------ global data
def _num_tokens(world: int, rank: int, case: int, cap: int) -> int:
    """Differing counts, one rank (rotating with the case) with none."""
    if rank == case % world:
        return 0
    return 1 + (3 * rank + 2 * case) % cap


def _inputs(world: int, rank: int, case: int, num_experts: int, topk: int, hidden: int,
            cap: int, holes: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s ``(x [N, H] bf16, topk_idx [N, K] int64, weights [N, K] fp32)``.

    Ids are distinct per token; with ``holes`` some are -1 (one token entirely).
    """
    gen = torch.Generator().manual_seed(1000 * case + rank)
    n = _num_tokens(world, rank, case, cap)
    x = torch.full((n, hidden), float(rank + 1), dtype=torch.bfloat16)
    x[:, -1] = torch.arange(n, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:topk] for _ in range(n)]) \
        if n else torch.empty((0, topk), dtype=torch.int64)
    if holes and n:
        ids[0, 0] = -1
        if n > 2:
            ids[2] = -1
    weights = torch.rand((n, topk), generator=gen)
    return x, ids.long(), weights


def _moe_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k (e_k + 1) x`` in fp32, ids of -1 adding nothing (Python loop)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for n in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[n, k])
            if e >= 0:
                out[n] += float(weights[n, k]) * (e + 1) * x[n].float()
    return out


def _decode(row: torch.Tensor) -> tuple[int, int]:
    """(source rank, token index) of a decodable row."""
    return int(row[0].float()) - 1, int(row[-1].float())


# ------------------------------------------------------------------------------ DeepEP normal
def _deepep_ht(info, cases) -> None:
    import deep_ep

    w, rank = info.world_size, info.rank
    group = dist.group.WORLD
    for case, (num_experts, topk, hidden, alignment) in enumerate(cases):
        local = num_experts // w
        data = [_inputs(w, r, case, num_experts, topk, hidden, 6) for r in range(w)]
        x, ids, weights = data[rank]
        nvl = max(deep_ep.Buffer.get_dispatch_config(w).get_nvl_buffer_size_hint(hidden * 2, w),
                  deep_ep.Buffer.get_combine_config(w).get_nvl_buffer_size_hint(hidden * 2, w))
        buf = deep_ep.Buffer(group, nvl, 0, explicitly_destroy=True)
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(ids, num_experts)
        assert per_rdma is None
        for r in range(w):
            ref = [n for n in range(ids.shape[0])
                   if any(int(e) >= 0 and int(e) // local == r for e in ids[n])]
            assert int(per_rank[r]) == len(ref)
            assert in_rank[:, r].nonzero().flatten().tolist() == ref
        for e in range(num_experts):
            assert int(per_expert[e]) == int((ids == e).sum())
        assert per_rank.dtype == per_expert.dtype == torch.int32 and in_rank.dtype == torch.bool

        recv_x, recv_ids, recv_w, counts, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=ids, topk_weights=weights,
            expert_alignment=alignment)
        # Expected: source ranks in order, each source's tokens in token order.
        exp_rows, exp_ids, exp_w = [], [], []
        for s, (_, ids_s, w_s) in enumerate(data):
            for n in range(ids_s.shape[0]):
                mine = [(int(e) - rank * local, float(wt)) if 0 <= int(e) - rank * local < local
                        and int(e) >= 0 else (-1, 0.0) for e, wt in zip(ids_s[n], w_s[n])]
                if any(e >= 0 for e, _ in mine):
                    exp_rows.append((s, n))
                    exp_ids.append([e for e, _ in mine])
                    exp_w.append([wt for _, wt in mine])
        assert [_decode(r) for r in recv_x] == exp_rows
        assert recv_ids.tolist() == exp_ids
        assert torch.allclose(recv_w, torch.tensor(exp_w).view(-1, topk))
        exp_counts = [sum(int((d[1] == rank * local + e).sum()) for d in data)
                      for e in range(local)]
        assert counts == [-(-c // alignment) * alignment for c in exp_counts]
        rank_prefix = handle[0]
        assert int(rank_prefix[w - 1, rank]) == len(exp_rows)

        # async_finish hands back an event to wait on (a no-op on CPU); `with` waits on exit.
        *_, event = buf.dispatch(x, handle=handle, async_finish=True)
        assert event.event is not None
        event.current_stream_wait()
        with buf.dispatch(x, handle=handle, async_finish=True)[-1]:
            pass
        assert buf.dispatch(x, handle=handle)[-1].event is None

        # Cached replay: same layout, new data, no top-k back.
        x2 = x * 2
        replay = buf.dispatch(x2, handle=handle)
        assert replay[1:5] == (None, None, None, None)
        assert torch.equal(replay[0], recv_x * 2)

        # combine is unweighted: each token comes back times the ranks it went to.
        sent_to = in_rank.sum(dim=1, keepdim=True).float()
        combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        assert combined.dtype == torch.bfloat16
        assert torch.equal(combined.float(), x.float() * sent_to)
        assert torch.allclose(combined_w, torch.where(ids >= 0, weights, 0.0))
        # The TOKEN recipe: experts apply the weights, the unweighted combine sums: the MoE.
        expert_out = torch.zeros(recv_x.shape, dtype=torch.float32)
        for i in range(recv_x.shape[0]):
            for k in range(topk):
                e = int(recv_ids[i, k])
                if e >= 0:
                    expert_out[i] += float(recv_w[i, k]) * (rank * local + e + 1) \
                        * recv_x[i].float()
        y, _, _ = buf.combine(expert_out.to(torch.bfloat16), handle)
        torch.testing.assert_close(y.float(), _moe_reference(x, ids, weights),
                                   rtol=2e-2, atol=5e-2)

        # num_worst_tokens: fixed-size outputs, padding ids -1, empty count list.
        worst = w * 6
        wx, wids, ww, wcounts, whandle, _ = buf.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=ids, topk_weights=weights,
            num_worst_tokens=worst)
        m = recv_x.shape[0]
        assert wx.shape == (worst, hidden) and wcounts == []
        assert torch.equal(wx[:m], recv_x) and torch.equal(wids[:m], recv_ids)
        assert (wids[m:] == -1).all()
        wy, _, _ = buf.combine(wx, whandle)  # the (poisoned) padding rows are not read
        assert torch.equal(wy.float(), x.float() * sent_to)

        # FP8 (x, scales): both travel; scales may be column-major.
        scales = (torch.arange(x.shape[0] * (hidden // 128), dtype=torch.float32)
                  .view(-1, hidden // 128) + 100 * rank).t().contiguous().t()
        fp8 = x.to(torch.float8_e4m3fn)
        (rq, rs), *_ = buf.dispatch((fp8, scales), handle=handle)
        assert rq.dtype == torch.float8_e4m3fn and rs.shape == (m, hidden // 128)
        for i, (s, n) in enumerate(exp_rows):
            assert int(rs[i, 0]) == 100 * s + n * (hidden // 128)
        buf.destroy()


def _deepep_ht_errors(info) -> list[str]:
    import deep_ep

    w = info.world_size
    group = dist.group.WORLD
    x, ids, weights = _inputs(w, info.rank, 1, 8, 2, 128, 4, holes=False)
    got: list[str] = []
    with pytest.raises(AssertionError, match="even"):
        deep_ep.Buffer.set_num_sms(21)
    with pytest.raises(RuntimeError, match="NUM_BUFFER_ALIGNMENT"):
        deep_ep.Buffer(group, 1000, 0)
    buf = deep_ep.Buffer(group, 1 << 20, 0)  # too small for the default config's chunks
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(ids, 8)
    with pytest.raises(RuntimeError, match="NVL bytes"):
        buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                     num_tokens_per_expert=per_expert, topk_idx=ids, topk_weights=weights)
    with pytest.raises(AssertionError, match="explicitly_destroy"):
        buf.destroy()
    nvl = deep_ep.Buffer.get_dispatch_config(w).get_nvl_buffer_size_hint(256, w)
    buf = deep_ep.Buffer(group, nvl, 0, explicitly_destroy=True)
    with pytest.raises(RuntimeError, match="expected scalar type"):
        buf.get_dispatch_layout(ids.int(), 8)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=ids, topk_weights=weights)
    # The normal combine kernel exists for bf16 only.
    with pytest.raises(RuntimeError, match="Unsupported type"):
        buf.combine(recv_x.float(), handle)
    with pytest.raises(AssertionError):
        buf.dispatch(x, handle=handle, topk_idx=ids, topk_weights=weights)
    wrong = per_rank.clone()
    wrong[0] += 1
    with pytest.raises(VendorContractError, match="column sums"):
        buf.dispatch(x, num_tokens_per_rank=wrong, is_token_in_rank=in_rank,
                     num_tokens_per_expert=per_expert, topk_idx=ids, topk_weights=weights)
    buf.destroy()
    with pytest.raises(AttributeError):
        buf.get_dispatch_layout(ids, 8)
    got.append("ok")
    return got


@pytest.mark.parametrize("world", WORLDS)
def test_deepep_normal_dispatch_combine(dist_pool, world):
    cases = [(8, 2, 128, 1), (12 if world == 4 else 10, 3, 256, 4), (4 * world, 1, 128, 1)]
    dist_pool(world).run(run_with_models, ("deep_ep",), _deepep_ht, cases, timeout=TIMEOUT)


@pytest.mark.parametrize("world", WORLDS)
def test_deepep_normal_errors(dist_pool, world):
    out = dist_pool(world).run(run_with_models, ("deep_ep",), _deepep_ht_errors, timeout=TIMEOUT)
    assert out == [["ok"]] * world


# ------------------------------------------------------------------------------ DeepEP LL
def _ll_blocks(recv, handle, e):
    """``{(src, token): row}`` of local expert ``e`` from the handle's layout."""
    src_info, layout_range = handle[0], handle[1]
    rows = {}
    for s in range(layout_range.shape[1]):
        packed = int(layout_range[e, s])
        begin, count = packed >> 32, packed & 0xFFFFFFFF
        for i in range(begin, begin + count):
            rows[(s, int(src_info[e, i]))] = recv[e, i]
    return rows


def _deepep_ll(info, max_tokens, num_experts, topk) -> None:
    import deep_ep

    w, rank = info.world_size, info.rank
    hidden, local = 2048, num_experts // w
    group = dist.group.WORLD
    data = [_inputs(w, r, 3, num_experts, topk, hidden, max_tokens) for r in range(w)]
    x, ids, weights = data[rank]
    nbytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, w, num_experts)
    buf = deep_ep.Buffer(group, 0, nbytes, low_latency_mode=True, num_qps_per_rank=local,
                         allow_nvlink_for_low_latency_mode=True, explicitly_destroy=True)
    assert buf.model_nvshmem_env["NVSHMEM_IBGDA_NUM_RC_PER_PE"] == str(local)
    stats = torch.zeros(local, dtype=torch.int32)
    recv, count, handle, _, hook = buf.low_latency_dispatch(
        x, ids, max_tokens, num_experts, use_fp8=False, cumulative_local_expert_recv_stats=stats)
    assert hook is None
    assert recv.shape == (local, w * max_tokens, hidden) and recv.dtype == torch.bfloat16
    assert count.dtype == torch.int32 and torch.equal(stats, count)
    for e in range(local):
        g = rank * local + e
        expected = {(s, n) for s, d in enumerate(data) for n in range(d[1].shape[0])
                    if g in d[1][n].tolist()}
        assert int(count[e]) == len(expected)
        rows = _ll_blocks(recv, handle, e)
        assert set(rows) == expected
        assert all(_decode(row) == key for key, row in rows.items())
        # Rows past the count are not data (the model poisons them).
        assert torch.isnan(recv[e, int(count[e]):].float()).all()

    # Weighted combine: sum_k w_k f_{e_k}(x).
    y = torch.stack([recv[e].float().nan_to_num(0.0) * (rank * local + e + 1)
                     for e in range(local)]).to(torch.bfloat16)
    out, _, _ = buf.low_latency_combine(y, ids, weights, handle)
    torch.testing.assert_close(out.float(), _moe_reference(x, ids, weights), rtol=2e-2,
                               atol=5e-2)
    # zero_copy: the expert output written into the registered buffer instead.
    zc = buf.get_next_low_latency_combine_buffer(handle)
    assert zc.shape == y.shape and zc.stride(1) > hidden  # rows are padded, as in the real one
    zc.copy_(y)
    pre = torch.empty((x.shape[0], hidden), dtype=torch.bfloat16)
    out2, _, _ = buf.low_latency_combine(torch.zeros_like(y), ids, weights, handle,
                                         zero_copy=True, out=pre)
    assert out2 is pre and torch.equal(out2, out)

    # Hooks: the data lands only when the hook runs.
    recv_h, count_h, handle_h, _, hook = buf.low_latency_dispatch(
        x, ids, max_tokens, num_experts, use_fp8=False, return_recv_hook=True)
    assert torch.isnan(recv_h.float()).all()
    hook()
    for e in range(local):
        assert {k: _decode(v) for k, v in _ll_blocks(recv_h, handle_h, e).items()} == \
            {k: _decode(v) for k, v in _ll_blocks(recv, handle, e).items()}

    # clean_low_latency_buffer is collective and leaves the buffer usable.
    buf.clean_low_latency_buffer(max_tokens, hidden, num_experts)

    # A pending hook dies with the next LL launch on the Buffer (it re-arms the signals).
    _, _, _, _, stale = buf.low_latency_dispatch(x, ids, max_tokens, num_experts,
                                                 use_fp8=False, return_recv_hook=True)
    buf.low_latency_dispatch(x, ids, max_tokens, num_experts, use_fp8=False)
    with pytest.raises(VendorContractError, match="newer LL kernel"):
        stale()

    # FP8: e4m3 data with per-128-channel scales, column-major in the last two dims.
    xr = torch.randn((x.shape[0], hidden), generator=torch.Generator().manual_seed(rank)) \
        .to(torch.bfloat16)
    ref_recv, _, ref_handle, _, _ = buf.low_latency_dispatch(xr, ids, max_tokens, num_experts,
                                                             use_fp8=False)
    for round_scale, ue8m0 in ((False, False), (True, False), (True, True)):
        (q, s), cnt, h, _, _ = buf.low_latency_dispatch(
            xr, ids, max_tokens, num_experts, use_fp8=True, round_scale=round_scale,
            use_ue8m0=ue8m0)
        assert q.dtype == torch.float8_e4m3fn and s.stride(1) == 1
        if ue8m0:
            assert s.dtype == torch.int32 and s.shape[2] == hidden // 512
            exps = s.contiguous().view(torch.uint8).view(*s.shape[:2], hidden // 128)
            scale = torch.exp2(exps.float() - 127)
        else:
            assert s.dtype == torch.float32 and s.shape[2] == hidden // 128
            scale = s
        if round_scale:  # powers of two
            for e in range(local):
                valid = scale[e, :int(cnt[e])]
                assert torch.equal(valid, torch.exp2(torch.round(torch.log2(valid))))
        deq = q.float() * scale.repeat_interleave(128, dim=-1)
        for e in range(local):
            a, b = _ll_blocks(ref_recv, ref_handle, e), _ll_blocks(deq, h, e)
            assert set(a) == set(b)
            for key in a:
                torch.testing.assert_close(b[key], a[key].float(), rtol=0.07, atol=0.02)
    buf.destroy()


def _deepep_ll_errors(info, max_tokens) -> str:
    import deep_ep

    w = info.world_size
    group = dist.group.WORLD
    e, hidden = 2 * w, 2048
    x, ids, weights = _inputs(w, info.rank, 5, e, 2, hidden, 4, holes=False)
    nbytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(8, hidden, w, e)
    with pytest.raises(RuntimeError, match="layout.total_bytes"):
        small = deep_ep.Buffer(group, 0, nbytes - 256, low_latency_mode=True, num_qps_per_rank=2)
        small.low_latency_dispatch(x, ids, 8, e, use_fp8=False)
    buf = deep_ep.Buffer(group, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(
        600, 4096, w, e), low_latency_mode=True, num_qps_per_rank=2)
    with pytest.raises(RuntimeError, match="Unsupported hidden"):
        buf.low_latency_dispatch(torch.zeros((x.shape[0], 1024), dtype=torch.bfloat16), ids, 8,
                                 e, use_fp8=False)
    with pytest.raises(RuntimeError, match="kNumMaxTopK"):
        buf.low_latency_dispatch(x, torch.zeros((x.shape[0], 12), dtype=torch.int64), 8, e)
    with pytest.raises(RuntimeError, match="num_max_dispatch_tokens_per_rank"):
        buf.low_latency_dispatch(torch.zeros((9, hidden), dtype=torch.bfloat16),
                                 torch.zeros((9, 2), dtype=torch.int64), 8, e)
    with pytest.raises(RuntimeError, match="kBFloat16"):
        buf.low_latency_dispatch(x.float(), ids, 8, e)
    with pytest.raises(AssertionError):  # (max + 1) * 2 > the NVSHMEM QP depth (1024)
        buf.low_latency_dispatch(x, ids, 600, e)
    normal = deep_ep.Buffer(group, 1 << 24, 0)
    with pytest.raises(RuntimeError, match="low_latency_mode"):
        normal.low_latency_dispatch(x, ids, 8, e)
    # Ranks passing different max tokens: the real kernels spin; the model raises everywhere.
    try:
        buf.low_latency_dispatch(x, ids, max_tokens, e, use_fp8=False)
    except SimulatedHang:
        return "hang"
    return "ran"


@pytest.mark.parametrize("world", WORLDS)
def test_deepep_low_latency(dist_pool, world):
    dist_pool(world).run(run_with_models, ("deep_ep",), _deepep_ll, 8, 2 * world, 3,
                         timeout=TIMEOUT)


@pytest.mark.parametrize("world", WORLDS)
def test_deepep_low_latency_limits(dist_pool, world):
    pool = dist_pool(world)
    # Same max everywhere: runs; one rank differs: every rank sees the simulated hang.
    assert pool.run(run_with_models, ("deep_ep",), _deepep_ll_errors, 8,
                    timeout=TIMEOUT) == ["ran"] * world
    out = pool.run(run_with_models, ("deep_ep",), _ll_mismatch, timeout=TIMEOUT)
    assert out == ["hang"] * world


def _ll_mismatch(info) -> str:
    return _deepep_ll_errors(info, 8 if info.rank else 16)


def test_deepep_size_hints_and_config():
    """Host-side helpers (no ranks): the LL hint bounds the layout; Config checks."""
    with installed("deep_ep"):
        import deep_ep

        h = deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
        # Lower bound from the layout's receive areas alone: 2 * E * max * (16 + 2H).
        assert h >= 2 * 256 * 128 * (16 + 2 * 7168) and h % 128 == 0
        assert deep_ep.Buffer.get_low_latency_rdma_size_hint(256, 7168, 8, 256) > h
        cfg = deep_ep.Config(24, 6, 256, 6, 128)
        assert cfg.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
        assert cfg.get_rdma_buffer_size_hint(7168 * 2, 16) > 0
        assert cfg.get_nvl_buffer_size_hint(7168 * 2, 8) % 128 == 0
        with pytest.raises(RuntimeError, match="send_tokens < num_max_nvl_chunked_recv"):
            deep_ep.Config(20, 256, 256)
        assert deep_ep.topk_idx_t == torch.int64
        with pytest.raises(AssertionError, match="Unsupported number of EP ranks"):
            deep_ep.Buffer.get_dispatch_config(3)


# ------------------------------------------------------------------------------ ElasticBuffer
def _elastic(info) -> None:
    import deep_ep

    w, rank = info.world_size, info.rank
    group = dist.group.WORLD
    data = [_inputs(w, r, 7, 2 * w, 2, 128, 5) for r in range(w)]
    x, ids, weights = data[rank]
    buf = deep_ep.ElasticBuffer(group, num_max_tokens_per_rank=8, hidden=128, num_topk=2,
                                deterministic=True, explicitly_destroy=True)
    recv_x, recv_ids, recv_w, handle, _ = buf.dispatch(x, topk_idx=ids, topk_weights=weights,
                                                       num_experts=2 * w)
    # deterministic=True: sorted by src_rank * max + token.
    expected = [(s, n) for s, d in enumerate(data) for n in range(d[1].shape[0])
                if any(0 <= int(e) - 2 * rank < 2 for e in d[1][n])]
    assert [_decode(r) for r in recv_x] == expected
    assert ((recv_ids == -1) | ((recv_ids >= 0) & (recv_ids < 2))).all()
    combined, _, _ = buf.combine(recv_x, handle)
    went = torch.stack([((ids >= 2 * r) & (ids < 2 * r + 2)).any(dim=1) for r in range(w)],
                       dim=1).sum(dim=1, keepdim=True)
    assert torch.equal(combined.float(), x.float() * went)
    with pytest.raises(ModelNotImplementedError):
        buf.dispatch(x, topk_idx=ids, topk_weights=weights, num_experts=2 * w, do_expand=True)
    buf.destroy()


@pytest.mark.parametrize("world", WORLDS)
def test_deepep_elastic_non_expanding(dist_pool, world):
    dist_pool(world).run(run_with_models, ("deep_ep",), _elastic, timeout=TIMEOUT)


# ------------------------------------------------------------------------------ pplx
def _group_name() -> str:
    from torch.distributed import distributed_c10d as c10d

    return c10d._world.pg_names[dist.group.WORLD]


def _pplx(info, dp_size, internode, fp8) -> None:
    import pplx_kernels as pplx

    w, rank = info.world_size, info.rank
    num_experts, topk, hidden, cap = 2 * w, 2, 256, 6
    num_dp = w // dp_size
    local = num_experts // w
    # Ranks of one DP group hold the same tokens.
    data = [_inputs(num_dp, g, 11, num_experts, topk, hidden, cap, holes=False)
            for g in range(num_dp)]
    x, ids, weights = data[rank // dp_size]
    n = x.shape[0]
    scale_cols = hidden // 128
    # The byte size must be a multiple of 16; the kernel copies that many bytes of every scale
    # row, so the caller's scale tensors carry the padding columns too.
    scale_bytes = -(-scale_cols * 4 // 16) * 16 if fp8 else 0
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    elem = 1 if fp8 else 2
    if internode:
        uid = pplx.nvshmem_get_unique_id() if rank == 0 else pplx.nvshmem_alloc_empty_unique_id()
        dist.broadcast(uid, src=0)
        assert pplx.nvshmem_init(uid, rank, w) == 0
        assert pplx.nvshmem_my_pe() == rank and pplx.nvshmem_n_pes() == w
        a2a = pplx.AllToAll.internode(cap, num_experts, topk, rank, w, dp_size, hidden,
                                      hidden * elem, scale_bytes)
    else:
        a2a = pplx.AllToAll.intranode(cap, num_experts, topk, rank, w, dp_size, hidden,
                                      hidden * elem, scale_bytes, _group_name())
    rows = cap * num_dp
    num = torch.empty(local, dtype=torch.int32)
    out_x = torch.full((local, rows, hidden), -7.0).to(dtype)
    out_s = torch.full((local, rows, scale_bytes // 4), -7.0) if fp8 else None
    # dp_x has room for cap tokens; bound_m says how many are real.
    dp_x = torch.zeros((cap, hidden), dtype=torch.bfloat16)
    dp_x[:n] = x
    idx = torch.zeros((cap, topk), dtype=torch.int64)
    idx[:n] = ids
    idx = idx.to(torch.uint32)
    bound = torch.tensor([n], dtype=torch.uint32)
    dp_s = None
    if fp8:
        dp_s = torch.full((cap, scale_bytes // 4), -1.0)
        dp_s[:n, :scale_cols] = torch.arange(n).view(-1, 1).float() + 100 * (rank // dp_size)
    a2a.dispatch(num, out_x, out_s, dp_x.to(dtype), dp_s, idx, bound, do_send=True,
                 do_recv=False)
    a2a.dispatch(num, out_x, out_s, dp_x.to(dtype), dp_s, idx, bound, do_send=False,
                 do_recv=True)
    for e in range(local):
        g = rank * local + e
        expected = sorted((s, t) for s, d in enumerate(data) for t in range(d[1].shape[0])
                          if g in d[1][t].tolist())
        c = int(num[e])
        assert c == len(expected)
        assert sorted(_decode(r) for r in out_x[e, :c].to(torch.bfloat16)) == expected
        assert (out_x[e, c:].float() == -7).all()  # caller-allocated: untouched past the count
        if fp8:
            got = sorted((int(v[0]) // 100, int(v[0]) % 100) for v in out_s[e, :c])
            assert got == expected
            assert (out_s[e, :c, scale_cols:] == -1).all()  # padding columns travel too
            assert (out_s[e, c:] == -7).all()
    # Weighted combine.
    expert_y = torch.stack([out_x[e].float() * (rank * local + e + 1)
                            for e in range(local)]).to(torch.bfloat16)
    out = torch.full((cap, hidden), float("nan"), dtype=torch.bfloat16)
    a2a.combine(out, idx, weights_padded(weights, cap), expert_y, bound)
    ref = _moe_reference(x.to(dtype).to(torch.bfloat16), ids, weights)
    torch.testing.assert_close(out[:n].float(), ref, rtol=2e-2, atol=5e-2)
    assert torch.isnan(out[n:].float()).all()  # rows past bound_m untouched
    # One routing per object: a second dispatch before the combine is refused.
    a2a.dispatch(num, out_x, out_s, dp_x.to(dtype), dp_s, idx, bound)
    with pytest.raises(VendorContractError, match="one routing"):
        a2a.dispatch(num, out_x, out_s, dp_x.to(dtype), dp_s, idx, bound)
    a2a.destroy()
    with pytest.raises(AssertionError):
        a2a.dispatch(num, out_x, out_s, dp_x.to(dtype), dp_s, idx, bound)
    if internode:
        pplx.nvshmem_finalize()


def weights_padded(weights: torch.Tensor, cap: int) -> torch.Tensor:
    out = torch.zeros((cap, weights.shape[1]))
    out[:weights.shape[0]] = weights
    return out


def _pplx_errors(info) -> str:
    import pplx_kernels as pplx

    w, rank = info.world_size, info.rank
    name = _group_name()
    with pytest.raises(AssertionError):
        pplx.AllToAll.intranode(4, 2 * w, 2, rank, w, w, 128, 256, 0, name)  # 1 DP group
    with pytest.raises(RuntimeError, match="invalid hidden dim bytes"):
        pplx.AllToAll.intranode(4, 2 * w, 2, rank, w, 1, 100, 200, 0, name)
    with pytest.raises(VendorContractError, match="not a multiple"):
        pplx.AllToAll.intranode(4, 2 * w + 1, 2, rank, w, 1, 128, 256, 0, name)
    with pytest.raises(VendorContractError, match="nvshmem_init"):
        pplx.AllToAll.internode(4, 2 * w, 2, rank, w, 1, 128, 256, 0)
    a2a = pplx.AllToAll.intranode(4, 2 * w, 2, rank, w, 1, 128, 256, 0, name)
    num = torch.empty(2, dtype=torch.int32)
    out_x = torch.empty((2, 4 * w, 128), dtype=torch.bfloat16)
    x = torch.ones((2, 128), dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="UInt32"):
        a2a.dispatch(num, out_x, None, x, None, torch.zeros((2, 2), dtype=torch.int64), None)
    # -1 has no meaning for pplx: as uint32 it is an expert that does not exist.
    minus_one = torch.tensor([[0, -1], [1, 0]], dtype=torch.int64).to(torch.uint32)
    with pytest.raises(VendorContractError, match="no 'no expert' id"):
        a2a.dispatch(num, out_x, None, x, None, minus_one, None)
    with pytest.raises(VendorContractError, match="combine without"):
        a2a.combine(torch.empty((2, 128), dtype=torch.bfloat16),
                    torch.zeros((2, 2), dtype=torch.int64).to(torch.uint32),
                    torch.ones((2, 2)), out_x, None)
    return "ok"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(("internode", "fp8"), [(False, False), (True, True)])
def test_pplx_dispatch_combine(dist_pool, world, internode, fp8):
    dist_pool(world).run(run_with_models, ("pplx_kernels",), _pplx, 1, internode, fp8,
                         timeout=TIMEOUT)


def test_pplx_data_parallel_groups(dist_pool):
    """dp_size=2 at W=4: each DP group's tokens are sent once and combined on both members."""
    dist_pool(4).run(run_with_models, ("pplx_kernels",), _pplx, 2, False, False,
                     timeout=TIMEOUT)


@pytest.mark.parametrize("world", WORLDS)
def test_pplx_errors(dist_pool, world):
    assert dist_pool(world).run(run_with_models, ("pplx_kernels",), _pplx_errors,
                                timeout=TIMEOUT) == ["ok"] * world


# ------------------------------------------------------------------------------ flashinfer
def _flashinfer(info) -> None:
    from flashinfer.moe_ep import (
        BootstrapConfig,
        MoEEpCommParams,
        NVLinkOneSidedConfig,
        create_communication,
    )

    w, rank = info.world_size, info.rank
    num_experts, topk, hidden, cap = 2 * w, 2, 64, 6
    local = num_experts // w
    data = [_inputs(w, r, 13, num_experts, topk, hidden, cap) for r in range(w)]
    x, ids, weights = data[rank]
    comm = create_communication(BootstrapConfig(w, rank, process_group=dist.group.WORLD),
                                MoEEpCommParams(num_experts, topk, cap, hidden),
                                NVLinkOneSidedConfig())
    res = comm.dispatch(x, ids.int(), weights, runtime_max_tokens_per_rank=cap)
    assert res.hidden_states.shape == (w * cap, hidden) and res.tokens_per_rank == cap
    got_ids = res.topk_ids.view(w, cap, topk)
    for s, (_, ids_s, _) in enumerate(data):
        expected = {t for t in range(ids_s.shape[0])
                    if any(int(e) >= 0 and int(e) // local == rank for e in ids_s[t])}
        block = res.hidden_states.view(w, cap, hidden)[s]
        c = len(expected)
        assert sorted(_decode(r)[1] for r in block[:c]) == sorted(expected)  # once each
        assert all(_decode(r)[0] == s for r in block[:c])
        for row, rid in zip(block[:c], got_ids[s, :c]):
            assert rid.tolist() == ids_s[_decode(row)[1]].tolist()  # global ids, -1 kept
        assert (got_ids[s, c:] == -1).all()  # padding rows: invalid_expert_id
    # Experts apply the weights of their local picks; combine sums over ranks.
    gid = res.topk_ids.long()
    mine = (gid >= rank * local) & (gid < (rank + 1) * local)
    factor = torch.where(mine, res.topk_weights * (gid + 1).float(), 0.0).sum(1, keepdim=True)
    expert_out = (res.hidden_states.float().nan_to_num(0.0) * factor).to(torch.bfloat16)
    buf = comm.get_combine_input_buffer(torch.bfloat16)
    buf.copy_(expert_out)
    out = comm.combine(buf)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _moe_reference(x, ids, weights), rtol=2e-2,
                               atol=5e-2)
    with pytest.raises(RuntimeError, match="combine called before dispatch"):
        comm.combine(expert_out)
    comm.dispatch(x, ids.int(), weights)
    with pytest.raises(RuntimeError, match="dispatch called twice"):
        comm.dispatch(x, ids.int(), weights)
    comm.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        comm.dispatch(x, ids.int(), weights)
    with pytest.raises(ValueError, match="supports top_k"):
        create_communication(BootstrapConfig(w, rank, process_group=dist.group.WORLD),
                             MoEEpCommParams(8 * w, 5, cap, hidden), "nvlink_one_sided")


@pytest.mark.parametrize("world", WORLDS)
def test_flashinfer_one_sided(dist_pool, world):
    dist_pool(world).run(run_with_models, ("flashinfer",), _flashinfer, timeout=TIMEOUT)


def test_flashinfer_params_validation():
    with installed("flashinfer"):
        from flashinfer.fused_moe import QuantFormat
        from flashinfer.moe_ep import MoEEpCommParams

        with pytest.raises(ValueError, match="invalid_expert_id"):
            MoEEpCommParams(8, 2, 4, 64, invalid_expert_id=3)
        with pytest.raises(ValueError, match="exceeds num_experts"):
            MoEEpCommParams(2, 4, 4, 64)
        p = MoEEpCommParams(8, 2, 4, 256, dispatch_format=QuantFormat.DeepSeekFp8)
        assert p.dispatch_bytes_per_token == 256 + 4 * 2


# ------------------------------------------------------------------------------ installing
def test_installed_models_are_importable_and_removed():
    names = ("deep_ep", "pplx_kernels", "flashinfer")
    before = {n: sys.modules.get(n) for n in names}
    with installed(*names) as modules:
        for n in names:
            spec = importlib.util.find_spec(n)
            assert spec is not None and spec.name == n
            mod = importlib.import_module(n)
            assert mod.__moe_ep_contract_model__ is True
        assert "deep_ep._C" in modules
        import deep_ep  # noqa: F401 - the adapter's own lazy import
        from pplx_kernels import AllToAll, nvshmem_init  # noqa: F401
    assert {n: sys.modules.get(n) for n in names} == before


# ------------------------------------------------------------------------------ signatures
def _snapshot() -> dict:
    return json.loads(SNAPSHOT.read_text())


def test_snapshot_records_exact_versions():
    packages = _snapshot()["packages"]
    assert packages["deep_ep"]["distribution"] == "sgl-deep-ep"
    assert packages["deep_ep"]["version"] == "0.1.2.post1"
    assert len(packages["deep_ep"]["sha256"]) == 64
    assert packages["flashinfer"]["version"] == "0.7.4"
    assert len(packages["pplx_kernels"]["commit"]) == 40
    # The wheel's compiled asserts include every limit the deep_ep model enforces.
    assert all(packages["deep_ep"]["limit_strings"].values())
    assert set(packages["deep_ep"]["limit_strings"]) == set(sigs.DEEPEP_LIMIT_STRINGS)


@pytest.mark.parametrize("surface", sigs.SURFACES, ids=lambda s: f"{s.package}.{s.qualname}")
def test_model_signature_matches_snapshot(surface):
    real = _snapshot()["packages"][surface.package]["signatures"][surface.qualname]
    diff = sigs.compare(real, sigs.model_signature(surface))
    assert diff is None, f"{surface.package}.{surface.qualname}: {diff}"


# Real exports the models leave out on purpose: deep_ep's NCCL path helper, pplx's raw ops.
_EXPORTS_LEFT_OUT = {"deep_ep": {"find_nccl_root"}, "pplx_kernels": {"ops"}}


@pytest.mark.parametrize("package", sorted(sigs.EXPORT_FILES))
def test_model_modules_export_the_real_names(package):
    real = {n for [n] in _snapshot()["packages"][package]["signatures"]["<exports>"]}
    with installed(package) as modules:
        top = modules[package]
        missing = {n for n in real - _EXPORTS_LEFT_OUT[package] if not hasattr(top, n)}
    assert not missing, f"{package} model lacks {sorted(missing)}"


def _cached(pattern: str) -> Path | None:
    found = sorted(CACHE.glob(pattern)) if CACHE.is_dir() else []
    return found[0] if found else None


def _check_against_snapshot(package: str, real: dict) -> None:
    recorded = _snapshot()["packages"][package]["signatures"]
    for name, sig in real.items():
        assert sigs.compare(recorded[name], sig) is None, f"{package}.{name} changed upstream"
    # The pybind11 surfaces come from DeepEP's C++, not from the wheel's Python files.
    pybind = {s.qualname for s in sigs.SURFACES
              if s.package == package and s.path.startswith("pybind:")}
    assert set(real) == set(recorded) - pybind


def test_snapshot_matches_real_deepep_wheel():
    wheel = _cached("sgl_deep_ep-0.1.2.post1-*.whl")
    if wheel is None:
        pytest.skip(f"no sgl_deep_ep-0.1.2.post1 wheel under {CACHE} (pip download --no-deps "
                    "sgl-deep-ep==0.1.2.post1 -d that directory)")
    src = sigs.Source(wheel)
    assert src.describe()["sha256"] == _snapshot()["packages"]["deep_ep"]["sha256"]
    _check_against_snapshot("deep_ep", sigs.real_signatures("deep_ep", src))
    found = sigs.wheel_shared_object_strings(wheel, sigs.DEEPEP_LIMIT_STRINGS)
    assert all(found.values()), [k for k, v in found.items() if not v]


def test_snapshot_matches_real_flashinfer():
    recorded = _snapshot()["packages"]["flashinfer"]
    try:
        import flashinfer
        import flashinfer.moe_ep  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed or not importable here: try the wheel
        flashinfer = None
    if flashinfer is not None and not getattr(flashinfer, "__moe_ep_contract_model__", False):
        if flashinfer.__version__ != recorded["version"]:
            pytest.skip(f"installed flashinfer {flashinfer.__version__} is not the recorded "
                        f"{recorded['version']}")
        _check_against_snapshot("flashinfer", sigs.live_flashinfer_signatures())
        return
    wheel = _cached("flashinfer_python-0.7.4-*.whl")
    if wheel is None:
        pytest.skip(f"flashinfer-python 0.7.4 is neither importable nor cached under {CACHE}")
    assert sigs.Source(wheel).describe()["sha256"] == recorded["sha256"]
    _check_against_snapshot("flashinfer", sigs.real_signatures("flashinfer", sigs.Source(wheel)))


def test_snapshot_matches_real_pplx_sources():
    recorded = _snapshot()["packages"]["pplx_kernels"]
    git_dir = CACHE / "pplx-kernels.git"
    if not git_dir.is_dir():
        pytest.skip(f"no pplx-kernels git dir at {git_dir} (git clone --bare "
                    "https://github.com/ppl-ai/pplx-kernels there)")
    src = sigs.Source(git_dir, commit=recorded["commit"])
    _check_against_snapshot("pplx_kernels", sigs.real_signatures("pplx_kernels", src))


def test_signature_comparison_detects_changes():
    """The comparison is not vacuous: a renamed, reordered or re-defaulted parameter differs."""
    base = [["self", "POSITIONAL_OR_KEYWORD", None], ["x", "POSITIONAL_OR_KEYWORD", "1"]]
    assert sigs.compare(base, base) is None
    assert sigs.compare(base, [base[0], ["y", "POSITIONAL_OR_KEYWORD", "1"]])
    assert sigs.compare(base, [base[0], ["x", "POSITIONAL_OR_KEYWORD", "2"]])
    assert sigs.compare(base, [base[0], ["x", "KEYWORD_ONLY", "1"]])
    pos = [["arg0", "POSITIONAL_ONLY", None]]
    assert sigs.compare(pos, [["hidden_bytes", "POSITIONAL_ONLY", None]]) is None
    src = "class A:\n    def f(self, a, b=2, *, c=None, **kw):\n        pass\n"
    assert sigs.signature_from_source(src, "A.f") == [
        ["self", "POSITIONAL_OR_KEYWORD", None], ["a", "POSITIONAL_OR_KEYWORD", None],
        ["b", "POSITIONAL_OR_KEYWORD", "2"], ["c", "KEYWORD_ONLY", "None"],
        ["kw", "VAR_KEYWORD", None]]
