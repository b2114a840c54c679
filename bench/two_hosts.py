"""Two hosts on one machine: the multi-node job, run by hand.

    sudo python bench/two_hosts.py                 # everything, ~1 min on 2 cores
    sudo python bench/two_hosts.py --timeout-s 3 --skip bench

Builds two hosts (network + UTS + mount + PID namespaces joined by a veth pair, each with a
private /dev/shm: `moe_ep.testing.netns`), then runs, each as `torchrun --nnodes 2
--nproc-per-node 2` with a c10d rendezvous on host 0's address:

1. checks: topology, same-node decisions, which groups use shared memory, the shm manager's
   refusal, config selection, and the contract of every portable manager across the hosts;
2. `python -m moe_ep check-config multi-node-rdma` and `python -m moe_ep topo` in the job,
   next to `moe-ep check-config multi-node-rdma --nodes 2 --world-size 4` predicted here;
3. `python -m moe_ep bench` at a small size;
4. cut: host 1's link goes down mid-run; host 0 must fail within the process-group timeout.

Everything (processes, namespaces, veth pair, tmpfs, files) is removed at the end, also on
errors and Ctrl-C. Needs root, `ip` and `unshare`. Exit status 0 when every step behaved.
`tests/test_two_hosts.py` asserts the same runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time

from moe_ep.cli import main as moe_ep_main
from moe_ep.testing import netns, two_hosts

STEPS = ("checks", "cli", "bench", "cut")


def _section(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _job_line(job) -> str:
    return f"rc={list(job.rc)} in {job.wall_s:.1f} s" + (" (TIMED OUT)" if job.timed_out else "")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _checks(hosts) -> bool:
    job, reports = two_hosts.run_checks(hosts)
    _section(f"checks job: {_job_line(job)}")
    if job.rc != (0, 0) or None in reports:
        print(_tail(job.stderr[0]), _tail(job.stderr[1]), sep="\n")
        return False
    for r in reports:
        print(f"rank {r['rank']} on {r['hostname']} ({r['netns']}, /dev/shm dev {r['shm_dev']}): "
              f"internode={r['topology_ep']['internode']} "
              f"same_node={r['topology_ep']['same_node']} shm transport={r['shm_transport']}")
    r0 = reports[0]
    print(f"topology: {r0['topology_ep']['describe']}")
    fallback = {source: flags for source, (flags, _) in r0["same_node_hostnames"].items()}
    print(f"same-node probe from rank 0 / rank 2: {r0['same_node_probe']}; host-name fallback: "
          f"{fallback}; probe with equal host names: {r0['same_node_probe_equal_names']}")
    print(f"shm manager across the hosts: {r0['shm_across_hosts']}")
    print(f"shm left in /dev/shm per rank: {[r['shm_left'] for r in reports]}")
    worst: dict[str, float] = {}
    ok = True
    for r in reports:
        for row in r["contract"] + r["contract_shm_in_host"]:
            name = row["case"].split(" E=")[0] + (" (inside a host)" if "shm" in row["case"]
                                                   else "")
            worst[name] = max(worst.get(name, 0.0), row["err"] / row["atol"])
            ok &= row["shape_ok"] and row["err"] <= row["atol"]
    for name, ratio in worst.items():
        print(f"contract {name:<32} worst error / tolerance = {ratio:.3f}")
    for name, (code, out) in r0["check_config"].items():
        ok &= code == 0
        for line in out.splitlines():
            if line.startswith("phase "):
                print(f"check-config {name} (in the job): {line}")
    return ok


def _predicted(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        moe_ep_main(argv)
    return buf.getvalue()


def _cli(hosts) -> bool:
    ok = True
    for argv in (["check-config", "multi-node-rdma"], ["topo"]):
        job = two_hosts.run_cli(hosts, argv)
        _section(f"torchrun ... -m moe_ep {' '.join(argv)}: {_job_line(job)}")
        print(job.stdout[0].rstrip() or _tail(job.stderr[0]))
        ok &= job.rc == (0, 0)
    predicted = _predicted(["check-config", "multi-node-rdma", "--nodes", "2", "--world-size",
                            str(2 * two_hosts.NPROC_PER_NODE)])
    _section("predicted here: moe-ep check-config multi-node-rdma --nodes 2 --world-size 4")
    print(predicted.rstrip())
    return ok


def _bench(hosts) -> bool:
    job = two_hosts.run_bench(hosts, ["--tokens", "4,32", "--hidden", "64", "--experts", "8",
                                      "--topk", "2", "--warmup", "2", "--iters", "5"])
    _section(f"torchrun ... -m moe_ep bench: {_job_line(job)}")
    print(job.stdout[0].rstrip() or _tail(job.stderr[0]))
    return job.rc == (0, 0)


def _cut(hosts, timeout_s: float) -> bool:
    result = two_hosts.run_cut(hosts, timeout_s)
    _section(f"cut (process-group timeout {timeout_s:g} s), {result.job.wall_s:.1f} s")
    if result.t_cut is None:
        print("the job never got going:", _tail(result.job.stderr[0]), sep="\n")
        return False
    ok = result.host0_exit_s is not None and result.job.rc[0] not in (0, None)
    exit_s = "never" if result.host0_exit_s is None else f"{result.host0_exit_s:.1f} s"
    print(f"host 1 cut off; host 0's torchrun exited with status {result.job.rc[0]} "
          f"{exit_s} later")
    for r in result.reports:
        if r is None:
            continue
        after = "-" if r["t_error"] is None else f"{r['t_error'] - result.t_cut:.2f} s"
        print(f"rank {r['rank']} on {r['hostname']}: {r['iters']} iterations, failed {after} "
              f"after the cut: {r['error']}")
    for rank in (0, 1):
        r = result.reports[rank]
        ok &= bool(r and r["error"] and r["t_error"] - result.t_cut <= timeout_s + 5)
    print(f"processes left in the hosts' namespaces: {hosts.processes_left(wait=5.0)}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout-s", type=float, default=5.0,
                   help="process-group timeout of the cut job (default: 5)")
    p.add_argument("--skip", action="append", choices=STEPS, default=[],
                   help="leave a step out (repeatable)")
    args = p.parse_args(argv)
    ok, why = netns.namespace_support()
    if not ok:
        print(f"two_hosts: cannot build the hosts here: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = {}
    with netns.TwoHosts() as hosts:
        a, b = hosts.hosts
        print(f"host 0: {a.hostname} {a.addr} ({a.netns}); host 1: {b.hostname} {b.addr} "
              f"({b.netns}); files in {hosts.tmp}")
        print("each host runs: " + " ".join(two_hosts.torchrun_argv(hosts, ["..."], "<id>")))
        steps = {"checks": lambda: _checks(hosts), "cli": lambda: _cli(hosts),
                 "bench": lambda: _bench(hosts), "cut": lambda: _cut(hosts, args.timeout_s)}
        for name in STEPS:
            if name not in args.skip:
                results[name] = steps[name]()
    _section(f"summary ({time.monotonic() - started:.1f} s, everything torn down)")
    print(json.dumps({name: "ok" if good else "FAILED" for name, good in results.items()}))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
