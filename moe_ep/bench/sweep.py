"""`moe-ep bench`: dispatch/combine latency of every backend over a sweep of shapes.

The driver only plans, launches and reports; the timing core (verification against the
reference, warm-up, repetitions, percentiles, bytes) is `moe_ep.bench.dispatch_latency.
measure_manager`, run once per case on every rank.

Launch modes:
- spawned (default): `--world-size` local ranks through `moe_ep.testing.DistributedPool`; the
  parent runs one case at a time with a timeout, so a backend that hangs is reported and the
  sweep goes on with fresh ranks.
- torchrun (RANK and WORLD_SIZE set): every launched rank runs the same loop; rank 0 prints
  and writes the outputs. The same command therefore works on a multi-GPU or multi-node job.

Outputs in `--out` (default `bench_out/`): results.json (one row per backend and shape),
results.md (the table), results.png (latency vs tokens per rank, one line per backend).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Short dtype names on the command line and in results; torch is imported lazily so that
# `moe-ep --help` stays fast.
DTYPES = ("bf16", "fp16", "fp32")
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# The default sweep: decode-sized to small-prefill-sized batches on a model slice small enough
# that 2 CPU ranks finish every CPU backend in well under 3 minutes (see docs/usage.md).
DEFAULT_TOKENS = (16, 64, 256, 1024)
DEFAULT_HIDDEN = (2048,)
DEFAULT_EXPERTS = (64,)
DEFAULT_TOPK = (8,)
DEFAULT_WARMUP = 3
DEFAULT_ITERS = 20
DEFAULT_REPEATS = 5
DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Case:
    """One measurement: a backend (with its options) on one shape."""

    backend: str
    options: tuple[tuple[str, Any], ...]
    tokens_per_rank: int
    hidden: int
    num_experts: int
    topk: int
    dtype: str

    def describe(self) -> str:
        opts = "".join(f" {k}={v}" for k, v in self.options)
        return (f"{self.backend}{opts} tokens={self.tokens_per_rank} H={self.hidden} "
                f"E={self.num_experts} k={self.topk} {self.dtype}")


@dataclass(frozen=True)
class Plan:
    cases: tuple[Case, ...]
    warmup: int
    iters: int
    repeats: int
    timeout_s: float
    unavailable: tuple[tuple[str, str], ...] = ()  # (backend, reason) left out of the sweep


# --------------------------------------------------------------------------- arguments


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 16,64,256, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated backend names")
    return names


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `moe-ep bench` options."""

    def csv(values: Iterable[int]) -> str:
        return ",".join(str(v) for v in values)

    g = p.add_argument_group("backends (default: every backend available here)")
    pick = g.add_mutually_exclusive_group()
    pick.add_argument("--managers", type=_name_list, default=None, metavar="A,B",
                      help="comma-separated backends to run (aliases such as agrs accepted)")
    pick.add_argument("--config", default=None, metavar="FILE",
                      help="run the backend(s) this config selects here (path or shipped name)")
    g.add_argument("--phase", choices=("prefill", "decode", "all"), default="all",
                   help="with --config: the phase(s) to select for (default: all)")
    g.add_argument("--floor", action="store_true",
                   help="instead of the sweep, how close `shm` runs to the physical floor "
                        "(docs/design.md#the-floor): 1, 128 and 1024 tokens (or --tokens), "
                        "H=4096 bf16, E=64, top-8, on --world-size CPU ranks; writes "
                        "floor_w{N}.json/.md to --out")
    g = p.add_argument_group("sweep (comma-separated lists; every combination is measured)")
    g.add_argument("--tokens", type=_int_list, default=DEFAULT_TOKENS, metavar="N,..",
                   help=f"tokens per rank (default: {csv(DEFAULT_TOKENS)})")
    g.add_argument("--hidden", type=_int_list, default=DEFAULT_HIDDEN, metavar="H,..",
                   help=f"hidden sizes (default: {csv(DEFAULT_HIDDEN)})")
    g.add_argument("--experts", type=_int_list, default=DEFAULT_EXPERTS, metavar="E,..",
                   help=f"global numbers of experts (default: {csv(DEFAULT_EXPERTS)})")
    g.add_argument("--topk", type=_int_list, default=DEFAULT_TOPK, metavar="K,..",
                   help=f"experts per token (default: {csv(DEFAULT_TOPK)})")
    g.add_argument("--dtype", choices=DTYPES, default="bf16",
                   help="activation dtype (default: bf16)")
    g = p.add_argument_group("timing and launch")
    g.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, metavar="N",
                   help=f"untimed round trips before timing (default: {DEFAULT_WARMUP})")
    g.add_argument("--iters", type=int, default=DEFAULT_ITERS, metavar="N",
                   help=f"back-to-back round trips per timed repetition, one barrier before "
                        f"each repetition (default: {DEFAULT_ITERS})")
    g.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, metavar="N",
                   help=f"timed repetitions: median, p10, p90 of the per-call mean are over "
                        f"these (default: {DEFAULT_REPEATS})")
    g.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="local ranks to spawn (default 2 on CPU, one per GPU on CUDA; "
                        "under torchrun the launched ranks are used)")
    g.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help="seconds one case may take before its ranks are killed and the "
                        f"case is reported as a timeout (spawned mode; default: "
                        f"{DEFAULT_TIMEOUT_S:g})")
    g.add_argument("--out", default="bench_out", metavar="DIR",
                   help="folder for results.json, results.md and results.png "
                        "(default: bench_out)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")


