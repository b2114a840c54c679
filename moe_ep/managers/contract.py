"""The dispatch / combine contract every All2All manager implements.

Contract (DESIGN.md)::

    mgr = build_manager("alltoallv", group)                  # once per group (collective)
    h = mgr.get_handle(EPSpec(hidden=H, num_experts=E, topk=K, max_tokens_per_rank=T,
                              dtype=torch.bfloat16))         # once per layer shape (collective)
    res = mgr.dispatch(x, topk_weights, topk_ids, handle=h)  # x [N, H]; ids [N, K], -1 = none
    out = apply_experts(res, lambda e, rows: experts[first + e](rows))
    y = mgr.combine(out, res)                                # [N, H] in h.spec.combine_dtype
    mgr.destroy()                                            # frees every handle
    # y[n] = sum_k topk_weights[n, k] * f_{topk_ids[n, k]}(x[n]), ids of -1 adding nothing

The call without a handle (`dispatch(x, w, ids, num_experts=E)`) keeps working: the handle is
taken from the manager's cache (managers whose handles own buffers agree on it with one small
all-gather first).

**Handles.** A layer's fixed shape is an `EPSpec`; `get_handle` is collective, checks that
every rank passed the same spec (the error lists each rank's value) and caches the handle by
the spec's fields (`HandleCache`). The handle owns whatever the backend sizes from the spec
(shared-memory buffers, vendor buffers) and is freed by `destroy()`. Each `dispatch` is then
checked against the spec locally.

**Nothing hangs, nothing is silent.** Every dispatch and combine makes one small exchange that
carries what the transfer needs anyway (per-destination counts), an error code and the call's
identity (manager, handle, call number, result). Bad input on one rank raises there (its own
`TypeError` / `ValueError`) and `RemoteInputError` on the others; ranks that make different
calls (another manager or handle, a skipped combine, results of different dispatches) all raise
`CallMismatchError`, after which the manager refuses further calls (build a new one). A dead
or stalled peer is named within the group's timeout.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from moe_ep.cpu_allocator import tune_cpu_allocator
from moe_ep.managers.accounting import WireBytes, WireCounter
from moe_ep.managers.cache import HandleCache
from moe_ep.managers.options import NoOptions

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from moe_ep.distributed.group import GroupCoordinator
    from moe_ep.distributed.topology import Topology

__all__ = [
    "All2AllManager",
    "CallMismatchError",
    "CombineState",
    "DispatchResult",
    "EPHandle",
    "EPSpec",
    "GatheredTokens",
    "Layout",
    "ManagerUnavailableError",
    "RemoteInputError",
]

_INT32_MAX = 2**31 - 1
_FP8 = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)
)
#: activation dtypes of an unquantised dispatch / of a quantised one (with scales).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
QUANT_DTYPES = _FP8


# -------------------------------------------------------------------------------- errors
class RemoteInputError(ValueError):
    """Raised on every rank whose own input was valid when another rank's was not.

    Attributes:
        bad_ranks: ranks (in the group) whose call failed its local check.
    """

    def __init__(self, message: str, bad_ranks: tuple[int, ...]) -> None:
        super().__init__(message)
        self.bad_ranks = bad_ranks


class CallMismatchError(RuntimeError):
    """The ranks of the group did not make the same call (raised on every rank).

    After it the manager refuses further calls: its ranks no longer agree on the call order.
    """


class ManagerUnavailableError(RuntimeError):
    """A registered backend cannot run in this environment (package missing, no CUDA, ...)."""


# ------------------------------------------------------------------------------- layouts
class Layout(enum.Enum):
    """How the rows of `DispatchResult.x` are organised (see DESIGN.md)."""

    #: `x [M, H]`: one row per (token, destination rank); `topk_ids [M, K]` local expert ids,
    #: -1 elsewhere; the expert output is `[M, H] = sum over local k of w_k f_k(x)` (the
    #: experts step applies the weights, e.g. `apply_experts`).
    TOKEN = "token"
    #: `x [R, H]`: one row per (token, local expert), grouped by expert in `tokens_per_expert`
    #: long segments; the expert output is `f_e(row)`, unweighted.
    EXPERT_PACKED = "expert_packed"
    #: `x [E_local, C, H]`: expert-major with capacity C, the first `tokens_per_expert[e]` rows
    #: valid; the expert output has the same shape, unweighted.
    EXPERT_PADDED = "expert_padded"


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


@dataclass(frozen=True)
class EPSpec:
    """A MoE layer's fixed shape, declared once: what a handle is sized and checked from.

    Attributes:
        hidden: H, elements per token row.
        num_experts: E, the global number of experts.
        topk: K, expert slots per token (`topk_ids.shape[1]`).
        max_tokens_per_rank: the most tokens one rank dispatches per call; None = unbounded
            (only for managers whose handles own no buffers: naive, agrs, alltoallv).
        dtype: dtype of the `x` handed to dispatch (float32 / bfloat16 / float16 / float64,
            or float8 with `scale_cols > 0`).
        scale_cols: float32 scales per token sent beside a quantised `x` (1: per token,
            ceil(H / 128): per 128-channel block); 0 = unquantised.
        out_dtype: dtype `combine` returns and expects the expert output in; None = `dtype`
            (bfloat16 for a float8 `dtype`).
    """

    hidden: int
    num_experts: int
    topk: int
    max_tokens_per_rank: int | None = None
    dtype: torch.dtype = torch.bfloat16
    scale_cols: int = 0
    out_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in ("hidden", "num_experts", "topk"):
            _check_int_field(name, getattr(self, name), 1)
        if self.max_tokens_per_rank is not None:
            _check_int_field("max_tokens_per_rank", self.max_tokens_per_rank, 1)
        _check_int_field("scale_cols", self.scale_cols, 0)
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"EPSpec.dtype must be a torch.dtype, got {self.dtype!r}")
        if self.scale_cols:
            if self.dtype not in QUANT_DTYPES + FLOAT_DTYPES:
                raise TypeError(f"EPSpec.dtype {self.dtype} cannot carry scales")
        elif self.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"EPSpec.dtype must be one of {[_dtype_name(d) for d in FLOAT_DTYPES]} "
                f"(a float8 dtype needs scale_cols > 0), got {self.dtype}"
            )
        if self.out_dtype is not None and self.out_dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"EPSpec.out_dtype must be one of {[_dtype_name(d) for d in FLOAT_DTYPES]}, "
                f"got {self.out_dtype!r}"
            )

    @functools.cached_property
    def combine_dtype(self) -> torch.dtype:
        """The dtype `combine` returns (`out_dtype`, else `dtype`, bfloat16 for float8)."""
        if self.out_dtype is not None:
            return self.out_dtype
        return torch.bfloat16 if self.dtype in QUANT_DTYPES else self.dtype

    def cache_key(self) -> dict[str, Any]:
        """The fields as keyword arguments (the `HandleCache` key)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def row_bytes(self) -> int:
        """Bytes of one dispatched row (activations plus scales)."""
        return self.hidden * self.dtype.itemsize + 4 * self.scale_cols


