"""Expert parallelism on real transformers MoE models (tiny random ones; nothing downloaded).

For each supported architecture, at W=2 and W=4 over gloo in fp32: the whole model's logits
after ``expert_parallel`` equal the unmodified model's (the experts matter: zeroing them moves
the logits), each rank holds only its experts (parameter counts computed from the config), and
``from_pretrained`` on a saved checkpoint (per-expert and fused formats, sharded or not)
matches ``AutoModelForCausalLM.from_pretrained`` while reading only the local experts, with a
manager given directly or chosen by the shipped ``cpu-local`` config.

The 4.x block shapes (per-expert ``nn.ModuleList``, ``(hidden, router_logits)`` returns) are
tested with blocks written here, since transformers 5.x no longer ships them; those tests need
no transformers.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
# One manager per architecture, so every portable manager runs a whole model.
MANAGER_OF = {"mixtral": "alltoallv", "qwen2_moe": "allgather_reducescatter",
              "qwen3_moe": "shm", "deepseek_v3": "naive"}
ATOL = 1e-4


def _hf_config(name: str):
    import transformers

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64,
                  # Large enough that the experts move the logits visibly (checked below).
                  initializer_range=0.2)
    if name == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=24, num_local_experts=8,
                                          num_experts_per_tok=2, head_dim=8)
    if name == "qwen2_moe":
        # 6 experts: not divisible by 4 ranks.
        return transformers.Qwen2MoeConfig(**common, intermediate_size=40,
                                           moe_intermediate_size=24, num_experts=6,
                                           shared_expert_intermediate_size=20,
                                           num_experts_per_tok=2, norm_topk_prob=False)
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, intermediate_size=40,
                                           moe_intermediate_size=24, num_experts=8,
                                           num_experts_per_tok=2, norm_topk_prob=True,
                                           head_dim=8, tie_word_embeddings=True)
    if name == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **{**common, "num_hidden_layers": 3}, intermediate_size=40, moe_intermediate_size=24,
            n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
            n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5,
            norm_topk_prob=True,
        )
    raise ValueError(name)


def _moe_shape(cfg) -> tuple[int, int, int, int]:
    """(MoE layers, E, I, H) read from the config, independently of moe_ep."""
    if cfg.model_type == "mixtral":
        return cfg.num_hidden_layers, cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
    layers = cfg.num_hidden_layers
    if cfg.model_type == "deepseek_v3":
        layers -= cfg.first_k_dense_replace
        return layers, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    return layers, cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size


def _local_count(num_experts: int, world: int, rank: int) -> int:
    return num_experts // world + (rank < num_experts % world)


def _tiny_model(name: str):
    """The same random model on every rank (seeded), DeepSeek's correction bias non-zero."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(name)).eval()
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.randn(bias.shape, generator=g) * 0.3)
    return model


def _input_ids(rank: int) -> torch.Tensor:
    # Ranks hold different numbers of tokens.
    return torch.randint(0, 64, (2, 3 + 2 * rank), generator=torch.Generator().manual_seed(rank))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _router_logits(model, ids):
    with torch.no_grad():
        return model(ids, output_router_logits=True).router_logits


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _expected_count(full: int, cfg, world: int, rank: int) -> int:
    layers, num_experts, inter, hidden = _moe_shape(cfg)
    per_expert = 3 * inter * hidden
    return full - layers * (num_experts - _local_count(num_experts, world, rank)) * per_expert


def _expert_parallel_matches(info):
    from moe_ep.distributed import initialize_model_parallel
    from moe_ep.integrations.transformers import ExpertParallelMoE, ep_manager, expert_parallel
    from moe_ep.managers import build_manager

    groups = initialize_model_parallel()
    report = {}
    for name in ARCHS:
        model = _tiny_model(name)
        ids = _input_ids(info.rank)
        want = _logits(model, ids)
        want_router = _router_logits(model, ids)
        full = _param_count(model)
        # One original block, to compare block outputs where a rank has no tokens at all
        # (transformers' attention cannot run an empty batch, the MoE block must).
        block_name, original = next((n, copy.deepcopy(m)) for n, m in model.named_modules()
                                    if n.endswith("mlp") and hasattr(m, "experts"))
        mgr = build_manager(MANAGER_OF[name], groups.ep)
        try:
            assert expert_parallel(model, groups.ep, manager=mgr) is model
            assert ep_manager(model) is mgr
            blocks = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
            layers, num_experts, _, _ = _moe_shape(model.config)
            assert len(blocks) == layers
            assert all(b.num_local_experts == _local_count(num_experts, info.world_size,
                                                           info.rank) for b in blocks)
            assert _param_count(model) == _expected_count(full, model.config, info.world_size,
                                                          info.rank)
            got = _logits(model, ids)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL, msg=name)
            # The kept router modules still feed output_router_logits (one entry per MoE layer).
            got_router = _router_logits(model, ids)
            assert len(got_router) == len(want_router) == layers
            torch.testing.assert_close(got_router, want_router, atol=ATOL, rtol=ATOL)
            h = 0 if info.rank == 1 else 3
            hidden = torch.randn(h, 4, model.config.hidden_size,
                                 generator=torch.Generator().manual_seed(info.rank))
            with torch.no_grad():
                torch.testing.assert_close(model.get_submodule(block_name)(hidden),
                                           original(hidden), atol=ATOL, rtol=ATOL)
            # The experts matter: without them the logits move far beyond the tolerance.
            for b in blocks:
                b.w2.data.zero_()
            moved = (_logits(model, ids) - want).abs().max().item()
            assert moved > 0.05, (name, moved)
            report[name] = moved
        finally:
            mgr.destroy()
    return report


