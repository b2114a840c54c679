"""Expert parallelism for Hugging Face transformers MoE models.

Two entry points, both collective over the expert-parallel group (every rank calls them with
the same model and checkpoint)::

    model = from_pretrained(checkpoint_dir, groups.ep, config="cpu-local")     # load sharded
    expert_parallel(model, groups.ep, manager=mgr)                            # convert in place
    ...
    ep_manager(model).destroy()                                               # when done

``expert_parallel`` replaces every sparse-MoE block of a supported architecture with an
:class:`ExpertParallelMoE` (a :class:`~moe_ep.layer.FusedMoE`) that keeps only this rank's
experts, routes exactly as the original block (same scores, grouping, bias, scaling), runs the
shared experts locally and returns what the original block returned: a ``[batch, seq, hidden]``
tensor for transformers 5.x blocks, ``(hidden_states, router_logits)`` for the 4.x blocks that
returned that tuple (Mixtral, Qwen2-MoE, Qwen3-MoE with per-expert ``nn.ModuleList`` experts).

``from_pretrained`` builds the model with its parameters on the meta device (buffers such as
rotary frequencies are computed normally), converts the blocks, then reads from the
safetensors shards only the non-expert tensors and this rank's experts: a fused 3-D expert
tensor is read with a sliced read (``safe_open(...).get_slice(name)[first:last]``), a
per-expert checkpoint (the format ``save_pretrained`` writes by default and the Hub models
use) by opening only the local experts' tensors. No rank ever holds all experts.

The block's router module is kept (replicated, as small as ``[E, H]``): the logits are the
original's, and transformers' ``output_router_logits`` recording still works; the routing from
those logits is :func:`moe_ep.layer.route`'s.

Supported (``SUPPORTED``), matched by ``config.model_type`` and then by the block's class
name (the same in transformers 4.x and 5.x):

============  ========================  ==========================================================
model type    block class               routing
============  ========================  ==========================================================
mixtral       MixtralSparseMoeBlock     softmax top-k, renormalised
qwen2_moe     Qwen2MoeSparseMoeBlock    softmax top-k, ``norm_topk_prob``; sigmoid-gated shared
                                        expert
qwen3_moe     Qwen3MoeSparseMoeBlock    softmax top-k, ``norm_topk_prob``
deepseek_v3   DeepseekV3MoE             sigmoid, bias-corrected grouped top-k, scaling, shared
                                        experts (the dense first layers stay dense)
============  ========================  ==========================================================

Anything else raises :class:`UnsupportedModelError` naming the model's MoE block class and the
supported ones. Limitations: inference only (no gradients through dispatch); quantised
checkpoints (e.g. DeepSeek-V3's FP8 weights) are not dequantised.

transformers and safetensors are imported lazily (the ``hf`` extra); this module imports
without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moe_ep.layer import DispatchQuant, FusedMoE
from moe_ep.managers import All2AllManager

if TYPE_CHECKING:
    from moe_ep.config import Config
    from moe_ep.distributed.group import GroupCoordinator

__all__ = [
    "SUPPORTED",
    "ExpertParallelMoE",
    "LoadReport",
    "UnsupportedModelError",
    "ep_manager",
    "expert_parallel",
    "from_pretrained",
]

logger = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The model has no sparse-MoE block ``expert_parallel`` knows how to convert."""


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class _Architecture:
    """What differs between the supported MoE blocks.

    Attributes:
        block_class: class name of the sparse-MoE block (same in transformers 4.x and 5.x).
        num_experts, intermediate: config attributes holding E and the expert width I.
        routing: FusedMoE routing options (``_FromConfig`` values are read from the config).
        per_expert: names of the gate / up / down projections of one expert in the 4.x
            modules and in per-expert checkpoints (``experts.{e}.{name}.weight``).
        shared: attribute of the block's shared-expert MLP, or None.
        shared_gate: attribute of the block's shared-expert gate (Linear H -> 1), or None.
        checkpoint_renames: (old, new) substrings that map checkpoint keys to the module
            paths of the converted model (Mixtral's 4.x ``block_sparse_moe``; Qwen2-MoE's
            ``shared_expert``, which the EP block calls ``shared_experts``).
        legacy_tuple: whether the 4.x block (per-expert ``nn.ModuleList``) returned
            ``(hidden_states, router_logits)``.
    """

    block_class: str
    num_experts: str
    intermediate: str
    routing: Mapping[str, Any]
    per_expert: tuple[str, str, str]
    shared: str | None = None
    shared_gate: str | None = None
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    legacy_tuple: bool = True


