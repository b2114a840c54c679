"""DeviceCommunicatorBase: one transport's collectives for one process group (vLLM's name).

`GroupCoordinator` validates every argument (types, ranks, sizes, dims), handles a group of one
rank, and hands each call to the communicator of the tensor's device, which it picked once at
construction. A communicator therefore sees only valid calls on a group of >= 2 ranks; what it
adds is its transport's own rules (which dtypes and sizes it takes, and what it hands to another
transport otherwise). Ranks (`src`, `dst`) are ranks *in the group*.

Semantics shared by every transport (and checked by the same tests for each):

* `all_reduce(x, out)` sums into `out` (a new tensor when None; `out is x` is in place), never
  modifying `x` otherwise, and returns `out`.
* Every op that returns a tensor returns a new one that the caller owns (or the caller's `out`).
* Failure: a transport error (a dead peer, a timeout) raises; the group is then unusable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch.distributed import ProcessGroup


class DeviceCommunicatorBase(ABC):
    """The collectives of one transport on one group.

    Args:
        cpu_group: the group's gloo process group.
        device_group: the group's device process group (NCCL on CUDA; `cpu_group` on CPU).
        ranks: the group's global ranks, in group order.
        rank_in_group: this rank's index in `ranks`.
        unique_name: the group's label, for logs and errors.
    """

    #: transport name, for logs and `repr` ("gloo", "shm", "nccl")
    transport: str = "?"

    def __init__(
        self,
        cpu_group: ProcessGroup,
        device_group: ProcessGroup,
        ranks: Sequence[int],
        rank_in_group: int,
        unique_name: str,
    ):
        self.cpu_group = cpu_group
        self.device_group = device_group
        self.ranks = list(ranks)
        self.rank_in_group = rank_in_group
        self.world_size = len(self.ranks)
        self.unique_name = unique_name

    # ------------------------------------------------------------------ reductions
    @abstractmethod
    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of `x` (any shape) over the group, in `out` (new when None, may be `x`)."""

    @abstractmethod
    def reduce_scatterv(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Sum contiguous `x` `[sum(sizes), ...]` over the group; this rank's rows
        `[sizes[rank], ...]` (a new tensor)."""

    # ---------------------------------------------------------------- data movement
    @abstractmethod
    def all_gather(
        self, x: torch.Tensor, dim: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every rank's contiguous `x` (equal shapes) concatenated along `dim` (>= 0), in
        `out` (new when None; contiguous, x's shape with `dim` times world_size)."""

    @abstractmethod
    def all_gatherv(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's contiguous rows `x` `[sizes[rank], ...]` concatenated along dim 0."""

    @abstractmethod
    def gather(self, x: torch.Tensor, dst: int, dim: int) -> torch.Tensor | None:
        """Every rank's contiguous `x` (equal shapes) concatenated along `dim` on rank `dst`;
        None elsewhere."""

    @abstractmethod
    def all_to_all(
        self, x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int]
    ) -> torch.Tensor:
        """Rows `x[sum(input_split_sizes[:r]) ...]` (contiguous `[rows, ...]`) go to rank r;
        returns `[sum(output_split_sizes), ...]`, what each rank sent here, in rank order."""

    @abstractmethod
    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite contiguous `x` with rank `src`'s, in place; returns `x`."""

    # --------------------------------------------------------------- point to point
    @abstractmethod
    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send contiguous `x` to rank `dst`, which calls `recv` with its size and dtype."""

    @abstractmethod
    def recv(self, size: Sequence[int], dtype: torch.dtype, src: int) -> torch.Tensor:
        """A new tensor `[*size]` of `dtype` holding what rank `src` sent with `send`."""

    def send_tensor_list(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        """Send contiguous non-empty tensors to `dst`, in order (its `recv_tensor_list_into`
        knows their shapes and dtypes)."""
        for t in tensors:
            self.send(t, dst)

    def recv_tensor_list_into(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        """Fill preallocated tensors with what `src` sent with `send_tensor_list`."""
        for t in tensors:
            t.copy_(self.recv(t.shape, t.dtype, src))

    # ------------------------------------------------------------------ lifecycle
    def destroy(self) -> None:  # noqa: B027 - most transports own nothing beyond the groups
        """Release what this communicator owns (not the process groups: the coordinator's)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(group={self.unique_name!r}, rank={self.rank_in_group}/"
            f"{self.world_size})"
        )
