"""Process groups, collectives and topology."""

from moe_ep.distributed.group import GroupCoordinator, in_the_same_node_as
from moe_ep.distributed.state import (
    ParallelGroups,
    destroy_model_parallel,
    get_dp_group,
    get_ep_group,
    get_parallel_groups,
    get_pp_group,
    get_tp_group,
    get_world_group,
    group_layout,
    init_distributed,
    initialize_model_parallel,
    model_parallel_is_initialized,
)
from moe_ep.distributed.topology import Topology

__all__ = [
    "GroupCoordinator",
    "ParallelGroups",
    "Topology",
    "destroy_model_parallel",
    "get_dp_group",
    "get_ep_group",
    "get_parallel_groups",
    "get_pp_group",
    "get_tp_group",
    "get_world_group",
    "group_layout",
    "in_the_same_node_as",
    "init_distributed",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
]
