"""FP8 (e4m3) quantisation of dispatched activations, with float32 scales.

``quantize(x)`` maps ``x [..., H]`` to ``xq [..., H] float8_e4m3fn`` and ``scales [..., S]
float32`` such that ``dequantize(xq, scales) ~= x``:

* per token (``block_size=None``, ``S = 1``): one scale per row, ``amax(|row|) / 448``;
* per block (``block_size=128``, ``S = ceil(H / 128)``): one scale per 128 consecutive channels
  of a row (DeepEP's and DeepSeek-V3's activation format), which keeps a few large channels
  from flattening the resolution of the others. A last, partial block has its own scale.

Error bound (tested): e4m3 keeps 3 mantissa bits, so round-to-nearest errs by at most 2^-4 of
the value for normal numbers, and by half the subnormal spacing 2^-9 below 2^-6; in input
units, ``|x - dequantize(quantize(x))| <= 2^-4 |x| + 2^-10 scale`` per element (the scale of
the element's row or block). Rows (blocks) of zeros get a tiny positive scale, not 0, so they
stay exactly 0 and never divide by zero.

Bytes per dispatched token: ``H + 4 S`` against ``2 H`` in bf16 (``4 H`` in fp32):
:meth:`DispatchQuant.bytes_per_token`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_ep.managers.inputs import describe

__all__ = ["FP8_DTYPE", "FP8_MAX", "DispatchQuant", "dequantize", "quantize", "scale_cols"]

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3fn value.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
# Floor of a scale: an all-zero row would otherwise get scale 0 and 0/0 = NaN.
_MIN_SCALE = 1e-12


def scale_cols(hidden: int, block_size: int | None) -> int:
    """S, the scale columns per row: 1 per token, ``ceil(hidden / block_size)`` per block."""
    _check_block_size(block_size)
    return 1 if block_size is None else -(-int(hidden) // block_size)


@dataclass(frozen=True)
class DispatchQuant:
    """Quantise activations to FP8 e4m3 before dispatch (scales travel beside them).

    Attributes:
        block_size: None = one fp32 scale per token; an int (128, DeepEP's format) = one per
            ``block_size`` channels.
    """

    block_size: int | None = None

    def __post_init__(self) -> None:
        _check_block_size(self.block_size)

    @property
    def dtype(self) -> torch.dtype:
        return FP8_DTYPE

    def scale_cols(self, hidden: int) -> int:
        return scale_cols(hidden, self.block_size)

    def bytes_per_token(self, hidden: int) -> int:
        """Wire bytes of one dispatched row: ``hidden`` fp8 values + the fp32 scales."""
        return int(hidden) * FP8_DTYPE.itemsize + 4 * self.scale_cols(hidden)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize(x, block_size=self.block_size)

    def dequantize(
        self, xq: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        return dequantize(xq, scales, block_size=self.block_size, dtype=dtype)


def quantize(
    x: torch.Tensor, *, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x [..., H]`` to ``(xq [..., H] float8_e4m3fn, scales [..., S] float32)``.

    ``block_size`` None gives one scale per row (S = 1), an int one per ``block_size`` channels
    (S = ceil(H / block_size)). Empty inputs give empty outputs.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor [..., hidden], got {describe(x)}")
    if x.dtype == FP8_DTYPE:
        raise TypeError("x is already float8_e4m3fn")
    hidden = int(x.shape[-1])
    s = scale_cols(hidden, block_size)
    block = hidden if block_size is None else block_size
    xf = _blocks(x.float(), s, block)  # [..., S, block]
    scales = (xf.abs().amax(dim=-1) / FP8_MAX).clamp_min(_MIN_SCALE)  # [..., S]
    q = (xf / scales.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.flatten(-2)[..., :hidden]
    return q, scales


def dequantize(
    xq: torch.Tensor,
    scales: torch.Tensor,
    *,
    block_size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``xq [..., H] fp8``, ``scales [..., S] fp32`` -> ``[..., H]``.

    ``block_size`` must be the one ``xq`` was quantised with (S must match it).
    """
    if not isinstance(xq, torch.Tensor) or xq.dtype != FP8_DTYPE:
        raise TypeError(f"xq must be a float8_e4m3fn tensor, got {describe(xq)}")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
        raise TypeError(f"scales must be a float32 tensor, got {describe(scales)}")
    hidden = int(xq.shape[-1])
    s = scale_cols(hidden, block_size)
    if tuple(scales.shape) != (*xq.shape[:-1], s):
        raise ValueError(
            f"scales must be {(*xq.shape[:-1], s)} for xq {tuple(xq.shape)} and "
            f"block_size={block_size}, got {tuple(scales.shape)}"
        )
    block = hidden if block_size is None else block_size
    out = _blocks(xq.float(), s, block) * scales.unsqueeze(-1)
    return out.flatten(-2)[..., :hidden].to(dtype)


def _blocks(x: torch.Tensor, s: int, block: int) -> torch.Tensor:
    """``x [..., H]`` float32, zero-padded to ``S * block`` channels, as ``[..., S, block]``."""
    pad = s * block - int(x.shape[-1])
    if pad:
        x = F.pad(x, (0, pad))
    return x.unflatten(-1, (s, block))


def _check_block_size(block_size: object) -> None:
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise ValueError(f"block_size must be None (per token) or an int >= 1, got "
                         f"{block_size!r}")

