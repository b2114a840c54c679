"""All2All managers: one dispatch / combine contract, many backends.

Backends are reached through the registry (`build_manager`, `available_managers`); importing
this package imports no backend module. Modules by concern: `contract` (types, errors, the
ABC), `placement`, `inputs` (local checks), `protocol` (the per-call exchange), `planning`
(pure routing planners), `accounting` (wire bytes), `expert_ops` (`apply_experts`, row sums),
`cache`, `registry`, and one module per backend.
"""

from moe_ep.managers.accounting import WireBytes
from moe_ep.managers.cache import HandleCache
from moe_ep.managers.contract import (
    All2AllManager,
    CallMismatchError,
    DispatchResult,
    EPHandle,
    EPSpec,
    GatheredTokens,
    Layout,
    ManagerUnavailableError,
    RemoteInputError,
)
from moe_ep.managers.expert_ops import apply_experts
from moe_ep.managers.placement import ExpertPlacement, expert_placement
from moe_ep.managers.registry import (
    available_managers,
    build_manager,
    get_manager_class,
    known_managers,
    resolve_name,
)

__all__ = [
    "All2AllManager",
    "CallMismatchError",
    "DispatchResult",
    "EPHandle",
    "EPSpec",
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
    "expert_placement",
    "get_manager_class",
    "known_managers",
    "resolve_name",
]
