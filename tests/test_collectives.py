"""GroupCoordinator collectives on W in {1, 2, 4} ranks, over gloo and (when built) shared memory.

Every rank builds every rank's input from a seed, so the expected result is a single-process
computation made independently on each rank.
"""

from __future__ import annotations

import pytest
import torch

from moe_ep.distributed import GroupCoordinator

UNEVEN = [81, 20, 57, 52]


def _rows(rank: int, n: int, cols: int = 5, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(n, cols, generator=g).to(dtype)


def _sample_dict() -> dict:
    return {
        "f32": torch.arange(8, dtype=torch.float32),
        "i8": torch.arange(16, dtype=torch.int8),
        "text": "text",
        "list": [1, 2, 3],
        "nested": {"a": 1},
        "empty": torch.empty(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
    }


def _assert_dict_equal(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype, key
            assert got[key].shape == value.shape, key
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def _collectives(info, use_shm: bool) -> str:
    W, r = info.world_size, info.rank
    g = GroupCoordinator([list(range(W))], "test", use_shm=use_shm)
    try:
        # all_reduce: arange(8) * (rank + 1) sums to arange(8) * W (W + 1) / 2; exact in bf16.
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64):
            x = torch.arange(8, dtype=dtype) * (r + 1)
            want = torch.arange(8, dtype=dtype) * (W * (W + 1) // 2)
            got = g.all_reduce(x)
            assert got.dtype == dtype and torch.equal(got, want), (dtype, got, want)
            assert torch.equal(x, torch.arange(8, dtype=dtype) * (r + 1)), "input modified"

        # reduce_scatter: my equal slice of the sum, along dim 0 and along the last dim.
        x = torch.arange(4 * W * 3, dtype=torch.float32).reshape(4 * W, 3) * (r + 1)
        total = torch.arange(4 * W * 3, dtype=torch.float32).reshape(4 * W, 3) * (W * (W + 1) // 2)
        assert torch.equal(g.reduce_scatter(x, dim=0), total[4 * r : 4 * r + 4])
        xt = x.t().contiguous()
        assert torch.equal(g.reduce_scatter(xt, dim=-1), total.t()[:, 4 * r : 4 * r + 4])

        # all_gather of [2, 3, 4] along each dim equals torch.cat of every rank's tensor.
        def mine(k):
            return torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) + 100 * k

        for dim in (0, 1, 2, -1):
            want = torch.cat([mine(k) for k in range(W)], dim=dim)
            assert torch.equal(g.all_gather(mine(r), dim=dim), want), dim

        # all_gatherv / reduce_scatterv with uneven sizes, and with one rank at 0 rows.
        for sizes in (UNEVEN[:W], [0] + UNEVEN[1:W] if W > 1 else [0]):
            for dtype in (torch.float32, torch.bfloat16):
                want = torch.cat([_rows(k, sizes[k], dtype=dtype) for k in range(W)])
                got = g.all_gatherv(_rows(r, sizes[r], dtype=dtype), dim=0, sizes=sizes)
                assert got.dtype == dtype and torch.equal(got, want), (sizes, dtype)
            pair = g.all_gatherv([_rows(r, sizes[r]), _rows(r, sizes[r], cols=1)], sizes=sizes)
            assert torch.equal(pair[0], torch.cat([_rows(k, sizes[k]) for k in range(W)]))
            assert torch.equal(pair[1], torch.cat([_rows(k, sizes[k], 1) for k in range(W)]))
            alongdim1 = g.all_gatherv(_rows(r, sizes[r]).t(), dim=1, sizes=sizes)
            assert torch.equal(alongdim1, torch.cat([_rows(k, sizes[k]) for k in range(W)]).t())

            n = sum(sizes)
            total = sum(_rows(k, n) for k in range(W))
            start = sum(sizes[:r])
            got = g.reduce_scatterv(_rows(r, n), dim=0, sizes=sizes)
            torch.testing.assert_close(got, total[start : start + sizes[r]], rtol=1e-5, atol=1e-5)

        # all_to_all_single with uneven splits: rank s sends (s + 1) * (d + 1) rows to rank d.
        sends = [(r + 1) * (d + 1) for d in range(W)]
        recvs = [(s + 1) * (r + 1) for s in range(W)]
        x = torch.cat([torch.full((n, 2), float(100 * r + d)) for d, n in enumerate(sends)])
        got = g.all_to_all_single(x, recvs, sends)
        want = torch.cat([torch.full((n, 2), float(100 * s + r)) for s, n in enumerate(recvs)])
        assert torch.equal(got, want)

        # gather and broadcast from every root.
        for root in range(W):
            got = g.gather(mine(r), dst=root, dim=1)
            if r == root:
                assert torch.equal(got, torch.cat([mine(k) for k in range(W)], dim=1))
            else:
                assert got is None
            b = mine(r).clone()
            assert g.broadcast(b, src=root) is b and torch.equal(b, mine(root))
            assert g.broadcast_object({"from": r} if r == root else None, src=root) == {
                "from": root
            }
        assert g.all_gather_object(("rank", r)) == [("rank", k) for k in range(W)]

        # tensor dicts arrive exactly, from every root and between every pair.
        for root in range(W):
            got = g.broadcast_tensor_dict(_sample_dict() if r == root else None, src=root)
            _assert_dict_equal(got, _sample_dict())
        if W > 1:
            for src in range(W):
                dst = (src + 1) % W
                if r == src:
                    g.send_tensor_dict(_sample_dict(), dst=dst)
                if r == dst:
                    _assert_dict_equal(g.recv_tensor_dict(src=src), _sample_dict())
        g.barrier()
        return "shm" if g.shm is not None else "gloo"
    finally:
        g.destroy()


@pytest.mark.parametrize("use_shm", [False, True], ids=["gloo", "shm-if-built"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_collectives_match_single_process(dist_pool, world_size, use_shm):
    paths = dist_pool(world_size).run(_collectives, use_shm, timeout=180)
    if not use_shm or world_size == 1:
        assert set(paths) == {"gloo"}
    else:
        assert len(set(paths)) == 1, f"ranks disagree on the shm path: {paths}"
