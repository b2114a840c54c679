"""CUDA smoke tests: one rank, NCCL, every portable manager on device tensors.

Skipped without a GPU (CI has none). With one GPU only world size 1 is possible (NCCL refuses
two ranks on one device), so these check device placement and the CUDA code paths of the
managers and the layer, not multi-rank NCCL traffic.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

E, K, H, I = 8, 2, 64, 96  # noqa: E741 - the MoE literature's names


def _dense(x, gate, w_gate, w_up, w_down):
    probs = torch.softmax(x.float() @ gate.float().T, dim=-1)
    top = probs.topk(K, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True)
    out = torch.zeros_like(x, dtype=torch.float32)
    for n in range(x.shape[0]):
        for w, e in zip(weights[n], top.indices[n].tolist(), strict=True):
            h = torch.nn.functional.silu(x[n] @ w_gate[e].T) * (x[n] @ w_up[e].T)
            out[n] += w * (h @ w_down[e].T)
    return out


def _layer_on_cuda(info, names):
    from moe_ep.distributed import initialize_model_parallel
    from moe_ep.layer import FusedMoE
    from moe_ep.managers.registry import build_manager

    groups = initialize_model_parallel()
    assert groups.ep.device.type == "cuda" and groups.ep.backend == "nccl"
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(*s, device="cuda", generator=g) * 0.2
               for s in ((E, H), (E, I, H), (E, I, H), (E, H, I))]
    x = torch.randn(5, H, device="cuda", generator=g)
    want = _dense(x, *weights)
    errors = {}
    for name in names:
        mgr = build_manager(name, groups.ep)
        try:
            layer = FusedMoE(E, K, H, I, mgr)
            gate, w_gate, w_up, w_down = weights
            layer.load_global_weights(gate, torch.cat([w_gate, w_up], dim=1), w_down)
            y = layer(x)
            assert y.device.type == "cuda" and y.dtype == x.dtype
            errors[name] = (y.float() - want).abs().max().item()
        finally:
            mgr.destroy()
    return errors


def test_portable_managers_on_one_gpu():
    from moe_ep.testing import run_distributed

    names = ["naive", "allgather_reducescatter", "alltoallv"]
    (errors,) = run_distributed(1, _layer_on_cuda, names, device="cuda", timeout=300)
    assert set(errors) == set(names)
    for name, err in errors.items():
        assert err < 1e-4, (name, err)
