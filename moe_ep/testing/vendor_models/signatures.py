"""Signature checks: the contract models' call surfaces against the real vendor packages.

Every callable that a model exposes (and that an adapter may call) is listed in
:data:`SURFACES` with the file of the real package that defines it. A signature is normalised
to ``[[name, kind, default], ...]`` (``kind`` an :class:`inspect.Parameter` kind name,
``default`` the default's source text or None; annotations ignored; positional-only names
ignored, as pybind11 names them ``arg0``...). Dataclasses are compared by their generated
``__init__``; enums by ``[[member, value], ...]``.

Two checks use it:

* **snapshot vs models** (always, in CI): ``tests/vendor_signatures/snapshot.json`` records
  the real signatures with the exact package versions and artifact hashes; every model
  signature must equal its recorded one;
* **real package vs snapshot** (where a real package can be had): the snapshot is recomputed
  from the real sources (a cached wheel, an importable installed package, or a pplx-kernels
  source checkout) and must equal the recorded one, so a stale snapshot fails.

Real sources are read without importing them where they cannot import (sgl-deep-ep needs a
GPU at import; pplx-kernels has no wheel): the Python files are parsed with :mod:`ast`.
``deep_ep._C.Config`` is a pybind11 class: its signature is recorded from DeepEP's C++
(``csrc/legacy/buffer.hpp`` at dd758ca) and the keyword names are checked in the wheel's
``_C`` shared object.

Regenerate the snapshot (needs the artifacts; see ``python -m
moe_ep.testing.vendor_models.signatures --help``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import hashlib
import inspect
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "DEEPEP_LIMIT_STRINGS",
    "SURFACES",
    "Surface",
    "compare",
    "model_signature",
    "real_signatures",
    "normalise_ast",
    "normalise_live",
]

Sig = list[list[Any]]


@dataclasses.dataclass(frozen=True)
class Surface:
    """One callable of a vendor API.

    Attributes:
        package: vendor import name (``deep_ep``, ``pplx_kernels``, ``flashinfer``).
        qualname: ``Class.method``, ``function``, ``Class()`` (a dataclass constructor) or
            ``Class[]`` (enum members).
        path: the real package's file defining it (relative to the package's source root).
        model: dotted path of the model object (``module:qualname``).
    """

    package: str
    qualname: str
    path: str
    model: str


def _s(package: str, path: str, model_module: str, *qualnames: str) -> list[Surface]:
    out = []
    for q in qualnames:
        target = q.rstrip("()[]")
        out.append(Surface(package, q, path, f"{model_module}:{target}"))
    return out


_D = "moe_ep.testing.vendor_models.deepep_model"
_P = "moe_ep.testing.vendor_models.pplx_model"
_F = "moe_ep.testing.vendor_models.flashinfer_model"

SURFACES: tuple[Surface, ...] = tuple(
    _s("deep_ep", "deep_ep/buffers/legacy.py", _D,
       "Buffer.__init__", "Buffer.destroy", "Buffer.is_sm90_compiled", "Buffer.set_num_sms",
       "Buffer.capture", "Buffer.get_low_latency_rdma_size_hint", "Buffer.get_comm_stream",
       "Buffer.get_local_buffer_tensor", "Buffer.get_dispatch_config",
       "Buffer.get_combine_config", "Buffer.get_dispatch_layout", "Buffer.dispatch",
       "Buffer.combine", "Buffer.clean_low_latency_buffer", "Buffer.low_latency_dispatch",
       "Buffer.low_latency_combine", "Buffer.low_latency_update_mask_buffer",
       "Buffer.low_latency_query_mask_buffer", "Buffer.low_latency_clean_mask_buffer",
       "Buffer.get_next_low_latency_combine_buffer")
    + _s("deep_ep", "deep_ep/buffers/elastic.py", _D,
         "EPHandle.__init__", "ElasticBuffer.__init__", "ElasticBuffer.destroy",
         "ElasticBuffer.get_buffer_size_hint", "ElasticBuffer.barrier", "ElasticBuffer.capture",
         "ElasticBuffer.get_theoretical_num_sms", "ElasticBuffer.get_theoretical_num_qps",
         "ElasticBuffer.dispatch", "ElasticBuffer.combine")
    + _s("deep_ep", "deep_ep/utils/event.py", _D,
         "EventOverlap.__init__", "EventOverlap.current_stream_wait",
         "EventOverlap.register_hook_after_wait", "EventOverlap.__call__")
    + _s("deep_ep", "deep_ep/utils/envs.py", _D,
         "get_physical_domain_size", "get_logical_domain_size")
    + [Surface("deep_ep", f"Config.{m}", "pybind:csrc/legacy/buffer.hpp",
               f"{_D}:Config.{m}")
       for m in ("__init__", "get_nvl_buffer_size_hint", "get_rdma_buffer_size_hint")]
    + _s("pplx_kernels", "src/pplx_kernels/all_to_all.py", _P,
         "AllToAll.__init__", "AllToAll.dispatch", "AllToAll.combine", "AllToAll.destroy",
         "AllToAll.intranode", "AllToAll.internode")
    + _s("pplx_kernels", "src/pplx_kernels/nvshmem.py", _P,
         "nvshmem_get_unique_id", "nvshmem_unique_id_size", "nvshmem_alloc_empty_unique_id",
         "nvshmem_init", "nvshmem_alltoall", "nvshmem_finalize", "nvshmem_my_pe",
         "nvshmem_n_pes", "nvshmem_malloc", "nvshmem_barrier_all",
         "nvshmem_barrier_all_on_current_stream")
    + _s("flashinfer", "flashinfer/moe_ep/core/comm/communication.py", _F,
         "MoEEpCommParams()", "MoEEpDispatchResult()", "MoEEpCommunication.__init__",
         "MoEEpCommunication.get_combine_input_buffer", "MoEEpCommunication.destroy",
         "register_communication", "available_communication_backends",
         "create_communication")
    + _s("flashinfer", "flashinfer/moe_ep/config.py", _F, "BootstrapConfig()")
    + _s("flashinfer", "flashinfer/moe_ep/backends/split/comm/nvlink_one_sided/config.py", _F,
         "NVLinkOneSidedConfig()")
    + _s("flashinfer", "flashinfer/moe_ep/backends/split/comm/nvlink_one_sided/communication.py",
         _F, "NVLinkOneSidedAlltoAll.__init__", "NVLinkOneSidedAlltoAll.dispatch",
         "NVLinkOneSidedAlltoAll.combine", "NVLinkOneSidedAlltoAll.get_combine_input_buffer",
         "NVLinkOneSidedAlltoAll.destroy")
    + _s("flashinfer", "flashinfer/fused_moe/api.py", _F, "QuantFormat[]")
)

#: Names the real top-level modules export, checked against the installed model modules.
EXPORT_FILES = {
    "deep_ep": "deep_ep/__init__.py",
    "pplx_kernels": "src/pplx_kernels/__init__.py",
}
#: Submodules whose exports are recorded too (the names an adapter reads from them are checked
#: against these): module -> (package, file). Recorded as ``<exports MODULE>``.
SUBMODULE_EXPORT_FILES = {
    "flashinfer.moe_ep": ("flashinfer", "flashinfer/moe_ep/__init__.py"),
    "flashinfer.fused_moe": ("flashinfer", "flashinfer/fused_moe/__init__.py"),
}


def exports_key(module: str) -> str:
    """The snapshot key of `module`'s exports (in its package's signatures)."""
    return "<exports>" if "." not in module else f"<exports {module}>"

#: EP_HOST_ASSERT texts of limits the deep_ep model enforces; each must be compiled into the
#: wheel's ``deep_ep/_C*.so`` (evidence that the wheel's C++ has the same checks).
DEEPEP_LIMIT_STRINGS = (
    "x.size(1) % sizeof(int4) == 0 and x.size(1) % 128 == 0",
    "x.size(0) == topk_idx.size(0) and x.size(0) <= num_max_dispatch_tokens_per_rank",
    "(num_ranks * num_max_dispatch_tokens_per_rank) % 4 == 0",
    "hidden % 512 == 0",
    "num_experts % num_ranks == 0",
    "layout.total_bytes <= num_rdma_bytes",
    "num_topk <= kNumMaxTopK",
    "Unsupported hidden",
    "Unsupported type",
    "num_ranks * (num_ranks + num_local_experts) * sizeof(int) <= num_nvl_bytes",
    "topk_weights.size(0) <= num_max_dispatch_tokens_per_rank",
    "num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens",
    "num_max_nvl_chunked_recv_tokens",
    "num_max_rdma_chunked_send_tokens",
    "num_max_rdma_chunked_recv_tokens",
)

_KINDS = {
    "posonly": "POSITIONAL_ONLY", "arg": "POSITIONAL_OR_KEYWORD", "vararg": "VAR_POSITIONAL",
    "kwonly": "KEYWORD_ONLY", "kwarg": "VAR_KEYWORD",
}


# ------------------------------------------------------------------------------ normalising
def normalise_ast(fn: ast.FunctionDef) -> Sig:
    """``[[name, kind, default source or None], ...]`` of a parsed function."""
    a = fn.args
    out: Sig = []
    positional = [*a.posonlyargs, *a.args]
    defaults: list[Optional[ast.expr]] = [None] * (len(positional) - len(a.defaults))
    defaults += list(a.defaults)
    for i, arg in enumerate(positional):
        kind = _KINDS["posonly"] if i < len(a.posonlyargs) else _KINDS["arg"]
        d = defaults[i]
        out.append([arg.arg, kind, None if d is None else ast.unparse(d)])
    if a.vararg:
        out.append([a.vararg.arg, _KINDS["vararg"], None])
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append([arg.arg, _KINDS["kwonly"], None if d is None else ast.unparse(d)])
    if a.kwarg:
        out.append([a.kwarg.arg, _KINDS["kwarg"], None])
    return out


def _field_call(value: ast.expr) -> Optional[ast.Call]:
    if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", ""))\
            == "field":
        return value
    return None


def normalise_ast_dataclass(cls: ast.ClassDef) -> Sig:
    """The generated ``__init__`` of a parsed ``@dataclass`` (``field(default=, kw_only=)``)."""
    positional: Sig = []
    kw_only: Sig = []
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        if "ClassVar" in ast.unparse(node.annotation):
            continue
        default: Optional[str] = None
        is_kw = False
        call = _field_call(node.value) if node.value is not None else None
        if call is not None:
            for kw in call.keywords:
                if kw.arg == "default":
                    default = ast.unparse(kw.value)
                elif kw.arg == "default_factory":
                    default = "<factory>"
                elif kw.arg == "kw_only":
                    is_kw = bool(ast.literal_eval(kw.value))
        elif node.value is not None:
            default = ast.unparse(node.value)
        entry = [node.target.id, _KINDS["kwonly"] if is_kw else _KINDS["arg"], default]
        (kw_only if is_kw else positional).append(entry)
    return positional + kw_only


def normalise_ast_enum(cls: ast.ClassDef) -> Sig:
    out: Sig = []
    for node in cls.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            out.append([node.targets[0].id, ast.literal_eval(node.value)])
    return out


def _default_text(value: Any) -> Optional[str]:
    if value is inspect.Parameter.empty:
        return None
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if value.__class__.__name__ == "_HAS_DEFAULT_FACTORY_CLASS":
        return "<factory>"
    return repr(value)


def normalise_live(obj: Any) -> Sig:
    """The same form from a live callable (a model, or an importable real package)."""
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return [[m.name, m.value] for m in obj]
    if isinstance(obj, type) and dataclasses.is_dataclass(obj):
        params = list(inspect.signature(obj).parameters.values())
    else:
        params = list(inspect.signature(obj).parameters.values())
    return [[p.name, p.kind.name, _default_text(p.default)] for p in params]


def _find_def(tree: ast.Module, qualname: str) -> ast.AST:
    parts = qualname.rstrip("()[]").split(".")
    body: list[ast.stmt] = tree.body
    node: Optional[ast.AST] = None
    for part in parts:
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise KeyError(f"{qualname}: {part} not found")
        body = getattr(node, "body", [])
    return node


def signature_from_source(text: str, qualname: str) -> Sig:
    """Normalised signature of ``qualname`` in Python source ``text``."""
    node = _find_def(ast.parse(text), qualname)
    if qualname.endswith("()"):
        return normalise_ast_dataclass(node)
    if qualname.endswith("[]"):
        return normalise_ast_enum(node)
    return normalise_ast(node)


def exports_from_source(text: str) -> list[str]:
    """Names a package ``__init__.py`` binds at top level (imports and assignments)."""
    names: set[str] = set()
    for node in ast.parse(text).body:
        if isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return sorted(n for n in names if not n.startswith("_") or n == "__version__")


def pybind_config_signature(cpp: str) -> Sig:
    """``Config.__init__`` from DeepEP's pybind11 registration (``py::arg("x") = v``)."""
    import re

    block = cpp[cpp.index('pybind11::class_<Config>(m, "Config")'):]
    block = block[:block.index(".def(\"get_nvl_buffer_size_hint\"")]
    args = re.findall(r'py::arg\("(\w+)"\)\s*=\s*([^,)\s]+)', block)
    return [["self", "POSITIONAL_OR_KEYWORD", None]] + [
        [name, "POSITIONAL_OR_KEYWORD", value] for name, value in args]