@pytest.mark.parametrize("world_size", [2, 4])
def test_expert_parallel_matches_unmodified_model(dist_pool, world_size):
    pytest.importorskip("transformers")
    reports = dist_pool(world_size).run(_expert_parallel_matches, timeout=600)
    assert all(set(r) == set(ARCHS) for r in reports)


def _save_checkpoints(root: str) -> dict[str, str]:
    """Rank 0 saves each model per-expert (save_pretrained's default), fused, and sharded."""
    out = {}
    for name in ARCHS:
        model = _tiny_model(name)
        for fmt, kwargs in (("per_expert", {}), ("fused", {"save_original_format": False}),
                            ("sharded", {"max_shard_size": "20KB"})):
            path = f"{root}/{name}-{fmt}"
            model.save_pretrained(path, **kwargs)
            out[f"{name}-{fmt}"] = path
    return out


def _from_pretrained_matches(info, root):
    import transformers

    from moe_ep.distributed import initialize_model_parallel
    from moe_ep.integrations.transformers import ep_manager, from_pretrained
    from moe_ep.managers import build_manager

    groups = initialize_model_parallel()
    if info.rank == 0:
        _save_checkpoints(root)
    groups.ep.barrier()
    report = {}
    for name in ARCHS:
        ids = _input_ids(info.rank)
        for fmt in ("per_expert", "fused", "sharded"):
            path = f"{root}/{name}-{fmt}"
            ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
            want = _logits(ref, ids)
            full = _param_count(ref)
            del ref
            # The manager given directly, or chosen by the shipped config (cpu-local picks
            # shm for ranks on one host).
            by_config = fmt == "fused"
            mgr = None if by_config else build_manager(MANAGER_OF[name], groups.ep)
            model = from_pretrained(path, groups.ep, manager=mgr,
                                    config="cpu-local" if by_config else None)
            try:
                got = _logits(model, ids)
                torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL, msg=f"{name} {fmt}")
                count = _param_count(model)
                assert count == _expected_count(full, model.config, info.world_size, info.rank)
                assert count < full
                assert not any(p.is_meta for p in model.parameters())
                load = model.moe_ep_load_report
                assert load.expert_bytes_read == load.local_expert_bytes > 0
                layers, num_experts, inter, hidden = _moe_shape(model.config)
                assert load.local_expert_bytes == layers * _local_count(
                    num_experts, info.world_size, info.rank) * 3 * inter * hidden * 4
                assert load.checkpoint_format == ("fused" if fmt == "fused" else "per_expert")
                assert (len(load.files) > 1) == (fmt == "sharded")
                report[f"{name}-{fmt}"] = ep_manager(model).name
            finally:
                ep_manager(model).destroy()
    return report


@pytest.mark.parametrize("world_size", [2, 4])
def test_from_pretrained_matches_transformers(dist_pool, world_size, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    reports = dist_pool(world_size).run(_from_pretrained_matches, str(tmp_path), timeout=600)
    for report in reports:
        assert report["mixtral-per_expert"] == "alltoallv"
        assert report["deepseek_v3-fused"] == "shm"  # from cpu-local


def test_unsupported_models_name_the_block_class():
    transformers = pytest.importorskip("transformers")
    from moe_ep.integrations.transformers import UnsupportedModelError, expert_parallel

    olmoe = transformers.AutoModelForCausalLM.from_config(transformers.OlmoeConfig(
        vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_experts=4, num_experts_per_tok=2))
    with pytest.raises(UnsupportedModelError, match="OlmoeSparseMoeBlock.*MixtralSparseMoeBlock"):
        expert_parallel(olmoe, None, config="cpu-local")
    llama = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="no sparse-MoE block.*DeepseekV3MoE"):
        expert_parallel(llama, None, config="cpu-local")


def test_expert_parallel_needs_exactly_one_manager_source():
    from moe_ep.integrations.transformers import expert_parallel

    model = _LegacyModel("mixtral")
    with pytest.raises(ValueError, match="exactly one of manager= .* or config="):
        expert_parallel(model, None)
    with pytest.raises(TypeError, match="manager must be an All2AllManager"):
        expert_parallel(model, None, manager=object())


# ------------------------------------------------------------------- 4.x block shapes

H, I, SHARED_I, E = 16, 12, 10, 6


class _Expert4x(nn.Module):
    def __init__(self, names, inter):
        super().__init__()
        self.names = names
        for n, shape in zip(names, ((inter, H), (inter, H), (H, inter))):
            setattr(self, n, nn.Linear(shape[1], shape[0], bias=False))

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.names)
        return d(F.silu(g(x)) * u(x))