def _check_int_field(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"EPSpec.{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= _INT32_MAX:
        raise ValueError(f"EPSpec.{name} must be in [{minimum}, {_INT32_MAX}], got {value}")


class EPHandle:
    """The buffers a manager sizes from one `EPSpec` (one per layer shape; see `get_handle`).

    Attributes:
        spec: the layer's shape; index: the handle's number within its manager (the same on
        every rank); manager: the manager that made it; destroyed: freed already.
    Backends subclass it to own buffers and override `_release`. Handles are freed by their
    manager's `destroy()` (or `destroy()` here), never by the garbage collector.
    """

    def __init__(self, manager: All2AllManager, spec: EPSpec, index: int) -> None:
        self.manager = manager
        self.spec = spec
        self.index = index
        self.destroyed = False
        #: dispatches made through this handle (the next one's number).
        self.dispatches = 0
        #: dispatch numbers whose results have not been combined yet, oldest first.
        self.live: list[int] = []

    def destroy(self) -> None:
        """Free what the handle owns (idempotent, local). Its results become unusable."""
        if not self.destroyed:
            self.destroyed = True
            self._release()

    def _release(self) -> None:
        """Backend hook: free the buffers."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(manager={self.manager.name!r}, index={self.index}, "
                f"spec={self.spec}, destroyed={self.destroyed})")


@dataclass(eq=False)
class CombineState:
    """What `combine` needs of one dispatch (backend-private; subclasses add their fields).

    Attributes:
        manager, handle: who dispatched; call: the manager's call number of the dispatch (its
        identity, equal on every rank); seq: the handle's dispatch number; num_tokens: N;
        rows: rows the expert output must have (the result's leading dimensions).
    """

    manager: All2AllManager
    handle: EPHandle
    call: int
    seq: int
    num_tokens: int
    rows: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class DispatchResult:
    """What `All2AllManager.dispatch` returns; pass it unchanged to `combine`.

    Attributes:
        layout: the `Layout` of `x`.
        x: dispatched activations in the dispatch dtype: `[M, H]` (TOKEN), `[R, H]`
            (EXPERT_PACKED) or `[E_local, C, H]` (EXPERT_PADDED).
        x_scales: float32 scales of a quantised dispatch in the rows of `x` (`[M, S]`,
            `[R, S]`, `[E_local, C, S]`), else None.
        topk_ids: TOKEN: `[M, K] int64` local expert ids, -1 where the expert lives elsewhere
            or the slot is empty. EXPERT_PACKED: `[R] int64` the local expert of each row
            (non-decreasing). EXPERT_PADDED: None.
        topk_weights: TOKEN: `[M, K] float32` router weights, 0 where `topk_ids` is -1.
            EXPERT_PACKED: `[R] float32` each row's router weight, for information (the
            combine applies it, so the experts must not). EXPERT_PADDED: None.
        tokens_per_expert: `[E_local] int64`, (token, local expert) pairs per local expert.
        handle: the backend's `CombineState` (identity of the dispatch).
    Some backends (`shm`) return views of the handle's buffers: a result not yet combined
    stays valid until the handle's second next dispatch (two live results per handle);
    `combine` consumes a result, and the next dispatch may reuse its buffers.
    `x` never aliases the caller's input, so the experts step may overwrite it: writing its
    output into `x` (when it has x's shape and the combine dtype) and passing `x` to
    `combine` saves a copy (`shm` then moves nothing in the combine's own block).
    """

    layout: Layout
    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_ids: torch.Tensor | None
    topk_weights: torch.Tensor | None
    tokens_per_expert: torch.Tensor
    handle: CombineState

    @property
    def num_local_experts(self) -> int:
        return int(self.tokens_per_expert.shape[0])


@dataclass(frozen=True, eq=False)
class GatheredTokens:
    """Result of `dispatch_router_logits` (gather-all managers only).

    Attributes:
        x: `[T, H]` every rank's tokens, in rank order (T = tokens of the group).
        router_logits: `[T, E]` float32, the matching router logits.
        tokens_per_rank: how many of the T rows each rank contributed.
        handle: the `CombineState` `combine` needs.
    """

    x: torch.Tensor
    router_logits: torch.Tensor
    tokens_per_rank: tuple[int, ...]
    handle: CombineState


# ------------------------------------------------------------------------------- the ABC
class All2AllManager(ABC):
    """Dispatch tokens to the ranks owning their experts and combine the expert outputs back.

    Subclasses set `name` (the registry name), `layout`, `options_cls` (a frozen dataclass of
    the options they accept) and implement `availability`, `_dispatch` and `_combine`; the
    base class owns the lifecycle (options, agreement at construction, handles, call numbers,
    destroy) and the local checks. Build managers through `moe_ep.managers.build_manager`.

    Args:
        group: the expert-parallel `GroupCoordinator`; every rank of it must build the manager
            (collective: ranks that build different managers or options all raise) and call
            `dispatch` / `combine` in the same order.
        **options: backend options; an unknown option raises TypeError listing the allowed ones.

    Attributes:
        group, rank (rank in the group), world_size, options (the frozen options dataclass),
        uid (the manager's number on its group, equal on every rank), layout,
        last_dispatch_bytes / last_combine_bytes (`WireBytes` of the latest call).
    """

    name: ClassVar[str] = ""
    layout: Layout
    options_cls: ClassVar[type] = NoOptions
    #: activation dtypes `dispatch` accepts (quantised float8 needs `EPSpec.scale_cols`).
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES + QUANT_DTYPES
    #: handles own buffers: a dispatch without a handle agrees on one collectively first.
    collective_handles: ClassVar[bool] = False
    #: capacity of a handle made for a dispatch without one (grown to the largest call).
    implicit_capacity: ClassVar[int] = 256

    def __init__(self, group: GroupCoordinator, **options: Any) -> None:
        from moe_ep.distributed.group import GroupCoordinator
        if not isinstance(group, GroupCoordinator):
            raise TypeError(f"group must be a GroupCoordinator, got {type(group).__name__}")
        self.options = self._make_options(options)
        self.group = group
        self.rank: int = group.rank_in_group
        self.world_size: int = group.world_size
        self._cache = HandleCache()
        self._implicit: dict[tuple, EPHandle] = {}
        self._handles_made = 0
        self._calls = 0
        self._destroyed = False
        self._broken: str | None = None
        self._dispatch_bytes = WireBytes()
        self._combine_bytes = WireBytes()
        self.uid = protocol.agree_on_manager(self)
        if group.device.type == "cpu":
            # Per-call outputs (combine's [N, H]) must not come from freshly mapped pages.
            tune_cpu_allocator(f"manager {self.name!r}")

    # ---- options -----------------------------------------------------------------------------

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls.options_cls))

    @classmethod
    def _make_options(cls, options: Mapping[str, Any]) -> Any:
        allowed = cls.option_names()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            listed = ", ".join(allowed) if allowed else "none"
            raise TypeError(
                f"manager {cls.name!r} got unexpected option(s) {', '.join(map(repr, unknown))}; "
                f"allowed options: {listed}"
            )
        return cls.options_cls(**options)

    # ---- availability and cost model -------------------------------------------------------

    @classmethod
    @abstractmethod
    def availability(cls, topology: Topology) -> tuple[bool, str]:
        """Whether this backend can run on `topology`, with the reason (pure, no collective)."""

    @classmethod
    def wire_bytes_per_token(
        cls, *, world_size: int, hidden: int, elem_size: int, topk: int, num_experts: int,
        **options: Any,
    ) -> float | None:
        """Expected bytes per token (dispatch + combine, one rank) for uniform random routing,
        the per-call exchange excluded; None when the backend gives no model."""
        return None

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def _check_usable(self) -> None:
        if self._destroyed:
            raise RuntimeError(f"manager {self.name!r} was destroyed; build a new one")
        if self._broken is not None:
            raise RuntimeError(
                f"manager {self.name!r} is unusable: {self._broken}; build a new one")

    def _mark_broken(self, why: str) -> None:
        if self._broken is None:
            logger.warning("manager %r on group %r is unusable: %s", self.name, self.group_name,
                           why)
        self._broken = why

    def destroy(self) -> None:
        """Free every handle. Idempotent; the manager cannot be used afterwards."""
        if self._destroyed:
            return
        self._destroyed = True
        self._implicit.clear()
        self._cache.clear()

    # ---- handles -----------------------------------------------------------------------------

    def get_handle(self, spec: EPSpec) -> EPHandle:
        """The handle for `spec` (collective: every rank passes an equal spec).

        Made once per distinct spec and cached; a disagreement across ranks raises on every rank
        with each rank's value; a spec the backend cannot serve raises its reason everywhere.
        """
        error: Exception | None = None
        try:
            self._check_usable()
            if not isinstance(spec, EPSpec):
                raise TypeError(f"spec must be an EPSpec, got {type(spec).__name__}")
            self._check_spec(spec)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it
            error = exc
        protocol.agree_on_spec(self, spec if error is None else None, error)
        return self._cache.get_or_create(spec.cache_key(), self._new_handle)

    def _new_handle(self, **fields: Any) -> EPHandle:
        index = self._handles_made
        self._handles_made += 1
        spec = EPSpec(**fields)
        logger.debug("manager %r (#%d) on group %r: handle %d for %s", self.name, self.uid,
                     self.group_name, index, spec)
        return self._create_handle(spec, index)

    def _check_spec(self, spec: EPSpec) -> None:
        """Raise when this backend cannot serve `spec` (local; the base checks the dtype)."""
        if spec.dtype not in self.supported_dtypes:
            raise TypeError(
                f"manager {self.name!r} does not dispatch {spec.dtype}; supported: "
                f"{[_dtype_name(d) for d in self.supported_dtypes]}"
            )
        if self.collective_handles and spec.max_tokens_per_rank is None:
            raise ValueError(
                f"manager {self.name!r} sizes buffers per handle: EPSpec.max_tokens_per_rank "
                "must be set"
            )

    def _create_handle(self, spec: EPSpec, index: int) -> EPHandle:
        """Backend hook: the handle for `spec` (collective for backends with buffers)."""
        return EPHandle(self, spec, index)

    # ---- the contract ------------------------------------------------------------------------

    def dispatch(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        handle: EPHandle | None = None,
        num_experts: int | None = None,
        x_scales: torch.Tensor | None = None,
    ) -> DispatchResult:
        """Send each token to the ranks owning its experts (collective over the group).

        Args:
            x: `[N, H]` activations in `handle.spec.dtype`; N may be 0 and differ between
                ranks (at most `max_tokens_per_rank`).
            topk_weights: `[N, K]` floating router weights (ignored where the id is -1).
            topk_ids: `[N, K]` int32 / int64 global expert ids, -1 = none; distinct per token.
            handle: from `get_handle`; None takes one from the cache for this call's shape
                (then `num_experts` is required).
            num_experts: E, for a call without a handle.
            x_scales: `[N, scale_cols] float32` scales of a quantised `x`, else None.
        Returns:
            a `DispatchResult` in this manager's layout.
        """
        call = self._begin_call()
        error: Exception | None = None
        checked = None
        try:
            self._check_usable()
            if handle is not None:
                self._check_handle(handle, num_experts)
        except Exception as exc:  # noqa: BLE001 - reported to every rank through the exchange
            error = exc
        if handle is None:
            handle, error = self._implicit_handle(call, x, topk_ids, num_experts, x_scales, error)
        if error is None:
            try:
                checked = inputs.check_dispatch(
                    handle.spec, x, topk_weights, topk_ids, x_scales, device=self.group.device,
                    check_ids=self.checks_ids_in_python(x),
                )
            except Exception as exc:  # noqa: BLE001 - reported to every rank
                error = exc
        return self._dispatch(call, handle if isinstance(handle, EPHandle) else None, checked,
                              error)

    def _check_handle(self, handle: object, num_experts: object) -> None:
        if not isinstance(handle, EPHandle) or handle.manager is not self:
            raise TypeError(f"handle must come from this manager's get_handle, got {handle!r:.120}")
        if handle.destroyed:
            raise ValueError(f"handle {handle.index} of manager {self.name!r} was destroyed")
        if num_experts is not None and (
            isinstance(num_experts, bool) or not isinstance(num_experts, int)
        ):
            raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
        if num_experts is not None and num_experts != handle.spec.num_experts:
            raise ValueError(
                f"num_experts={num_experts!r} disagrees with the handle's "
                f"EPSpec.num_experts={handle.spec.num_experts}")

    def combine(self, expert_out: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        """Bring the expert outputs back: `[N, H]` in the order of the dispatched x.

        Args:
            expert_out: the expert output for `result` in its layout (see `Layout`), e.g.
                `apply_experts(result, fn)`, in the handle's `combine_dtype` or a more precise
                floating dtype (a less precise one is refused: it would degrade every rank).
            result: what `dispatch` returned on this rank.
        Returns: `[N, H]` in `result.handle.handle.spec.combine_dtype`.
        """
        call = self._begin_call()
        state: CombineState | None = None
        error: Exception | None = None
        try:
            self._check_usable()
            state = inputs.result_state(self, result)
            inputs.check_live(state)
            expert_out = inputs.check_expert_out(state, expert_out)
        except Exception as exc:  # noqa: BLE001 - reported to every rank through the exchange
            error = exc
        return self._combine(call, state, expert_out, error)

    def abort(self, error: Exception, *, result: DispatchResult | None = None,
              handle: EPHandle | None = None) -> None:
        """Fail the call the peers are waiting in: raise `error` here, `RemoteInputError` there.

        For a caller whose own step fails between the collective calls: with `result`, the
        combine of that result fails on every rank (an experts step that raised); without it,
        the next dispatch (through `handle`, or the call without a handle) fails everywhere (a
        layer handed a tensor it cannot route).
        """
        call = self._begin_call()
        if result is not None:
            state = result.handle if isinstance(result, DispatchResult) else None
            self._combine(call, state if isinstance(state, CombineState) else None, None, error)
        else:
            if handle is None:
                handle, error = self._implicit_handle(call, None, None, None, None, error)
            self._dispatch(call, handle if isinstance(handle, EPHandle) else None, None, error)
        raise error  # unreachable: the exchange raised it

    def dispatch_router_logits(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor
    ) -> GatheredTokens:
        """vLLM's gather-all call: every rank gets every rank's tokens and router logits.

        Only the gather-all managers (naive, allgather_reducescatter) support it.
        """
        raise NotImplementedError(
            f"manager {self.name!r} does not gather all tokens; dispatch_router_logits is "
            "offered by the gather-all managers ('naive', 'allgather_reducescatter')"
        )

    @property
    def last_dispatch_bytes(self) -> WireBytes:
        """`WireBytes` this rank sent in its latest dispatch."""
        return self._dispatch_bytes

    @property
    def last_combine_bytes(self) -> WireBytes:
        """`WireBytes` this rank sent in its latest combine."""
        return self._combine_bytes

    @property
    def last_bytes_sent(self) -> int:
        """Bytes this rank sent in its latest dispatch plus its latest combine."""
        return self.last_dispatch_bytes.total + self.last_combine_bytes.total

    # ---- for subclasses ----------------------------------------------------------------------

    @property
    def group_name(self) -> str:
        return self.group.name

    def _begin_call(self) -> int:
        self._calls += 1
        return self._calls

    def _new_counter(self) -> WireCounter:
        return WireCounter(self.world_size, self.rank)

    def _gather_header(self, call: int, values: list[int]) -> list[list[int]]:
        """Every rank's int64 header of call `call` (see `protocol.exchange`): one all-gather
        over the group. A CPU tensor even on a CUDA group: its values are needed on the host
        (split sizes) and a device collective would add a device->host copy."""
        header = torch.tensor([values], dtype=torch.int64)
        return self.group.all_gather(header, dim=0).tolist()

    def checks_ids_in_python(self, x: object) -> bool:
        """Whether `dispatch` validates id ranges in torch (False where a native planner does)."""
        return True

    def _implicit_handle(
        self, call: int, x: object, topk_ids: object, num_experts: object, x_scales: object,
        error: Exception | None,
    ) -> tuple[EPHandle | None, Exception | None]:
        """The cached handle for a call without one, or the error to report.

        Managers whose handles own buffers agree on it collectively first and raise there on
        any rank's error (see `protocol.implicit_handle`); the others look it up locally.
        """
        return protocol.implicit_handle(self, call, x, topk_ids, num_experts, x_scales, error)

    @abstractmethod
    def _dispatch(self, call: int, handle: EPHandle | None, checked: Any,
                  error: Exception | None) -> DispatchResult:
        """Exchange and transfer (collective). `checked` is the locally checked input
        (`moe_ep.managers.inputs.CheckedInputs`), None when `error` is set; every rank must
        take part in the exchange even then, and raise together."""

    @abstractmethod
    def _combine(self, call: int, state: CombineState | None, expert_out: torch.Tensor | None,
                 error: Exception | None) -> torch.Tensor:
        """Exchange and return trip (collective); `state` may be None only with `error`."""

    def _finish(self, state: CombineState) -> None:
        """Mark `state`'s dispatch combined (its result cannot be combined again)."""
        live = state.handle.live
        if state.seq in live:
            live.remove(state.seq)


# The checks and the exchange protocol use the types above; imported last, as modules, so that
# the hot path does not re-run an import statement per call.
from moe_ep.managers import inputs, protocol  # noqa: E402
