"""FlashInfer MNNVL backend (`flashinfer_mnnvl`, alias `flashinfer_all2allv`): TOKEN layout.

Written against flashinfer-python 0.7.4 (`pip install 'moe-ep[flashinfer]'`). In 0.7.x the
MNNVL all-to-all is no longer `flashinfer.comm.MoeAlltoAll` / `MnnvlMoe` (both gone) but the
`flashinfer.moe_ep` package: `create_communication(BootstrapConfig, MoEEpCommParams,
NVLinkOneSidedConfig())` returns the one-sided (TensorRT-LLM `moe_a2a_*`) dispatch / combine
over MNNVL fabric memory. Tested against the contract model
`moe_ep.testing.vendor_models.flashinfer_model` only (and the installed package's signatures):
nothing here has run on a GPU. Errors and CUDA graphs: `moe_ep.managers.vendor`.

FlashInfer's contract is rank-major: `dispatch` returns `W * T'` rows (T' = the
`runtime_max_tokens_per_rank` of the call, the same on every rank), each token once per rank
owning one of its experts, with its whole top-k as *global* ids; rows that carry no token have
every id `invalid_expert_id` (-1); `combine` sums each token's rows over the ranks,
**unweighted**. That is the TOKEN layout once the ids are made local (-1 for other ranks'
experts) and their weights zeroed: padding rows have ids -1, weights 0 and unspecified `x`.
With the header exchange, T' is the largest token count of the call over the ranks (fewer rows
to compute); without it (CUDA graphs), T' = `max_tokens_per_rank`.

A handle owns one communicator: `MoEEpCommParams(num_experts=E, top_k=K,
max_tokens_per_rank=T, hidden_size=H, dtype=<combine dtype>, dispatch_format=None |
QuantFormat.DeepSeekFp8)`, bootstrapped over the group's gloo CPU group (FlashInfer only
all-gathers Python objects over it). A float8_e4m3fn spec with `ceil(H / 128)` scale columns
dispatches as DeepSeekFp8 (`x_scales [M, S]` pass through); an unquantised spec must combine in
its own dtype (FlashInfer sizes both directions from one token dtype). Limits checked at
`get_handle`: top-k in `SUPPORTED_TOP_K`, `E % W == 0`, `topk <= E`, at most 256 ranks.
Communicators of one geometry share one workspace, and a workspace runs one round at a time:
while a result of this manager is not combined, its next dispatch is refused (for every
handle).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, ClassVar

import torch

from moe_ep.managers import protocol
from moe_ep.managers.contract import DispatchResult, EPSpec, Layout
from moe_ep.managers.inputs import CheckedInputs
from moe_ep.managers.options import VendorOptions
from moe_ep.managers.vendor import VendorHandle, VendorManager, VendorState, count_local_ids

__all__ = ["FlashInferMnnvlManager", "SUPPORTED_TOP_K"]

#: top-k values the one-sided kernels are specialised for (`_SUPPORTED_TOP_K`).
SUPPORTED_TOP_K = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18, 22)
MAX_RANKS = 256
_VERSIONS = ("0.7.4", "0.8")  # the flashinfer.moe_ep API the adapter was written against
_HINT = "pip install 'moe-ep[flashinfer]', which brings flashinfer-python>=0.7.4,<0.8"


def _version_reason() -> str | None:
    """Why the installed flashinfer-python lacks `flashinfer.moe_ep` (None if it has it or its
    version cannot be read), from the distribution metadata: importing flashinfer takes
    seconds."""
    try:
        version = importlib.metadata.version("flashinfer-python")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if not (0, 7, 4) <= parts < (0, 8):
        return (f"flashinfer-python {version} is installed; the adapter needs the "
                f"flashinfer.moe_ep API of >={_VERSIONS[0]},<{_VERSIONS[1]}")
    return None


class FlashInferHandle(VendorHandle):
    """A layer's FlashInfer communicator (`comm`)."""

    def __init__(self, manager: FlashInferMnnvlManager, spec: EPSpec, index: int,
                 comm: Any) -> None:
        super().__init__(manager, spec, index)
        self.comm = comm

    def _release(self) -> None:
        self.comm.destroy()


