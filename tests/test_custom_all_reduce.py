"""CUDA IPC custom all-reduce: the pure decisions, the nvcc build of the kernels, the fallback
to NCCL / torch.distributed when it is unavailable, and (with a GPU) exact sums.

The GPU cases run 2 and 4 processes on whatever GPUs there are (one GPU shared by every rank
works: CUDA IPC maps buffers between processes on one device). Their coordination group is gloo,
so NCCL's one-rank-per-GPU rule does not apply.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_ep.distributed.communicators import CudaCommunicator
from moe_ep.distributed.custom_all_reduce import (
    CustomAllreduce,
    custom_ar_group_reason,
    library_unavailable_reason,
    should_custom_ar,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------- decisions
@pytest.mark.parametrize("kwargs,reason", [
    ({}, ""),
    ({"world_size": 4}, ""),
    ({"world_size": 8, "fully_connected": None}, ""),
    ({"world_size": 3}, "world size 3 is not one of"),
    ({"world_size": 16}, "world size 16 is not one of"),
    ({"world_size": 1}, "one rank"),
    ({"same_node": False}, "more than one node"),
    ({"p2p_ok": False}, "P2P check failed"),
    ({"world_size": 4, "fully_connected": False}, "not fully NVLink-connected"),
    ({"world_size": 2, "fully_connected": False}, ""),  # 2 GPUs over PCIe still win
    ({"library_reason": "not built"}, "not built"),
])
def test_group_decision_table(kwargs, reason):
    args = {"world_size": 2, "same_node": True, "p2p_ok": True, "fully_connected": True,
            **kwargs}
    got = custom_ar_group_reason(**args)
    assert (got == "") if reason == "" else (reason in got), got


def _strided_view() -> torch.Tensor:
    return torch.zeros(64, 8)[:, :4]  # not contiguous, and not filling its storage


@pytest.mark.parametrize("make,kwargs,reason", [
    (lambda: torch.zeros(1024), {}, ""),
    (lambda: torch.zeros(1024, dtype=torch.float16), {}, ""),
    (lambda: torch.zeros(1024, dtype=torch.bfloat16), {}, ""),
    (lambda: torch.zeros(2 << 20), {}, ""),                       # exactly 8 MiB
    (lambda: torch.zeros((2 << 20) + 4), {}, "above max_size"),
    (lambda: torch.zeros(1024), {"max_size": 1024}, "above max_size"),
    (lambda: torch.zeros(1024, dtype=torch.int32), {}, "dtype torch.int32"),
    (lambda: torch.zeros(1024, dtype=torch.float64), {}, "dtype torch.float64"),
    (lambda: torch.zeros(3), {}, "not a multiple of 16"),
    (lambda: torch.zeros(9, dtype=torch.float16), {}, "not a multiple of 16"),
    (lambda: torch.zeros(0), {}, "empty"),
    (_strided_view, {}, "contiguous"),
    (lambda: torch.zeros(8, 16).t(), {}, ""),                     # weakly contiguous: fills storage
    (lambda: torch.zeros(1024 + 1)[1:-4], {}, "aligned"),        # offset by 4 bytes
    (lambda: torch.zeros(1024), {"world_size": 3}, "world size 3"),
    (lambda: torch.zeros(1024), {"same_node": False}, "more than one node"),
    (lambda: torch.zeros(1024), {"p2p_ok": False}, "P2P"),
])
def test_tensor_decision_table(make, kwargs, reason):
    ok, why = should_custom_ar(make(), **kwargs)
    assert ok == (reason == ""), why
    assert reason in why


# ----------------------------------------------------------------------- the build
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_kernels_compile_for_sm90(tmp_path):
    out = tmp_path / "car.so"
    proc = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-Xcompiler", "-fPIC,-fvisibility=hidden",
         "-shared", "-I", str(ROOT / "csrc"), str(ROOT / "csrc" / "custom_all_reduce.cu"),
         "-o", str(out), "-lcudart"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(out)], capture_output=True,
                             text=True).stdout
    for name in ("init_custom_ar", "register_buffer", "get_graph_buffer_ipc_meta",
                 "register_graph_buffers", "all_reduce", "allocate_shared_buffer_and_handle",
                 "open_mem_handle"):
        assert f" T {name}\n" in symbols, name


def _setup_module():
    spec = importlib.util.spec_from_file_location("moe_ep_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the build plan; setup() runs only as __main__
    return module


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_cpu_install_does_not_build_the_cuda_library():
    cmd, why = _setup_module().cuda_build_plan()
    assert cmd is None and ("CPU build" in why or "nvcc not found" in why), why
    assert not list((ROOT / "moe_ep").glob("_custom_ar*.so"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_build_plan_targets_the_listed_architectures(monkeypatch):
    setup_module = _setup_module()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    cmd, why = setup_module.cuda_build_plan()
    assert why == "" and "arch=compute_90,code=sm_90" in cmd and "arch=compute_80,code=sm_80" in cmd
    assert "arch=compute_90,code=compute_90" in cmd


# ----------------------------------------------------------------------- fallback
def _fallback(info) -> dict:
    W, r = info.world_size, info.rank
    group = dist.group.WORLD
    ca = CustomAllreduce(group, torch.device("cpu"), r, W, same_node=True, group_name="t")
    # The CUDA communicator on gloo with CPU tensors: no custom all-reduce here, so every
    # all-reduce takes the torch.distributed path, with the right sums.
    comm = CudaCommunicator(group, group, list(range(W)), r, "t", device=torch.device("cpu"),
                            same_node=True)
    x = torch.arange(1024, dtype=torch.float32) * (r + 1)
    want = torch.arange(1024, dtype=torch.float32) * (W * (W + 1) // 2)
    got = comm.all_reduce(x)
    same = torch.equal(got, want) and torch.equal(x, torch.arange(1024.0) * (r + 1))
    inplace = comm.all_reduce(x, out=x) is x and torch.equal(x, want)
    gathered = comm.all_gather(torch.full((2, 3), float(r)), 1)
    sizes = [(k * 2) % 3 for k in range(W)]  # uneven, 0 included
    gatheredv = comm.all_gatherv(torch.full((sizes[r], 3), float(r)), sizes)
    comm.destroy()
    return {"disabled": ca.disabled, "reason": ca.disabled_reason, "should": ca.should_custom_ar(x),
            "sum": same, "inplace": inplace, "ca": comm.ca_comm,
            "gather": torch.equal(gathered, torch.cat([torch.full((2, 3), float(k))
                                                       for k in range(W)], 1)),
            "gatherv": torch.equal(gatheredv, torch.cat([torch.full((n, 3), float(k))
                                                         for k, n in enumerate(sizes)]))}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
@pytest.mark.parametrize("world_size", [2, 4])
def test_unavailable_custom_allreduce_falls_back_with_correct_sums(dist_pool, world_size):
    for res in dist_pool(world_size).run(_fallback, timeout=120):
        assert res["disabled"] and "CUDA is not available" in res["reason"]
        assert not res["should"] and res["ca"] is None
        assert res["sum"] and res["inplace"] and res["gather"] and res["gatherv"]


# ----------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or bool(library_unavailable_reason()),
    reason=library_unavailable_reason() or "needs CUDA",
)


def _ints(rank: int, n: int, dtype, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * salt + rank)
    return torch.randint(-16, 16, (n,), generator=g).to(dtype)


def _gpu_sums(info) -> list[str]:
    W, r = info.world_size, info.rank
    dev = torch.device("cuda", r % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    groups = [dist.group.WORLD, dist.new_group(list(range(W)), backend="gloo")]
    cas = [CustomAllreduce(g, dev, r, W, same_node=True, group_name=f"g{i}")
           for i, g in enumerate(groups)]
    assert not any(ca.disabled for ca in cas), [ca.disabled_reason for ca in cas]
    done = []
    try:
        for salt, n in enumerate((1024, 4096 + 8, 1 << 17, 1 << 21)):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                x = _ints(r, n, dtype, salt).to(dev)
                want = sum(_ints(k, n, dtype, salt) for k in range(W)).to(dev)
                for ca in cas:  # two groups, interleaved, must not interfere
                    if not ca.should_custom_ar(x):
                        continue
                    got = ca.custom_all_reduce(x)
                    torch.cuda.synchronize()
                    assert torch.equal(got, want), (n, dtype)
                done.append(f"eager {n} {dtype}")
        # CUDA graph: capture two all-reduces, replay with new inputs.
        ca = cas[0]
        n = 1 << 16
        x = torch.zeros(n, device=dev)
        y = torch.zeros(n, dtype=torch.bfloat16, device=dev)
        graph = torch.cuda.CUDAGraph()
        with ca.capture():
            ca.custom_all_reduce(x)  # warm-up outside the capture
            with torch.cuda.graph(graph):
                ox = ca.custom_all_reduce(x)
                oy = ca.custom_all_reduce(y)
        for salt in range(3):
            x.copy_(_ints(r, n, torch.float32, salt))
            y.copy_(_ints(r, n, torch.bfloat16, salt + 10))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(ox.cpu(), sum(_ints(k, n, torch.float32, salt) for k in range(W)))
            assert torch.equal(oy.cpu(), sum(_ints(k, n, torch.bfloat16, salt + 10)
                                             for k in range(W)))
        done.append("graph")
    finally:
        for ca in cas:
            ca.close()
        dist.destroy_process_group(groups[1])
    return done


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 4])
def test_gpu_eager_and_graph_sums_are_exact(dist_pool, world_size):
    for done in dist_pool(world_size).run(_gpu_sums, timeout=300):
        assert "graph" in done and len(done) >= 10, done


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_benchmark_says_why_it_skips_without_cuda(capsys):
    """bench/bench_custom_all_reduce.py, as bench/gpu_checks.sh runs it, exits 0 with its
    reason where there is no GPU (CI), instead of failing inside a rank."""
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_custom_all_reduce.py"
    spec = importlib.util.spec_from_file_location("bench_custom_all_reduce", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--world-size", "2"]) == 0
    assert "skipped: CUDA is not available" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a world size the kernels are not built for
        bench.main(["--world-size", "3"])
