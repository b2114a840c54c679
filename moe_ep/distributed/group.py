"""GroupCoordinator: one process group and the collectives moe_ep needs on it.

Each coordinator owns a gloo `cpu_group` (CPU tensors, Python objects) and a `device_group`
(NCCL on CUDA; the same gloo group on CPU). Names and semantics follow vLLM's
`GroupCoordinator`; ranks passed as `src` / `dst` are ranks *in the group*. A group of one rank
never communicates.

At construction (collective over the group) it decides `same_node`, then picks one
communicator for CPU tensors (shared memory when every rank is on one node and the native
library loads, gloo otherwise) and one for device tensors (NCCL + custom all-reduce on CUDA),
and logs why (`moe_ep.distributed.group`). Every collective validates its arguments here, with
errors that name the argument, and delegates to the communicator of the tensor's device; the
transports' own rules live in `moe_ep.distributed.communicators`. Every wait is bounded by
`timeout_s`; a failed collective raises on the survivors and leaves the group unusable.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import re
import secrets
import socket
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from moe_ep.arguments import seconds
from moe_ep.distributed.communicators import (
    CudaCommunicator,
    DeviceCommunicatorBase,
    GlooCommunicator,
    SharedMemoryCommunicator,
)
from moe_ep.distributed.shm import ShmCommunicator, ShmError

logger = logging.getLogger(__name__)

_Method = TypeVar("_Method")

# How gloo and NCCL word a peer that is gone or stalled (their errors are plain RuntimeErrors,
# DistBackendError at best): "Timed out waiting 2000ms for recv operation", "Connection closed
# by peer [10.0.0.2]:4242", "Connection reset by peer", "connectFullMesh failed", "NCCL error".
_TRANSPORT_FAILURE = re.compile(
    r"timed out|timeout|connection (closed|reset|refused)|broken pipe|connectfullmesh|"
    r"nccl (error|watchdog)|socket", re.IGNORECASE)


def _transport_errors(method: _Method) -> _Method:
    """Say a process-group failure inside a collective in the group's terms.

    The error keeps its type, names the group, this rank, the op and the group's timeout, and
    chains gloo's own (`from`); the group is unusable afterwards (gloo's pairs are torn, and a
    rank that carried on would deadlock its peers), so later calls raise at once.
    """

    @functools.wraps(method)
    def wrapped(self: GroupCoordinator, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except RuntimeError as exc:
            if (isinstance(exc, ShmError) or self._broken is not None or self._destroyed
                    or not _TRANSPORT_FAILURE.search(str(exc))):
                raise
            said = str(exc).strip().splitlines()
            self._broken = (
                f"group {self.name!r} (rank {self.rank_in_group} of {self.world_size}, global "
                f"rank {self.rank}): {method.__name__} failed in the transport: a peer is "
                f"unreachable, dead or stalled past the group's timeout ({self.timeout_s:g} s); "
                f"{type(exc).__name__}: {said[0] if said else ''}"
            )
            try:
                error = type(exc)(self._broken)
            except Exception:  # noqa: BLE001 - an error type that takes other arguments
                error = RuntimeError(self._broken)
            raise error from exc

    return wrapped  # type: ignore[return-value]


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
        use_custom_allreduce: on CUDA, try the CUDA IPC all-reduce for small tensors (it is
            used only where it qualifies; NCCL otherwise).
        timeout_s: how long any collective of this group may wait for a peer, in seconds (gloo
            groups and the shared-memory layer alike). None: the world group's timeout (set by
            `init_distributed(timeout=...)` or `init_process_group`).

    Attributes:
        timeout_s: the group's timeout (float seconds).
        same_node: True when every rank of the group runs on one node (decided collectively
            once, at construction; True for a group of one rank).
        same_node_flags: per rank of the group, whether it shares the node of the group's
            first rank (the same probe; `Topology.detect` reads it).
    """

    def __init__(
        self,
        group_ranks: Sequence[Sequence[int]],
        name: str,
        *,
        use_shm: bool = True,
        timeout_s: float | None = None,
        use_custom_allreduce: bool = True,
    ):
        if not dist.is_initialized():
            raise RuntimeError(
                f"GroupCoordinator({name!r}) needs torch.distributed to be initialised: "
                "call moe_ep.distributed.init_distributed() (or launch with torchrun) first"
            )
        self.name = name
        self.timeout_s = _check_timeout(timeout_s, name)
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
        self._broken: str | None = None  # why a collective failed in the transport
        self.ranks: list[int] = []
        self._cpu_group: ProcessGroup | None = None
        self._device_group: ProcessGroup | None = None
        timeout = timedelta(seconds=self.timeout_s)
        # The world group is reused unless this group asks for another timeout.
        reuse_world = self.timeout_s == world_timeout_s()
        for ranks in groups:
            if len(ranks) == world and reuse_world:
                device_group = dist.group.WORLD
            else:
                device_group = dist.new_group(ranks, backend=backend, timeout=timeout)
            if backend == "gloo":
                cpu_group = device_group
            else:
                cpu_group = dist.new_group(ranks, backend="gloo", timeout=timeout)
            if self.rank in ranks:
                self.ranks = list(ranks)
                self._cpu_group, self._device_group = cpu_group, device_group
        self.world_size = len(self.ranks)
        self.rank_in_group = self.ranks.index(self.rank)
        self.first_rank = self.ranks[0]
        self.last_rank = self.ranks[-1]
        # Collective on the new groups, so also a rendezvous: no rank can destroy a group while a
        # peer is still connecting to it (gloo then fails with "Connection closed by peer").
        self.same_node_flags: tuple[bool, ...] = (
            (True,) if self.world_size == 1
            else tuple(_same_node_flags(self._cpu_group, self.rank_in_group, 0, self.ranks)))
        self.same_node = all(self.same_node_flags)
        self._communicators(use_shm, use_custom_allreduce)
        _LIVE.add(self)

    def _communicators(self, use_shm: bool, use_custom_allreduce: bool) -> None:
        """Pick, once, the communicator for CPU tensors and the one for device tensors."""
        self._gloo = GlooCommunicator(
            self._cpu_group, self._cpu_group, self.ranks, self.rank_in_group, self.name
        )
        self._cpu_comm: DeviceCommunicatorBase = self._gloo
        self._device_comm: DeviceCommunicatorBase = self._gloo
        self._shm_comm: SharedMemoryCommunicator | None = None
        if self.world_size == 1:
            return
        if self.device.type != "cpu":
            why = "CPU tensors of a CUDA world stay on gloo"
        elif not use_shm:
            why = "use_shm=False"
        elif not self.same_node:
            why = "the group spans more than one node"
        else:
            self._shm_comm, why = SharedMemoryCommunicator.create(
                self._cpu_group, self.ranks, self.rank_in_group, self.name, self._gloo,
                self.timeout_s,
            )
        if self._shm_comm is not None:
            self._cpu_comm = self._shm_comm
            logger.info("group %r (%d ranks): CPU collectives over shared memory (%s)",
                        self.name, self.world_size, why)
        else:
            logger.info("group %r (%d ranks): CPU collectives over gloo: %s",
                        self.name, self.world_size, why)
        if self.device.type == "cuda":
            self._device_comm = CudaCommunicator(
                self._cpu_group, self._device_group, self.ranks, self.rank_in_group, self.name,
                device=self.device, same_node=self.same_node,
                use_custom_allreduce=use_custom_allreduce,
            )

    @property
    def shm(self) -> ShmCommunicator | None:
        """The group's shared-memory transport, or None when its CPU tensors use gloo."""
        return None if self._shm_comm is None else self._shm_comm.shm

    @property
    def communicators(self) -> dict[str, DeviceCommunicatorBase]:
        """The communicator used for CPU tensors and the one for device tensors."""
        return {"cpu": self._cpu_comm, "device": self._device_comm}

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
        if self._broken is not None:
            raise RuntimeError(f"GroupCoordinator({self.name!r}) is unusable: {self._broken}")

    def destroy(self) -> None:
        """Free the shared-memory segments and the process groups (idempotent)."""
        if self._destroyed:
            return
        self._destroyed = True
        for comm in {id(c): c for c in (self._device_comm, self._cpu_comm)}.values():
            comm.destroy()
        _LIVE.discard(self)
        for group in {id(g): g for g in (self._cpu_group, self._device_group)}.values():
            if group is not None and group is not dist.group.WORLD:
                dist.destroy_process_group(group)
        self._cpu_group = self._device_group = None

    def __repr__(self) -> str:
        return (
            f"GroupCoordinator(name={self.name!r}, ranks={self.ranks}, "
            f"rank_in_group={self.rank_in_group}, device={self.device}, "
            f"cpu={self._cpu_comm.transport}, device_comm={self._device_comm.transport})"
        )

    # ---------------------------------------------------------------- helpers
    @property
    def is_first_rank(self) -> bool:
        return self.rank == self.first_rank

    @property
    def is_last_rank(self) -> bool:
        return self.rank == self.last_rank

    def _comm(self, x: torch.Tensor) -> DeviceCommunicatorBase:
        """The communicator for `x`'s device (picked at construction)."""
        self._check_alive()
        return self._cpu_comm if x.is_cpu else self._device_comm

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
    @_transport_errors
    def all_reduce(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum `x` (any shape and dtype) over the group.

        Returns a new tensor (`x` itself if world 1), or `out` when given: `out=x` sums in place
        (vLLM's in-place op), another contiguous tensor of x's shape, dtype and device receives
        the sum; `x` is never modified otherwise.
        """
        _check_tensor(x, "x", self.name)
        if out is not None and out is not x:  # (in place needs no check: the hot decode call)
            _check_out(out, x, tuple(x.shape), self.name)
        if self.world_size == 1:
            return x if out is None or out is x else out.copy_(x)
        return self._comm(x).all_reduce(x.contiguous(), out)

    @_transport_errors
    def all_gather(
        self, x: torch.Tensor, dim: int = -1, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Concatenate every rank's `x` (same shape everywhere) along `dim`.

        `out` (optional): a contiguous tensor of the result's shape (x's, with `dim` times
        world_size), dtype and device, that receives it (returned).
        """
        _check_tensor(x, "x", self.name)
        dim = _check_dim(x, dim, self.name)
        if out is not None:
            shape = list(x.shape)
            shape[dim] *= self.world_size
            _check_out(out, x, tuple(shape), self.name)
        if self.world_size == 1:
            return x if out is None else out.copy_(x)
        return self._comm(x).all_gather(x.contiguous(), dim, out)

    @_transport_errors
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
            if self.world_size == 1:
                out.append(t)
                continue
            rows = t.movedim(d, 0).contiguous()
            out.append(self._comm(rows).all_gatherv(rows, sizes).movedim(0, d))
        return out[0] if isinstance(x, torch.Tensor) else out

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

    @_transport_errors
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
        return self._comm(rows).reduce_scatterv(rows, sizes).movedim(0, dim).contiguous()

    @_transport_errors
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
        return self._comm(x).all_to_all(x.contiguous(), recvs, sends)

    @_transport_errors
    def gather(self, x: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's `x` along `dim` on rank `dst`; None on the other ranks."""
        _check_tensor(x, "x", self.name)
        dim = _check_dim(x, dim, self.name)
        self._check_rank(dst, "dst")
        if self.world_size == 1:
            return x
        return self._comm(x).gather(x.contiguous(), dst, dim)

    @_transport_errors
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `x` on every rank with rank `src`'s `x` (in place; returns `x`)."""
        _check_tensor(x, "x", self.name)
        self._check_rank(src, "src")
        if self.world_size == 1:
            return x
        if not x.is_contiguous():
            raise ValueError(f"{self.name}: broadcast writes in place and needs a contiguous x")
        return self._comm(x).broadcast(x, src)

    @_transport_errors
    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank `src`'s picklable `obj` on every rank."""
        self._check_rank(src, "src")
        if self.world_size == 1:
            return obj
        box = [obj if self.rank_in_group == src else None]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_group)
        return box[0]

    @_transport_errors
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    @_transport_errors
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
        else:
            metadata = self.broadcast_object(None, src)
            tensor_dict, tensors = self._allocate(metadata)
        for t in tensors:
            if t.numel():
                self._comm(t).broadcast(t, src)
        return tensor_dict

    @_transport_errors
    def send_tensor_dict(self, tensor_dict: dict[str, Any], dst: int) -> None:
        """Send a dict (like `broadcast_tensor_dict`) to `dst`; it calls `recv_tensor_dict`."""
        self._check_peer(dst, "dst")
        metadata, tensors = _split_tensor_dict(tensor_dict, self.name)
        dist.send_object_list([metadata], dst=self.ranks[dst], group=self.cpu_group)
        for on_cpu in (True, False):
            part = [t for t in tensors if (t.device.type == "cpu") == on_cpu and t.numel()]
            if part:
                self._comm(part[0]).send_tensor_list(part, dst)

    @_transport_errors
    def recv_tensor_dict(self, src: int) -> dict[str, Any]:
        """Receive the dict rank `src` sent with `send_tensor_dict`."""
        self._check_peer(src, "src")
        box = [None]
        dist.recv_object_list(box, src=self.ranks[src], group=self.cpu_group)
        out, tensors = self._allocate(box[0])
        for on_cpu in (True, False):
            part = [t for t in tensors if (t.device.type == "cpu") == on_cpu and t.numel()]
            if part:
                self._comm(part[0]).recv_tensor_list_into(part, src)
        return out

    @_transport_errors
    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send contiguous `x` to rank `dst`, which calls `recv(x.shape, x.dtype, src)`."""
        _check_tensor(x, "x", self.name)
        self._check_peer(dst, "dst")
        self._comm(x).send(x.contiguous(), dst)

    @_transport_errors
    def recv(
        self, size: Sequence[int], dtype: torch.dtype, src: int, device: str = "cpu"
    ) -> torch.Tensor:
        """A new tensor `[*size]` of `dtype` on `device` ("cpu" or "cuda": this group's
        device) holding what rank `src` sent with `send`."""
        self._check_peer(src, "src")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"{self.name}: device must be 'cpu' or 'cuda', got {device!r}")
        comm = self._cpu_comm if device == "cpu" else self._device_comm
        self._check_alive()
        return comm.recv(tuple(size), dtype, src)

    @_transport_errors
    def recv_into(self, out: torch.Tensor, src: int) -> torch.Tensor:
        """Receive what rank `src` sent with `send` straight into `out` (contiguous, the sent
        shape and dtype, on this rank's CPU or device); returns `out`."""
        _check_tensor(out, "out", self.name)
        self._check_peer(src, "src")
        if not out.is_contiguous():
            raise ValueError(f"{self.name}: out must be contiguous")
        self._comm(out).recv_tensor_list_into([out], src)
        return out

    @_transport_errors
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
    cpu_group: ProcessGroup, rank_in_group: int, source: int, ranks: list[int]
) -> list[bool]:
    """The source creates a small shared-memory file; the ranks that can read it share its node.

    Host names are not enough: containers on one host may report different names yet share
    memory, and two hosts may share a name. The name is broadcast *before* the file exists, and
    every rank that learned it unlinks it at the end (missing is fine), so a source that dies
    at any point leaves nothing in /dev/shm once its peers return (with an error). Three small
    collectives: the name, whether the file was made, the flags.
    """
    if rank_in_group == source:
        token = f"{os.getpid()}_{secrets.token_hex(8)}"
        box = [(f"/dev/shm/moe_ep_probe_{token}", secrets.token_bytes(16), socket.gethostname())]
    else:
        box = [None]
    dist.broadcast_object_list(box, src=ranks[source], group=cpu_group)
    path, magic, host = box[0]
    try:
        made = [_write_probe(path, magic) if rank_in_group == source else None]
        # (The source must reach this collective even if it could not write: no raising above.)
        dist.broadcast_object_list(made, src=ranks[source], group=cpu_group)
        if rank_in_group == source:
            mine = True
        elif not made[0]:
            mine = socket.gethostname() == host  # no usable /dev/shm on the source
        else:
            try:
                with open(path, "rb") as f:
                    mine = f.read(len(magic)) == magic
            except OSError:
                mine = False
        flags: list[Any] = [None] * len(ranks)
        dist.all_gather_object(flags, mine, group=cpu_group)
    finally:
        # Every rank has read the file once the flags are gathered; on an error, whoever knows
        # the name removes it.
        with contextlib.suppress(OSError):
            os.unlink(path)
    return [bool(f) for f in flags]


def _write_probe(path: str, magic: bytes) -> bool:
    """Create the probe file (private, exclusive); False when /dev/shm is unusable."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(magic)
    except OSError:
        return False
    return True


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


def _check_out(out: Any, x: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != x.dtype or tuple(out.shape) != shape or out.device != x.device:
        raise ValueError(
            f"{name}: out must be {x.dtype} {shape} on {x.device}, got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name}: out must be contiguous")


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


# torch.distributed's own default, for a world whose timeout cannot be read back.
_FALLBACK_TIMEOUT_S = 1800.0


def world_timeout_s() -> float:
    """The timeout of the default (world) process group, in seconds."""
    world = dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return world._get_backend(torch.device(device)).options._timeout.total_seconds()
        except (AttributeError, RuntimeError):
            continue
    return _FALLBACK_TIMEOUT_S


def _check_timeout(timeout_s: float | None, name: str) -> float:
    if timeout_s is None:
        return world_timeout_s()
    return seconds(timeout_s, "timeout_s", where=f"GroupCoordinator({name!r}): ",
                   hint=" (or None for the world's timeout)")


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