# --------------------------------------------------------------------------- planning


def _check_args(args: argparse.Namespace) -> None:
    from moe_ep.launch import CLIError

    if args.iters < 1:
        raise CLIError(f"--iters must be >= 1, got {args.iters}")
    if args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    if args.world_size is not None and args.world_size < 1:
        raise CLIError(f"--world-size must be >= 1, got {args.world_size}")
    for e in args.experts:
        for k in args.topk:
            if k > e:
                raise CLIError(f"--topk {k} exceeds --experts {e}")
    if args.phase != "all" and args.config is None:
        raise CLIError("--phase only applies with --config")


def _canonical(names: Sequence[str]) -> list[str]:
    from moe_ep.launch import CLIError
    from moe_ep.managers.registry import ALIASES, known_managers

    known, aliases = known_managers(), ALIASES
    out = []
    for name in names:
        canon = aliases.get(name, name)
        if canon not in known:
            raise CLIError(f"--managers: unknown backend {name!r}; known backends: "
                           f"{', '.join(known)}")
        if canon not in out:
            out.append(canon)
    return out


def plan_sweep(args: argparse.Namespace, topology) -> Plan:
    """The cases to run for the parsed `args` on `topology` (no communication)."""
    from moe_ep.config import load_config, select
    from moe_ep.managers.registry import available_managers

    avail = dict(available_managers(topology))
    chosen: list[tuple[str, tuple[tuple[str, Any], ...]]] = []
    unavailable: list[tuple[str, str]] = []
    if args.config is not None:
        config = load_config(args.config)
        phases = ("prefill", "decode") if args.phase == "all" else (args.phase,)
        for phase in phases:
            sel = select(config, topology, phase, availability=avail)
            item = (sel.name, tuple(sel.options.items()))
            if item not in chosen:
                chosen.append(item)
    elif args.managers is not None:
        for name in _canonical(args.managers):
            ok, why = avail.get(name, (False, "not registered"))
            if ok:
                chosen.append((name, ()))
            else:
                unavailable.append((name, why))
    else:
        for name, (ok, why) in avail.items():
            if ok:
                chosen.append((name, ()))
            else:
                unavailable.append((name, why))
    cases = tuple(
        Case(name, opts, t, h, e, k, args.dtype)
        for name, opts in chosen
        for h in args.hidden
        for e in args.experts
        for k in args.topk
        for t in args.tokens
    )
    return Plan(cases, args.warmup, args.iters, args.repeats, args.timeout, tuple(unavailable))


