"""GroupCoordinator: one process group and the collectives moe_ep needs on it.

Each coordinator owns a gloo `cpu_group` (CPU tensors, Python objects) and a `device_group`
(NCCL on CUDA; the same gloo group on CPU). Names and semantics follow vLLM's
`GroupCoordinator`; ranks passed as `src` / `dst` are ranks *in the group*. A group of one rank
never communicates. On CPU, when every rank of the group is on one node, the shared-memory
collectives of `moe_ep.distributed.shm` replace gloo for the bulk operations.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import secrets
import socket
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

_DEFAULT_TIMEOUT_S = 300.0
# dtypes the shared-memory all-reduce sums natively (in fp32); others go through gloo.
_SHM_REDUCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _TensorMeta:
    """What a receiver needs to allocate a tensor sent by `*_tensor_dict`."""

    device: str  # "cpu" or "cuda"
    dtype: torch.dtype
    shape: tuple[int, ...]


class GroupCoordinator:
    """A process group plus its collectives.

    Must be constructed by every rank of the world with the same `group_ranks`: one
    `torch.distributed` group is created per entry (a collective call), and each rank keeps the
    one it belongs to.

    Args:
        group_ranks: disjoint lists of global ranks, e.g. `[[0, 1], [2, 3]]`; this rank must be in
            exactly one of them.
        name: a label for errors and logs ("tp", "ep", ...).
        use_shm: use shared-memory collectives for CPU groups on one node (gloo otherwise).
        timeout_s: how long a shared-memory wait for a peer may last (default 300 s); the
            managers built on the group use it too.
    """

    def __init__(self, group_ranks: Sequence[Sequence[int]], name: str, *, use_shm: bool = True,
                 timeout_s: float | None = None):
        if not dist.is_initialized():
            raise RuntimeError(
                f"GroupCoordinator({name!r}) needs torch.distributed to be initialised: "
                "call moe_ep.distributed.init_distributed() (or launch with torchrun) first"
            )
        self.name = name
        self.timeout_s = float(timeout_s) if timeout_s is not None else _DEFAULT_TIMEOUT_S
        self.rank = dist.get_rank()
        world = dist.get_world_size()
        groups = _validate_group_ranks(group_ranks, world, self.rank, name)
        # get_backend() says "undefined" after a bare init_process_group() on a CUDA host (NCCL
        # for CUDA tensors) and "cpu:gloo,cuda:nccl" for a multi-backend world: the backend
        # config names NCCL in both cases.
        backend = "nccl" if "nccl" in str(dist.get_backend_config()) else "gloo"
        self.backend = backend
        self.device = _device_for(backend, name)
        self._destroyed = False
        self.ranks: list[int] = []
        self._cpu_group: ProcessGroup | None = None
        self._device_group: ProcessGroup | None = None
        for ranks in groups:
            if len(ranks) == world:
                device_group = dist.group.WORLD
            else:
                device_group = dist.new_group(ranks, backend=backend)
            if backend == "gloo":
                cpu_group = device_group
            else:
                cpu_group = dist.new_group(ranks, backend="gloo")
            if self.rank in ranks:
                self.ranks = list(ranks)
                self._cpu_group, self._device_group = cpu_group, device_group
        self.world_size = len(self.ranks)
        self.rank_in_group = self.ranks.index(self.rank)
        self.first_rank = self.ranks[0]
        self.last_rank = self.ranks[-1]
        self.shm = None
        self.shm = self._create_shm() if use_shm else None
        _LIVE.add(self)

    @property
    def cpu_group(self) -> ProcessGroup:
        """The gloo group (CPU tensors, Python objects)."""
        self._check_alive()
        return self._cpu_group

    @property
    def device_group(self) -> ProcessGroup:
        """The NCCL group on CUDA; the gloo group on CPU."""
        self._check_alive()
        return self._device_group

    def _check_alive(self) -> None:
        # torch.distributed reads group=None as the whole world: a destroyed coordinator must
        # not hand None to a collective.
        if self._destroyed:
            raise RuntimeError(f"GroupCoordinator({self.name!r}) was destroyed; build a new one")

    # ------------------------------------------------------------------ setup
    def _create_shm(self):
        """The shared-memory communicator, when this CPU group lives on one node."""
        if self.world_size == 1 or self.device.type != "cpu":
            return None
        if importlib.util.find_spec("moe_ep.distributed.shm") is None:
            return None
        from moe_ep.distributed.shm import ShmCommunicator, ShmUnavailableError

        # Every rank must take the same decision or the next collective would mismatch, so
        # both inputs are agreed collectively (availability is per host, and a group may span
        # hosts).
        same_node = _same_node_flags(self.cpu_group, self.rank_in_group, 0)
        usable = self.all_gather_object(ShmCommunicator.available()[0])
        if not (all(same_node) and all(usable)):
            return None
        try:
            return ShmCommunicator(self.cpu_group, self.rank_in_group, self.world_size, self.name,
                                   timeout_s=self.timeout_s)
        except ShmUnavailableError:
            # Raised on every rank alike (e.g. /dev/shm full, ranks in separate containers).
            return None

    def destroy(self) -> None:
        """Free the shared-memory segments and the process groups (idempotent)."""
        if self._destroyed:
            return
        self._destroyed = True
        if self.shm is not None:
            self.shm.destroy()
            self.shm = None
        _LIVE.discard(self)
        for group in {id(g): g for g in (self._cpu_group, self._device_group)}.values():
            if group is not None and group is not dist.group.WORLD:
                dist.destroy_process_group(group)
        self._cpu_group = self._device_group = None

    def __repr__(self) -> str:
        return (
            f"GroupCoordinator(name={self.name!r}, ranks={self.ranks}, "
            f"rank_in_group={self.rank_in_group}, device={self.device}, shm={self.shm is not None})"
        )

    # ---------------------------------------------------------------- helpers
    @property
    def is_first_rank(self) -> bool:
        return self.rank == self.first_rank

    @property
    def is_last_rank(self) -> bool:
        return self.rank == self.last_rank

    def _group_for(self, x: torch.Tensor) -> ProcessGroup:
        return self.cpu_group if x.device.type == "cpu" else self.device_group

    def _use_shm(self, x: torch.Tensor) -> bool:
        return self.shm is not None and x.device.type == "cpu"

    def _check_rank(self, value: int, arg: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{self.name}: {arg} must be an int rank in the group, got {value!r}")
        if not 0 <= value < self.world_size:
            raise ValueError(
                f"{self.name}: {arg}={value} is not a rank of this group "
                f"(expected 0 <= {arg} < world_size={self.world_size})"
            )
        return value

    def _check_sizes(self, sizes: Sequence[int] | None, arg: str = "sizes") -> list[int] | None:
        if sizes is None:
            return None
        sizes = list(sizes)
        if len(sizes) != self.world_size or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes
        ):
            raise ValueError(
                f"{self.name}: {arg} must list one int >= 0 per rank "
                f"({self.world_size} entries), got {sizes}"
            )
        return sizes

    # ------------------------------------------------------------ collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` (any shape and dtype) over the group; a new tensor (`x` itself if world 1)."""
        _check_tensor(x, "x", self.name)
        if self.world_size == 1:
            return x
        if self._use_shm(x) and x.dtype in _SHM_REDUCE_DTYPES:
            return self.shm.all_reduce(x.contiguous())
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=self._group_for(x))
        return out

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` (same shape everywhere) along `dim`."""
        _check_tensor(x, "x", self.name)
        dim = _check_dim(x, dim, self.name)
        if self.world_size == 1:
            return x
        parts = self._all_gather_parts(x.contiguous())
        return torch.cat(parts, dim=dim)

    def _all_gather_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's (contiguous) `x`, in rank order; shapes must be equal."""
        if self._use_shm(x):
            return self.shm.all_gather(x)
        if x.device.type == "cuda":
            out = x.new_empty((self.world_size, *x.shape))
            dist.all_gather_into_tensor(out, x, group=self.device_group)
            return list(out.unbind(0))
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.cpu_group)
        return parts

    def all_gatherv(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        dim: int = 0,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """All-gather with per-rank extents along `dim` (`sizes[r]` rows from rank r, 0 allowed).

        `x` may be one tensor or a list (each gathered alike; a list in, a list out). With
        `sizes=None` every rank must send the same shape.
        """
        tensors = [x] if isinstance(x, torch.Tensor) else list(x)
        if not tensors:
            raise ValueError(f"{self.name}: all_gatherv needs at least one tensor")
        for i, t in enumerate(tensors):
            _check_tensor(t, f"x[{i}]", self.name)
        sizes = self._check_sizes(sizes)
        out = []
        for i, t in enumerate(tensors):
            d = _check_dim(t, dim, self.name)
            if sizes is None:
                out.append(self.all_gather(t, d))
                continue
            if t.shape[d] != sizes[self.rank_in_group]:
                raise ValueError(
                    f"{self.name}: x[{i}] has {t.shape[d]} rows along dim {d} but "
                    f"sizes[{self.rank_in_group}]={sizes[self.rank_in_group]}"
                )
            out.append(t if self.world_size == 1 else self._gatherv(t, d, sizes))
        return out[0] if isinstance(x, torch.Tensor) else out

    def _gatherv(self, t: torch.Tensor, dim: int, sizes: list[int]) -> torch.Tensor:
        rows = t.movedim(dim, 0).contiguous()
        if self._use_shm(rows):
            return self.shm.all_gather_flat(rows).movedim(0, dim)
        # torch.distributed all-gathers need equal shapes: pad to the largest extent.
        longest = max(sizes)
        if longest == 0:
            return t.new_empty(t.shape)
        padded = rows.new_zeros((longest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [p[:n] for p, n in zip(self._all_gather_parts(padded), sizes, strict=True)]
        return torch.cat(parts, dim=0).movedim(0, dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Sum `x` over the group and keep this rank's equal slice along `dim`."""
        _check_tensor(x, "x", self.name)
        dim = _check_dim(x, dim, self.name)
        if x.shape[dim] % self.world_size:
            raise ValueError(
                f"{self.name}: reduce_scatter needs x.shape[{dim}]={x.shape[dim]} to be a "
                f"multiple of world_size={self.world_size} (use reduce_scatterv for uneven sizes)"
            )
        return self.reduce_scatterv(x, dim, [x.shape[dim] // self.world_size] * self.world_size)

    def reduce_scatterv(
        self, x: torch.Tensor, dim: int = 0, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Sum `x` over the group and keep this rank's `sizes[rank]` slice along `dim`."""
        _check_tensor(x, "x", self.name)
        dim = _check_dim(x, dim, self.name)
        sizes = self._check_sizes(sizes)
        if sizes is None:
            return self.reduce_scatter(x, dim)
        if sum(sizes) != x.shape[dim]:
            raise ValueError(
                f"{self.name}: sum(sizes)={sum(sizes)} must equal x.shape[{dim}]={x.shape[dim]}"
            )
        if self.world_size == 1:
            return x
        rows = x.movedim(dim, 0).contiguous()
        start = sum(sizes[: self.rank_in_group])
        mine = sizes[self.rank_in_group]
        if rows.device.type == "cuda":
            out = rows.new_empty((mine, *rows.shape[1:]))
            dist.reduce_scatter(out, list(rows.split(sizes)), group=self.device_group)
        elif self._use_shm(rows) and hasattr(self.shm, "reduce_scatter") and (
            rows.dtype in _SHM_REDUCE_DTYPES
        ):
            row_numel = rows[0].numel() if rows.shape[0] else 0
            flat = self.shm.reduce_scatter(rows.reshape(-1), [n * row_numel for n in sizes])
            out = flat.view(mine, *rows.shape[1:])
        else:
            # gloo has no reduce-scatter: sum everything, keep my slice.
            out = self.all_reduce(rows)[start : start + mine]
        return out.movedim(0, dim).contiguous()

    def all_to_all_single(
        self,
        x: torch.Tensor,
        output_split_sizes: Sequence[int] | None = None,
        input_split_sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Rows `x[input_split_sizes[:r].sum() ...]` go to rank r; returns what each rank sent me.

        Args:
            x: `[rows, ...]`, split along dim 0.
            output_split_sizes: rows arriving from each rank (None: equal split).
            input_split_sizes: rows sent to each rank (None: equal split).
        Returns: `[sum(output_split_sizes), ...]`, same dtype and device as `x`.
        """
        _check_tensor(x, "x", self.name)
        if x.dim() == 0:
            raise ValueError(f"{self.name}: all_to_all_single needs x with a row dimension")
        n = x.shape[0]
        sends = self._check_sizes(input_split_sizes, "input_split_sizes")
        recvs = self._check_sizes(output_split_sizes, "output_split_sizes")
        if sends is None:
            if n % self.world_size:
                raise ValueError(
                    f"{self.name}: x has {n} rows, not a multiple of world_size="
                    f"{self.world_size}; pass input_split_sizes"
                )
            sends = [n // self.world_size] * self.world_size
        if sum(sends) != n:
            raise ValueError(
                f"{self.name}: sum(input_split_sizes)={sum(sends)} must equal x.shape[0]={n}"
            )
        if recvs is None:
            if len(set(sends)) > 1:
                raise ValueError(
                    f"{self.name}: pass output_split_sizes when input_split_sizes are uneven "
                    f"({sends}): the rows each rank receives cannot be inferred"
                )
            recvs = [sends[0]] * self.world_size
        if self.world_size == 1:
            return x.clone()
        x = x.contiguous()
        if self._use_shm(x):
            out = self.shm.all_to_all_single(x, sends)
            if out.shape[0] != sum(recvs):
                raise RuntimeError(
                    f"{self.name}: all_to_all_single expected {sum(recvs)} rows in all "
                    f"(output_split_sizes={recvs}), got {out.shape[0]}"
                )
            return out
        out = x.new_empty((sum(recvs), *x.shape[1:]))
        dist.all_to_all_single(out, x, recvs, sends, group=self._group_for(x))
        return out

    def gather(self, x: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's `x` along `dim` on rank `dst`; None on the other ranks."""
        _check_tensor(x, "x", self.name)
        dim = _check_dim(x, dim, self.name)
        self._check_rank(dst, "dst")
        if self.world_size == 1:
            return x
        x = x.contiguous()
        if self._use_shm(x):
            parts = self.shm.gather(x, dst)
        else:
            mine = self.rank_in_group == dst
            parts = [torch.empty_like(x) for _ in range(self.world_size)] if mine else None
            dist.gather(x, parts, dst=self.ranks[dst], group=self._group_for(x))
        return None if parts is None else torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `x` on every rank with rank `src`'s `x` (in place; returns `x`)."""
        _check_tensor(x, "x", self.name)
        self._check_rank(src, "src")
        if self.world_size == 1:
            return x
        if not x.is_contiguous():
            raise ValueError(f"{self.name}: broadcast writes in place and needs a contiguous x")
        dist.broadcast(x, src=self.ranks[src], group=self._group_for(x))
        return x

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank `src`'s picklable `obj` on every rank."""
        self._check_rank(src, "src")
        if self.world_size == 1:
            return obj
        box = [obj if self.rank_in_group == src else None]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast_tensor_dict(
        self, tensor_dict: dict[str, Any] | None = None, src: int = 0
    ) -> dict[str, Any]:
        """Rank `src`'s dict on every rank.

        Top-level tensor values (CPU or device, empty allowed) travel as tensors on the group of
        their device; every other value (nested lists / dicts / strings) is pickled with the
        metadata. The receivers allocate CPU tensors on CPU and device tensors on `self.device`.
        """
        self._check_rank(src, "src")
        if self.world_size == 1:
            return tensor_dict
        if self.rank_in_group == src:
            metadata, tensors = _split_tensor_dict(tensor_dict, self.name)
            self.broadcast_object(metadata, src)
            for t in tensors:
                if t.numel():
                    dist.broadcast(t, src=self.ranks[src], group=self._group_for(t))
            return tensor_dict
        metadata = self.broadcast_object(None, src)
        out, tensors = self._allocate(metadata)
        for t in tensors:
            if t.numel():
                dist.broadcast(t, src=self.ranks[src], group=self._group_for(t))
        return out

    def send_tensor_dict(self, tensor_dict: dict[str, Any], dst: int) -> None:
        """Send a dict (like `broadcast_tensor_dict`) to `dst`; it calls `recv_tensor_dict`."""
        self._check_peer(dst, "dst")
        metadata, tensors = _split_tensor_dict(tensor_dict, self.name)
        dist.send_object_list([metadata], dst=self.ranks[dst], group=self.cpu_group)
        cpu = [t for t in tensors if t.device.type == "cpu" and t.numel()]
        if self.shm is not None:
            self.shm.send_tensor_list(cpu, dst)
        else:
            for t in cpu:
                dist.send(t, dst=self.ranks[dst], group=self.cpu_group)
        for t in tensors:
            if t.device.type != "cpu" and t.numel():
                dist.send(t, dst=self.ranks[dst], group=self.device_group)

    def recv_tensor_dict(self, src: int) -> dict[str, Any]:
        """Receive the dict rank `src` sent with `send_tensor_dict`."""
        self._check_peer(src, "src")
        box = [None]
        dist.recv_object_list(box, src=self.ranks[src], group=self.cpu_group)
        out, tensors = self._allocate(box[0])
        cpu = [t for t in tensors if t.device.type == "cpu" and t.numel()]
        if self.shm is not None:
            received = self.shm.recv_tensor_list(src)
            if [r.shape for r in received] != [t.shape for t in cpu]:
                raise RuntimeError(
                    f"{self.name}: recv_tensor_dict got tensors that do not match the metadata"
                )
            for t, r in zip(cpu, received, strict=True):
                t.copy_(r)
        else:
            for t in cpu:
                dist.recv(t, src=self.ranks[src], group=self.cpu_group)
        for t in tensors:
            if t.device.type != "cpu" and t.numel():
                dist.recv(t, src=self.ranks[src], group=self.device_group)
        return out

    def barrier(self) -> None:
        """Wait until every rank of the group reaches this point."""
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)

    # ---------------------------------------------------------------- private
    def _check_peer(self, peer: int, arg: str) -> None:
        self._check_rank(peer, arg)
        if peer == self.rank_in_group:
            raise ValueError(f"{self.name}: {arg}={peer} is this rank; pick another rank")

    def _allocate(self, metadata: list[tuple[str, Any]]) -> tuple[dict[str, Any], list]:
        out: dict[str, Any] = {}
        tensors = []
        for key, value in metadata:
            if isinstance(value, _TensorMeta):
                device = "cpu" if value.device == "cpu" else self.device
                value = torch.empty(value.shape, dtype=value.dtype, device=device)
                tensors.append(value)
            out[key] = value
        return out, tensors


# -------------------------------------------------------------------- functions
def in_the_same_node_as(group: GroupCoordinator, source_rank: int = 0) -> list[bool]:
    """For each rank of `group`, whether it shares a node with rank `source_rank` (collective)."""
    group._check_rank(source_rank, "source_rank")
    if group.world_size == 1:
        return [True]
    return _same_node_flags(group.cpu_group, group.rank_in_group, source_rank, group.ranks)


def _same_node_flags(
    cpu_group: ProcessGroup, rank_in_group: int, source: int, ranks: list[int] | None = None
) -> list[bool]:
    """The source creates a small shared-memory file; the ranks that can read it share its node.

    Host names are not enough: containers on one host may report different names yet share
    memory, and two hosts may share a name.
    """
    ranks = ranks if ranks is not None else dist.get_process_group_ranks(cpu_group)
    magic = secrets.token_bytes(16)
    path = None
    if rank_in_group == source:
        try:
            path = f"/dev/shm/moe_ep_probe_{os.getpid()}_{secrets.token_hex(8)}"
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(magic)
        except OSError:
            # No usable /dev/shm: must not raise before the collective below (the peers would
            # wait forever); they compare host names instead.
            path = None
        box = [(path, magic, socket.gethostname())]
    else:
        box = [None]
    try:
        dist.broadcast_object_list(box, src=ranks[source], group=cpu_group)
        probe, expected, host = box[0]
        if rank_in_group == source:
            mine = True
        elif probe is None:
            mine = socket.gethostname() == host
        else:
            try:
                with open(probe, "rb") as f:
                    mine = f.read(len(expected)) == expected
            except OSError:
                mine = False
        flags: list[Any] = [None] * len(ranks)
        dist.all_gather_object(flags, mine, group=cpu_group)
    finally:
        if path is not None:
            os.unlink(path)
    return [bool(f) for f in flags]


def _validate_group_ranks(
    group_ranks: Sequence[Sequence[int]], world: int, rank: int, name: str
) -> list[list[int]]:
    try:
        groups = [[int(r) for r in ranks] for ranks in group_ranks]
    except TypeError as e:
        raise TypeError(
            f"GroupCoordinator({name!r}): group_ranks must be a list of lists of ints, "
            f"got {group_ranks!r}"
        ) from e
    seen: set[int] = set()
    for ranks in groups:
        if not ranks:
            raise ValueError(f"GroupCoordinator({name!r}): group_ranks contains an empty group")
        bad = [r for r in ranks if not 0 <= r < world]
        if bad:
            raise ValueError(
                f"GroupCoordinator({name!r}): ranks {bad} are outside the world [0, {world})"
            )
        dup = seen.intersection(ranks) | {r for r in ranks if ranks.count(r) > 1}
        if dup:
            raise ValueError(
                f"GroupCoordinator({name!r}): ranks {sorted(dup)} appear in more than one group"
            )
        seen.update(ranks)
    if rank not in seen:
        raise ValueError(
            f"GroupCoordinator({name!r}): this rank ({rank}) is in none of the groups {groups}"
        )
    return groups


def _check_tensor(x: Any, arg: str, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(x).__name__}")


def _check_dim(x: torch.Tensor, dim: int, name: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name}: dim must be an int, got {dim!r}")
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least one dimension, got a 0-dim tensor")
    if not -x.dim() <= dim < max(x.dim(), 1):
        raise ValueError(
            f"{name}: dim={dim} is out of range for a tensor of shape {tuple(x.shape)}"
        )
    return dim % max(x.dim(), 1)


def _split_tensor_dict(
    tensor_dict: dict[str, Any], name: str
) -> tuple[list[tuple[str, Any]], list[torch.Tensor]]:
    """Metadata (tensors replaced by `_TensorMeta`) and the contiguous tensors, in key order."""
    if not isinstance(tensor_dict, dict):
        raise TypeError(f"{name}: tensor_dict must be a dict, got {type(tensor_dict).__name__}")
    metadata: list[tuple[str, Any]] = []
    tensors: list[torch.Tensor] = []
    for key, value in tensor_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"{name}: tensor_dict keys must be str, got {key!r}")
        if isinstance(value, torch.Tensor):
            device = "cpu" if value.device.type == "cpu" else "cuda"
            metadata.append((key, _TensorMeta(device, value.dtype, tuple(value.shape))))
            tensors.append(value.contiguous())
        else:
            try:
                pickle.dumps(value)
            except Exception as e:
                raise TypeError(
                    f"{name}: tensor_dict[{key!r}] is neither a tensor nor picklable: {e}"
                ) from e
            metadata.append((key, value))
    return metadata, tensors


# Coordinators not yet destroyed in this process (the test harness destroys leftovers).
_LIVE: weakref.WeakSet[GroupCoordinator] = weakref.WeakSet()


def destroy_live_groups() -> None:
    """Destroy every GroupCoordinator of this process that is still alive."""
    for group in list(_LIVE):
        group.destroy()


def _device_for(backend: str, name: str) -> torch.device:
    if backend != "nccl":
        return torch.device("cpu")
    device = torch.cuda.current_device()
    local = os.environ.get("LOCAL_RANK")
    if local is not None and device != int(local) % torch.cuda.device_count():
        # Otherwise every rank silently sits on cuda:0 and NCCL fails much later.
        raise RuntimeError(
            f"GroupCoordinator({name!r}): the current CUDA device is cuda:{device} but "
            f"LOCAL_RANK={local}; call torch.cuda.set_device(local_rank) before creating groups "
            "(moe_ep.distributed.init_distributed does)"
        )
    return torch.device("cuda", device)
