"""Measure one manager's dispatch / combine latency and wire bytes on one group.

`measure_manager` is a collective: every rank of `group` calls it with the same arguments. It

1. builds the manager through the registry and declares the layer's handle once
   (`get_handle(EPSpec(...))`), as a MoE layer does,
2. verifies it once against `moe_ep.testing.reference.reference_moe` (dispatch ->
   `apply_experts` with cheap per-expert affine maps -> combine, compared on every rank),
3. times, as a user runs it (the caller sets nothing about the allocator), `repeats`
   repetitions of `iters` back-to-back round trips each, with a barrier only before each
   repetition (a barrier per call would time the barrier): `dispatch`, then the expert output
   of identity experts (`identity_experts`, timed apart as `experts_us`: for the TOKEN layout
   this is where the router weights are applied; the same as `apply_experts` with identity
   experts, which the verification step runs), then `combine`; `total_us` is dispatch +
   combine (the communication the manager owns),
4. reports, per phase, the median / p10 / p90 over repetitions of the **slowest rank's**
   per-call mean (a collective is as fast as its slowest member), and the bytes each rank put
   on the wire as counted by the manager (`moe_ep.managers.WireBytes`), next to the manager's
   analytic bytes-per-token model.

Inputs are reproducible: rank r draws ``x`` ``[tokens_per_rank, hidden]`` and a uniform random
top-k routing (distinct experts per token, softmax weights) from ``seed + r``.
"""

from __future__ import annotations

import math

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moe_ep.distributed.group import GroupCoordinator

__all__ = ["LatencyResult", "LatencyStats", "make_inputs", "measure_manager"]

_VERIFY_TOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class LatencyStats:
    """Microseconds per call over the timed repetitions (each the slowest rank's mean)."""

    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, samples_us: list[float]) -> LatencyStats:
        if not samples_us:  # not timed
            return cls(median=math.nan, p10=math.nan, p90=math.nan)
        t = torch.tensor(samples_us, dtype=torch.float64)
        q = torch.quantile(t, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)).tolist()
        return cls(median=q[0], p10=q[1], p90=q[2])


@dataclass(frozen=True)
class LatencyResult:
    """What :func:`measure_manager` measured (identical on every rank).

    Attributes:
        backend: canonical manager name; options: its options as sorted (name, value) pairs.
        world_size, tokens_per_rank, hidden, num_experts, topk, dtype (e.g. "bfloat16"),
        warmup, iters, repeats: the case (iters back-to-back calls per repetition).
        dispatch_us, combine_us, total_us (dispatch + combine), experts_us (the identity
            ``apply_experts`` step between them): :class:`LatencyStats` in microseconds.
        dispatch_bytes, combine_bytes: ``[W]`` bytes each rank sent in one dispatch / combine.
        bytes_per_rank: mean over ranks of the bytes one rank sends per round trip.
        bytes_per_token: all bytes sent in one round trip / all tokens dispatched.
        model_bytes_per_token: the manager's analytic expectation for uniform routing
            (headers excluded), or None.
        verified: the output matched the reference; max_abs_error: the largest deviation;
        error: why verification failed, else None.
    """

    backend: str
    options: tuple[tuple[str, Any], ...]
    world_size: int
    tokens_per_rank: int
    hidden: int
    num_experts: int
    topk: int
    dtype: str
    warmup: int
    iters: int
    repeats: int
    dispatch_us: LatencyStats
    combine_us: LatencyStats
    total_us: LatencyStats
    experts_us: LatencyStats
    dispatch_bytes: tuple[int, ...]
    combine_bytes: tuple[int, ...]
    bytes_per_rank: int
    bytes_per_token: float
    model_bytes_per_token: float | None
    verified: bool
    max_abs_error: float
    error: str | None


