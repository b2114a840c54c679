"""The collective layer: communicators picked once per group, the `out=` forms of all-reduce and
all-gather, vLLM's `tensor_model_parallel_*` functions, and the shm layer's strided all-gather.

Expected values are computed on every rank from seeds (single-process references).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist

from moe_ep.distributed import (
    GroupCoordinator,
    broadcast_tensor_dict,
    destroy_model_parallel,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    initialize_model_parallel,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
    tensor_model_parallel_gather,
    tensor_model_parallel_reduce_scatter,
)
from moe_ep.distributed.shm import ShmCommunicator

SHM = ShmCommunicator.available()[0]


def _x(rank: int, shape, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 + rank)
    return torch.randint(-8, 8, shape, generator=g).to(dtype)  # exact sums in every dtype


# ------------------------------------------------------------ tensor_model_parallel_*
def _tp_functions(info, tp: int) -> str:
    initialize_model_parallel(tensor_parallel_size=tp)
    try:
        r = info.rank
        tp_rank, peers = r % tp, [r - r % tp + k for k in range(tp)]
        assert get_tensor_model_parallel_world_size() == tp
        assert get_tensor_model_parallel_rank() == tp_rank
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            x = _x(r, (4 * tp, 6), dtype)
            want = sum(_x(p, (4 * tp, 6), dtype) for p in peers)
            got = tensor_model_parallel_all_reduce(x)
            assert got.dtype == dtype and torch.equal(got, want), dtype
            for dim in (0, 1, -1):
                assert torch.equal(
                    tensor_model_parallel_all_gather(x, dim),
                    torch.cat([_x(p, (4 * tp, 6), dtype) for p in peers], dim=dim),
                ), (dtype, dim)
            rs = tensor_model_parallel_reduce_scatter(x, dim=0)
            assert torch.equal(rs, want.chunk(tp, 0)[tp_rank]), dtype
            rs = tensor_model_parallel_reduce_scatter(x.t().contiguous())  # dim=-1
            assert torch.equal(rs, want.t().chunk(tp, 1)[tp_rank]), dtype
            for dst in range(tp):
                got = tensor_model_parallel_gather(x, dst, dim=1)
                if tp_rank == dst:
                    assert torch.equal(got, torch.cat([_x(p, (4 * tp, 6), dtype) for p in peers],
                                                      dim=1))
                else:
                    assert got is None
        d = {"a": _x(peers[0], (3, 2)), "n": 5, "s": "text"}
        got = broadcast_tensor_dict(d if tp_rank == 0 else None, src=0)
        assert torch.equal(got["a"], d["a"]) and got["n"] == 5 and got["s"] == "text"
        return "ok"
    finally:
        destroy_model_parallel()


@pytest.mark.parametrize("world_size,tp", [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_tensor_model_parallel_functions_match_single_process(dist_pool, world_size, tp):
    assert dist_pool(world_size).run(_tp_functions, tp, timeout=180) == ["ok"] * world_size


@pytest.mark.parametrize("fn,args", [
    (tensor_model_parallel_all_reduce, (torch.ones(2),)),
    (tensor_model_parallel_all_gather, (torch.ones(2), 0)),
    (tensor_model_parallel_reduce_scatter, (torch.ones(2), 0)),
    (tensor_model_parallel_gather, (torch.ones(2),)),
    (broadcast_tensor_dict, ({"a": 1},)),
    (get_tensor_model_parallel_world_size, ()),
])
def test_tensor_model_parallel_functions_before_init_say_what_to_call(fn, args):
    with pytest.raises(RuntimeError, match=f"{fn.__name__}: model parallel groups are not "
                                           "initialised; call .*initialize_model_parallel"):
        fn(*args)


# ------------------------------------------------------------------ communicators
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _picks_and_out(info, use_shm: bool) -> dict:
    W, r = info.world_size, info.rank
    records = _Records()
    log = logging.getLogger("moe_ep.distributed")
    log.addHandler(records)
    log.setLevel(logging.INFO)
    try:
        g = GroupCoordinator([list(range(W))], "picks", use_shm=use_shm)
    finally:
        log.removeHandler(records)
    try:
        # all_reduce(out=x) sums in place; out=other leaves x alone; dtypes shm does not reduce
        # (int64) fall back to gloo with the same result.
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32):
            want = sum(_x(k, (1000,), dtype) for k in range(W))
            x = _x(r, (1000,), dtype)
            assert g.all_reduce(x, out=x) is x and torch.equal(x, want), dtype
            x = _x(r, (1000,), dtype)
            other = torch.empty_like(x)
            assert g.all_reduce(x, out=other) is other and torch.equal(other, want), dtype
            assert torch.equal(x, _x(r, (1000,), dtype)), "x modified"
        # all_gather(out=) along every dim of a 3-d tensor, for data dtypes of every size.
        for dtype in (torch.float32, torch.bfloat16, torch.int8, torch.float64):
            for dim in (0, 1, 2):
                parts = [_x(k, (3, 5, 7), dtype) for k in range(W)]
                want = torch.cat(parts, dim=dim)
                out = torch.empty_like(want)
                assert g.all_gather(parts[r], dim, out=out) is out and torch.equal(out, want)
                assert torch.equal(g.all_gather(parts[r], dim), want)
        with pytest.raises(ValueError, match="out must be torch.float32 \\(4,\\)"):
            g.all_reduce(torch.ones(4), out=torch.ones(5))
        with pytest.raises(ValueError, match="out must be contiguous"):
            g.all_gather(torch.ones(2, 2), 0, out=torch.ones(2, 2 * W).t())
        # point to point on the group's communicators.
        if W > 1:
            if r == 0:
                g.send(_x(0, (4, 3), torch.bfloat16), dst=1)
            elif r == 1:
                assert torch.equal(g.recv((4, 3), torch.bfloat16, src=0),
                                   _x(0, (4, 3), torch.bfloat16))
        return {"cpu": g.communicators["cpu"].transport, "log": records.messages}
    finally:
        g.destroy()


@pytest.mark.parametrize("use_shm", [False, True], ids=["gloo", "shm-if-built"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_communicator_chosen_once_and_out_forms(dist_pool, world_size, use_shm):
    results = dist_pool(world_size).run(_picks_and_out, use_shm, timeout=180)
    want = "shm" if use_shm and SHM and world_size > 1 else "gloo"
    for res in results:
        assert res["cpu"] == want
        if world_size > 1:
            said = [m for m in res["log"] if "group 'picks'" in m and "CPU collectives" in m]
            assert len(said) == 1, res["log"]
            expected = {"shm": "over shared memory", "gloo": "over gloo: "}[want]
            assert expected in said[0] and (use_shm or "use_shm=False" in said[0]), said


def _allocator_once(info) -> list[str]:
    from moe_ep.distributed import set_retain_freed_memory

    records = _Records()
    log = logging.getLogger("moe_ep")
    log.addHandler(records)
    log.setLevel(logging.INFO)
    try:
        set_retain_freed_memory(False)
        GroupCoordinator([[0, 1]], "first").destroy()
        opted_out = [m for m in records.messages if "keeps freed memory" in m]
        set_retain_freed_memory(True)
        GroupCoordinator([[0, 1]], "second").destroy()
        GroupCoordinator([[0, 1]], "third").destroy()
        return opted_out + ["--"] + [m for m in records.messages if "keeps freed memory" in m]
    finally:
        log.removeHandler(records)


@pytest.mark.skipif(not SHM, reason=ShmCommunicator.available()[1])
def test_allocator_is_set_once_per_process_with_a_log_line_and_an_opt_out():
    from moe_ep.testing import run_distributed

    for lines in run_distributed(2, _allocator_once, timeout=120):
        assert lines[0] == "--", lines  # opted out: nothing changed, nothing said
        assert len(lines) == 2 and "group 'second'" in lines[1] and "opt out" in lines[1], lines


# ---------------------------------------------------- shm: strided all-gather, many chunks
def _strided(info) -> int:
    W, r = info.world_size, info.rank
    comm = ShmCommunicator(dist.group.WORLD, r, W, "strided", buffer_bytes=4096)
    checked = 0
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.uint8):
            for shape in ((1, 3000), (7, 1, 300), (5, 33, 9), (0, 4), (2, 0, 3)):
                for dim in range(len(shape)):
                    parts = [_x(k, shape, dtype) for k in range(W)]
                    want = torch.cat(parts, dim=dim)
                    out = torch.full_like(want, 99)
                    comm.all_gather_into(parts[r], out, dim)
                    assert torch.equal(out, want), (dtype, shape, dim)
                    checked += 1
    finally:
        comm.destroy()
    return checked


@pytest.mark.skipif(not SHM, reason=ShmCommunicator.available()[1])
@pytest.mark.parametrize("world_size", [2, 3])
def test_shm_all_gather_into_any_dim_across_chunks(dist_pool, world_size):
    assert min(dist_pool(world_size).run(_strided, timeout=120)) > 30
