"""Install a contract model as the vendor module (``sys.modules``), for one test, in one process.

An adapter imports ``deep_ep`` / ``pplx_kernels`` / ``flashinfer`` lazily, by name; with the
model installed under that name the adapter runs unchanged. The patch is process-local, so in a
multi-process test it must happen *in each rank*: :func:`run_with_models` is a picklable
trampoline for :meth:`moe_ep.testing.DistributedPool.run` that installs the models, runs the
worker and restores ``sys.modules`` (and resets the models' process state) in ``finally``, so a
reused pool worker is clean for the next test::

    pool.run(run_with_models, ("deep_ep",), my_worker, arg1, timeout=60)

Every installed module carries ``__moe_ep_contract_model__ = True`` and a real ``__spec__``
(``importlib.util.find_spec`` then answers for it, as it does for an installed package).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from moe_ep.testing.vendor_models import deepep_model, flashinfer_model, pplx_model

__all__ = ["MODEL_NAMES", "build_modules", "installed", "run_with_models"]

#: Vendor import names that have a model.
MODEL_NAMES = ("deep_ep", "pplx_kernels", "flashinfer")


def _module(name: str, attrs: dict[str, Any], package: bool) -> types.ModuleType:
    mod = types.ModuleType(name, f"moe_ep contract model of {name} (not the vendor package)")
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []
    mod.__moe_ep_contract_model__ = True
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def build_modules(name: str) -> dict[str, types.ModuleType]:
    """The module objects standing in for vendor package ``name`` (submodules included)."""
    if name == "deep_ep":
        d = deepep_model
        c = _module("deep_ep._C", {"Config": d.Config, "EventHandle": d.EventHandle,
                                   "topk_idx_t": d.topk_idx_t}, False)
        legacy = _module("deep_ep.buffers.legacy", {"Buffer": d.Buffer}, False)
        elastic = _module("deep_ep.buffers.elastic",
                          {"ElasticBuffer": d.ElasticBuffer, "EPHandle": d.EPHandle}, False)
        event = _module("deep_ep.utils.event", {"EventOverlap": d.EventOverlap,
                                                "EventHandle": d.EventHandle}, False)
        top = _module("deep_ep", {
            "Buffer": d.Buffer, "ElasticBuffer": d.ElasticBuffer, "EPHandle": d.EPHandle,
            "EventOverlap": d.EventOverlap, "EventHandle": d.EventHandle, "Config": d.Config,
            "topk_idx_t": d.topk_idx_t, "get_physical_domain_size": d.get_physical_domain_size,
            "get_logical_domain_size": d.get_logical_domain_size, "__version__": d.VERSION,
            "_C": c,
        }, True)
        return {"deep_ep": top, "deep_ep._C": c, "deep_ep.buffers.legacy": legacy,
                "deep_ep.buffers.elastic": elastic, "deep_ep.utils.event": event}
    if name == "pplx_kernels":
        p = pplx_model
        nv_names = [n for n in p.__all__ if n.startswith("nvshmem_")]
        nvshmem = _module("pplx_kernels.nvshmem",
                          {n: getattr(p, n) for n in [*nv_names, "nvshmem_malloc"]}, False)
        a2a = _module("pplx_kernels.all_to_all", {"AllToAll": p.AllToAll}, False)
        top = _module("pplx_kernels", {"AllToAll": p.AllToAll, "all_to_all": a2a,
                                       "nvshmem": nvshmem,
                                       **{n: getattr(p, n) for n in nv_names}}, True)
        return {"pplx_kernels": top, "pplx_kernels.all_to_all": a2a,
                "pplx_kernels.nvshmem": nvshmem}
    if name == "flashinfer":
        f = flashinfer_model
        exported = ["BootstrapConfig", "MoEEpCommParams", "MoEEpCommunication",
                    "MoEEpDispatchResult", "NVLinkOneSidedConfig", "create_communication",
                    "available_communication_backends", "register_communication"]
        moe_ep = _module("flashinfer.moe_ep", {n: getattr(f, n) for n in exported}, True)
        one_sided = _module("flashinfer.moe_ep.backends.split.comm.nvlink_one_sided",
                            {"NVLinkOneSidedAlltoAll": f.NVLinkOneSidedAlltoAll,
                             "NVLinkOneSidedConfig": f.NVLinkOneSidedConfig}, True)
        fused = _module("flashinfer.fused_moe", {"QuantFormat": f.QuantFormat}, True)
        top = _module("flashinfer", {"__version__": f.VERSION, "moe_ep": moe_ep,
                                     "fused_moe": fused}, True)
        return {"flashinfer": top, "flashinfer.moe_ep": moe_ep,
                "flashinfer.moe_ep.backends.split.comm.nvlink_one_sided": one_sided,
                "flashinfer.fused_moe": fused}
    raise ValueError(f"no contract model for {name!r}; models: {', '.join(MODEL_NAMES)}")


def _reset(name: str) -> None:
    """Forget process-wide model state (NVSHMEM, the SM count) between tests."""
    if name == "pplx_kernels":
        pplx_model._NVSHMEM = pplx_model._NvshmemState()
    if name == "deep_ep":
        deepep_model.Buffer.num_sms = 20  # set_num_sms is process-global, as in DeepEP


_MISSING = object()


@contextmanager
def installed(*names: str) -> Iterator[dict[str, types.ModuleType]]:
    """Put the models of ``names`` into ``sys.modules`` for the ``with`` body, then restore.

    Also drops any cached submodules of those packages that the models do not provide, so that
    an import cannot reach half of a real package.
    """
    modules: dict[str, types.ModuleType] = {}
    for name in names:
        modules.update(build_modules(name))
    touched = {k for k in sys.modules for n in names if k == n or k.startswith(n + ".")}
    saved = {k: sys.modules.get(k, _MISSING) for k in touched | set(modules)}
    try:
        for k in touched:
            sys.modules.pop(k, None)
        sys.modules.update(modules)
        yield modules
    finally:
        for k in set(modules) | touched:
            sys.modules.pop(k, None)
        for k, v in saved.items():
            if v is not _MISSING:
                sys.modules[k] = v
        for name in names:
            _reset(name)


def run_with_models(info: Any, names: tuple[str, ...], fn: Callable[..., Any],
                    *args: Any) -> Any:
    """``fn(info, *args)`` with the models of ``names`` installed (a DistributedPool worker)."""
    with installed(*names):
        return fn(info, *args)