@dataclass(frozen=True)
class _FromConfig:
    """A routing option read from the model config attribute ``name``."""

    name: str


_QWEN_MLP = ("gate_proj", "up_proj", "down_proj")

#: model_type -> what expert_parallel converts in it.
SUPPORTED: Mapping[str, _Architecture] = {
    "mixtral": _Architecture(
        "MixtralSparseMoeBlock", "num_local_experts", "intermediate_size",
        {"scoring": "softmax", "renormalize": True}, ("w1", "w3", "w2"),
        checkpoint_renames=((".block_sparse_moe.", ".mlp."),),
    ),
    "qwen2_moe": _Architecture(
        "Qwen2MoeSparseMoeBlock", "num_experts", "moe_intermediate_size",
        {"scoring": "softmax", "renormalize": _FromConfig("norm_topk_prob")}, _QWEN_MLP,
        shared="shared_expert", shared_gate="shared_expert_gate",
        checkpoint_renames=((".shared_expert.", ".shared_experts."),),
    ),
    "qwen3_moe": _Architecture(
        "Qwen3MoeSparseMoeBlock", "num_experts", "moe_intermediate_size",
        {"scoring": "softmax", "renormalize": _FromConfig("norm_topk_prob")}, _QWEN_MLP,
    ),
    "deepseek_v3": _Architecture(
        "DeepseekV3MoE", "n_routed_experts", "moe_intermediate_size",
        {"scoring": "sigmoid", "renormalize": _FromConfig("norm_topk_prob"),
         "n_group": _FromConfig("n_group"), "topk_group": _FromConfig("topk_group"),
         "routed_scaling_factor": _FromConfig("routed_scaling_factor"),
         "correction_bias": True},
        _QWEN_MLP, shared="shared_experts", legacy_tuple=False,
    ),
}


def _supported_text() -> str:
    return ", ".join(f"{a.block_class} ({t})" for t, a in SUPPORTED.items())


def _layer_options(arch: _Architecture, config: Any) -> dict[str, Any]:
    options = {k: getattr(config, v.name) if isinstance(v, _FromConfig) else v
               for k, v in arch.routing.items()}
    return {
        "num_experts": int(getattr(config, arch.num_experts)),
        "top_k": int(config.num_experts_per_tok),
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(getattr(config, arch.intermediate)),
        "activation": config.hidden_act,
        **options,
    }


# --------------------------------------------------------------------------- the EP block


class ExpertParallelMoE(FusedMoE):
    """A transformers sparse-MoE block on expert parallelism: a FusedMoE with its I/O.

    Takes the block's ``hidden_states [batch, seq, hidden]`` and returns the same shape, or
    ``(hidden_states, router_logits [batch * seq, E])`` when ``returns_router_logits`` (the
    4.x blocks). ``gate`` is the original block's router module; parameter names:
    ``gate.weight``, ``gate.e_score_correction_bias`` (DeepSeek-V3), ``w13`` / ``w2`` (this
    rank's experts), ``shared_experts.*``, ``shared_expert_gate.weight``.
    """

    def __init__(self, *args: Any, returns_router_logits: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.returns_router_logits = returns_router_logits

    def forward(self, hidden_states: torch.Tensor):  # type: ignore[override]
        y, logits = self.forward_with_router_logits(hidden_states)
        return (y, logits) if self.returns_router_logits else y


def _owner_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a transformers model with a .config, got "
                        f"{type(model).__name__}")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _find_blocks(model: nn.Module) -> tuple[_Architecture, list[tuple[str, nn.Module]]]:
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    arch = SUPPORTED.get(model_type)
    blocks = [] if arch is None else [
        (name, m) for name, m in model.named_modules() if type(m).__name__ == arch.block_class
    ]
    if arch is None or not blocks:
        moe_like = sorted({type(m).__name__ for m in model.modules()
                           if isinstance(getattr(m, "experts", None), nn.Module)})
        found = (f"its MoE block class is {', '.join(moe_like)}" if moe_like
                 else "it has no sparse-MoE block")
        raise UnsupportedModelError(
            f"expert_parallel cannot convert {type(model).__name__} (model type "
            f"{model_type!r}): {found}; supported blocks: {_supported_text()}"
        )
    return arch, blocks


