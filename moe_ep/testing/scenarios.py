"""Public scenario builders for contract tests of any All2All manager.

Every rank builds every rank's input from a seed, so the expected outputs (reference MoE,
routing counts, received rows, wire bytes) are computed independently on each rank from the
global data, with plain torch and Python loops that share no code with the managers. Data is
decodable by its sender: `decodable_inputs` puts the sender rank in every column but the last
and the token index in the last, so a failure says who sent what.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from moe_ep.testing.reference import make_linear_experts, reference_moe

__all__ = [
    "CONSISTENCY_ERRORS",
    "LOCAL_ERRORS",
    "PORTABLE_MANAGERS",
    "assert_contract",
    "bad_case",
    "contract_cases",
    "decodable_inputs",
    "global_inputs",
    "placement_ranges",
    "random_routing",
    "tokens_per_rank",
]

#: (name, options) of the managers that run on any CPU group here.
PORTABLE_MANAGERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("naive", {}),
    ("allgather_reducescatter", {}),
    ("alltoallv", {}),
    ("alltoallv", {"dedup": False}),
    ("shm", {}),
    ("shm", {"layout": "expert_packed"}),
)
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-12}


def placement_ranges(num_experts: int, world: int) -> list[range]:
    """Contiguous placement written out independently of moe_ep: first E % W ranks get +1."""
    out, start = [], 0
    for r in range(world):
        n = num_experts // world + (1 if r < num_experts % world else 0)
        out.append(range(start, start + n))
        start += n
    return out


def tokens_per_rank(world: int, case: int) -> list[int]:
    """Differing counts; one rank (rotating with the case) has none. W=1 alternates 0 / n."""
    if world == 1:
        return [0 if case % 2 == 0 else 5 + case % 4]
    zero = case % world
    return [0 if r == zero else 1 + (3 * r + case) % 6 for r in range(world)]


def random_routing(n: int, num_experts: int, topk: int, gen: torch.Generator):
    """`(weights [n, K] float32, ids [n, K] int64)`: distinct ids per token, ~20% -1 (always
    -1 beyond E), shuffled slots; garbage weights (7.0) where the id is -1."""
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


def global_inputs(seed: int, counts: Sequence[int], num_experts: int, topk: int, dtype,
                  hidden: int):
    """Every rank's `(xs, ws, ids)`; odd ranks' ids are int32 (both id dtypes are served)."""
    gen = torch.Generator().manual_seed(seed)
    xs, ws, ids = [], [], []
    for n in counts:
        xs.append((torch.randn(n, hidden, generator=gen) * 0.25).to(dtype))
        w, i = random_routing(n, num_experts, topk, gen)
        ws.append(w)
        ids.append(i.to(torch.int32 if len(ids) % 2 else torch.int64))
    return xs, ws, ids


def decodable_inputs(counts: Sequence[int], num_experts: int, topk: int, seed: int, dtype,
                     hidden: int = 8):
    """x[s] = s everywhere except the last column = token index; routing from the seed."""
    gen = torch.Generator().manual_seed(seed)
    xs, ws, ids = [], [], []
    for s, n in enumerate(counts):
        x = torch.full((n, hidden), float(s))
        x[:, -1] = torch.arange(n, dtype=torch.float32)
        xs.append(x.to(dtype))
        w, i = random_routing(n, num_experts, topk, gen)
        ws.append(w)
        ids.append(i)
    return xs, ws, ids


def contract_cases(group, managers, num_experts_list, topk_list, dtypes, *, hidden: int = 32,
                   use_handles: bool = False, seed: int = 0) -> list[tuple]:
    """Collective: every case dispatch -> apply_experts(linear) -> combine vs `reference_moe`;
    every other case writes the expert output over the result's `x` first (which must not
    alias the input).

    With `use_handles` each case first declares an `EPSpec` handle (`max_tokens_per_rank` =
    the largest count of the case) and dispatches through it; else the call without a handle.
    Returns rows `(what, shape_and_dtype_ok, max_error, atol, scale)` for `assert_contract`.
    """
    from moe_ep.managers import EPSpec, apply_experts, build_manager

    r, world = group.rank_in_group, group.world_size
    rows = []
    for m, (name, options) in enumerate(managers):
        mgr = build_manager(name, group, **options)
        try:
            cases = itertools.product(num_experts_list, topk_list, dtypes)
            for c, (num_experts, topk, dtype) in enumerate(cases):
                counts = tokens_per_rank(world, c)
                xs, ws, ids = global_inputs(seed + 1000 * m + c, counts, num_experts, topk, dtype,
                                            hidden)
                experts = make_linear_experts(num_experts, hidden, seed=seed + c)
                first = placement_ranges(num_experts, world)[r].start
                if use_handles:
                    handle = mgr.get_handle(EPSpec(
                        hidden=hidden, num_experts=num_experts, topk=topk,
                        max_tokens_per_rank=max(1, max(counts)), dtype=dtype))
                    res = mgr.dispatch(xs[r], ws[r], ids[r], handle=handle)
                else:
                    res = mgr.dispatch(xs[r], ws[r], ids[r], num_experts=num_experts)
                if xs[r].numel() and res.x.numel():
                    assert (res.x.untyped_storage().data_ptr()
                            != xs[r].untyped_storage().data_ptr()), f"{name}: x aliases the input"
                out = apply_experts(res, lambda e, rows_, f=first, ex=experts: ex[f + e](rows_))
                # Every other case writes the expert output over res.x, as the contract allows
                # (the shm manager's zero-copy combine); the others pass a new tensor.
                in_place = c % 2 == 1 and out.shape == res.x.shape and out.dtype == res.x.dtype
                if in_place:
                    out = res.x.copy_(out)
                y = mgr.combine(out, res)
                ref_all = reference_moe(torch.cat(xs), torch.cat(ws), torch.cat(ids), experts)
                start = sum(counts[:r])
                ref = ref_all[start : start + counts[r]]
                err = (y.float() - ref.float()).abs().max().item() if y.numel() else 0.0
                scale = ref_all.float().abs().max().item() if ref_all.numel() else 0.0
                how = ("handle" if use_handles else "no handle") + (", in place" * in_place)
                rows.append((
                    f"{name}{options} ({how}) E={num_experts} K={topk} {dtype} counts={counts}",
                    tuple(y.shape) == tuple(xs[r].shape) and y.dtype == dtype,
                    err, ATOL[dtype], scale,
                ))
        finally:
            mgr.destroy()
    return rows


def assert_contract(results: list[list[tuple]]) -> None:
    """Every rank's rows from `contract_cases` are within tolerance, and not vacuously."""
    scales = []
    for rank, rows in enumerate(results):
        for what, shape_ok, err, atol, scale in rows:
            assert shape_ok, f"rank {rank}: {what}: wrong output shape or dtype"
            assert err <= atol, f"rank {rank}: {what}: max error {err:.3g} > {atol}"
            scales.append(scale)
    # The comparison is not vacuous: the reference outputs are far from zero.
    assert max(scales) > 0.1


