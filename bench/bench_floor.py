"""The floor comparison of issue 8: `shm` dispatch + combine against the 8 KiB all-reduce, a
one-thread copy of the bytes that must cross ranks, and `alltoallv` over plain gloo, all
measured in one job (see `moe_ep.bench.floor`; results in docs/design.md#the-floor).

    python bench/bench_floor.py                          # W=2, 1 / 128 / 1024 tokens
    python bench/bench_floor.py --world-size 4 --tokens 1,128
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_ep.bench.floor import floor_json, format_floor, measure_floor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--tokens", default="1,128,1024")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    tokens = tuple(int(t) for t in args.tokens.split(","))
    rows = measure_floor(args.world_size, tokens, iters=args.iters, repeats=args.repeats)
    table = format_floor(rows)
    print(f"W={args.world_size}, H=4096 bf16, E=64, top-8, random routing, identity experts")
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"floor_w{args.world_size}.json").write_text(json.dumps(floor_json(rows), indent=2))
    (out / f"floor_w{args.world_size}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
