"""DeepEP backends: `deepep_high_throughput` (TOKEN) and `deepep_low_latency` (EXPERT_PADDED).

Written against DeepEP 2.1.0 as PyPI `sgl-deep-ep` 0.1.2.post1 ships it (its legacy
`deep_ep.Buffer`; the C++ of github.com/deepseek-ai/DeepEP at dd758ca). Tested against the
contract model `moe_ep.testing.vendor_models.deepep_model` only: nothing here has run on a GPU.
Errors, live results and CUDA graphs: `moe_ep.managers.vendor`.

**High throughput** (DeepEP's normal kernels). A handle owns one `Buffer(cpu_group,
num_nvl_bytes, num_rdma_bytes, low_latency_mode=False, num_qps_per_rank,
explicitly_destroy=True)`; `num_nvl_bytes` is DeepEP's own size hint (the larger of the
dispatch and combine configs' `get_nvl_buffer_size_hint` for the spec's widest row), or the
option (vLLM uses 1 GiB); across nodes (W > 8, 8 GPUs per node) also `num_rdma_bytes` (the
RDMA hints) and `num_qps_per_rank = Buffer.num_sms // 2`, as vLLM builds it. A dispatch is
`get_dispatch_layout` + `dispatch`; with `fixed_rows` (default, intranode only) DeepEP's
`num_worst_tokens = W * max_tokens_per_rank` form: no CPU wait for the receive count (CUDA-graph
capturable), the result has `W * T` rows of which the padding rows carry ids -1, weights 0
and unspecified `x`. DeepEP returns local ids (-1 elsewhere) and the router weights of the
local slots: exactly the TOKEN layout; its combine is an **unweighted** sum over ranks, which
is what TOKEN expects (the experts step applied the weights). The combine exists for bfloat16
only, so the spec's combine dtype must be bfloat16 (dispatch may be any dtype with 16-byte
rows, or float8 with scales, which pass through: `x_scales [M, S]`).

**Low latency.** A handle owns `Buffer(cpu_group, 0,
Buffer.get_low_latency_rdma_size_hint(T', H, W, E), low_latency_mode=True,
num_qps_per_rank=E // W, allow_nvlink_for_low_latency_mode=True, allow_mnnvl,
explicitly_destroy=True)`; T' is `max_tokens_per_rank` rounded up so that `W * T'` is a
multiple of 4 (a TMA requirement of the kernels). `low_latency_dispatch` returns
`[E_local, W * T', H]` with `tokens_per_expert` rows valid per expert (their order
unspecified); its combine is **weighted** (`sum_k w_k y_k` over the dispatch's ids, -1
skipped), which is what EXPERT_PADDED expects (unweighted expert output). LL takes bfloat16 only
and quantises *inside* the kernel: declare `EPSpec(dtype=torch.bfloat16)` and build with
`use_fp8=True` to receive float8_e4m3fn `x` with float32 `x_scales [E_local, C, H / 128]`
(DeepEP's column-major view; `round_scale` makes them powers of two). A caller's own
`(fp8, scales)` cannot be handed to LL. Limits checked at `get_handle` (instead of a hang or
a device assert): hidden in `LL_HIDDEN_SIZES`, top-k <= 11, `(T' + 1) * 2 <= NVSHMEM_QP_DEPTH`
(1024 unless that variable is raised before the first Buffer: T' <= 511), `E % W == 0`,
`H % 512 == 0` with `use_fp8`; the same T' on every rank (the spec agreement of
`get_handle`). At most two live results per handle (DeepEP's double buffer).

**ElasticBuffer** (DeepEP v2) is not supported: it drives its own NCCL communicator
(`deep_ep.utils.comm.get_nccl_comm_handle` takes the group's NCCL backend), so neither a gloo
group nor the contract model can exercise its real set-up; its non-expanding dispatch has the
legacy Buffer's TOKEN semantics (nothing to add to the contract), and its expanding mode
(`do_expand`, alignment-dependent prefix sums) could not be pinned down without a GPU.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from moe_ep.managers.contract import (
    FLOAT_DTYPES,
    QUANT_DTYPES,
    DispatchResult,
    EPSpec,
    Layout,
)
from moe_ep.managers.inputs import CheckedInputs
from moe_ep.managers.options import DeepEPHighThroughputOptions, DeepEPLowLatencyOptions
from moe_ep.managers.vendor import VendorHandle, VendorManager, VendorState, count_local_ids

__all__ = ["DeepEPHighThroughputManager", "DeepEPLowLatencyManager", "LL_HIDDEN_SIZES"]

#: `get_dispatch_config` / `get_combine_config` rank counts (the normal kernels' table).
HT_WORLD_SIZES = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)
#: hidden sizes the low-latency kernels are compiled for (`SWITCH_HIDDEN`).
LL_HIDDEN_SIZES = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
LL_MAX_TOPK = 11
HT_MAX_TOPK = 32
_NVL_PEERS = 8
_MAX_LOCAL_EXPERTS = 1024
_HINT = ("pip install 'moe-ep[deepep]', which brings sgl-deep-ep 0.1.2.post1, a CUDA 13 wheel "
         "pinning torch==2.14.1, or build DeepEP from source: docs/backends.md")


def _wheel_cuda_major() -> int | None:
    """The CUDA major a prebuilt deep_ep needs (`deep_ep/_build_info.py` of the sgl wheel),
    read without importing deep_ep (its import needs a GPU); None for a source build."""
    spec = importlib.util.find_spec("deep_ep")
    for root in (spec.submodule_search_locations or []) if spec else []:
        info = Path(root) / "_build_info.py"
        if info.is_file():
            for node in ast.parse(info.read_text()).body:
                if isinstance(node, ast.Assign) and any(
                    getattr(t, "id", None) == "EXPECTED_CUDA_MAJOR" for t in node.targets
                ):
                    value = ast.literal_eval(node.value)
                    return value if isinstance(value, int) else None
    return None


@dataclass(eq=False)
class DeepEPState(VendorState):
    """What a DeepEP combine needs.

    Attributes:
        vendor_handle: DeepEP's handle of the dispatch.
        topk_ids / topk_weights: LL only: the dispatch's `[N, K]` int64 ids and float32
            weights (the weighted LL combine takes them again).
    """

    vendor_handle: Any = None
    topk_ids: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None


class DeepEPHandle(VendorHandle):
    """A layer's DeepEP `Buffer` (`buffer`), built with `explicitly_destroy=True`."""

    def __init__(self, manager: _DeepEPManager, spec: EPSpec, index: int, buffer: Any) -> None:
        super().__init__(manager, spec, index)
        self.buffer = buffer

    def _release(self) -> None:
        self.buffer.destroy()