def make_inputs(
    rank: int,
    *,
    tokens: int,
    hidden: int,
    num_experts: int,
    topk: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s ``x [tokens, hidden] dtype``, ``topk_weights [tokens, topk] float32``
    (softmax) and ``topk_ids [tokens, topk] int64`` (distinct, uniform), from ``seed + rank``."""
    gen = torch.Generator().manual_seed(seed + rank)
    x = (torch.randn(tokens, hidden, generator=gen) * 0.25).to(dtype)
    k = min(topk, num_experts)
    ids = torch.full((tokens, topk), -1, dtype=torch.int64)
    if tokens:
        ids[:, :k] = torch.rand(tokens, num_experts, generator=gen).argsort(dim=1)[:, :k]
    weights = torch.randn(tokens, topk, generator=gen).masked_fill(ids < 0, float("-inf"))
    weights = torch.softmax(weights, dim=1).nan_to_num(0.0)
    return x.to(device), weights.to(device), ids.to(device)


def _check_positive(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _identity(local_expert: int, rows: torch.Tensor) -> torch.Tensor:
    return rows


def identity_experts(res) -> torch.Tensor:
    """The expert output of identity experts (`f_e(x) = x`) for `res`, in one tensor op (in
    place): what `apply_experts(res, lambda e, rows: rows)` returns, without its loop. The
    timing uses it so that the experts step costs the same small time on every rank: a slow,
    uneven experts step would show up as waiting in the next combine."""
    from moe_ep.managers import Layout, apply_experts

    if res.layout is Layout.TOKEN:
        # sum over local slots of w_k * x = x * (sum of the local weights); 0 where none.
        # Written over res.x, as an experts step that owns the result may (see DispatchResult):
        # no temporaries that would evict the manager's buffers from the cache, and nothing
        # for `shm`'s combine to copy. The weights in x's dtype: torch's mixed-dtype bf16
        # multiply is several times slower than the bf16 one (timing only; rounding is moot).
        return res.x.mul_(res.topk_weights.sum(dim=1, keepdim=True).to(res.x.dtype))
    if res.layout is Layout.EXPERT_PACKED:
        return res.x
    return apply_experts(res, _identity)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(group, mgr, handle, x, weights, ids, iters: int, device
                ) -> tuple[float, float, float]:
    """One repetition: `iters` back-to-back round trips after one barrier; per-call means
    (dispatch, combine, experts) in microseconds on this rank."""
    group.barrier()
    _sync(device)
    t_dispatch = t_combine = t_experts = 0.0
    clock = time.perf_counter
    for _ in range(iters):
        t0 = clock()
        res = mgr.dispatch(x, weights, ids, handle=handle)
        _sync(device)
        t1 = clock()
        out = identity_experts(res)
        _sync(device)
        t2 = clock()
        mgr.combine(out, res)
        _sync(device)
        t3 = clock()
        t_dispatch += t1 - t0
        t_experts += t2 - t1
        t_combine += t3 - t2
    scale = 1e6 / iters
    return t_dispatch * scale, t_combine * scale, t_experts * scale


def measure_manager(
    group: GroupCoordinator,
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    tokens_per_rank: int,
    hidden: int,
    num_experts: int,
    topk: int,
    dtype: torch.dtype = torch.bfloat16,
    warmup: int = 3,
    iters: int = 20,
    repeats: int = 5,
    seed: int = 0,
) -> LatencyResult:
    """Verify, then time ``name`` on ``group`` (collective; see the module docstring).

    Raises:
        TypeError / ValueError: a bad argument (checked before any communication).
        Whatever ``build_manager`` raises for an unknown or unavailable backend.
    """
    from moe_ep.managers import EPSpec, apply_experts, build_manager, expert_placement
    from moe_ep.managers.registry import get_manager_class
    from moe_ep.testing.reference import make_scaling_experts, reference_moe

    _check_positive("tokens_per_rank", tokens_per_rank, 0)
    _check_positive("hidden", hidden, 1)
    _check_positive("num_experts", num_experts, 1)
    _check_positive("topk", topk, 1)
    _check_positive("warmup", warmup, 0)
    _check_positive("iters", iters, 1)
    _check_positive("repeats", repeats, 1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    options = dict(options or {})

    device = torch.device(group.device)
    rank, world = group.rank_in_group, group.world_size
    x, weights, ids = make_inputs(
        rank,
        tokens=tokens_per_rank,
        hidden=hidden,
        num_experts=num_experts,
        topk=topk,
        dtype=dtype,
        device=device,
        seed=seed,
    )
    mgr = build_manager(name, group, **options)
    try:
        handle = mgr.get_handle(EPSpec(hidden=hidden, num_experts=num_experts, topk=topk,
                                       max_tokens_per_rank=max(1, tokens_per_rank), dtype=dtype))
        # 1. Verification against the reference (each token's output depends only on itself,
        # so this rank's slice of the global reference is the reference of its own tokens).
        experts = make_scaling_experts(num_experts, hidden, seed=seed, device=device)
        first = expert_placement(num_experts, world).first(rank)
        res = mgr.dispatch(x, weights, ids, handle=handle)
        y = mgr.combine(apply_experts(res, lambda e, rows: experts[first + e](rows)), res)
        ref = reference_moe(x, weights, ids, experts)
        err = (y.float() - ref.float()).abs().max().item() if y.numel() else 0.0
        tol = _VERIFY_TOL.get(dtype, 2e-2)
        local_ok = (
            y.shape == x.shape
            and y.dtype == x.dtype
            and err <= tol + tol * (ref.float().abs().max().item() if ref.numel() else 0.0)
        )
        checks = group.all_gather_object((bool(local_ok), float(err)))
        verified = all(ok for ok, _ in checks)
        max_err = max(e for _, e in checks)
        error = None
        if not verified:
            bad = [r for r, (ok, _) in enumerate(checks) if not ok]
            error = (
                f"{name}: output differs from reference_moe on rank(s) {bad} "
                f"(max abs error {max_err:.3g}, tolerance {tol:g} + {tol:g} * max|ref|)"
            )

        # 2. Timing with identity experts (a wrong backend is reported, not timed).
        samples: list[tuple[float, float, float]] = []
        if verified:
            for _ in range(warmup):
                res = mgr.dispatch(x, weights, ids, handle=handle)
                mgr.combine(identity_experts(res), res)
            for _ in range(repeats):
                samples.append(_time_block(group, mgr, handle, x, weights, ids, iters, device))
        sent = (mgr.last_dispatch_bytes.total, mgr.last_combine_bytes.total)
        per_rank = group.all_gather_object((samples, sent))
    finally:
        mgr.destroy()

    timed = len(per_rank[0][0])  # 0 when verification failed

    def slowest(phase: int) -> list[float]:
        return [max(per_rank[r][0][i][phase] for r in range(world)) for i in range(timed)]

    dispatch_s, combine_s, experts_s = slowest(0), slowest(1), slowest(2)
    total_s = [
        max(per_rank[r][0][i][0] + per_rank[r][0][i][1] for r in range(world)) for i in range(timed)
    ]
    dispatch_bytes = tuple(int(p[1][0]) for p in per_rank)
    combine_bytes = tuple(int(p[1][1]) for p in per_rank)
    all_bytes = sum(dispatch_bytes) + sum(combine_bytes)
    cls = get_manager_class(name)
    model = cls.wire_bytes_per_token(
        world_size=world,
        hidden=hidden,
        elem_size=x.element_size(),
        topk=topk,
        num_experts=num_experts,
        **options,
    )
    return LatencyResult(
        backend=cls.name,
        options=tuple(sorted(options.items())),
        world_size=world,
        tokens_per_rank=tokens_per_rank,
        hidden=hidden,
        num_experts=num_experts,
        topk=topk,
        dtype=str(dtype).removeprefix("torch."),
        warmup=warmup,
        iters=iters,
        repeats=repeats,
        dispatch_us=LatencyStats.of(dispatch_s),
        combine_us=LatencyStats.of(combine_s),
        total_us=LatencyStats.of(total_s),
        experts_us=LatencyStats.of(experts_s),
        dispatch_bytes=dispatch_bytes,
        combine_bytes=combine_bytes,
        bytes_per_rank=all_bytes // world,
        bytes_per_token=all_bytes / (world * tokens_per_rank) if tokens_per_rank else 0.0,
        model_bytes_per_token=model,
        verified=verified,
        max_abs_error=max_err,
        error=error,
    )
