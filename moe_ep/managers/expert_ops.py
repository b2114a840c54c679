"""Expert-side operations: `apply_experts` and the weighted row sums of the combines.

`segment_sum` and `gather_sum` use the native kernels (`moe_ep.kernels`) for CPU tensors when
they are built, else the pure-torch code below (any device); tests compare the two. Sums
accumulate in float32 (float64 for float64 data) and round once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from moe_ep import kernels
from moe_ep.managers.contract import CombineState, DispatchResult, Layout

__all__ = ["ExpertFn", "apply_experts", "fail_together", "gather_sum", "gather_sum_torch",
           "segment_sum", "segment_sum_torch", "weighted_row_sum"]

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _native(t: torch.Tensor) -> bool:
    return t.is_cpu and t.dtype in kernels.native.DTYPE_CODES and _kernels_ok()


_KERNELS_OK: list[bool] = []


def _kernels_ok() -> bool:
    if not _KERNELS_OK:
        _KERNELS_OK.append(kernels.available()[0])
    return _KERNELS_OK[0]


def segment_sum(
    src: torch.Tensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`out[j] = sum_{t in [offsets[j], offsets[j+1])} weights[t] * src[rows[t]]`.

    Args: src `[R, H]`, rows `[T] int64`, offsets `[S + 1] int64`, weights `[T] float32` or
    None (1). Returns `[S, H]` in src's dtype (into `out` if given).
    """
    src = src.contiguous()
    if _native(src):
        return kernels.segment_sum(src, rows, offsets, weights, out=out)
    return segment_sum_torch(src, rows, offsets, weights, out)


