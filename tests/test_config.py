"""moe_ep.config: loading, validation errors and the pure `select` policy (no processes)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

from moe_ep.config import (
    Config,
    ConfigError,
    Options,
    SelectionError,
    config_to_dict,
    dump_config,
    load_config,
    parse_config,
    select,
    shipped_configs,
)
from moe_ep.distributed.topology import Topology
from moe_ep.managers.registry import available_managers, known_managers

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("cpu-local", "single-node-nvlink", "multi-node-rdma", "gb200-nvl72")

# ---------------------------------------------------------------- topologies built by hand

CPU2 = Topology(device="cpu", world_size=2, local_world_size=2)
CPU6 = Topology(device="cpu", world_size=6, local_world_size=6)
CPU16 = Topology(device="cpu", world_size=16, local_world_size=16)
# Two CPU hosts of 2 (resp. 8) ranks each.
CPU_HOSTS4 = Topology(device="cpu", world_size=4, local_world_size=2,
                      same_node=(True,) * 2 + (False,) * 2)
CPU_HOSTS16 = Topology(device="cpu", world_size=16, local_world_size=8,
                       same_node=(True,) * 8 + (False,) * 8)
HGX8 = Topology(device="cuda", world_size=8, local_world_size=8, nvlink=True, gpus_per_node=8)
PCIE8 = Topology(device="cuda", world_size=8, local_world_size=8, nvlink=False, gpus_per_node=8)
TWO_NODES = Topology(device="cuda", world_size=16, local_world_size=8,
                     same_node=(True,) * 8 + (False,) * 8, nvlink=True, gpus_per_node=8)
NVL72 = Topology(device="cuda", world_size=72, local_world_size=4,
                 same_node=(True,) * 4 + (False,) * 68, nvlink=True, gpus_per_node=4)


def all_available(*missing: str) -> dict[str, tuple[bool, str]]:
    """Every registered backend available except `missing` (reason names the backend)."""
    return {n: (n not in missing, "" if n not in missing else f"{n} test: package absent")
            for n in known_managers()}


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- shipped configs


def test_shipped_configs_are_installed_and_in_repo():
    shipped = shipped_configs()
    assert set(SHIPPED) <= set(shipped)
    for name in SHIPPED:
        # The repo-root configs/ directory (DESIGN's layout) shows the same files.
        assert (REPO / "configs" / f"{name}.yaml").read_text() == Path(shipped[name]).read_text()


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("phase", ["prefill", "decode", None])
def test_every_shipped_config_selects_an_available_backend_here(name, phase):
    config = load_config(name)
    assert config.description, "shipped configs explain themselves"
    here = available_managers(CPU2)
    selection = select(config, CPU2, phase)
    assert here[selection.name][0], f"{name} selected unavailable {selection.name}"
    # Every rule before the winner is reported with a reason.
    tried = list(config.all2all.rules) + list(config.all2all.fallback)
    won = next(i for i, r in enumerate(tried) if r is selection.rule)
    assert [r for r, _ in selection.skipped] == tried[:won]
    assert all(reason for _, reason in selection.skipped)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_by_name_and_path_and_round_trips(name):
    by_name = load_config(name)
    by_path = load_config(REPO / "configs" / f"{name}.yaml")
    assert by_name == by_path
    again = parse_config(yaml.safe_load(dump_config(by_name)), "dumped")
    assert again == by_name
    assert config_to_dict(again) == config_to_dict(by_name)
    assert pickle.loads(pickle.dumps(by_name)) == by_name


# ---------------------------------------------------------------- the selection table

# (config, topology, phase, missing backends) -> (selected backend, options)
TABLE = [
    ("cpu-local", CPU2, "decode", (), "shm", {}),
    ("cpu-local", CPU2, "prefill", ("shm",), "allgather_reducescatter", {}),
    ("cpu-local", CPU6, "prefill", (), "shm", {}),
    ("cpu-local", CPU6, "decode", ("shm",), "alltoallv", {}),
    ("cpu-local", CPU16, "prefill", (), "shm", {}),
    ("cpu-local", CPU_HOSTS4, "decode", (), "allgather_reducescatter", {}),
    ("cpu-local", CPU_HOSTS16, "prefill", (), "alltoallv", {}),
    ("cpu-local", CPU2, None, ("shm", "allgather_reducescatter"), "alltoallv", {}),
    ("cpu-local", CPU2, None, ("shm", "allgather_reducescatter", "alltoallv"), "naive", {}),
    ("single-node-nvlink", HGX8, "decode", (), "deepep_low_latency",
     {"max_tokens_per_rank": 128}),
    ("single-node-nvlink", HGX8, "prefill", (), "deepep_high_throughput", {}),
    ("single-node-nvlink", HGX8, None, (), "alltoallv", {}),
    ("single-node-nvlink", PCIE8, "decode", (), "alltoallv", {}),
    ("single-node-nvlink", HGX8, "decode", ("deepep_low_latency",), "alltoallv", {}),
    ("single-node-nvlink", CPU2, "decode", (), "alltoallv", {}),
    ("multi-node-rdma", TWO_NODES, "decode", (), "deepep_low_latency",
     {"max_tokens_per_rank": 128}),
    ("multi-node-rdma", TWO_NODES, "decode", ("deepep_low_latency",), "pplx", {}),
    ("multi-node-rdma", TWO_NODES, "prefill", (), "deepep_high_throughput", {}),
    ("multi-node-rdma", HGX8, "prefill", (), "deepep_high_throughput", {}),
    ("multi-node-rdma", HGX8, "decode", (), "deepep_low_latency",
     {"max_tokens_per_rank": 128}),
    ("multi-node-rdma", TWO_NODES, "prefill", ("deepep_high_throughput",), "alltoallv", {}),
    ("gb200-nvl72", NVL72, "decode", (), "flashinfer_mnnvl", {}),
    ("gb200-nvl72", NVL72, "prefill", (), "flashinfer_mnnvl", {}),
    ("gb200-nvl72", NVL72, "decode", ("flashinfer_mnnvl",), "deepep_low_latency",
     {"max_tokens_per_rank": 128, "allow_mnnvl": True}),
    ("gb200-nvl72", NVL72, "prefill", ("flashinfer_mnnvl",), "deepep_high_throughput", {}),
    ("gb200-nvl72", HGX8, "decode", (), "alltoallv", {}),
]


@pytest.mark.parametrize("name,topo,phase,missing,expected,options", TABLE)
def test_select_table(name, topo, phase, missing, expected, options):
    config = load_config(name)
    availability = all_available(*missing)
    selection = select(config, topo, phase, availability=availability)
    assert (selection.name, dict(selection.options)) == (expected, options)
    assert availability[selection.name][0]
    # Independent check of the reported reasons: every skipped rule either does not match
    # (and its `when` really fails) or names an unavailable backend with its reason.
    for rule, reason in selection.skipped:
        if rule.when.mismatch(topo, phase) is not None:
            assert reason.startswith("does not match: ")
        else:
            assert not availability[rule.use][0]
            assert availability[rule.use][1] in reason and rule.use in reason
    # The winning rule itself matches.
    assert selection.rule.when.mismatch(topo, phase) is None


def test_skipped_reasons_name_the_failing_condition():
    config = load_config("single-node-nvlink")
    sel = select(config, PCIE8, "decode", availability=all_available())
    reasons = [why for _, why in sel.skipped]
    assert reasons == [
        "does not match: NVLink is absent, rule needs nvlink=true",
        "does not match: NVLink is absent, rule needs nvlink=true",
    ]
    sel = select(config, HGX8, "prefill", availability=all_available())
    assert sel.skipped[0][1] == "does not match: phase is prefill, rule needs decode"
    sel = select(config, CPU2, "prefill", availability=all_available())
    assert sel.skipped[0][1] == "does not match: device is cpu, rule needs cuda"
    sel = select(config, HGX8, None, availability=all_available())
    assert sel.skipped[0][1] == "does not match: no phase given, rule needs decode"
    assert sel.where == "all2all.fallback[0]"
    sel = select(load_config("multi-node-rdma"), HGX8, "decode", availability=all_available())
    assert sel.skipped[0][1] == ("does not match: job spans a single node, "
                                 "rule needs internode")
    sel = select(load_config("cpu-local"), CPU_HOSTS16, "decode", availability=all_available())
    assert [why for _, why in sel.skipped] == [
        "does not match: job spans 2 nodes, rule needs a single node",
        "does not match: world size is 16, rule needs <= 4",
    ]


CUSTOM = """
all2all:
  rules:
    - when: {device: cuda, world_size: 8}
      use: deepep_low_latency
    - when: {world_size: {min: 4}}
      use: pplx
    - when: {world_size: {max: 3}, gpus_per_node: {min: 1, max: 8}}
      use: naive
  fallback: agrs
  strict: %s
