"""The CPU shared-memory transport as a communicator (wraps `moe_ep.distributed.shm`).

Built by `GroupCoordinator` for a CPU group whose ranks share one node (see
`SharedMemoryCommunicator.create`). Its rules, in this one place:

* reductions (all-reduce, reduce-scatter) of fp32 / bf16 / fp16 go through shared memory,
  summed in fp32 in rank order (identical bits on every rank); other dtypes go to gloo;
* data movement (gathers, all-to-all, point to point) of every dtype in `CARRIED_DTYPES` goes
  through shared memory; the rest, and `broadcast`, go to gloo;
* an all-gather lands in its output with one copy out of shared memory, also along an inner dim.

Outputs are fresh tensors unless the caller passes `out`. So that a fresh output does not pay a
page fault per 4 KiB page (glibc hands large freed blocks back to the kernel), the first
shared-memory group of a process makes glibc keep freed memory
(`moe_ep.cpu_allocator.tune_cpu_allocator`), logging it once;
`moe_ep.distributed.set_retain_freed_memory(False)` before building groups opts out.

Failure: a dead, stuck or interrupted peer raises `ShmError` (naming it) on every rank, within
the group's timeout; SIGINT reaches a waiting rank as KeyboardInterrupt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from moe_ep.cpu_allocator import tune_cpu_allocator
from moe_ep.distributed.communicators.base import DeviceCommunicatorBase
from moe_ep.distributed.communicators.gloo import GlooCommunicator
from moe_ep.distributed.shm import (
    CARRIED_DTYPES,
    REDUCE_DTYPES,
    ShmCommunicator,
    ShmUnavailableError,
)


class SharedMemoryCommunicator(DeviceCommunicatorBase):
    """Collectives through one shared-memory segment; gloo for what it does not carry.

    Args (beyond `DeviceCommunicatorBase`'s):
        shm: the group's live `ShmCommunicator` (owned: destroyed by `destroy`).
        fallback: the group's gloo communicator.
    """

    transport = "shm"

    def __init__(
        self,
        cpu_group: ProcessGroup,
        ranks: Sequence[int],
        rank_in_group: int,
        unique_name: str,
        shm: ShmCommunicator,
        fallback: GlooCommunicator,
    ):
        super().__init__(cpu_group, cpu_group, ranks, rank_in_group, unique_name)
        self.shm = shm
        self.fallback = fallback

    @classmethod
    def create(
        cls,
        cpu_group: ProcessGroup,
        ranks: Sequence[int],
        rank_in_group: int,
        unique_name: str,
        fallback: GlooCommunicator,
        timeout_s: float,
    ) -> tuple[SharedMemoryCommunicator | None, str]:
        """The communicator, or None and why not (collective: every rank gets the same answer).

        The caller has established that every rank is on one node."""
        usable = [None] * len(ranks)
        dist.all_gather_object(usable, ShmCommunicator.available(), group=cpu_group)
        bad = [f"rank {r}: {why}" for r, (ok, why) in enumerate(usable) if not ok]
        if bad:
            return None, "the native library is unavailable (" + "; ".join(bad) + ")"
        try:
            shm = ShmCommunicator(
                cpu_group, rank_in_group, len(ranks), unique_name, timeout_s=timeout_s
            )
        except ShmUnavailableError as e:
            # Raised on every rank alike (e.g. /dev/shm full, ranks in separate containers).
            return None, f"the segment could not be set up: {e}"
        tune_cpu_allocator(f"group {unique_name!r}")
        return cls(cpu_group, ranks, rank_in_group, unique_name, shm, fallback), (
            f"{shm.segment_bytes} bytes of shared memory, timeout {timeout_s:g} s"
        )

    # ------------------------------------------------------------------ reductions
    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype not in REDUCE_DTYPES:
            return self.fallback.all_reduce(x, out)
        return self.shm.all_reduce(x.contiguous(), out)

    def reduce_scatterv(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        if x.dtype not in REDUCE_DTYPES:
            return self.fallback.reduce_scatterv(x, sizes)
        row = x[0].numel() if x.shape[0] else 0
        flat = self.shm.reduce_scatter(x.reshape(-1), [n * row for n in sizes])
        return flat.view(sizes[self.rank_in_group], *x.shape[1:])

    # ---------------------------------------------------------------- data movement
    def all_gather(
        self, x: torch.Tensor, dim: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.dtype not in CARRIED_DTYPES:
            return self.fallback.all_gather(x, dim, out)
        if out is None:
            shape = list(x.shape)
            shape[dim] *= self.world_size
            out = x.new_empty(shape)
        return self.shm.all_gather_into(x, out, dim)

    def all_gatherv(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        if x.dtype not in CARRIED_DTYPES:
            return self.fallback.all_gatherv(x, sizes)
        return self.shm.all_gather_flat(x)

    def gather(self, x: torch.Tensor, dst: int, dim: int) -> torch.Tensor | None:
        if x.dtype not in CARRIED_DTYPES:
            return self.fallback.gather(x, dst, dim)
        parts = self.shm.gather(x, dst)
        return None if parts is None else torch.cat(parts, dim=dim)

    def all_to_all(
        self, x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int]
    ) -> torch.Tensor:
        if x.dtype not in CARRIED_DTYPES:
            return self.fallback.all_to_all(x, output_split_sizes, input_split_sizes)
        out = self.shm.all_to_all_single(x, input_split_sizes)
        if out.shape[0] != sum(output_split_sizes):
            raise RuntimeError(
                f"{self.unique_name}: all_to_all_single expected {sum(output_split_sizes)} rows "
                f"in all (output_split_sizes={output_split_sizes}), got {out.shape[0]}"
            )
        return out

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        return self.fallback.broadcast(x, src)

    # --------------------------------------------------------------- point to point
    def send(self, x: torch.Tensor, dst: int) -> None:
        self.send_tensor_list([x], dst)

    def recv(self, size: Sequence[int], dtype: torch.dtype, src: int) -> torch.Tensor:
        out = torch.empty(tuple(size), dtype=dtype)
        self.recv_tensor_list_into([out], src)
        return out

    def send_tensor_list(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        if any(t.dtype not in CARRIED_DTYPES for t in tensors):
            return self.fallback.send_tensor_list(tensors, dst)
        self.shm.send_tensor_list(tensors, dst)

    def recv_tensor_list_into(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        if any(t.dtype not in CARRIED_DTYPES for t in tensors):
            return self.fallback.recv_tensor_list_into(tensors, src)
        self.shm.recv_tensor_list_into(tensors, src)

    def destroy(self) -> None:
        self.shm.destroy()
