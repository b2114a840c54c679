"""Process groups: vLLM's rank layout, the default getters, same-node detection, topology."""

from __future__ import annotations

import os

import pytest

from moe_ep.distributed import (
    Topology,
    destroy_model_parallel,
    get_dp_group,
    get_ep_group,
    get_pp_group,
    get_tp_group,
    get_world_group,
    group_layout,
    in_the_same_node_as,
    initialize_model_parallel,
    model_parallel_is_initialized,
)

# vLLM's layout for world 8, TP=2, PP=2 (so DP=2), written out by hand: ranks = dp*4 + pp*2 + tp.
VLLM_8_TP2_PP2 = {
    "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "pp": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "dp": [[0, 4], [2, 6], [1, 5], [3, 7]],
    "ep": [[0, 1, 4, 5], [2, 3, 6, 7]],
}


def test_layout_matches_vllm_world8_tp2_pp2():
    assert group_layout(8, 2, 2) == VLLM_8_TP2_PP2
    assert group_layout(8, 2, 2, 2) == VLLM_8_TP2_PP2


def test_layout_degenerate_cases():
    assert group_layout(4) == {
        "tp": [[0], [1], [2], [3]],
        "pp": [[0], [1], [2], [3]],
        "dp": [[0, 1, 2, 3]],
        "ep": [[0, 1, 2, 3]],
    }
    assert group_layout(4, 4)["tp"] == [[0, 1, 2, 3]] and group_layout(4, 4)["dp"] == [
        [0], [1], [2], [3]
    ]


def _my_groups(info, tp, pp):
    groups = initialize_model_parallel(tp, pp)
    assert model_parallel_is_initialized()
    assert get_world_group() is groups.world and get_tp_group() is groups.tp
    assert get_pp_group() is groups.pp and get_dp_group() is groups.dp
    assert get_ep_group() is groups.ep
    for g in groups.__dict__.values():
        assert g.ranks[g.rank_in_group] == info.rank and g.world_size == len(g.ranks)
    # One real collective per group proves the process groups match the rank lists.
    sums = {
        name: int(getattr(groups, name).all_reduce(__import__("torch").tensor([info.rank])))
        for name in ("tp", "pp", "dp", "ep")
    }
    out = {name: getattr(groups, name).ranks for name in ("tp", "pp", "dp", "ep")}
    out["sums"] = sums
    destroy_model_parallel()
    assert not model_parallel_is_initialized()
    return out


def test_real_groups_world8_tp2_pp2():
    from moe_ep.testing import run_distributed

    results = run_distributed(8, _my_groups, 2, 2, timeout=240)
    for rank, got in enumerate(results):
        for name, layout in VLLM_8_TP2_PP2.items():
            (mine,) = [g for g in layout if rank in g]
            assert got[name] == mine, (rank, name)
            assert got["sums"][name] == sum(mine), (rank, name)


def _topology(info):
    groups = initialize_model_parallel()
    flags = in_the_same_node_as(groups.world, source_rank=info.world_size - 1)
    topo = Topology.detect(groups.world)
    return flags, topo


@pytest.mark.parametrize("world_size", [1, 2])
def test_same_node_and_topology(dist_pool, world_size):
    for flags, topo in dist_pool(world_size).run(_topology):
        assert flags == [True] * world_size
        assert topo.world_size == world_size and topo.device == "cpu"
        assert not topo.internode and topo.num_nodes == 1


def test_topology_value_object():
    t = Topology(device="cuda", world_size=16, local_world_size=8,
                 same_node=(True,) * 8 + (False,) * 8, nvlink=True, gpus_per_node=8)
    assert t.internode and t.num_nodes == 2
    assert Topology(world_size=4).same_node == (True,) * 4
    assert "internode=True" in t.describe()


def _use_after_destroy(info):
    import torch

    from moe_ep.distributed import GroupCoordinator

    halves = [[0, 1], [2, 3]]
    g = GroupCoordinator(halves, "half", use_shm=False)
    g.destroy()
    g.destroy()  # idempotent
    try:
        g.all_reduce(torch.ones(1))
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_destroyed_group_refuses_collectives(dist_pool):
    # torch.distributed reads group=None as the world: a destroyed group must raise instead.
    for message in dist_pool(4).run(_use_after_destroy):
        assert "was destroyed" in message


def test_initialize_model_parallel_initialises_under_torchrun(tmp_path):
    """The README's snippet: under torchrun, initialize_model_parallel() alone is enough."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    code = ("from moe_ep.distributed import initialize_model_parallel, destroy_model_parallel;"
            "g = initialize_model_parallel(); print(g.ep.world_size); destroy_model_parallel()")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
