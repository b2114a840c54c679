"""The experts step: local SwiGLU experts on a dispatch result, one fast path per layout.

Expert ``e`` is ``f_e(x) = act(x W_gate_e^T) * (x W_up_e^T) @ W_down_e^T`` with the fused
weights ``w13 [E_local, 2I, H]`` (rows ``[0, I)`` the gate projection, ``[I, 2I)`` the up
projection, transformers 5.x's ``gate_up_proj``) and ``w2 [E_local, H, I]`` (``down_proj``).

:func:`fused_experts` returns what ``combine`` expects for the result's layout, the same as
``apply_experts(result, fn)`` with ``fn`` the expert MLP (tested), but with index arithmetic
and one pair of matmuls per expert instead of per-row work:

* ``TOKEN`` (``x [M, H]``, ``topk_ids [M, K]`` local ids or -1): the valid (row, k) pairs are
  grouped by expert (``moe_ep.managers.planning.layout``: one C pass on CPU), their rows
  gathered once, each expert's contiguous segment goes through two matmuls, and the weighted
  sum back to ``[M, H]`` is one segment sum (native on CPU; fp32 accumulation, one rounding).
* ``EXPERT_PACKED`` (``x [R, H]`` in ``tokens_per_expert`` segments): two matmuls per segment;
  unweighted.
* ``EXPERT_PADDED`` (``x [E_local, C, H]``): two batched matmuls (``torch.bmm``) over the
  first ``max(tokens_per_expert)`` rows of every expert; rows past an expert's count are 0.

A loop over the local experts remains (a handful of iterations; each is one matmul over all of
that expert's rows): on CPU, torch's ``grouped_mm`` measured no faster than it in torch 2.13.
The segment lengths are read on the host once per call (``tokens_per_expert.tolist()``).

A quantised dispatch (``result.x`` float8 with ``result.x_scales``) is dequantised to
``out_dtype`` first.

``out=`` lets the caller choose where the TOKEN / EXPERT_PACKED output goes; it may be
``result.x`` itself (every row is read before its output is written), which the contract allows
(:class:`~moe_ep.managers.DispatchResult`) and :class:`~moe_ep.layer.FusedMoE` does: ``shm``'s
TOKEN combine then copies nothing, and no ``[M, H]`` tensor is allocated per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from moe_ep import kernels
from moe_ep.layer.quant import FP8_DTYPE, DispatchQuant
from moe_ep.managers import DispatchResult, Layout, planning
from moe_ep.managers.expert_ops import segment_sum

__all__ = ["ACTIVATIONS", "ExpertsKernel", "expert_mlp", "fused_experts"]

#: Activation names (transformers' ``hidden_act`` spellings) -> function of the gate projection.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


class ExpertsKernel(Protocol):
    """The swappable experts step of :class:`~moe_ep.layer.FusedMoE`.

    ``kernel(result, w13, w2, activation=..., out_dtype=..., quant=...)`` returns the expert
    output ``combine`` expects for ``result.layout`` (see :class:`~moe_ep.managers.Layout`), in
    ``out_dtype``. ``quant`` is the layer's :class:`DispatchQuant` (None when unquantised), for
    kernels that take FP8 input as it comes.
    """

    def __call__(
        self,
        result: DispatchResult,
        w13: torch.Tensor,
        w2: torch.Tensor,
        *,
        activation: str,
        out_dtype: torch.dtype,
        quant: DispatchQuant | None,
    ) -> torch.Tensor: ...


def expert_mlp(
    rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, activation: str = "silu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One expert: ``rows [n, H]``, ``w13 [2I, H]``, ``w2 [H, I]`` -> ``[n, H]`` (rows' dtype),
    into ``out [n, H]`` when given (no autograd then, as for any ``out=``). A projection of a
    few fp32 or bf16 rows over K >= 512 on the CPU goes through `moe_ep.kernels.small_linear`;
    other bf16 projections on a CPU without bf16 dot products are multiplied in fp32 from
    `BF16_UPCAST_ROWS` rows."""
    gate_up = _linear(rows, w13)
    inter = w13.shape[0] // 2
    return _linear(ACTIVATIONS[activation](gate_up[:, :inter]) * gate_up[:, inter:], w2, out)


