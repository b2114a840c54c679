"""Shared-memory collectives vs gloo (and DeepSpeed's CPU shm all-reduce), side by side.

    python bench/bench_shm.py                    # W = 2 and 4, 8 KiB / 1 MiB / 16 MiB
    python bench/bench_shm.py --worlds 2 --sizes 8K 1M --no-manager

For each world size the ranks are spawned once (moe_ep.testing.DistributedPool) and every
column is measured in the same processes, one case after the other:

* all_reduce (fp32 sum): ours (`ShmCommunicator.all_reduce`, returns a new tensor), gloo
  (`dist.all_reduce`, in place), and, when `deepspeed` is importable (`pip install
  moe-ep[peers]`, built with DS_BUILD_OPS=0; its shm op is JIT-built on first use),
  `deepspeed.comm.inference_all_reduce` (in place) after
  `deepspeed.init_distributed(dist_backend="gloo")` with LOCAL_SIZE set.
* all_gather: ours vs gloo (`dist.all_gather` into freshly allocated outputs, as both return
  new tensors); size = per rank.
* memcpy bound for the largest size: every rank copies the bytes an all-reduce must move
  through memory at least (its input into shared memory, the result out: 2 x size) with a
  plain `Tensor.copy_`, all ranks at once; "of bound" = that time / the all-reduce time.
* dispatch + combine of the `shm` manager vs `alltoallv` over gloo (H=4096 bf16, E=64,
  top-8, random routing, identity experts), at 1 / 16 / 128 tokens per rank.

Times are the median over repetitions of the slowest rank's mean time per op; each
repetition starts after a barrier and runs enough iterations to take ~`--rep-seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from moe_ep.distributed.shm import ShmCommunicator
from moe_ep.cpu_allocator import retain_freed_memory
from moe_ep.testing import DistributedPool

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


def _fmt_size(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]} {unit}iB"
    return f"{n} B"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.2f} ms"


# ------------------------------------------------------------------------- rank side
def _timed(fn: Callable[[], object], rep_seconds: float, reps: int) -> list[float]:
    """Per-repetition mean seconds per call on this rank (all ranks run the same counts)."""
    for _ in range(3):
        fn()
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    once = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(once, op=dist.ReduceOp.MAX)
    iters = max(1, min(20000, int(rep_seconds / max(float(once), 1e-7))))
    out = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - t0) / iters)
    return out


def _gloo_all_gather(x: torch.Tensor, world: int) -> list[torch.Tensor]:
    """gloo all_gather returning fresh tensors, like `ShmCommunicator.all_gather`."""
    outs = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(outs, x)
    return outs


def _deepspeed_importable() -> bool:
    try:
        import deepspeed  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def _deepspeed(world: int):
    """deepspeed.comm, initialised over the existing gloo group, or None if not importable."""
    if not _deepspeed_importable():
        return None
    # DeepSpeed's CPU shm op sizes itself from LOCAL_SIZE (it segfaults without it) and names
    # its segment after MASTER_ADDR / MASTER_PORT; CPU accelerator on a machine without CUDA.
    os.environ["LOCAL_SIZE"] = str(world)
    os.environ["LOCAL_RANK"] = str(dist.get_rank())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A fresh name per run: DeepSpeed never unlinks its segments, and a stale one from a
        # killed run must not be picked up.
        port = (
            torch.randint(20000, 60000, (1,))
            if dist.get_rank() == 0
            else torch.zeros(1, dtype=torch.int64)
        )
        dist.broadcast(port, src=0)
        os.environ["MASTER_PORT"] = str(int(port))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as dcomm

    deepspeed.init_distributed(dist_backend="gloo")
    return dcomm


def _collectives_worker(info, sizes: list[int], rep_seconds: float, reps: int, peers: bool):
    W, r = info.world_size, info.rank
    retain_freed_memory()  # every column alike: see moe_ep.cpu_allocator
    comm = ShmCommunicator(dist.group.WORLD, r, W, "bench")
    dcomm = _deepspeed(W) if peers else None
    rows = []
    try:
        for size in sizes:
            n = size // 4
            x = torch.randn(n)
            want = x.to(torch.float64)
            dist.all_reduce(want)
            got = comm.all_reduce(x)
            torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-4)
            row = {"op": "all_reduce", "world": W, "bytes": size}
            # In-place ops (gloo, DeepSpeed) run on zeros so repeated sums cannot overflow.
            zeros = torch.zeros_like(x)
            row["shm"] = _timed(lambda x=x: comm.all_reduce(x), rep_seconds, reps)
            row["gloo"] = _timed(lambda z=zeros: dist.all_reduce(z), rep_seconds, reps)
            if dcomm is not None:
                y = x.clone()
                dcomm.inference_all_reduce(y)
                torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-4)
                row["deepspeed"] = _timed(
                    lambda z=zeros: dcomm.inference_all_reduce(z), rep_seconds, reps
                )
            rows.append(row)
        for size in sizes:
            x = torch.full((size // 4,), float(r))
            parts = comm.all_gather(x)
            assert all(bool((p == s).all()) for s, p in enumerate(parts))
            row = {"op": "all_gather", "world": W, "bytes": size}
            row["shm"] = _timed(lambda x=x: comm.all_gather(x), rep_seconds, reps)
            row["gloo"] = _timed(lambda x=x: _gloo_all_gather(x, W), rep_seconds, reps)
            rows.append(row)
        # What the largest all-reduce must at least move through memory, as plain copies.
        size = max(sizes)
        src, mid, dst = torch.randn(size // 4), torch.empty(size // 4), torch.empty(size // 4)

        def two_copies():
            mid.copy_(src)
            dst.copy_(mid)

        rows.append({"op": "memcpy_bound", "world": W, "bytes": size,
                     "memcpy": _timed(two_copies, rep_seconds, reps)})
    finally:
        comm.destroy()
        if dcomm is not None:
            dist.barrier()
            _unlink_deepspeed_segments()
    return rows


def _unlink_deepspeed_segments() -> None:
    """Remove this rank's DeepSpeed shm segment (DeepSpeed leaves it in /dev/shm)."""
    suffix = f"_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{dist.get_rank()}"
    for name in os.listdir("/dev/shm"):
        if name.startswith("deepspeed_allreduce_buffer_") and name.endswith(suffix):
            os.unlink(os.path.join("/dev/shm", name))