def _manager_for(
    group: GroupCoordinator,
    manager: All2AllManager | None,
    config: str | os.PathLike | Config | None,
    phase: str | None,
) -> All2AllManager:
    if (manager is None) == (config is None):
        raise ValueError("pass exactly one of manager= (a built All2AllManager) or config= "
                         "(a moe_ep config name, path or Config)")
    if manager is not None:
        if not isinstance(manager, All2AllManager):
            raise TypeError(f"manager must be an All2AllManager, got {type(manager).__name__}")
        if manager.group is not group:
            raise ValueError("manager was built on a different group than the group= passed")
        return manager
    from moe_ep.config import build_manager_from_config

    return build_manager_from_config(config, group, phase)


@torch.no_grad()
def _convert_block(
    block: nn.Module,
    arch: _Architecture,
    config: Any,
    manager: All2AllManager,
    **layer_kwargs: Any,
) -> ExpertParallelMoE:
    experts = block.experts
    per_expert = isinstance(experts, nn.ModuleList)
    gate_name, up_name, down_name = arch.per_expert
    if per_expert:
        probe = getattr(experts[0], gate_name).weight
    else:
        probe = experts.gate_up_proj
    device = probe.device
    if device.type not in ("meta", torch.device(manager.group.device).type):
        raise ValueError(f"the model's experts are on {device} but the group's device is "
                         f"{manager.group.device}; move the model there first")
    # The block's own router module where its output starts with the logits (every 5.x router;
    # 4.x's nn.Linear gates): same logits, and transformers' output hooks (which record router
    # logits by router class) still find it. 4.x's DeepSeek-V3 router returns the chosen ids
    # instead: its weights go into a new Router.
    reuse_gate = not per_expert or isinstance(block.gate, nn.Linear)
    options = _layer_options(arch, config)
    ep = ExpertParallelMoE(
        manager=manager,
        gate=block.gate if reuse_gate else None,
        shared_experts=getattr(block, arch.shared) if arch.shared else None,
        shared_expert_gate=getattr(block, arch.shared_gate) if arch.shared_gate else None,
        returns_router_logits=per_expert and arch.legacy_tuple,
        dtype=probe.dtype,
        device=device,
        router_dtype=None if reuse_gate else block.gate.weight.dtype,
        **options,
        **layer_kwargs,
    )
    if device.type == "meta":
        return ep  # weights come from a checkpoint (from_pretrained)
    if not reuse_gate:
        ep.gate.weight.copy_(block.gate.weight)
        if ep.correction_bias:
            ep.gate.e_score_correction_bias.copy_(block.gate.e_score_correction_bias)
    inter = ep.intermediate_size
    for j, e in enumerate(ep.local_experts):
        if per_expert:
            ep.w13[j, :inter].copy_(getattr(experts[e], gate_name).weight)
            ep.w13[j, inter:].copy_(getattr(experts[e], up_name).weight)
            ep.w2[j].copy_(getattr(experts[e], down_name).weight)
        else:
            ep.w13[j].copy_(experts.gate_up_proj[e])
            ep.w2[j].copy_(experts.down_proj[e])
    return ep


