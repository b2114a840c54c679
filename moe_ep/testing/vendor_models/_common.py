"""Shared machinery of the vendor contract models: errors, the CPU exchange, poison, order.

The models stand in for CUDA libraries on CPU tensors over a gloo group, so everything a real
kernel moves through NVLink / RDMA moves here through ``torch.distributed`` collectives. Three
kinds of failure are kept apart, because an adapter test must tell them apart:

* the vendor's own errors (a C++ ``EP_HOST_ASSERT`` surfaces as ``RuntimeError``, a Python
  ``assert`` as ``AssertionError``, a ``TORCH_CHECK`` as ``RuntimeError``): the models raise the
  same exception types with the vendor's condition in the message;
* :class:`VendorContractError`: the call breaks a rule the vendor states (or its kernels rely
  on) but does not check: the real library would corrupt memory, read stale data or return
  garbage. The model makes the violation loud;
* :class:`SimulatedHang`: the ranks disagree in a way that makes the real kernels spin forever
  (different max-token counts, a rank skipping a call). The model detects it with one extra
  all-gather per collective call and raises on every rank. An adapter that checks its inputs
  up front must raise its own error *before* the model gets to raise this one.

Where the vendor leaves something unspecified (the order of rows inside an expert, the content
of padding rows), the models pick adversarially: a seeded shuffle and 0xFF bytes (NaN in every
floating dtype, -1 in every signed integer dtype), so that an adapter relying on it fails.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "ModelNotImplementedError",
    "SimulatedHang",
    "VendorContractError",
    "agree",
    "alltoallv",
    "order_generator",
    "poison_",
    "set_order_seed",
]


class VendorContractError(RuntimeError):
    """A rule of the vendor API is broken that the real library does not check (contract model).

    The real kernels would corrupt memory, read stale buffers or return garbage here.
    """


class SimulatedHang(VendorContractError):
    """The ranks disagree in a way that hangs the real kernels; raised on every rank (model)."""


class ModelNotImplementedError(NotImplementedError):
    """A real vendor feature that the contract model deliberately does not model."""


_ORDER_SEED = [0]
_ORDER_CALLS = itertools.count()


def set_order_seed(seed: int) -> None:
    """Seed of the shuffles that stand in for the vendors' unspecified row orders."""
    _ORDER_SEED[0] = int(seed)


def order_generator(rank: int) -> torch.Generator:
    """A fresh generator per call: shuffles differ between calls but replay for a seed."""
    gen = torch.Generator()
    gen.manual_seed(_ORDER_SEED[0] * 1_000_003 + rank * 7919 + next(_ORDER_CALLS))
    return gen


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` (any dtype, any strides) with 0xFF bytes: NaN for floats, -1 for ints."""
    if t.numel() == 0:
        return t
    if t.dtype.is_floating_point:
        # 0xFF.. is a NaN pattern in bf16 / fp16 / fp32 / fp64 / fp8 e4m3fn and e5m2.
        pattern = torch.full((t.numel() * t.element_size(),), 255, dtype=torch.uint8)
        t.copy_(pattern.view(t.dtype).reshape(t.shape))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(-1 if t.dtype.is_signed else torch.iinfo(t.dtype).max)
    return t


def agree(group: Any, what: str, key: Any) -> list[Any]:
    """All-gather ``key``; raise :class:`SimulatedHang` on every rank if the ranks differ.

    ``key`` must be picklable and comparable. Returns the gathered list (rank order).
    """
    world = dist.get_world_size(group)
    keys: list[Any] = [None] * world
    dist.all_gather_object(keys, key, group=group)
    if any(k != keys[0] for k in keys):
        listing = "; ".join(f"rank {r}: {k!r}" for r, k in enumerate(keys))
        raise SimulatedHang(
            f"{what}: the ranks disagree ({listing}); the real kernels would wait forever for "
            "the peers that took another path"
        )
    return keys


def alltoallv(send: Sequence[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """Exchange one tensor per peer; returns what each peer sent here, in rank order.

    Args:
        send: ``send[j]`` goes to rank ``j``: ``[n_j, *row]`` tensors of one dtype and one row
            shape on every rank (``n_j`` may be 0 and differ between peers).
        group: the process group (gloo, CPU tensors).

    Returns:
        ``recv[i]``: the ``[m_i, *row]`` tensor rank ``i`` addressed to this rank.
    """
    world = dist.get_world_size(group)
    if len(send) != world:
        raise ValueError(f"alltoallv needs one tensor per rank ({world}), got {len(send)}")
    dtype, row = send[0].dtype, tuple(send[0].shape[1:])
    row_bytes = int(torch.Size(row).numel()) * send[0].element_size()
    counts = torch.tensor([t.shape[0] for t in send], dtype=torch.int64)
    recv_counts = torch.empty(world, dtype=torch.int64)
    dist.all_to_all_single(recv_counts, counts, group=group)
    if row_bytes == 0:
        return [torch.empty((int(c), *row), dtype=dtype) for c in recv_counts.tolist()]
    # Bytes, so that every dtype (fp8 included) crosses gloo unchanged.
    flat = torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in send])
    out = torch.empty(int(recv_counts.sum()) * row_bytes, dtype=torch.uint8)
    dist.all_to_all_single(
        out, flat, [int(c) * row_bytes for c in recv_counts], [int(c) * row_bytes for c in counts],
        group=group,
    )
    parts, start = [], 0
    for c in recv_counts.tolist():
        parts.append(out[start:start + c * row_bytes].view(dtype).reshape((c, *row)))
        start += c * row_bytes
    return parts