def pybind_method_signature(binding_cpp: str, header_cpp: str, method: str) -> Sig:
    """A ``Config`` method bound without ``py::arg`` (``.def("m", &Config::m)``): pybind11
    then takes its arguments positionally only; their number comes from the C++ declaration
    in ``header_cpp`` (DeepEP's ``csrc/legacy/config.hpp``)."""
    import re

    if not re.search(rf'\.def\("{method}",\s*&Config::{method}\)', binding_cpp):
        raise KeyError(f"Config.{method}: no keyword-less pybind11 binding found")
    decl = re.search(rf"\b{method}\s*\(([^)]*)\)", header_cpp)
    if decl is None:
        raise KeyError(f"Config.{method}: no C++ declaration found")
    params = [p for p in decl.group(1).split(",") if p.strip()]
    return [["self", "POSITIONAL_ONLY", None]] + [
        [f"arg{i}", "POSITIONAL_ONLY", None] for i in range(len(params))]


# ------------------------------------------------------------------------------ models
def _resolve(path: str) -> Any:
    module, _, qual = path.partition(":")
    obj: Any = __import__(module, fromlist=["_"])
    for part in qual.split("."):
        owner = obj
        obj = owner.__dict__[part] if isinstance(owner, type) and part in owner.__dict__ \
            else getattr(owner, part)
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return obj


