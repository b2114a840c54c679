"""Shared fixtures: reusable multi-process pools (spawning ranks costs seconds on 2 cores)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from moe_ep.testing import DistributedPool


@pytest.fixture(scope="session")
def dist_pool() -> Iterator[Callable[[int], DistributedPool]]:
    """`dist_pool(world_size)`: a cached CPU pool of that size, replaced when a run broke it."""
    pools: dict[int, DistributedPool] = {}

    def get(world_size: int) -> DistributedPool:
        pool = pools.get(world_size)
        if pool is None or pool.broken:
            if pool is not None:
                pool.close()
            pool = pools[world_size] = DistributedPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        pool.close()