def _routing(n: int, experts: int, topk: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(n, experts, generator=g).argsort(dim=1)[:, :topk]
    weights = torch.rand(n, topk, generator=g)
    return weights, ids


def _manager_worker(info, tokens: list[int], hidden: int, experts: int, topk: int,
                    rep_seconds: float, reps: int):
    from moe_ep.distributed import GroupCoordinator
    from moe_ep.managers.registry import build_manager

    W, r = info.world_size, info.rank
    retain_freed_memory()  # shm and gloo alike: see moe_ep.cpu_allocator
    rows = []
    shm_group = GroupCoordinator([list(range(W))], "bench_shm", use_shm=True)
    gloo_group = GroupCoordinator([list(range(W))], "bench_gloo", use_shm=False)
    managers = {
        "shm": build_manager("shm", group=shm_group),
        "alltoallv_gloo": build_manager("alltoallv", group=gloo_group),
    }
    try:
        for n in tokens:
            x = torch.randn(n, hidden, generator=torch.Generator().manual_seed(r)).bfloat16()
            weights, ids = _routing(n, experts, topk, seed=100 + r)
            row = {"op": "dispatch_combine", "world": W, "tokens": n}
            outs = {}
            for name, mgr in managers.items():
                def step(mgr=mgr, x=x, weights=weights, ids=ids):
                    res = mgr.dispatch(x, weights, ids, num_experts=experts)
                    return mgr.combine(res.x, res)

                outs[name] = step()
                row[name] = _timed(step, rep_seconds, reps)
            torch.testing.assert_close(outs["shm"], outs["alltoallv_gloo"], rtol=2e-2, atol=2e-2)
            rows.append(row)
    finally:
        for mgr in managers.values():
            mgr.destroy()
        shm_group.destroy()
        gloo_group.destroy()
    return rows


# ----------------------------------------------------------------------- driver side
def _merge(per_rank: list[list[dict]]) -> list[dict]:
    """Slowest rank per repetition, then the median over repetitions."""
    merged = []
    for cells in zip(*per_rank):
        row = {}
        for key, value in cells[0].items():
            if isinstance(value, list):
                row[key] = statistics.median(max(c[key][i] for c in cells)
                                             for i in range(len(value)))
            else:
                row[key] = value
        merged.append(row)
    return merged


def _table(rows: list[dict], has_ds: bool) -> str:
    out = []
    ar = [r for r in rows if r["op"] == "all_reduce"]
    if ar:
        head = "| W | size | ours (shm) | gloo | DeepSpeed shm | ours vs gloo | ours vs DeepSpeed |"
        out += ["all_reduce (fp32 sum)", "", head, "|" + "---|" * 7]
        for r in ar:
            ds = r.get("deepspeed")
            ds_time = _fmt_time(ds) if has_ds else "not installed"
            vs_ds = f"{ds / r['shm']:.2f}x" if ds else "n/a"
            out.append(
                f"| {r['world']} | {_fmt_size(r['bytes'])} | {_fmt_time(r['shm'])} | "
                f"{_fmt_time(r['gloo'])} | {ds_time} | {r['gloo'] / r['shm']:.1f}x | {vs_ds} |"
            )
        out.append("")
    ag = [r for r in rows if r["op"] == "all_gather"]
    if ag:
        out += ["all_gather (size per rank)", "", "| W | size | ours (shm) | gloo | ours vs gloo |",
                "|" + "---|" * 5]
        for r in ag:
            out.append(f"| {r['world']} | {_fmt_size(r['bytes'])} | {_fmt_time(r['shm'])} | "
                       f"{_fmt_time(r['gloo'])} | {r['gloo'] / r['shm']:.1f}x |")
        out.append("")
    mb = [r for r in rows if r["op"] == "memcpy_bound"]
    if mb:
        title = "memory-bandwidth bound of the largest all_reduce (2 copies per rank, all at once)"
        out += [title, "", "| W | size | 2 x memcpy | ours all_reduce | of bound |",
                "|" + "---|" * 5]
        for r in mb:
            ours = next(a["shm"] for a in ar if a["world"] == r["world"] and
                        a["bytes"] == r["bytes"])
            out.append(f"| {r['world']} | {_fmt_size(r['bytes'])} | {_fmt_time(r['memcpy'])} | "
                       f"{_fmt_time(ours)} | {100 * r['memcpy'] / ours:.0f}% |")
        out.append("")
    dc = [r for r in rows if r["op"] == "dispatch_combine"]
    if dc:
        out += ["dispatch + combine (H=4096 bf16, E=64, topk=8)", "",
                "| W | tokens/rank | shm manager | alltoallv over gloo | speed-up |",
                "|" + "---|" * 5]
        for r in dc:
            out.append(f"| {r['world']} | {r['tokens']} | {_fmt_time(r['shm'])} | "
                       f"{_fmt_time(r['alltoallv_gloo'])} | "
                       f"{r['alltoallv_gloo'] / r['shm']:.1f}x |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sizes", nargs="+", default=["8K", "1M", "16M"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--rep-seconds", type=float, default=0.3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed column")
    p.add_argument("--no-manager", action="store_true", help="skip dispatch + combine")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    sizes = [_parse_size(s) for s in args.sizes]
    ok, reason = ShmCommunicator.available()
    if not ok:
        print(f"shared-memory collectives unavailable: {reason}", file=sys.stderr)
        return 1
    peers = not args.no_deepspeed
    peers = peers and _deepspeed_importable()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, deepspeed column: "
          f"{'yes' if peers else 'no'}", flush=True)
    rows: list[dict] = []
    for world in args.worlds:
        with DistributedPool(world) as pool:
            per_rank = pool.run(_collectives_worker, sizes, args.rep_seconds, args.reps, peers,
                                timeout=1800)
            rows += _merge(per_rank)
            if not args.no_manager:
                per_rank = pool.run(_manager_worker, args.tokens, 4096, 64, 8, args.rep_seconds,
                                    args.reps, timeout=1800)
                rows += _merge(per_rank)
        print(f"W={world} done", flush=True)
    rows.sort(key=lambda r: (r["op"], r["world"]))
    print()
    print(_table(rows, peers))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
