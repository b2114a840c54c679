"""Registry: names, aliases, lazy imports, availability with reasons, build_manager errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from moe_ep.distributed import Topology
from moe_ep.managers import (
    All2AllManager,
    ManagerUnavailableError,
    available_managers,
    get_manager_class,
    known_managers,
    resolve_name,
)
from moe_ep.managers.registry import MANAGERS

VLLM_NAMES = (
    "naive",
    "allgather_reducescatter",
    "alltoallv",
    "shm",
    "deepep_high_throughput",
    "deepep_low_latency",
    "pplx",
    "flashinfer_mnnvl",  # vLLM's name, flashinfer_all2allv, is its alias
)
PORTABLE = ("naive", "allgather_reducescatter", "alltoallv")
VENDOR = {
    "deepep_high_throughput": "deep_ep",
    "deepep_low_latency": "deep_ep",
    "pplx": "pplx_kernels",
    "flashinfer_mnnvl": "flashinfer",
}
CPU = Topology(device="cpu", world_size=4, local_world_size=4, same_node=(True,) * 4)
GPU = Topology(device="cuda", world_size=8, same_node=(True,) * 8, nvlink=True, gpus_per_node=8)


def test_known_names_and_alias():
    assert known_managers() == VLLM_NAMES
    assert resolve_name("agrs") == "allgather_reducescatter"
    assert resolve_name("flashinfer_all2allv") == "flashinfer_mnnvl"
    assert get_manager_class("agrs") is get_manager_class("allgather_reducescatter")
    for name in PORTABLE:
        cls = get_manager_class(name)
        assert issubclass(cls, All2AllManager) and cls.name == name


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown all2all manager 'deepep'") as info:
        resolve_name("deepep")
    for name in VLLM_NAMES:
        assert name in str(info.value)
    assert "agrs -> allgather_reducescatter" in str(info.value)
    with pytest.raises(TypeError, match="manager name must be a str"):
        resolve_name(3)


@pytest.mark.parametrize("topology", [CPU, GPU], ids=["cpu", "cuda"])
def test_available_managers_reports_every_backend_with_reasons(topology):
    report = available_managers(topology)
    assert tuple(report) == VLLM_NAMES
    for name in PORTABLE:
        assert report[name][0] is True and "portable" in report[name][1]
    for name, module in VENDOR.items():
        ok, reason = report[name]
        installed = importlib.util.find_spec(module) is not None
        assert ok is False or installed, name  # never claims to work without its package
        assert (f"{module} is not installed" in reason) is (not installed), reason
        assert ("needs CUDA" in reason) is (topology.device != "cuda"), reason
    ok, reason = report["shm"]
    if importlib.util.find_spec("moe_ep.managers.shm") is None:
        assert ok is False and reason == "module moe_ep.managers.shm is not present in this build"
    else:
        assert isinstance(ok, bool) and reason


def test_registry_imports_no_backend_module():
    code = (
        "import sys, moe_ep.managers, moe_ep.managers.registry;"
        "loaded = sorted(m for m in sys.modules if m.startswith('moe_ep.managers.') "
        "and m.split('.')[-1] not in ('accounting', 'cache', 'contract', 'expert_ops', "
        "'inputs', 'options', 'placement', 'planning', 'protocol', 'registry'));"
        "vendors = sorted(m for m in ('deep_ep', 'pplx_kernels', 'flashinfer', 'nvshmem') "
        "if m in sys.modules);"
        "print(loaded, vendors)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[] []", out.stdout + out.stderr


def test_entries_are_import_paths():
    for name, path in MANAGERS.items():
        module, _, cls = path.partition(":")
        assert module.startswith("moe_ep.managers.") and cls, name


# ------------------------------------------------------------------ building on a real group


def _build(info) -> list[tuple[str, str, str]]:
    from moe_ep.distributed import GroupCoordinator
    from moe_ep.managers import build_manager

    group = GroupCoordinator([list(range(info.world_size))], "ep")
    seen = []

    def attempt(label, name, **options):
        try:
            mgr = build_manager(name, group, **options)
        except Exception as exc:  # noqa: BLE001 - recorded, checked in the parent
            seen.append((label, type(exc).__name__, str(exc)))
        else:
            seen.append((label, "ok", f"{mgr.name} {mgr.options}"))
            mgr.destroy()

    try:
        attempt("alias", "agrs")
        attempt("option", "alltoallv", dedup=False)
        attempt("unknown option", "alltoallv", dedupe=True)
        attempt("no options", "naive", max_tokens_per_rank=8)
        attempt("bad option type", "alltoallv", dedup=1)
        attempt("unknown name", "deepep")
        for name in VENDOR:
            attempt(name, name)
    finally:
        group.destroy()
    return seen


def test_build_manager(dist_pool):
    [seen] = dist_pool(1).run(_build, timeout=60)
    got = {label: (kind, msg) for label, kind, msg in seen}
    assert got["alias"] == ("ok", "allgather_reducescatter NoOptions()")
    assert got["option"] == ("ok", "alltoallv AllToAllVOptions(dedup=False)")
    kind, msg = got["unknown option"]
    assert kind == "TypeError" and "'dedupe'" in msg and "allowed options: dedup" in msg
    kind, msg = got["no options"]
    assert kind == "TypeError" and "'max_tokens_per_rank'" in msg and "allowed options: none" in msg
    kind, msg = got["bad option type"]
    assert kind == "TypeError" and "option 'dedup' must be bool" in msg
    kind, msg = got["unknown name"]
    assert kind == "ValueError" and "known managers" in msg
    for name in VENDOR:
        kind, msg = got[name]
        assert kind == ManagerUnavailableError.__name__, (name, kind, msg)
        assert f"manager {name!r} is unavailable" in msg and "needs CUDA" in msg
