"""The `moe-ep` command: topo, check-config on every shipped config, errors, and an end-to-end
`moe-ep bench` at a tiny size (real spawned ranks, JSON + PNG checked)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_ep.cli import build_parser, local_topology, main
from moe_ep.config import load_config, select, shipped_configs
from moe_ep.managers.registry import available_managers, known_managers

SHIPPED = sorted(shipped_configs())


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("topo", "check-config", "bench"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for option in ("--world-size", "--managers", "--config", "--tokens", "--hidden",
                   "--experts", "--topk", "--dtype", "--iters", "--out"):
        assert option in out


def test_topo_reports_every_backend_with_reason(capsys):
    code, out, _ = run_main(capsys, "topo", "--json")
    assert code == 0
    report = json.loads(out)
    topo = local_topology()
    expected = available_managers(topo)
    assert report["topology"]["world_size"] == topo.world_size
    assert set(report["backends"]) == set(known_managers())
    for name, (ok, why) in expected.items():
        assert report["backends"][name] == {"available": ok, "reason": why}
        assert ok or why, f"{name} unavailable without a reason"
    code, out, _ = run_main(capsys, "topo")
    assert code == 0 and "backends:" in out
    for name in known_managers():
        assert name in out


@pytest.mark.parametrize("name", SHIPPED)
def test_check_config_on_every_shipped_config(capsys, name):
    path = shipped_configs()[name]
    code, out, err = run_main(capsys, "check-config", path)
    assert code == 0, err
    config = load_config(path)
    topo = local_topology()
    for phase in ("prefill", "decode"):
        sel = select(config, topo, phase)
        line = next(x for x in out.splitlines() if x.startswith(f"phase {phase}:"))
        assert f": {sel.rule.describe()}  <- {sel.where}" in line
        for _rule, why in sel.skipped:
            assert why in out
    for rule in (*config.all2all.rules, *config.all2all.fallback):
        assert rule.where in out


def test_check_config_for_other_hardware(capsys):
    code, out, _ = run_main(capsys, "check-config", "single-node-nvlink", "--device", "cuda",
                            "--world-size", "8", "--nvlink", "--assume-available")
    assert code == 0
    assert "phase decode: deepep_low_latency(max_tokens_per_rank=128)  <- all2all.rules[0]" in out
    assert "phase prefill: deepep_high_throughput  <- all2all.rules[1]" in out
    code, out, _ = run_main(capsys, "check-config", "multi-node-rdma", "--device", "cuda",
                            "--world-size", "16", "--nodes", "2", "--phase", "prefill",
                            "--assume-available")
    assert code == 0 and "phase prefill: deepep_high_throughput  <- all2all.rules[2]" in out
    assert "phase decode" not in out


def test_check_config_exit_1_when_nothing_selectable(capsys, tmp_path):
    cfg = tmp_path / "strict.yaml"
    cfg.write_text("all2all:\n  rules:\n    - when: {device: cpu}\n      use: pplx\n"
                   "  fallback: [pplx]\n  strict: true\n")
    code, out, _ = run_main(capsys, "check-config", str(cfg))
    assert code == 1
    assert "NOTHING SELECTED" in out and "strict" in out


@pytest.mark.parametrize("argv,fragment", [
    (["check-config", "no/such.yaml"], "no such file"),
    (["check-config"], "the following arguments are required: FILE"),
    (["frobnicate"], "invalid choice"),
    (["bench", "--tokens", "a,b"], "expected comma-separated integers"),
    (["bench", "--tokens", "0"], "expected integers >= 1"),
    (["bench", "--managers", "nope"], "unknown backend 'nope'"),
    (["bench", "--topk", "9", "--experts", "4"], "--topk 9 exceeds --experts 4"),
    (["bench", "--iters", "0"], "--iters must be >= 1"),
    (["bench", "--phase", "decode"], "--phase only applies with --config"),
    (["bench", "--managers", "naive", "--config", "cpu-local"], "not allowed with argument"),
    (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["topo", "--world-size", "3", "--nodes", "2"], "--nodes must be >= 1 and divide"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, fragment):
    code, _, err = run_main(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-ep: error: "), err
    assert fragment in lines[0], err


def test_bad_config_file_exit_2_names_key(capsys, tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("all2all:\n  rules:\n    - when: {phase: decod}\n      use: shm\n")
    code, _, err = run_main(capsys, "check-config", str(cfg))
    assert code == 2
    assert err.strip() == (f"moe-ep: error: {cfg}: all2all.rules[0].when.phase: str 'decod' "
                           "is not allowed; expected one of prefill, decode")


def test_bench_plan_follows_config(tmp_path):
    """`--config` runs what `select` picks for each phase (no processes needed)."""
    from moe_ep.bench.sweep import plan_sweep

    parser = build_parser()
    topo = local_topology()
    for name in SHIPPED:
        args = parser.parse_args(["bench", "--config", name, "--tokens", "8,16"])
        plan = plan_sweep(args, topo)
        config = load_config(name)
        want = {(s.name, tuple(s.options.items()))
                for s in (select(config, topo, p) for p in ("prefill", "decode"))}
        assert {(c.backend, c.options) for c in plan.cases} == want
        assert len(plan.cases) == 2 * len(want)


def _bench(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "moe_ep", "bench", "--tokens", "4,32", "--hidden", "32",
           "--experts", "4", "--topk", "2", "--warmup", "1", "--iters", "3",
           "--out", str(out), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    return proc, out


def test_bench_end_to_end_tiny(tmp_path):
    proc, out = _bench(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "results.json").read_text())
    rows = report["results"]
    here = [n for n, (ok, _) in available_managers(local_topology(2)).items() if ok]
    assert sorted({r["backend"] for r in rows}) == sorted(here)
    assert report["meta"]["world_size"] == 2 and report["meta"]["launcher"] == "spawned"
    for backend in here:
        mine = [r for r in rows if r["backend"] == backend]
        assert sorted(r["tokens_per_rank"] for r in mine) == [4, 32]
        for r in mine:
            assert r["status"] == "ok" and r["verified"], r
            for key in ("dispatch_us", "combine_us", "total_us"):
                s = r[key]
                assert 0 < s["p10"] <= s["median"] <= s["p90"], (backend, key, s)
            assert r["bytes_per_rank"] > 0 and r["gbps"] > 0
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "results.md").read_text()
    assert "moe-ep bench" in table and all(b in table for b in here)
    # Progress lines and the table went to stdout.
    assert f"[1/{len(rows)}]" in proc.stdout and "total us p50" in proc.stdout


@pytest.mark.skipif(shutil.which("moe-ep") is None, reason="console script not installed")
def test_console_script_is_installed():
    proc = subprocess.run(["moe-ep", "--version"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("moe-ep ")


def test_wrong_backend_is_reported_not_timed(tmp_path):
    """A result that failed verification becomes a 'wrong' row without latencies; the table
    says so and the plot leaves it out."""
    from moe_ep.bench.dispatch_latency import LatencyStats
    from moe_ep.bench.sweep import _result_fields, format_table, write_outputs

    stats = LatencyStats(median=10.0, p10=9.0, p90=11.0)
    common = {"dispatch_us": stats, "combine_us": stats, "experts_us": stats,
              "total_us": LatencyStats(20.0, 18.0, 22.0), "bytes_per_rank": 128,
              "bytes_per_token": 16.0, "model_bytes_per_token": None}
    bad = _result_fields({"verified": False, "max_abs_error": 3.0,
                          "error": "naive: output differs", **common})
    good = _result_fields({"verified": True, "max_abs_error": 0.0, "error": None, **common})
    assert bad["status"] == "wrong" and "total_us" not in bad and bad["error"].startswith("naive")
    assert good["status"] == "ok" and good["total_us"]["median"] == 20.0
    assert good["gbps"] == pytest.approx(128 / 20e-6 / 1e9)
    base = {"options": {}, "tokens_per_rank": 8, "hidden": 16, "num_experts": 4, "topk": 2,
            "dtype": "bf16", "world_size": 2}
    rows = [{"backend": "naive", **base, **bad}, {"backend": "alltoallv", **base, **good}]
    table = format_table(rows)
    assert "wrong: naive: output differs" in table
    meta = {"command": "moe-ep bench", "world_size": 2, "device": "cpu", "launcher": "spawned",
            "warmup": 1, "iters": 3, "repeats": 2, "host": "test"}
    paths = write_outputs(rows, meta, tmp_path)
    assert paths["png"].exists()
    assert json.loads(paths["json"].read_text())["results"][0]["status"] == "wrong"


def _job_loop_worker(info, argv):
    """The torchrun code path (every rank runs the loop) on pool ranks."""
    from moe_ep.bench.sweep import plan_sweep, run_in_job
    from moe_ep.distributed import initialize_model_parallel
    from moe_ep.distributed.topology import Topology

    groups = initialize_model_parallel()
    args = build_parser().parse_args(argv)
    plan = plan_sweep(args, Topology.detect(groups.ep))
    lines = []
    rows = run_in_job(plan, groups.ep, echo=lambda *a, **k: lines.append(" ".join(a)))
    return rows, lines


def test_bench_loop_inside_a_launched_job(dist_pool):
    argv = ["bench", "--managers", "agrs,alltoallv", "--tokens", "1,8", "--hidden", "16",
            "--experts", "4", "--topk", "2", "--warmup", "0", "--iters", "2"]
    (rows0, lines0), (rows1, lines1) = dist_pool(2).run(_job_loop_worker, argv, timeout=120)
    assert rows0 == rows1  # every rank ends with the same rows
    assert [(r["backend"], r["tokens_per_rank"]) for r in rows0] == [
        ("allgather_reducescatter", 1), ("allgather_reducescatter", 8),
        ("alltoallv", 1), ("alltoallv", 8)]
    assert all(r["status"] == "ok" and r["total_us"]["median"] > 0 for r in rows0), rows0
    assert len(lines0) == 2 * len(rows0) and not lines1  # only rank 0 reports progress


def _check_config_in_a_job(info):
    """`main(["check-config", ...])` called inside a running job, twice."""
    import contextlib
    import io

    import torch
    import torch.distributed as dist

    saved = {v: os.environ.get(v) for v in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size))
    try:
        outs = []
        for name in ("cpu-local", "multi-node-rdma"):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = main(["check-config", name])
            outs.append((code, buf.getvalue()))
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    alive = dist.is_initialized()
    total = torch.ones(1)
    if alive:
        dist.all_reduce(total)
    return outs, alive, total.item()


def test_check_config_keeps_the_callers_process_group(dist_pool):
    """Under torchrun `check-config` detects the launched job; called inside a job that is
    already running, it leaves that job's process group up."""
    results = dist_pool(2).run(_check_config_in_a_job, timeout=120)
    for rank, (outs, alive, total) in enumerate(results):
        assert alive and total == 2.0, rank
        for code, out in outs:
            assert code == 0
            assert bool(out) == (rank == 0)  # rank 0 reports
    assert "topology (the torchrun job):" in results[0][0][1][1]


