"""A `torchrun --nnodes 2` job across two simulated hosts (`moe_ep.testing.netns`).

Two halves:

- rank side, run by torchrun on every rank: `python -m moe_ep.testing.two_hosts checks OUT` and
  `... cut OUT`. Each rank writes what it saw to `OUT/<job>.rank<R>.json`; nothing is judged
  there, so a failure is reported by the caller with all ranks' evidence.
- caller side: `run_job` starts one torchrun agent per host and waits for both (killing both
  hosts' processes at its timeout); `run_checks`, `run_cli` / `run_bench` and `run_cut` run
  the jobs that `bench/two_hosts.py` and `tests/test_two_hosts.py` share.

Environment read on the rank side: `MOE_EP_TWO_HOSTS_TIMEOUT_S`, the process-group timeout
(`init_distributed(timeout=...)`; default 30 s).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from moe_ep.testing.netns import RDZV_PORT, HostProcess, TwoHosts

TIMEOUT_ENV = "MOE_EP_TWO_HOSTS_TIMEOUT_S"
NPROC_PER_NODE = 2

# A config whose rules key on `internode` for CPU ranks: one node and two nodes pick different
# backends, so a job that misdetects its topology selects the wrong one.
INTERNODE_CONFIG = """\
description: CPU rules keyed on internode (the two-host test).
all2all:
  rules:
    - when: {device: cpu, internode: false}
      use: shm
    - when: {device: cpu, internode: true, phase: decode}
      use: alltoallv
    - when: {device: cpu, internode: true, phase: prefill}
      use: allgather_reducescatter
  fallback: [naive]
"""

# dispatch -> apply_experts -> combine cases: (num_experts, topk, dtype name, hidden); E=5 and 6
# place experts unevenly on 4 ranks.
CONTRACT_CASES = (*itertools.product((4, 6), (1, 3), ("float32", "bfloat16"), (16,)),
                  (8, 2, "float32", 64), (5, 4, "bfloat16", 32))
CONTRACT_MANAGERS = (("naive", {}), ("allgather_reducescatter", {}), ("alltoallv", {}),
                     ("alltoallv", {"dedup": False}))
ATOL = {"float32": 1e-5, "bfloat16": 2e-2}


# =========================================================================== rank side


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "30")))


def _tokens(world: int, case: int) -> list[int]:
    """Tokens per rank: differing, one rank (rotating with the case) has none, and every third
    case sends a few dozen."""
    extra = 30 if case % 3 == 2 else 0
    return [0 if r == case % world else 1 + (3 * r + case) % 5 + extra for r in range(world)]


def _global_inputs(seed: int, counts: Sequence[int], num_experts: int, topk: int, dtype,
                   hidden: int):
    """Every rank's (x, weights, ids), built alike on every rank; ~20% of ids are -1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        x = (torch.randn(n, hidden, generator=gen) * 0.25).to(dtype)
        ids = torch.rand(n, num_experts, generator=gen).argsort(dim=1)[:, :topk]
        ids[torch.rand(n, topk, generator=gen) < 0.2] = -1
        # Router-like weights (sum 1): outputs stay near 1, where a bf16 step is < ATOL / 2.
        weights = torch.rand(n, topk, generator=gen)
        weights = weights / weights.sum(dim=1, keepdim=True)
        weights[ids < 0] = 5.0  # must be ignored
        out.append((x, weights, ids.to(torch.int32 if len(out) % 2 else torch.int64)))
    return out


