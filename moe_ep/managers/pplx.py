"""pplx-kernels backend (``pplx``): placeholder.

Registered so configs can name it and ``available_managers()`` can say why it cannot run: it
needs the ``pplx_kernels`` package (not on PyPI: built from source against CUDA and, across
nodes, NVSHMEM) and CUDA devices, and the moe_ep adapter is not written yet.
``availability()`` reports which of these is missing; building it raises
:class:`~moe_ep.managers.contract.ManagerUnavailableError`. There is no fallback implementation.

When the adapter lands it returns EXPERT_PADDED ``[E_local, dp * max, H]`` with a weighted
combine and int32 ids (REFERENCE.md, "pplx-kernels").
"""

from __future__ import annotations

from typing import ClassVar

from moe_ep.managers.contract import Layout
from moe_ep.managers.vendor import VendorBackendPlaceholder

__all__ = ["PplxManager"]


class PplxManager(VendorBackendPlaceholder):
    """``pplx``: pplx-kernels AllToAll (unavailable in this build)."""

    name: ClassVar[str] = "pplx"
    layout: ClassVar[Layout] = Layout.EXPERT_PADDED
    vendor_module: ClassVar[str] = "pplx_kernels"
    install_hint: ClassVar[str] = "build pplx-kernels from source on a CUDA machine"
