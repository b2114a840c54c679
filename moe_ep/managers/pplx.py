"""pplx-kernels backend (`pplx`): EXPERT_PADDED over `pplx_kernels.AllToAll`.

Written against github.com/ppl-ai/pplx-kernels at 12cecfda252e (2025-08-06; no release, not
on PyPI). Tested against the contract model `moe_ep.testing.vendor_models.pplx_model` only:
nothing here has run on a GPU. Errors and CUDA graphs: `moe_ep.managers.vendor`.

A handle owns one `AllToAll.intranode(..., group_name=<the group's gloo CPU group>)` (CUDA IPC
between the GPUs of one node) or `AllToAll.internode(...)` (NVSHMEM), built with
`max_num_tokens = max_tokens_per_rank`, `dp_size = 1` (each moe_ep rank owns its tokens),
`hidden_dim_bytes = H * element size` and `hidden_dim_scale_bytes = round_up(4 S, 16)`, and the
caller-allocated expert-major outputs `[E_local, W * T, H]` (and `[E_local, W * T, S']` float32
scales): results are views of them, valid until the handle's next dispatch. `bound_m` is a
`[1] uint32` device tensor of the handle (no host value reaches the kernel). The combine is
weighted, as EXPERT_PADDED expects. Internode, the first such manager of the process
initialises NVSHMEM from rank 0's unique id broadcast over the group's CPU side, and the last
one's `destroy()` finalises it after its handles.

**pplx has no "no expert" id** (ids are uint32: -1 would address a rank that does not exist),
so every -1 slot is rewritten before the dispatch to an expert the token does not already use
(this rank's own experts first, which costs no traffic) with weight 0: `fill_missing_ids`.
Those filler rows are real rows of the receive layout: `tokens_per_expert` counts them, the
experts compute them and the combine multiplies them by 0 (exact for finite expert outputs).
A token never names one expert twice (that could overflow the per-source buffer of
`max_num_tokens` rows), so `topk <= num_experts` is required.

Limits checked at `get_handle`: `E % W == 0` (the kernels mix `ceil` and `floor` of `E / W`),
`topk <= E`, 16-byte rows, scale bytes <= row bytes, combine dtype bfloat16 or float16 (what
`combine`'s output takes). One dispatch, then its combine, per handle: the routing lives in
the `AllToAll` object, so a second dispatch before the combine is refused.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moe_ep.managers.contract import (
    FLOAT_DTYPES,
    QUANT_DTYPES,
    DispatchResult,
    EPSpec,
    Layout,
    ManagerUnavailableError,
)
from moe_ep.managers.inputs import CheckedInputs
from moe_ep.managers.options import PplxOptions
from moe_ep.managers.placement import expert_placement
from moe_ep.managers.vendor import VendorHandle, VendorManager, VendorState

__all__ = ["PplxManager", "fill_missing_ids"]

_HINT = ("build pplx-kernels from source, github.com/ppl-ai/pplx-kernels@12cecfd, with the "
         "CUDA toolkit and NVSHMEM: docs/backends.md")
_COMBINE_DTYPES = (torch.bfloat16, torch.float16)

# NVSHMEM is one job per process: who initialised it, per vendor module object (a contract
# model installed for a test is a fresh module, with fresh NVSHMEM state).
_NVSHMEM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def fill_missing_ids(topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     preference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give every -1 slot an expert its token does not use, with weight 0 (no host sync).

    Args:
        topk_ids: `[N, K] int64`, distinct per token apart from -1, `K <= E`.
        topk_weights: `[N, K] float32`.
        preference: `[E] int64`, every expert once, in the order fillers are taken (this
            rank's own experts first).
    Returns:
        `(ids [N, K] int64 with no -1, weights [N, K] float32)`; the j-th -1 slot of a token
        gets the j-th of `preference` the token does not use.
    """
    n, k = topk_ids.shape
    missing = topk_ids < 0
    e = preference.numel()
    # -1 slots mark a spare column E (scattering False there instead could race a True).
    used = torch.zeros((n, e + 1), dtype=torch.bool, device=topk_ids.device)
    used.scatter_(1, torch.where(missing, torch.full_like(topk_ids, e), topk_ids), True)
    free = ~used.index_select(1, preference)  # [N, E] in preference order
    rank_free = free.cumsum(dim=1) - 1
    # Column j of `table` is the token's j-th free expert; column K collects the rest.
    col = torch.where(free & (rank_free < k), rank_free, torch.full_like(rank_free, k))
    table = torch.zeros((n, k + 1), dtype=torch.int64, device=topk_ids.device)
    table.scatter_(1, col, preference.expand(n, -1).contiguous())
    slot = (missing.cumsum(dim=1) - 1).clamp(min=0)
    filled = table.gather(1, slot)
    return (torch.where(missing, filled, topk_ids),
            torch.where(missing, torch.zeros_like(topk_weights), topk_weights))