def model_signature(surface: Surface) -> Sig:
    return normalise_live(_resolve(surface.model))


def compare(real: Sig, model: Sig) -> Optional[str]:
    """None if equal (positional-only names ignored), else a readable difference."""
    def key(sig: Sig) -> list[tuple]:
        return [tuple(["<pos>", *p[1:]]) if len(p) == 3 and p[1] == "POSITIONAL_ONLY"
                else tuple(p) for p in sig]
    if key(real) == key(model):
        return None
    return f"real {real} != model {model}"


# ------------------------------------------------------------------------------ real sources
class Source:
    """Read files of a real package: a wheel (zip), a directory or a bare git repo at a commit."""

    def __init__(self, root: Path, commit: Optional[str] = None, prefix: str = "") -> None:
        self.root, self.commit, self.prefix = Path(root), commit, prefix

    def read(self, path: str) -> str:
        if self.root.suffix == ".whl":
            with zipfile.ZipFile(self.root) as z:
                return z.read(path).decode()
        if self.commit is not None:
            return subprocess.run(["git", "--git-dir", str(self.root), "show",
                                   f"{self.commit}:{path}"], check=True, capture_output=True,
                                  text=True).stdout
        return (self.root / self.prefix / path).read_text()

    def describe(self) -> dict[str, str]:
        if self.root.suffix == ".whl":
            return {"artifact": self.root.name,
                    "sha256": hashlib.sha256(self.root.read_bytes()).hexdigest()}
        if self.commit is not None:
            full = subprocess.run(["git", "--git-dir", str(self.root), "rev-parse",
                                   self.commit], check=True, capture_output=True,
                                  text=True).stdout.strip()
            return {"artifact": "git", "commit": full}
        return {"artifact": str(self.root)}


