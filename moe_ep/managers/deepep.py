"""DeepEP backends (``deepep_high_throughput``, ``deepep_low_latency``): placeholders.

Registered so configs can name them and ``available_managers()`` can say why they cannot run:
they need the ``deep_ep`` package (PyPI ``sgl-deep-ep``, a CUDA wheel importable only with a
GPU present; ``deep-ep`` 1.0.0 on PyPI is a source archive that does not build) and CUDA
devices, and the moe_ep adapter is not written yet. ``availability()`` reports exactly which of
these is missing; building one raises :class:`~moe_ep.managers.contract.ManagerUnavailableError`.
There is no fallback implementation behind these names.

When the adapter lands: HT dispatch returns the TOKEN layout with an unweighted combine (the
weights are applied by the experts step); LL returns EXPERT_PADDED ``[E_local, W * max, H]``
with a weighted combine (REFERENCE.md, "DeepEP").
"""

from __future__ import annotations

from typing import ClassVar

from moe_ep.managers.contract import Layout
from moe_ep.managers.vendor import VendorBackendPlaceholder

__all__ = ["DeepEPHighThroughputManager", "DeepEPLowLatencyManager"]

_HINT = "pip install sgl-deep-ep on a CUDA machine"


class DeepEPHighThroughputManager(VendorBackendPlaceholder):
    """``deepep_high_throughput``: DeepEP normal kernels (unavailable in this build)."""

    name: ClassVar[str] = "deepep_high_throughput"
    layout: ClassVar[Layout] = Layout.TOKEN
    vendor_module: ClassVar[str] = "deep_ep"
    install_hint: ClassVar[str] = _HINT


class DeepEPLowLatencyManager(VendorBackendPlaceholder):
    """``deepep_low_latency``: DeepEP low-latency kernels (unavailable in this build)."""

    name: ClassVar[str] = "deepep_low_latency"
    layout: ClassVar[Layout] = Layout.EXPERT_PADDED
    vendor_module: ClassVar[str] = "deep_ep"
    install_hint: ClassVar[str] = _HINT