@dataclass(eq=False)
class PplxState(VendorState):
    """What the pplx combine needs: the dispatch's `indices [N, K] uint32` (fillers in place
    of -1) and `weights [N, K] float32` (0 for fillers)."""

    indices: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class PplxHandle(VendorHandle):
    """A layer's `AllToAll` (`a2a`) and its caller-allocated buffers.

    Attributes:
        num_tokens: `[E_local] int32`; x: `[E_local, W * T, H]`; x_scale: `[E_local, W * T,
        S'] float32` or None; dp_scale: `[T, S'] float32` staging of the caller's scales
        (padding columns zero) or None; bound_m: `[1] uint32`.
    """

    def __init__(self, manager: PplxManager, spec: EPSpec, index: int, a2a: Any) -> None:
        super().__init__(manager, spec, index)
        self.a2a = a2a
        w, t, dev = manager.world_size, spec.max_tokens_per_rank, manager.device
        local = spec.num_experts // w
        self.num_tokens = torch.zeros(local, dtype=torch.int32, device=dev)
        self.x = torch.empty((local, w * t, spec.hidden), dtype=spec.dtype, device=dev)
        self.x_scale = self.dp_scale = None
        if spec.scale_cols:
            cols = manager.scale_bytes(spec) // 4
            self.x_scale = torch.empty((local, w * t, cols), dtype=torch.float32, device=dev)
            self.dp_scale = torch.zeros((t, cols), dtype=torch.float32, device=dev)
        self.bound_m = torch.zeros(1, dtype=torch.uint32, device=dev)

    def _release(self) -> None:
        self.a2a.destroy()


