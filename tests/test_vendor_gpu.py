"""The vendor backends on real GPUs with the real vendor packages (skipped elsewhere).

Needs at least two CUDA devices (the vendor kernels need two ranks, NCCL one GPU per rank)
and the vendor package of each backend; a backend that `availability()` rejects on the
detected topology is skipped with its reason. Nothing here has run yet: the sessions that
wrote the adapters had no GPU (docs/backends.md records what has run).
"""

from __future__ import annotations

import pytest
import torch

from moe_ep.testing import DistributedPool
from moe_ep.testing.reference import make_linear_experts, reference_moe
from moe_ep.testing.scenarios import global_inputs, placement_ranges, tokens_per_rank

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2,
                       reason="the vendor backends need two ranks, one CUDA device each"),
]

# backend -> (options, hidden): the LL kernels exist for a few hidden sizes only.
BACKENDS = {
    "deepep_high_throughput": ({}, 256),
    "deepep_low_latency": ({}, 2048),
    "pplx": ({}, 256),
    "flashinfer_mnnvl": ({}, 256),
}


def _round_trip(info, name, options, hidden):
    from moe_ep.distributed import GroupCoordinator, Topology
    from moe_ep.managers import EPSpec, apply_experts, build_manager, get_manager_class

    group = GroupCoordinator([list(range(info.world_size))], "ep")
    try:
        ok, reason = get_manager_class(name).availability(Topology.detect(group))
        if not ok:
            return ("skip", reason)
        r, world = group.rank_in_group, group.world_size
        num_experts, topk = 4 * world, 2
        counts = tokens_per_rank(world, 1)
        xs, ws, ids = global_inputs(0, counts, num_experts, topk, torch.bfloat16, hidden)
        experts = make_linear_experts(num_experts, hidden, seed=1, device="cuda")
        first = placement_ranges(num_experts, world)[r].start
        mgr = build_manager(name, group, **options)
        try:
            handle = mgr.get_handle(EPSpec(hidden=hidden, num_experts=num_experts, topk=topk,
                                           max_tokens_per_rank=max(counts)))
            res = mgr.dispatch(xs[r].cuda(), ws[r].cuda(), ids[r].cuda(), handle=handle)
            y = mgr.combine(apply_experts(res, lambda e, q: experts[first + e](q)), res)
            torch.cuda.synchronize()
        finally:
            mgr.destroy()
        ref = reference_moe(xs[r].cuda(), ws[r].cuda(), ids[r].cuda(), experts)
        return ("ok", (y.float() - ref.float()).abs().max().item() if y.numel() else 0.0)
    finally:
        group.destroy()


@pytest.mark.parametrize("name", list(BACKENDS))
def test_vendor_backend_on_gpus(name):
    options, hidden = BACKENDS[name]
    with DistributedPool(2, device="cuda") as pool:
        results = pool.run(_round_trip, name, options, hidden, timeout=300)
    kinds = {kind for kind, _ in results}
    if kinds == {"skip"}:
        pytest.skip(results[0][1])
    assert kinds == {"ok"}, results
    assert max(err for _, err in results) <= 5e-2, results