def real_signatures(package: str, source: Source, config_cpp: Optional[str] = None,
                    config_hpp: Optional[str] = None) -> dict[str, Sig]:
    """``{qualname: signature}`` of ``package``'s surfaces read from ``source``; the pybind11
    ones of deep_ep only with DeepEP's ``buffer.hpp`` (``config_cpp``) and ``config.hpp``."""
    out: dict[str, Sig] = {}
    texts: dict[str, str] = {}
    for s in SURFACES:
        if s.package != package:
            continue
        if s.path.startswith("pybind:"):
            if config_cpp is not None and s.qualname == "Config.__init__":
                out[s.qualname] = pybind_config_signature(config_cpp)
            elif config_cpp is not None and config_hpp is not None:
                out[s.qualname] = pybind_method_signature(
                    config_cpp, config_hpp, s.qualname.split(".")[1])
            continue
        if s.path not in texts:
            texts[s.path] = source.read(s.path)
        out[s.qualname] = signature_from_source(texts[s.path], s.qualname)
    if package in EXPORT_FILES:
        out["<exports>"] = [[n] for n in exports_from_source(source.read(EXPORT_FILES[package]))]
    for module, (pkg, path) in SUBMODULE_EXPORT_FILES.items():
        if pkg == package:
            out[exports_key(module)] = [[n] for n in exports_from_source(source.read(path))]
    return out