def _contract_rows(group, managers, cases, seed0: int = 0) -> list[dict[str, Any]]:
    """Each (manager, case) on `group`: this rank's max error against the reference MoE."""
    import torch

    from moe_ep.managers import apply_experts, build_manager
    from moe_ep.testing import make_linear_experts, reference_moe

    rows = []
    r, world = group.rank_in_group, group.world_size
    for m, (name, options) in enumerate(managers):
        mgr = build_manager(name, group, **options)
        try:
            for c, (num_experts, topk, dtype_name, hidden) in enumerate(cases):
                dtype = getattr(torch, dtype_name)
                seed = seed0 + 100 * m + c
                counts = _tokens(world, c)
                inputs = _global_inputs(seed, counts, num_experts, topk, dtype, hidden)
                experts = make_linear_experts(num_experts, hidden, seed=seed)
                # The documented contiguous placement, written out (not the library's).
                first = r * (num_experts // world) + min(r, num_experts % world)
                x, w, ids = inputs[r]
                res = mgr.dispatch(x, w, ids, num_experts=num_experts)
                out = apply_experts(res, lambda e, rows_, f=first, ex=experts: ex[f + e](rows_))
                y = mgr.combine(out, res)
                ref_all = reference_moe(torch.cat([i[0] for i in inputs]),
                                        torch.cat([i[1] for i in inputs]),
                                        torch.cat([i[2] for i in inputs]), experts)
                start = sum(counts[:r])
                ref = ref_all[start:start + counts[r]]
                rows.append({
                    "case": f"{name}{options or ''} E={num_experts} K={topk} {dtype_name} "
                            f"H={hidden} tokens={counts}",
                    "tokens": counts[r],
                    "shape_ok": tuple(y.shape) == tuple(x.shape) and y.dtype == dtype,
                    "err": (y.float() - ref.float()).abs().max().item() if y.numel() else 0.0,
                    "atol": ATOL[dtype_name],
                    "scale": ref_all.float().abs().max().item(),
                })
        finally:
            mgr.destroy()
    return rows


def _same_node_via_hostnames(group, source: int) -> tuple[list[bool], bool]:
    """`in_the_same_node_as` with the probe file failing on the source (the host-name path);
    also whether this rank looked at its host name (so the path was really taken)."""
    from unittest import mock

    from moe_ep.distributed import group as group_module

    os_open, gethostname, asked = os.open, socket.gethostname, []

    def no_shm(path, *args, **kwargs):
        if str(path).startswith("/dev/shm/"):
            raise PermissionError(13, "no /dev/shm (simulated)", path)
        return os_open(path, *args, **kwargs)

    def counted() -> str:
        asked.append(True)
        return gethostname()

    with contextlib.ExitStack() as stack:
        if group.rank_in_group == source:
            stack.enter_context(mock.patch.object(group_module.os, "open", no_shm))
        stack.enter_context(mock.patch.object(group_module.socket, "gethostname", counted))
        flags = group_module.in_the_same_node_as(group, source)
    return flags, bool(asked)


def _same_node_with_equal_names(group) -> list[bool]:
    """`in_the_same_node_as(group, 0)` while every rank reports the same host name: the probe
    itself must not depend on names (two hosts may share one)."""
    from unittest import mock

    from moe_ep.distributed import group as group_module

    with mock.patch.object(group_module.socket, "gethostname", lambda: "one-name"):
        return group_module.in_the_same_node_as(group, 0)


def _selection(config, topology) -> dict[str, Any]:
    from moe_ep.config import select

    out = {}
    for phase in ("prefill", "decode"):
        sel = select(config, topology, phase)
        out[phase] = {"name": sel.name, "options": dict(sel.options), "where": sel.where,
                      "skipped": [(rule.where, why) for rule, why in sel.skipped]}
    return out


def _cli(argv: Sequence[str]) -> tuple[int, str]:
    """`moe-ep ARGV` in this (torchrun) process: its exit status and stdout."""
    from moe_ep.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(list(argv))
    return code, buf.getvalue()


def job_checks(out_dir: Path) -> dict[str, Any]:
    """Topology, same-node decisions, config selection and the contract across the hosts."""
    import torch.distributed as dist

    from moe_ep.config import load_config, shipped_configs
    from moe_ep.distributed import (
        destroy_model_parallel,
        in_the_same_node_as,
        init_distributed,
        initialize_model_parallel,
    )
    from moe_ep.distributed.topology import Topology
    from moe_ep.managers import ManagerUnavailableError, build_manager
    from moe_ep.managers.registry import available_managers

    init_distributed(timeout=_timeout())
    rank = dist.get_rank()
    report: dict[str, Any] = {
        "rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]),
        "hostname": socket.gethostname(), "netns": os.readlink("/proc/self/ns/net"),
        "shm_dev": os.stat("/dev/shm").st_dev,
    }
    # TP inside a host, EP across both: the layout a 2-node job would use.
    groups = initialize_model_parallel(tensor_parallel_size=NPROC_PER_NODE)
    try:
        ep, tp = groups.ep, groups.tp
        report["ep_ranks"], report["tp_ranks"] = ep.ranks, tp.ranks
        report["shm_transport"] = {"world": groups.world.shm is not None,
                                   "ep": ep.shm is not None, "tp": tp.shm is not None}
        topo = Topology.detect(ep)
        report["topology_ep"] = {"describe": topo.describe(), "internode": topo.internode,
                                 "same_node": list(topo.same_node), "num_nodes": topo.num_nodes,
                                 "local_world_size": topo.local_world_size}
        report["topology_tp"] = {"internode": Topology.detect(tp).internode}
        report["same_node_probe"] = {str(s): in_the_same_node_as(ep, s) for s in (0, 2)}
        report["same_node_hostnames"] = {str(s): _same_node_via_hostnames(ep, s) for s in (0, 2)}
        report["same_node_probe_equal_names"] = _same_node_with_equal_names(ep)
        report["availability"] = {n: list(v) for n, v in available_managers(topo).items()}
        try:
            build_manager("shm", ep).destroy()
            report["shm_across_hosts"] = "built (it should have refused)"
        except ManagerUnavailableError as exc:
            report["shm_across_hosts"] = f"refused: {exc}"
        custom = out_dir / "internode-cpu.yaml"
        configs = {**shipped_configs(), "internode-cpu": str(custom)}
        report["selection"] = {name: _selection(load_config(path), topo)
                               for name, path in configs.items()}
        report["contract"] = _contract_rows(ep, CONTRACT_MANAGERS, CONTRACT_CASES)
        # The shared-memory manager inside one host (its TP group), where it may run.
        report["contract_shm_in_host"] = _contract_rows(tp, (("shm", {}),), CONTRACT_CASES[:4],
                                                        seed0=10_000)
    finally:
        destroy_model_parallel()
    report["check_config"] = {name: _cli(["check-config", path]) for name, path in
                              configs.items()}
    dist.barrier()  # every rank of this host is done with its segments
    report["shm_left"] = sorted(n for n in os.listdir("/dev/shm") if n.startswith("moe_ep"))
    dist.destroy_process_group()
    return report


def job_cut(out_dir: Path) -> dict[str, Any]:
    """Dispatch/combine in a loop until the network fails; report when and how."""
    import torch
    import torch.distributed as dist

    from moe_ep.distributed import GroupCoordinator, init_distributed
    from moe_ep.managers import apply_experts, build_manager

    init_distributed(timeout=_timeout())
    rank, world = dist.get_rank(), dist.get_world_size()
    group = GroupCoordinator([list(range(world))], "ep")
    mgr = build_manager("alltoallv", group)
    report: dict[str, Any] = {"rank": rank, "hostname": socket.gethostname()}
    x = torch.randn(8, 16)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(8)])
    w = torch.rand(8, 2)
    iters = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            res = mgr.dispatch(x, w, ids, num_experts=8)
            mgr.combine(apply_experts(res, lambda e, rows: rows * 2), res)
            iters += 1
            if iters == 5:
                (out_dir / f"cut.ready{rank}").write_text("ready")
            time.sleep(0.01)  # keep 4 ranks on 2 cores from starving the launcher
        report.update(error=None, t_error=None)
    except Exception as exc:  # noqa: BLE001 - the error is the result
        report.update(t_error=time.time(), error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc())
    report["iters"] = iters
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:]) if argv is None else list(argv)
    if len(args) != 2 or args[0] not in ("checks", "cut"):
        print("usage (under torchrun): python -m moe_ep.testing.two_hosts checks|cut OUT_DIR",
              file=sys.stderr)
        return 2
    job, out_dir = args[0], Path(args[1])
    rank = os.environ["RANK"]
    report = {"checks": job_checks, "cut": job_cut}[job](out_dir)
    (out_dir / f"{job}.rank{rank}.json").write_text(json.dumps(report, indent=1))
    if report.get("error"):
        print(f"rank {rank} ({report['hostname']}): {report['error']}", file=sys.stderr,
              flush=True)
        # Skip interpreter teardown: a process group whose peer vanished can block there.
        os._exit(1)
    return 0


