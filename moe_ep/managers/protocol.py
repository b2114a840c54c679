"""The per-call exchange: counts + error code + call identity, and raising together.

Every rank of a manager makes the same sequence of calls; each call (dispatch, combine, an
implicit handle's agreement) carries a fixed-size int64 header::

    [magic, op, manager, handle, call, result, error, tokens, hidden, dtype, topk,
     num_experts, scale_cols, counts[2W]]

`manager` is the manager's number on its group (agreed at construction), `handle` the handle's
number in the manager, `call` the manager's call counter, `result` the call number of the
dispatch a combine consumes, `counts` the rows this rank sends to each rank. The header has the
same size for every manager of a group, so ranks that call different managers, or different
operations, exchange headers instead of deadlocking or aborting in a collective of mismatched
sizes, and every rank raises the same `CallMismatchError`. A rank whose own input failed its
local check raises that error; the others raise `RemoteInputError` naming it.

For the managers whose transfer runs over the group (naive, agrs, alltoallv) the header travels
in one all-gather over the group's CPU side (shared memory on one node, gloo otherwise): it is
also where their split sizes come from, so it costs no extra collective in dispatch. The `shm`
manager runs the same protocol inside its own segment (csrc/cpu/shm_ep.h); it uses the
functions here only to agree at construction and on handles.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from moe_ep.managers.contract import (
    CallMismatchError,
    EPHandle,
    EPSpec,
    RemoteInputError,
)

if TYPE_CHECKING:
    from moe_ep.managers.accounting import WireCounter
    from moe_ep.managers.contract import All2AllManager

__all__ = [
    "DTYPE_CODES",
    "OP_COMBINE",
    "OP_DISPATCH",
    "OP_IMPLICIT",
    "OP_LOGITS",
    "agree_on_manager",
    "agree_on_spec",
    "error_code",
    "exchange",
    "implicit_handle",
    "raise_for_errors",
]

MAGIC = 0x4D6F4545
OP_DISPATCH, OP_COMBINE, OP_IMPLICIT, OP_LOGITS = 1, 2, 3, 4
_OP_NAMES = {OP_DISPATCH: "dispatch", OP_COMBINE: "combine", OP_IMPLICIT: "dispatch",
             OP_LOGITS: "dispatch_router_logits"}
(F_MAGIC, F_OP, F_MANAGER, F_HANDLE, F_CALL, F_RESULT, F_ERROR, F_TOKENS, F_HIDDEN, F_DTYPE,
 F_TOPK, F_EXPERTS, F_SCALES) = range(13)
NUM_FIXED = 13

ERR_NONE, ERR_TYPE, ERR_VALUE, ERR_OTHER = 0, 1, 2, 3
_ERR_NAMES = {ERR_TYPE: "TypeError", ERR_VALUE: "ValueError", ERR_OTHER: "error"}

# Stable dtype codes for the header (torch has no stable integer dtype ids).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4,
}
for _i, _name in enumerate(("float8_e4m3fn", "float8_e5m2")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = 5 + _i
_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

_SPEC_FIELDS = {
    F_HIDDEN: "hidden size (x.shape[1])",
    F_DTYPE: "x dtype",
    F_TOPK: "topk (topk_ids.shape[1])",
    F_EXPERTS: "num_experts",
    F_SCALES: "scale columns (x_scales.shape[1])",
}
_LOGITS_FIELDS = {
    F_HIDDEN: "hidden size (hidden_states.shape[1])",
    F_DTYPE: "hidden_states dtype",
    F_EXPERTS: "number of router logits (router_logits.shape[1])",
}


def error_code(error: BaseException | None) -> int:
    if error is None:
        return ERR_NONE
    if isinstance(error, TypeError):
        return ERR_TYPE
    if isinstance(error, ValueError):
        return ERR_VALUE
    return ERR_OTHER


def raise_for_errors(mgr: All2AllManager, op: str, codes: Sequence[int],
                     local: BaseException | None) -> None:
    """Raise `local` here, or `RemoteInputError` naming the ranks whose code is non-zero."""
    if local is not None:
        raise local
    bad = tuple(r for r, c in enumerate(codes) if c)
    if bad:
        kinds = ", ".join(f"rank {r}: {_ERR_NAMES.get(codes[r], 'error')}" for r in bad)
        raise RemoteInputError(
            f"{op} on group {mgr.group_name!r} (manager {mgr.name!r}) aborted on rank "
            f"{mgr.rank}: rank(s) {', '.join(map(str, bad))} passed invalid input ({kinds}); "
            "the detailed error is raised on that rank",
            bad,
        )


def _mismatch(mgr: All2AllManager, what: str) -> CallMismatchError:
    mgr._mark_broken(f"the ranks made different calls ({what})")
    return CallMismatchError(
        f"group {mgr.group_name!r}, manager {mgr.name!r}: the ranks made different calls: "
        f"{what}. Every rank must build the same managers and call dispatch / combine with the "
        "same handles and results in the same order; this manager is unusable now"
    )


def _per_rank(values: Sequence[object]) -> str:
    return ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))


# ------------------------------------------------------------------------- the header
def exchange(
    mgr: All2AllManager,
    op: int,
    call: int,
    handle: EPHandle | None,
    result_call: int,
    error: BaseException | None,
    spec: EPSpec | None,
    num_tokens: int,
    counts: Sequence[int],
    counter: WireCounter | None,
) -> list[list[int]]:
    """All-gather one header per rank and raise together; returns every rank's header.

    Raises (on every rank): `CallMismatchError` when the ranks are in different calls;
    the local error / `RemoteInputError` when any rank's `error` is set; `ValueError` listing
    each rank's value when the shapes of a dispatch disagree (old call form) or the handles do
    not match; `CallMismatchError` when the ranks pass results of different dispatches.
    """
    w = mgr.world_size
    code = error_code(error)
    values = [0] * (NUM_FIXED + 2 * w)
    values[F_MAGIC], values[F_OP], values[F_MANAGER] = MAGIC, op, mgr.uid
    values[F_HANDLE] = handle.index if handle is not None else -1
    values[F_CALL], values[F_RESULT], values[F_ERROR] = call, result_call, code
    if code == ERR_NONE:
        values[F_TOKENS] = num_tokens
        if spec is not None:
            values[F_HIDDEN], values[F_DTYPE] = spec.hidden, DTYPE_CODES.get(spec.dtype, 0)
            values[F_TOPK], values[F_EXPERTS] = spec.topk, spec.num_experts
            values[F_SCALES] = spec.scale_cols
        values[NUM_FIXED:NUM_FIXED + len(counts)] = counts
    if w == 1:
        rows = [values]
    else:
        rows = mgr._gather_header(call, values)
        if counter is not None:
            counter.header_exchange(8 * len(values))
    name = _OP_NAMES[op]
    for field, what in ((F_MAGIC, "protocol"), (F_MANAGER, "manager"), (F_OP, "operation"),
                        (F_CALL, "call number")):
        column = [row[field] for row in rows]
        if len(set(column)) > 1:
            if field == F_OP:
                shown = [_OP_NAMES.get(v, f"op {v}") for v in column]
            elif field == F_MANAGER:
                shown = [f"manager #{v}" for v in column]
            else:
                shown = column
            raise _mismatch(mgr, f"{what} differs: {_per_rank(shown)}")
    raise_for_errors(mgr, name, [row[F_ERROR] for row in rows], error)
    if op in (OP_DISPATCH, OP_IMPLICIT, OP_LOGITS):
        for field, what in (_LOGITS_FIELDS if op == OP_LOGITS else _SPEC_FIELDS).items():
            column = [row[field] for row in rows]
            if len(set(column)) > 1:
                if field == F_DTYPE:
                    column = [str(_CODE_DTYPES.get(v, v)).removeprefix("torch.") for v in column]
                raise ValueError(
                    f"{name} on group {mgr.group_name!r}: {what} differs across ranks "
                    f"({_per_rank(column)}); every rank must pass the same")
    if op != OP_IMPLICIT:
        column = [row[F_HANDLE] for row in rows]
        if len(set(column)) > 1:
            raise _mismatch(mgr, f"{name} through different handles: "
                                 f"{_per_rank([f'handle {v}' for v in column])}")
    if op == OP_COMBINE:
        column = [row[F_RESULT] for row in rows]
        if len(set(column)) > 1:
            raise _mismatch(mgr, "combine of results of different dispatches: "
                                 f"{_per_rank([f'dispatch at call {v}' for v in column])}")
    return rows


# ------------------------------------------------------------------------- agreement
# Managers built on each group so far: the n-th manager of a group has uid n on every rank.
_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def agree_on_manager(mgr: All2AllManager) -> int:
    """Collective, at construction: every rank builds the same manager with the same options
    as its n-th manager on the group; returns n (the manager's uid)."""
    uid = _BUILT.get(mgr.group, 0) + 1
    _BUILT[mgr.group] = uid
    if mgr.world_size == 1:
        return uid
    options = tuple(sorted((k, repr(v)) for k, v in vars(mgr.options).items()))
    mine = (mgr.name, options, uid)
    everyone = mgr.group.all_gather_object(mine)
    if any(other != mine for other in everyone):
        shown = [f"{n} {dict(o)} (manager #{u})" for n, o, u in everyone]
        raise CallMismatchError(
            f"group {mgr.group_name!r}: the ranks built different managers: {_per_rank(shown)}; "
            "every rank must build the same managers, with the same options, in the same order")
    return uid


def agree_on_spec(mgr: All2AllManager, spec: EPSpec | None, error: BaseException | None) -> None:
    """Collective, in `get_handle`: raise together on any rank's error or differing spec."""
    if mgr.world_size == 1:
        raise_for_errors(mgr, "get_handle", [error_code(error)], error)
        return
    everyone = mgr.group.all_gather_object((error_code(error), spec))
    raise_for_errors(mgr, "get_handle", [code for code, _ in everyone], error)
    specs = [s for _, s in everyone]
    for name in spec.cache_key():
        column = [getattr(s, name) for s in specs]
        if len(set(column)) > 1:
            raise ValueError(
                f"get_handle on group {mgr.group_name!r}: EPSpec.{name} differs across ranks "
                f"({_per_rank(column)}); every rank must pass the same spec")


def implicit_handle(
    mgr: All2AllManager,
    call: int,
    x: object,
    topk_ids: object,
    num_experts: object,
    x_scales: object,
    error: Exception | None,
) -> tuple[EPHandle | None, Exception | None]:
    """The handle for a dispatch made without one.

    Managers whose handles own no buffers look it up locally (their dispatch exchange checks
    the shapes across ranks) and return the error to report. The others first exchange one
    header over the group, raise there on any rank's error, and agree on a handle whose
    capacity fits every rank's token count (a power of two, at least `implicit_capacity`;
    grown when a later call needs more).
    """
    from moe_ep.managers import inputs

    spec: EPSpec | None = None
    if error is None:
        try:
            spec = inputs.implicit_spec(x, topk_ids, num_experts, x_scales)
            # Checked at the smallest capacity such a handle gets (a backend may bound it).
            mgr._check_spec(replace(spec, max_tokens_per_rank=mgr.implicit_capacity))
        except Exception as exc:  # noqa: BLE001 - reported to every rank
            error = exc
    if not mgr.collective_handles:
        if error is not None:
            return None, error
        return mgr._cache.get_or_create(spec.cache_key(), mgr._new_handle), None
    ntok = int(x.shape[0]) if spec is not None else 0
    rows = exchange(mgr, OP_IMPLICIT, call, None, -1, error, spec, ntok, (), None)
    need = max(row[F_TOKENS] for row in rows)
    key = tuple(spec.cache_key().items())
    handle = mgr._implicit.get(key)
    if handle is None or handle.destroyed or handle.spec.max_tokens_per_rank < need:
        cap = max(mgr.implicit_capacity, 1 << max(need - 1, 0).bit_length())
        # An outgrown handle stays in the cache (its live results remain valid) until destroy.
        handle = mgr._cache.get_or_create(
            replace(spec, max_tokens_per_rank=cap).cache_key(), mgr._new_handle)
        mgr._implicit[key] = handle
    return handle, None