def _linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w^T`` (into ``out`` when given): the native few-row kernel where it applies, torch
    otherwise (bf16 from `BF16_UPCAST_ROWS` rows on a CPU without bf16 dot products in fp32)."""
    y = kernels.small_linear(x, w, out)
    if y is not None:
        return y
    if _upcast_bf16(x, w):
        y = _linear(x.float(), w.float())
        return y.to(torch.bfloat16) if out is None else out.copy_(y)
    return F.linear(x, w) if out is None else torch.mm(x, w.t(), out=out)


#: From this many rows, a bf16 matmul on a CPU without native bf16 dot products (AVX512-BF16 or
#: AMX) runs in fp32: the operands are widened, multiplied in fp32 and the product rounded to
#: bf16 once, as torch's bf16 matmul does (it accumulates in fp32 too), so only the order of
#: the fp32 sums differs. There torch's bf16 matmul runs at about 2-9 GFLOP/s at any row count,
#: while widening w costs about 0.65 ns per element (the fp32 copy is written to memory). On
#: the development VM's AVX2 core, one process, 4 experts of H=1024 (`expert_mlp`), torch bf16
#: / widened was 0.74 / 0.93 / 1.26 / 2.15 / 2.55x at 1 / 2 / 4 / 8 / 12 rows with I=64 and
#: 0.35 / 0.52 / 0.91 / 1.42 / 1.94x with I=2048. Up to 64 rows `kernels.small_linear` serves
#: bf16 first where it applies (K >= 512: it widens w in registers, no copy); see
#: docs/design.md for the whole layer.
BF16_UPCAST_ROWS = 8


def _cpu_has_bf16_dot() -> bool:
    cpu = getattr(torch, "cpu", None)
    probes = [getattr(cpu, name, None) for name in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(p is None for p in probes):
        return True  # cannot tell: leave bf16 to torch
    return any(p() for p in probes)


_CPU_BF16_DOT = _cpu_has_bf16_dot()


def _upcast_bf16(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x @ w^T`` (bf16, both on the CPU) should run in fp32; see `BF16_UPCAST_ROWS`."""
    return (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and not _CPU_BF16_DOT
            and x.is_cpu and w.is_cpu and x.dim() == 2 and x.shape[0] >= BF16_UPCAST_ROWS)


