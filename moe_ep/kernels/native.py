"""The one loader of `moe_ep._kernels_native` (csrc/cpu/kernels) and its Python wrappers.

Inputs are checked here (device, dtype, contiguity, shapes) with messages naming the argument;
index values are checked by the C code, which returns a negative code and the offending
position instead of reading out of bounds (raised as `KernelError`, a ValueError). Outputs are
new tensors unless `out=` buffers are given (the managers reuse per-handle buffers so that the
hot path allocates nothing).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

import torch

from moe_ep.native_library import load_library

__all__ = [
    "DispatchPlan",
    "DispatchPlanner",
    "ExpertCounter",
    "KernelError",
    "PackedLayout",
    "available",
    "count_experts",
    "gather_rows",
    "gather_sum",
    "packed_layout",
    "plan_dispatch",
    "segment_sum",
]

_ABI = 4
_OK, _ERR_RANGE, _ERR_REPEAT, _ERR_BOUNDS, _ERR_DTYPE, _ERR_NOMEM = 0, -1, -2, -3, -4, -5
#: dtype codes of csrc/cpu/dtype.h
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


class KernelError(ValueError):
    """A native kernel refused its input (an index out of bounds, an id out of range).

    Attributes:
        code: the C return code; position: the offending flat position(s).
    """

    def __init__(self, message: str, code: int, position: tuple[int, ...]) -> None:
        super().__init__(message)
        self.code = code
        self.position = position


class _PlanArgs(ctypes.Structure):
    """`moe_plan_args` (csrc/cpu/kernels/moe_kernels.h)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("ids", "weights")] + [
        (name, ctypes.c_int64) for name in ("n", "k")] + [
        (name, ctypes.c_void_p) for name in ("owner", "local")] + [
        (name, ctypes.c_int64) for name in ("num_experts", "world")] + [
        (name, ctypes.c_void_p) for name in ("send_counts", "send_token", "row_ids",
                                             "row_weights", "token_rows", "bad")]


class _GatherArgs(ctypes.Structure):
    """`moe_gather_args` (csrc/cpu/kernels/moe_kernels.h)."""

    _fields_ = [("dtype", ctypes.c_int64), ("out", ctypes.c_void_p), ("n", ctypes.c_uint64),
                ("nsrc", ctypes.c_int64), ("bases", ctypes.c_void_p),
                ("src_rows", ctypes.c_void_p), ("rows", ctypes.c_void_p),
                ("hidden", ctypes.c_uint64), ("bad", ctypes.c_void_p)]


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    vp, u64, i64, i32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int
    return load_library("moe_ep._kernels_native", {
        "moe_kernels_abi": (ctypes.c_uint32, []),
        "moe_plan_dispatch": (i32, [vp]),
        "moe_packed_layout": (i32, [vp, vp, i64, i64, i64, vp, vp, vp, vp, vp, vp, vp, vp, vp]),
        "moe_count_experts": (i32, [vp, i64, i64, i64, vp, vp]),
        "moe_segment_sum": (i32, [i32, vp, u64, u64, vp, vp, u64, vp, vp, u64, u64, vp]),
        "moe_gather_sum": (i32, [vp]),
        "moe_gather_rows": (i32, [vp, vp, vp, u64, u64, u64, vp]),
        "moe_linear_nt": (i32, [vp, vp, vp, u64, u64, u64]),
        "moe_linear_nt_bf16": (i32, [vp, vp, vp, u64, u64, u64]),
    }, not_built=(
        "the native kernels moe_ep._kernels_native are not built (no C compiler at install "
        "time?); reinstall with `pip install -e .`"
    ), abi=("moe_kernels_abi", _ABI))


def available() -> tuple[bool, str]:
    """(True, "") when the kernels load here, else (False, why)."""
    lib, reason = _load()
    return lib is not None, reason


def _lib() -> ctypes.CDLL:
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(reason)
    return lib


