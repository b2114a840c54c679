"""Which rank owns which expert: the contiguous placement every manager uses.

With E experts on W ranks, rank r owns `E // W + (r < E % W)` experts starting at
`r * (E // W) + min(r, E % W)`: the first `E % W` ranks hold one extra expert, and a rank may
own none when E < W.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

__all__ = ["ExpertPlacement", "expert_placement"]


@dataclass(frozen=True)
class ExpertPlacement:
    """Contiguous placement of `num_experts` experts on `ep_size` ranks (see module docstring)."""

    num_experts: int
    ep_size: int

    def __post_init__(self) -> None:
        for name in ("num_experts", "ep_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @cached_property
    def counts(self) -> tuple[int, ...]:
        """Number of experts per rank, `[W]`."""
        base, extra = divmod(self.num_experts, self.ep_size)
        return tuple(base + (r < extra) for r in range(self.ep_size))

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """First global expert id of each rank, `[W]`."""
        base, extra = divmod(self.num_experts, self.ep_size)
        return tuple(r * base + min(r, extra) for r in range(self.ep_size))

    @property
    def max_local(self) -> int:
        """The largest number of experts one rank owns (`ceil(E / W)`)."""
        return -(-self.num_experts // self.ep_size)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank must be in [0, {self.ep_size}), got {rank}")

    def num_local(self, rank: int) -> int:
        self._check_rank(rank)
        return self.counts[rank]

    def first(self, rank: int) -> int:
        self._check_rank(rank)
        return self.starts[rank]

    def local_range(self, rank: int) -> range:
        """Global ids of the experts `rank` owns."""
        return range(self.first(rank), self.first(rank) + self.num_local(rank))

    @cached_property
    def owner_cpu(self) -> torch.Tensor:
        """`[E] int64` on the CPU: the rank owning each global expert."""
        counts = torch.tensor(self.counts, dtype=torch.int64)
        return torch.repeat_interleave(torch.arange(self.ep_size), counts)

    @cached_property
    def local_index_cpu(self) -> torch.Tensor:
        """`[E] int64` on the CPU: each expert's index among its owner's experts."""
        return torch.arange(self.num_experts) - torch.tensor(self.starts)[self.owner_cpu]

    def owner_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """`owner_cpu` on `device` (copied there once; shared: read it, never write it)."""
        return self._on(device, "owner_cpu")

    def local_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """`local_index_cpu` on `device` (copied there once; shared: read it, never write it)."""
        return self._on(device, "local_index_cpu")

    def _on(self, device: torch.device | str, name: str) -> torch.Tensor:
        key = (str(device), name)
        table = self._device_tables.get(key)
        if table is None:
            table = self._device_tables[key] = getattr(self, name).to(device)
        return table

    @cached_property
    def _device_tables(self) -> dict[tuple[str, str], torch.Tensor]:
        return {}

    def owners(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Owner rank of each id (same shape, int64), -1 where the id is -1."""
        table = self.owner_table(topk_ids.device)
        ids = topk_ids.long()
        return torch.where(ids >= 0, table[ids.clamp(min=0)], torch.full_like(ids, -1))

    def to_local(self, topk_ids: torch.Tensor, rank: int) -> torch.Tensor:
        """Local expert index on `rank` (int64, same shape), -1 where another rank owns it."""
        ids = topk_ids.long()
        lo = self.first(rank)
        mine = (ids >= lo) & (ids < lo + self.num_local(rank))
        return torch.where(mine, ids - lo, torch.full_like(ids, -1))


def expert_placement(num_experts: int, ep_size: int) -> ExpertPlacement:
    """Return the contiguous placement of `num_experts` experts on `ep_size` ranks: one
    shared object per `(num_experts, ep_size)`, so that managers asking for it on every call
    build its tables once."""
    if type(num_experts) is int and type(ep_size) is int:
        return _shared_placement(num_experts, ep_size)
    return ExpertPlacement(num_experts, ep_size)  # raises the argument's TypeError


@lru_cache(maxsize=256)
def _shared_placement(num_experts: int, ep_size: int) -> ExpertPlacement:
    return ExpertPlacement(num_experts, ep_size)