def expert_parallel(
    model: nn.Module,
    group: GroupCoordinator,
    *,
    manager: All2AllManager | None = None,
    config: str | os.PathLike | Config | None = None,
    phase: str | None = None,
    max_tokens_per_rank: int = 4096,
    quant: DispatchQuant | None = None,
) -> nn.Module:
    """Replace, in place, every sparse-MoE block of ``model`` with an :class:`ExpertParallelMoE`.

    Collective over ``group`` (the expert-parallel :class:`GroupCoordinator`): every rank calls
    it on the same model. Each new block keeps only this rank's experts
    (``expert_placement(E, group.world_size)``); the replaced block (with all experts) is
    released. Its parameters stay on the device (and dtype) they were on, ``meta`` included.

    Args:
        model: a transformers model (``model.config.model_type`` in :data:`SUPPORTED`).
        group: the expert-parallel group.
        manager: the All2All manager to dispatch with (built on ``group``), or
        config: a moe_ep config (shipped name, path or :class:`~moe_ep.config.Config`) that
            selects one (``build_manager_from_config(config, group, phase)``).
        phase: ``"prefill"`` / ``"decode"`` for the config's rules, or None.
        max_tokens_per_rank: the most tokens (``batch * seq``) one rank passes to a block.
        quant: FP8 dispatch (:class:`~moe_ep.layer.DispatchQuant`), or None.

    Returns:
        ``model``. ``ep_manager(model)`` gives the manager (destroy it when done).

    Raises:
        UnsupportedModelError: no supported MoE block (names the block class found and the
            supported ones).
        ValueError: both or neither of ``manager`` / ``config``.
    """
    arch, blocks = _find_blocks(model)
    text_config = _text_config(model)
    manager = _manager_for(group, manager, config, phase)
    for name, block in blocks:
        ep = _convert_block(block, arch, text_config, manager,
                            max_tokens_per_rank=max_tokens_per_rank, quant=quant)
        parent, attr = _owner_of(model, name)
        setattr(parent, attr, ep)
    logger.info("expert_parallel: %d %s blocks -> ExpertParallelMoE on %s (rank %d of %d)",
                len(blocks), arch.block_class, manager.name, manager.rank, manager.world_size)
    return model


def ep_manager(model: nn.Module) -> All2AllManager:
    """The manager the :class:`ExpertParallelMoE` blocks of ``model`` dispatch with."""
    for m in model.modules():
        if isinstance(m, ExpertParallelMoE):
            return m.manager
    raise ValueError(f"{type(model).__name__} has no ExpertParallelMoE block; call "
                     "expert_parallel or from_pretrained first")


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadReport:
    """What :func:`from_pretrained` read on this rank.

    Attributes:
        checkpoint_format: ``"fused"`` (3-D ``experts.gate_up_proj`` tensors) or
            ``"per_expert"`` (``experts.{e}.*.weight``, save_pretrained's default).
        tensors: tensors (or slices) read.
        bytes_read: bytes of every tensor read, as stored.
        expert_bytes_read: the part of ``bytes_read`` that holds routed experts.
        local_expert_bytes: bytes of this rank's experts as stored (equals
            ``expert_bytes_read``: nothing of other ranks' experts is read).
        files: safetensors files opened.
    """

    checkpoint_format: str
    tensors: int
    bytes_read: int
    expert_bytes_read: int
    local_expert_bytes: int
    files: tuple[str, ...] = field(default=())


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every registered parameter on the meta device; buffers stay real.

    Buffers (rotary frequencies, masks) are computed from the config in ``__init__`` and are
    often absent from checkpoints, so they must stay real; parameters are all in the
    checkpoint. Parameters are first made by their module (``torch.empty``, untouched because
    weight initialisation is off) and moved to meta at registration, so no expert is ever
    resident (the technique of accelerate's ``init_empty_weights(include_buffers=False)``).
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class _Checkpoint:
    """The safetensors files of a checkpoint directory, indexed by 5.x-normalised key."""

    def __init__(self, directory: Path, renames: tuple[tuple[str, str], ...],
                 stack: contextlib.ExitStack) -> None:
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory} holds no *.safetensors file")
        self.files = tuple(files)
        self._where: dict[str, tuple[Any, str]] = {}
        for name in files:
            handle = stack.enter_context(safe_open(str(directory / name), framework="pt",
                                                   device="cpu"))
            for key in handle.keys():
                normalised = key
                for old, new in renames:
                    normalised = normalised.replace(old, new)
                self._where[normalised] = (handle, key)
        self.tensors = 0
        self.bytes_read = 0
        self.expert_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def read(self, key: str, rows: slice | None = None, *, expert: bool = False
             ) -> torch.Tensor:
        handle, stored = self._where[key]
        t = handle.get_tensor(stored) if rows is None else handle.get_slice(stored)[rows]
        nbytes = t.numel() * t.element_size()
        self.tensors += 1
        self.bytes_read += nbytes
        if expert:
            self.expert_bytes += nbytes
        return t


