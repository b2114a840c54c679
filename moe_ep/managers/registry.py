"""Backend registry: name -> manager class, availability with reasons, ``build_manager``.

Entries are lazy import paths (``"module:Class"``): importing this module imports no backend,
and asking about one backend imports only its module, so vendor packages are touched only by
the backend that needs them (and the placeholders only look for them with
``importlib.util.find_spec``). Names follow vLLM; ``agrs`` is an alias of
``allgather_reducescatter``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from moe_ep.managers.contract import All2AllManager

if TYPE_CHECKING:
    from moe_ep.distributed.group import GroupCoordinator
    from moe_ep.distributed.topology import Topology

__all__ = [
    "ALIASES",
    "MANAGERS",
    "available_managers",
    "build_manager",
    "get_manager_class",
    "known_managers",
    "options_class",
    "resolve_name",
]

#: Canonical name -> "module:Class".
MANAGERS: Mapping[str, str] = {
    "naive": "moe_ep.managers.naive:NaiveAll2AllManager",
    "allgather_reducescatter": "moe_ep.managers.agrs:AgRsAll2AllManager",
    "alltoallv": "moe_ep.managers.alltoallv:AllToAllVManager",
    "shm": "moe_ep.managers.shm:ShmAll2AllManager",
    "deepep_high_throughput": "moe_ep.managers.deepep:DeepEPHighThroughputManager",
    "deepep_low_latency": "moe_ep.managers.deepep:DeepEPLowLatencyManager",
    "pplx": "moe_ep.managers.pplx:PplxManager",
    "flashinfer_all2allv": "moe_ep.managers.flashinfer:FlashInferAll2AllVManager",
}

#: Alias -> canonical name.
ALIASES: Mapping[str, str] = {"agrs": "allgather_reducescatter"}

#: Canonical name -> its options dataclass in `moe_ep.managers.options` (None: the backend is
#: a placeholder whose options are not declared yet). Configs check options through this,
#: importing no backend module.
OPTIONS: Mapping[str, str | None] = {
    "naive": "NoOptions",
    "allgather_reducescatter": "NoOptions",
    "alltoallv": "AllToAllVOptions",
    "shm": "ShmAll2AllOptions",
    "deepep_high_throughput": None,
    "deepep_low_latency": None,
    "pplx": None,
    "flashinfer_all2allv": None,
}


class _BackendModuleMissing(ImportError):
    """The backend's own module is not part of this build."""


def known_managers() -> tuple[str, ...]:
    """Canonical backend names, in registry order (aliases excluded)."""
    return tuple(MANAGERS)


def resolve_name(name: str) -> str:
    """Return the canonical name for ``name`` (an alias or a canonical name).

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: unknown name; the message lists the known names and aliases.
    """
    if not isinstance(name, str):
        raise TypeError(f"manager name must be a str, got {type(name).__name__}")
    canonical = ALIASES.get(name, name)
    if canonical not in MANAGERS:
        aliases = ", ".join(f"{a} -> {c}" for a, c in ALIASES.items())
        raise ValueError(
            f"unknown all2all manager {name!r}; known managers: {', '.join(MANAGERS)} "
            f"(aliases: {aliases})"
        )
    return canonical


def options_class(name: str) -> type | None:
    """The options dataclass of backend `name` (or its alias), without importing the backend;
    None when the backend declares none yet (a placeholder)."""
    from moe_ep.managers import options

    class_name = OPTIONS.get(resolve_name(name))
    return None if class_name is None else getattr(options, class_name)


def get_manager_class(name: str) -> type[All2AllManager]:
    """Import and return the class registered under ``name`` (or its alias).

    Raises:
        ValueError: unknown name.
        ImportError: the backend's module is missing from this build or fails to import.
    """
    canonical = resolve_name(name)
    module_name, _, class_name = MANAGERS[canonical].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise _BackendModuleMissing(
                f"manager {canonical!r}: module {module_name} is not present in this build"
            ) from exc
        raise
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, All2AllManager)):
        raise TypeError(f"{MANAGERS[canonical]} is not an All2AllManager subclass")
    return cls


def build_manager(name: str, group: GroupCoordinator, **options: Any) -> All2AllManager:
    """Build the manager registered under ``name`` on ``group`` with ``options``.

    Every rank of ``group`` must call it with the same name and options.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        TypeError: an option the backend does not accept (the message lists the allowed ones).
        ImportError: the backend's module is missing or fails to import.
        ManagerUnavailableError: the backend cannot run here (vendor placeholders).
    """
    return get_manager_class(name)(group, **options)


def available_managers(topology: Topology | None = None) -> dict[str, tuple[bool, str]]:
    """``{name: (ok, reason)}`` for every registered backend on ``topology``.

    Args:
        topology: what to judge against; None means ``Topology.detect()`` of this process
            (no collective).

    A backend whose module is missing or fails to import is reported unavailable with that
    reason; nothing raises.
    """
    if topology is None:
        from moe_ep.distributed.topology import Topology

        topology = Topology.detect()
    report: dict[str, tuple[bool, str]] = {}
    for name in MANAGERS:
        try:
            cls = get_manager_class(name)
        except _BackendModuleMissing as exc:
            report[name] = (False, str(exc).split(": ", 1)[1])
            continue
        except Exception as exc:  # noqa: BLE001 - a broken backend must not hide the others
            report[name] = (False, f"import failed: {type(exc).__name__}: {exc}")
            continue
        try:
            ok, reason = cls.availability(topology)
        except Exception as exc:  # noqa: BLE001 - reported as the reason
            ok, reason = False, f"availability check failed: {type(exc).__name__}: {exc}"
        report[name] = (bool(ok), str(reason))
    return report