"""


def test_world_size_ranges_and_alias(tmp_path):
    config = load_config(write(tmp_path, CUSTOM % "false"))
    # `agrs` is the registry alias of allgather_reducescatter.
    assert config.all2all.fallback[0].use == "allgather_reducescatter"
    avail = all_available()
    one = Topology(device="cuda", world_size=2, local_world_size=2, gpus_per_node=2)
    assert select(config, HGX8, "decode", availability=avail).name == "deepep_low_latency"
    assert select(config, CPU16, "decode", availability=avail).name == "pplx"
    assert select(config, one, "decode", availability=avail).name == "naive"
    sel = select(config, CPU2, "decode", availability=avail)  # gpus_per_node 0
    assert sel.name == "allgather_reducescatter"
    assert sel.skipped[2][1] == "does not match: gpus per node is 0, rule needs 1..8"
    assert sel.skipped[1][1] == "does not match: world size is 2, rule needs >= 4"


def test_unavailable_backend_with_and_without_strict(tmp_path):
    lenient = load_config(write(tmp_path, CUSTOM % "false", "lenient.yaml"))
    strict = load_config(write(tmp_path, CUSTOM % "true", "strict.yaml"))
    avail = all_available("deepep_low_latency")
    sel = select(lenient, HGX8, "decode", availability=avail)
    assert sel.name == "pplx"
    assert sel.skipped[0][1] == ("matches, but deepep_low_latency is unavailable: "
                                 "deepep_low_latency test: package absent")
    with pytest.raises(SelectionError) as err:
        select(strict, HGX8, "decode", availability=avail)
    msg = str(err.value)
    assert "strict.yaml" in msg and "all2all.rules[0]" in msg
    assert "deepep_low_latency test: package absent" in msg and "strict" in msg
    # Strict only concerns rules that match: a non-matching unavailable rule is skipped.
    assert select(strict, CPU16, "decode", availability=avail).name == "pplx"


def test_nothing_available_lists_every_reason(tmp_path):
    config = load_config(write(tmp_path, CUSTOM % "false"))
    with pytest.raises(SelectionError) as err:
        select(config, HGX8, "decode", availability=all_available(*known_managers()))
    msg = str(err.value)
    for where in ("all2all.rules[0]", "all2all.rules[1]", "all2all.rules[2]",
                  "all2all.fallback[0]"):
        assert where in msg
    assert "allgather_reducescatter test: package absent" in msg


def test_select_rejects_bad_phase():
    with pytest.raises(ValueError, match="phase must be one of prefill, decode"):
        select(load_config("cpu-local"), CPU2, "train", availability=all_available())


def test_default_availability_comes_from_registry():
    config = load_config("cpu-local")
    assert select(config, CPU2, "decode") == select(
        config, CPU2, "decode", availability=available_managers(CPU2))


# ---------------------------------------------------------------- malformed files

BAD = [
    # (yaml text, key path in message, other fragments in message)
    ("all2all:\n  rules:\n    - when: {world_size: eight}\n      use: naive\n",
     "all2all.rules[0].when.world_size", ["expected an integer or a range", "'eight'"]),
    ("all2all:\n  rules:\n    - when: {phse: decode}\n      use: naive\n",
     "all2all.rules[0].when.phse", ["unknown key 'phse'", "did you mean 'phase'",
                                    "allowed keys: device, internode"]),
    ("all2all:\n  rules:\n    - when: {phase: dcode}\n      use: naive\n",
     "all2all.rules[0].when.phase", ["'dcode' is not allowed", "prefill, decode"]),
    ("all2all:\n  rules:\n    - when: {device: gpu}\n      use: naive\n",
     "all2all.rules[0].when.device", ["'gpu' is not allowed", "cpu, cuda"]),
    ("all2all:\n  rules:\n    - use: deepep\n", "all2all.rules[0].use",
     ["unknown backend 'deepep'", "known backends: naive"]),
    ("all2all:\n  fallback: [alltoallv, nccl]\n", "all2all.fallback[1]",
     ["unknown backend 'nccl'"]),
    ("all2all:\n  rules: []\n  fallback: [naive]\n", "all2all.rules", ["is empty"]),
    ("all2all:\n  rules:\n  fallback: [naive]\n", "all2all.rules", ["is empty"]),
    ("all2all:\n  fallback: []\n", "all2all.fallback", ["is empty"]),
    ("all2all: {}\n", "all2all", ["nothing to select"]),
    ("all2all:\n  rules:\n    - when: {device: cpu}\n", "all2all.rules[0]",
     ["missing key 'use'"]),
    ("all2all:\n  rules:\n    - when: {internode: 1}\n      use: naive\n",
     "all2all.rules[0].when.internode", ["expected true or false", "int 1"]),
    ("all2all:\n  rules:\n    - when: {world_size: true}\n      use: naive\n",
     "all2all.rules[0].when.world_size", ["boolean true"]),
    ("all2all:\n  rules:\n    - when: {world_size: {min: 8, max: 2}}\n      use: naive\n",
     "all2all.rules[0].when.world_size", ["min 8 is greater than max 2"]),
    ("all2all:\n  rules:\n    - when: {world_size: {least: 2}}\n      use: naive\n",
     "all2all.rules[0].when.world_size.least", ["allowed keys: min, max"]),
    ("all2all:\n  rules:\n    - use: naive\n      options: {depth: {a: 1}}\n",
     "all2all.rules[0].options.depth", ["expected a scalar or a list of scalars"]),
    ("all2all:\n  rules:\n    - use: naive\n      options: [1, 2]\n",
     "all2all.rules[0].options", ["expected a mapping of option names"]),
    ("all2all:\n  rules: {use: naive}\n", "all2all.rules", ["expected a list of rules"]),
    # Options are checked against the backend's own options dataclass.
    ("all2all:\n  fallback:\n    - {use: alltoallv, options: {dedupe: true}}\n",
     "all2all.fallback[0].options.dedupe", ["unknown option 'dedupe' for alltoallv",
                                            "did you mean 'dedup'", "allowed options: dedup"]),
    ("all2all:\n  fallback:\n    - {use: alltoallv, options: {dedup: 1}}\n",
     "all2all.fallback[0].options", ["invalid options for alltoallv", "'dedup' must be bool"]),
    ("all2all:\n  fallback:\n    - {use: naive, options: {x: 1}}\n",
     "all2all.fallback[0].options.x", ["allowed options: none"]),
    ("all2all:\n  fallback: [naive]\n  strict: yes please\n", "all2all.strict",
     ["expected true or false"]),
    ("all2al:\n  fallback: [naive]\n", "all2al", ["did you mean 'all2all'"]),
    ("parallel: {tensor_parallel_size: 0}\nall2all: {fallback: naive}\n",
     "parallel.tensor_parallel_size", ["expected an integer >= 1, got 0"]),
    ("collectives: {shared_memory: maybe}\nall2all: {fallback: naive}\n",
     "collectives.shared_memory", ["expected true or false"]),
    ("description: 3\nall2all: {fallback: naive}\n", "description", ["expected a string"]),
    ("parallel: {}\n", "all2all", ["missing section"]),
    ("- naive\n", "(top level)", ["expected a mapping"]),
    ("", "", ["the config is empty"]),
    ("all2all:\n  fallback: [naive]\nall2all:\n  fallback: [shm]\n", "line 3",
     ["duplicate key 'all2all'", "first on line 1"]),
    ("all2all:\n  rules: [\n", "line ", ["invalid YAML"]),
]


@pytest.mark.parametrize("text,path,fragments", BAD)
def test_malformed_config_errors_are_precise(tmp_path, text, path, fragments):
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(file)
    msg = str(err.value)
    assert msg.startswith(f"{file}: "), msg
    assert err.value.source == str(file)
    assert err.value.path.startswith(path), msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_missing_file_lists_shipped_names(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert "no such file" in str(err.value) and "cpu-local" in str(err.value)
    with pytest.raises(ConfigError, match="not a shipped config name"):
        load_config("cpu-locale")


def test_options_are_frozen_hashable_and_picklable():
    opts = Options({"b": [1, 2], "a": "x"})
    assert dict(opts) == {"a": "x", "b": (1, 2)} and list(opts) == ["a", "b"]
    assert opts == Options({"a": "x", "b": (1, 2)}) and hash(opts) == hash(Options(opts))
    with pytest.raises(TypeError):
        opts["c"] = 1  # type: ignore[index]
    # A config's options are validated against the backend's and frozen the same way.
    config = parse_config({"all2all": {"rules": [{"use": "pplx",
                                                  "options": {"internode": True}}]}}, "<d>")
    assert config.all2all.rules[0].options["internode"] is True
    assert hash(config) == hash(pickle.loads(pickle.dumps(config)))
    assert isinstance(config, Config) and config.source == "<d>"


# ---------------------------------------------------------------- building from a config (2 ranks)


def _build_from_config_worker(info):
    from moe_ep.config import build_manager_from_config
    from moe_ep.distributed import initialize_model_parallel

    groups = initialize_model_parallel()
    topo = Topology.detect(groups.ep)
    out = {}
    for phase in ("prefill", "decode"):
        mgr = build_manager_from_config("cpu-local", groups.ep, phase)
        try:
            out[phase] = (mgr.name, select(load_config("cpu-local"), topo, phase).name)
        finally:
            mgr.destroy()
    # Ranks that would pick different managers must fail together instead of hanging later.
    by_size = parse_config({"all2all": {"rules": [{"when": {"world_size": 2}, "use": "naive"}],
                                        "fallback": ["agrs"]}}, "by-size")
    lying = CPU16 if info.rank == 0 else topo
    try:
        build_manager_from_config(by_size, groups.ep, "decode", topology=lying)
        out["disagree"] = None
    except SelectionError as exc:
        out["disagree"] = str(exc)
    return out


def test_build_manager_from_config_on_two_ranks(dist_pool):
    results = dist_pool(2).run(_build_from_config_worker, timeout=120)
    for out in results:
        for phase in ("prefill", "decode"):
            built, selected = out[phase]
            assert built == selected
    for out in results:
        assert out["disagree"] == ("by-size: ranks selected different managers (rank 0: "
                                   "allgather_reducescatter, rank 1: naive); their topologies "
                                   "or installed packages differ")


def test_loading_configs_imports_no_backend_module():
    """Options are checked against moe_ep.managers.options: parsing imports no backend."""
    import subprocess
    import sys

    backends = ("naive", "agrs", "alltoallv", "shm", "deepep", "pplx", "flashinfer")
    code = (
        "import sys; from moe_ep.config import load_config, shipped_configs;"
        "[load_config(n) for n in shipped_configs()];"
        f"print(sorted(m for m in sys.modules if m.split('.')[-1] in {backends!r}"
        " and m.startswith('moe_ep.managers.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
