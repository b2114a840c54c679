"""Process groups, collectives, topology, and the KV pipe.

`GroupCoordinator` (one group, vLLM's collective names) delegates to one communicator per
transport (`moe_ep.distributed.communicators`); `initialize_model_parallel` builds the default
groups, which the getters and the `tensor_model_parallel_*` functions use.
"""

from moe_ep.cpu_allocator import set_retain_freed_memory
from moe_ep.distributed.communicators import DeviceCommunicatorBase
from moe_ep.distributed.group import GroupCoordinator, in_the_same_node_as
from moe_ep.distributed.kv_pipe import GroupKVPipe, KVPipeBase, KVPipeError, TCPKVPipe
from moe_ep.distributed.state import (
    ParallelGroups,
    broadcast_tensor_dict,
    destroy_model_parallel,
    get_dp_group,
    get_ep_group,
    get_parallel_groups,
    get_pp_group,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    get_tp_group,
    get_world_group,
    group_layout,
    init_distributed,
    initialize_model_parallel,
    model_parallel_is_initialized,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
    tensor_model_parallel_gather,
    tensor_model_parallel_reduce_scatter,
)
from moe_ep.distributed.topology import Topology

__all__ = [
    "DeviceCommunicatorBase",
    "GroupCoordinator",
    "GroupKVPipe",
    "KVPipeBase",
    "KVPipeError",
    "ParallelGroups",
    "TCPKVPipe",
    "Topology",
    "broadcast_tensor_dict",
    "destroy_model_parallel",
    "get_dp_group",
    "get_ep_group",
    "get_parallel_groups",
    "get_pp_group",
    "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "get_tp_group",
    "get_world_group",
    "group_layout",
    "in_the_same_node_as",
    "init_distributed",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "set_retain_freed_memory",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
    "tensor_model_parallel_gather",
    "tensor_model_parallel_reduce_scatter",
]