def segment_sum_torch(src: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
                      weights: torch.Tensor | None, out: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """The pure-torch twin of `moe_ep.kernels.segment_sum` (any device)."""
    nseg = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    segment = torch.repeat_interleave(torch.arange(nseg, device=src.device), counts)
    start = int(offsets[0]) if offsets.numel() else 0
    picked = rows[start:start + segment.numel()]
    acc = _acc_dtype(src.dtype)
    vals = src.index_select(0, picked).to(acc)
    if weights is not None:
        vals = vals * weights[start:start + segment.numel()].to(acc)[:, None]
    summed = torch.zeros((nseg, src.shape[1]), dtype=acc, device=src.device)
    summed.index_add_(0, segment, vals)
    if out is None:
        return summed.to(src.dtype)
    return out.copy_(summed)


def gather_sum(sources: Sequence[torch.Tensor], rows: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """`out[n] = sum_d sources[d][rows[n, d]]` over the d with `rows[n, d] >= 0`, in d order.

    Args: sources W tensors `[S_d, H]` of one dtype, rows `[N, W] int64`. Returns `[N, H]`.
    """
    n, h = rows.shape[0], sources[0].shape[1]
    dtype, device = sources[0].dtype, sources[0].device
    if out is None:
        out = torch.empty((n, h), dtype=dtype, device=device)
    if all(_native(s) and s.is_contiguous() for s in sources):
        return kernels.gather_sum(
            out, [s.data_ptr() for s in sources],
            torch.tensor([s.shape[0] for s in sources], dtype=torch.int64), rows,
        )
    return gather_sum_torch(sources, rows, out)


def gather_sum_torch(sources: Sequence[torch.Tensor], rows: torch.Tensor, out: torch.Tensor
                     ) -> torch.Tensor:
    """The pure-torch twin of `moe_ep.kernels.gather_sum` (any device)."""
    n, h = out.shape
    dtype, device = out.dtype, out.device
    acc = torch.zeros((n, h), dtype=_acc_dtype(dtype), device=device)
    for d, src in enumerate(sources):
        col = rows[:, d]
        hit = (col >= 0).nonzero().squeeze(1)
        if hit.numel():
            acc.index_add_(0, hit, src.index_select(0, col[hit]).to(acc.dtype))
    return out.copy_(acc)


def weighted_row_sum(
    values: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor | None,
    num_rows: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Weighted scatter-add of rows: `out[rows[i]] += weights[i] * values[i]`.

    Args: values `[P, H]` floating, rows `[P] int64` in `[0, num_rows)`, weights `[P]` or
    None (1). Returns `[num_rows, H]` in `out_dtype`, summed in float32 (float64 for float64)
    in i order and rounded once (rows that receive nothing are 0).
    """
    order = torch.argsort(rows, stable=True)
    offsets = torch.zeros(num_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=num_rows), 0, out=offsets[1:])
    w = None if weights is None else weights.index_select(0, order).float().contiguous()
    return segment_sum(values.to(out_dtype), order, offsets, w)


def _call_expert(fn: ExpertFn, e: int, rows: torch.Tensor) -> torch.Tensor:
    out = fn(e, rows)
    if not isinstance(out, torch.Tensor) or out.shape != rows.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"expert function for local expert {e} must return a tensor of shape "
            f"{tuple(rows.shape)} (rows in, rows out), got {got}"
        )
    return out


def apply_experts(result: DispatchResult, fn: ExpertFn) -> torch.Tensor:
    """Turn a per-expert function into the expert output `combine` expects, for any layout.

    Args:
        result: a `DispatchResult`.
        fn: `fn(e, rows) -> out`: `e` the local expert index in `[0, E_local)`, `rows`
            `[n, H]` in the dtype of `result.x`, `out` `[n, H]`. Called only for experts that
            received at least one row.

    Returns:
        TOKEN: `[M, H]` with row m = sum over k with `topk_ids[m, k] >= 0` of
        `topk_weights[m, k] * fn(topk_ids[m, k], x[m])` (summed in float32). EXPERT_PACKED:
        `[R, H]` with each segment replaced by `fn(e, segment)`. EXPERT_PADDED:
        `[E_local, C, H]` with the valid rows replaced and the padding zero. In the dtype of
        the experts' output.

    If `fn` raises (or returns a wrong shape), the combine the other ranks are waiting in fails
    on every rank (`All2AllManager.abort`), then the error is re-raised here.
    """
    if not isinstance(result, DispatchResult):
        raise TypeError(f"result must be a DispatchResult, got {type(result).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(local_expert, rows), got {type(fn).__name__}")
    return fail_together(result, lambda: _apply(result, fn))


def fail_together(result: DispatchResult, experts_step: Callable[[], torch.Tensor]
                  ) -> torch.Tensor:
    """Run `experts_step()`, the experts step on `result` (any kernel); if it raises, the
    combine the other ranks are waiting in fails on every rank (`All2AllManager.abort`: they
    raise `RemoteInputError` naming this rank), then the error is re-raised here."""
    try:
        return experts_step()
    except Exception as exc:
        state = result.handle
        if isinstance(state, CombineState):
            state.manager.abort(exc, result=result)
        raise


def _apply(result: DispatchResult, fn: ExpertFn) -> torch.Tensor:
    x = result.x
    counts = [int(c) for c in result.tokens_per_expert.tolist()]
    if result.layout is Layout.TOKEN:
        ids, weights = result.topk_ids, result.topk_weights
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
        out = torch.cat(outs)
        return weighted_row_sum(out, pair_rows, pair_w, x.shape[0], out.dtype)
    if result.layout is Layout.EXPERT_PACKED:
        if sum(counts) != x.shape[0]:
            raise ValueError(
                f"tokens_per_expert sums to {sum(counts)} but result.x has {x.shape[0]} rows")
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                outs.append(_call_expert(fn, e, x[start : start + n]))
            start += n
        return torch.cat(outs) if outs else torch.empty_like(x)
    if result.layout is Layout.EXPERT_PADDED:
        out = None
        for e, n in enumerate(counts):
            if n:
                y = _call_expert(fn, e, x[e, :n])
                if out is None:
                    out = torch.zeros(x.shape, dtype=y.dtype, device=x.device)
                out[e, :n] = y
        return out if out is not None else torch.zeros_like(x)
    raise ValueError(f"unknown layout {result.layout!r}")
