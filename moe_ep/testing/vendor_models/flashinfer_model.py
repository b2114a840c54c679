"""Contract model of FlashInfer's MNNVL one-sided MoE all-to-all (``flashinfer-python`` 0.7.4).

**A contract model, not FlashInfer.** In 0.7.4 the MNNVL all-to-all is reached through the new
``flashinfer.moe_ep`` package: ``create_communication(BootstrapConfig, MoEEpCommParams,
NVLinkOneSidedConfig())`` returns an ``NVLinkOneSidedAlltoAll`` (the TensorRT-LLM
``moe_a2a_dispatch`` / ``moe_a2a_combine`` kernels over MNNVL fabric memory). The older
``flashinfer.comm`` names (``MoeAlltoAll``, ``MnnvlMoe``, ``moe_a2a_dispatch``) are **not** in
0.7.4; ``flashinfer.comm.Mapping`` and ``flashinfer.comm.mnnvl.MnnvlConfig`` still are, and the
backend builds them internally. Sources read: ``flashinfer/moe_ep/core/comm/communication.py``,
``flashinfer/moe_ep/backends/split/comm/nvlink_one_sided/{communication,config}.py``,
``flashinfer/moe_ep/config.py``, ``data/csrc/nvlink_one_sided_alltoall.cu`` and
``nv_internal/.../moeAlltoAllKernels.cu``.

The contract ("rank-major", communication.py): ``dispatch`` returns ``ep_size *
tokens_per_rank`` rows; each token arrives **at most once per rank**, with its full top-k
routing as **global** ids (picks owned by other ranks kept as they were, ``-1`` kept); rows
that carry no token have every id set to ``invalid_expert_id``; the expert step applies the
weights and sums over this rank's local experts, one output row per received row; ``combine``
sums each token's per-rank rows (**unweighted**) into ``[local_num_tokens, hidden]``. So this
is a TOKEN layout with padding rows, not an expert-major one.

Modelled: ``MoEEpCommParams`` (its validation), ``BootstrapConfig``, ``NVLinkOneSidedConfig``,
``QuantFormat``, ``create_communication`` / ``available_communication_backends``, and
``NVLinkOneSidedAlltoAll``: the constructor checks (top-k in the kernels' set, E % W, at most
256 ranks), ``dispatch`` (fence-path placement: source rank ``s``'s tokens fill rows ``[s * T,
s * T + count)`` in an unspecified order, the model shuffles; padding rows poisoned, their ids
``invalid_expert_id``; ``local_num_tokens <= T``; every rank must pass the same
``runtime_max_tokens_per_rank`` and pass ``topk_weights`` or not alike), ``combine`` (fp32 sum,
output dtype = payload dtype), ``get_combine_input_buffer``, the dispatch-then-combine rhythm
with the real error messages, ``destroy``.

Not modelled (:class:`ModelNotImplementedError`): the CFT and Lamport transports (the model
always behaves as the fence path, whose row placement the contract leaves backend-defined),
low-precision combine, rank masks, EPLB statistics, the other ``flashinfer.moe_ep`` backends
(nvlink_two_sided, cake, nccl_ep, nixl_ep), checkpointing, the mega / split layers.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.distributed as dist

from moe_ep.testing.vendor_models._common import (
    ModelNotImplementedError,
    agree,
    alltoallv,
    order_generator,
    poison_,
)

VERSION = "0.7.4"
DISTRIBUTION = ("flashinfer-python", "0.7.4")

# moeAlltoAllKernels.h kMaxRanks; nvlink_one_sided/communication.py _SUPPORTED_TOP_K
MAX_RANKS = 256
SUPPORTED_TOP_K = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18, 22)


class QuantFormat(enum.Enum):
    """``flashinfer.fused_moe.api.QuantFormat`` (same members and values)."""

    BF16 = 0
    FP16 = 1
    FP8PerTensor = 2
    DeepSeekFp8 = 3  # e4m3 + one fp32 scale per 128 channels of a token
    MXFP8 = 4
    NVFP4 = 5
    MXFP4 = 6
    MXINT4 = 7
    INT4 = 8


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


_DISPATCH_BYTES_PER_TOKEN: dict[str, Callable[[int], int]] = {
    "BF16": lambda hidden: 2 * hidden,
    "FP16": lambda hidden: 2 * hidden,
    "FP8PerTensor": lambda hidden: hidden,
    "DeepSeekFp8": lambda hidden: hidden + 4 * _ceil_div(hidden, 128),
    "MXFP8": lambda hidden: hidden + _ceil_div(hidden, 32),
    "NVFP4": lambda hidden: _ceil_div(hidden, 2) + _ceil_div(hidden, 16),
    "MXFP4": lambda hidden: _ceil_div(hidden, 2) + _ceil_div(hidden, 32),
}


@dataclass(frozen=True)
class MoEEpCommParams:
    """EP sizing shared by the communication backends (validation as the real dataclass)."""

    num_experts: int
    top_k: int
    max_tokens_per_rank: int
    hidden_size: int
    dtype: Optional[torch.dtype] = None
    dispatch_format: Optional[QuantFormat] = None
    invalid_expert_id: int = -1

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "max_tokens_per_rank", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MoEEpCommParams.{name} must be a positive int")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEEpCommParams.top_k ({self.top_k}) exceeds num_experts "
                             f"({self.num_experts})")
        if 0 <= self.invalid_expert_id < self.num_experts:
            raise ValueError("MoEEpCommParams.invalid_expert_id must lie outside "
                             f"[0, num_experts={self.num_experts}), got {self.invalid_expert_id}")
        if self.dispatch_format is not None and (
                not isinstance(self.dispatch_format, QuantFormat)
                or self.dispatch_format.name not in _DISPATCH_BYTES_PER_TOKEN):
            raise ValueError("MoEEpCommParams.dispatch_format must be one of QuantFormat."
                             f"{{{', '.join(_DISPATCH_BYTES_PER_TOKEN)}}} or None, got "
                             f"{self.dispatch_format!r}")

    @property
    def token_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype is None else self.dtype

    @property
    def dispatch_bytes_per_token(self) -> int:
        if self.dispatch_format is None:
            return self.hidden_size * self.token_dtype.itemsize
        return _DISPATCH_BYTES_PER_TOKEN[self.dispatch_format.name](self.hidden_size)


@dataclass(frozen=True)
class BootstrapConfig:
    """``flashinfer.moe_ep.BootstrapConfig``: the EP domain (``process_group`` used here)."""

    world_size: int
    rank: int
    stream: int = 0
    auto_bootstrap: bool = True
    device: Optional[int] = field(default=None, kw_only=True)
    nccl_comm: Optional[int] = None
    process_group: Optional[dist.ProcessGroup] = field(default=None, compare=False, hash=False)
    tcp_store: Optional[Any] = None

    def __post_init__(self) -> None:
        if self.world_size <= 0:
            raise ValueError(f"world_size must be positive, got {self.world_size}")
        if not (0 <= self.rank < self.world_size):
            raise ValueError(f"rank {self.rank} not in [0, {self.world_size})")
        if self.device is not None and self.device < 0:
            raise ValueError(f"device must be non-negative, got {self.device}")


@dataclass
class NVLinkOneSidedConfig:
    """Options of the NVLink one-sided backend (same fields and defaults as the real one)."""

    backend_name: str = "nvlink_one_sided"
    extra_payload_bytes_per_token: int = 0
    eplb_stats_num_experts: int = 0
    enable_rank_mask: bool = False
    use_low_precision_combine: bool = False
    comm_backend: Optional[Any] = None
    cft: Optional[bool] = None
    cft_max_tokens_for_dispatch: int = 128
    cft_max_tokens_for_combine: int = 128
    lamport: Optional[bool] = None
    lamport_max_tokens: Optional[int] = None
    timeout_sec: int = 300
    enable_pdl: Optional[bool] = None


@dataclass(frozen=True)
class MoEEpDispatchResult:
    """Rank-major receive buffers: every tensor has ``ep_size * tokens_per_rank`` rows."""

    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: Optional[torch.Tensor]
    tokens_per_rank: int
    hidden_states_scale: Optional[torch.Tensor] = None
    eplb_gathered_stats: Optional[torch.Tensor] = None


_REGISTRY: dict[str, type] = {}
_NOT_MODELLED = ("nvlink_two_sided", "cake", "nccl_ep", "nixl_ep")


def register_communication(name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        cls.backend_name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_communication_backends() -> list[str]:
    """Registered backends usable here (the model claims a supporting platform)."""
    return sorted(name for name, cls in _REGISTRY.items() if cls.is_platform_supported())


def create_communication(bootstrap: BootstrapConfig, params: MoEEpCommParams, backend: Any,
                         **options: Any) -> Any:
    """Instantiate the backend named by ``backend`` (a name, or a config with ``backend_name``)."""
    name = getattr(backend, "backend_name", backend)
    if not isinstance(name, str):
        raise TypeError("backend must be a string or have a .backend_name str attr; "
                        f"got {backend!r}")
    if name in _NOT_MODELLED:
        raise ModelNotImplementedError(f"flashinfer.moe_ep backend {name!r} is not modelled")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise KeyError(f"unknown communication backend {name!r}; available: "
                       f"{sorted(_REGISTRY)}")
    if not isinstance(backend, str):
        options["config"] = backend
    return cls(bootstrap, params, **options)


class MoEEpCommunication:
    """Base of the self-contained backends (``flashinfer.moe_ep.MoEEpCommunication``)."""

    backend_name: ClassVar[str]
    supports_cuda_graph: ClassVar[bool] = True

    def __init__(self, bootstrap: BootstrapConfig, params: MoEEpCommParams) -> None:
        if not self.is_platform_supported():
            raise RuntimeError(f"{type(self).__name__} is not supported on this platform.")
        self.bootstrap = bootstrap
        self.params = params
        self.ep_rank = bootstrap.rank
        self.ep_size = bootstrap.world_size
        if params.num_experts % self.ep_size != 0:
            raise ValueError(f"{type(self).__name__} requires num_experts "
                             f"({params.num_experts}) divisible by the EP size ({self.ep_size})")
        self.num_local_experts = params.num_experts // self.ep_size

    @classmethod
    def is_platform_supported(cls) -> bool:
        return True

    def _resolve_runtime_max_tokens_per_rank(self, runtime: Optional[int]) -> int:
        capacity = self.params.max_tokens_per_rank
        if runtime is None:
            return capacity
        if not 0 < runtime <= capacity:
            raise ValueError(f"runtime_max_tokens_per_rank={runtime} must be in (0, {capacity}]")
        return runtime

    def get_combine_input_buffer(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        return None

    def destroy(self) -> None:
        pass


@register_communication("nvlink_one_sided")
class NVLinkOneSidedAlltoAll(MoEEpCommunication):
    """Contract model of the NVLink one-sided (MNNVL) dispatch/combine (fence path)."""

    def __init__(self, bootstrap: BootstrapConfig, params: MoEEpCommParams,
                 config: Optional[NVLinkOneSidedConfig] = None) -> None:
        self.config = config = NVLinkOneSidedConfig() if config is None else config
        if config.lamport is True and config.cft is True:
            raise ValueError("lamport=True and cft=True both ask for every eligible step; "
                             "set one of them to None or False")
        group = bootstrap.process_group
        size = dist.get_world_size(group)
        if size != bootstrap.world_size:
            raise ValueError(f"MNNVL communicator has {size} ranks but the EP group has "
                             f"world_size={bootstrap.world_size}")
        if dist.get_rank(group) != bootstrap.rank:
            raise ValueError(f"MNNVL communicator rank {dist.get_rank(group)} does not match the "
                             f"EP rank {bootstrap.rank}")
        super().__init__(bootstrap, params)
        if config.extra_payload_bytes_per_token < 0:
            raise ValueError("extra_payload_bytes_per_token must be non-negative")
        if not 0 <= config.eplb_stats_num_experts <= params.num_experts:
            raise ValueError("eplb_stats_num_experts must be in [0, num_experts]")
        if params.top_k not in SUPPORTED_TOP_K:
            raise ValueError(f"NVLinkOneSidedAlltoAll supports top_k in {SUPPORTED_TOP_K}, "
                             f"got {params.top_k}")
        if self.ep_size > MAX_RANKS:
            raise ValueError(f"NVLinkOneSidedAlltoAll supports at most {MAX_RANKS} EP ranks, "
                             f"got {self.ep_size}")
        if config.use_low_precision_combine or config.enable_rank_mask \
                or config.eplb_stats_num_experts:
            raise ModelNotImplementedError("low-precision combine, rank masks and EPLB "
                                           "statistics are not modelled")
        self._group = group
        self._calls = itertools.count()
        agree(group, "NVLinkOneSidedAlltoAll()",
              (params.num_experts, params.top_k, params.max_tokens_per_rank, params.hidden_size))
        self._state: Optional[dict[str, Any]] = {"round_owner": None}
        self._round: Optional[dict[str, Any]] = None
        self.lamport_max_tokens = 0

    @property
    def lamport_enabled(self) -> bool:
        return False

    def dispatch(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: Optional[torch.Tensor] = None, *,
                 hidden_states_scale: Optional[torch.Tensor] = None,
                 runtime_max_tokens_per_rank: Optional[int] = None,
                 eplb_local_stats: Optional[torch.Tensor] = None,
                 active_rank_mask: Optional[torch.Tensor] = None) -> MoEEpDispatchResult:
        """Send each token once to every rank owning one of its experts.

        Args:
            hidden_states: ``[N, *]`` token rows (any dtype; opaque payload).
            topk_ids: ``[N, K]`` global expert ids (int32 after a cast), ``-1`` = none.
            topk_weights: ``[N, K]`` float32 or None (every rank alike).
            hidden_states_scale: ``[N, *]`` scale rows or None.
            runtime_max_tokens_per_rank: T, at most the capacity, the same on every rank.

        Returns:
            :class:`MoEEpDispatchResult` with ``[W * T, ...]`` views (see the module docstring).
        """
        if self._state is None:
            raise RuntimeError("NVLinkOneSidedAlltoAll has been destroyed")
        if self._state["round_owner"] is self:
            raise RuntimeError("dispatch called twice without an intervening combine")
        if active_rank_mask is not None or eplb_local_stats is not None:
            raise ModelNotImplementedError("rank masks and EPLB statistics are not modelled")
        params = self.params
        tokens_per_rank = self._resolve_runtime_max_tokens_per_rank(runtime_max_tokens_per_rank)
        if topk_ids.dtype != torch.int32:
            topk_ids = topk_ids.to(torch.int32)
        n = topk_ids.shape[0]
        if topk_ids.dim() != 2 or topk_ids.shape[1] != params.top_k:
            raise RuntimeError("tokenSelectedExperts must be a 2D tensor with top_k columns")
        if n > tokens_per_rank:
            raise RuntimeError(f"localNumTokens ({n}) <= runtimeMaxTokensPerRank "
                               f"({tokens_per_rank}) failed (flashinfer contract model)")
        payloads = [hidden_states]
        if hidden_states_scale is not None:
            payloads.append(hidden_states_scale)
        if topk_weights is not None:
            payloads.append(topk_weights)
        for p in payloads:
            if p.dim() != 2 or p.shape[0] != n:
                raise RuntimeError("payload must be a 2D tensor with localNumTokens rows")
        agree(self._group, "NVLinkOneSidedAlltoAll.dispatch",
              ("dispatch", tokens_per_rank, topk_weights is not None,
               hidden_states_scale is not None, tuple(hidden_states.shape[1:]),
               hidden_states.dtype, next(self._calls)))
        w, local = self.ep_size, self.num_local_experts
        ids = topk_ids.long()
        valid = (ids >= 0) & (ids < params.num_experts)
        owner = torch.where(valid, ids // local, torch.full_like(ids, -1))
        send_rows = [torch.nonzero((owner == j).any(dim=1)).flatten() for j in range(w)]

        def exchange(t: torch.Tensor) -> list[torch.Tensor]:
            return alltoallv([t[rows].contiguous() for rows in send_rows], self._group)

        got_tok = alltoallv([rows.to(torch.int64) for rows in send_rows], self._group)
        parts = [exchange(p) for p in payloads] + [exchange(topk_ids)]
        gen = order_generator(self.ep_rank)
        outs = [poison_(torch.empty((w, tokens_per_rank, *p.shape[1:]), dtype=p.dtype))
                for p in payloads + [topk_ids]]
        placement: list[torch.Tensor] = []
        for src in range(w):
            count = got_tok[src].shape[0]
            # Slots come from an atomic counter on the sender: any order.
            perm = torch.randperm(count, generator=gen)
            placement.append(perm)
            for buf, got in zip(outs, parts):
                buf[src, :count] = got[src][perm]
            outs[-1][src, count:] = params.invalid_expert_id
        recv_ids = outs[-1].flatten(0, 1)
        recv_tok = [got_tok[s][placement[s]] for s in range(w)]
        self._round = {"tokens_per_rank": tokens_per_rank, "local_num_tokens": n,
                       "send_rows": send_rows, "recv_tok": recv_tok,
                       "combine_buffer": None}
        self._state["round_owner"] = self
        flat = [t.flatten(0, 1) for t in outs[:-1]]
        idx = 1
        scale = None
        if hidden_states_scale is not None:
            scale, idx = flat[1], 2
        weights = flat[idx] if topk_weights is not None else None
        return MoEEpDispatchResult(hidden_states=flat[0], hidden_states_scale=scale,
                                   topk_ids=recv_ids, topk_weights=weights,
                                   tokens_per_rank=tokens_per_rank)

    def get_combine_input_buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """``[W * T, hidden]`` buffer the expert step may write into (saves a copy)."""
        if self._round is None:
            raise RuntimeError("get_combine_input_buffer called before dispatch")
        rows = self.ep_size * self._round["tokens_per_rank"]
        buf = poison_(torch.empty((rows, self.params.hidden_size), dtype=dtype))
        self._round["combine_buffer"] = buf
        return buf

    def combine(self, expert_output: torch.Tensor, *, output: Optional[torch.Tensor] = None,
                active_rank_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sum each token's rows from the ranks it went to (unweighted).

        Args:
            expert_output: ``[W * T, H]`` or ``[W, T, H]``, already weighted and reduced over
                this rank's local experts, one row per received row.
            output: optional ``[local_num_tokens, H]`` result buffer of the payload dtype.

        Returns:
            ``[local_num_tokens, H]`` in ``expert_output``'s dtype (fp32 accumulation).
        """
        state = self._round
        if state is None:
            raise RuntimeError("combine called before dispatch")
        if active_rank_mask is not None:
            raise ModelNotImplementedError("rank masks are not modelled")
        t = state["tokens_per_rank"]
        if expert_output.dim() == 2:
            payload = expert_output.view(self.ep_size, t, -1)
        elif expert_output.dim() == 3:
            payload = expert_output
        else:
            raise ValueError(f"expert_output must be 2D or 3D, got shape "
                             f"{tuple(expert_output.shape)}")
        if payload.shape[0] != self.ep_size or payload.shape[1] != t:
            raise RuntimeError("payload must be [ep_size, runtime_max_tokens_per_rank, hidden]")
        hidden = payload.shape[-1]
        n = state["local_num_tokens"]
        if output is None:
            output = torch.empty((n, hidden), dtype=payload.dtype)
        if output.dtype != payload.dtype:
            raise RuntimeError("output dtype must match the payload dtype")
        if tuple(output.shape) != (n, hidden):
            raise RuntimeError("output must be [localNumTokens, hidden]")
        agree(self._group, "NVLinkOneSidedAlltoAll.combine",
              ("combine", hidden, next(self._calls)))
        back = alltoallv([payload[s, :state["recv_tok"][s].shape[0]].contiguous()
                          for s in range(self.ep_size)], self._group)
        tok_back = alltoallv(state["recv_tok"], self._group)
        acc = torch.zeros((n, hidden), dtype=torch.float32)
        for j in range(self.ep_size):
            acc.index_add_(0, tok_back[j], back[j].float())
        output.copy_(acc)
        self._round = None
        self._state["round_owner"] = None
        return output

    def destroy(self) -> None:
        """Release the workspace (idempotent)."""
        self._state = None
        self._round = None