def _expert_tensors(ckpt: _Checkpoint, prefix: str, ep: ExpertParallelMoE,
                    arch: _Architecture) -> tuple[str, torch.Tensor, torch.Tensor]:
    """This rank's ``(format, w13 [E_local, 2I, H], w2 [E_local, H, I])`` of block ``prefix``."""
    lo, hi = ep.local_experts.start, ep.local_experts.stop
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in ckpt:
        return ("fused", ckpt.read(fused, slice(lo, hi), expert=True),
                ckpt.read(f"{prefix}.experts.down_proj", slice(lo, hi), expert=True))
    gate, up, down = arch.per_expert
    first = f"{prefix}.experts.{lo}.{gate}.weight"
    if ep.num_local_experts and first not in ckpt:
        raise KeyError(f"the checkpoint has neither {fused!r} nor {first!r}: it does not hold "
                       f"the experts of {prefix}")
    w13, w2 = [], []
    for e in ep.local_experts:
        key = f"{prefix}.experts.{e}"
        w13.append(torch.cat([ckpt.read(f"{key}.{gate}.weight", expert=True),
                              ckpt.read(f"{key}.{up}.weight", expert=True)]))
        w2.append(ckpt.read(f"{key}.{down}.weight", expert=True))
    if not w13:  # this rank owns no expert (E < W)
        return ("per_expert", torch.empty(ep.w13.shape, dtype=ep.w13.dtype),
                torch.empty(ep.w2.shape, dtype=ep.w2.dtype))
    return "per_expert", torch.stack(w13), torch.stack(w2)


def _load_checkpoint(model: nn.Module, directory: Path, arch: _Architecture,
                     device: torch.device) -> LoadReport:
    """Fill ``model``'s meta parameters and its persistent buffers from ``directory``.

    Local (no communication). Raises KeyError listing the tensors still on meta that the
    checkpoint lacks, ValueError on a shape mismatch.
    """
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelMoE)}
    formats = set()
    local_expert_bytes = 0
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(directory, arch.checkpoint_renames, stack)
        loaded: dict[int, torch.Tensor] = {}  # id(meta tensor) -> its value (tied ones share)
        params: dict[int, nn.Parameter] = {}  # id(meta tensor) -> the Parameter replacing it
        # Experts first: they are read as slices, never through the generic path below.
        for prefix, ep in blocks.items():
            fmt, w13, w2 = _expert_tensors(ckpt, prefix, ep, arch)
            formats.add(fmt)
            for meta, value in ((ep.w13, w13), (ep.w2, w2)):
                if tuple(value.shape) != tuple(meta.shape):
                    raise ValueError(f"{prefix}: checkpoint experts have shape "
                                     f"{tuple(value.shape)}, the model expects "
                                     f"{tuple(meta.shape)}")
                loaded[id(meta)] = value
                local_expert_bytes += value.numel() * value.element_size()
        missing = []
        # Every parameter (all on meta) and every persistent buffer: those computed at
        # construction (real) are still overwritten by the checkpoint's value when it has one
        # (DeepSeek-V3's e_score_correction_bias), as transformers' loader does.
        slots = []  # (module, attribute, is_parameter, tensor, model key)
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for is_param, table in ((True, module._parameters), (False, module._buffers)):
                for attr, t in table.items():
                    if t is None:
                        continue
                    if not is_param and attr in module._non_persistent_buffers_set:
                        if t.device.type == "meta":
                            raise ValueError(f"non-persistent buffer {mod_name}.{attr} is on "
                                             "the meta device and is not in checkpoints")
                        continue
                    key = f"{mod_name}.{attr}" if mod_name else attr
                    slots.append((module, attr, is_param, t, key))
        for _, _, _, t, key in slots:
            if id(t) in loaded:
                continue
            if key in ckpt:
                loaded[id(t)] = ckpt.read(key)
        for module, attr, is_param, t, key in slots:
            value = loaded.get(id(t))
            if value is None:
                if t.device.type == "meta":
                    missing.append(key)
                continue
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)}, model "
                                 f"expects {tuple(t.shape)}")
            value = value.to(device=device, dtype=t.dtype)
            if is_param:
                # One Parameter object per meta tensor, so tied weights stay tied.
                if id(t) not in params:
                    params[id(t)] = nn.Parameter(value, requires_grad=t.requires_grad)
                module._parameters[attr] = params[id(t)]
            else:
                module._buffers[attr] = value
        if missing:
            raise KeyError(f"{directory}: the checkpoint lacks {len(missing)} tensor(s) the "
                           f"model needs: {', '.join(missing[:8])}"
                           f"{' ...' if len(missing) > 8 else ''}")
        return LoadReport(
            checkpoint_format="+".join(sorted(formats)) or "none",
            tensors=ckpt.tensors,
            bytes_read=ckpt.bytes_read,
            expert_bytes_read=ckpt.expert_bytes,
            local_expert_bytes=local_expert_bytes,
            files=ckpt.files,
        )