class _DeepEPManager(VendorManager):
    vendor_module: ClassVar[str] = "deep_ep"
    install_hint: ClassVar[str] = _HINT

    @classmethod
    def _requirements(cls, device: str, world_size: int) -> list[str]:
        reasons = super()._requirements(device, world_size)
        wanted = _wheel_cuda_major() if device == "cuda" else None
        have = torch.version.cuda
        if wanted is not None and (have is None or int(have.split(".")[0]) != wanted):
            reasons.append(f"this deep_ep build needs a CUDA {wanted} torch; this torch has "
                           f"CUDA {have}")
        if world_size >= 2:
            reasons += cls._world_reasons(world_size)
        return reasons

    @classmethod
    def _world_reasons(cls, world_size: int) -> list[str]:
        if world_size > _NVL_PEERS and world_size % _NVL_PEERS:
            return [f"DeepEP needs fewer than 8 ranks or a multiple of 8, got {world_size}"]
        return []

    def _check_spec(self, spec: EPSpec) -> None:
        super()._check_spec(spec)
        if spec.combine_dtype != torch.bfloat16:
            raise TypeError(
                f"manager {self.name!r}: DeepEP combines bfloat16 only, but the spec's "
                f"combine dtype is {spec.combine_dtype} (set EPSpec.out_dtype=torch.bfloat16)")
        local = spec.num_experts // self.world_size
        if local > _MAX_LOCAL_EXPERTS:
            raise ValueError(f"manager {self.name!r}: at most {_MAX_LOCAL_EXPERTS} experts per "
                             f"rank, got {local}")


