"""Native CPU kernels for the local steps of dispatch and combine (csrc/cpu/kernels).

Routing plans, the EXPERT_PACKED receive layout and weighted row sums, each a single pass in C
over CPU tensors, with bounds checked before anything is written. `available()` says whether
the library is built here; every function has a pure-torch twin (moe_ep.managers.planning,
moe_ep.managers.expert_ops) that the managers use on other devices and the tests compare with.
"""

from moe_ep.kernels.native import (
    DispatchPlanner,
    ExpertCounter,
    KernelError,
    available,
    count_experts,
    gather_rows,
    gather_sum,
    packed_layout,
    plan_dispatch,
    segment_sum,
    small_linear,
)

__all__ = [
    "DispatchPlanner",
    "ExpertCounter",
    "KernelError",
    "available",
    "count_experts",
    "gather_rows",
    "gather_sum",
    "packed_layout",
    "plan_dispatch",
    "segment_sum",
    "small_linear",
]
