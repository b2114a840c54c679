"""HandleCache: one handle per distinct kwargs, thread-safe creation, clear() destroys."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moe_ep.managers import HandleCache


class _Buffer:
    """A stand-in handle recording its construction kwargs and whether it was destroyed."""

    created = 0

    def __init__(self, **kwargs):
        type(self).created += 1
        self.kwargs = kwargs
        self.destroyed = 0

    def destroy(self):
        self.destroyed += 1


def test_same_kwargs_same_object_in_any_order():
    cache = HandleCache()
    a = cache.get_or_create({"hidden": 1024, "dtype": torch.bfloat16}, _Buffer)
    b = cache.get_or_create({"dtype": torch.bfloat16, "hidden": 1024}, _Buffer)
    assert a is b
    assert a.kwargs == {"hidden": 1024, "dtype": torch.bfloat16}
    assert len(cache) == 1 and {"hidden": 1024, "dtype": torch.bfloat16} in cache


def test_different_kwargs_different_objects():
    cache = HandleCache()
    a = cache.get_or_create({"hidden": 1024}, _Buffer)
    b = cache.get_or_create({"hidden": 2048}, _Buffer)
    c = cache.get_or_create({"hidden": 1024, "max_tokens": 128}, _Buffer)
    d = cache.get_or_create({"hidden": 1024, "dtype": torch.float32}, _Buffer)
    assert len({id(a), id(b), id(c), id(d)}) == 4
    assert len(cache) == 4


def test_clear_destroys_everything_once_and_empties():
    cache = HandleCache()
    handles = [cache.get_or_create({"hidden": h}, _Buffer) for h in (1, 2, 3)]
    plain = cache.get_or_create({"hidden": 4}, lambda hidden: object())  # no destroy(): fine
    cache.clear()
    assert [h.destroyed for h in handles] == [1, 1, 1]
    assert len(cache) == 0 and {"hidden": 1} not in cache
    fresh = cache.get_or_create({"hidden": 1}, _Buffer)
    assert fresh is not handles[0] and fresh.destroyed == 0
    assert plain is not None


def test_clear_destroys_the_rest_when_one_destroy_fails():
    class Failing(_Buffer):
        def destroy(self):
            super().destroy()
            raise RuntimeError("device gone")

    cache = HandleCache()
    good = cache.get_or_create({"k": 1}, _Buffer)
    cache.get_or_create({"k": 2}, Failing)
    later = cache.get_or_create({"k": 3}, _Buffer)
    with pytest.raises(RuntimeError, match="device gone"):
        cache.clear()
    assert good.destroyed == 1 and later.destroyed == 1 and len(cache) == 0


@pytest.mark.parametrize(
    "kwargs,name",
    [({"sizes": [1, 2]}, "sizes"), ({"hidden": 8, "t": torch.zeros(2)}, "t"), ({"d": {}}, "d")],
)
def test_unhashable_values_are_rejected_by_name(kwargs, name):
    cache = HandleCache()
    with pytest.raises(
        TypeError, match=f"handle kwarg '{name}' (has unhashable value|is a tensor)"
    ):
        cache.get_or_create(kwargs, _Buffer)
    assert len(cache) == 0


def test_bad_factory_and_keys():
    cache = HandleCache()
    with pytest.raises(TypeError, match="factory must be callable"):
        cache.get_or_create({"a": 1}, None)
    with pytest.raises(TypeError, match="keyed by str"):
        cache.get_or_create({1: 1}, _Buffer)


def test_concurrent_requests_create_one_handle_per_key():
    created = []

    def slow_factory(**kwargs):
        time.sleep(0.01)  # widen the race window
        obj = _Buffer(**kwargs)
        created.append(obj)
        return obj

    cache = HandleCache()
    got: list[list] = [[] for _ in range(16)]
    start = threading.Barrier(16)

    def worker(i):
        start.wait()
        for hidden in (1, 2, 1, 2):
            got[i].append(cache.get_or_create({"hidden": hidden}, slow_factory))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(created) == 2
    by_hidden = {h.kwargs["hidden"]: h for h in created}
    for seq in got:
        assert [h.kwargs["hidden"] for h in seq] == [1, 2, 1, 2]
        assert all(h is by_hidden[h.kwargs["hidden"]] for h in seq)


def test_factory_may_use_the_cache_reentrantly():
    cache = HandleCache()

    def outer(**kwargs):
        inner = cache.get_or_create({"level": "inner"}, _Buffer)
        return ("outer", inner)

    first = cache.get_or_create({"level": "outer"}, outer)
    assert first[1] is cache.get_or_create({"level": "inner"}, _Buffer)


# ------------------------------------------------------------- a manager's cache lifecycle


def _manager_handles(info) -> tuple:
    """A manager subclass with per-spec buffers: get_handle caches by spec, destroy() frees."""
    from moe_ep.distributed import GroupCoordinator
    from moe_ep.managers import EPHandle, EPSpec
    from moe_ep.managers.agrs import AgRsAll2AllManager

    released = []

    class Buffered(AgRsAll2AllManager):
        def _create_handle(self, spec, index):
            class Owned(EPHandle):
                def _release(self):
                    released.append(self.spec.hidden)

            return Owned(self, spec, index)

    group = GroupCoordinator([list(range(info.world_size))], "ep")
    try:
        mgr = Buffered(group)
        a = mgr.get_handle(EPSpec(hidden=16, num_experts=4, topk=2))
        same = mgr.get_handle(EPSpec(hidden=16, num_experts=4, topk=2)) is a
        b = mgr.get_handle(EPSpec(hidden=32, num_experts=4, topk=2))
        before = (a.destroyed, b.destroyed, list(released))
        mgr.destroy()
        after = (a.destroyed, b.destroyed, sorted(released))
        try:
            mgr.get_handle(EPSpec(hidden=16, num_experts=4, topk=2))
        except RuntimeError as exc:
            refused = "destroyed" in str(exc)
        else:
            refused = False
    finally:
        group.destroy()
    return same, a is not b, (a.index, b.index), before, after, refused


def test_manager_destroy_clears_its_cache(dist_pool):
    [result] = dist_pool(1).run(_manager_handles, timeout=60)
    assert result == (True, True, (0, 1), (False, False, []), (True, True, [16, 32]), True)