# ------------------------------------------------------------------------- high throughput
class DeepEPHighThroughputManager(_DeepEPManager):
    """`deepep_high_throughput`: DeepEP's normal kernels, TOKEN layout (module docstring)."""

    name: ClassVar[str] = "deepep_high_throughput"
    layout: ClassVar[Layout] = Layout.TOKEN
    options_cls: ClassVar[type] = DeepEPHighThroughputOptions
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES + QUANT_DTYPES

    @classmethod
    def _world_reasons(cls, world_size: int) -> list[str]:
        if world_size not in HT_WORLD_SIZES:
            return [f"DeepEP's normal kernels run on {HT_WORLD_SIZES} ranks, got {world_size}"]
        return []

    @classmethod
    def _topology_reasons(cls, topology: Any) -> list[str]:
        if topology.world_size <= _NVL_PEERS:
            if topology.internode:
                return [f"DeepEP's intranode kernels ({topology.world_size} <= 8 ranks) need "
                        "every rank on one node"]
            if topology.nvlink is False:
                return ["DeepEP's intranode kernels need every GPU pair connected by NVLink "
                        "(peer access fails on this node)"]
            return []
        if topology.local_world_size != _NVL_PEERS:
            return ["DeepEP's internode kernels need 8 GPUs per node (NVLink rank = rank % 8), "
                    f"got {topology.local_world_size} ranks on this node"]
        return []

    @classmethod
    def _ok_reason(cls, topology: Any) -> str:
        if topology.world_size <= _NVL_PEERS:
            return f"DeepEP normal kernels over NVLink ({topology.world_size} ranks, one node)"
        return (f"DeepEP normal kernels over NVLink and RDMA ({topology.world_size} ranks; "
                "needs NICs NVSHMEM can drive, not checked here)")

    @property
    def internode(self) -> bool:
        """DeepEP's rule: more than 8 ranks means 8 per node and RDMA between nodes."""
        return self.world_size > _NVL_PEERS

    def _check_spec(self, spec: EPSpec) -> None:
        super()._check_spec(spec)
        elem = spec.dtype.itemsize
        if spec.hidden * elem % 16:
            raise ValueError(f"manager {self.name!r}: a row of EPSpec.hidden={spec.hidden} "
                             f"{spec.dtype} elements is not a multiple of 16 bytes")
        if spec.scale_cols and elem != 1:
            raise TypeError(f"manager {self.name!r}: DeepEP sends scales only beside 1-byte "
                            f"(float8) x, got EPSpec.dtype={spec.dtype}")
        if spec.topk > HT_MAX_TOPK:
            raise ValueError(f"manager {self.name!r}: EPSpec.topk={spec.topk} > {HT_MAX_TOPK} "
                             "(a device assert of the normal kernels)")

    def _make_handle(self, spec: EPSpec, index: int) -> DeepEPHandle:
        buffer_cls = self.vendor.Buffer
        w = self.world_size
        # The widest row either way: the dispatched x, or the bf16 combine rows.
        elem = spec.dtype.itemsize
        row_bytes = spec.hidden * max(elem, 2)
        configs = (buffer_cls.get_dispatch_config(w), buffer_cls.get_combine_config(w))
        nvl = self.options.num_nvl_bytes or max(
            c.get_nvl_buffer_size_hint(row_bytes, w) for c in configs)
        rdma, qps = 0, 1
        if self.internode:
            rdma = max(c.get_rdma_buffer_size_hint(row_bytes, w) for c in configs)
            qps = buffer_cls.num_sms // 2
        buffer = buffer_cls(self.group.cpu_group, num_nvl_bytes=nvl, num_rdma_bytes=rdma,
                            low_latency_mode=False, num_qps_per_rank=qps,
                            explicitly_destroy=True)
        return DeepEPHandle(self, spec, index, buffer)

    def _vendor_dispatch(self, call: int, seq: int, handle: DeepEPHandle,
                         checked: CheckedInputs, rows: list[list[int]] | None
                         ) -> DispatchResult:
        """TOKEN: `x [M, H]`, `topk_ids [M, K] int64` local (-1 elsewhere), `topk_weights
        [M, K] float32` (0 where -1), `x_scales [M, S]` when quantised; M = W * T with
        `fixed_rows` (padding rows: ids -1), else the rows that arrived."""
        spec, buf = handle.spec, handle.buffer
        ids = checked.topk_ids
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(
            ids, spec.num_experts)
        x = checked.x if checked.x_scales is None else (checked.x, checked.x_scales)
        worst = (self.world_size * spec.max_tokens_per_rank
                 if self.options.fixed_rows and not self.internode else 0)
        recv_x, recv_ids, recv_w, _, vendor_handle, _ = buf.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=ids,
            topk_weights=checked.topk_weights, num_worst_tokens=worst)
        recv_x, recv_scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
        # Padding rows' weights are uninitialised memory (NaN at worst): zero them by a select,
        # not a product.
        weights = torch.where(recv_ids >= 0, recv_w, torch.zeros_like(recv_w))
        local = spec.num_experts // self.world_size
        state = DeepEPState(self, handle, call, seq, checked.num_tokens,
                            (int(recv_x.shape[0]),), vendor_handle=vendor_handle)
        return DispatchResult(Layout.TOKEN, recv_x, recv_scales, recv_ids, weights,
                              count_local_ids(recv_ids, local), state)

    def _vendor_combine(self, state: DeepEPState, expert_out: torch.Tensor) -> torch.Tensor:
        y, _, _ = state.handle.buffer.combine(expert_out, state.vendor_handle)
        return y