# ------------------------------------------------------------------------- bad inputs
def bad_case(kind: str, r: int, bad: int, world: int, hidden: int = 32):
    """`(x, weights, ids, num_experts)` of rank r for scenario `kind`; rank `bad` misbehaves."""
    gen = torch.Generator().manual_seed(5 + r)
    n, num_experts, topk = 3 + r, 8, 2
    x = torch.randn(n, hidden, generator=gen)
    w, ids = random_routing(n, num_experts, topk, gen)
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
        x = torch.randn(n, hidden + 1, generator=gen)
    elif kind == "dtype_differs":
        x = x.bfloat16()
    elif kind == "num_experts_differs":
        num_experts = 9
    elif kind == "topk_differs":
        w, ids = random_routing(n, num_experts, topk + 1, gen)
    else:
        raise AssertionError(kind)
    return x, w, ids, num_experts


#: scenario -> (exception on the bad rank, message fragment); the others raise RemoteInputError.
LOCAL_ERRORS = {
    "id_too_large": (ValueError, "topk_ids must be in [-1, num_experts=8)"),
    "id_below_minus_one": (ValueError, "got -2"),
    "float_ids": (TypeError, "topk_ids must be an integer tensor"),
    "bool_ids": (TypeError, "topk_ids must be an integer tensor"),
    "weights_shape": (ValueError, "topk_weights must have the shape of topk_ids"),
    "rows_mismatch": (ValueError, "rows but x has"),
    "x_1d": (ValueError, "x must be [num_tokens, hidden]"),
    "int_x": (TypeError, "x must have a floating dtype"),
    "fp8_x": (TypeError, "a quantised dispatch needs x_scales"),
    "duplicate_ids": (ValueError, "same expert twice"),
    "num_experts_not_int": (TypeError, "num_experts must be an int"),
    "not_a_tensor": (TypeError, "topk_weights must be a torch.Tensor"),
}
#: scenario -> message fragment every rank raises (a ValueError listing each rank's value).
CONSISTENCY_ERRORS = {
    "hidden_differs": "hidden size (x.shape[1]) differs across ranks",
    "dtype_differs": "x dtype differs across ranks",
    "num_experts_differs": "num_experts differs across ranks",
    "topk_differs": "topk (topk_ids.shape[1]) differs across ranks",
}
