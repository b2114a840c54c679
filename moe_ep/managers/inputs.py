"""Local checks of dispatch and combine inputs (no communication).

Every check raises `TypeError` / `ValueError` naming the argument and what was expected; the
manager then reports the error to the other ranks through its exchange, so that every rank
raises. `check_dispatch` checks a call against the handle's `EPSpec`; `implicit_spec` derives
the spec of a call made without a handle.
"""

from __future__ import annotations

import torch

from moe_ep.managers.contract import (
    _INT32_MAX,
    FLOAT_DTYPES,
    QUANT_DTYPES,
    CombineState,
    DispatchResult,
    EPHandle,
    EPSpec,
    GatheredTokens,
)

__all__ = ["CheckedInputs", "check_dispatch", "check_expert_out", "check_live", "describe",
           "implicit_spec", "result_state"]

# More precise first; an expert output may be more precise than the combine dtype, not less.
_PRECISION = {torch.float64: 3, torch.float32: 2, torch.bfloat16: 1, torch.float16: 1}


class CheckedInputs:
    """Dispatch inputs that passed the local check (a plain slotted class: it is built on
    every dispatch, where a frozen dataclass costs a microsecond).

    Attributes:
        x: `[N, H]` contiguous, the spec's dtype.
        topk_weights: `[N, K] float32` contiguous.
        topk_ids: `[N, K] int64` contiguous (values checked in torch, or by the native planner).
        x_scales: `[N, S] float32` contiguous, or None.
    """

    __slots__ = ("x", "topk_weights", "topk_ids", "x_scales")

    def __init__(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 x_scales: torch.Tensor | None) -> None:
        self.x = x
        self.topk_weights = topk_weights
        self.topk_ids = topk_ids
        self.x_scales = x_scales

    @property
    def num_tokens(self) -> int:
        return int(self.x.shape[0])


def describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return type(t).__name__


def _is_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_device(name: str, t: torch.Tensor, device: torch.device | None) -> None:
    if device is None:
        return
    if t.device.type != device.type or (
        device.index is not None and t.device.index != device.index
    ):
        raise ValueError(f"{name} must be on the group's device {device}, got {t.device}")


def implicit_spec(x: object, topk_ids: object, num_experts: object, x_scales: object) -> EPSpec:
    """The `EPSpec` of a dispatch made without a handle (no bound on the token count)."""
    x = _is_tensor("x", x)
    topk_ids = _is_tensor("topk_ids", topk_ids)
    if num_experts is None:
        raise TypeError("dispatch needs num_experts=E when no handle is given")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if not 1 <= num_experts <= _INT32_MAX:
        raise ValueError(f"num_experts must be in [1, {_INT32_MAX}], got {num_experts}")
    if x.dim() != 2:
        raise ValueError(f"x must be [num_tokens, hidden], got {describe(x)}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [num_tokens, topk], got {describe(topk_ids)}")
    if x.shape[1] < 1:
        raise ValueError(f"x must have hidden size >= 1, got {describe(x)}")
    if topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have topk >= 1 columns, got {describe(topk_ids)}")
    scale_cols = 0
    if x_scales is not None:
        scales = _is_tensor("x_scales", x_scales)
        if scales.dim() != 2:
            raise ValueError(f"x_scales must be [num_tokens, scale_cols], got {describe(scales)}")
        scale_cols = int(scales.shape[1])
        if scale_cols < 1:
            raise ValueError(f"x_scales must have at least one column, got {describe(scales)}")
    if x.dtype in QUANT_DTYPES and not scale_cols:
        raise TypeError(f"x is {x.dtype}: a quantised dispatch needs x_scales")
    if x.dtype not in FLOAT_DTYPES + QUANT_DTYPES:
        raise TypeError(f"x must have a floating dtype, got {x.dtype}")
    return EPSpec(hidden=int(x.shape[1]), num_experts=num_experts, topk=int(topk_ids.shape[1]),
                  dtype=x.dtype, scale_cols=scale_cols)


