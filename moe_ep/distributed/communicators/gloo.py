"""torch.distributed over one process group: gloo for CPU tensors (and the NCCL base).

gloo has no reduce-scatter and its all-gather needs equal shapes, so `reduce_scatterv` is an
all-reduce plus a slice and `all_gatherv` pads every rank to the longest extent: both exact.
Errors are torch.distributed's (a dead peer or the group's timeout raises on the survivors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from moe_ep.distributed.communicators.base import DeviceCommunicatorBase


class TorchDistributedCommunicator(DeviceCommunicatorBase):
    """Every collective as the torch.distributed call on `self.group`."""

    transport = "torch.distributed"

    @property
    def group(self) -> ProcessGroup:
        return self.cpu_group

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = x.clone(memory_format=torch.contiguous_format)
        elif out is not x:
            out.copy_(x)
        dist.all_reduce(out, group=self.group)
        return out

    def reduce_scatterv(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        start = sum(sizes[: self.rank_in_group])
        return self.all_reduce(x)[start : start + sizes[self.rank_in_group]]

    def all_gather(
        self, x: torch.Tensor, dim: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.cat(self._gather_parts(x), dim=dim, out=out)

    def _gather_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x`, one tensor per rank (what `dist.all_gather` fills)."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return parts

    def all_gatherv(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        longest = max(sizes)
        if longest == 0:
            return x.new_empty(x.shape)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        # Trim each rank's padded part straight into the result (one copy, not a cat of all
        # the padded parts first).
        parts = self._gather_parts(padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    def gather(self, x: torch.Tensor, dst: int, dim: int) -> torch.Tensor | None:
        mine = self.rank_in_group == dst
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if mine else None
        dist.gather(x, parts, dst=self.ranks[dst], group=self.group)
        return torch.cat(parts, dim=dim) if mine else None

    def all_to_all(
        self, x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int]
    ) -> torch.Tensor:
        out = x.new_empty((sum(output_split_sizes), *x.shape[1:]))
        dist.all_to_all_single(out, x, output_split_sizes, input_split_sizes, group=self.group)
        return out

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        dist.broadcast(x, src=self.ranks[src], group=self.group)
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        dist.send(x, dst=self.ranks[dst], group=self.group)

    def recv(self, size: Sequence[int], dtype: torch.dtype, src: int) -> torch.Tensor:
        out = torch.empty(tuple(size), dtype=dtype, device=self.device)
        dist.recv(out, src=self.ranks[src], group=self.group)
        return out

    def recv_tensor_list_into(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        for t in tensors:
            dist.recv(t, src=self.ranks[src], group=self.group)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


class GlooCommunicator(TorchDistributedCommunicator):
    """gloo over the group's `cpu_group`: any CPU tensor, any dtype torch.distributed takes."""

    transport = "gloo"