# =========================================================================== caller side


@dataclass
class JobResult:
    """One torchrun job on both hosts."""

    rc: tuple[int | None, int | None]  # per host; None: killed at the timeout
    stdout: tuple[str, str]
    stderr: tuple[str, str]
    wall_s: float
    timed_out: bool


def torchrun_argv(hosts: TwoHosts, entry: Sequence[str], run_id: str) -> list[str]:
    """The torchrun command of either host (c10d rendezvous on host 0's address)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", str(NPROC_PER_NODE), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{hosts.hosts[0].addr}:{RDZV_PORT}", "--rdzv-id", run_id,
            "--max-restarts", "0", *entry]


def start_job(hosts: TwoHosts, entry: Sequence[str], label: str,
              env: dict[str, str] | None = None) -> list[HostProcess]:
    """Start torchrun with `entry` on both hosts; files `LABEL.*` of an earlier run are removed."""
    for stale in hosts.tmp.glob(f"{label}.*"):
        stale.unlink()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    argv = torchrun_argv(hosts, entry, f"{label}-{os.getpid()}")
    return [hosts.popen(i, argv, env=env, label=label) for i in range(2)]


def finish_job(procs: Sequence[HostProcess], started: float, timeout: float) -> JobResult:
    """Wait for both hosts until `started + timeout`; kill whatever still runs then."""
    rcs = [p.wait(started + timeout - time.monotonic()) for p in procs]
    timed_out = any(rc is None for rc in rcs)
    for p in procs:
        p.kill()
    outs = [p.output() for p in procs]
    return JobResult(tuple(rcs), tuple(o for o, _ in outs), tuple(e for _, e in outs),
                     time.monotonic() - started, timed_out)


def run_job(hosts: TwoHosts, entry: Sequence[str], label: str, timeout: float,
            env: dict[str, str] | None = None) -> JobResult:
    started = time.monotonic()
    return finish_job(start_job(hosts, entry, label, env), started, timeout)


def _rank_reports(hosts: TwoHosts, job: str) -> list[dict[str, Any] | None]:
    out = []
    for r in range(2 * NPROC_PER_NODE):
        path = hosts.tmp / f"{job}.rank{r}.json"
        out.append(json.loads(path.read_text()) if path.exists() else None)
    return out


def run_checks(hosts: TwoHosts, timeout: float = 150.0) -> tuple[JobResult, list]:
    """The `checks` job; its result and every rank's report (None for a rank that wrote none)."""
    (hosts.tmp / "internode-cpu.yaml").write_text(INTERNODE_CONFIG)
    job = run_job(hosts, ["-m", "moe_ep.testing.two_hosts", "checks", str(hosts.tmp)],
                  "checks", timeout)
    return job, _rank_reports(hosts, "checks")


