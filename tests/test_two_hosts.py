"""Two hosts on one machine: `torchrun --nnodes 2 --nproc-per-node 2` across two network
namespaces joined by a veth pair, each with its own host name, /dev/shm and PID namespace
(`moe_ep.testing.netns`). Needs root, `ip` and `unshare`; skipped with the reason otherwise.

Three torchrun jobs on one pair of hosts (`moe_ep.testing.two_hosts`): the checks job
(topology, same-node decisions, shm refusal, config selection and `moe-ep check-config` in the
job, the contract of every portable manager), `python -m moe_ep bench`, and a job whose host 1
is cut off mid-run. About 40 s on 2 idle cores (55 s while other tests load them).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import pytest

from moe_ep.cli import local_topology, main
from moe_ep.config import load_config, select, shipped_configs
from moe_ep.testing import netns, two_hosts

SUPPORTED, WHY = netns.namespace_support()
needs_namespaces = pytest.mark.skipif(not SUPPORTED, reason=f"two hosts need namespaces: {WHY}")

WORLD = 2 * two_hosts.NPROC_PER_NODE
CUT_TIMEOUT_S = 5.0


def _diagnose(job) -> str:
    return "\n".join(f"--- host {h}: rc {job.rc[h]}\n{job.stdout[h][-3000:]}\n"
                     f"{job.stderr[h][-3000:]}" for h in range(2))


@pytest.fixture(scope="module")
def hosts():
    with netns.TwoHosts() as made:
        yield made
        # Every job stopped its hosts' processes (a job ends by killing each host's PID
        # namespace): nothing is left running in either network namespace.
        assert made.processes_left(wait=5.0) == []
    # Teardown removed the namespaces (and with them the veth pair) and the files.
    assert not any(os.path.exists(f"/run/netns/{h.netns}") for h in made.hosts)
    assert not made.tmp.exists()


@pytest.fixture(scope="module")
def checks(hosts):
    job, reports = two_hosts.run_checks(hosts, timeout=150)
    assert not job.timed_out and job.rc == (0, 0), _diagnose(job)
    assert all(r is not None for r in reports), _diagnose(job)
    # torchrun numbers the nodes in the sorted order of their host names: host 0 has ranks 0-1.
    hostnames = [r["hostname"] for r in reports]
    assert [h.hostname for h in hosts.hosts for _ in range(2)] == hostnames, hostnames
    return reports


@needs_namespaces
def test_each_host_is_private(checks):
    """Per host: one host name, one network namespace, one /dev/shm; none shared across."""
    for key in ("hostname", "netns", "shm_dev"):
        values = [r[key] for r in checks]
        assert values[0] == values[1] and values[2] == values[3], (key, values)
        assert values[0] != values[2], (key, values)


@needs_namespaces
def test_topology_is_internode(checks):
    for r in checks:
        topo = r["topology_ep"]
        assert topo["internode"] is True, topo
        assert topo["same_node"] == [True, True, False, False], topo
        assert topo["num_nodes"] == 2 and topo["local_world_size"] == 2, topo
        assert "nodes=2" in topo["describe"] and "internode=True" in topo["describe"]
        assert r["topology_tp"]["internode"] is False  # a TP group stays inside its host


@needs_namespaces
def test_same_node_probe_and_hostname_fallback(checks):
    """The /dev/shm probe, the host-name fallback (the probe file cannot be made) and the probe
    under equal host names all answer by host; every rank gets the same flags."""
    want = {"0": [True, True, False, False], "2": [False, False, True, True]}
    for r in checks:
        assert r["same_node_probe"] == want
        assert r["same_node_probe_equal_names"] == want["0"]
        for source, (flags, asked_name) in r["same_node_hostnames"].items():
            assert flags == want[source], (r["rank"], source, flags)
            if r["rank"] != int(source):
                assert asked_name, "the host-name fallback was not taken"


@needs_namespaces
def test_shm_transport_only_inside_a_host(checks):
    for r in checks:
        # Groups spanning both hosts use gloo; the TP group of each host uses shared memory.
        assert r["shm_transport"] == {"world": False, "ep": False, "tp": True}, r["shm_transport"]
        ok, why = r["availability"]["shm"]
        assert not ok and "several nodes" in why
        for name in ("naive", "allgather_reducescatter", "alltoallv"):
            assert r["availability"][name][0], (name, r["availability"][name])
        # Refused on every rank, for the right reason, before any segment is made.
        assert r["shm_across_hosts"].startswith("refused: "), r["shm_across_hosts"]
        assert "on one node (the group spans several)" in r["shm_across_hosts"]
        assert r["shm_left"] == [], r["shm_left"]
        for row in r["contract_shm_in_host"]:
            assert row["shape_ok"] and row["err"] <= row["atol"], row


@needs_namespaces
def test_contract_across_hosts(checks):
    cases = len(two_hosts.CONTRACT_MANAGERS) * len(two_hosts.CONTRACT_CASES)
    scales = []
    for r in checks:
        rows = r["contract"]
        assert len(rows) == cases
        assert any(row["tokens"] == 0 for row in rows)  # this rank had no tokens somewhere
        for row in rows:
            assert row["shape_ok"], (r["rank"], row)
            assert row["err"] <= row["atol"], (r["rank"], row)
            scales.append(row["scale"])
    assert min(scales) > 0.1  # every comparison is against a non-trivial reference


def _local_check_config(path: str, *topology: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["check-config", path, *topology])
    assert code == 0, buf.getvalue()
    return buf.getvalue()


def _without_topology_note(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("topology (")]


@needs_namespaces
def test_configs_select_as_check_config_predicts(checks, hosts, monkeypatch):
    """`moe-ep check-config CFG` inside the job prints what `--nodes 2 --world-size 4` predicts
    on this machine, rule by rule; and the selection inside the job is the predicted one."""
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    configs = {**shipped_configs(), "internode-cpu": str(hosts.tmp / "internode-cpu.yaml")}
    predicted_topology = local_topology(WORLD, nodes=2)
    assert predicted_topology.internode
    job0 = checks[0]
    assert set(job0["check_config"]) == set(configs)
    for name, path in configs.items():
        code, in_job = job0["check_config"][name]
        assert code == 0, in_job
        assert "topology (the torchrun job):" in in_job
        predicted = _local_check_config(path, "--nodes", "2", "--world-size", str(WORLD))
        assert _without_topology_note(in_job) == _without_topology_note(predicted), name
        config = load_config(path)
        for phase in ("prefill", "decode"):
            sel = select(config, predicted_topology, phase)
            for r in checks:
                got = r["selection"][name][phase]
                assert (got["name"], got["options"], got["where"]) == (
                    sel.name, dict(sel.options), sel.where), (name, phase, r["rank"])
                assert [tuple(s) for s in got["skipped"]] == [
                    (rule.where, why) for rule, why in sel.skipped]
    # Not vacuous: on one node the internode-keyed config picks another rule.
    internode = checks[0]["check_config"]["internode-cpu"][1]
    assert "phase decode: alltoallv  <- all2all.rules[1]" in internode
    assert "phase prefill: allgather_reducescatter  <- all2all.rules[2]" in internode
    one_node = _local_check_config(configs["internode-cpu"], "--nodes", "1", "--world-size",
                                   str(WORLD))
    assert _without_topology_note(one_node) != _without_topology_note(internode)
    # On the nodes of cpu-local and multi-node-rdma the job falls to the expected entries.
    # (cpu-local's shared-memory rule needs one node; gather-all takes <= 4 ranks.)
    assert "phase decode: allgather_reducescatter  <- all2all.rules[1]" in (
        checks[0]["check_config"]["cpu-local"][1])
    assert "phase decode: alltoallv  <- all2all.fallback[0]" in (
        checks[0]["check_config"]["multi-node-rdma"][1])


@needs_namespaces
def test_bench_under_torchrun(hosts):
    """`torchrun --nnodes 2 ... -m moe_ep bench`, as the README runs it, at a tiny size."""
    job = two_hosts.run_bench(hosts, ["--tokens", "1,8", "--hidden", "32", "--experts", "8",
                                      "--topk", "2", "--warmup", "1", "--iters", "2",
                                      "--no-plot"], timeout=150)
    assert not job.timed_out and job.rc == (0, 0), _diagnose(job)
    report = json.loads((hosts.tmp / "bench" / "results.json").read_text())
    meta, rows = report["meta"], report["results"]
    assert meta["launcher"] == "torchrun" and meta["world_size"] == WORLD
    assert "internode=True" in meta["topology"] and "nodes=2" in meta["topology"]
    assert "several nodes" in meta["unavailable"]["shm"]
    assert sorted({r["backend"] for r in rows}) == [
        "allgather_reducescatter", "alltoallv", "naive"]
    for r in rows:
        assert r["status"] == "ok" and r["verified"] and r["world_size"] == WORLD, r
        assert r["total_us"]["median"] > 0 and r["bytes_per_rank"] > 0, r
    # Rank 0 (host 0) prints the progress and the table; host 1's ranks print nothing.
    assert "total us p50" in job.stdout[0] and f"[{len(rows)}/{len(rows)}]" in job.stdout[0]
    assert "total us p50" not in job.stdout[1]


@needs_namespaces
def test_cut_off_host_fails_the_other_within_the_timeout(hosts):
    """Host 1's link goes down mid-run: host 0's ranks raise a timeout error within the
    process-group timeout, and its torchrun exits with an error soon after."""
    result = two_hosts.run_cut(hosts, CUT_TIMEOUT_S, timeout=120)
    job = result.job
    assert result.t_cut is not None, "the job never got going:\n" + _diagnose(job)
    assert result.host0_exit_s is not None, "host 0 kept running after the cut"
    assert job.rc[0] not in (0, None), _diagnose(job)
    slack = 5.0  # scheduling on a loaded 2-core machine
    assert result.host0_exit_s <= CUT_TIMEOUT_S + 2 * slack, result.host0_exit_s
    for rank in (0, 1):
        r = result.reports[rank]
        assert r is not None and r["iters"] >= 5, (rank, r)
        assert r["error"] is not None, (rank, r)
        elapsed = r["t_error"] - result.t_cut
        assert 0 <= elapsed <= CUT_TIMEOUT_S + slack, (rank, elapsed, r["error"])
        assert re.search(r"timed out|timeout", r["error"], re.IGNORECASE), r["error"]
        # Said in the group's terms: which group, which rank, and the timeout it waited.
        assert f"group 'ep' (rank {rank} of {WORLD}, global rank {rank})" in r["error"], (
            r["error"])
        assert f"stalled past the group's timeout ({CUT_TIMEOUT_S:g} s)" in r["error"], (
            r["error"])
        # The rank's error reached host 0's console, naming the rank and its host.
        assert f"rank {rank} ({hosts.hosts[0].hostname}): " in job.stderr[0]
    assert hosts.processes_left(wait=5.0) == []  # both hosts' processes are gone


def test_namespace_support_says_why_not(monkeypatch, tmp_path):
    """Where the hosts cannot be made, the reason is specific (and nothing is left behind)."""
    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    ok, why = netns.namespace_support()
    assert not ok and "needs root" in why
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", str(tmp_path))
    ok, why = netns.namespace_support()
    assert not ok and why.startswith("ip and unshare not found"), why
    for tool in ("ip", "unshare"):  # present, but refused (an unprivileged container)
        script = tmp_path / tool
        script.write_text("#!/bin/sh\necho 'mount --make-shared /run/netns failed: "
                          "Operation not permitted' >&2\nexit 1\n")
        script.chmod(0o755)
    ok, why = netns.namespace_support()
    assert not ok and "cannot create namespaces here" in why and "not permitted" in why, why