class PplxManager(VendorManager):
    """`pplx`: pplx-kernels' `AllToAll`, EXPERT_PADDED (module docstring)."""

    name: ClassVar[str] = "pplx"
    layout: ClassVar[Layout] = Layout.EXPERT_PADDED
    options_cls: ClassVar[type] = PplxOptions
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES + QUANT_DTYPES
    max_live_results: ClassVar[int] = 1
    one_round: ClassVar[bool] = True
    vendor_module: ClassVar[str] = "pplx_kernels"
    install_hint: ClassVar[str] = _HINT

    @classmethod
    def _topology_reasons(cls, topology: Any) -> list[str]:
        if not topology.internode and topology.nvlink is False:
            return ["pplx's intranode kernels need peer access between every GPU pair (it "
                    "fails on this node)"]
        return []

    @classmethod
    def _ok_reason(cls, topology: Any) -> str:
        if topology.internode:
            return (f"pplx-kernels over NVSHMEM ({topology.world_size} ranks; needs an RDMA "
                    "transport NVSHMEM can drive, IBGDA / IBRC / EFA, not checked here)")
        return f"pplx-kernels over CUDA IPC ({topology.world_size} ranks, one node)"

    def _setup(self) -> None:
        internode = self.options.internode
        if internode is None:
            internode = not self.group.same_node  # probed when the group was built
        self.internode = internode
        self._nvshmem = False
        if internode:
            self._nvshmem_acquire()
        # Fillers: this rank's experts first (no traffic), then the next ranks' in turn.
        self._rank_order = [(self.rank + i) % self.world_size for i in range(self.world_size)]
        self._preference: dict[int, torch.Tensor] = {}

    # ---- NVSHMEM -------------------------------------------------------------------------

    def _nvshmem_acquire(self) -> None:
        """Initialise NVSHMEM for this group (collective) or join the process's job."""
        pplx = self.vendor
        ranks = tuple(self.group.ranks)
        job = _NVSHMEM.get(pplx)
        if job is not None and job["ranks"] != ranks:
            # Every rank of this group is in the same job only if the first group was this one.
            raise ManagerUnavailableError(
                f"manager 'pplx' is unavailable: NVSHMEM is already initialised in this process "
                f"for ranks {job['ranks']}, not {ranks} (one NVSHMEM job per process)")
        if job is None:
            uid = (pplx.nvshmem_get_unique_id() if self.rank == 0
                   else pplx.nvshmem_alloc_empty_unique_id())
            self.group.broadcast(uid, src=0)  # a CPU tensor: over the gloo group
            pplx.nvshmem_init(uid, self.rank, self.world_size)
            job = _NVSHMEM[pplx] = {"ranks": ranks, "users": 0}
        job["users"] += 1
        self._nvshmem = True

    def destroy(self) -> None:
        """Destroy the handles' `AllToAll` objects, then finalise NVSHMEM if this was the
        process's last internode pplx manager (idempotent)."""
        if self.destroyed:
            return
        try:
            super().destroy()
        finally:
            if self._nvshmem:
                self._nvshmem = False
                job = _NVSHMEM[self.vendor]
                job["users"] -= 1
                if job["users"] == 0:
                    del _NVSHMEM[self.vendor]
                    self.vendor.nvshmem_finalize()

    # ---- handles -------------------------------------------------------------------------

    def scale_bytes(self, spec: EPSpec) -> int:
        """`hidden_dim_scale_bytes`: 4 bytes per scale, rounded up to 16 (0 unquantised)."""
        return _round16(4 * spec.scale_cols) if spec.scale_cols else 0

    def _check_spec(self, spec: EPSpec) -> None:
        super()._check_spec(spec)
        if spec.combine_dtype not in _COMBINE_DTYPES:
            raise TypeError(
                f"manager 'pplx' combines into bfloat16 or float16 only, but the spec's combine "
                f"dtype is {spec.combine_dtype} (set EPSpec.out_dtype)")
        row = spec.hidden * spec.dtype.itemsize
        if row % 16:
            raise ValueError(f"manager 'pplx': a row of EPSpec.hidden={spec.hidden} "
                             f"{spec.dtype} elements is not a multiple of 16 bytes")
        if self.scale_bytes(spec) > row:
            raise ValueError(f"manager 'pplx': {spec.scale_cols} scales per token take "
                             f"{self.scale_bytes(spec)} bytes, more than a row's {row}")
        if spec.topk > spec.num_experts:
            raise ValueError(
                f"manager 'pplx' has no empty slot: every one of EPSpec.topk={spec.topk} slots "
                f"needs a distinct expert, but there are EPSpec.num_experts={spec.num_experts}")

    def _make_handle(self, spec: EPSpec, index: int) -> PplxHandle:
        elem = spec.dtype.itemsize
        args = dict(max_num_tokens=spec.max_tokens_per_rank, num_experts=spec.num_experts,
                    experts_per_token=spec.topk, rank=self.rank, world_size=self.world_size,
                    dp_size=1, hidden_dim=spec.hidden, hidden_dim_bytes=spec.hidden * elem,
                    hidden_dim_scale_bytes=self.scale_bytes(spec))
        all_to_all = self.vendor.AllToAll
        if self.internode:
            a2a = all_to_all.internode(**args)
        else:
            a2a = all_to_all.intranode(**args, group_name=self.group.cpu_group.group_name)
        return PplxHandle(self, spec, index, a2a)

    def _filler_order(self, num_experts: int) -> torch.Tensor:
        order = self._preference.get(num_experts)
        if order is None:
            placement = expert_placement(num_experts, self.world_size)
            order = torch.tensor([e for r in self._rank_order for e in placement.local_range(r)],
                                 dtype=torch.int64, device=self.device)
            self._preference[num_experts] = order
        return order

    # ---- dispatch / combine --------------------------------------------------------------

    def _vendor_dispatch(self, call: int, seq: int, handle: PplxHandle,
                         checked: CheckedInputs, rows: list[list[int]] | None
                         ) -> DispatchResult:
        """EXPERT_PADDED: `x [E_local, W * T, H]`, `x_scales [E_local, W * T, S]` float32
        when quantised, `tokens_per_expert [E_local] int64` (filler rows included)."""
        spec = handle.spec
        n = checked.num_tokens
        ids, weights = fill_missing_ids(checked.topk_ids, checked.topk_weights,
                                        self._filler_order(spec.num_experts))
        indices = ids.to(torch.int32).view(torch.uint32)
        handle.bound_m.fill_(n)
        dp_scale = None
        if spec.scale_cols:
            dp_scale = handle.dp_scale[:n]
            dp_scale[:, :spec.scale_cols] = checked.x_scales
        handle.a2a.dispatch(handle.num_tokens, handle.x, handle.x_scale, checked.x, dp_scale,
                            indices, handle.bound_m)
        state = PplxState(self, handle, call, seq, n, tuple(handle.x.shape[:2]),
                          indices=indices, weights=weights)
        scales = handle.x_scale[..., :spec.scale_cols] if spec.scale_cols else None
        return DispatchResult(Layout.EXPERT_PADDED, handle.x, scales, None, None,
                              handle.num_tokens.to(torch.int64), state)

    def _vendor_combine(self, state: PplxState, expert_out: torch.Tensor) -> torch.Tensor:
        handle: PplxHandle = state.handle
        out = torch.empty((state.num_tokens, handle.spec.hidden),
                          dtype=handle.spec.combine_dtype, device=self.device)
        handle.bound_m.fill_(state.num_tokens)
        handle.a2a.combine(out, state.indices, state.weights, expert_out, handle.bound_m)
        return out

    def _drain(self, state: PplxState) -> None:
        zeros = torch.zeros(state.rows + (state.handle.spec.hidden,),
                            dtype=state.handle.spec.combine_dtype, device=self.device)
        self._vendor_combine(state, zeros)