class MixtralSparseMoeBlock(nn.Module):
    """transformers 4.x's Mixtral block: per-expert modules, returns (hidden, router_logits)."""

    def __init__(self, shared: bool = False):
        super().__init__()
        names = ("gate_proj", "up_proj", "down_proj") if shared else ("w1", "w3", "w2")
        self.top_k = 2
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(_Expert4x(names, I) for _ in range(E))
        if shared:
            self.shared_expert = _Expert4x(names, SHARED_I)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)
        self.shared = shared
        g = torch.Generator().manual_seed(11)
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        router_logits = self.gate(x)
        probs = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        if not self.shared:  # Mixtral renormalises; Qwen2-MoE (norm_topk_prob=False) not
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for k in range(self.top_k):
                out[n] += weights[n, k] * self.experts[selected[n, k]](x[n : n + 1])[0]
        if self.shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(b, s, h), router_logits


class Qwen2MoeSparseMoeBlock(MixtralSparseMoeBlock):
    def __init__(self):
        super().__init__(shared=True)


class _Router4x(nn.Module):
    """4.x DeepSeek-V3 router: returns the chosen ids and weights, not the logits."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, H, generator=torch.Generator().manual_seed(3)))
        self.register_buffer("e_score_correction_bias",
                             torch.randn(E, generator=torch.Generator().manual_seed(4)) * 0.3)

    def forward(self, x):
        from moe_ep.testing import reference_routing

        dense = reference_routing(F.linear(x.float(), self.weight.float()), top_k=2,
                                  scoring="sigmoid", correction_bias=self.e_score_correction_bias,
                                  n_group=3, topk_group=2, routed_scaling_factor=2.5)
        weights, ids = dense.topk(2, dim=-1)
        return ids, weights.float()


class DeepseekV3MoE(nn.Module):
    """transformers 4.x's DeepSeek-V3 block: per-expert MLPs, a router returning ids."""

    def __init__(self):
        super().__init__()
        names = ("gate_proj", "up_proj", "down_proj")
        self.gate = _Router4x()
        self.experts = nn.ModuleList(_Expert4x(names, I) for _ in range(E))
        self.shared_experts = _Expert4x(names, SHARED_I)
        g = torch.Generator().manual_seed(12)
        for name, p in self.named_parameters():
            if not name.startswith("gate."):
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, H)
        ids, weights = self.gate(x)
        out = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for k in range(ids.shape[1]):
                out[n] += weights[n, k] * self.experts[ids[n, k]](x[n : n + 1])[0]
        return out.view(hidden_states.shape) + self.shared_experts(hidden_states)


class _LegacyModel(nn.Module):
    def __init__(self, model_type: str):
        super().__init__()
        config = {"model_type": model_type, "hidden_size": H, "num_experts_per_tok": 2,
                  "hidden_act": "silu"}
        if model_type == "qwen2_moe":
            config.update(num_experts=E, moe_intermediate_size=I, norm_topk_prob=False)
            block = Qwen2MoeSparseMoeBlock()
        elif model_type == "deepseek_v3":
            config.update(n_routed_experts=E, moe_intermediate_size=I, norm_topk_prob=True,
                          n_group=3, topk_group=2, routed_scaling_factor=2.5)
            block = DeepseekV3MoE()
        else:
            config.update(num_local_experts=E, intermediate_size=I)
            block = MixtralSparseMoeBlock()
        self.config = types.SimpleNamespace(**config)
        self.layers = nn.ModuleList([block])


def _legacy_blocks_match(info):
    from moe_ep.distributed import initialize_model_parallel
    from moe_ep.integrations.transformers import ExpertParallelMoE, expert_parallel
    from moe_ep.managers import build_manager

    mgr = build_manager("alltoallv", initialize_model_parallel().ep)
    try:
        out = []
        for model_type in ("mixtral", "qwen2_moe", "deepseek_v3"):
            model = _LegacyModel(model_type)
            x = torch.randn(2, 2 + info.rank, H, generator=torch.Generator().manual_seed(info.rank))
            with torch.no_grad():
                model_output = model.layers[0](x)
            want_y, want_logits = model_output if isinstance(model_output, tuple) else (None, None)
            expert_parallel(model, mgr.group, manager=mgr)
            block = model.layers[0]
            assert isinstance(block, ExpertParallelMoE)
            if model_type == "deepseek_v3":  # 4.x DeepSeek-V3 returned the tensor alone
                want_y, want_logits = model_output, None
            got = block(x)
            got_y, got_logits = got if want_logits is not None else (got, None)
            torch.testing.assert_close(got_y, want_y, atol=1e-5, rtol=1e-5)
            if want_logits is not None:
                torch.testing.assert_close(got_logits, want_logits)
            out.append(block.num_local_experts)
        return out
    finally:
        mgr.destroy()


def test_transformers_4x_per_expert_blocks(dist_pool):
    assert dist_pool(2).run(_legacy_blocks_match, timeout=60) == [[3, 3, 3], [3, 3, 3]]
