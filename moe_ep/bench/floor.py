"""How close `shm` dispatch + combine runs to the physical floor, measured in one job.

In the same processes, on W local CPU ranks, for each token count, `measure_floor` times:

* (a) the 8 KiB all-reduce of the group (the latency of the smallest useful collective);
* (b) a one-thread `copy_` of exactly the bytes that must cross ranks: per rank, each of its
  tokens once per distinct remote owner (dispatch) plus each row it received back (combine);
* (c) `shm` dispatch + combine through a handle declared once, the experts step (identity
  experts) timed apart and left out;
* (d) the same for `alltoallv` over plain gloo (a group built with `use_shm=False`);
* (e) two `all_to_all_single` calls of the group's shared-memory collective moving the same
  cross bytes (one per direction): the cross-core copy plus its synchronisation, which is what
  (b) leaves out, since a one-thread local copy runs from this core's cache.

Every figure is the slowest rank's per-call mean of back-to-back calls between barriers,
median (and spread) over repetitions; the caller sets nothing about the allocator. The
ratios are those the issue targets: c/a at 1 token, c/b at 128 and 1024, d/c at 128; c/e
says how far the manager runs above the group's own collective moving the same bytes.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["FloorRow", "floor_worker", "format_floor", "measure_floor", "run_floor"]

#: The issue's shape: H=4096 bf16, 64 experts, top-8.
FLOOR_SHAPE = dict(hidden=4096, num_experts=64, topk=8, dtype="bfloat16")
FLOOR_TOKENS = (1, 128, 1024)

_AR_BYTES = 8 << 10


@dataclass(frozen=True)
class FloorRow:
    """One token count: microseconds (median over repetitions; spread = [min, max]).

    Attributes:
        tokens, world_size: the case; cross_bytes: bytes the slowest rank must move.
        allreduce_us, copy_us, shm_us, gloo_us, a2a_us: (a)-(e); *_spread: [min, max].
        shm_dispatch_us, shm_combine_us, gloo_dispatch_us, gloo_combine_us: the phases.
    """

    tokens: int
    world_size: int
    cross_bytes: int
    allreduce_us: float
    copy_us: float
    shm_us: float
    gloo_us: float
    a2a_us: float
    shm_dispatch_us: float
    shm_combine_us: float
    gloo_dispatch_us: float
    gloo_combine_us: float
    allreduce_spread: tuple[float, float]
    copy_spread: tuple[float, float]
    shm_spread: tuple[float, float]
    gloo_spread: tuple[float, float]

    @property
    def ratios(self) -> dict[str, float]:
        return {"c/a": self.shm_us / self.allreduce_us, "c/b": self.shm_us / self.copy_us,
                "d/c": self.gloo_us / self.shm_us, "c/e": self.shm_us / self.a2a_us}


def _blocks(group, fn, iters: int, repeats: int) -> list[float]:
    """Per-call mean (us) of `iters` back-to-back calls of `fn`, per repetition, this rank."""
    out = []
    for _ in range(repeats):
        group.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - t0) / iters * 1e6)
    return out


def _sent_bytes(ids, rank: int, world: int, num_experts: int, row_bytes: int) -> int:
    """Bytes of this rank's tokens once per distinct remote owner (what its dispatch sends;
    its combine gets as many back)."""
    from moe_ep.managers import expert_placement, planning

    rows = planning.send_counts(ids, expert_placement(num_experts, world))[:world].tolist()
    return (sum(rows) - rows[rank]) * row_bytes


def floor_worker(info, tokens_list, hidden: int, num_experts: int, topk: int,
                 dtype_name: str, iters: int, repeats: int, gloo_iters: int) -> list[dict] | None:
    """Collective over the spawned ranks (see the module docstring); rank 0 returns the rows."""
    import torch

    from moe_ep.bench.dispatch_latency import make_inputs, measure_manager
    from moe_ep.distributed import GroupCoordinator

    world = info.world_size
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = getattr(torch, dtype_name)
    shm_group = GroupCoordinator([list(range(world))], "ep")
    gloo_group = GroupCoordinator([list(range(world))], "ep_gloo", use_shm=False)
    rows = []
    try:
        small = torch.zeros(_AR_BYTES // 4)
        for _ in range(20):
            shm_group.all_reduce(small)
        allreduce = _blocks(shm_group, lambda: shm_group.all_reduce(small), 200, repeats)
        for tokens in tokens_list:
            x, _, ids = make_inputs(info.rank, tokens=tokens, hidden=hidden,
                                    num_experts=num_experts, topk=topk, dtype=dtype)
            sent = _sent_bytes(ids, info.rank, world, num_experts, hidden * x.element_size())
            # Each rank sends its rows and gets the same rows back in the combine.
            cross = 2 * max(shm_group.all_gather_object(sent))
            src = torch.empty(cross, dtype=torch.uint8).fill_(1)
            dst = torch.empty_like(src)
            torch.set_num_threads(1)  # (b) is a one-thread copy
            copy = _blocks(shm_group, lambda d=dst, s=src: d.copy_(s), 50, repeats)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
            # (e): each rank sends cross/2 bytes split over its peers, once per direction.
            chunk = max(1, cross // 2 // max(1, world - 1))
            a2a_src = torch.ones(world * chunk, dtype=torch.uint8)

            def a2a(s=a2a_src):
                shm_group.all_to_all_single(s)
                shm_group.all_to_all_single(s)

            a2a()
            a2a_blocks = _blocks(shm_group, a2a, 50, repeats)
            kw = dict(tokens_per_rank=tokens, hidden=hidden, num_experts=num_experts, topk=topk,
                      dtype=dtype, warmup=3)
            shm = measure_manager(shm_group, "shm", iters=iters, repeats=repeats, **kw)
            gloo = measure_manager(gloo_group, "alltoallv", iters=gloo_iters,
                                   repeats=max(2, repeats // 2), **kw)
            for res in (shm, gloo):
                if not res.verified:
                    raise RuntimeError(res.error)
            # The slowest rank of each repetition.
            gathered = shm_group.all_gather_object((allreduce, copy, a2a_blocks))
            ar_blocks, copy_blocks, a2a_slowest = (
                [max(b) for b in zip(*[g[i] for g in gathered], strict=True)] for i in range(3))
            rows.append(FloorRow(
                tokens=tokens, world_size=world, cross_bytes=cross,
                allreduce_us=statistics.median(ar_blocks), copy_us=statistics.median(copy_blocks),
                shm_us=shm.total_us.median, gloo_us=gloo.total_us.median,
                a2a_us=statistics.median(a2a_slowest),
                shm_dispatch_us=shm.dispatch_us.median, shm_combine_us=shm.combine_us.median,
                gloo_dispatch_us=gloo.dispatch_us.median, gloo_combine_us=gloo.combine_us.median,
                allreduce_spread=(min(ar_blocks), max(ar_blocks)),
                copy_spread=(min(copy_blocks), max(copy_blocks)),
                shm_spread=(shm.total_us.p10, shm.total_us.p90),
                gloo_spread=(gloo.total_us.p10, gloo.total_us.p90),
            ))
    finally:
        shm_group.destroy()
        gloo_group.destroy()
    return [asdict(r) for r in rows] if info.rank == 0 else None


def measure_floor(world_size: int = 2, tokens=(1, 128, 1024), *, hidden: int = 4096,
                  num_experts: int = 64, topk: int = 8, dtype: str = "bfloat16",
                  iters: int = 50, repeats: int = 5, gloo_iters: int = 5,
                  timeout: float = 900.0) -> list[FloorRow]:
    """Spawn `world_size` CPU ranks and measure (a)-(e) for each token count."""
    from moe_ep.launch import run_distributed

    rows = run_distributed(world_size, floor_worker, tuple(tokens), hidden, num_experts, topk,
                           dtype, iters, repeats, gloo_iters, timeout=timeout)[0]
    out = []
    for r in rows:
        for key in ("allreduce_spread", "copy_spread", "shm_spread", "gloo_spread"):
            r[key] = tuple(r[key])
        out.append(FloorRow(**r))
    return out


def format_floor(rows: list[FloorRow]) -> str:
    """Markdown table of the floor comparison, targets beside the ratios."""
    head = ("| tokens | (a) 8 KiB all-reduce us | (b) copy of the cross bytes us | "
            "(c) shm dispatch+combine us | (d) alltoallv on gloo us | "
            "(e) shm all-to-all of the cross bytes us | c/a | c/b | d/c | c/e |")
    lines = [head, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        q = r.ratios
        lines.append(
            f"| {r.tokens} | {r.allreduce_us:.1f} | {r.copy_us:.1f} "
            f"({r.cross_bytes / 1e6:.2f} MB) | {r.shm_us:.1f} "
            f"[{r.shm_spread[0]:.0f}-{r.shm_spread[1]:.0f}] "
            f"(d {r.shm_dispatch_us:.0f} + c {r.shm_combine_us:.0f}) | {r.gloo_us:.0f} | "
            f"{r.a2a_us:.1f} | {q['c/a']:.1f} | {q['c/b']:.1f} | {q['d/c']:.1f} | "
            f"{q['c/e']:.1f} |")
    lines.append("")
    lines.append("Targets: c/a <= 8 at 1 token; c/b <= 4 at 128 and 1024 tokens; "
                 "d/c >= 10 at 128 tokens.")
    return "\n".join(lines)


def floor_json(rows: list[FloorRow]) -> list[dict[str, Any]]:
    return [dict(asdict(r), ratios=r.ratios) for r in rows]


def run_floor(world_size: int = 2, tokens=FLOOR_TOKENS, *, iters: int = 50, repeats: int = 5,
              out: str | Path = "bench_out", timeout: float = 900.0) -> list[FloorRow]:
    """Measure at `FLOOR_SHAPE`, print the table, write `floor_w{W}.{json,md}` under `out`
    (what `python bench/bench_floor.py` and `moe-ep bench --floor` run)."""
    print(f"moe-ep floor: {world_size} CPU ranks, tokens {','.join(map(str, tokens))}, "
          "H=4096 bf16, E=64, top-8, random routing, identity experts", flush=True)
    rows = measure_floor(world_size, tuple(tokens), iters=iters, repeats=repeats,
                         timeout=timeout, **FLOOR_SHAPE)
    table = format_floor(rows)
    print(table, flush=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"floor_w{world_size}.json").write_text(json.dumps(floor_json(rows), indent=2))
    (out / f"floor_w{world_size}.md").write_text(table + "\n")
    print(f"wrote {out / f'floor_w{world_size}.json'}, {out / f'floor_w{world_size}.md'}")
    return rows
