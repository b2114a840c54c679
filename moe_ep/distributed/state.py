"""Process start-up and the default TP / PP / DP / EP groups.

Rank layout follows vLLM: `arange(world).reshape(DP, PP, TP)`; a TP group is TP consecutive
ranks, PP groups stride by TP, DP groups stride by PP x TP, and an EP group is the DP x TP ranks of
one pipeline stage. Managers and layers take their group explicitly; the getters below are a
convenience for code that runs inside one model-parallel job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moe_ep.distributed.group import GroupCoordinator


def under_torchrun() -> bool:
    """True when launched by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


_BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class ParallelGroups:
    """The groups this rank belongs to."""

    world: GroupCoordinator
    tp: GroupCoordinator
    pp: GroupCoordinator
    dp: GroupCoordinator
    ep: GroupCoordinator

    def destroy(self) -> None:
        """Destroy every group, even if one fails; then raise the first failure."""
        first: BaseException | None = None
        for group in (self.ep, self.dp, self.pp, self.tp, self.world):
            try:
                group.destroy()
            except Exception as e:  # noqa: PERF203 - keep destroying the others
                first = first or e
        if first is not None:
            raise first


_GROUPS: ParallelGroups | None = None


def init_distributed(
    world_size: int | None = None,
    rank: int | None = None,
    *,
    init_method: str | None = None,
    local_rank: int | None = None,
    backend: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
) -> None:
    """Initialise `torch.distributed` (no-op when it already is).

    Arguments left as None come from torchrun's environment (`WORLD_SIZE`, `RANK`,
    `LOCAL_RANK`, `MASTER_ADDR` / `MASTER_PORT` for `init_method="env://"`). The backend defaults
    to NCCL when CUDA is available and gloo otherwise; with NCCL the current CUDA device is set
    to `local_rank`.
    """
    if dist.is_initialized():
        return
    world_size = _int_from(world_size, "world_size", "WORLD_SIZE")
    rank = _int_from(rank, "rank", "RANK")
    local_rank = _int_from(local_rank, "local_rank", "LOCAL_RANK", default=rank)
    if world_size < 1:
        raise ValueError(f"init_distributed: world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"init_distributed: rank must be in [0, {world_size}), got {rank}")
    if local_rank < 0:
        raise ValueError(f"init_distributed: local_rank must be >= 0, got {local_rank}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in _BACKENDS:
        raise ValueError(f"init_distributed: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("init_distributed: backend='nccl' needs CUDA, none is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if init_method is None:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(
                "init_distributed: pass init_method (e.g. 'tcp://127.0.0.1:29500') or set "
                f"{' and '.join(missing)} (torchrun does)"
            )
        init_method = "env://"
    if not isinstance(timeout, timedelta):
        raise TypeError(f"init_distributed: timeout must be a datetime.timedelta, got {timeout!r}")
    dist.init_process_group(
        backend, init_method=init_method, world_size=world_size, rank=rank, timeout=timeout
    )


def group_layout(
    world_size: int,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    data_parallel_size: int | None = None,
) -> dict[str, list[list[int]]]:
    """The rank lists of every TP, PP, DP and EP group (pure; no communication).

    Returns: `{"tp": [...], "pp": [...], "dp": [...], "ep": [...]}`, each a list of groups.
    """
    for arg, value in (
        ("world_size", world_size),
        ("tensor_parallel_size", tensor_parallel_size),
        ("pipeline_parallel_size", pipeline_parallel_size),
        ("data_parallel_size", data_parallel_size),
    ):
        if value is None and arg == "data_parallel_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel_size ({tp}) x "
            f"pipeline_parallel_size ({pp}) = {tp * pp}"
        )
    dp = world_size // (tp * pp) if data_parallel_size is None else data_parallel_size
    if tp * pp * dp != world_size:
        raise ValueError(
            f"tensor_parallel_size ({tp}) x pipeline_parallel_size ({pp}) x data_parallel_size "
            f"({dp}) = {tp * pp * dp} must equal the world size {world_size}"
        )
    layout = torch.arange(world_size).reshape(dp, pp, tp)
    return {
        "tp": layout.reshape(-1, tp).tolist(),
        "pp": layout.transpose(1, 2).reshape(-1, pp).tolist(),
        "dp": layout.transpose(0, 2).reshape(-1, dp).tolist(),
        "ep": layout.transpose(0, 1).reshape(-1, dp * tp).tolist(),
    }


def initialize_model_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    data_parallel_size: int | None = None,
    *,
    use_shm: bool = True,
    use_custom_allreduce: bool = True,
    timeout_s: float | None = None,
) -> ParallelGroups:
    """Create the world, TP, PP, DP and EP groups (collective over the world) and return mine.

    `data_parallel_size` defaults to world / (TP x PP). `use_shm=False` keeps every CPU group on
    gloo instead of the shared-memory collectives; `use_custom_allreduce=False` keeps CUDA
    all-reduces on NCCL. `timeout_s` bounds every wait of every group (None: the world's timeout,
    `init_distributed(timeout=...)`). Under torchrun (RANK / WORLD_SIZE set) it initialises
    `torch.distributed` itself when nobody has.
    """
    global _GROUPS
    if not dist.is_initialized():
        if under_torchrun():
            # Initialise from torchrun's environment, as the README's snippet promises.
            init_distributed()
        else:
            raise RuntimeError(
                "initialize_model_parallel: torch.distributed is not initialised; call "
                "moe_ep.distributed.init_distributed(world_size=..., rank=..., init_method=...) "
                "first (under torchrun this happens on its own)"
            )
    if _GROUPS is not None:
        raise RuntimeError(
            "initialize_model_parallel was already called; call destroy_model_parallel() first"
        )
    world = dist.get_world_size()
    layout = group_layout(world, tensor_parallel_size, pipeline_parallel_size, data_parallel_size)
    built: dict[str, GroupCoordinator] = {}
    try:
        opts = {
            "use_shm": use_shm, "use_custom_allreduce": use_custom_allreduce,
            "timeout_s": timeout_s,
        }
        built["world"] = GroupCoordinator([list(range(world))], "world", **opts)
        for name in ("tp", "pp", "dp", "ep"):
            built[name] = GroupCoordinator(layout[name], name, **opts)
    except BaseException:
        for group in built.values():
            group.destroy()
        raise
    _GROUPS = ParallelGroups(**built)
    return _GROUPS


def model_parallel_is_initialized() -> bool:
    return _GROUPS is not None


def destroy_model_parallel() -> None:
    """Destroy the default groups (idempotent)."""
    global _GROUPS
    groups, _GROUPS = _GROUPS, None
    if groups is not None:
        groups.destroy()


def get_parallel_groups(caller: str = "get_parallel_groups") -> ParallelGroups:
    if _GROUPS is None:
        raise RuntimeError(
            f"{caller}: model parallel groups are not initialised; call "
            "moe_ep.distributed.initialize_model_parallel() first (after init_distributed() or "
            "under torchrun)"
        )
    return _GROUPS


def get_world_group() -> GroupCoordinator:
    return get_parallel_groups("get_world_group").world


def get_tp_group() -> GroupCoordinator:
    return get_parallel_groups("get_tp_group").tp


def get_pp_group() -> GroupCoordinator:
    return get_parallel_groups("get_pp_group").pp


def get_dp_group() -> GroupCoordinator:
    return get_parallel_groups("get_dp_group").dp


def get_ep_group() -> GroupCoordinator:
    return get_parallel_groups("get_ep_group").ep


# ------------------------------------------- vLLM's module-level names, on the default TP group
def get_tensor_model_parallel_group() -> GroupCoordinator:
    """The default TP group (vLLM's alias of `get_tp_group`)."""
    return get_parallel_groups("get_tensor_model_parallel_group").tp


def get_tensor_model_parallel_world_size() -> int:
    return get_parallel_groups("get_tensor_model_parallel_world_size").tp.world_size


def get_tensor_model_parallel_rank() -> int:
    return get_parallel_groups("get_tensor_model_parallel_rank").tp.rank_in_group


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the TP group (`GroupCoordinator.all_reduce`: a new tensor, `x` itself
    when TP is 1)."""
    return get_parallel_groups("tensor_model_parallel_all_reduce").tp.all_reduce(x)


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every TP rank's `x` (same shape) concatenated along `dim`."""
    return get_parallel_groups("tensor_model_parallel_all_gather").tp.all_gather(x, dim)


def tensor_model_parallel_reduce_scatter(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The TP sum of `x`, this rank's equal slice along `dim` (`x.shape[dim]` divisible by TP)."""
    return get_parallel_groups("tensor_model_parallel_reduce_scatter").tp.reduce_scatter(x, dim)


def tensor_model_parallel_gather(
    x: torch.Tensor, dst: int = 0, dim: int = -1
) -> torch.Tensor | None:
    """Every TP rank's `x` concatenated along `dim` on TP rank `dst`; None elsewhere."""
    return get_parallel_groups("tensor_model_parallel_gather").tp.gather(x, dst, dim)


def broadcast_tensor_dict(
    tensor_dict: dict[str, Any] | None = None, src: int = 0
) -> dict[str, Any]:
    """TP rank `src`'s dict on every TP rank (`GroupCoordinator.broadcast_tensor_dict`)."""
    return get_parallel_groups("broadcast_tensor_dict").tp.broadcast_tensor_dict(tensor_dict, src)


def _int_from(value: int | None, arg: str, env: str, default: int | None = None) -> int:
    if value is None:
        if env in os.environ:
            try:
                return int(os.environ[env])
            except ValueError:
                raise ValueError(
                    f"init_distributed: environment variable {env}={os.environ[env]!r} "
                    "is not an int"
                ) from None
        if default is not None:
            return default
        raise ValueError(
            f"init_distributed: pass {arg}= or set the environment variable {env} (torchrun does)"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"init_distributed: {arg} must be an int, got {value!r}")
    return value
