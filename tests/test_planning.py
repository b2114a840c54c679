"""Pure planners and native kernels, in one process: each C kernel against its torch twin on
random routings (-1 ids, 0 tokens, E not divisible by W, W > E), and every kernel refuses an
index out of bounds instead of reading another tensor's memory."""

from __future__ import annotations

import pytest
import torch

from moe_ep import kernels
from moe_ep.managers import expert_ops, planning
from moe_ep.managers.placement import expert_placement
from moe_ep.testing.scenarios import random_routing

pytestmark = pytest.mark.skipif(not kernels.available()[0], reason=kernels.available()[1])

PLAN_FIELDS = ("send_counts", "send_token", "row_ids", "row_weights", "token_rows")
LAYOUT_FIELDS = ("tokens_per_expert", "packed_row", "packed_local", "packed_weight",
                 "row_offsets", "row_order", "row_weight")


def _cases(count: int):
    gen = torch.Generator().manual_seed(1234)
    for case in range(count):
        world = int(torch.randint(1, 7, (), generator=gen))
        num_experts = int(torch.randint(1, 13, (), generator=gen))
        topk = int(torch.randint(1, 6, (), generator=gen))
        n = 0 if case % 7 == 0 else int(torch.randint(1, 12, (), generator=gen))
        weights, ids = random_routing(n, num_experts, topk, gen)
        yield world, num_experts, topk, weights, ids


def test_plan_dispatch_native_equals_torch():
    seen = set()
    for world, num_experts, topk, weights, ids in _cases(400):
        placement = expert_placement(num_experts, world)
        want = planning.plan_dispatch(ids, weights, placement)
        got = kernels.plan_dispatch(ids, weights, placement.owner_cpu, placement.local_index_cpu,
                                    world)
        for field in PLAN_FIELDS:
            a, b = getattr(want, field), getattr(got, field)
            assert a.shape == b.shape and torch.equal(a, b), (world, num_experts, topk, field)
        seen.add((ids.numel() == 0, num_experts % world != 0, world > num_experts))
    assert seen >= {(True, True, False), (False, True, False), (False, False, False),
                    (False, True, True)}, seen


def test_plan_dispatch_independent_properties():
    """What the plan means, checked with loops: each token goes once to each owner of one of
    its experts, carrying exactly its slots there."""
    for world, num_experts, _, weights, ids in _cases(100):
        placement = expert_placement(num_experts, world)
        plan = planning.plan_dispatch(ids, weights, placement)
        owner = placement.owner_cpu.tolist()
        local = placement.local_index_cpu.tolist()
        start = 0
        for d in range(world):
            tokens = [t for t in range(ids.shape[0]) if any(e >= 0 and owner[e] == d
                                                              for e in ids[t].tolist())]
            count = int(plan.send_counts[d])
            assert plan.send_token[start:start + count].tolist() == tokens
            for i, t in enumerate(tokens):
                assert int(plan.token_rows[t, d]) == i
                for k, e in enumerate(ids[t].tolist()):
                    here = e >= 0 and owner[e] == d
                    assert int(plan.row_ids[start + i, k]) == (local[e] if here else -1)
                    assert float(plan.row_weights[start + i, k]) == (
                        float(weights[t, k]) if here else 0.0)
            start += count


def test_packed_layout_native_equals_torch():
    for world, num_experts, _, weights, ids in _cases(300):
        placement = expert_placement(num_experts, world)
        plan = planning.plan_dispatch(ids, weights, placement)
        rank = world - 1
        num_local = placement.num_local(rank)
        chunk = slice(int(plan.send_counts[:rank].sum()), int(plan.send_counts[:rank + 1].sum()))
        row_ids, row_weights = plan.row_ids[chunk].contiguous(), plan.row_weights[chunk]
        want = planning.packed_layout(row_ids, row_weights, num_local)
        got = kernels.packed_layout(row_ids, row_weights.contiguous(), num_local)
        for field in LAYOUT_FIELDS:
            a, b = getattr(want, field), getattr(got, field)
            assert torch.equal(a, b), (world, num_experts, field)
        assert torch.equal(planning.count_experts(row_ids, num_local),
                           kernels.count_experts(row_ids, num_local))


