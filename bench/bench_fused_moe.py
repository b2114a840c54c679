"""FusedMoE forward time per manager, side by side with DeepSpeed's MoE layer, in one job.

Spawns W local CPU ranks (``moe_ep.testing.run_distributed``); in that one job, for every
expert width I and tokens per rank it times, on the same machine state:

* ``FusedMoE`` on each portable manager, over the shared-memory transport (``shm`` and the
  shm-backed collectives of the others) and over plain gloo (``use_shm=False``);
* ``deepspeed.moe.layer.MoE`` (``ep_size=W``, top-2, ``capacity_factor=1``, its all-to-all on
  gloo; deterministic top-2, ``top2_2nd_expert_sampling=False``, so both layers route alike),
  and the share of (token, expert) pairs its capacity drops (FusedMoE drops none);
* the expert matmuls alone at this core's measured GEMM rate (``6 * pairs * H * I`` flops on
  the busiest rank over the rate of a ``[512, H] x [H, 2I]`` matmul): the floor any layer pays.

Each repetition starts after a barrier and counts the slowest rank. FusedMoE's forward is
split into its steps (route, prepare = dispatch, experts, finalize = combine, shared), so the
share spent in dispatch + combine is reported (it includes waiting for the slower rank).

    python bench/bench_fused_moe.py                       # H=1024, E=8, top-2, fp32, I=64,2048
    python bench/bench_fused_moe.py --tokens 16,128 --inter 64 --iters 50 --no-deepspeed
    python bench/bench_fused_moe.py --json out.json       # also write every number

DeepSpeed (``pip install -e ".[peers]"``, built with ``DS_BUILD_OPS=0``) is optional; without
it the DeepSpeed columns are empty. Its first run JIT-builds a communication op (about a
minute). Timings on a shared or small machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

from moe_ep.testing import run_distributed

MANAGERS = ("naive", "allgather_reducescatter", "alltoallv", "shm")
GLOO_MANAGERS = ("naive", "allgather_reducescatter", "alltoallv")  # shm needs shared memory
SHORT = {"naive": "naive", "allgather_reducescatter": "agrs", "alltoallv": "alltoallv",
         "shm": "shm"}


class _SwiGLU(nn.Module):
    """DeepSpeed's expert: the same SwiGLU MLP as a FusedMoE expert (gate rows, then up)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.inter = inter
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        gu = self.gate_up(x)
        return self.down(torch.nn.functional.silu(gu[..., : self.inter]) * gu[..., self.inter :])


def _slowest(group, samples: list[float]) -> list[float]:
    """Per repetition, the largest time over the ranks."""
    t = torch.tensor(samples, dtype=torch.float64)
    return group.all_gather(t.unsqueeze(0), dim=0).amax(dim=0).tolist()


