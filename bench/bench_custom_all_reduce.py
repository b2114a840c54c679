"""The CUDA IPC custom all-reduce against NCCL, gloo and a plain device copy, in one job.

    python bench/bench_custom_all_reduce.py                  # W=2, bf16, 8 KiB .. 8 MiB
    python bench/bench_custom_all_reduce.py --world-size 4 --dtype float32

Spawns W local ranks (`moe_ep.testing.run_distributed`, a gloo world) that take the visible
GPUs round robin: several processes may share one GPU, which CUDA IPC allows. Per size and
dtype, in turn on the same machine state, each rank times:

* `custom eager`: `CustomAllreduce.custom_all_reduce(x)` (the input goes through the
  registered staging buffer);
* `custom graph`: the replay of a CUDA graph of 10 captured all-reduces (per call);
* `nccl`: `dist.all_reduce` on an NCCL group, only when every rank has its own GPU (NCCL
  refuses two ranks on one device);
* `gloo`: the copy to the host, a gloo all-reduce and the copy back;
* `copy`: `out.copy_(x)` on the device, the bytes of one operand moved once (the floor).

Each is checked for the exact sum of integer-valued inputs once, then timed as back-to-back
calls between barriers (per-call mean of the slowest rank, median of `--reps` repetitions).
On one GPU the peers' buffers sit in the same HBM, so this says nothing about NVLink speed.
Without CUDA, or without the native library, it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from moe_ep.distributed.custom_all_reduce import CustomAllreduce, library_unavailable_reason
from moe_ep.testing import run_distributed

SIZES = (8 << 10, 64 << 10, 512 << 10, 2 << 20, 8 << 20)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GRAPH_CALLS = 10


def _ints(rank: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    return torch.randint(-8, 8, (n,), generator=g).to(dtype).to(device)


def _time(fn: Callable[[], object], iters: int, reps: int, calls_per_fn: int = 1) -> float:
    """Per-call microseconds: median over `reps` of back-to-back loops, slowest rank."""
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        took = torch.tensor([(time.perf_counter() - t0) / (iters * calls_per_fn)])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        samples.append(float(took) * 1e6)
    return statistics.median(samples)


def _worker(info, sizes: list[int], dtype_name: str, iters: int, reps: int) -> list[dict] | None:
    W, r = info.world_size, info.rank
    dtype = DTYPES[dtype_name]
    dev = torch.device("cuda", r % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    ca = CustomAllreduce(dist.group.WORLD, dev, r, W, same_node=True,
                         max_size=max(sizes), group_name="bench")
    nccl = (dist.new_group(list(range(W)), backend="nccl")
            if torch.cuda.device_count() >= W else None)
    rows = []
    try:
        for nbytes in sizes:
            n = nbytes // torch.empty((), dtype=dtype).element_size()
            x = _ints(r, n, dtype, dev)
            want = sum(_ints(k, n, dtype, torch.device("cpu")) for k in range(W))
            out = torch.empty_like(x)
            row: dict = {"bytes": nbytes, "dtype": dtype_name, "custom_ar": ca.should_custom_ar(x)}

            def gloo(x=x, out=out):
                host = x.cpu()
                dist.all_reduce(host)
                out.copy_(host)
                return out

            steps: dict[str, tuple[Callable[[], object], int]] = {"gloo": (gloo, 1)}
            if nccl is not None:
                def nccl_sum(x=x, out=out):
                    out.copy_(x)
                    dist.all_reduce(out, group=nccl)
                    return out
                steps["nccl"] = (nccl_sum, 1)
            if row["custom_ar"]:
                steps["custom eager"] = (lambda x=x, out=out: ca.custom_all_reduce(x, out), 1)
                graph = torch.cuda.CUDAGraph()
                with ca.capture():
                    ca.custom_all_reduce(x)  # warm-up outside the capture
                    with torch.cuda.graph(graph):
                        outs = [ca.custom_all_reduce(x) for _ in range(GRAPH_CALLS)]

                def replay(graph=graph, outs=outs):
                    graph.replay()
                    return outs[-1]
                steps["custom graph"] = (replay, GRAPH_CALLS)
            checks = {}
            for name, (fn, _) in steps.items():
                checks[name] = bool(torch.equal(fn().cpu(), want))
            steps["copy"] = (lambda x=x, out=out: out.copy_(x), 1)
            row["exact"] = checks
            row["us"] = {name: _time(fn, iters, reps, calls)
                         for name, (fn, calls) in steps.items()}
            rows.append(row)
            if r == 0:
                print(f"  {nbytes >> 10} KiB done", file=sys.stderr, flush=True)
    finally:
        ca.close()
        if nccl is not None:
            dist.destroy_process_group(nccl)
    return rows if r == 0 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2, choices=(2, 4, 6, 8))
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                   help="bytes per rank, comma-separated (multiples of 16)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if not torch.cuda.is_available():
        print("bench_custom_all_reduce: skipped: CUDA is not available")
        return 0
    why = library_unavailable_reason()
    if why:
        print(f"bench_custom_all_reduce: skipped: {why}")
        return 0
    gpus = torch.cuda.device_count()
    print(f"custom all-reduce, W={args.world_size} ranks on {gpus} GPU(s) "
          f"({torch.cuda.get_device_name(0)}), {args.dtype}; per-call us, slowest rank, median "
          f"of {args.reps} x {args.iters} back-to-back calls")
    rows = run_distributed(args.world_size, _worker, sizes, args.dtype, args.iters, args.reps,
                           timeout=600)[0]
    names = ["custom eager", "custom graph", "nccl", "gloo", "copy"]
    print("| bytes | " + " | ".join(names) + " | exact | eager / copy |")
    print("|--:|" + "--:|" * len(names) + "---|--:|")
    for row in rows:
        us = row["us"]
        cells = [f"{us[n]:.1f}" if n in us else "-" for n in names]
        ratio = f"{us['custom eager'] / us['copy']:.1f}" if "custom eager" in us else "-"
        exact = ", ".join(f"{k} {'ok' if v else 'WRONG'}" for k, v in row["exact"].items())
        print(f"| {row['bytes']} | " + " | ".join(cells) + f" | {exact} | {ratio} |")
    if gpus < args.world_size:
        print(f"nccl not run: {args.world_size} ranks on {gpus} GPU(s) (NCCL refuses two ranks "
              "on one device). One GPU says nothing about NVLink speed.")
    return 0 if all(all(r["exact"].values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
