"""FlashInfer MNNVL all-to-all-v backend (``flashinfer_all2allv``): placeholder.

Registered so configs can name it and ``available_managers()`` can say why it cannot run: it
needs the ``flashinfer`` package and CUDA devices with fabric-handle symmetric memory
(GB200/GB300 NVL72 with IMEX, or the same-host POSIX-fd fallback), and the moe_ep adapter is
not written yet. ``availability()`` reports which of these is missing; building it raises
:class:`~moe_ep.managers.contract.ManagerUnavailableError`. There is no fallback implementation.
"""

from __future__ import annotations

from typing import ClassVar

from moe_ep.managers.contract import Layout
from moe_ep.managers.vendor import VendorBackendPlaceholder

__all__ = ["FlashInferAll2AllVManager"]


class FlashInferAll2AllVManager(VendorBackendPlaceholder):
    """``flashinfer_all2allv``: FlashInfer MNNVL MoE all-to-all (unavailable in this build)."""

    name: ClassVar[str] = "flashinfer_all2allv"
    layout: ClassVar[Layout] = Layout.EXPERT_PADDED
    vendor_module: ClassVar[str] = "flashinfer"
    install_hint: ClassVar[str] = "pip install flashinfer-python on a CUDA machine"
