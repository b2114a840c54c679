"""Topology: what the ranks of one group run on, as a plain value.

Selection policy (configs, `availability()`) is a pure function of a `Topology`, so it can be
tested without processes: build one by hand, or call `Topology.detect(group)` on a live group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_ep.distributed.group import GroupCoordinator

_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Topology:
    """The hardware seen by the ranks of one group.

    Attributes:
        device: "cpu" or "cuda".
        world_size: ranks in the group.
        rank: this rank's index in the group.
        local_world_size: ranks of the group on this rank's node.
        same_node: per rank of the group, whether it shares a node with the group's rank 0.
        nvlink: all GPUs of the group fully connected by NVLink (None when unknown or CPU).
        gpus_per_node: CUDA devices visible on this node (0 on CPU).
    """

    device: str = "cpu"
    world_size: int = 1
    rank: int = 0
    local_world_size: int = 1
    same_node: tuple[bool, ...] = (True,)
    nvlink: bool | None = None
    gpus_per_node: int = 0

    def __post_init__(self) -> None:
        if self.device not in _DEVICES:
            raise ValueError(f"Topology.device must be one of {_DEVICES}, got {self.device!r}")
        if self.world_size < 1:
            raise ValueError(f"Topology.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"Topology.rank must be in [0, {self.world_size}), got {self.rank}"
            )
        if not 1 <= self.local_world_size <= self.world_size:
            raise ValueError(
                f"Topology.local_world_size must be in [1, world_size={self.world_size}], "
                f"got {self.local_world_size}"
            )
        same_node = tuple(bool(s) for s in self.same_node)
        if len(same_node) == 1 and self.world_size > 1 and same_node[0]:
            # Shorthand: Topology(world_size=8) means one node.
            same_node = (True,) * self.world_size
        if len(same_node) != self.world_size:
            raise ValueError(
                f"Topology.same_node must have world_size={self.world_size} entries, "
                f"got {len(same_node)}"
            )
        object.__setattr__(self, "same_node", same_node)
        if self.gpus_per_node < 0:
            raise ValueError(f"Topology.gpus_per_node must be >= 0, got {self.gpus_per_node}")

    @property
    def internode(self) -> bool:
        """True when the group spans more than one node."""
        return not all(self.same_node)

    @property
    def num_nodes(self) -> int:
        """Nodes spanned by the group, assuming equal ranks per node."""
        return max(1, -(-self.world_size // self.local_world_size))

    @classmethod
    def detect(cls, group: GroupCoordinator | None = None) -> Topology:
        """Detect the topology of `group` (collective over its ranks), or of this process alone."""
        device = "cuda" if (group is not None and group.device.type == "cuda") else "cpu"
        if group is None and torch.cuda.is_available():
            device = "cuda"
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if group is None or group.world_size == 1:
            nvlink = nvlink_all_connected(gpus) if device == "cuda" else None
            return cls(device=device, gpus_per_node=gpus, nvlink=nvlink)
        same_node = group.same_node_flags  # probed when the group was built
        # Ranks on my node: those sharing rank 0's node, assuming a homogeneous job (the same
        # number of ranks on every node, as torchrun launches it).
        local = same_node.count(True)
        nvlink = nvlink_all_connected(gpus) if device == "cuda" else None
        return cls(
            device=device,
            world_size=group.world_size,
            rank=group.rank_in_group,
            local_world_size=min(local, group.world_size),
            same_node=same_node,
            nvlink=nvlink,
            gpus_per_node=gpus,
        )

    def describe(self) -> str:
        """One line for logs and the CLI."""
        link = {None: "unknown", True: "yes", False: "no"}[self.nvlink]
        return (
            f"device={self.device} world_size={self.world_size} nodes={self.num_nodes} "
            f"local_world_size={self.local_world_size} internode={self.internode} "
            f"nvlink={link} gpus_per_node={self.gpus_per_node}"
        )


def nvlink_all_connected(num_gpus: int) -> bool | None:
    """Whether every pair of the first `num_gpus` GPUs can reach each other by peer access.

    Peer access is the portable proxy torch offers; NVML would distinguish NVLink from PCIe P2P
    but is not a dependency. None when it cannot be determined.
    """
    if num_gpus < 2:
        return None
    try:
        return all(
            torch.cuda.can_device_access_peer(a, b)
            for a in range(num_gpus)
            for b in range(num_gpus)
            if a != b
        )
    except RuntimeError:
        return None