def check_dispatch(
    spec: EPSpec,
    x: object,
    topk_weights: object,
    topk_ids: object,
    x_scales: object,
    *,
    device: torch.device | None,
    check_ids: bool = True,
) -> CheckedInputs:
    """Check one rank's dispatch inputs against `spec`; return contiguous, normalised tensors.

    Args:
        spec: the handle's shape.
        x: `[N, H]` in `spec.dtype` (N <= `spec.max_tokens_per_rank`).
        topk_weights: `[N, K]` floating (any value where the id is -1).
        topk_ids: `[N, K]` integer ids in `[0, E)` or -1, distinct per token apart from -1.
        x_scales: `[N, spec.scale_cols] float32` when the spec is quantised, else None.
        device: the group's device; every tensor must be on it.
        check_ids: validate the id values here (False where the native planner does it).
    """
    fast = _fast_path(spec, x, topk_weights, topk_ids, x_scales, device)
    if fast is not None:
        if check_ids and fast.topk_ids.numel():
            _check_id_values(fast.topk_ids, spec.num_experts)
        return fast
    x = _is_tensor("x", x)
    topk_weights = _is_tensor("topk_weights", topk_weights)
    topk_ids = _is_tensor("topk_ids", topk_ids)
    if torch.is_grad_enabled():
        grads = [n for n, t in (("x", x), ("topk_weights", topk_weights)) if t.requires_grad]
        if grads:
            verb = "requires" if len(grads) == 1 else "require"
            raise ValueError(
                f"dispatch is not differentiable (moe_ep is inference-only for now): "
                f"{' and '.join(grads)} {verb} grad; call it under torch.no_grad() or "
                "torch.inference_mode()"
            )
    if x.dim() != 2 or x.shape[1] != spec.hidden:
        raise ValueError(
            f"x must be [num_tokens, {spec.hidden}] (EPSpec.hidden), got {describe(x)}")
    if x.dtype != spec.dtype:
        raise TypeError(f"x must be {spec.dtype} (EPSpec.dtype), got {x.dtype}")
    n = x.shape[0]
    if spec.max_tokens_per_rank is not None and n > spec.max_tokens_per_rank:
        raise ValueError(
            f"x has {n} tokens, more than the handle's EPSpec.max_tokens_per_rank="
            f"{spec.max_tokens_per_rank}"
        )
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise TypeError(
            f"topk_ids must be an integer tensor (int32 or int64), got dtype {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must have a floating dtype, got {topk_weights.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[1] != spec.topk:
        raise ValueError(
            f"topk_ids must be [num_tokens, {spec.topk}] (EPSpec.topk), got {describe(topk_ids)}")
    if topk_ids.shape[0] != n:
        raise ValueError(
            f"topk_ids has {topk_ids.shape[0]} rows but x has {n} tokens; both must be "
            "[num_tokens, ...]")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_weights.shape)}")
    scales = None
    if spec.scale_cols:
        if x_scales is None:
            raise ValueError(f"this handle is quantised (EPSpec.scale_cols={spec.scale_cols}): "
                             "pass x_scales")
        scales = _is_tensor("x_scales", x_scales)
        if scales.dtype != torch.float32 or tuple(scales.shape) != (n, spec.scale_cols):
            raise ValueError(f"x_scales must be float32 [{n}, {spec.scale_cols}], got "
                             f"{describe(scales)}")
    elif x_scales is not None:
        raise ValueError("x_scales given, but the handle is not quantised (EPSpec.scale_cols=0)")
    for name, t in (("x", x), ("topk_weights", topk_weights), ("topk_ids", topk_ids),
                    ("x_scales", scales)):
        if t is not None:
            _check_device(name, t, device)
    ids = topk_ids if topk_ids.dtype == torch.int64 else topk_ids.long()
    ids = ids.contiguous()
    if check_ids and ids.numel():
        _check_id_values(ids, spec.num_experts)
    w = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    return CheckedInputs(
        x=x.contiguous(),
        topk_weights=w.contiguous(),
        topk_ids=ids,
        x_scales=None if scales is None else scales.contiguous(),
    )