# --------------------------------------------------------------------------- measuring


def _stats(value: Any) -> dict[str, float]:
    """{median, p10, p90} from the timing core's stats object or mapping."""
    if isinstance(value, Mapping):
        return {k: float(value[k]) for k in ("median", "p10", "p90")}
    return {k: float(getattr(value, k)) for k in ("median", "p10", "p90")}


def measure_case(group, case: Case, warmup: int, iters: int, repeats: int) -> dict[str, Any]:
    """Run one case on `group` (collective). Returns the JSON-ready row fields measured."""
    import torch

    from moe_ep.bench.dispatch_latency import measure_manager
    result = measure_manager(
        group, case.backend, dict(case.options),
        tokens_per_rank=case.tokens_per_rank, hidden=case.hidden,
        num_experts=case.num_experts, topk=case.topk,
        dtype=getattr(torch, _TORCH_DTYPES[case.dtype]), warmup=warmup, iters=iters,
        repeats=repeats,
    )
    return _result_fields(result)


def _result_fields(result: Any) -> dict[str, Any]:
    get = result.get if isinstance(result, Mapping) else (lambda k, d=None: getattr(result, k, d))
    verified = bool(get("verified"))
    fields: dict[str, Any] = {"verified": verified,
                              "bytes_per_rank": int(get("bytes_per_rank", 0) or 0)}
    for key in ("bytes_per_token", "model_bytes_per_token", "max_abs_error"):
        value = get(key, None)
        if value is not None:
            fields[key] = float(value)
    error = get("error", None)
    if not verified:
        fields.update(status="wrong", error=error or "result differs from the reference")
        return fields
    for key in ("dispatch_us", "combine_us", "total_us"):
        fields[key] = _stats(get(key))
    if get("experts_us", None) is not None:  # the identity expert step, timed apart
        fields["experts_us"] = _stats(get("experts_us"))
    total_s = fields["total_us"]["median"] * 1e-6
    fields["gbps"] = fields["bytes_per_rank"] / total_s / 1e9 if total_s > 0 else None
    fields["status"] = "ok"
    return fields


def _spawned_case(info, case: Case, warmup: int, iters: int, repeats: int
                  ) -> dict[str, Any] | None:
    """Worker side of one spawned case: the ranks are the EP group of a plain job."""
    import torch

    from moe_ep.distributed import initialize_model_parallel

    # W ranks share this machine's cores: more intra-op threads than cores per rank would
    # oversubscribe the CPU and time the scheduler instead of the managers.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
    groups = initialize_model_parallel()
    fields = measure_case(groups.ep, case, warmup, iters, repeats)
    return fields if info.rank == 0 else None


def _base_row(case: Case, world_size: int) -> dict[str, Any]:
    return {"backend": case.backend, "options": dict(case.options),
            "tokens_per_rank": case.tokens_per_rank, "hidden": case.hidden,
            "num_experts": case.num_experts, "topk": case.topk, "dtype": case.dtype,
            "world_size": world_size}


def _progress_line(i: int, n: int, case: Case) -> str:
    return f"[{i:>{len(str(n))}}/{n}] {case.describe():<62}"


def _summary(row: Mapping[str, Any], seconds: float) -> str:
    if row["status"] == "ok":
        return (f"total {row['total_us']['median']:>10.1f} us  ({seconds:.1f} s)")
    return f"{row['status'].upper()}: {row.get('error', '')}"


