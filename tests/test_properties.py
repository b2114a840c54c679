"""Property-based test of the contract: random shapes per example against a float64 loop.

Hypothesis runs inside every rank with `derandomize=True`, so all ranks draw the same examples
in the same order: each example is the whole group's input (E, K, H, dtype, tokens per rank
including 0, -1 ids, the manager), every rank dispatches its share through the drawn manager
and compares its output with `y[n] = sum_k w[n, k] f_{ids[n, k]}(x[n])` computed in float64
with plain Python loops written here (no moe_ep code). A failure on one rank makes the ranks
fall out of step; the harness then reports the first error with its traceback.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from moe_ep.testing.scenarios import PORTABLE_MANAGERS  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _reference(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, scale, shift) -> torch.Tensor:
    """float64 loops: the contract's formula, experts f_e(v) = v * scale[e] + shift[e]."""
    n, h = x.shape
    y = torch.zeros(n, h, dtype=torch.float64)
    xd = x.double()
    for t in range(n):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e >= 0:
                y[t] += float(w[t, k]) * (xd[t] * scale[e] + shift[e])
    return y


def _properties(info, examples: int) -> int:
    from moe_ep.distributed import GroupCoordinator
    from moe_ep.managers import apply_experts, build_manager, expert_placement

    world, r = info.world_size, info.rank
    group = GroupCoordinator([list(range(world))], "ep")
    managers = [build_manager(name, group, **opts) for name, opts in PORTABLE_MANAGERS]
    done = [0]

    @st.composite
    def cases(draw):
        num_experts = draw(st.integers(1, 12))
        topk = draw(st.integers(1, 6))
        hidden = draw(st.integers(1, 40))
        counts = draw(st.lists(st.integers(0, 9), min_size=world, max_size=world))
        dtype = draw(st.sampled_from(DTYPES))
        manager = draw(st.integers(0, len(managers) - 1))
        seed = draw(st.integers(0, 2**31 - 1))
        return num_experts, topk, hidden, counts, dtype, manager, seed

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(hypothesis.HealthCheck))
    @given(cases())
    def check(case):
        num_experts, topk, hidden, counts, dtype, m, seed = case
        gen = torch.Generator().manual_seed(seed)
        xs, ws, idss = [], [], []
        for n in counts:
            xs.append(torch.randn(n, hidden, generator=gen).to(dtype))
            real = min(topk, num_experts)
            ids = torch.full((n, topk), -1, dtype=torch.int64)
            if n:
                ids[:, :real] = torch.rand(n, num_experts, generator=gen).argsort(1)[:, :real]
                ids[torch.rand(n, topk, generator=gen) < 0.25] = -1
            idss.append(ids)
            ws.append(torch.rand(n, topk, generator=gen))
        scale = (torch.rand(num_experts, hidden, generator=gen) + 0.5).double()
        shift = (torch.randn(num_experts, hidden, generator=gen) * 0.1).double()
        first = expert_placement(num_experts, world).first(r)

        def expert(e, rows):
            g = first + e
            return (rows.double() * scale[g] + shift[g]).to(rows.dtype)

        mgr = managers[m]
        res = mgr.dispatch(xs[r], ws[r], idss[r], num_experts=num_experts)
        y = mgr.combine(apply_experts(res, expert), res)
        ref = _reference(xs[r], ws[r], idss[r], scale, shift)
        assert y.shape == xs[r].shape and y.dtype == dtype
        if y.numel():
            # Experts round to the activation dtype once, the sum rounds once more.
            bound = TOL[dtype] * (1 + ref.abs().max().item()) * (1 + topk)
            err = (y.double() - ref).abs().max().item()
            assert err <= bound, (mgr.name, case, err, bound)
        done[0] += 1

    try:
        check()
    finally:
        for mgr in managers:
            mgr.destroy()
        group.destroy()
    return done[0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_contract_holds_for_random_cases(dist_pool, world):
    examples = 60
    results = dist_pool(world).run(_properties, examples, timeout=600)
    assert all(n == examples for n in results), results
