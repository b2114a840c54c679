"""Time dispatch + combine of the portable managers and compare the bytes they move.

Spawns W local ranks (gloo / shared memory on CPU) with ``moe_ep.testing.run_distributed`` and
runs :func:`moe_ep.bench.dispatch_latency.measure_manager` for every manager and token count
inside one spawned job, so the ratios of one table come from one run. Prints, per world size
and tokens per rank: the slowest-rank median (p10-p90) of dispatch, combine and the round
trip, the bytes per token measured by the managers and their analytic model, and the ratios
alltoallv/agrs and alltoallv/naive of latency and bytes.

    python bench/bench_managers.py                       # W=2 and W=4, 1/16/128 tokens
    python bench/bench_managers.py --world-sizes 2 --tokens 128 --iters 50
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from moe_ep.testing import run_distributed

MANAGERS = ("naive", "allgather_reducescatter", "alltoallv")
SHORT = {"naive": "naive", "allgather_reducescatter": "agrs", "alltoallv": "alltoallv"}


def _worker(info, tokens_list, hidden, num_experts, topk, dtype_name, warmup, iters, use_shm):
    from moe_ep.bench.dispatch_latency import measure_manager
    from moe_ep.cpu_allocator import retain_freed_memory
    from moe_ep.distributed import GroupCoordinator

    retain_freed_memory()  # every manager alike: see moe_ep.cpu_allocator

    # W ranks share this machine's cores: more intra-op threads than cores per rank would
    # oversubscribe the CPU and time the scheduler instead of the managers.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
    group = GroupCoordinator([list(range(info.world_size))], "ep", use_shm=use_shm)
    results = []
    try:
        transport = "shm" if group.shm is not None else "gloo"
        for tokens in tokens_list:
            for name in MANAGERS:
                results.append(
                    measure_manager(
                        group,
                        name,
                        tokens_per_rank=tokens,
                        hidden=hidden,
                        num_experts=num_experts,
                        topk=topk,
                        dtype=getattr(torch, dtype_name),
                        warmup=warmup,
                        iters=iters,
                    )
                )
    finally:
        group.destroy()
    return (transport, results) if info.rank == 0 else None


def _fmt_stats(s) -> str:
    return f"{s.median:7.0f} ({s.p10:6.0f}-{s.p90:6.0f})"


def _print_table(world: int, transport: str, results, out=sys.stdout) -> None:
    first = results[0]
    print(
        f"\n== W={world} ({transport}), H={first.hidden} {first.dtype}, E={first.num_experts}, "
        f"topk={first.topk}, {first.iters} iters after {first.warmup} warm-up; microseconds, "
        "median (p10-p90) of the slowest rank ==",
        file=out,
    )
    print(
        f"{'tokens':>6} {'manager':<10} {'dispatch':>24} {'combine':>24} {'total':>24} "
        f"{'experts':>8} {'B/token':>8} {'model':>8} ok",
        file=out,
    )
    by_tokens: dict[int, dict[str, object]] = {}
    for r in results:
        by_tokens.setdefault(r.tokens_per_rank, {})[r.backend] = r
        model = f"{r.model_bytes_per_token:8.0f}" if r.model_bytes_per_token else "       -"
        print(
            f"{r.tokens_per_rank:>6} {SHORT[r.backend]:<10} {_fmt_stats(r.dispatch_us):>24} "
            f"{_fmt_stats(r.combine_us):>24} {_fmt_stats(r.total_us):>24} "
            f"{r.experts_us.median:8.0f} {r.bytes_per_token:8.0f} {model} "
            f"{'yes' if r.verified else 'NO: ' + str(r.error)}",
            file=out,
        )
    print(
        "ratios of total (dispatch + combine) median latency and of measured bytes/token:", file=out
    )
    for tokens, row in by_tokens.items():
        a2a, agrs, naive = (row[m] for m in ("alltoallv", "allgather_reducescatter", "naive"))
        print(
            f"{tokens:>6} tokens: alltoallv/agrs latency "
            f"{a2a.total_us.median / agrs.total_us.median:5.2f} bytes "
            f"{a2a.bytes_per_token / agrs.bytes_per_token:5.3f} | alltoallv/naive latency "
            f"{a2a.total_us.median / naive.total_us.median:5.2f} bytes "
            f"{a2a.bytes_per_token / naive.bytes_per_token:5.3f}",
            file=out,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--num-experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-shm", action="store_true", help="plain gloo collectives")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per world size")
    args = p.parse_args(argv)
    for world in args.world_sizes:
        start = time.perf_counter()
        transport, results = run_distributed(
            world,
            _worker,
            args.tokens,
            args.hidden,
            args.num_experts,
            args.topk,
            args.dtype,
            args.warmup,
            args.iters,
            not args.no_shm,
            timeout=args.timeout,
        )[0]
        _print_table(world, transport, results)
        print(f"(W={world} took {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