def run_spawned(plan: Plan, world_size: int, device: str,
                echo: Callable[..., None] = print) -> list[dict[str, Any]]:
    """Run `plan` on `world_size` freshly spawned local ranks; one row per case."""
    from moe_ep.launch import DistributedPool, DistributedTimeoutError, WorkerCrashedError

    rows: list[dict[str, Any]] = []
    pool = None
    dead: dict[str, str] = {}  # backend -> why its remaining cases are skipped
    try:
        for i, case in enumerate(plan.cases, 1):
            row = _base_row(case, world_size)
            echo(_progress_line(i, len(plan.cases), case), end="", flush=True)
            start = time.perf_counter()
            if case.backend in dead:
                row.update(status="skipped", error=dead[case.backend])
            else:
                try:
                    if pool is None or pool.broken:
                        if pool is not None:
                            pool.close()
                        pool = DistributedPool(world_size, device=device)
                    row.update(pool.run(_spawned_case, case, plan.warmup, plan.iters,
                                        plan.repeats, timeout=plan.timeout_s)[0])
                except (DistributedTimeoutError, WorkerCrashedError) as exc:
                    # A hang or crash would most likely repeat at the next size.
                    kind = "timeout" if isinstance(exc, DistributedTimeoutError) else "crashed"
                    row.update(status=kind, error=_one_line(exc))
                    dead[case.backend] = f"after {kind} at tokens={case.tokens_per_rank}"
                except Exception as exc:  # noqa: BLE001 - a backend error is a result: report it
                    row.update(status="error", error=_one_line(exc))
            echo(" " + _summary(row, time.perf_counter() - start), flush=True)
            rows.append(row)
    finally:
        if pool is not None:
            pool.close()
    return rows


def run_in_job(plan: Plan, group, echo: Callable[..., None] = print) -> list[dict[str, Any]]:
    """Run `plan` on the ranks of `group` (every rank calls this); rows complete on every rank.

    A case that raises on some rank is reported as an error on all of them (the ranks agree
    after each case, so one failing rank does not leave the others in a later collective).
    """
    rows: list[dict[str, Any]] = []
    talk = group.rank_in_group == 0
    for i, case in enumerate(plan.cases, 1):
        row = _base_row(case, group.world_size)
        if talk:
            echo(_progress_line(i, len(plan.cases), case), end="", flush=True)
        start = time.perf_counter()
        try:
            fields, error = measure_case(group, case, plan.warmup, plan.iters,
                                         plan.repeats), None
        except Exception as exc:  # noqa: BLE001 - reported as this case's result
            fields, error = None, _one_line(exc)
        outcomes = group.all_gather_object((fields, error))
        errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(outcomes) if e is not None]
        if errors:
            row.update(status="error", error="; ".join(errors))
        else:
            row.update(outcomes[0][0])
        if talk:
            echo(" " + _summary(row, time.perf_counter() - start), flush=True)
        rows.append(row)
    return rows


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


# --------------------------------------------------------------------------- reporting