def _stats(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return {"median_us": statistics.median(samples) * 1e6, "p10_us": q[0] * 1e6,
            "p90_us": q[-1] * 1e6}


def _time_fused(layer, x, group, warmup: int, iters: int) -> dict:
    total, comm = [], []
    with torch.no_grad():
        for i in range(warmup + iters):
            group.barrier()
            t0 = time.perf_counter()
            _, w, ids = layer.route(x)
            t1 = time.perf_counter()
            res = layer.prepare(x, w, ids)
            t2 = time.perf_counter()
            out = layer.compute_experts(res)
            t3 = time.perf_counter()
            y = layer.finalize(out, res)
            t4 = time.perf_counter()
            layer.add_shared(x, y)
            t5 = time.perf_counter()
            if i >= warmup:
                total.append(t5 - t0)
                comm.append((t2 - t1) + (t4 - t3))
    slow = _slowest(group, total)
    # The dispatch + combine share of the slowest rank's time, per repetition, then the median.
    share = [c / t for c, t in zip(comm, total)]
    shares = group.all_gather(torch.tensor([statistics.median(share)]), dim=0).tolist()
    return {**_stats(slow), "comm_share": max(shares)}


def _time_deepspeed(moe, x, group, warmup: int, iters: int) -> dict:
    samples = []
    with torch.no_grad():
        for i in range(warmup + iters):
            group.barrier()
            t0 = time.perf_counter()
            moe(x)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        _, _, dispatch_mask, _ = moe.deepspeed_moe.gate(x)
    kept = torch.tensor([float(dispatch_mask.sum()), float(x.shape[0] * 2)])
    kept = group.all_reduce(kept)
    return {**_stats(_slowest(group, samples)), "dropped_share": 1 - float(kept[0] / kept[1])}


def _gemm_rate(hidden: int, inter: int) -> float:
    """Flop/s of one ``[512, H] x [H, 2I]`` matmul on this rank's threads (best of 5)."""
    a, b = torch.randn(512, hidden), torch.randn(hidden, 2 * inter)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 512 * hidden * 2 * inter / best


def _worker(info, args):
    from moe_ep.cpu_allocator import retain_freed_memory
    from moe_ep.distributed import GroupCoordinator
    from moe_ep.layer import FusedMoE
    from moe_ep.managers import build_manager

    retain_freed_memory()  # every layer alike: see moe_ep.cpu_allocator
    # W ranks share the cores: more intra-op threads than cores per rank would time the
    # scheduler instead of the layers.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
    world, hidden, experts, topk = info.world_size, args["hidden"], args["experts"], 2
    shm_group = GroupCoordinator([list(range(world))], "ep-shm", use_shm=True)
    gloo_group = GroupCoordinator([list(range(world))], "ep-gloo", use_shm=False)
    rows = []
    deepspeed_moe = None
    if args["deepspeed"]:
        # deepspeed.comm's shm op segfaults without LOCAL_SIZE (REFERENCE.md).
        os.environ.setdefault("LOCAL_SIZE", str(world))
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        from deepspeed.moe.layer import MoE as deepspeed_moe
    try:
        for inter in args["inter"]:
            torch.manual_seed(0)
            gate = torch.randn(experts, hidden) * hidden**-0.5
            w13 = torch.randn(experts, 2 * inter, hidden) * hidden**-0.5
            w2 = torch.randn(experts, hidden, inter) * inter**-0.5
            rate = _gemm_rate(hidden, inter)
            layers = []
            for transport, group, names in (("shm", shm_group, MANAGERS),
                                            ("gloo", gloo_group, GLOO_MANAGERS)):
                for name in names:
                    if name not in args["managers"]:
                        continue
                    mgr = build_manager(name, group)
                    layer = FusedMoE(experts, topk, hidden, inter, mgr)
                    layer.load_global_weights(gate, w13, w2)
                    layers.append((transport, name, layer))
            ds = None
            if deepspeed_moe is not None:
                ds = deepspeed_moe(hidden, _SwiGLU(hidden, inter), num_experts=experts,
                                   ep_size=world, k=topk, capacity_factor=1.0,
                                   eval_capacity_factor=1.0, min_capacity=4,
                                   top2_2nd_expert_sampling=False)
                ds.set_deepspeed_parallelism()
                ds.eval()
            for tokens in args["tokens"]:
                x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(info.rank))
                # The busiest rank's (token, local expert) pairs: the experts' floor.
                probe = layers[0][2]
                owner = probe.placement.owners(probe.route(x)[2])
                pairs = shm_group.all_reduce(torch.bincount(owner.flatten(), minlength=world)
                                             .double())
                floor_s = 6 * float(pairs.max()) * hidden * inter / rate
                row = {"inter": inter, "tokens": tokens, "gemm_floor_us": floor_s * 1e6,
                       "gemm_gflops": rate / 1e9, "fused": {}}
                for transport, name, layer in layers:
                    row["fused"][f"{SHORT[name]}/{transport}"] = _time_fused(
                        layer, x, layer.manager.group, args["warmup"], args["iters"])
                if ds is not None:
                    row["deepspeed"] = _time_deepspeed(ds, x, gloo_group, args["warmup"],
                                                       args["iters"])
                rows.append(row)
                if info.rank == 0:
                    print(_progress(row), file=sys.stderr, flush=True)
            for _, _, layer in layers:
                layer.manager.destroy()
    finally:
        shm_group.destroy()
        gloo_group.destroy()
    return rows if info.rank == 0 else None