# ------------------------------------------------------------------------------ low latency
class DeepEPLowLatencyManager(_DeepEPManager):
    """`deepep_low_latency`: DeepEP's low-latency kernels, EXPERT_PADDED (module docstring)."""

    name: ClassVar[str] = "deepep_low_latency"
    layout: ClassVar[Layout] = Layout.EXPERT_PADDED
    options_cls: ClassVar[type] = DeepEPLowLatencyOptions
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16,)
    max_live_results: ClassVar[int] = 2

    @classmethod
    def _ok_reason(cls, topology: Any) -> str:
        how = "NVLink" if not topology.internode else "NVLink and RDMA (IBGDA, not checked here)"
        return f"DeepEP low-latency kernels over NVSHMEM ({topology.world_size} ranks, {how})"

    def capacity(self, spec: EPSpec) -> int:
        """T': `spec.max_tokens_per_rank` rounded up so that `W * T'` is a multiple of 4."""
        t = spec.max_tokens_per_rank
        while self.world_size * t % 4:
            t += 1
        return t

    def _check_spec(self, spec: EPSpec) -> None:
        if spec.dtype != torch.bfloat16 or spec.scale_cols:
            raise TypeError(
                f"manager {self.name!r} takes bfloat16 x and quantises inside its kernel: "
                "declare EPSpec(dtype=torch.bfloat16) (no scales) and build the manager with "
                f"use_fp8=True for a float8 dispatch; got dtype={spec.dtype}, "
                f"scale_cols={spec.scale_cols}")
        super()._check_spec(spec)
        problems = []
        if spec.hidden not in LL_HIDDEN_SIZES:
            problems.append(f"EPSpec.hidden={spec.hidden} is not one of the sizes the kernels "
                            f"are compiled for {LL_HIDDEN_SIZES}")
        if spec.topk > LL_MAX_TOPK:
            problems.append(f"EPSpec.topk={spec.topk} > {LL_MAX_TOPK}")
        t = self.capacity(spec)
        depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))
        if (t + 1) * 2 > depth:
            problems.append(
                f"EPSpec.max_tokens_per_rank={spec.max_tokens_per_rank} (capacity {t}) needs "
                f"(capacity + 1) * 2 <= NVSHMEM_QP_DEPTH={depth}: at most {depth // 2 - 1} "
                "tokens unless NVSHMEM_QP_DEPTH is raised before the first Buffer is built")
        if self.options.use_fp8 and spec.hidden % 512:
            problems.append(f"use_fp8 needs EPSpec.hidden % 512 == 0, got {spec.hidden}")
        if problems:
            raise ValueError(f"manager {self.name!r}: " + "; ".join(problems))

    def _make_handle(self, spec: EPSpec, index: int) -> DeepEPHandle:
        buffer_cls = self.vendor.Buffer
        w, e = self.world_size, spec.num_experts
        rdma = buffer_cls.get_low_latency_rdma_size_hint(self.capacity(spec), spec.hidden, w, e)
        buffer = buffer_cls(self.group.cpu_group, num_nvl_bytes=0, num_rdma_bytes=rdma,
                            low_latency_mode=True, num_qps_per_rank=e // w,
                            allow_nvlink_for_low_latency_mode=True,
                            allow_mnnvl=self.options.allow_mnnvl, explicitly_destroy=True)
        return DeepEPHandle(self, spec, index, buffer)

    def _vendor_dispatch(self, call: int, seq: int, handle: DeepEPHandle,
                         checked: CheckedInputs, rows: list[list[int]] | None
                         ) -> DispatchResult:
        """EXPERT_PADDED: `x [E_local, W * T', H]` bf16 (or float8_e4m3fn with `x_scales
        [E_local, W * T', H / 128]` float32, column-major in the last two dims),
        `tokens_per_expert [E_local] int64` valid rows per expert."""
        spec, opts = handle.spec, self.options
        t = self.capacity(spec)
        recv, count, vendor_handle, _, _ = handle.buffer.low_latency_dispatch(
            checked.x, checked.topk_ids, t, spec.num_experts, use_fp8=opts.use_fp8,
            round_scale=opts.round_scale, use_ue8m0=False, async_finish=False,
            return_recv_hook=False)
        x, scales = recv if opts.use_fp8 else (recv, None)
        state = DeepEPState(self, handle, call, seq, checked.num_tokens,
                            (int(x.shape[0]), int(x.shape[1])), vendor_handle=vendor_handle,
                            topk_ids=checked.topk_ids, topk_weights=checked.topk_weights)
        return DispatchResult(Layout.EXPERT_PADDED, x, scales, None, None,
                              count.to(torch.int64), state)

    def _vendor_combine(self, state: DeepEPState, expert_out: torch.Tensor) -> torch.Tensor:
        y, _, _ = state.handle.buffer.low_latency_combine(
            expert_out, state.topk_ids, state.topk_weights, state.vendor_handle)
        return y