def live_flashinfer_signatures() -> dict[str, Sig]:
    """The flashinfer surfaces from the importable installed package (no AST)."""
    import importlib

    out: dict[str, Sig] = {}
    for s in SURFACES:
        if s.package != "flashinfer":
            continue
        module = s.path[:-3].replace("/", ".")
        obj: Any = importlib.import_module(module)
        for part in s.qualname.rstrip("()[]").split("."):
            owner = obj
            obj = owner.__dict__[part] if isinstance(owner, type) and part in owner.__dict__ \
                else getattr(owner, part)
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        out[s.qualname] = normalise_live(obj)
    for module, (pkg, _) in SUBMODULE_EXPORT_FILES.items():
        if pkg == "flashinfer":
            text = Path(importlib.import_module(module).__file__).read_text()
            out[exports_key(module)] = [[n] for n in exports_from_source(text)]
    return out


def wheel_shared_object_strings(wheel: Path, needles: tuple[str, ...]) -> dict[str, bool]:
    """Which ``needles`` occur (as bytes) in the wheel's ``deep_ep/_C*.so``."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.startswith("deep_ep/_C") and n.endswith(".so"))
        blob = z.read(name)
    return {n: n.encode() in blob for n in needles}


# ------------------------------------------------------------------------------ CLI
def _main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Regenerate the vendor signature snapshot.")
    p.add_argument("--out", type=Path, required=True, help="snapshot.json to write")
    p.add_argument("--deepep-wheel", type=Path, required=True)
    p.add_argument("--deepep-cpp", type=Path, required=True,
                   help="DeepEP csrc/legacy/buffer.hpp (for the pybind Config)")
    p.add_argument("--deepep-config-hpp", type=Path, required=True,
                   help="DeepEP csrc/legacy/config.hpp (arity of the pybind Config methods)")
    p.add_argument("--deepep-cpp-ref", required=True,
                   help="where buffer.hpp and config.hpp came from")
    p.add_argument("--pplx-git", type=Path, required=True, help="bare git dir of pplx-kernels")
    p.add_argument("--pplx-commit", required=True)
    p.add_argument("--flashinfer-wheel", type=Path, required=True)
    args = p.parse_args(argv)
    snap: dict[str, Any] = {"format": 1, "packages": {}}
    deepep = Source(args.deepep_wheel)
    snap["packages"]["deep_ep"] = {
        "distribution": "sgl-deep-ep", "version": "0.1.2.post1", **deepep.describe(),
        "pybind_source": args.deepep_cpp_ref,
        "signatures": real_signatures("deep_ep", deepep, args.deepep_cpp.read_text(),
                                      args.deepep_config_hpp.read_text()),
        "limit_strings": wheel_shared_object_strings(args.deepep_wheel, DEEPEP_LIMIT_STRINGS),
    }
    pplx = Source(args.pplx_git, commit=args.pplx_commit)
    snap["packages"]["pplx_kernels"] = {
        "distribution": "pplx-kernels (not on PyPI; github.com/ppl-ai/pplx-kernels)",
        "version": "0.0.1", **pplx.describe(), "signatures": real_signatures("pplx_kernels", pplx),
    }
    fi = Source(args.flashinfer_wheel)
    snap["packages"]["flashinfer"] = {
        "distribution": "flashinfer-python", "version": "0.7.4", **fi.describe(),
        "signatures": real_signatures("flashinfer", fi),
    }
    args.out.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())