def _progress(row) -> str:
    best = min(row["fused"].items(), key=lambda kv: kv[1]["median_us"]) if row["fused"] else None
    text = f"I={row['inter']} tokens={row['tokens']}: "
    if best:
        text += f"best FusedMoE {best[0]} {best[1]['median_us']:.0f} us"
    if "deepspeed" in row:
        text += f", DeepSpeed {row['deepspeed']['median_us']:.0f} us"
    return text


def _print(rows, args, out=sys.stdout) -> None:
    print(f"\n== FusedMoE vs DeepSpeed MoE: W={args['world_size']} CPU ranks, "
          f"{max(1, (os.cpu_count() or 1) // args['world_size'])} thread(s) each, "
          f"H={args['hidden']}, E={args['experts']}, top-2, fp32; {args['iters']} iterations "
          f"after {args['warmup']} warm-up; microseconds, median (p10-p90) of the slowest rank; "
          "comm = share of the forward in prepare (dispatch) + finalize (combine) ==", file=out)
    for inter in args["inter"]:
        sel = [r for r in rows if r["inter"] == inter]
        print(f"\n-- I={inter} (this core's GEMM rate: {sel[0]['gemm_gflops']:.1f} GFLOP/s "
              "per rank) --", file=out)
        print(f"{'tokens':>6} {'layer':<16} {'forward us':>24} {'comm':>5} {'vs DS':>6} "
              f"{'vs floor':>8}  DS dropped", file=out)
        for r in sel:
            ds = r.get("deepspeed")
            for label, s in sorted(r["fused"].items(), key=lambda kv: kv[1]["median_us"]):
                vs = f"{ds['median_us'] / s['median_us']:5.2f}x" if ds else "    -"
                print(f"{r['tokens']:>6} {'FusedMoE ' + label:<16} "
                      f"{s['median_us']:8.0f} ({s['p10_us']:6.0f}-{s['p90_us']:6.0f}) "
                      f"{s['comm_share']:5.0%} {vs:>6} {s['median_us'] / r['gemm_floor_us']:7.2f}x"
                      , file=out)
            if ds:
                print(f"{r['tokens']:>6} {'DeepSpeed MoE':<16} "
                      f"{ds['median_us']:8.0f} ({ds['p10_us']:6.0f}-{ds['p90_us']:6.0f}) "
                      f"{'':>5} {'1.00x':>6} {ds['median_us'] / r['gemm_floor_us']:7.2f}x  "
                      f"{ds['dropped_share']:.1%} of pairs", file=out)
            print(f"{r['tokens']:>6} {'expert matmuls':<16} {r['gemm_floor_us']:8.0f} "
                  "(at the measured GEMM rate, busiest rank)", file=out)
    print("\n'vs DS': DeepSpeed's time / FusedMoE's (above 1 = FusedMoE faster); 'vs floor': "
          "time / the expert matmuls alone. FusedMoE drops no (token, expert) pair.", file=out)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--tokens", type=_ints, default=[1, 16, 128, 512], help="tokens per rank")
    p.add_argument("--inter", type=_ints, default=[64, 2048], help="expert widths I")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--managers", default=",".join(MANAGERS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--no-deepspeed", action="store_true", help="time FusedMoE only")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", help="write the rows (and the arguments) to this file")
    a = p.parse_args(argv)
    managers = [m for m in a.managers.split(",") if m]
    unknown = sorted(set(managers) - set(MANAGERS))
    if unknown or not managers:
        p.error(f"--managers: unknown {', '.join(unknown) or 'none given'}; choose from "
                f"{', '.join(MANAGERS)}")
    use_ds = not a.no_deepspeed and importlib.util.find_spec("deepspeed") is not None
    if not a.no_deepspeed and not use_ds:
        print("deepspeed is not installed (pip install -e '.[peers]'); timing FusedMoE only",
              file=sys.stderr)
    args = {"world_size": a.world_size, "tokens": a.tokens, "inter": a.inter,
            "hidden": a.hidden, "experts": a.experts, "managers": managers,
            "warmup": a.warmup, "iters": a.iters, "deepspeed": use_ds}
    rows = run_distributed(a.world_size, _worker, args, timeout=a.timeout)[0]
    _print(rows, args)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": args, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
