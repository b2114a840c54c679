"""Base of the GPU vendor backends (DeepEP, pplx-kernels, FlashInfer): `VendorManager`.

A vendor manager adapts one vendor EP library to the moe_ep contract (`contract.py`). The
vendor's buffers are the `EPHandle`: sized from the layer's `EPSpec` when the handle is made
(collective), freed by `destroy()`. Every vendor import is lazy: the vendor module is imported
once, when a manager is built, never by `availability()` (which uses
`importlib.util.find_spec`).

**How errors fail every rank.** A vendor kernel whose peers never arrive spins until the
vendor's own timeout (DeepEP: 100 s, then it aborts; FlashInfer: `timeout_sec`; pplx: for
ever). So by default (option `exchange=True`) every dispatch and combine first all-gathers
the per-call header of `moe_ep.managers.protocol` over the group's CPU side (a few hundred
bytes, no device synchronisation): bad input, a mismatched call or a failing expert step on
one rank raises on every rank *before* any vendor kernel starts (its own error there,
`RemoteInputError` elsewhere). The vendor layouts need no counts from the host, so the header
carries none. With `exchange=False` (for CUDA-graph capture, where no host round trip may
happen) only the local checks run, with no host synchronisation: shapes and dtypes on the host,
id values by a device-side assert; a rank whose input fails then raises alone, its manager
becomes unusable, and its peers wait in the vendor kernel until the vendor's timeout. (The
call without a handle always agrees on its handle with one header exchange: capture graphs
through explicit handles.)

**Live results.** `max_live_results` per handle, as the vendor allows: a later dispatch
retires the oldest (combining it raises on every rank). Backends whose vendor object keeps one
dispatch's routing until its combine (`one_round`: pplx, FlashInfer) refuse a dispatch while a
result is open, with an error naming it. When a combine fails on every rank after its
dispatch (bad expert output, a failing expert step), such a backend runs the vendor combine of
a zero output on every rank to close the round, so the manager stays usable; if the ranks do
not have the same round open (a rank passed a foreign result) the manager becomes unusable.

**Vendor failures.** An exception raised inside a vendor call may leave the peers inside a
vendor collective: the manager becomes unusable (build a new one).

**Contract models.** `moe_ep.testing.vendor_models` installs pure-torch models of the vendor
APIs under the vendor module names; they move CPU tensors over gloo. A manager accepts a CPU
group only when the vendor module it finds in `sys.modules` is such a model (it carries
`__moe_ep_contract_model__ = True`, which no vendor package has): the one test-only override,
scoped to the module object the test installed. `availability()` is never relaxed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moe_ep.managers import protocol
from moe_ep.managers.contract import (
    All2AllManager,
    CombineState,
    DispatchResult,
    EPHandle,
    EPSpec,
    ManagerUnavailableError,
)
from moe_ep.managers.inputs import CheckedInputs
from moe_ep.managers.options import VendorOptions

__all__ = [
    "VendorHandle",
    "VendorManager",
    "VendorState",
    "contract_model",
    "count_local_ids",
]


def contract_model(name: str) -> types.ModuleType | None:
    """The moe_ep contract model installed as vendor module `name`, or None (see module doc)."""
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__moe_ep_contract_model__", False) is True:
        return module
    return None


def count_local_ids(ids: torch.Tensor, num_local: int) -> torch.Tensor:
    """`[E_local] int64` occurrences of each local id in `ids` (any shape; -1 ignored).

    A scatter-add on the device: no host synchronisation (a boolean index would need one).
    """
    flat = ids.reshape(-1)
    counts = torch.zeros(num_local, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, flat.clamp(min=0), (flat >= 0).to(torch.int64))


def _assert_ids_on_device(ids: torch.Tensor, num_experts: int) -> None:
    """Range and distinctness of `[N, K] int64` ids, as device-side asserts (no host sync)."""
    if ids.numel() == 0:
        return
    torch._assert_async(((ids >= -1) & (ids < num_experts)).all(),
                        f"topk_ids must be in [-1, num_experts={num_experts}) (-1 = no expert)")
    s = ids.sort(dim=1).values
    torch._assert_async(~((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any(),
                        "the ids of one token must be distinct (pad with -1)")


class VendorHandle(EPHandle):
    """A vendor handle: the vendor objects sized from one `EPSpec`.

    Attributes:
        open_round: `one_round` backends: the state of the dispatch whose combine the vendor
        object still waits for, else None.
    """

    def __init__(self, manager: VendorManager, spec: EPSpec, index: int) -> None:
        super().__init__(manager, spec, index)
        self.open_round: VendorState | None = None


@dataclass(eq=False)
class VendorState(CombineState):
    """What a vendor combine needs of its dispatch (backends subclass it)."""


class VendorManager(All2AllManager):
    """Lifecycle, checks and error handling shared by the vendor adapters (module docstring).

    Subclasses set `name`, `layout`, `options_cls` (a `VendorOptions` subclass in
    `moe_ep.managers.options`), `vendor_module` and `install_hint`, and implement
    `_requirements` / `_topology_reasons` (availability and construction reasons),
    `_check_spec` (the vendor's limits, raised at `get_handle`), `_make_handle`,
    `_vendor_dispatch`, `_vendor_combine` and, for `one_round` backends, `_drain`.
    """

    options_cls: ClassVar[type] = VendorOptions
    collective_handles: ClassVar[bool] = True
    #: results kept combinable per handle (a later dispatch retires the oldest).
    max_live_results: ClassVar[int] = 64
    #: the vendor object keeps one dispatch's routing until its combine (see module doc).
    one_round: ClassVar[bool] = False
    #: top-level module of the vendor package.
    vendor_module: ClassVar[str] = ""
    #: how to get the package, for the messages.
    install_hint: ClassVar[str] = ""

    # ---- availability --------------------------------------------------------------------

    @classmethod
    def _requirements(cls, device: str, world_size: int) -> list[str]:
        """Why the backend cannot run on `world_size` ranks of `device` ([] if it can); the
        package first. Backends extend it with their rank-count rules."""
        reasons = []
        if importlib.util.find_spec(cls.vendor_module) is None:
            reasons.append(f"{cls.vendor_module} is not installed ({cls.install_hint})")
        if device != "cuda":
            reasons.append(f"needs CUDA devices (this topology's device is {device!r})")
        if world_size < 2:
            reasons.append(f"needs at least 2 ranks, got {world_size}")
        return reasons

    @classmethod
    def _topology_reasons(cls, topology: Any) -> list[str]:
        """Reasons that need the whole `Topology` (node layout, NVLink); backend-specific."""
        return []

    @classmethod
    def _ok_reason(cls, topology: Any) -> str:
        return "vendor kernels on CUDA"

    @classmethod
    def availability(cls, topology: Any) -> tuple[bool, str]:
        reasons = cls._requirements(str(topology.device), topology.world_size)
        if not reasons:
            reasons = cls._topology_reasons(topology)
        if reasons:
            return False, "; ".join(reasons)
        return True, cls._ok_reason(topology)

    # ---- construction --------------------------------------------------------------------

    def __init__(self, group: Any, **options: Any) -> None:
        super().__init__(group, **options)
        self.implicit_capacity = self.options.max_tokens_per_rank
        self.device = torch.device(group.device)
        self.vendor: types.ModuleType | None = None
        self._handles: list[VendorHandle] = []
        reasons = self._local_blockers()
        # Decided together: a rank that cannot build must not leave the others in the vendor
        # set-up collectives below.
        everyone = group.all_gather_object(reasons) if self.world_size > 1 else [reasons]
        missing = [f"rank {r}: {'; '.join(why)}" if self.world_size > 1 else "; ".join(why)
                   for r, why in enumerate(everyone) if why]
        if missing:
            self._mark_broken("it could not be built")
            raise ManagerUnavailableError(
                f"manager {self.name!r} is unavailable: {'; '.join(missing)}")
        self._setup()

    def _local_blockers(self) -> list[str]:
        """This rank's reasons not to build (imports the vendor module when there are none)."""
        model = contract_model(self.vendor_module)
        device = "cuda" if model is not None else self.device.type
        reasons = self._requirements(device, self.world_size)
        if reasons:
            return reasons
        try:
            self.vendor = model or importlib.import_module(self.vendor_module)
        except Exception as exc:  # noqa: BLE001 - reported collectively
            return [f"import {self.vendor_module} failed: {type(exc).__name__}: {exc}"]
        return []

    def _setup(self) -> None:
        """Backend hook after the vendor module is imported on every rank (collective)."""

    def checks_ids_in_python(self, x: object) -> bool:
        # The Python check synchronises with the host; without the exchange (CUDA graphs)
        # the ids are checked by device-side asserts instead.
        return self.options.exchange

    # ---- handles -------------------------------------------------------------------------

    def _check_spec(self, spec: EPSpec) -> None:
        super()._check_spec(spec)
        if spec.num_experts % self.world_size:
            raise ValueError(
                f"manager {self.name!r} needs EPSpec.num_experts to be a multiple of the "
                f"{self.world_size} ranks, got {spec.num_experts}")

    def _create_handle(self, spec: EPSpec, index: int) -> EPHandle:
        # Re-checked here: a handle made for a call without one may have grown past a limit
        # (every rank computes the same capacity, so every rank raises alike).
        self._check_spec(spec)
        try:
            handle = self._make_handle(spec, index)
        except Exception as exc:
            self._mark_broken(f"building its {self.vendor_module} buffers failed: {exc}")
            raise
        self._handles.append(handle)
        return handle

    def _make_handle(self, spec: EPSpec, index: int) -> VendorHandle:
        """Backend hook: build the vendor objects for `spec` (collective)."""
        raise NotImplementedError

    # ---- dispatch ------------------------------------------------------------------------

    def _dispatch(self, call: int, handle: EPHandle | None, checked: CheckedInputs | None,
                  error: Exception | None) -> DispatchResult:
        counter = self._new_counter()
        if error is None:
            try:
                if self.one_round:
                    self._check_no_open_round(handle)
                if not self.options.exchange:
                    _assert_ids_on_device(checked.topk_ids, handle.spec.num_experts)
            except Exception as exc:  # noqa: BLE001 - reported to every rank in the header
                error = exc
        rows = None
        if self.options.exchange:
            rows = protocol.exchange(
                self, protocol.OP_DISPATCH, call, handle, -1, error,
                handle.spec if handle is not None else None,
                checked.num_tokens if checked is not None else 0, (), counter,
            )
        elif error is not None:
            self._mark_broken(f"rank {self.rank}'s dispatch failed without the exchange: {error}")
            raise error
        seq = handle.dispatches
        handle.dispatches += 1
        handle.live.append(seq)
        del handle.live[: -self.max_live_results]
        try:
            result = self._vendor_dispatch(call, seq, handle, checked, rows)
        except Exception as exc:
            self._mark_broken(f"its {self.vendor_module} dispatch failed on rank {self.rank}: "
                              f"{type(exc).__name__}: {exc}")
            raise
        if self.one_round:
            handle.open_round = result.handle
        self._dispatch_bytes = counter.freeze()
        return result

    def _check_no_open_round(self, handle: VendorHandle) -> None:
        for h in self._round_scope(handle):
            if h.open_round is not None:
                raise ValueError(
                    f"manager {self.name!r}: the result of dispatch #{h.open_round.seq} "
                    f"(handle {h.index}) has not been combined; {self.vendor_module} keeps one "
                    f"dispatch's routing {self._round_owner} until its combine: combine that "
                    "result before the next dispatch")

    def _round_scope(self, handle: VendorHandle) -> list[VendorHandle]:
        """The handles whose open round blocks a dispatch on `handle` (its own by default)."""
        return [handle]

    _round_owner: ClassVar[str] = "per handle"

    # ---- combine -------------------------------------------------------------------------

    def _combine(self, call: int, state: CombineState | None, expert_out: torch.Tensor | None,
                 error: Exception | None) -> torch.Tensor:
        counter = self._new_counter()
        mine = state if isinstance(state, VendorState) and state.manager is self else None
        if mine is not None:
            self._finish(mine)  # consumed even when the combine fails
        if self.options.exchange:
            try:
                protocol.exchange(
                    self, protocol.OP_COMBINE, call, mine.handle if mine else None,
                    mine.call if mine else -1, error, None, 0, (), counter,
                )
            except Exception:
                if self.one_round and self._broken is None:
                    self._close_failed_round(mine)
                raise
        elif error is not None:
            self._mark_broken(f"rank {self.rank}'s combine failed without the exchange: {error}")
            raise error
        try:
            y = self._vendor_combine(mine, expert_out)
        except Exception as exc:
            self._mark_broken(f"its {self.vendor_module} combine failed on rank {self.rank}: "
                              f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if mine is not None and mine.handle.open_round is mine:
                mine.handle.open_round = None
        self._combine_bytes = counter.freeze()
        return y

    def _close_failed_round(self, state: VendorState | None) -> None:
        """After a combine failed on every rank: close its vendor round on every rank (the
        vendor combine of a zero expert output), or make the manager unusable when the ranks
        do not have that round open alike."""
        key = None
        if state is not None and state.handle.open_round is state:
            key = (state.handle.index, state.seq)
        try:
            keys = self.group.all_gather_object(key) if self.world_size > 1 else [key]
        except Exception as exc:  # noqa: BLE001 - a peer is gone; the original error is raised
            self._mark_broken(f"closing the round of a failed combine failed: {exc}")
            return
        if all(k is None for k in keys):
            return
        if any(k != key for k in keys):
            self._mark_broken(
                "a combine failed while the ranks' open rounds differ "
                f"({', '.join(f'rank {r}: {k}' for r, k in enumerate(keys))})")
            return
        try:
            self._drain(state)
        except Exception as exc:  # noqa: BLE001 - the original error is the one to raise
            self._mark_broken(f"closing the round of a failed combine failed: {exc}")
        finally:
            state.handle.open_round = None

    def _drain(self, state: VendorState) -> None:
        """Backend hook (`one_round`): the vendor combine of a zero output for `state`."""
        raise NotImplementedError

    # ---- backend hooks -------------------------------------------------------------------

    def _vendor_dispatch(self, call: int, seq: int, handle: VendorHandle,
                         checked: CheckedInputs, rows: list[list[int]] | None
                         ) -> DispatchResult:
        """The vendor dispatch; `rows` are every rank's headers (None without the exchange)."""
        raise NotImplementedError

    def _vendor_combine(self, state: VendorState, expert_out: torch.Tensor) -> torch.Tensor:
        """The vendor combine of `expert_out` (checked, in the combine dtype): `[N, H]`."""
        raise NotImplementedError

    # ---- lifecycle -----------------------------------------------------------------------

    def destroy(self) -> None:
        """Free every handle's vendor objects (idempotent)."""
        if self.destroyed:
            return
        super().destroy()
        self._handles.clear()