def from_pretrained(
    checkpoint_dir: str | os.PathLike,
    group: GroupCoordinator,
    *,
    manager: All2AllManager | None = None,
    config: str | os.PathLike | Config | None = None,
    torch_dtype: torch.dtype | None = None,
    phase: str | None = None,
    max_tokens_per_rank: int = 4096,
    quant: DispatchQuant | None = None,
    model_class: Any = None,
) -> nn.Module:
    """Load a transformers MoE checkpoint with only this rank's experts (collective).

    Builds the model from the checkpoint's config with parameters on the meta device,
    converts its MoE blocks (:func:`expert_parallel`), then reads the non-expert tensors and
    this rank's experts from the safetensors files (sliced reads; see the module docstring).

    Args:
        checkpoint_dir: a directory written by ``save_pretrained`` (``config.json`` and
            ``model.safetensors`` or ``model-*.safetensors`` + ``model.safetensors.index.json``).
        group, manager, config, phase, max_tokens_per_rank, quant: as for
            :func:`expert_parallel`.
        torch_dtype: parameter dtype; None = the checkpoint config's dtype (float32 if unset).
            Modules transformers keeps in float32 (DeepSeek-V3's router) stay float32.
        model_class: the transformers auto class (default ``AutoModelForCausalLM``).

    Returns:
        the model in eval mode, on ``group.device``; ``model.moe_ep_load_report`` is the
        :class:`LoadReport` of this rank.
    """
    import transformers
    from transformers.initialization import no_init_weights

    directory = Path(checkpoint_dir)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint_dir {directory} has no config.json")
    hf_config = transformers.AutoConfig.from_pretrained(directory)
    dtype = torch_dtype or getattr(hf_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model_class = model_class or transformers.AutoModelForCausalLM
    with _parameters_on_meta(), no_init_weights():
        model = model_class.from_config(hf_config, dtype=dtype)
    # no_init_weights also skips the tying post_init does; tie the meta parameters now, so the
    # loader fills each tied group once (checkpoints store one tensor of it).
    model.tie_weights()
    arch, _ = _find_blocks(model)
    expert_parallel(model, group, manager=manager, config=config, phase=phase,
                    max_tokens_per_rank=max_tokens_per_rank, quant=quant)
    device = torch.device(group.device)
    report = _load_checkpoint(model, directory, arch, device)
    model.to(device)  # the buffers computed at construction
    model.eval()
    model.moe_ep_load_report = report
    logger.info("from_pretrained(%s): %s checkpoint, %d tensors, %.1f MiB read (experts %.1f "
                "MiB, this rank's only)", directory, report.checkpoint_format, report.tensors,
                report.bytes_read / 2**20, report.expert_bytes_read / 2**20)
    return model