@torch.no_grad()
def fused_experts(
    result: DispatchResult,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    activation: str = "silu",
    out_dtype: torch.dtype | None = None,
    quant: DispatchQuant | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The local experts' output for ``result``, in the layout ``combine`` expects.

    Inference only: it runs under ``torch.no_grad()`` (builds no autograd graph), like the
    layer, since it writes into preallocated outputs.

    Args:
        result: a dispatch result whose ``tokens_per_expert`` has ``E_local`` entries.
        w13: ``[E_local, 2I, H]`` gate and up projections; w2: ``[E_local, H, I]``.
        activation: a key of :data:`ACTIVATIONS`.
        out_dtype: dtype of the output and of the matmuls; None = dtype of ``result.x``
            (required for a quantised result).
        quant: how ``result.x`` was quantised (needed when ``result.x_scales`` is set).
        out: where to write a TOKEN ``[M, H]`` or EXPERT_PACKED ``[R, H]`` output, ``out_dtype``
            with contiguous rows; may be ``result.x`` (overwritten). None = a new tensor.

    Returns:
        TOKEN ``[M, H]`` (weighted sum over the local experts of each row), EXPERT_PACKED
        ``[R, H]``, EXPERT_PADDED ``[E_local, C, H]`` (padding rows 0), all ``out_dtype``.
    """
    x = result.x
    if result.x_scales is not None or x.dtype == FP8_DTYPE:
        if quant is None or out_dtype is None or result.x_scales is None:
            raise ValueError("a quantised dispatch result needs x_scales, quant= and out_dtype=")
        x = quant.dequantize(x, result.x_scales, out_dtype)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    x = x.to(out_dtype)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    num_local = int(result.tokens_per_expert.shape[0])
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != num_local or w2.shape[0] != num_local:
        raise ValueError(
            f"w13 must be [E_local={num_local}, 2I, H] and w2 [E_local, H, I], got "
            f"{tuple(w13.shape)} and {tuple(w2.shape)}"
        )
    w13, w2 = w13.to(out_dtype), w2.to(out_dtype)
    if out is not None and result.layout is not Layout.EXPERT_PADDED:
        rows = x.shape[0]
        if (not isinstance(out, torch.Tensor) or out.dtype != out_dtype or out.dim() != 2
                or tuple(out.shape) != (rows, x.shape[1]) or (rows and out.stride(1) != 1)
                or out.device != x.device):
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else out
            raise ValueError(f"out must be a {out_dtype} [{rows}, {x.shape[1]}] tensor with "
                             f"contiguous rows on {x.device}, got {got}")
    if result.layout is Layout.TOKEN:
        return _token_layout(result, x, w13, w2, activation, out)
    if result.layout is Layout.EXPERT_PACKED:
        counts = result.tokens_per_expert.tolist()
        if sum(counts) != x.shape[0]:
            raise ValueError(
                f"tokens_per_expert sums to {sum(counts)} but result.x has {x.shape[0]} rows"
            )
        return _segments(x, counts, w13, w2, activation, out)
    if result.layout is Layout.EXPERT_PADDED:
        return _padded_layout(result, x, w13, w2, activation)
    raise ValueError(f"unknown layout {result.layout!r}")


def _segments(
    x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor, activation: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [R, H]`` in expert segments of ``counts`` rows -> ``out [R, H]``, each through its
    expert. ``out`` may be ``x``: a segment is read by its first matmul before the second
    writes it."""
    out = torch.empty_like(x) if out is None else out
    start = 0
    for e, n in enumerate(counts):
        if n:
            # Straight into the output rows: no [n, H] temporary and copy per expert.
            expert_mlp(x[start : start + n], w13[e], w2[e], activation,
                       out=out[start : start + n])
        start += n
    return out


def _token_layout(
    result: DispatchResult,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str,
    out: torch.Tensor | None,
) -> torch.Tensor:
    ids, weights = result.topk_ids, result.topk_weights
    if ids is None or weights is None or ids.dim() != 2 or ids.shape != weights.shape:
        raise ValueError("a TOKEN-layout result needs topk_ids and topk_weights of shape [M, K]")
    # The (row, slot) pairs grouped by local expert, and the CSR by row of their positions (C
    # on CPU, which counts them from the ids and checks the ids are in [-1, E_local)). The
    # segment lengths must reach the host: on a device the result's own count is that one
    # synchronisation, and it sizes the layout so that the layout needs none.
    hint = result.tokens_per_expert.tolist()
    packed = planning.layout(ids.long(), weights.float(), w13.shape[0], num_pairs=sum(hint))
    counts = packed.tokens_per_expert.tolist() if packed.tokens_per_expert.is_cpu else hint
    pair_out = _segments(x.index_select(0, packed.packed_row), counts, w13, w2, activation)
    if out is None:
        out = torch.empty_like(x)
    return segment_sum(pair_out, packed.row_order, packed.row_offsets, packed.row_weight,
                       out=out)


def _bmm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [E, m, K] @ w [E, N, K]^T`` -> ``[E, m, N]``, bf16 widened to fp32 as `_linear` does."""
    if _upcast_bf16(x[0], w[0]):
        return torch.bmm(x.float(), w.float().transpose(1, 2)).to(torch.bfloat16)
    return torch.bmm(x, w.transpose(1, 2))


def _padded_layout(
    result: DispatchResult,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    if x.dim() != 3 or x.shape[0] != w13.shape[0]:
        raise ValueError(f"an EXPERT_PADDED result needs x [E_local, C, H], got {tuple(x.shape)}")
    counts = result.tokens_per_expert.to(x.device)
    out = torch.zeros_like(x)
    m = int(counts.max()) if counts.numel() else 0
    if m == 0:
        return out
    inter = w13.shape[1] // 2
    # Only the first max(count) rows of every expert are computed: the capacity C is sized for
    # the worst case (every rank sending all its tokens to one expert) and is mostly padding.
    gate_up = _bmm(x[:, :m], w13)  # [E, m, 2I]
    inner = ACTIVATIONS[activation](gate_up[..., :inter]) * gate_up[..., inter:]
    y = _bmm(inner, w2)  # [E, m, H]
    valid = torch.arange(m, device=x.device).unsqueeze(0) < counts.unsqueeze(1)  # [E, m]
    # where, not a product: padding rows may hold garbage (NaN) from an uninitialised buffer.
    out[:, :m] = torch.where(valid.unsqueeze(-1), y, torch.zeros((), dtype=y.dtype))
    return out