def run_cli(hosts: TwoHosts, argv: Sequence[str], label: str = "cli",
            timeout: float = 150.0) -> JobResult:
    """`torchrun ... -m moe_ep ARGV` on the two hosts, as a user would launch it."""
    return run_job(hosts, ["-m", "moe_ep", *argv], label, timeout)


def run_bench(hosts: TwoHosts, bench_args: Sequence[str], timeout: float = 150.0) -> JobResult:
    """`torchrun ... -m moe_ep bench BENCH_ARGS` on the two hosts (results in tmp/bench)."""
    return run_cli(hosts, ["bench", *bench_args, "--out", str(hosts.tmp / "bench")], "bench",
                   timeout)


@dataclass
class CutResult:
    job: JobResult  # rc[1] is None: host 1 was still running when it was killed
    t_cut: float | None  # time.time() when host 1's link went down (None: never got that far)
    host0_exit_s: float | None  # seconds from the cut until host 0's torchrun exited
    reports: list  # every rank's report (None for a rank that wrote none)


def run_cut(hosts: TwoHosts, pg_timeout_s: float, timeout: float = 120.0) -> CutResult:
    """Loop dispatch/combine on both hosts, take host 1 off the network once every rank runs,
    and wait for host 0's ranks to fail. Host 1 is then killed (its launcher may wait long for
    the store it lost) and reconnected, so the hosts can run further jobs."""
    started = time.monotonic()
    procs = start_job(hosts, ["-m", "moe_ep.testing.two_hosts", "cut", str(hosts.tmp)], "cut",
                      {TIMEOUT_ENV: str(pg_timeout_s)})
    t_cut = host0_exit = None
    ready = [hosts.tmp / f"cut.ready{r}" for r in range(2 * NPROC_PER_NODE)]
    try:
        while time.monotonic() < started + timeout and all(p.poll() is None for p in procs):
            if all(path.exists() for path in ready):
                hosts.cut(1)
                t_cut, cut_mono = time.time(), time.monotonic()
                if procs[0].wait(started + timeout - cut_mono) is not None:
                    host0_exit = time.monotonic() - cut_mono
                break
            time.sleep(0.05)
        job = finish_job(procs, started, timeout if t_cut is None else 0.0)
    finally:
        for p in procs:
            p.kill()
        if t_cut is not None:
            hosts.reconnect(1)
    return CutResult(job, t_cut, host0_exit, _rank_reports(hosts, "cut"))


if __name__ == "__main__":
    sys.exit(main())
