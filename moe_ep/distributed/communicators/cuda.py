"""CUDA tensors: NCCL over the group's `device_group`, with the CUDA IPC custom all-reduce as
the fast path for small tensors on one node.

The custom all-reduce (`moe_ep.distributed.custom_all_reduce`) is set up once, at construction,
when the group qualifies (world size in {2, 4, 6, 8}, one node, P2P between every pair, the
native library built); otherwise the reason is logged and every all-reduce uses NCCL. Per call,
`should_custom_ar` decides (size, dtype, alignment, contiguity); a tensor that does not qualify
goes to NCCL. Both paths give the same sum; the custom one sums in fp32 in rank order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from moe_ep.distributed.communicators.gloo import TorchDistributedCommunicator
from moe_ep.distributed.custom_all_reduce import CustomAllreduce

# torch 2.13 renamed all_gather_into_tensor (the old name warns); older torch has only that.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CudaCommunicator(TorchDistributedCommunicator):
    """NCCL collectives (+ custom all-reduce) for CUDA tensors on `device`.

    Args (beyond `DeviceCommunicatorBase`'s):
        device: this rank's CUDA device.
        same_node: every rank of the group is on one node.
        use_custom_allreduce: try the CUDA IPC all-reduce (it may still be unavailable).
    """

    transport = "nccl"

    def __init__(
        self,
        cpu_group: ProcessGroup,
        device_group: ProcessGroup,
        ranks: Sequence[int],
        rank_in_group: int,
        unique_name: str,
        *,
        device: torch.device,
        same_node: bool,
        use_custom_allreduce: bool = True,
    ):
        super().__init__(cpu_group, device_group, ranks, rank_in_group, unique_name)
        self._device = device
        self.ca_comm: CustomAllreduce | None = None
        if use_custom_allreduce:
            ca = CustomAllreduce(
                cpu_group, device, rank_in_group, self.world_size, same_node=same_node,
                group_name=unique_name,
            )
            self.ca_comm = None if ca.disabled else ca

    @property
    def group(self) -> ProcessGroup:
        return self.device_group

    @property
    def device(self) -> torch.device:
        return self._device

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        ca = self.ca_comm
        if ca is not None and ca.should_custom_ar(x):
            return ca.custom_all_reduce(x, out)
        return super().all_reduce(x, out)

    def reduce_scatterv(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        out = x.new_empty((sizes[self.rank_in_group], *x.shape[1:]))
        dist.reduce_scatter(out, list(x.split(sizes)), group=self.group)
        return out

    def _gather_flat(self, x: torch.Tensor) -> torch.Tensor:
        """`[W * x.numel()]`: every rank's `x`, flattened, in rank order (one NCCL call)."""
        flat = x.new_empty((self.world_size * x.numel(),))
        _all_gather_single(flat, x.reshape(-1), group=self.group)
        return flat

    def _gather_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Views of one flat gather (NCCL's list form would copy each part out of it).
        return list(self._gather_flat(x).view(self.world_size, *x.shape).unbind(0))

    def all_gather(
        self, x: torch.Tensor, dim: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        flat = self._gather_flat(x)
        shape = list(x.shape)
        shape[dim] *= self.world_size
        result = flat.view(self.world_size, *x.shape).movedim(0, dim).reshape(shape)
        if out is None:
            return result
        return out.copy_(result)

    def destroy(self) -> None:
        if self.ca_comm is not None:
            self.ca_comm.close()
            self.ca_comm = None