def format_table(rows: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """The results as an aligned text table (or a Markdown table).

    Shape columns (H, E, k, dtype) that are the same in every row are left out of the table
    and stated once in a `shape:` line above it, so the latency columns stay readable.
    """
    head = ["backend", "tokens", "H", "E", "k", "dtype", "dispatch us p50 [p10-p90]",
            "combine us p50 [p10-p90]", "total us p50 [p10-p90]", "bytes/rank", "GB/s",
            "status"]
    numeric = {1, 2, 3, 4, 6, 7, 8, 9, 10}

    def stat(s: Mapping[str, float] | None) -> str:
        if not s:
            return "-"
        return f"{s['median']:.1f} [{s['p10']:.1f}-{s['p90']:.1f}]"

    body = []
    for r in rows:
        opts = "".join(f" {k}={v}" for k, v in r.get("options", {}).items())
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        body.append([
            r["backend"] + opts, str(r["tokens_per_rank"]), str(r["hidden"]),
            str(r["num_experts"]), str(r["topk"]), r["dtype"], stat(r.get("dispatch_us")),
            stat(r.get("combine_us")), stat(r.get("total_us")),
            _human_bytes(r["bytes_per_rank"]) if r.get("bytes_per_rank") else "-",
            f"{r['gbps']:.3g}" if r.get("gbps") else "-", status,
        ])
    constant = [i for i in (2, 3, 4, 5) if body and len({b[i] for b in body}) == 1]
    keep = [i for i in range(len(head)) if i not in constant]
    caption = ""
    if constant:
        caption = "shape: " + ", ".join(f"{head[i]}={body[0][i]}" for i in constant) + "\n"
    head = [head[i] for i in keep]
    body = [[b[i] for i in keep] for b in body]
    right = {j for j, i in enumerate(keep) if i in numeric}
    if markdown:
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join("--:" if j in right else "---" for j in range(len(head))) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return caption + "\n" * bool(caption) + "\n".join(lines)
    widths = [max(len(h), *(len(b[j]) for b in body)) if body else len(h)
              for j, h in enumerate(head)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if j in right else c.ljust(w)
                         for j, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return caption + "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # unreachable; keeps type checkers calm


def check_out_dir(out: Path) -> None:
    """Raise CLIError unless `out` is (or can be made) a writable folder: checked before the
    sweep, so a bad --out does not cost a whole run."""
    from moe_ep.launch import CLIError

    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".moe_ep_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"--out {out} is not a writable folder: {exc.strerror or exc}") from None


def write_outputs(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], out: Path,
                  *, plot: bool = True, echo: Callable[..., None] = print) -> dict[str, Path]:
    """results.json, results.md and (unless `plot` is false, or matplotlib is missing: then a
    one-line note) results.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md"}
    paths["json"].write_text(json.dumps({"meta": dict(meta), "results": list(rows)}, indent=2)
                             + "\n")
    paths["md"].write_text(f"Command: `{meta['command']}`\n\n{format_table(rows, markdown=True)}"
                           "\n")
    if plot and any(r["status"] == "ok" for r in rows):
        if importlib.util.find_spec("matplotlib") is None:
            echo("results.png skipped: matplotlib is not installed "
                 "(pip install 'moe-ep[bench]')")
        else:
            from moe_ep.bench.plot import plot_latency

            paths["png"] = plot_latency(rows, out / "results.png", title=_title(meta))
    return paths


def _title(meta: Mapping[str, Any]) -> str:
    return (f"moe-ep bench: {meta['world_size']} {meta['device'].upper()} ranks "
            f"({meta['launcher']}), {meta['repeats']} x {meta['iters']} back-to-back calls "
            f"after {meta['warmup']} warm-up  |  {meta['host']}")


def _meta(args: argparse.Namespace, plan: Plan, world_size: int, device: str,
          launcher: str, topology) -> dict[str, Any]:
    import torch

    from moe_ep import __version__

    describe = getattr(topology, "describe", None)
    return {
        "command": "moe-ep " + shlex.join(getattr(args, "argv", None) or ["bench"]),
        "moe_ep_version": __version__, "torch_version": torch.__version__,
        "python": platform.python_version(),
        "host": f"{platform.machine()}, {os.cpu_count()} CPU cores"
                + (f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ""),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "launcher": launcher, "world_size": world_size, "device": device,
        "topology": describe() if describe else str(topology),
        "warmup": plan.warmup, "iters": plan.iters, "repeats": plan.repeats,
        "sweep": {"tokens_per_rank": list(args.tokens), "hidden": list(args.hidden),
                  "num_experts": list(args.experts), "topk": list(args.topk),
                  "dtype": args.dtype},
        "unavailable": {name: why for name, why in plan.unavailable},
    }


# --------------------------------------------------------------------------- entry


def main_from_args(args: argparse.Namespace) -> int:
    """`moe-ep bench` with parsed arguments; returns the exit status."""
    from moe_ep.launch import EXIT_ERROR, CLIError, local_topology, under_torchrun

    _check_args(args)
    check_out_dir(Path(args.out))
    if args.floor:
        return _floor(args)
    started = time.perf_counter()
    if under_torchrun():
        if args.world_size is not None and args.world_size != int(os.environ["WORLD_SIZE"]):
            raise CLIError(f"--world-size {args.world_size} disagrees with the torchrun job "
                           f"(WORLD_SIZE={os.environ['WORLD_SIZE']}); drop --world-size")
        rows, meta, talk = _bench_torchrun(args)
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        topology = local_topology(args.world_size, device=device)
        plan = plan_sweep(args, topology)
        meta = _meta(args, plan, topology.world_size, device, "spawned", topology)
        _announce(plan, meta)
        rows = run_spawned(plan, topology.world_size, device) if plan.cases else []
        talk = True
    if not talk:
        return 0
    if not rows:
        print("moe-ep bench: nothing to run (no selected backend is available here)",
              file=sys.stderr)
        return EXIT_ERROR
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    print()
    print(format_table(rows), flush=True)
    print()
    paths = write_outputs(rows, meta, Path(args.out), plot=not args.no_plot)
    print("wrote " + ", ".join(str(p) for p in paths.values()) + f" in {meta['wall_s']} s")
    return 0 if all(r["status"] == "ok" for r in rows) else EXIT_ERROR


def _floor(args: argparse.Namespace) -> int:
    from moe_ep.bench.floor import FLOOR_TOKENS, run_floor
    from moe_ep.launch import CLIError, under_torchrun

    if under_torchrun():
        raise CLIError("--floor spawns its own CPU ranks: run it without torchrun")
    if args.managers is not None or args.config is not None:
        raise CLIError("--floor measures shm and alltoallv itself: drop --managers / --config")
    tokens = FLOOR_TOKENS if args.tokens == DEFAULT_TOKENS else tuple(args.tokens)
    # --timeout bounds one case; the floor run is one job of several cases.
    run_floor(args.world_size or 2, tokens, out=args.out, timeout=args.timeout * len(tokens))
    return 0


def _announce(plan: Plan, meta: Mapping[str, Any]) -> None:
    backends = list(dict.fromkeys(c.backend for c in plan.cases))
    print(f"moe-ep bench: {len(plan.cases)} cases, backends {', '.join(backends) or '-'} on "
          f"{meta['world_size']} {meta['device']} ranks ({meta['launcher']}); "
          f"{meta['topology']}", flush=True)
    for name, why in plan.unavailable:
        print(f"  not run: {name}: {why.split(';')[0]}", flush=True)
    cores = os.cpu_count() or 1
    if meta["device"] == "cpu" and meta["world_size"] > cores:
        print(f"  warning: {meta['world_size']} ranks on {cores} CPU cores: ranks share cores, "
              "so latencies include time spent descheduled", flush=True)


def _bench_torchrun(args: argparse.Namespace):
    import torch

    from moe_ep.distributed import (
        destroy_model_parallel,
        init_distributed,
        initialize_model_parallel,
    )
    from moe_ep.distributed.topology import Topology

    init_distributed()
    groups = initialize_model_parallel()
    try:
        topology = Topology.detect(groups.ep)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        plan = plan_sweep(args, topology)
        # Every rank must run the same cases; rank 0's plan is authoritative.
        plan = groups.ep.broadcast_object(plan, src=0)
        talk = groups.ep.rank_in_group == 0
        meta = _meta(args, plan, groups.ep.world_size, device, "torchrun", topology)
        if talk:
            _announce(plan, meta)
        rows = run_in_job(plan, groups.ep)
    finally:
        destroy_model_parallel()
        torch.distributed.destroy_process_group()
    return rows, meta, talk


__all__ = [
    "DTYPES",
    "Case",
    "Plan",
    "add_arguments",
    "format_table",
    "main_from_args",
    "measure_case",
    "plan_sweep",
    "run_in_job",
    "run_spawned",
    "write_outputs",
]
