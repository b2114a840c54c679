"""FusedMoE forward time per manager, side by side with DeepSpeed's MoE layer, in one job.

Spawns W local CPU ranks (``moe_ep.testing.run_distributed``); in that one job, for every
expert width I and tokens per rank it times, on the same machine state:

* ``FusedMoE`` on each portable manager, over the shared-memory transport (``shm`` and the
  shm-backed collectives of the others) and over plain gloo (``use_shm=False``);
* ``deepspeed.moe.layer.MoE`` (``ep_size=W``, top-2, ``capacity_factor=1``, its all-to-all on
  gloo; deterministic top-2, ``top2_2nd_expert_sampling=False``, so both layers route alike),
  and the share of (token, expert) pairs its capacity drops (FusedMoE drops none);
* the expert matmuls alone: on each rank, the two matmuls (and the activation) per local
  expert over as many rows as the dispatch delivered to it, timed like the layers (slowest
  rank): the floor of any layer that computes every pair with this core's GEMM. The rate they
  reach (GFLOP/s) is printed beside them. With ``--dtype bfloat16`` that is torch's bf16
  matmul, which a CPU without bf16 dot products runs at a few GFLOP/s (FusedMoE's experts
  then run in fp32 or with its own bf16 kernel, so it can be below that floor).

Every candidate runs once per repetition, in turn (interleaved, so that a machine whose load
drifts affects them alike), each after a barrier, and counts the slowest rank. FusedMoE's
forward is split into its steps (route, prepare = dispatch, experts, finalize = combine,
shared), so the share spent in dispatch + combine is reported (it includes waiting for the
slower rank).

    python bench/bench_fused_moe.py                       # H=1024, E=8, top-2, fp32, I=64,2048
    python bench/bench_fused_moe.py --tokens 16,128 --inter 64 --iters 50 --no-deepspeed
    python bench/bench_fused_moe.py --json out.json       # also write every number
    python bench/bench_fused_moe.py --dtype bfloat16      # every layer and the floor in bf16

DeepSpeed (``pip install -e ".[peers]"``, built with ``DS_BUILD_OPS=0``) is optional; without
it the DeepSpeed columns are empty. Its first run JIT-builds a communication op (about a
minute). Timings on a shared or small machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from moe_ep.testing import run_distributed

import deepspeed_peer  # bench/deepspeed_peer.py, beside this script

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


def _fused_step(layer, x) -> tuple[float, float]:
    """One forward of ``layer`` on ``x``: (total seconds, seconds in prepare + finalize)."""
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
    return t5 - t0, (t2 - t1) + (t4 - t3)


def _deepspeed_step(moe, x) -> tuple[float, float]:
    t0 = time.perf_counter()
    moe(x)
    return time.perf_counter() - t0, 0.0


def _matmul_step(xs, w13, w2) -> tuple[float, float]:
    """The expert MLPs alone on the rows each local expert received."""
    inter = w2.shape[-1]
    t0 = time.perf_counter()
    for e, x in enumerate(xs):
        if x.shape[0]:
            h = x @ w13[e].T
            (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].T
    return time.perf_counter() - t0, 0.0


def _interleaved(steps: dict, group, warmup: int, iters: int) -> dict:
    """Time every step once per repetition, in turn, each after a barrier.

    Interleaving gives every candidate the same share of a machine whose load drifts (a
    shared host), so their ratios hold even when the absolute times do not.
    """
    names = list(steps)
    total = {n: [] for n in names}
    comm = {n: [] for n in names}
    with torch.no_grad():
        for i in range(warmup + iters):
            for n in names:
                group.barrier()
                t, c = steps[n]()
                if i >= warmup:
                    total[n].append(t)
                    comm[n].append(c / t)
    out = {}
    for n in names:
        # A collective is as fast as its slowest rank: per repetition, the largest time.
        shares = group.all_gather(torch.tensor([statistics.median(comm[n])]), dim=0)
        out[n] = {**_stats(_slowest(group, total[n])), "comm_share": float(shares.max())}
    return out


def _dropped_share(moe, x, group) -> float:
    """The share of (token, expert) pairs DeepSpeed's capacity drops (all ranks)."""
    with torch.no_grad():
        _, _, dispatch_mask, _ = moe.deepspeed_moe.gate(x)
    kept = group.all_reduce(torch.tensor([float(dispatch_mask.sum()), float(x.shape[0] * 2)]))
    return 1 - float(kept[0] / kept[1])


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
    dtype = getattr(torch, args["dtype"])
    shm_group = GroupCoordinator([list(range(world))], "ep-shm", use_shm=True)
    gloo_group = GroupCoordinator([list(range(world))], "ep-gloo", use_shm=False)
    rows = []
    deepspeed_moe = None
    if args["deepspeed"]:
        deepspeed_peer.init_deepspeed(world)
        from deepspeed.moe.layer import MoE as deepspeed_moe
    try:
        for inter in args["inter"]:
            torch.manual_seed(0)
            gate = (torch.randn(experts, hidden) * hidden**-0.5).to(dtype)
            w13 = (torch.randn(experts, 2 * inter, hidden) * hidden**-0.5).to(dtype)
            w2 = (torch.randn(experts, hidden, inter) * inter**-0.5).to(dtype)
            layers = []
            for transport, group, names in (("shm", shm_group, MANAGERS),
                                            ("gloo", gloo_group, GLOO_MANAGERS)):
                for name in names:
                    if name not in args["managers"]:
                        continue
                    mgr = build_manager(name, group)
                    layer = FusedMoE(experts, topk, hidden, inter, mgr, dtype=dtype,
                                     max_tokens_per_rank=max(args["tokens"]))
                    layer.load_global_weights(gate, w13, w2)
                    layers.append((transport, name, layer))
            ds = None
            if deepspeed_moe is not None:
                ds = deepspeed_moe(hidden, _SwiGLU(hidden, inter), num_experts=experts,
                                   ep_size=world, k=topk, capacity_factor=1.0,
                                   eval_capacity_factor=1.0, min_capacity=4,
                                   top2_2nd_expert_sampling=False)
                ds.set_deepspeed_parallelism()
                ds.to(dtype).eval()
            for tokens in args["tokens"]:
                x = torch.randn(tokens, hidden,
                                generator=torch.Generator().manual_seed(info.rank)).to(dtype)
                # The rows each local expert receives (any manager: routing is the same).
                probe = layers[0][2]
                with torch.no_grad():
                    res = probe.prepare(x, *probe.route(x)[1:])
                    probe.finalize(probe.compute_experts(res), res)
                counts = res.tokens_per_expert.tolist()
                xs = [torch.randn(n, hidden).to(dtype) for n in counts]
                steps = {f"{SHORT[name]}/{transport}": functools.partial(_fused_step, layer, x)
                         for transport, name, layer in layers}
                if ds is not None:
                    steps["deepspeed"] = functools.partial(_deepspeed_step, ds, x)
                steps["matmuls"] = functools.partial(_matmul_step, xs, probe.w13, probe.w2)
                timed = _interleaved(steps, shm_group, args["warmup"], args["iters"])
                busiest = float(shm_group.all_gather(torch.tensor([float(sum(counts))]),
                                                     dim=0).max())
                matmuls = timed.pop("matmuls")
                matmuls["gflops"] = (6 * busiest * hidden * inter
                                     / (matmuls["median_us"] * 1e-6) / 1e9)
                row = {"inter": inter, "tokens": tokens, "matmuls": matmuls}
                if ds is not None:
                    row["deepspeed"] = {**timed.pop("deepspeed"),
                                        "dropped_share": _dropped_share(ds, x, gloo_group)}
                row["fused"] = timed
                rows.append(row)
                if info.rank == 0:
                    print(_progress(row), file=sys.stderr, flush=True)
            for _, _, layer in layers:
                layer.manager.destroy()
    finally:
        shm_group.destroy()
        gloo_group.destroy()
        if deepspeed_moe is not None:
            dist.barrier()
            deepspeed_peer.unlink_segments()
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
          f"H={args['hidden']}, E={args['experts']}, top-2, {args['dtype']}; "
          f"{args['iters']} iterations after {args['warmup']} warm-up; microseconds, median "
          "(p10-p90) of the slowest rank; comm = share of the forward in prepare (dispatch) + "
          "finalize (combine) ==", file=out)
    for inter in args["inter"]:
        sel = [r for r in rows if r["inter"] == inter]
        print(f"\n-- I={inter} --", file=out)
        print(f"{'tokens':>6} {'layer':<24} {'forward us':>24} {'comm':>5} {'vs DS':>6} "
              f"{'vs floor':>8}  dropped / rate", file=out)
        for r in sel:
            ds, floor = r.get("deepspeed"), r["matmuls"]["median_us"]

            lines = [(f"FusedMoE {label}", st, f"{st['comm_share']:.0%}",
                      f"{ds['median_us'] / st['median_us']:5.2f}x" if ds else "-", "")
                     for label, st in sorted(r["fused"].items(),
                                             key=lambda kv: kv[1]["median_us"])]
            if ds:
                # A layer 3x faster than DeepSpeed runs in DS / 3: how far above the bare
                # matmuls that leaves room for everything else (routing, comm, sums).
                lines.append(("DeepSpeed MoE", ds, "", "1.00x",
                              f"{ds['dropped_share']:.1%} of pairs; DS/3 = "
                              f"{ds['median_us'] / 3 / floor:.2f}x floor"))
            lines.append(("expert matmuls alone", r["matmuls"], "", "",
                          f"{r['matmuls']['gflops']:.1f} GFLOP/s"))
            for label, st, comm, vs, extra in lines:
                print(f"{r['tokens']:>6} {label:<24} {st['median_us']:8.0f} "
                      f"({st['p10_us']:6.0f}-{st['p90_us']:6.0f}) {comm:>5} {vs:>6} "
                      f"{st['median_us'] / floor:7.2f}x  {extra}", file=out)
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
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights, activations and the floor's matmuls")
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
            "hidden": a.hidden, "experts": a.experts, "managers": managers, "dtype": a.dtype,
            "warmup": a.warmup, "iters": a.iters, "deepspeed": use_ds}
    rows = run_distributed(a.world_size, _worker, args, timeout=a.timeout)[0]
    _print(rows, args)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": args, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
