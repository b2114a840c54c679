"""moe_ep: Mixture-of-Experts expert-parallel dispatch and combine."""

__version__ = "0.1.0"

from moe_ep.config import build_manager_from_config, load_config, select  # noqa: E402
from moe_ep.distributed import (  # noqa: E402
    GroupCoordinator,
    ParallelGroups,
    Topology,
    destroy_model_parallel,
    init_distributed,
    initialize_model_parallel,
)
from moe_ep.layer import FusedMoE  # noqa: E402
from moe_ep.managers import (  # noqa: E402
    All2AllManager,
    DispatchResult,
    Layout,
    apply_experts,
    available_managers,
    build_manager,
    expert_placement,
)

__all__ = [
    "All2AllManager",
    "DispatchResult",
    "FusedMoE",
    "GroupCoordinator",
    "Layout",
    "ParallelGroups",
    "Topology",
    "__version__",
    "apply_experts",
    "available_managers",
    "build_manager",
    "build_manager_from_config",
    "destroy_model_parallel",
    "expert_placement",
    "init_distributed",
    "initialize_model_parallel",
    "load_config",
    "select",
]