def _tolerance(dtype, ref: torch.Tensor) -> float:
    """One rounding of the result plus fp32 accumulation error, relative to the values."""
    eps = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
    return 4 * eps[dtype] * (1 + ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_row_sums_native_equal_torch(dtype):
    gen = torch.Generator().manual_seed(7)
    src = (torch.randn(9, 33, generator=gen) * 3).to(dtype)
    rows = torch.randint(0, 9, (20,), generator=gen)
    offsets = torch.tensor([0, 3, 3, 10, 20])
    weights = torch.rand(20, generator=gen)
    ref = torch.zeros(4, 33, dtype=torch.float64)  # loops in float64
    for j in range(4):
        for t in range(int(offsets[j]), int(offsets[j + 1])):
            ref[j] += float(weights[t]) * src[rows[t]].double()
    native = kernels.segment_sum(src, rows, offsets, weights)
    twin = expert_ops.segment_sum_torch(src, rows, offsets, weights)
    for got in (native, twin):
        assert got.dtype == dtype
        assert (got.double() - ref).abs().max() <= _tolerance(dtype, ref)

    a = torch.randn(4, 33, generator=gen).to(dtype)
    b = torch.randn(6, 33, generator=gen).to(dtype)
    token_rows = torch.tensor([[0, -1], [3, 5], [-1, -1], [1, 0]])
    ref = torch.zeros(4, 33, dtype=torch.float64)
    for n in range(4):
        for d, src_d in enumerate((a, b)):
            if token_rows[n, d] >= 0:
                ref[n] += src_d[token_rows[n, d]].double()
    native = kernels.gather_sum(torch.empty(4, 33, dtype=dtype), [a.data_ptr(), b.data_ptr()],
                                torch.tensor([4, 6]), token_rows)
    twin = expert_ops.gather_sum_torch([a, b], token_rows, torch.empty(4, 33, dtype=dtype))
    for got in (native, twin):
        assert (got.double() - ref).abs().max() <= _tolerance(dtype, ref)
    assert got[2].abs().max() == 0  # a token with no row sums to 0


@pytest.mark.parametrize("hidden", [5, 16, 4096 + 7])
def test_bf16_gather_sum_rounds_once_like_torch(hidden):
    # The native bf16 sum (a vector path on AVX2 machines, a scalar tail) equals torch's fp32
    # sum in source order rounded once, bit for bit (NaN: in the same places; torch keeps a
    # NaN's sign, the kernel writes the canonical one): ties, inf and 1 to 4 sources.
    gen = torch.Generator().manual_seed(hidden)
    world = 4
    sources = [(torch.randn(6, hidden, generator=gen) * 10 ** d).to(torch.bfloat16)
               for d in range(world)]
    sources[0][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    sources[1][1, -1] = float("nan")
    # 1 + 2**-8 rounds to a tie between two bf16 neighbours: round to even must pick one.
    sources[0][2], sources[1][2] = 1.0, 2.0 ** -8
    token_rows = torch.randint(-1, 6, (40, world), generator=gen)
    token_rows[:3, 0], token_rows[:3, 1] = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    token_rows[3] = torch.tensor([-1, 4, -1, -1])  # one source: a copy
    token_rows[4] = -1  # none: zeros
    native = kernels.gather_sum(torch.empty(40, hidden, dtype=torch.bfloat16),
                                [s.data_ptr() for s in sources], torch.full((world,), 6),
                                token_rows)
    twin = expert_ops.gather_sum_torch(sources, token_rows,
                                       torch.empty(40, hidden, dtype=torch.bfloat16))
    nan = twin.isnan()
    assert torch.equal(native.isnan(), nan) and nan[0, 0] and nan[1, -1]
    assert torch.equal(native[~nan].view(torch.int16), twin[~nan].view(torch.int16))
    assert native[4].abs().max() == 0


def test_float64_sums_stay_float64():
    src = torch.tensor([[1.0 + 2**-40], [1.0]], dtype=torch.float64)
    out = kernels.segment_sum(src, torch.tensor([0, 1]), torch.tensor([0, 2]))
    assert out.item() == 2.0 + 2**-40  # lost in a float32 accumulator


def test_kernels_refuse_out_of_bounds_indices():
    src = torch.randn(4, 8)
    with pytest.raises(kernels.KernelError, match="out of bounds"):
        kernels.segment_sum(src, torch.tensor([0, 4]), torch.tensor([0, 2]))  # row 4 of 4
    with pytest.raises(kernels.KernelError, match="out of bounds"):
        kernels.segment_sum(src, torch.tensor([0, 1]), torch.tensor([0, 3]))  # offset > rows
    with pytest.raises(kernels.KernelError, match="out of bounds"):
        kernels.segment_sum(src, torch.tensor([0, 1]), torch.tensor([0, 2, 1]))  # decreasing
    with pytest.raises(kernels.KernelError, match="out of bounds"):
        kernels.gather_rows(src, torch.tensor([1, -1]))
    with pytest.raises(kernels.KernelError, match="out of bounds"):
        kernels.gather_sum(torch.empty(1, 8), [src.data_ptr()], torch.tensor([4]),
                           torch.tensor([[4]]))
    with pytest.raises(kernels.KernelError, match="local ids"):
        kernels.count_experts(torch.tensor([[0, 3]]), 3)
    with pytest.raises(kernels.KernelError, match="local ids"):
        kernels.packed_layout(torch.tensor([[-2, 0]]), torch.rand(1, 2), 3)


def test_planner_names_bad_ids():
    placement = expert_placement(4, 2)
    planner = kernels.DispatchPlanner(placement.owner_cpu, placement.local_index_cpu, 2, 2, 4)
    w = torch.rand(2, 2)
    with pytest.raises(ValueError, match=r"got 4 at position \(1, 0\)"):
        planner.plan(torch.tensor([[0, 1], [4, 1]]), w)
    with pytest.raises(ValueError, match="token 0 to the same expert twice"):
        planner.plan(torch.tensor([[2, 2], [0, 1]]), w)


def test_host_known_sizes_give_the_same_plans():
    """The CUDA path passes the sizes the headers carry (no device sync): same results."""
    for world, num_experts, _, weights, ids in _cases(150):
        placement = expert_placement(num_experts, world)
        counts = planning.send_counts(ids, placement).tolist()
        plain = planning.plan_dispatch(ids, weights, placement)
        sized = planning.plan_dispatch(ids, weights, placement, total_rows=sum(counts[:world]))
        assert counts[:world] == plain.send_counts.tolist()
        assert sum(counts[world:]) == int((ids >= 0).sum())
        for field in PLAN_FIELDS:
            assert torch.equal(getattr(plain, field), getattr(sized, field)), field
        pairs = planning.plan_dispatch_pairs(ids, weights, placement)
        pairs_sized = planning.plan_dispatch_pairs(ids, weights, placement, sum(counts[world:]))
        for field in PLAN_FIELDS:
            assert torch.equal(getattr(pairs, field), getattr(pairs_sized, field)), field
        rows = plain.row_ids
        plain_layout = planning.packed_layout(rows, plain.row_weights, num_experts)
        sized_layout = planning.packed_layout(rows, plain.row_weights, num_experts,
                                              int((rows >= 0).sum()))
        for field in LAYOUT_FIELDS:
            assert torch.equal(getattr(plain_layout, field), getattr(sized_layout, field))


def _torch_path_contract(info):
    """alltoallv with its planners forced onto the torch path (what CUDA tensors take)."""
    from unittest import mock

    from moe_ep.distributed import GroupCoordinator
    from moe_ep.testing.scenarios import contract_cases

    group = GroupCoordinator([list(range(info.world_size))], "ep")
    try:
        with mock.patch.object(planning, "native", lambda t: False):
            return contract_cases(group, (("alltoallv", {}), ("alltoallv", {"dedup": False})),
                                  (4, 10), (1, 6), (torch.float32,), use_handles=True)
    finally:
        group.destroy()


def test_alltoallv_torch_planners_keep_the_contract(dist_pool):
    from moe_ep.testing.scenarios import assert_contract

    assert_contract(dist_pool(3).run(_torch_path_contract, timeout=120))
