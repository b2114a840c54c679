"""Registered backends whose adapter cannot run in this build: `VendorBackendPlaceholder`.

`availability` reports the true reasons (package not installed, no CUDA, adapter not written);
constructing one raises `ManagerUnavailableError`. There is no fallback implementation behind
the name. Vendor packages are looked for with `importlib.util.find_spec`, never imported.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import torch

from moe_ep.managers.contract import All2AllManager, Layout, ManagerUnavailableError

__all__ = ["VendorBackendPlaceholder"]


class VendorBackendPlaceholder(All2AllManager):
    """A registered backend whose adapter cannot run here (see the module docstring)."""

    layout: ClassVar[Layout] = Layout.TOKEN
    #: importable top-level module of the vendor package (checked without importing it).
    vendor_module: ClassVar[str] = ""
    #: how to get the package, for the message.
    install_hint: ClassVar[str] = ""

    @classmethod
    def _reasons(cls, device_type: str) -> list[str]:
        reasons = []
        if cls.vendor_module and importlib.util.find_spec(cls.vendor_module) is None:
            hint = f" ({cls.install_hint})" if cls.install_hint else ""
            reasons.append(f"{cls.vendor_module} is not installed{hint}")
        if device_type != "cuda":
            reasons.append(f"needs CUDA devices (this topology's device is {device_type!r})")
        reasons.append("the moe_ep adapter for this backend is not implemented yet")
        return reasons

    @classmethod
    def availability(cls, topology: Any) -> tuple[bool, str]:
        return False, "; ".join(cls._reasons(str(topology.device)))

    def __init__(self, group: Any, **options: Any) -> None:
        device_type = torch.device(group.device).type
        raise ManagerUnavailableError(
            f"manager {self.name!r} is unavailable: {'; '.join(self._reasons(device_type))}"
        )

    def _dispatch(self, call, handle, checked, error):  # pragma: no cover - never built
        raise ManagerUnavailableError(f"manager {self.name!r} is unavailable")

    def _combine(self, call, state, expert_out, error):  # pragma: no cover - never built
        raise ManagerUnavailableError(f"manager {self.name!r} is unavailable")
