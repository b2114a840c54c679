"""All2All managers: one dispatch / combine contract, many backends.

Backends are reached through the registry (:func:`build_manager`, :func:`available_managers`);
importing this package imports no backend module.
"""

from moe_ep.managers.base import (
    All2AllManager,
    DispatchResult,
    ExpertPlacement,
    GatheredTokens,
    Layout,
    ManagerUnavailableError,
    RemoteInputError,
    WireBytes,
    apply_experts,
    check_dispatch_inputs,
    expert_placement,
)
from moe_ep.managers.cache import HandleCache
from moe_ep.managers.registry import (
    available_managers,
    build_manager,
    get_manager_class,
    known_managers,
    resolve_name,
)

__all__ = [
    "All2AllManager",
    "DispatchResult",
    "ExpertPlacement",
    "GatheredTokens",
    "HandleCache",
    "Layout",
    "ManagerUnavailableError",
    "RemoteInputError",
    "WireBytes",
    "apply_experts",
    "available_managers",
    "build_manager",
    "check_dispatch_inputs",
    "expert_placement",
    "get_manager_class",
    "known_managers",
    "resolve_name",
]
