"""The floor comparison of issue 8: `shm` dispatch + combine against the 8 KiB all-reduce, a
one-thread copy of the bytes that must cross ranks, `alltoallv` over plain gloo and the group's
shared-memory all-to-all, all measured in one job (see `moe_ep.bench.floor`; results in
docs/design.md#the-floor). Also `moe-ep bench --floor`.

    python bench/bench_floor.py                          # W=2, 1 / 128 / 1024 tokens
    python bench/bench_floor.py --world-size 4 --tokens 1,128
"""

from __future__ import annotations

import argparse

from moe_ep.bench.floor import run_floor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--tokens", default="1,128,1024")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    tokens = tuple(int(t) for t in args.tokens.split(","))
    run_floor(args.world_size, tokens, iters=args.iters, repeats=args.repeats, out=args.out)


if __name__ == "__main__":
    main()