def test_bad_out_fails_before_the_sweep(tmp_path, capsys):
    """--out naming a file or an unwritable place is refused at once (no sweep, no traceback)."""
    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    for out, fragment in ((str(a_file), "is a file"), ("/proc/nope", "not a writable folder")):
        started = time.perf_counter()
        code, _, err = run_main(capsys, "bench", "--out", out, "--tokens", "1")
        assert code == 2 and fragment in err and "Traceback" not in err, err
        assert time.perf_counter() - started < 10  # refused before any rank was spawned


def test_missing_matplotlib_skips_the_png_with_a_note(tmp_path, monkeypatch):
    from moe_ep.bench import sweep

    real = sweep.importlib.util.find_spec
    monkeypatch.setattr(sweep.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    notes = []
    rows = [{"backend": "naive", "options": {}, "tokens_per_rank": 8, "hidden": 16,
             "num_experts": 4, "topk": 2, "dtype": "bf16", "world_size": 2, "status": "ok",
             "verified": True, "bytes_per_rank": 1,
             **{k: {"median": 1.0, "p10": 1.0, "p90": 1.0}
                for k in ("dispatch_us", "combine_us", "total_us")}}]
    meta = {"command": "moe-ep bench", "world_size": 2, "device": "cpu", "launcher": "spawned",
            "warmup": 1, "iters": 3, "repeats": 2, "host": "test"}
    paths = sweep.write_outputs(rows, meta, tmp_path, echo=notes.append)
    assert "png" not in paths and paths["json"].exists()
    assert notes and "matplotlib is not installed" in notes[0]


def test_closed_pipe_exits_quietly():
    code = "import sys; from moe_ep.cli import main; sys.exit(main(['topo']))"
    # `true` exits without reading: every write of the command meets a closed pipe.
    proc = subprocess.run(f'{sys.executable} -c "{code}" | true', shell=True,
                          capture_output=True, text=True, timeout=120)
    assert "BrokenPipeError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_check_config_json(capsys):
    code, out, _ = run_main(capsys, "check-config", "cpu-local", "--json")
    report = json.loads(out)
    assert code == 0 and set(report["phases"]) == {"prefill", "decode"}
    assert all(p["selected"] for p in report["phases"].values())


def test_verbose_and_quiet_set_the_log_level(capsys):
    import logging

    for flag, level in (("--verbose", logging.INFO), ("--quiet", logging.ERROR)):
        run_main(capsys, flag, "check-config", "cpu-local")
        assert logging.getLogger("moe_ep").level == level


def test_floor_bench_tiny():
    """bench/bench_floor.py's engine at a tiny size: every column measured, and the cross bytes
    equal an independent count (each token once per distinct remote rank owning one of its
    experts, both directions, for the rank that sends most)."""
    from moe_ep.bench.dispatch_latency import make_inputs
    from moe_ep.bench.floor import format_floor, measure_floor

    W, T, H, E, K = 2, 8, 64, 8, 2
    (row,) = measure_floor(W, (T,), hidden=H, num_experts=E, topk=K, iters=2, repeats=2,
                           gloo_iters=1, timeout=300)
    sent = []
    for rank in range(W):
        _, _, ids = make_inputs(rank, tokens=T, hidden=H, num_experts=E, topk=K,
                                dtype=torch.bfloat16)
        owners = ids // (E // W)  # contiguous placement: E / W experts per rank
        sent.append(sum(int((owners == d).any(dim=1).sum()) for d in range(W) if d != rank))
    assert row.cross_bytes == 2 * max(sent) * H * 2
    assert row.tokens == T and row.world_size == W
    for us in (row.allreduce_us, row.copy_us, row.shm_us, row.gloo_us, row.a2a_us):
        assert us > 0
    assert set(row.ratios) == {"c/a", "c/b", "d/c", "c/e"}
    table = format_floor([row])
    assert f"\n| {T} | " in table and "Targets" in table


def test_bench_floor_flag(tmp_path, capsys):
    """`moe-ep bench --floor` runs the same engine and writes its table; misuse exits 2."""
    code, out, _ = run_main(capsys, "bench", "--floor", "--tokens", "2", "--out", str(tmp_path))
    assert code == 0
    table = (tmp_path / "floor_w2.md").read_text()
    assert "\n| 2 | " in table and table.strip() in out
    rows = json.loads((tmp_path / "floor_w2.json").read_text())
    assert [r["tokens"] for r in rows] == [2] and rows[0]["shm_us"] > 0
    code, _, err = run_main(capsys, "bench", "--floor", "--managers", "shm")
    assert code == 2 and "--floor" in err
