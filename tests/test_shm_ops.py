"""Shared-memory collectives (moe_ep.distributed.shm) against gloo on W in {2, 3, 4} ranks.

Every case runs the shm op and the same op over gloo on the same inputs and requires equal
results; inputs are small integers, so fp32-accumulated bf16 / fp16 sums are exact and must
match bit for bit. Buffers are made tiny (one page per half) so that most tensors cross many
chunks, and both all-reduce algorithms (one-step and reduce-scatter + all-gather) are forced.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_ep.distributed.shm import (
    ShmCommunicator,
    init_shm_manager,
    join_shm_manager,
    shm_all_gather,
    shm_allreduce,
    shm_gather,
    shm_recv_tensor_list,
    shm_send_tensor_list,
)

pytestmark = pytest.mark.skipif(
    not ShmCommunicator.available()[0], reason=ShmCommunicator.available()[1]
)

PAGE = 4096
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Element counts: empty, tiny, not a multiple of the 64-byte split unit, > one 4 KiB half.
SIZES = (0, 1, 37, 1000, 5000)


def _ints(n: int, rank: int, dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    """Small integers (exact in every float dtype, also when summed over 4 ranks)."""
    return ((torch.arange(n) * (rank + 3) + salt) % 11 - 5).to(dtype)


def _gloo_sum(x: torch.Tensor) -> torch.Tensor:
    y = x.to(torch.float64)
    dist.all_reduce(y)
    return y.to(x.dtype)


def _gloo_all_gatherv(x: torch.Tensor, world: int) -> list[torch.Tensor]:
    """gloo all_gather of different extents along dim 0 (pad to the longest)."""
    n = torch.tensor([x.shape[0]])
    ns = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(ns, n)
    longest = max(int(v) for v in ns)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [p[: int(v)] for p, v in zip(parts, ns)]


def _reductions(info) -> int:
    W, r = info.world_size, info.rank
    checked = 0
    for naive_max in (0, 1 << 30):  # force the two-step algorithm, then the one-step one
        comm = ShmCommunicator(
            dist.group.WORLD, r, W, f"ops{naive_max}", buffer_bytes=PAGE, naive_max_bytes=naive_max
        )
        try:
            for dtype in FLOATS:
                for n in SIZES:
                    x = _ints(n, r, dtype).reshape(-1, 1) if n % 2 else _ints(n, r, dtype)
                    got = comm.all_reduce(x)
                    want = _gloo_sum(x)
                    assert got.dtype == dtype and got.shape == x.shape
                    assert torch.equal(got, want), (dtype, n, naive_max)
                    assert torch.equal(x, _ints(n, r, dtype).reshape(x.shape)), "input changed"
                    # reduce_scatter: uneven counts, one rank gets nothing.
                    counts = [n // (W + 1)] * W
                    counts[-1] = 0
                    counts[0] = n - sum(counts[1:])
                    lo = sum(counts[:r])
                    got = comm.reduce_scatter(x.reshape(-1), counts)
                    assert torch.equal(got, want.reshape(-1)[lo : lo + counts[r]]), (dtype, n)
                    checked += 2
            with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
                comm.all_reduce(torch.ones(3, dtype=torch.int64))
            # The communicator survives an argument error: nothing was communicated.
            assert torch.equal(comm.all_reduce(torch.ones(3)), torch.full((3,), float(W)))
        finally:
            comm.destroy()
    return checked


def _data_movement(info) -> int:
    W, r = info.world_size, info.rank
    comm = ShmCommunicator(dist.group.WORLD, r, W, "move", buffer_bytes=PAGE)
    checked = 0
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool):
            for base in (0, 3, 700):
                # all_gatherv: rank r sends base + r rows (rank 0 sends none when base == 0).
                x = _ints((base + r) * 3, r, torch.float32, salt=r).reshape(-1, 3).to(dtype)
                got = comm.all_gather(x)
                want = _gloo_all_gatherv(x, W)
                assert len(got) == W
                for s in range(W):
                    assert got[s].dtype == dtype and torch.equal(got[s], want[s]), (dtype, base, s)
                assert torch.equal(comm.all_gather_flat(x), torch.cat(want))
                # gather to every destination.
                for dst in range(W):
                    got = comm.gather(x, dst)
                    if r == dst:
                        assert all(torch.equal(g, w) for g, w in zip(got, want))
                    else:
                        assert got is None
                # all_to_all: rank r sends (base + r + 2d) % 5 rows to d, decodable values.
                chunks = [
                    torch.full(((base + r + 2 * d) % 5 + base, 2), 10 * r + d).to(dtype)
                    for d in range(W)
                ]
                got = comm.all_to_all(chunks)
                flat = torch.cat([c.to(torch.float64) for c in chunks])
                splits = [c.shape[0] for c in chunks]
                recv = [(base + s + 2 * r) % 5 + base for s in range(W)]
                out = flat.new_empty((sum(recv), 2))
                dist.all_to_all_single(out, flat, recv, splits)
                assert [g.shape[0] for g in got] == recv
                assert torch.equal(torch.cat(got).to(torch.float64), out), (dtype, base)
                checked += 3
        # 0-dim tensors gather into one element per rank.
        got = comm.all_gather(torch.tensor(float(r)))
        assert [float(g) for g in got] == [float(s) for s in range(W)]
        # all_to_all_rows = all_to_all of the indexed rows, without materialising them.
        x = torch.arange(40 * 1030, dtype=torch.float32).reshape(40, 1030) + 1e5 * r
        ids = [torch.randperm(40, generator=torch.Generator().manual_seed(r * 7 + d))[: 5 * d + r]
               for d in range(W)]
        heads = [torch.arange(d + 2 * r, dtype=torch.int32) + 1000 * r for d in range(W)]
        got = comm.all_to_all_rows(x, ids, heads)
        want = comm.all_to_all([x[i] for i in ids])
        assert all(torch.equal(g, w) for g, w in zip(got.rows, want))
        assert all(g.shape[0] == 5 * r + s for s, g in enumerate(got.rows))
        for s, head in enumerate(got.heads):
            assert torch.equal(head.view(torch.int32), torch.arange(r + 2 * s) + 1000 * s)
        checked += 1
    finally:
        comm.destroy()
    return checked


def _point_to_point(info) -> int:
    W, r = info.world_size, info.rank
    comm = ShmCommunicator(dist.group.WORLD, r, W, "p2p", buffer_bytes=PAGE, p2p_buffer_bytes=PAGE)
    checked = 0
    try:
        # Every ordered pair: (src, dst) sends a list whose content encodes both ranks; the big
        # tensor crosses many 4 KiB chunks. Pairs run one at a time (sends block).
        for src in range(W):
            for dst in range(W):
                if src == dst:
                    continue
                payload = [
                    torch.arange(7, dtype=torch.int64) + 100 * src + dst,
                    torch.full((3000, 2), src - dst, dtype=torch.bfloat16),
                    torch.empty(0, 4, dtype=torch.float16),
                    torch.tensor(True),
                    torch.arange(12.0).reshape(3, 4).t(),  # not contiguous: sent as contiguous
                ]
                if r == src:
                    comm.send_tensor_list(payload, dst)
                elif r == dst:
                    got = comm.recv_tensor_list(src)
                    assert len(got) == len(payload)
                    for g, p in zip(got, payload):
                        assert g.dtype == p.dtype and g.shape == p.shape and torch.equal(g, p)
                    checked += 1
                dist.barrier()
        # Empty list.
        if r == 0:
            comm.send_tensor_list([], 1)
        elif r == 1:
            assert comm.recv_tensor_list(0) == []
    finally:
        comm.destroy()
    return checked


def _vllm_named_ops(info) -> int:
    """The seven vLLM-named functions, driven by hand as vLLM's CPU communicator does."""
    W, r = info.world_size, info.rank
    box = [f"/moe_ep_test_{torch.randint(1 << 30, ()).item()}_{W}" if r == 0 else None]
    dist.broadcast_object_list(box, src=0)
    name = box[0]
    handle = init_shm_manager(name, W, 0, buffer_bytes=PAGE) if r == 0 else None
    dist.barrier()
    if r != 0:
        handle = init_shm_manager(name, W, r, buffer_bytes=PAGE)
    desc = join_shm_manager(handle, name)
    assert name in desc
    dist.barrier()
    from moe_ep.distributed.shm import _lib, _unlink

    _unlink(name)
    try:
        for dtype in FLOATS:
            x = _ints(3000, r, dtype)
            want = _gloo_sum(x)
            shm_allreduce(handle, x)  # in place
            assert torch.equal(x, want)
            data = _ints(1500, r, dtype, salt=1)
            out = torch.empty(W * 1500, dtype=dtype)
            shm_all_gather(handle, data, out)
            want = _gloo_all_gatherv(data, W)
            assert torch.equal(out, torch.cat(want))
            outs = [torch.empty_like(data) for _ in range(W)] if r == W - 1 else None
            shm_gather(handle, data, outs, W - 1)
            if r == W - 1:
                assert all(torch.equal(o, w) for o, w in zip(outs, want))
        if r == 0:
            shm_send_tensor_list(handle, [torch.arange(5000), torch.ones(2, 2)], W - 1)
        if r == W - 1:
            got = shm_recv_tensor_list(handle, 0)
            assert torch.equal(got[0], torch.arange(5000)) and torch.equal(got[1], torch.ones(2, 2))
    finally:
        _lib().shm_destroy(handle)
    return 1


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_reductions_match_gloo(dist_pool, world_size):
    checked = dist_pool(world_size).run(_reductions, timeout=240)
    assert checked == [2 * 2 * len(FLOATS) * len(SIZES)] * world_size


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_gathers_and_all_to_all_match_gloo(dist_pool, world_size):
    checked = dist_pool(world_size).run(_data_movement, timeout=240)
    assert checked == [5 * 3 * 3 + 1] * world_size


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_send_recv_tensor_lists(dist_pool, world_size):
    checked = dist_pool(world_size).run(_point_to_point, timeout=240)
    assert sum(checked) == world_size * (world_size - 1)


@pytest.mark.parametrize("world_size", [2, 3])
def test_vllm_named_operations(dist_pool, world_size):
    assert dist_pool(world_size).run(_vllm_named_ops, timeout=240) == [1] * world_size