class FlashInferMnnvlManager(VendorManager):
    """`flashinfer_mnnvl`: FlashInfer's one-sided MNNVL all-to-all, TOKEN (module docstring)."""

    name: ClassVar[str] = "flashinfer_mnnvl"
    layout: ClassVar[Layout] = Layout.TOKEN
    options_cls: ClassVar[type] = VendorOptions
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)
    max_live_results: ClassVar[int] = 1
    one_round: ClassVar[bool] = True
    _round_owner: ClassVar[str] = "per workspace (all handles of a geometry)"
    vendor_module: ClassVar[str] = "flashinfer"
    install_hint: ClassVar[str] = _HINT

    @classmethod
    def _requirements(cls, device: str, world_size: int) -> list[str]:
        reasons = super()._requirements(device, world_size)
        if not reasons:
            why = _version_reason()
            reasons += [why] if why else []
        if world_size > MAX_RANKS:
            reasons.append(f"FlashInfer's one-sided all-to-all takes at most {MAX_RANKS} ranks, "
                           f"got {world_size}")
        return reasons

    @classmethod
    def _topology_reasons(cls, topology: Any) -> list[str]:
        if topology.nvlink is False:
            return ["MNNVL needs NVLink between the GPUs (peer access fails on this node)"]
        return []

    @classmethod
    def _ok_reason(cls, topology: Any) -> str:
        return (f"FlashInfer one-sided all-to-all over MNNVL ({topology.world_size} ranks; "
                "fabric memory support is confirmed collectively when the manager is built)")

    def _setup(self) -> None:
        self._moe_ep = importlib.import_module("flashinfer.moe_ep")
        self._quant_format = importlib.import_module("flashinfer.fused_moe").QuantFormat

    def _round_scope(self, handle: VendorHandle) -> list[VendorHandle]:
        return self._handles

    def _check_spec(self, spec: EPSpec) -> None:
        super()._check_spec(spec)
        if spec.topk not in SUPPORTED_TOP_K:
            raise ValueError(f"manager {self.name!r}: FlashInfer's kernels take top-k in "
                             f"{SUPPORTED_TOP_K}, got EPSpec.topk={spec.topk}")
        if spec.topk > spec.num_experts:
            raise ValueError(f"manager {self.name!r}: EPSpec.topk={spec.topk} exceeds "
                             f"EPSpec.num_experts={spec.num_experts}")
        if spec.dtype == torch.float8_e4m3fn:
            want = -(-spec.hidden // 128)
            if spec.scale_cols != want:
                raise ValueError(
                    f"manager {self.name!r}: a float8 dispatch is FlashInfer's DeepSeekFp8 "
                    f"format, one float32 scale per 128 channels: EPSpec.scale_cols must be "
                    f"{want}, got {spec.scale_cols}")
        elif spec.scale_cols:
            raise TypeError(f"manager {self.name!r}: scales travel only beside float8_e4m3fn "
                            f"x, got EPSpec.dtype={spec.dtype}")
        elif spec.combine_dtype != spec.dtype:
            raise TypeError(
                f"manager {self.name!r}: FlashInfer sizes dispatch and combine from one token "
                f"dtype: EPSpec.out_dtype must be None or {spec.dtype}, got {spec.out_dtype}")

    def _make_handle(self, spec: EPSpec, index: int) -> FlashInferHandle:
        m = self._moe_ep
        fmt = self._quant_format.DeepSeekFp8 if spec.scale_cols else None
        device = torch.cuda.current_device() if self.device.type == "cuda" else None
        comm = m.create_communication(
            m.BootstrapConfig(world_size=self.world_size, rank=self.rank,
                              process_group=self.group.cpu_group, device=device),
            m.MoEEpCommParams(num_experts=spec.num_experts, top_k=spec.topk,
                              max_tokens_per_rank=spec.max_tokens_per_rank,
                              hidden_size=spec.hidden, dtype=spec.combine_dtype,
                              dispatch_format=fmt),
            m.NVLinkOneSidedConfig())
        return FlashInferHandle(self, spec, index, comm)

    def _vendor_dispatch(self, call: int, seq: int, handle: FlashInferHandle,
                         checked: CheckedInputs, rows: list[list[int]] | None
                         ) -> DispatchResult:
        """TOKEN: `x [W * T', H]`, `topk_ids [W * T', K] int64` local (-1 elsewhere and in
        padding rows), `topk_weights` float32 (0 where -1), `x_scales [W * T', S]` for fp8."""
        spec = handle.spec
        runtime = spec.max_tokens_per_rank
        if rows is not None:
            runtime = max(1, max(row[protocol.F_TOKENS] for row in rows))
        res = handle.comm.dispatch(checked.x, checked.topk_ids.to(torch.int32),
                                   checked.topk_weights, hidden_states_scale=checked.x_scales,
                                   runtime_max_tokens_per_rank=runtime)
        local = spec.num_experts // self.world_size
        first = self.rank * local
        gid = res.topk_ids.to(torch.int64)
        mine = (gid >= first) & (gid < first + local)
        ids = torch.where(mine, gid - first, torch.full_like(gid, -1))
        weights = torch.where(mine, res.topk_weights, torch.zeros_like(res.topk_weights))
        state = VendorState(self, handle, call, seq, checked.num_tokens,
                            (int(res.hidden_states.shape[0]),))
        return DispatchResult(Layout.TOKEN, res.hidden_states, res.hidden_states_scale, ids,
                              weights, count_local_ids(ids, local), state)

    def _vendor_combine(self, state: VendorState, expert_out: torch.Tensor) -> torch.Tensor:
        return state.handle.comm.combine(expert_out)

    def _drain(self, state: VendorState) -> None:
        spec = state.handle.spec
        state.handle.comm.combine(torch.zeros(state.rows + (spec.hidden,),
                                              dtype=spec.combine_dtype, device=self.device))