def _check(t: object, name: str, dtype: torch.dtype, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cpu or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CPU tensor (device {t.device})")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def _float_code(t: torch.Tensor, name: str) -> int:
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be float32 / bfloat16 / float16 / float64, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def _bounds_error(what: str, bad: torch.Tensor) -> KernelError:
    pos = int(bad[0])
    return KernelError(f"{what}: index at position {pos} is out of bounds", _ERR_BOUNDS, (pos,))


# ------------------------------------------------------------------------------ routing
@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """Where each token goes (see `plan_dispatch`). S = rows sent in all.

    Attributes:
        send_counts: `[W] int64` rows for each destination.
        send_token: `[S] int64` token of each row, destination-major, tokens ascending.
        row_ids: `[S, K] int64` local expert of slot k on the row's destination, -1 elsewhere.
        row_weights: `[S, K] float32` router weights, 0 where row_ids is -1.
        token_rows: `[N, W] int64` row of token n inside destination d's chunk, -1 when none.
    """

    send_counts: torch.Tensor
    send_token: torch.Tensor
    row_ids: torch.Tensor
    row_weights: torch.Tensor
    token_rows: torch.Tensor


class DispatchPlanner:
    """`moe_plan_dispatch` into preallocated buffers, for up to `capacity` tokens per call.

    Args:
        owner, local: `[E] int64` owner rank and local index of every expert (the placement).
        world: W, the ranks of the group; topk: K; capacity: the largest N planned.
    The buffers are overwritten by every `plan`; the managers keep one planner per live result.
    """

    def __init__(self, owner: torch.Tensor, local: torch.Tensor, world: int, topk: int,
                 capacity: int):
        self._lib = _lib()
        self.owner = _check(owner, "owner", torch.int64, 1).clone()
        self.local = _check(local, "local", torch.int64, 1).clone()
        self.num_experts = int(owner.numel())
        self.world = int(world)
        self.topk, self.capacity = int(topk), int(capacity)
        rows = max(1, self.capacity * min(self.topk, self.world))
        self.send_counts = torch.zeros(self.world, dtype=torch.int64)
        self.send_token = torch.empty(rows, dtype=torch.int64)
        self.row_ids = torch.empty(rows, self.topk, dtype=torch.int64)
        self.row_weights = torch.empty(rows, self.topk, dtype=torch.float32)
        self.token_rows = torch.empty(max(1, self.capacity), self.world, dtype=torch.int64)
        self._bad = torch.zeros(2, dtype=torch.int64)
        # Addresses of the plan buffers, for the transport's dispatch (they never move).
        self.send_counts_ptr = self.send_counts.data_ptr()
        self.send_token_ptr = self.send_token.data_ptr()
        self.row_ids_ptr = self.row_ids.data_ptr()
        self.row_weights_ptr = self.row_weights.data_ptr()
        self.token_rows_ptr = self.token_rows.data_ptr()
        # The call arguments, set once: a call only sets the inputs (see moe_plan_args).
        self._plan_args = _PlanArgs(
            k=self.topk, owner=self.owner.data_ptr(), local=self.local.data_ptr(),
            num_experts=self.num_experts, world=self.world, send_counts=self.send_counts_ptr,
            send_token=self.send_token_ptr, row_ids=self.row_ids_ptr,
            row_weights=self.row_weights_ptr, token_rows=self.token_rows_ptr,
            bad=self._bad.data_ptr())
        self._sum_args = _GatherArgs(
            nsrc=self.world, src_rows=self.send_counts_ptr, rows=self.token_rows_ptr,
            bad=self._bad.data_ptr())
        self._plan_ref = ctypes.byref(self._plan_args)
        self._sum_ref = ctypes.byref(self._sum_args)

    def plan(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Plan `topk_ids [N, K] int64` / `topk_weights [N, K] float32` (contiguous CPU,
        N <= capacity; the caller has checked shapes). Raises ValueError for an id outside
        [-1, E) or a token routed to one expert twice."""
        a = self._plan_args
        a.ids, a.weights, a.n = topk_ids.data_ptr(), topk_weights.data_ptr(), topk_ids.shape[0]
        rc = self._lib.moe_plan_dispatch(self._plan_ref)
        if rc:
            raise self._routing_error(rc, topk_ids)

    def _routing_error(self, rc: int, ids: torch.Tensor) -> ValueError:
        # The caller's input is at fault: a plain ValueError naming the argument, as the
        # torch checks raise it.
        t, k = (int(v) for v in self._bad.tolist())
        if rc == _ERR_RANGE:
            return ValueError(
                f"topk_ids must be in [-1, num_experts={self.num_experts}) (-1 = no expert), "
                f"got {int(ids[t, k])} at position ({t}, {k})")
        if rc == _ERR_REPEAT:
            return ValueError(
                f"topk_ids routes token {t} to the same expert twice ({ids[t].tolist()}); the "
                "ids of one token must be distinct (pad with -1)")
        return KernelError(f"moe_plan_dispatch failed with code {rc}", rc, (t, k))

    def sum_back(self, out: torch.Tensor, bases, hidden: int) -> torch.Tensor:
        """The combine's last step for the last plan: `out [N, H]` (contiguous CPU) = for each
        token, the sum of its rows at each destination d, read from `bases[d]` (a ctypes array
        of W addresses: the first of the rows this rank sent to d, as returned there, i.e.
        `send_counts[d]` rows of `hidden` elements of out's dtype)."""
        a = self._sum_args
        a.dtype, a.out, a.n = DTYPE_CODES[out.dtype], out.data_ptr(), out.shape[0]
        a.bases, a.hidden = ctypes.addressof(bases), hidden
        if self._lib.moe_gather_sum(self._sum_ref):
            raise _bounds_error("sum_back: token rows", self._bad)
        return out

    def result(self, n: int) -> DispatchPlan:
        """The last plan (of `n` tokens) as views of the buffers sliced to their sizes: valid
        until the next `plan`."""
        s = int(self.send_counts.sum())
        return DispatchPlan(
            send_counts=self.send_counts,
            send_token=self.send_token[:s],
            row_ids=self.row_ids[:s],
            row_weights=self.row_weights[:s],
            token_rows=self.token_rows[:n],
        )


def plan_dispatch(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, owner: torch.Tensor, local: torch.Tensor,
    world: int,
) -> DispatchPlan:
    """Plan one dispatch: `topk_ids [N, K] int64` (-1 = none), `topk_weights [N, K] float32`,
    `owner` / `local` `[E] int64` (the placement on `world` ranks). See `DispatchPlan`."""
    _check(topk_ids, "topk_ids", torch.int64, 2)
    _check(topk_weights, "topk_weights", torch.float32, 2)
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must match topk_ids "
                         f"{tuple(topk_ids.shape)}")
    # A planner of its own, sized for this call: the plan is its buffers, nothing is copied.
    planner = DispatchPlanner(owner, local, world, topk_ids.shape[1], topk_ids.shape[0])
    planner.plan(topk_ids, topk_weights)
    return planner.result(topk_ids.shape[0])


@dataclass(frozen=True, eq=False)
class PackedLayout:
    """TOKEN rows regrouped by local expert (see `packed_layout`). R = valid (row, slot) pairs.

    Attributes:
        tokens_per_expert: `[E_local] int64`.
        packed_row, packed_local: `[R] int64` source row and local expert of each packed row
            (grouped by expert, rows ascending within one); packed_weight: `[R] float32`.
        row_offsets: `[M + 1] int64`, row_order: `[R] int64`, row_weight: `[R] float32`: CSR by
            row of the packed positions (the combine's weighted partial sum per row).
    """

    tokens_per_expert: torch.Tensor
    packed_row: torch.Tensor
    packed_local: torch.Tensor
    packed_weight: torch.Tensor
    row_offsets: torch.Tensor
    row_order: torch.Tensor
    row_weight: torch.Tensor


def packed_layout(row_ids: torch.Tensor, row_weights: torch.Tensor, num_local: int) -> PackedLayout:
    """EXPERT_PACKED order of TOKEN rows: `row_ids [M, K] int64` (local ids, -1 = not here),
    `row_weights [M, K] float32`, `num_local` experts on this rank."""
    _check(row_ids, "row_ids", torch.int64, 2)
    _check(row_weights, "row_weights", torch.float32, 2)
    m, k = row_ids.shape
    cap = m * k
    out = PackedLayout(
        tokens_per_expert=torch.empty(num_local, dtype=torch.int64),
        packed_row=torch.empty(cap, dtype=torch.int64),
        packed_local=torch.empty(cap, dtype=torch.int64),
        packed_weight=torch.empty(cap, dtype=torch.float32),
        row_offsets=torch.empty(m + 1, dtype=torch.int64),
        row_order=torch.empty(cap, dtype=torch.int64),
        row_weight=torch.empty(cap, dtype=torch.float32),
    )
    pairs = torch.zeros(1, dtype=torch.int64)
    bad = torch.zeros(1, dtype=torch.int64)
    rc = _lib().moe_packed_layout(
        row_ids.data_ptr(), row_weights.data_ptr(), m, k, num_local,
        out.tokens_per_expert.data_ptr(), out.packed_row.data_ptr(), out.packed_local.data_ptr(),
        out.packed_weight.data_ptr(), out.row_offsets.data_ptr(), out.row_order.data_ptr(),
        out.row_weight.data_ptr(), pairs.data_ptr(), bad.data_ptr(),
    )
    if rc == _ERR_NOMEM:
        raise MemoryError("moe_packed_layout: out of memory")
    if rc:
        raise _bounds_error(f"row_ids must hold local ids in [-1, {num_local})", bad)
    r = int(pairs)
    return PackedLayout(
        out.tokens_per_expert, out.packed_row[:r], out.packed_local[:r], out.packed_weight[:r],
        out.row_offsets, out.row_order[:r], out.row_weight[:r],
    )


class ExpertCounter:
    """Tokens per local expert of received TOKEN rows, into one reused `[num_local] int64`."""

    def __init__(self, num_local: int) -> None:
        self._lib = _lib()
        self.num_local = int(num_local)
        self.out = torch.zeros(self.num_local, dtype=torch.int64)
        self._bad = torch.zeros(1, dtype=torch.int64)

    def count(self, row_ids: torch.Tensor) -> torch.Tensor:
        """`out[e]` = slots of `row_ids [M, K] int64` (contiguous CPU) naming local expert e;
        raises KernelError for an id outside [-1, num_local)."""
        m, k = row_ids.shape
        if self._lib.moe_count_experts(row_ids.data_ptr(), m, k, self.num_local,
                                       self.out.data_ptr(), self._bad.data_ptr()):
            raise _bounds_error(f"row_ids must hold local ids in [-1, {self.num_local})",
                                self._bad)
        return self.out


def count_experts(row_ids: torch.Tensor, num_local: int) -> torch.Tensor:
    """`[num_local] int64` number of slots of `row_ids [M, K] int64` naming each local expert."""
    _check(row_ids, "row_ids", torch.int64, 2)
    return ExpertCounter(num_local).count(row_ids)


# ------------------------------------------------------------------------------ reductions
def segment_sum(
    src: torch.Tensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`out[j] = sum_{t in [offsets[j], offsets[j+1])} weights[t] * src[rows[t]]`, one pass.

    Args:
        src: `[R, H]` contiguous CPU fp32 / bf16 / fp16 / fp64.
        rows: `[T] int64` rows of src (checked: in [0, R)).
        offsets: `[S + 1] int64`, non-decreasing within [0, T] (checked).
        weights: `[T] float32`, or None for 1.
        out: `[S, H]` of src's dtype whose rows are contiguous (row stride may exceed H), or
            None for a new tensor.
    Returns: `out`, accumulated in fp32 (fp64 for fp64) in t order and rounded once; rows with
    an empty segment are 0.
    """
    code = _float_code(src, "src")
    if src.dim() != 2 or not src.is_contiguous() or not src.is_cpu:
        raise ValueError(f"src must be a contiguous CPU [rows, hidden] tensor, got "
                         f"{tuple(src.shape)} on {src.device}")
    _check(rows, "rows", torch.int64, 1)
    _check(offsets, "offsets", torch.int64, 1)
    if offsets.numel() < 1:
        raise ValueError("offsets must hold at least one element")
    if weights is not None:
        _check(weights, "weights", torch.float32, 1)
        if weights.numel() != rows.numel():
            raise ValueError(f"weights has {weights.numel()} entries, rows {rows.numel()}")
    nseg, hidden = offsets.numel() - 1, src.shape[1]
    if out is None:
        out = src.new_empty((nseg, hidden))
    elif (out.dtype != src.dtype or not out.is_cpu or out.dim() != 2
          or tuple(out.shape) != (nseg, hidden) or (nseg and out.stride(1) != 1)):
        raise ValueError(f"out must be a CPU {src.dtype} [{nseg}, {hidden}] tensor with "
                         f"contiguous rows, got {out.dtype} {tuple(out.shape)}")
    if nseg == 0:
        return out
    bad = torch.zeros(1, dtype=torch.int64)
    rc = _lib().moe_segment_sum(
        code, out.data_ptr(), out.stride(0), nseg, offsets.data_ptr(), rows.data_ptr(),
        rows.numel(), None if weights is None else weights.data_ptr(), src.data_ptr(),
        src.shape[0], hidden, bad.data_ptr(),
    )
    if rc:
        raise _bounds_error("segment_sum: offsets / rows", bad)
    return out


def gather_sum(out: torch.Tensor, bases: list[int], src_rows: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
    """`out[i] = sum_d src_d[rows[i, d]]` over the sources d with `rows[i, d] >= 0`.

    Args:
        out: `[N, H]` contiguous CPU float tensor (the dtype of every source).
        bases: W addresses, each of a contiguous `[src_rows[d], H]` block of that dtype
            (shared memory of the owners, or a tensor's `data_ptr()`); the caller keeps them
            mapped.
        src_rows: `[W] int64` rows of each source (checked against `rows`).
        rows: `[N, W] int64` row of each token in each source, -1 when none.
    """
    code = _float_code(out, "out")
    n, w = rows.shape
    ptrs = (ctypes.c_void_p * w)(*bases)
    bad = torch.zeros(1, dtype=torch.int64)
    args = _GatherArgs(dtype=code, out=out.data_ptr(), n=n, nsrc=w, bases=ctypes.addressof(ptrs),
                       src_rows=src_rows.data_ptr(), rows=rows.data_ptr(), hidden=out.shape[1],
                       bad=bad.data_ptr())
    if _lib().moe_gather_sum(ctypes.byref(args)):
        raise _bounds_error("gather_sum: rows", bad)
    return out


def gather_rows(src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """`out[i] = src[rows[i]]` for contiguous CPU `src [R, ...]`, `rows [n] int64` (checked)."""
    if not src.is_cpu or not src.is_contiguous() or src.dim() < 1:
        raise ValueError("src must be a contiguous CPU tensor with a row dimension")
    _check(rows, "rows", torch.int64, 1)
    n = rows.numel()
    if out is None:
        out = src.new_empty((n, *src.shape[1:]))
    row_bytes = src[0].numel() * src.element_size() if src.shape[0] else 0
    bad = torch.zeros(1, dtype=torch.int64)
    if _lib().moe_gather_rows(out.data_ptr(), src.data_ptr(), rows.data_ptr(), n, src.shape[0],
                              row_bytes, bad.data_ptr()):
        raise _bounds_error("gather_rows: rows", bad)
    return out


#: Where `small_linear` runs: at most `SMALL_LINEAR_ROWS` rows of x and at least
#: `SMALL_LINEAR_MIN_K` columns. It reads w in place, which beats torch's one-thread CPU matmul
#: (a BLAS sgemm that packs w first) at few rows when K is long: an expert's gate / up
#: projection (K = H = 1024) 1.2-3x at 4-32 rows, and up to 1.4x at 64 rows with w of a few MB.
#: With a short K (the down projection of a narrow expert, K = I) each output is a few FMAs and
#: then a horizontal sum, and torch wins: 0.4-0.8x at K=64, 0.6-1.2x at K=128-256. Measured on
#: whole experts (`expert_mlp`, 4 experts, H=1024, one process, interleaved), K >= 512 against
#: no K limit: 1.00x against 0.78x of torch at 60-70 rows with I=64, and the same 1.15-2.1x
#: with I=2048 (bench notes in docs/design.md).
SMALL_LINEAR_ROWS = 64
SMALL_LINEAR_MIN_K = 512


def small_linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None
                 ) -> torch.Tensor | None:
    """`x [m, K] @ w [N, K]^T` (`torch.nn.functional.linear` without bias) into `out [m, N]`
    or a new tensor, for few rows: x, w (and out) all fp32 or all bf16, contiguous, on the CPU,
    1 <= m <= `SMALL_LINEAR_ROWS`, K >= `SMALL_LINEAR_MIN_K`, torch on one thread (with more,
    its matmul runs in parallel and this kernel does not), no autograd. None when any of that
    does not hold, the native kernels are not built, or the CPU lacks AVX2 + FMA: the caller
    then uses torch. The sums are fp32 in another order than torch's (rounding differs, not
    more); bf16 outputs are rounded once, from fp32."""
    dtype = x.dtype if type(x) is torch.Tensor else None
    if not (dtype in (torch.float32, torch.bfloat16) and type(w) is torch.Tensor
            and w.dtype == dtype and x.dim() == 2 and w.dim() == 2 and x.is_cpu and w.is_cpu
            and 0 < x.shape[0] <= SMALL_LINEAR_ROWS and x.shape[1] == w.shape[1]
            and x.shape[1] >= SMALL_LINEAR_MIN_K
            and x.is_contiguous() and w.is_contiguous() and torch.get_num_threads() == 1
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return None
    m, k = x.shape
    n = w.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=dtype)
    elif not (type(out) is torch.Tensor and out.dtype == dtype and out.is_cpu
              and out.is_contiguous() and tuple(out.shape) == (m, n)):
        return None
    lib, _ = _load()  # not built here: torch's matmul serves
    if lib is None:
        return None
    kernel = lib.moe_linear_nt if dtype == torch.float32 else lib.moe_linear_nt_bf16
    if kernel(out.data_ptr(), x.data_ptr(), w.data_ptr(), m, n, k):
        return None
    return out
