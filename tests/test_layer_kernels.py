"""The layer's local pieces on one process: routing, FP8 quantisation, the experts fast paths."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe_ep import kernels
from moe_ep.layer import DispatchQuant, dequantize, fused_experts, quantize, route
from moe_ep.managers import DispatchResult, Layout, apply_experts
from moe_ep.testing import reference_routing

# ------------------------------------------------------------------------------------ routing

ROUTINGS = [
    dict(top_k=2),
    dict(top_k=3, renormalize=False),
    dict(top_k=2, scoring="sigmoid"),
    dict(top_k=4, scoring="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5),
    dict(top_k=3, scoring="softmax", n_group=2, topk_group=1),  # grouped, no bias: group max
    dict(top_k=8, scoring="sigmoid", n_group=8, topk_group=8),  # every group eligible
]


def _option_id(options):
    return ",".join(f"{k}={v}" for k, v in options.items())


def _dense(weights, ids, num_experts):
    return torch.zeros(ids.shape[0], num_experts, dtype=torch.float64).scatter_(
        1, ids, weights.double()
    )


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("options", ROUTINGS, ids=_option_id)
def test_route_matches_reference_routing(options, with_bias):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 16, generator=g) * 2
    bias = torch.randn(16, generator=g) if with_bias else None
    weights, ids = route(logits, correction_bias=bias, **options)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert ids.shape == (40, options["top_k"])
    assert all(len(set(r)) == len(r) for r in ids.tolist())  # distinct per token
    want = reference_routing(logits, correction_bias=bias, **options)
    torch.testing.assert_close(_dense(weights, ids, 16), want, atol=1e-6, rtol=1e-6)


def test_grouped_routing_only_uses_kept_groups():
    # Group 1 (experts 4..7) holds the single best expert, but groups are scored by their two
    # best: group 0 wins as a whole and the best expert is not eligible.
    logits = torch.tensor([[3.0, 2.9, -5, -5, 4.0, -4, -5, -5]])
    bias = torch.zeros(8)
    _, ids = route(logits, 2, scoring="sigmoid", correction_bias=bias, n_group=2, topk_group=1)
    assert sorted(ids[0].tolist()) == [0, 1]
    _, ids = route(logits, 2, scoring="sigmoid", n_group=2, topk_group=1)  # no bias: group max
    assert sorted(ids[0].tolist()) == [4, 5]


def test_bias_steers_choice_but_not_weights():
    logits = torch.tensor([[1.0, 0.0, -1.0, -2.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    w, ids = route(logits, 1, scoring="sigmoid", correction_bias=bias, renormalize=False)
    assert ids.tolist() == [[3]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[-2.0]])))


def test_route_handles_no_tokens_and_rejects_bad_options():
    w, ids = route(torch.empty(0, 8), 2, scoring="sigmoid", n_group=2, topk_group=1,
                   correction_bias=torch.zeros(8))
    assert w.shape == ids.shape == (0, 2)
    logits = torch.zeros(2, 8)
    for kwargs, match in (
        (dict(top_k=9), "top_k must be in"),
        (dict(top_k=2, scoring="tanh"), "scoring must be one of"),
        (dict(top_k=2, n_group=3, topk_group=1), "n_group=3 must divide"),
        (dict(top_k=2, n_group=4, topk_group=5), "topk_group must be"),
        (dict(top_k=5, n_group=4, topk_group=2), r"top_k must be in \[1, topk_group"),
        (dict(top_k=2, routed_scaling_factor=0), "routed_scaling_factor"),
        (dict(top_k=2, correction_bias=torch.zeros(7)), r"correction_bias must be a \[8\]"),
    ):
        with pytest.raises(ValueError, match=match):
            route(logits, **kwargs)


# ----------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("block_size", [None, 128, 48])
@pytest.mark.parametrize("shape", [(7, 200), (3, 4, 256), (0, 64)])
def test_fp8_round_trip_error_bound(block_size, shape):
    g = torch.Generator().manual_seed(0)
    # Values over five orders of magnitude, so both the normal and the subnormal range count.
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[-1])
    if x.numel():
        x[0] = 0.0  # an all-zero row stays exactly 0
    xq, scales = quantize(x, block_size=block_size)
    hidden = shape[-1]
    cols = 1 if block_size is None else -(-hidden // block_size)
    assert xq.dtype == torch.float8_e4m3fn and tuple(xq.shape) == shape
    assert scales.dtype == torch.float32 and tuple(scales.shape) == (*shape[:-1], cols)
    back = dequantize(xq, scales, block_size=block_size, dtype=torch.float32)
    per_elem_scale = scales.repeat_interleave(block_size or hidden, dim=-1)[..., :hidden]
    bound = 2.0**-4 * x.abs() + 2.0**-10 * per_elem_scale
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    if x.numel():
        assert back[0].abs().max() == 0
        # Per-block scales are at least as tight as one scale per row.
        if block_size is not None:
            assert (scales.amax(-1) <= quantize(x)[1].squeeze(-1) + 1e-12).all()


def test_fp8_bytes_and_bad_arguments():
    assert DispatchQuant().bytes_per_token(7168) == 7168 + 4
    assert DispatchQuant(block_size=128).bytes_per_token(7168) == 7168 + 4 * 56
    with pytest.raises(ValueError, match="block_size must be None"):
        DispatchQuant(block_size=0)
    xq, s = quantize(torch.randn(2, 256), block_size=128)
    with pytest.raises(ValueError, match="scales must be"):
        dequantize(xq, s)  # quantised per block, dequantised as per token
    with pytest.raises(TypeError, match="xq must be a float8_e4m3fn"):
        dequantize(xq.float(), s, block_size=128)


# ------------------------------------------------------------------ experts fast paths

E_LOCAL, H, I = 3, 24, 20


def _weights(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E_LOCAL, 2 * I, H, generator=g) * H**-0.5).to(dtype)
    w2 = (torch.randn(E_LOCAL, H, I, generator=g) * I**-0.5).to(dtype)
    return w13, w2


def _token_result(m, k, dtype, seed=2, empty_expert=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, H, generator=g).to(dtype)
    # Local ids or -1 (the expert lives on another rank), distinct within a row.
    ids = torch.stack([torch.randperm(E_LOCAL + 2, generator=g)[:k] for _ in range(m)]) if m \
        else torch.empty(0, k, dtype=torch.int64)
    ids = torch.where(ids < E_LOCAL, ids, torch.full_like(ids, -1))
    if empty_expert is not None:
        ids = torch.where(ids == empty_expert, torch.full_like(ids, -1), ids)
    w = torch.rand(m, k, generator=g) * (ids >= 0)
    counts = torch.bincount(ids[ids >= 0], minlength=E_LOCAL)
    return DispatchResult(Layout.TOKEN, x, None, ids, w, counts, None)


def _packed_from_token(res):
    valid = res.topk_ids >= 0
    e = res.topk_ids[valid]
    rows = torch.arange(res.x.shape[0]).unsqueeze(1).expand_as(res.topk_ids)[valid]
    order = torch.argsort(e, stable=True)
    return DispatchResult(Layout.EXPERT_PACKED, res.x[rows[order]], None, e[order],
                          res.topk_weights[valid][order], res.tokens_per_expert, None)


def _padded_from_packed(res, capacity):
    x = torch.full((E_LOCAL, capacity, H), float("nan"), dtype=res.x.dtype)  # garbage padding
    start = 0
    for e, n in enumerate(res.tokens_per_expert.tolist()):
        x[e, :n] = res.x[start : start + n]
        start += n
    return DispatchResult(Layout.EXPERT_PADDED, x, None, None, None, res.tokens_per_expert, None)


def _slow(res, w13, w2):
    """apply_experts with the expert MLP written out here (gate rows first, then up)."""

    def mlp(e, rows):
        return (F.silu(rows @ w13[e, :I].T) * (rows @ w13[e, I:].T)) @ w2[e].T

    return apply_experts(res, mlp)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("m,empty_expert", [(17, None), (9, 1), (0, None), (1, None)])
def test_fused_experts_agree_with_apply_experts(dtype, atol, m, empty_expert):
    w13, w2 = _weights(dtype)
    token = _token_result(m, 2, dtype, empty_expert=empty_expert)
    packed = _packed_from_token(token)
    padded = _padded_from_packed(packed, capacity=m + 3)
    for res in (token, packed, padded):
        got = fused_experts(res, w13, w2)
        want = _slow(res, w13, w2)
        assert got.shape == res.x.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol,
                                   msg=str(res.layout))
        if res.layout is not Layout.EXPERT_PADDED:
            # Written over its own input (as FusedMoE does), the output is the same.
            mine = dataclasses.replace(res, x=res.x.clone())
            over = fused_experts(mine, w13, w2, out=mine.x)
            assert over.data_ptr() == mine.x.data_ptr() or m == 0
            torch.testing.assert_close(over, got, atol=0, rtol=0, msg=str(res.layout))
    # The three layouts describe the same work: the TOKEN sum equals the weighted packed rows.
    packed_out = fused_experts(packed, w13, w2).float() * packed.topk_weights[:, None]
    rows = torch.arange(m).unsqueeze(1).expand_as(token.topk_ids)[token.topk_ids >= 0]
    rows = rows[torch.argsort(token.topk_ids[token.topk_ids >= 0], stable=True)]
    summed = torch.zeros(m, H).index_add_(0, rows, packed_out)
    torch.testing.assert_close(fused_experts(token, w13, w2).float(), summed, atol=atol, rtol=atol)


@pytest.mark.parametrize("m", [0, 1, 17])
def test_token_fast_path_without_the_native_kernels(monkeypatch, m):
    # The pure-torch layout and segment sum (what runs on a GPU) give what the C ones give.
    w13, w2 = _weights(torch.float32)
    res = _token_result(m, 2, torch.float32, empty_expert=1)
    native = fused_experts(res, w13, w2)
    monkeypatch.setattr("moe_ep.managers.planning.native", lambda t: False)
    monkeypatch.setattr("moe_ep.managers.expert_ops._native", lambda t: False)
    torch.testing.assert_close(fused_experts(res, w13, w2), native, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_experts(res, w13, w2), _slow(res, w13, w2), atol=1e-5,
                               rtol=1e-5)


def test_padded_rows_are_zero_and_unused_experts_skip():
    w13, w2 = _weights(torch.float32)
    packed = _packed_from_token(_token_result(6, 2, torch.float32, empty_expert=2))
    out = fused_experts(_padded_from_packed(packed, capacity=10), w13, w2)
    for e, n in enumerate(packed.tokens_per_expert.tolist()):
        assert out[e, n:].abs().max() == 0 and not out.isnan().any()


@pytest.mark.parametrize("block_size", [None, 8])
def test_fused_experts_dequantise_fp8(block_size):
    w13, w2 = _weights(torch.float32)
    quant = DispatchQuant(block_size=block_size)
    for res in (tok := _token_result(11, 2, torch.float32), _packed_from_token(tok)):
        xq, scales = quant.quantize(res.x)
        fp8 = DispatchResult(res.layout, xq, scales, res.topk_ids, res.topk_weights,
                             res.tokens_per_expert, None)
        got = fused_experts(fp8, w13, w2, out_dtype=torch.float32, quant=quant)
        want = _slow(res, w13, w2)
        dq = DispatchResult(res.layout, quant.dequantize(xq, scales, torch.float32), None,
                            res.topk_ids, res.topk_weights, res.tokens_per_expert, None)
        torch.testing.assert_close(got, _slow(dq, w13, w2), atol=1e-5, rtol=1e-5)
        assert (got - want).norm() / want.norm() < 6e-2
        with pytest.raises(ValueError, match="quantised dispatch result needs"):
            fused_experts(fp8, w13, w2)


def test_fused_experts_rejects_mismatched_weights():
    w13, w2 = _weights(torch.float32)
    res = _token_result(4, 2, torch.float32)
    with pytest.raises(ValueError, match="w13 must be"):
        fused_experts(res, w13[:2], w2[:2])
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_experts(res, w13, w2, activation="relu6")
    for bad in (torch.empty(4, H, dtype=torch.bfloat16), torch.empty(3, H), torch.empty(H, 4).T):
        with pytest.raises(ValueError, match=r"out must be a torch.float32 \[4, "):
            fused_experts(res, w13, w2, out=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 128, 1024), (2, 5, 517), (3, 1030, 512), (7, 4100, 600),
                                   (64, 130, 1000)])
def test_small_linear_matches_a_float64_product(m, n, k, dtype):
    # Blocks of 3 x 4 dot products, the row, column and K tails, against float64 (bf16: the
    # exact product rounded once, so within half a bf16 step of it, plus the fp32 sums' error).
    gen = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype)
    with _one_thread():
        y = kernels.small_linear(x, w)
        out = torch.full((m, n), float("nan"), dtype=dtype)
        assert kernels.small_linear(x, w, out) is out
    if y is None:
        pytest.skip("this CPU lacks AVX2 + FMA: small_linear declines, torch is used")
    assert y.dtype == dtype
    ref = x.double() @ w.double().t()
    err = (y.double() - ref).abs()
    if dtype == torch.float32:
        assert err.max() <= 1e-5 * ref.abs().max()
    else:
        assert (err <= 2.0**-8 * ref.abs() + 1e-5 * ref.abs().max()).all()
    assert torch.equal(out, y)


def test_small_linear_declines_what_it_does_not_cover(monkeypatch):
    k = kernels.native.SMALL_LINEAR_MIN_K
    x, w = torch.randn(4, k), torch.randn(8, k)
    with _one_thread():
        if kernels.small_linear(x, w) is None:  # each case below differs from this one in one way
            pytest.skip("this CPU lacks AVX2 + FMA: small_linear declines, torch is used")
        with monkeypatch.context() as patch:  # an install without the native kernels
            patch.setattr("moe_ep.kernels.native._load", lambda: (None, "not built"))
            assert kernels.small_linear(x, w) is None
        assert kernels.small_linear(x.double(), w.double()) is None  # fp32 or bf16 only
        assert kernels.small_linear(x.bfloat16(), w) is None  # one dtype for both
        assert kernels.small_linear(x.t().contiguous().t(), w) is None  # strided rows
        rows = kernels.native.SMALL_LINEAR_ROWS
        assert kernels.small_linear(torch.randn(rows + 1, k), w) is None  # too many rows
        assert kernels.small_linear(torch.randn(0, k), w) is None
        assert kernels.small_linear(x[:, 1:].contiguous(), w[:, 1:].contiguous()) is None  # K
        assert kernels.small_linear(x, w, torch.empty(4, 9)) is None  # wrong out shape
        assert kernels.small_linear(x.requires_grad_(), w) is None  # autograd stays torch's


@pytest.mark.parametrize("widen", [False, True])
def test_bf16_experts_widened_to_fp32_agree_with_torch_bf16(monkeypatch, widen):
    # The widened path (a CPU without bf16 dot products) and torch's own bf16 matmul give the
    # same experts up to the order of the fp32 sums: every layout, every expert widened.
    from moe_ep.layer import experts

    monkeypatch.setattr(experts, "_CPU_BF16_DOT", not widen)
    monkeypatch.setattr(experts, "BF16_UPCAST_ROWS", 1)
    w13, w2 = _weights(torch.bfloat16)
    token = _token_result(40, 2, torch.bfloat16)
    packed = _packed_from_token(token)
    for res in (token, packed, _padded_from_packed(packed, capacity=48)):
        got = fused_experts(res, w13, w2)
        torch.testing.assert_close(got.float(), _slow(res, w13, w2).float(), atol=2e-2,
                                   rtol=2e-2, msg=str(res.layout))


def test_bf16_widening_is_chosen_by_rows_dtype_and_cpu(monkeypatch):
    from moe_ep.layer import experts

    rows = experts.BF16_UPCAST_ROWS
    x, w = torch.randn(rows, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    monkeypatch.setattr(experts, "_CPU_BF16_DOT", False)
    assert experts._upcast_bf16(x, w)
    assert not experts._upcast_bf16(x[: rows - 1], w)  # too few rows: bf16 reads half the bytes
    assert not experts._upcast_bf16(x.float(), w.float())  # fp32 is fp32 already
    assert not experts._upcast_bf16(x.half(), w.half())
    monkeypatch.setattr(experts, "_CPU_BF16_DOT", True)  # AVX512-BF16 / AMX: torch's bf16
    assert not experts._upcast_bf16(x, w)
    # The probe reads torch's CPU feature checks; where torch has none it leaves bf16 alone.
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert experts._cpu_has_bf16_dot()


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