def _fast_path(spec: EPSpec, x: object, w: object, ids: object, x_scales: object,
               device: torch.device | None) -> CheckedInputs | None:
    """The inputs as they are when they need no conversion and pass every check the slow path
    makes (ids values aside); None otherwise. One boolean expression, so that a decode-sized
    dispatch spends ~1 us here instead of ~10 (the slow path then names what is wrong)."""
    Tensor = torch.Tensor
    if not (type(x) is Tensor and type(w) is Tensor and type(ids) is Tensor
            and x_scales is None and not spec.scale_cols):
        return None
    xs, ws = x.shape, w.shape
    n = xs[0] if len(xs) == 2 else -1
    ok = (
        n >= 0 and xs[1] == spec.hidden and x.dtype == spec.dtype
        and ids.dtype == torch.int64 and w.dtype == torch.float32
        and len(ws) == 2 and ws[0] == n and ws[1] == spec.topk and ids.shape == ws
        and (spec.max_tokens_per_rank is None or n <= spec.max_tokens_per_rank)
        and x.is_contiguous() and w.is_contiguous() and ids.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )
    if not ok:
        return None
    if device is not None:
        if device.type == "cpu":
            if not (x.is_cpu and w.is_cpu and ids.is_cpu):
                return None
        elif not (x.device == device and w.device == device and ids.device == device):
            return None
    return CheckedInputs(x, w, ids, None)


def _check_id_values(ids: torch.Tensor, num_experts: int) -> None:
    # One host sync for all three value checks.
    sorted_ids = ids.sort(dim=1).values
    repeated = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)
    lo, hi, n_rep = torch.stack([ids.min(), ids.max(), repeated.sum()]).tolist()
    if lo < -1 or hi >= num_experts:
        bad = ids[(ids < -1) | (ids >= num_experts)][0].item()
        where = (ids == bad).nonzero()[0].tolist()
        raise ValueError(
            f"topk_ids must be in [-1, num_experts={num_experts}) (-1 = no expert), "
            f"got {bad} at position {tuple(where)}")
    if n_rep:
        token = int(repeated.any(dim=1).nonzero()[0].item())
        raise ValueError(
            f"topk_ids routes token {token} to the same expert twice ({ids[token].tolist()}); "
            "the ids of one token must be distinct (pad with -1)")


def result_state(manager: object, result: object) -> CombineState:
    """The `CombineState` of `result`, checked to come from `manager`'s dispatch."""
    if not isinstance(result, (DispatchResult, GatheredTokens)) or not isinstance(
        result.handle, CombineState
    ):
        raise TypeError(
            f"result must be the DispatchResult of this manager's dispatch, got {describe(result)}")
    state = result.handle
    if state.manager is not manager:
        raise ValueError("result comes from another manager's dispatch")
    return state


def check_live(state: CombineState) -> None:
    """Raise unless `state`'s dispatch can still be combined (not combined, not replaced)."""
    handle: EPHandle = state.handle
    if handle.destroyed:
        raise ValueError(f"result's handle {handle.index} was destroyed")
    if state.seq not in handle.live:
        raise ValueError(
            f"result of dispatch #{state.seq} (handle {handle.index}) was already combined or "
            f"replaced by a later dispatch (live: {handle.live}): pass each result to combine "
            "once, at most two dispatches ahead on handles with buffers"
        )


def check_expert_out(state: CombineState, expert_out: object) -> torch.Tensor:
    """`expert_out` checked against the result's rows and cast to the combine dtype."""
    spec = state.handle.spec
    want = (*state.rows, spec.hidden)
    if not isinstance(expert_out, torch.Tensor) or expert_out.shape != want:
        raise ValueError(
            f"expert_out must be {list(want)} (the expert output of this result's rows), got "
            f"{describe(expert_out)}")
    out_dtype = spec.combine_dtype
    device = state.manager.group.device
    if expert_out.dtype == out_dtype and device.type == "cpu" and expert_out.is_cpu and (
        expert_out.is_contiguous()
    ):
        return expert_out  # the common case, without the slower general checks below
    if expert_out.dtype != out_dtype:
        if expert_out.dtype not in _PRECISION or (
            _PRECISION[expert_out.dtype] <= _PRECISION[out_dtype]
        ):
            raise TypeError(
                f"expert_out must be {out_dtype} (the combine dtype) or more precise, got "
                f"{expert_out.dtype}: a less precise output would silently degrade the result")
        expert_out = expert_out.to(out_dtype)
    _check_device("expert_out", expert_out, device)
    return expert_out.contiguous()
