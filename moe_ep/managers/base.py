"""The dispatch / combine contract every All2All manager implements.

Contents:

* :class:`Layout`, :class:`DispatchResult`, :class:`GatheredTokens`: what ``dispatch`` returns.
* :func:`expert_placement` / :class:`ExpertPlacement`: which rank owns which expert.
* :func:`apply_experts`: run a per-expert function on a dispatch result, for any layout.
* :class:`All2AllManager`: the ABC (options, availability, handle cache, destroy, wire-byte
  statistics) and the collective input check every dispatch starts with.
* :class:`VendorBackendPlaceholder`: base of registered backends that cannot run here.

Contract (DESIGN.md)::

    res = mgr.dispatch(x, topk_weights, topk_ids, num_experts=E)  # x [N, H]; ids [N, K], -1 = none
    out = apply_experts(res, lambda e, rows: experts[first + e](rows))
    y = mgr.combine(out, res)                                      # [N, H], dtype of x
    # y[n] = sum_k topk_weights[n, k] * f_{topk_ids[n, k]}(x[n]), ids of -1 adding nothing

**No rank hangs on bad input.** Every ``dispatch`` first checks its inputs locally, then
all-gathers a small int32 header ``(num_tokens, hidden, dtype, topk, num_experts, error,
extra...)`` over the group's CPU (gloo) group. If any rank's input is bad, every rank raises
together: the bad rank its own ``TypeError`` / ``ValueError``, the others a
:class:`RemoteInputError` naming the bad rank. If the inputs are individually valid but
disagree across ranks (hidden size, dtype, topk, num_experts), every rank raises the same
``ValueError`` listing each rank's value. The header also tells every rank how many tokens
each rank holds (and carries backend-specific counts, e.g. all-to-all split sizes), so it
replaces a communication the backends need anyway. ``combine`` checks its input locally only
(keeping it one collective): a wrong ``expert_out`` shape raises on that rank.

**Wire bytes.** Each manager records, per call, the bytes this rank puts on the wire
(:class:`WireBytes`): computed from the sizes of the tensors actually passed to each
collective under its standard algorithm (broadcast: the root sends its tensor to every other
rank; all-gather: a rank's part goes to every other rank; ring all-reduce: ``2 (W-1)/W`` of
the tensor; reduce-scatter and all-to-all: every chunk addressed to another rank). Chunks a
rank keeps for itself are not counted. torch.distributed exposes no byte counters, so this is
the data volume each manager hands to the collectives, measured per call, not a hardware
counter; a transport may move more than the standard algorithm (over plain gloo, the group's
``all_gatherv`` pads every rank to the largest count and its ``reduce_scatterv`` is an
all-reduce).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import torch

from moe_ep.managers.cache import HandleCache

if TYPE_CHECKING:
    from moe_ep.distributed.group import GroupCoordinator
    from moe_ep.distributed.topology import Topology

__all__ = [
    "All2AllManager",
    "CheckedDispatchInputs",
    "DispatchResult",
    "ExpertPlacement",
    "GatheredTokens",
    "Layout",
    "ManagerUnavailableError",
    "NoOptions",
    "PeerHeaders",
    "RemoteInputError",
    "VendorBackendPlaceholder",
    "WireBytes",
    "apply_experts",
    "check_dispatch_inputs",
    "expert_placement",
    "weighted_row_sum",
]

_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class RemoteInputError(ValueError):
    """Raised on every rank whose own input was valid when another rank's input was not.

    Attributes:
        bad_ranks: ranks (in the group) whose input failed the local check.
    """

    def __init__(self, message: str, bad_ranks: tuple[int, ...]) -> None:
        super().__init__(message)
        self.bad_ranks = bad_ranks


class ManagerUnavailableError(RuntimeError):
    """A registered backend cannot run in this environment (package missing, no CUDA, ...)."""


# --------------------------------------------------------------------------------------------
# Layouts and results
# --------------------------------------------------------------------------------------------


class Layout(enum.Enum):
    """How the rows of ``DispatchResult.x`` are organised (see DESIGN.md)."""

    #: ``x [M, H]``: one row per token; ``topk_ids [M, K]`` local expert ids, -1 elsewhere;
    #: the expert output is ``[M, H] = sum over local k of w_k f_k(x)`` (weights applied by the
    #: experts step, e.g. :func:`apply_experts`).
    TOKEN = "token"
    #: ``x [R, H]``: one row per (token, local expert), grouped by expert in
    #: ``tokens_per_expert`` long segments; the expert output is ``f_e(row)``, unweighted.
    EXPERT_PACKED = "expert_packed"
    #: ``x [E_local, C, H]``: expert-major with capacity ``C``, the first
    #: ``tokens_per_expert[e]`` rows valid; the expert output has the same shape, unweighted.
    EXPERT_PADDED = "expert_padded"


@dataclass(frozen=True, eq=False)
class DispatchResult:
    """What ``All2AllManager.dispatch`` returns; pass it unchanged to ``combine``.

    Attributes:
        layout: the :class:`Layout` of ``x``.
        x: dispatched activations, dtype of the input ``x``: ``[M, H]`` (TOKEN),
            ``[R, H]`` (EXPERT_PACKED) or ``[E_local, C, H]`` (EXPERT_PADDED).
        x_scales: scales of a quantised dispatch, else None.
        topk_ids: TOKEN: ``[M, K] int64`` local expert ids, -1 where the expert lives elsewhere
            or the slot is empty. EXPERT_PACKED: ``[R] int64`` the local expert of each row
            (non-decreasing). EXPERT_PADDED: None (or backend specific).
        topk_weights: TOKEN: ``[M, K] float32`` router weights, 0 where ``topk_ids`` is -1.
            EXPERT_PACKED: ``[R] float32`` the router weight of each row, for information: the
            combine applies it, so the experts must not. EXPERT_PADDED: None.
        tokens_per_expert: ``[E_local] int64``, number of (token, local expert) pairs received
            per local expert.
        handle: backend-private state the combine needs.
    """

    layout: Layout
    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_ids: torch.Tensor | None
    topk_weights: torch.Tensor | None
    tokens_per_expert: torch.Tensor
    handle: Any

    @property
    def num_local_experts(self) -> int:
        return int(self.tokens_per_expert.shape[0])


@dataclass(frozen=True, eq=False)
class GatheredTokens:
    """Result of ``dispatch_router_logits`` (gather-all managers only).

    Attributes:
        x: ``[T, H]`` every rank's tokens, in rank order (T = total tokens of the group).
        router_logits: ``[T, E]`` float32, the matching router logits.
        tokens_per_rank: how many of the T rows each rank contributed.
        handle: backend-private state ``combine`` needs.
    """

    x: torch.Tensor
    router_logits: torch.Tensor
    tokens_per_rank: tuple[int, ...]
    handle: Any


@dataclass(frozen=True)
class WireBytes:
    """Bytes one rank put on the wire during one dispatch or combine (see module docstring).

    Attributes:
        payload: token rows (activations, expert outputs).
        metadata: expert ids, router weights, split counts sent beside the rows.
        header: the dispatch header (the input check's all-gather).
        collectives: number of collective calls issued.
    """

    payload: int = 0
    metadata: int = 0
    header: int = 0
    collectives: int = 0

    @property
    def total(self) -> int:
        return self.payload + self.metadata + self.header


class WireCounter:
    """Mutable accumulator behind :class:`WireBytes`; one per dispatch / combine call.

    Each method records one collective given the payload and metadata bytes of the tensors
    passed to it, scaled by what the collective's standard algorithm makes this rank send.
    """

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size = world_size
        self.rank = rank
        self.payload = 0
        self.metadata = 0
        self.header = 0
        self.collectives = 0

    def _add(self, payload: int, metadata: int) -> None:
        self.payload += int(payload)
        self.metadata += int(metadata)
        self.collectives += 1

    def all_gather(self, own_payload: int, own_metadata: int = 0) -> None:
        """This rank's part goes to each of the other W-1 ranks."""
        if self.world_size > 1:
            w = self.world_size
            self._add((w - 1) * own_payload, (w - 1) * own_metadata)

    def header_all_gather(self, own_nbytes: int) -> None:
        """The dispatch header: an all-gather, counted apart from payload and metadata."""
        if self.world_size > 1:
            self.header += (self.world_size - 1) * int(own_nbytes)
            self.collectives += 1

    def broadcast(self, src: int, payload: int, metadata: int = 0) -> None:
        """The root sends its tensor to the other W-1 ranks; the others send nothing."""
        if self.world_size > 1:
            w = self.world_size
            if src == self.rank:
                self._add((w - 1) * payload, (w - 1) * metadata)
            else:
                self._add(0, 0)

    def all_reduce(self, total_payload: int, total_metadata: int = 0) -> None:
        """Ring all-reduce: reduce-scatter then all-gather, each sending (W-1)/W of the data."""
        if self.world_size > 1:
            w = self.world_size
            self._add(2 * (w - 1) * total_payload // w, 2 * (w - 1) * total_metadata // w)

    def to_others(self, payload_chunks: Sequence[int], metadata_chunks: Sequence[int] = ()) -> None:
        """Reduce-scatter / all-to-all: chunk r goes to rank r; the own chunk stays local."""
        if self.world_size > 1:
            self._add(
                sum(n for r, n in enumerate(payload_chunks) if r != self.rank),
                sum(n for r, n in enumerate(metadata_chunks) if r != self.rank),
            )

    def freeze(self) -> WireBytes:
        return WireBytes(self.payload, self.metadata, self.header, self.collectives)


# --------------------------------------------------------------------------------------------
# Expert placement
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertPlacement:
    """Contiguous placement of ``num_experts`` experts on ``ep_size`` ranks.

    Rank ``r`` owns ``E // W + (r < E % W)`` experts starting at
    ``r * (E // W) + min(r, E % W)``: the first ``E % W`` ranks hold one extra expert.
    A rank may own no expert when ``E < W``.
    """

    num_experts: int
    ep_size: int

    def __post_init__(self) -> None:
        for name in ("num_experts", "ep_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def counts(self) -> tuple[int, ...]:
        """Number of experts per rank, ``[W]``."""
        base, extra = divmod(self.num_experts, self.ep_size)
        return tuple(base + (r < extra) for r in range(self.ep_size))

    @property
    def starts(self) -> tuple[int, ...]:
        """First global expert id of each rank, ``[W]``."""
        base, extra = divmod(self.num_experts, self.ep_size)
        return tuple(r * base + min(r, extra) for r in range(self.ep_size))

    @property
    def max_local(self) -> int:
        """The largest number of experts one rank owns (``ceil(E / W)``)."""
        return -(-self.num_experts // self.ep_size)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank must be in [0, {self.ep_size}), got {rank}")

    def num_local(self, rank: int) -> int:
        self._check_rank(rank)
        return self.counts[rank]

    def first(self, rank: int) -> int:
        self._check_rank(rank)
        return self.starts[rank]

    def local_range(self, rank: int) -> range:
        """Global ids of the experts ``rank`` owns."""
        return range(self.first(rank), self.first(rank) + self.num_local(rank))

    def owner_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[E] int64``: the rank owning each global expert."""
        counts = torch.tensor(self.counts, dtype=torch.int64)
        return torch.repeat_interleave(torch.arange(self.ep_size), counts).to(device)

    def owners(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Owner rank of each id (same shape, int64), -1 where the id is -1."""
        table = self.owner_table(topk_ids.device)
        ids = topk_ids.long()
        return torch.where(ids >= 0, table[ids.clamp(min=0)], torch.full_like(ids, -1))

    def to_local(self, topk_ids: torch.Tensor, rank: int) -> torch.Tensor:
        """Local expert index on ``rank`` (int64, same shape), -1 where another rank owns it."""
        ids = topk_ids.long()
        lo = self.first(rank)
        mine = (ids >= lo) & (ids < lo + self.num_local(rank))
        return torch.where(mine, ids - lo, torch.full_like(ids, -1))


def expert_placement(num_experts: int, ep_size: int) -> ExpertPlacement:
    """Return the contiguous placement of ``num_experts`` experts on ``ep_size`` ranks."""
    return ExpertPlacement(num_experts, ep_size)


# --------------------------------------------------------------------------------------------
# apply_experts
# --------------------------------------------------------------------------------------------

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def _call_expert(fn: ExpertFn, e: int, rows: torch.Tensor) -> torch.Tensor:
    out = fn(e, rows)
    if not isinstance(out, torch.Tensor) or out.shape != rows.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"expert function for local expert {e} must return a tensor of shape "
            f"{tuple(rows.shape)} (rows in, rows out), got {got}"
        )
    return out


def weighted_row_sum(
    values: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor | None,
    num_rows: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Weighted scatter-add of rows: ``out[rows[i]] += weights[i] * values[i]``.

    Args:
        values: ``[P, H]`` floating point.
        rows: ``[P] int64`` destination row of each value row, in ``[0, num_rows)``.
        weights: ``[P]`` floating point, or None for 1.
        num_rows: rows of the output.
        out_dtype: dtype of the result.

    Returns:
        ``[num_rows, H]`` in ``out_dtype``, summed in float32 and rounded once (rows that
        receive nothing are 0).

    On CPU, when the native library of :mod:`moe_ep.distributed.shm` is built and ``values``
    already has ``out_dtype``, one pass of its segment-sum kernel (about 7x faster than the
    sparse product on one core). Otherwise a sparse ``[num_rows, P]`` matrix times ``values``:
    one fused pass, about three times faster on CPU than a multiply followed by ``index_add_``.
    """
    native = _native_segment_sum(values, out_dtype)
    if native is not None:
        order = torch.argsort(rows, stable=True)
        offsets = torch.zeros(num_rows + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(rows, minlength=num_rows), 0, out=offsets[1:])
        w = None if weights is None else weights.index_select(0, order).float().contiguous()
        return native(values.contiguous(), order, offsets, w)
    n = rows.numel()
    if weights is None:
        weights = torch.ones(n, dtype=torch.float32, device=values.device)
    selector = torch.sparse_coo_tensor(
        torch.stack([rows, torch.arange(n, device=rows.device)]),
        weights.to(torch.float32),
        (num_rows, n),
        check_invariants=False,
    )
    return torch.sparse.mm(selector, values.to(torch.float32)).to(out_dtype)


def _native_segment_sum(values: torch.Tensor, out_dtype: torch.dtype):
    """The native CPU segment-sum kernel when it applies to ``values``, else None."""
    if values.device.type != "cpu" or values.dtype != out_dtype or values.dim() != 2:
        return None
    if values.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return _native_kernel()


@functools.lru_cache(maxsize=1)
def _native_kernel():
    """``moe_ep.distributed.shm.segment_sum`` if the native library loads, else None.

    Cached: ``find_spec`` costs ~0.2 ms, and this sits on every combine's path.
    """
    if importlib.util.find_spec("moe_ep.distributed.shm") is None:
        return None
    from moe_ep.distributed.shm import ShmCommunicator, segment_sum

    return segment_sum if ShmCommunicator.available()[0] else None


def apply_experts(result: DispatchResult, fn: ExpertFn) -> torch.Tensor:
    """Turn a per-expert function into the expert output ``combine`` expects, for any layout.

    Args:
        result: a :class:`DispatchResult`.
        fn: ``fn(e, rows) -> out``: ``e`` the local expert index in ``[0, E_local)``, ``rows``
            ``[n, H]`` in the dtype of ``result.x``, ``out`` ``[n, H]``. Called only for experts
            that received at least one row.

    Returns:
        TOKEN: ``[M, H]`` with row m = sum over k with ``topk_ids[m, k] >= 0`` of
        ``topk_weights[m, k] * fn(topk_ids[m, k], x[m])`` (summed in float32). EXPERT_PACKED:
        ``[R, H]`` with each segment replaced by ``fn(e, segment)``. EXPERT_PADDED:
        ``[E_local, C, H]`` with the valid rows replaced and the padding zero. Always the dtype
        of ``result.x``.
    """
    if not isinstance(result, DispatchResult):
        raise TypeError(f"result must be a DispatchResult, got {type(result).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(local_expert, rows), got {type(fn).__name__}")
    x = result.x
    counts = [int(c) for c in result.tokens_per_expert.tolist()]
    if result.layout is Layout.TOKEN:
        ids, weights = result.topk_ids, result.topk_weights
        if ids is None or weights is None:
            raise ValueError("a TOKEN-layout result needs topk_ids and topk_weights")
        valid = ids >= 0
        rows_all = torch.arange(ids.shape[0], device=x.device).unsqueeze(1).expand_as(ids)
        pair_rows, pair_e, pair_w = rows_all[valid], ids[valid], weights[valid].float()
        order = torch.argsort(pair_e, stable=True)
        pair_rows, pair_w = pair_rows[order], pair_w[order]
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = x.index_select(0, pair_rows[start : start + n])
                outs.append(_call_expert(fn, e, rows))
            start += n
        if not outs:
            return torch.zeros_like(x)
        return weighted_row_sum(torch.cat(outs), pair_rows, pair_w, x.shape[0], x.dtype)
    if result.layout is Layout.EXPERT_PACKED:
        if sum(counts) != x.shape[0]:
            raise ValueError(
                f"tokens_per_expert sums to {sum(counts)} but result.x has {x.shape[0]} rows"
            )
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                out[start : start + n] = _call_expert(fn, e, x[start : start + n])
            start += n
        return out
    if result.layout is Layout.EXPERT_PADDED:
        out = torch.zeros_like(x)
        for e, n in enumerate(counts):
            if n:
                out[e, :n] = _call_expert(fn, e, x[e, :n])
        return out
    raise ValueError(f"unknown layout {result.layout!r}")


# --------------------------------------------------------------------------------------------
# Input checks and the header exchange
# --------------------------------------------------------------------------------------------

# Stable codes for the dtype field of the header (torch has no stable integer dtype ids).
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
}
for _i, _name in enumerate(("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")):
    if hasattr(torch, _name):
        _DTYPE_CODES[getattr(torch, _name)] = 5 + _i
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}

_ERR_NONE, _ERR_TYPE, _ERR_VALUE, _ERR_OTHER = 0, 1, 2, 3
_ERR_NAMES = {_ERR_TYPE: "TypeError", _ERR_VALUE: "ValueError", _ERR_OTHER: "error"}
# Header layout: fixed fields, then the manager's extra ints.
_F_TOKENS, _F_HIDDEN, _F_DTYPE, _F_TOPK, _F_EXPERTS, _F_ERROR = range(6)
_NUM_FIXED = 6


@dataclass(frozen=True, eq=False)
class CheckedDispatchInputs:
    """Dispatch inputs that passed the local check.

    Attributes:
        x: ``[N, H]`` contiguous, the caller's floating dtype.
        topk_weights: ``[N, K] float32`` contiguous.
        topk_ids: ``[N, K] int64`` contiguous, values in ``[-1, E)``, distinct per row
            apart from -1.
        num_experts: E.
    """

    x: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    num_experts: int

    @property
    def num_tokens(self) -> int:
        return int(self.x.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.x.shape[1])

    @property
    def topk(self) -> int:
        return int(self.topk_ids.shape[1])


@dataclass(frozen=True)
class PeerHeaders:
    """Every rank's header, after the all-gather.

    Attributes:
        tokens_per_rank: ``[W]`` number of tokens each rank dispatches.
        extra: ``[W][n_extra]`` the manager-specific ints each rank sent.
    """

    tokens_per_rank: tuple[int, ...]
    extra: tuple[tuple[int, ...], ...]


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return type(t).__name__


def _check_device(name: str, t: torch.Tensor, device: torch.device | None) -> None:
    if device is None:
        return
    dev = torch.device(device)
    if t.device.type != dev.type or (dev.index is not None and t.device.index != dev.index):
        raise ValueError(f"{name} must be on the group's device {dev}, got {t.device}")


def check_dispatch_inputs(
    x: object,
    topk_weights: object,
    topk_ids: object,
    num_experts: object,
    *,
    device: torch.device | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
) -> CheckedDispatchInputs:
    """Check one rank's dispatch inputs; return contiguous, normalised copies (no communication).

    Args:
        x: ``[N, H]`` floating point (N may be 0). Non-contiguous input is made contiguous.
        topk_weights: ``[N, K]`` floating point router weights (any value where the id is -1).
        topk_ids: ``[N, K]`` integer expert ids in ``[0, num_experts)`` or -1 for none; the
            ids of one token must be distinct apart from -1 (as routers produce).
        num_experts: E >= 1, the global number of experts.
        device: the group's device; every tensor must be on it.
        dtypes: the activation dtypes the caller supports (default: every dtype the header
            can carry).

    Raises:
        TypeError: a non-tensor, a non-floating ``x`` / ``topk_weights``, non-integer ids, a
            non-int ``num_experts``.
        ValueError: a wrong rank or shape, a shape mismatch between the three tensors, an id
            outside ``[-1, num_experts)``, a repeated id within a token, the wrong device.
    """
    for name, t in (("x", x), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if not 1 <= num_experts <= _INT32_MAX:
        raise ValueError(f"num_experts must be in [1, {_INT32_MAX}], got {num_experts}")
    if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (x, topk_weights)
    ):
        raise ValueError(
            "dispatch is not differentiable (moe_ep is inference-only for now): x and "
            "topk_weights require grad; call it under torch.no_grad() or torch.inference_mode()"
        )
    if x.dim() != 2:
        raise ValueError(f"x must be [num_tokens, hidden], got {_describe(x)}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating dtype, got {x.dtype}")
    allowed = tuple(dtypes) if dtypes is not None else tuple(_DTYPE_CODES)
    if x.dtype not in allowed or x.dtype not in _DTYPE_CODES:
        raise TypeError(f"x dtype {x.dtype} is not supported; use one of {list(allowed)}")
    if x.shape[1] < 1:
        raise ValueError(f"x must have hidden size >= 1, got {_describe(x)}")
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise TypeError(
            f"topk_ids must be an integer tensor (int32 or int64), got dtype {topk_ids.dtype}"
        )
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must have a floating dtype, got {topk_weights.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [num_tokens, topk], got {_describe(topk_ids)}")
    if topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have topk >= 1 columns, got {_describe(topk_ids)}")
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_ids has {topk_ids.shape[0]} rows but x has {x.shape[0]} tokens; "
            "both must be [num_tokens, ...]"
        )
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_weights.shape)}"
        )
    for name, t in (("x", x), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        _check_device(name, t, device)
    if x.shape[0] > _INT32_MAX or x.shape[1] > _INT32_MAX:
        raise ValueError(f"x is too large for the int32 header: {_describe(x)}")

    ids = topk_ids.long().contiguous()
    if ids.numel():
        # One host sync for all three value checks.
        sorted_ids = ids.sort(dim=1).values
        repeated = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)
        lo, hi, n_rep = torch.stack([ids.min(), ids.max(), repeated.sum()]).tolist()
        if lo < -1 or hi >= num_experts:
            bad = ids[(ids < -1) | (ids >= num_experts)][0].item()
            where = ((ids == bad).nonzero()[0]).tolist()
            raise ValueError(
                f"topk_ids must be in [-1, num_experts={num_experts}) (-1 = no expert), "
                f"got {bad} at position {tuple(where)}"
            )
        if n_rep:
            token = int(repeated.any(dim=1).nonzero()[0].item())
            raise ValueError(
                f"topk_ids routes token {token} to the same expert twice "
                f"({ids[token].tolist()}); the ids of one token must be distinct (pad with -1)"
            )
    return CheckedDispatchInputs(
        x=x.contiguous(),
        topk_weights=topk_weights.float().contiguous(),
        topk_ids=ids,
        num_experts=num_experts,
    )


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoOptions:
    """Options of a manager that takes none."""


def check_option_type(name: str, value: object, types: tuple[type, ...]) -> None:
    """Raise TypeError unless ``value`` is one of ``types`` (bool is not accepted as int)."""
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        wanted = " or ".join(t.__name__ for t in types)
        raise TypeError(f"option {name!r} must be {wanted}, got {value!r}")


# --------------------------------------------------------------------------------------------
# The ABC
# --------------------------------------------------------------------------------------------


class All2AllManager(ABC):
    """Dispatch tokens to the ranks owning their experts and combine the expert outputs back.

    Subclasses set ``name`` (the registry name), ``layout``, ``options_cls`` (a frozen
    dataclass of the options they accept) and implement ``availability``, ``dispatch`` and
    ``combine``. Build them through :func:`moe_ep.managers.registry.build_manager`.

    Args:
        group: the expert-parallel ``GroupCoordinator``; every rank of it must build the
            manager and call ``dispatch`` / ``combine`` in the same order.
        **options: backend options; an unknown option raises TypeError listing the allowed ones.

    Attributes:
        group, rank (rank in the group), world_size, options (the frozen options dataclass),
        last_dispatch_bytes / last_combine_bytes (:class:`WireBytes` of the latest call).
    """

    name: ClassVar[str] = ""
    layout: ClassVar[Layout]
    options_cls: ClassVar[type] = NoOptions
    #: activation dtypes ``dispatch`` accepts (unquantised by default).
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
    )

    def __init__(self, group: GroupCoordinator, **options: Any) -> None:
        self.options = self._make_options(options)
        for attr in ("world_size", "rank_in_group", "cpu_group", "device"):
            if not hasattr(group, attr):
                raise TypeError(
                    f"group must be a GroupCoordinator (missing attribute {attr!r}), "
                    f"got {type(group).__name__}"
                )
        self.group = group
        self.rank: int = group.rank_in_group
        self.world_size: int = group.world_size
        self._cache = HandleCache()
        self._destroyed = False
        self.last_dispatch_bytes = WireBytes()
        self.last_combine_bytes = WireBytes()

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

    # ---- availability ------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def availability(cls, topology: Topology) -> tuple[bool, str]:
        """Whether this backend can run on ``topology``, with the reason (pure, no collective)."""

    @classmethod
    def wire_bytes_per_token(
        cls,
        *,
        world_size: int,
        hidden: int,
        elem_size: int,
        topk: int,
        num_experts: int,
        **options: Any,
    ) -> float | None:
        """Expected bytes per token (dispatch + combine, one rank) for uniform random routing.

        ``options`` are the manager's options (some change the algorithm). None when the
        backend gives no model. The per-call header is not included.
        """
        return None

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError(f"manager {self.name!r} was destroyed; build a new one")

    def get_handle(self, **kwargs: Any) -> Any:
        """Return the backend buffers for one layer shape, created once per distinct kwargs.

        kwargs are hashable shape parameters (``hidden``, ``max_tokens_per_rank``, ``dtype``,
        ...); the handle is cached in a :class:`HandleCache` and freed by :meth:`destroy`.
        """
        self._check_alive()
        return self._cache.get_or_create(kwargs, self._create_handle)

    def _create_handle(self, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"manager {self.name!r} keeps no per-shape buffers, so it has no handles"
        )

    def destroy(self) -> None:
        """Free every cached handle. Idempotent; the manager cannot be used afterwards."""
        if self._destroyed:
            return
        self._destroyed = True
        self._cache.clear()

    # ---- the contract ------------------------------------------------------------------------

    @abstractmethod
    def dispatch(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        num_experts: int,
    ) -> DispatchResult:
        """Send each token to the ranks owning its experts (collective over the group).

        Args:
            x: ``[N, H]`` activations (fp32 / bf16 / fp16 / fp64); N may be 0 and differ
                between ranks, H and the dtype must agree.
            topk_weights: ``[N, K]`` float router weights.
            topk_ids: ``[N, K]`` int32/int64 global expert ids, -1 = none; distinct per token.
            num_experts: E, the global number of experts, equal on every rank.
        """

    @abstractmethod
    def combine(self, expert_out: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        """Bring the expert outputs back: ``[N, H]`` in the order and dtype of the input x.

        Args:
            expert_out: the expert output for ``result`` in its layout (see :class:`Layout`),
                e.g. ``apply_experts(result, fn)``.
            result: what ``dispatch`` returned on this rank.
        """

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
    def last_bytes_sent(self) -> int:
        """Bytes this rank sent in its latest dispatch plus its latest combine."""
        return self.last_dispatch_bytes.total + self.last_combine_bytes.total

    # ---- helpers for subclasses ----------------------------------------------------------------

    @property
    def group_name(self) -> str:
        return str(getattr(self.group, "name", "?"))

    def _new_counter(self) -> WireCounter:
        return WireCounter(self.world_size, self.rank)

    def _combine_checks(
        self, expert_out: object, result: object, handle_cls: type, rows_of: Callable[[Any], int],
        meaning: str,
    ) -> Any:
        """The local check every ``combine`` starts with; returns ``result.handle``.

        ``result`` must carry a ``handle_cls`` handle from this manager's dispatch and
        ``expert_out`` must be floating ``[rows_of(handle), hidden]``; ``meaning`` says what a
        row is, for the message.
        """
        self._check_alive()
        handle = getattr(result, "handle", None)
        if not isinstance(handle, handle_cls):
            raise TypeError(
                f"result must come from this manager's dispatch, got {type(result).__name__}"
            )
        rows = rows_of(handle)
        if not isinstance(expert_out, torch.Tensor) or tuple(expert_out.shape) != (
            rows,
            handle.hidden,
        ):
            raise ValueError(
                f"expert_out must be [{rows}, {handle.hidden}] ({meaning}), "
                f"got {_describe(expert_out)}"
            )
        if not expert_out.is_floating_point():
            raise TypeError(f"expert_out must have a floating dtype, got {expert_out.dtype}")
        return handle

    def _exchange_header(
        self,
        op: str,
        fields: Sequence[int],
        error: BaseException | None,
        extra: Sequence[int],
        counter: WireCounter,
        labels: Mapping[int, str] | None = None,
    ) -> PeerHeaders:
        """All-gather one int32 header per rank and raise together on any bad input.

        Args:
            op: the operation name for messages ("dispatch").
            fields: the 5 fixed fields (tokens, hidden, dtype code, topk, num_experts); any
                value when ``error`` is set.
            error: the local check's exception, or None.
            extra: manager-specific ints (same count on every rank); zeros when ``error``.
            counter: where the header's bytes are recorded.
            labels: names of the fixed fields for the consistency messages.
        """
        code = _ERR_NONE
        if error is not None:
            if isinstance(error, TypeError):
                code = _ERR_TYPE
            elif isinstance(error, ValueError):
                code = _ERR_VALUE
            else:
                code = _ERR_OTHER
            fields = [-1] * (_NUM_FIXED - 1)
            extra = [0] * len(extra)
        values = [*fields, code, *extra]
        if any(not -_INT32_MAX <= v <= _INT32_MAX for v in values):
            raise ValueError(f"{op} header value out of int32 range: {values}")
        header = torch.tensor([values], dtype=torch.int32)
        if self.world_size > 1:
            # The header stays a CPU tensor, so it travels on the CPU side of the group (gloo
            # or shared memory) even for a CUDA group: its values are needed on the host anyway
            # (split sizes), and a device collective would add a device->host copy.
            rows = self.group.all_gather(header, dim=0).tolist()
            counter.header_all_gather(header.numel() * header.element_size())
        else:
            rows = [values]
        if error is not None:
            raise error
        bad = tuple(r for r, row in enumerate(rows) if row[_F_ERROR] != _ERR_NONE)
        if bad:
            kinds = ", ".join(
                f"rank {r}: {_ERR_NAMES.get(rows[r][_F_ERROR], 'error')}" for r in bad
            )
            raise RemoteInputError(
                f"{op} on group {self.group_name!r} aborted on rank {self.rank}: rank(s) "
                f"{', '.join(map(str, bad))} passed invalid input ({kinds}); the detailed error "
                "is raised on that rank",
                bad,
            )
        names = {
            _F_HIDDEN: "hidden size (x.shape[1])",
            _F_DTYPE: "x dtype",
            _F_TOPK: "topk (topk_ids.shape[1])",
            _F_EXPERTS: "num_experts",
        }
        names.update(labels or {})
        for field, what in names.items():
            column = [row[field] for row in rows]
            if len(set(column)) > 1:
                if field == _F_DTYPE:
                    shown = [str(_CODE_DTYPES.get(v, v)) for v in column]
                else:
                    shown = [str(v) for v in column]
                per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
                raise ValueError(
                    f"{op} on group {self.group_name!r}: {what} differs across ranks "
                    f"({per_rank}); every rank must pass the same"
                )
        return PeerHeaders(
            tokens_per_rank=tuple(row[_F_TOKENS] for row in rows),
            extra=tuple(tuple(row[_NUM_FIXED:]) for row in rows),
        )

    def header_extra_ints(self) -> int:
        """Backend-specific ints this manager adds to every dispatch header (0 by default)."""
        return 0

    def abort_dispatch(self, error: Exception) -> NoReturn:
        """Fail a dispatch on every rank: raise ``error`` here, :class:`RemoteInputError` there.

        For callers whose own check fails before they can call ``dispatch`` (a layer handed a
        tensor of the wrong hidden size): the peers, already waiting in ``dispatch``, learn of
        the failure through the same header exchange instead of hanging.
        """
        self._check_alive()
        self._exchange_header(
            "dispatch", [-1] * (_NUM_FIXED - 1), error, [0] * self.header_extra_ints(),
            self._new_counter(),
        )
        raise error  # unreachable: the exchange raised it

    def _checked_dispatch(
        self,
        x: object,
        topk_weights: object,
        topk_ids: object,
        num_experts: object,
        counter: WireCounter,
        *,
        num_extra: int = 0,
        plan: Callable[[CheckedDispatchInputs], tuple[Sequence[int], Any]] | None = None,
    ) -> tuple[CheckedDispatchInputs, PeerHeaders, Any]:
        """Local check, optional local planning, then the collective header exchange.

        ``plan(checked) -> (extra_ints, plan_object)`` runs only when the local check passed;
        an exception it raises counts as bad input of this rank (re-raised here, while the
        other ranks raise :class:`RemoteInputError`). Returns the checked
        inputs, every rank's header and the plan object.
        """
        self._check_alive()
        error: BaseException | None = None
        checked: CheckedDispatchInputs | None = None
        planned: Any = None
        fields: list[int] = [-1] * (_NUM_FIXED - 1)
        extra: Sequence[int] = [0] * num_extra
        try:
            checked = check_dispatch_inputs(
                x,
                topk_weights,
                topk_ids,
                num_experts,
                device=self.group.device,
                dtypes=self.supported_dtypes,
            )
            fields = [
                checked.num_tokens,
                checked.hidden,
                _DTYPE_CODES[checked.x.dtype],
                checked.topk,
                checked.num_experts,
            ]
            if plan is not None:
                extra, planned = plan(checked)
                if len(extra) != num_extra:
                    raise RuntimeError(
                        f"{type(self).__name__} planned {len(extra)} header ints, "
                        f"declared {num_extra}"
                    )
        except Exception as exc:  # noqa: BLE001 - see below
            # Any local failure (even a bug in ``plan``) is reported through the header so
            # the other ranks raise instead of waiting in the next collective.
            error = exc
        headers = self._exchange_header("dispatch", fields, error, extra, counter)
        if checked is None:  # unreachable: _exchange_header raised ``error``
            raise RuntimeError("dispatch input check produced no result")
        return checked, headers, planned


# --------------------------------------------------------------------------------------------
# Placeholders for backends that cannot run here
# --------------------------------------------------------------------------------------------


class VendorBackendPlaceholder(All2AllManager):
    """A registered backend whose adapter cannot run in this build or on this machine.

    ``availability`` reports the true reasons (package not installed, no CUDA, adapter not
    implemented); constructing one raises :class:`ManagerUnavailableError`. There is no
    fallback implementation behind the name.
    """

    layout: ClassVar[Layout] = Layout.TOKEN
    #: importable top-level module of the vendor package (checked without importing it).
    vendor_module: ClassVar[str] = ""
    #: how to get the package, for the message.
    install_hint: ClassVar[str] = ""

    @classmethod
    def _reasons(cls, device_type: str) -> list[str]:
        reasons = []
        if cls.vendor_module and importlib.util.find_spec(cls.vendor_module) is None:
            hint = f" ({cls.install_hint})" if cls.install_hint else ""
            reasons.append(f"{cls.vendor_module} is not installed{hint}")
        if device_type != "cuda":
            reasons.append(f"needs CUDA devices (this topology's device is {device_type!r})")
        reasons.append("the moe_ep adapter for this backend is not implemented yet")
        return reasons

    @classmethod
    def availability(cls, topology: Topology) -> tuple[bool, str]:
        return False, "; ".join(cls._reasons(str(topology.device)))

    def __init__(self, group: GroupCoordinator, **options: Any) -> None:
        device = getattr(group, "device", None)
        device_type = torch.device(device).type if device is not None else "unknown"
        raise ManagerUnavailableError(
            f"manager {self.name!r} is unavailable: {'; '.join(self._reasons(device_type))}"
        )

    def dispatch(self, x, topk_weights, topk_ids, *, num_experts):  # pragma: no cover
        raise ManagerUnavailableError(f"manager {self.name!r} is unavailable")

    def combine(self, expert_out, result):  # pragma: no cover
        raise ManagerUnavailableError(f"manager {self.name!r} is unavailable")
