"""FusedMoE on every portable manager equals a dense single-process MoE with all experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_ep.layer import FusedMoE, route

E, K, H, I = 6, 2, 16, 24
TOKENS = [7, 0, 5, 3]  # per rank; rank 1 has none


def _global_weights():
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(E, H, generator=g),
        torch.randn(E, I, H, generator=g) * H**-0.5,
        torch.randn(E, I, H, generator=g) * H**-0.5,
        torch.randn(E, H, I, generator=g) * I**-0.5,
    )


def _tokens(rank):
    return torch.randn(TOKENS[rank], H, generator=torch.Generator().manual_seed(100 + rank))


def _dense_moe(x, gate, w_gate, w_up, w_down):
    """Every expert on every token, weighted by the renormalised top-k softmax (no routing code)."""
    probs = torch.softmax(x @ gate.T, dim=-1)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        top = probs[n].argsort(descending=True)[:K]
        w = probs[n, top] / probs[n, top].sum()
        for weight, e in zip(w, top.tolist()):
            h = F.silu(x[n] @ w_gate[e].T) * (x[n] @ w_up[e].T)
            out[n] += weight * (h @ w_down[e].T)
    return out


def _layer_matches_dense(info, names):
    from moe_ep.distributed import initialize_model_parallel
    from moe_ep.managers.registry import build_manager

    groups = initialize_model_parallel()
    weights = _global_weights()
    x = _tokens(info.rank)
    want = _dense_moe(x, *weights)
    checked = []
    for name in names:
        mgr = build_manager(name, groups.ep)
        try:
            layer = FusedMoE(E, K, H, I, mgr)
            layer.load_global_weights(*weights)
            with torch.no_grad():
                got = layer(x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
            checked.append(name)
        finally:
            mgr.destroy()
    return checked


def _portable_managers():
    from moe_ep.distributed import Topology
    from moe_ep.managers.registry import available_managers

    avail = available_managers(Topology(world_size=2))
    return sorted(n for n, (ok, _) in avail.items() if ok)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_fused_moe_matches_dense_reference(dist_pool, world_size):
    names = _portable_managers()
    assert {"naive", "allgather_reducescatter", "alltoallv"} <= set(names)
    for checked in dist_pool(world_size).run(_layer_matches_dense, names, timeout=180):
        assert checked == names


def test_route_is_renormalised_topk_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    w, ids = route(logits, 2)
    assert ids.tolist() == [[3, 2]]
    p = torch.softmax(logits[0], 0)
    torch.testing.assert_close(w[0], torch.stack([p[3], p[2]]) / (p[3] + p[2]))
    with pytest.raises(ValueError, match="top_k must be in"):
        route(logits, 5)


class _MixtralExpert(nn.Module):
    def __init__(self, g, e):
        super().__init__()
        self.w1 = nn.Linear(H, I, bias=False)
        self.w3 = nn.Linear(H, I, bias=False)
        self.w2 = nn.Linear(I, H, bias=False)
        self.w1.weight.data, self.w3.weight.data, self.w2.weight.data = g[1][e], g[2][e], g[3][e]


class _MixtralBlock(nn.Module):
    """The attribute shape of transformers' MixtralSparseMoeBlock."""

    def __init__(self):
        super().__init__()
        g = _global_weights()
        self.top_k = K
        self.gate = nn.Linear(H, E, bias=False)
        self.gate.weight.data = g[0]
        self.experts = nn.ModuleList(_MixtralExpert(g, e) for e in range(E))


def _from_mixtral(info):
    from moe_ep.distributed import initialize_model_parallel
    from moe_ep.managers.registry import build_manager

    mgr = build_manager("alltoallv", initialize_model_parallel().ep)
    try:
        layer = FusedMoE.from_mixtral_block(_MixtralBlock(), mgr)
        x = _tokens(info.rank)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), _dense_moe(x, *_global_weights()))
        return len(layer.local_experts)
    finally:
        mgr.destroy()


def test_from_mixtral_block(dist_pool):
    assert dist_pool(2).run(_from_mixtral) == [3, 3]


def _bad_input_on_one_rank(info):
    from moe_ep.distributed import initialize_model_parallel
    from moe_ep.managers import RemoteInputError
    from moe_ep.managers.registry import build_manager

    mgr = build_manager("alltoallv", initialize_model_parallel().ep)
    layer = FusedMoE(E, K, H, I, mgr)
    x = _tokens(info.rank) if info.rank else torch.zeros(3, H + 1)
    try:
        layer(x)
    except RemoteInputError as e:
        return ("remote", e.bad_ranks)
    except ValueError as e:
        return ("local", str(e))
    finally:
        mgr.destroy()
    return ("none", None)


def test_bad_input_on_one_rank_fails_every_rank(dist_pool):
    local, remote = dist_pool(2).run(_bad_input_on_one_rank, timeout=60)
    assert local[0] == "local" and f"x must be [num_tokens, {H}]" in local[1]
    assert remote == ("remote", (0,))


def _dispatch_with_grad(info):
    from moe_ep.distributed import initialize_model_parallel
    from moe_ep.managers.registry import build_manager

    mgr = build_manager("naive", initialize_model_parallel().ep)
    x = torch.ones(2, H, requires_grad=True)
    try:
        mgr.dispatch(x, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), num_experts=E)
    except ValueError as e:
        return str(e)
    finally:
        mgr.destroy()
    return "no error"


def test_dispatch_rejects_autograd_inputs(dist_pool):
    for message in dist_pool(1).run(_dispatch_with_grad):
        assert "not differentiable" in message and "torch.no_grad()" in message
