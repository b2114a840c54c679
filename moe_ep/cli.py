"""The `moe-ep` command (also `python -m moe_ep`).

    moe-ep topo                      detected topology and every backend's availability
    moe-ep check-config FILE|NAME    which rule of a config wins here, and why others were skipped
    moe-ep bench [options]           dispatch/combine latency per backend (see moe_ep.bench.sweep)

Bad arguments or files print one line `moe-ep: error: ...` and exit with status 2; a config
that selects nothing here exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from moe_ep import __version__
from moe_ep.config import PHASES, Config, ConfigError, SelectionError, load_config, select
from moe_ep.launch import (
    EXIT_ERROR,
    EXIT_USAGE,
    CLIError,
    local_topology,
    torchrun_topology,
    under_torchrun,
)


# --------------------------------------------------------------------------- topology


def _availability(topology, assume_available: bool = False) -> dict[str, tuple[bool, str]]:
    from moe_ep.managers.registry import available_managers, known_managers

    if assume_available:
        return {name: (True, "assumed available (--assume-available)")
                for name in known_managers()}
    return dict(available_managers(topology))


def _add_topology_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "topology", "Describe the job to evaluate (default: a local job on this machine; under "
        "torchrun: the launched job). Override to ask what another machine would get.")
    g.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="ranks in the job (default: one per GPU, or 2 on CPU)")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device of the ranks (default: this machine's)")
    g.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="nodes the ranks are spread over evenly (default: 1)")
    g.add_argument("--gpus-per-node", type=int, default=None, metavar="N",
                   help="GPUs per node (default: this machine's count)")
    g.add_argument("--nvlink", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the GPUs of a node are all NVLink-connected (default: probed)")


def _topology_from_args(args: argparse.Namespace):
    simulated = (args.world_size is not None or args.device is not None or args.nodes != 1
                 or args.gpus_per_node is not None or args.nvlink is not None)
    if under_torchrun() and not simulated:
        return torchrun_topology(), "the torchrun job"
    topo = local_topology(args.world_size, device=args.device, nodes=args.nodes,
                          gpus_per_node=args.gpus_per_node, nvlink=args.nvlink)
    note = "described by the command line" if simulated else (
        f"a local job of {topo.world_size} ranks on this machine; --world-size changes it")
    return topo, note


# --------------------------------------------------------------------------- topo


def cmd_topo(args: argparse.Namespace) -> int:
    import torch

    topo, note = _topology_from_args(args)
    avail = _availability(topo)
    if under_torchrun() and topo.rank != 0:
        return 0
    if args.json:
        print(json.dumps({"topology": dataclasses.asdict(topo), "internode": topo.internode,
                          "backends": {n: {"available": ok, "reason": why}
                                       for n, (ok, why) in avail.items()}}, indent=2))
        return 0
    cuda = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
            if torch.cuda.is_available() else "none")
    print(f"moe_ep {__version__}, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"CUDA devices: {cuda}")
    print(f"topology ({note}):")
    print(f"  {_describe(topo)}")
    print("backends:")
    width = max(len(n) for n in avail)
    for name, (ok, why) in avail.items():
        print(f"  {name:<{width}}  {'yes' if ok else 'no ':<3}  {why}".rstrip())
    return 0


def _describe(topo) -> str:
    describe = getattr(topo, "describe", None)
    if describe is not None:
        return describe()
    return (f"device={topo.device} world_size={topo.world_size} internode={topo.internode} "
            f"nvlink={topo.nvlink} gpus_per_node={topo.gpus_per_node}")


# --------------------------------------------------------------------------- check-config


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    topo, note = _topology_from_args(args)
    avail = _availability(topo, args.assume_available)
    if under_torchrun() and topo.rank != 0:
        return 0
    phases: Sequence[str | None] = PHASES if args.phase == "all" else (args.phase,)
    if args.json:
        return _check_config_json(config, topo, phases, avail)
    print(f"config: {config.source}")
    if config.description:
        print(f"  {config.description}")
    print(f"topology ({note}):")
    print(f"  {_describe(topo)}")
    status = 0
    for phase in phases:
        print()
        status = max(status, _report_phase(config, topo, phase, avail))
    return status


def _check_config_json(config: Config, topo, phases: Sequence[str | None],
                       avail: Mapping[str, tuple[bool, str]]) -> int:
    report: dict = {"config": str(config.source), "topology": dataclasses.asdict(topo),
                    "internode": topo.internode, "phases": {}}
    status = 0
    for phase in phases:
        try:
            sel = select(config, topo, phase, availability=avail)
        except SelectionError as exc:
            report["phases"][str(phase)] = {"selected": None, "error": str(exc)}
            status = EXIT_ERROR
            continue
        report["phases"][str(phase)] = {
            "selected": sel.name, "options": dict(sel.options), "where": sel.where,
            "skipped": [{"where": rule.where, "use": rule.use, "why": why}
                        for rule, why in sel.skipped],
        }
    print(json.dumps(report, indent=2, default=str))
    return status


def _report_phase(config: Config, topo, phase: str | None,
                  avail: Mapping[str, tuple[bool, str]]) -> int:
    try:
        sel = select(config, topo, phase, availability=avail)
    except SelectionError as exc:
        print(f"phase {phase}: NOTHING SELECTED")
        print(f"  {exc}")
        return EXIT_ERROR
    print(f"phase {phase}: {sel.rule.describe()}  <- {sel.where}"
          + (f" when {sel.rule.when.describe()}" if sel.where.startswith("all2all.rules")
             else ""))
    entries = list(config.all2all.rules) + list(config.all2all.fallback)
    skipped = {id(rule): why for rule, why in sel.skipped}
    width = max(len(r.where) for r in entries)
    dwidth = max(len(r.describe()) for r in entries)
    for rule in entries:
        if rule is sel.rule:
            mark = "selected"
        elif id(rule) in skipped:
            mark = f"skipped: {skipped[id(rule)]}"
        else:
            mark = "not tried (an earlier entry won)"
        print(f"  {rule.where:<{width}}  {rule.describe():<{dwidth}}  {mark}")
    return 0


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit status 2 (no usage dump)."""

    def error(self, message: str):
        raise CLIError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moe-ep",
        description="MoE expert-parallel dispatch/combine: inspect the machine, check a config, "
                    "benchmark the backends.",
        epilog="Examples:\n"
               "  moe-ep topo\n"
               "  moe-ep check-config cpu-local\n"
               "  moe-ep check-config configs/single-node-nvlink.yaml --device cuda "
               "--world-size 8 --nvlink --assume-available\n"
               "  moe-ep bench                                # 2 local ranks, all backends\n"
               "  torchrun --nproc-per-node 8 -m moe_ep bench  # the launched ranks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"moe-ep {__version__}")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true",
                       help="log what the library decides (INFO level)")
    noise.add_argument("-q", "--quiet", action="store_true",
                       help="log errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("topo", help="show the detected topology and backend availability",
                       description="Show the topology of a job on this machine and whether "
                                   "each registered backend can run on it, with the reason.")
    _add_topology_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_topo)

    p = sub.add_parser(
        "check-config", help="show which rule of a config wins here and why others were skipped",
        description="Load a config (a path, or a shipped name such as cpu-local), validate it "
                    "and show, per phase, which rule or fallback selects the manager and why "
                    "each other rule was skipped. Exit status 1 when nothing can be selected.")
    p.add_argument("config", metavar="FILE", help="YAML config path or shipped config name")
    p.add_argument("--phase", choices=(*PHASES, "all"), default="all",
                   help="phase to evaluate (default: all)")
    p.add_argument("--assume-available", action="store_true",
                   help="treat every backend as available (check rule matching only)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_topology_arguments(p)
    p.set_defaults(func=cmd_check_config)

    from moe_ep.bench.sweep import add_arguments as add_bench_arguments
    from moe_ep.bench.sweep import main_from_args as bench_main

    p = sub.add_parser(
        "bench", help="benchmark dispatch/combine latency per backend",
        description="Measure dispatch, combine and total latency (median, p10, p90), bytes per "
                    "rank and effective bandwidth of every available backend over a sweep of "
                    "shapes, after checking each against the reference. Spawns --world-size "
                    "local ranks, or uses the ranks torchrun launched. Prints progress and a "
                    "table; writes results.json, results.md and results.png to --out.")
    add_bench_arguments(p)
    p.set_defaults(func=bench_main)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("moe_ep").setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moe-ep` console script; returns the exit status."""
    try:
        parser = build_parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        args.argv = argv  # recorded in benchmark results as the command that made them
        _configure_logging(args)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`moe-ep topo | head -1`): stop quietly, as Unix tools do.
        # Python would report the pipe again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (CLIError, ConfigError) as exc:
        print(f"moe-ep: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SelectionError as exc:
        print(f"moe-ep: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("moe-ep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
