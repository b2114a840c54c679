"""Launching ranks, shared by the CLI, the benchmark and the tests.

* `DistributedPool` / `run_distributed`: run a function on several local ranks, as separate
  processes, without ever hanging. The pool spawns the ranks once (importing torch costs
  seconds per process on a small machine) and runs many functions on them. Each worker
  initialises `torch.distributed` against a TCP store that the parent hosts on a port the OS
  picks, so there is no port race. A worker's exception comes back with its type and remote
  traceback; a timeout or a dead rank kills every rank and raises in the parent.
* `under_torchrun` (from `moe_ep.distributed.state`, which needs it too), `torchrun_topology`,
  `local_topology`: which job the command runs in.
* `CLIError`: a user error of a command (printed as one line, exit status 2).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist

from moe_ep.arguments import seconds
from moe_ep.distributed.state import under_torchrun  # noqa: F401 - part of this module's API

_DEVICES = ("cpu", "cuda")
# After one rank raises, how long the others get to finish (they usually raise the same error
# from a consistent input check) before they are presumed stuck in a collective and killed.
_PEER_GRACE_S = 2.0


@dataclass(frozen=True)
class RankInfo:
    """What a worker function learns about its rank (passed as its first argument)."""

    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda:<local_rank>"


class DistributedTimeoutError(TimeoutError):
    """Some ranks did not finish in time; every rank was killed."""


class WorkerCrashedError(RuntimeError):
    """A rank's process died without reporting a result; every rank was killed."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the `__cause__` of the re-raised error."""

    def __str__(self) -> str:
        return self.args[0]


class DistributedPool:
    """`world_size` spawned ranks with `torch.distributed` initialised, reused across `run`s.

    Args:
        world_size: number of ranks (processes).
        device: "cpu" (gloo) or "cuda" (NCCL; rank r uses cuda:r % device_count).
        start_timeout: seconds the ranks get to start and rendezvous.
    """

    def __init__(self, world_size: int, *, device: str = "cpu", start_timeout: float = 120.0):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if device not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES}, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' needs CUDA, none is available")
        seconds(start_timeout, "start_timeout")
        self.world_size = world_size
        self.device = device
        self.broken = False
        self._closed = False
        self._store = dist.TCPStore(
            "127.0.0.1", 0, world_size + 1, True, timedelta(seconds=start_timeout),
            wait_for_workers=False,
        )
        ctx = mp.get_context("spawn")
        self._procs: list[mp.Process] = []
        self._conns: list[Connection] = []
        try:
            for rank in range(world_size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main,
                    args=(rank, world_size, device, self._store.port, start_timeout, child),
                    name=f"moe_ep-rank{rank}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            self._collect("start-up", start_timeout)
        except BaseException:
            self._kill()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
        """Run `fn(RankInfo, *args)` on every rank; return the per-rank results in rank order.

        `fn` and `args` must be picklable (a module-level function). Raises the first worker
        exception (same type, remote traceback as `__cause__`), `DistributedTimeoutError`, or
        `WorkerCrashedError`; after a timeout or crash the pool is broken and must be replaced.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        seconds(timeout, "timeout")
        if self.broken or self._closed:
            raise RuntimeError("this DistributedPool is broken or closed; create a new one")
        try:
            payload = pickle.dumps((fn, args))
        except Exception as e:
            raise TypeError(
                f"fn and args must be picklable to reach the ranks (define fn at module level): {e}"
            ) from e
        for conn in self._conns:
            conn.send_bytes(payload)
        return self._collect(getattr(fn, "__qualname__", repr(fn)), timeout)

    def _collect(self, what: str, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        results: dict[int, Any] = {}
        first_error: tuple[int, BaseException] | None = None
        first_error_at = 0.0
        pending = set(range(self.world_size))
        while pending:
            remaining = deadline - time.monotonic()
            if first_error is not None:
                remaining = min(remaining, first_error_at + _PEER_GRACE_S - time.monotonic())
            if remaining <= 0:
                break
            # A rank's pipe turns readable when it replies or, with EOF, when its process dies
            # (the parent closed its copy of the child end), so the pipes alone tell both.
            waitables = {self._conns[r]: r for r in pending}
            for ready in wait(list(waitables), timeout=remaining):
                rank = waitables[ready]
                try:
                    status, value = ready.recv()
                except (EOFError, OSError):
                    self._procs[rank].join(timeout=5)
                    code = self._procs[rank].exitcode
                    self._kill()
                    raise WorkerCrashedError(
                        f"rank {rank} died (exit code {code}) while running {what}; "
                        "all ranks were killed"
                    ) from None
                pending.discard(rank)
                if status == "ok":
                    results[rank] = value
                elif first_error is None:
                    first_error = (rank, _rebuild_error(*value))
                    first_error_at = time.monotonic()
        if first_error is not None:
            if pending:
                self._kill()  # the others are stuck waiting for the rank that raised
            raise first_error[1]
        if pending:
            self._kill()
            raise DistributedTimeoutError(
                f"ranks {sorted(pending)} of {self.world_size} did not finish {what} within "
                f"{timeout:g} s; all ranks were killed"
            )
        return [results[r] for r in range(self.world_size)]

    def _kill(self) -> None:
        self.broken = True
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=10)
        for conn in self._conns:
            conn.close()

    def close(self) -> None:
        """Stop the ranks (killing any that do not exit promptly) and free the store."""
        if self._closed:
            return
        self._closed = True
        if not self.broken:
            for conn in self._conns:
                try:
                    conn.send_bytes(b"")
                except OSError:
                    pass
            for proc in self._procs:
                proc.join(timeout=10)
        self._kill()
        del self._store

    def __enter__(self) -> DistributedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_distributed(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0,
    device: str = "cpu",
) -> list[Any]:
    """Spawn `world_size` ranks, run `fn(RankInfo, *args)` on each, return their results.

    `timeout` bounds the run of `fn` (start-up has its own bound); see `DistributedPool.run`.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    seconds(timeout, "timeout")
    with DistributedPool(world_size, device=device) as pool:
        return pool.run(fn, *args, timeout=timeout)


# ------------------------------------------------------------------- worker side
def _worker_main(
    rank: int, world_size: int, device: str, port: int, start_timeout: float, conn: Connection
) -> None:
    # One intra-op thread per rank: ranks usually outnumber cores in tests.
    torch.set_num_threads(1)
    try:
        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
            local_device = f"cuda:{rank % torch.cuda.device_count()}"
        else:
            local_device = "cpu"
        store = dist.TCPStore(
            "127.0.0.1", port, world_size + 1, False, timedelta(seconds=start_timeout)
        )
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=start_timeout),
        )
        info = RankInfo(rank, world_size, rank, local_device)
        conn.send(("ok", None))
    except BaseException as e:
        conn.send(("err", _portable_error(e, rank)))
        return
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            break
        if not payload:
            break
        try:
            fn, args = pickle.loads(payload)
            reply = ("ok", fn(info, *args))
        except BaseException as e:
            reply = ("err", _portable_error(e, rank))
        finally:
            _cleanup_groups()
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result
            conn.send(("err", _portable_error(TypeError(f"result is not picklable: {e}"), rank)))
    _cleanup_groups()
    dist.destroy_process_group()


def _cleanup_groups() -> None:
    """Leave the worker ready for the next function even if this one forgot to clean up."""
    from moe_ep.distributed.group import destroy_live_groups
    from moe_ep.distributed.state import destroy_model_parallel

    destroy_model_parallel()
    destroy_live_groups()  # coordinators the function built directly


def _portable_error(error: BaseException, rank: int) -> tuple[BaseException, str, int]:
    """`error` (or a RuntimeError with its text if it does not pickle), its traceback, the rank.

    Pickling drops `__cause__` and `__traceback__`, so the traceback travels as text and the
    parent attaches it (`_rebuild_error`).
    """
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        error = pickle.loads(pickle.dumps(error))
    except Exception:
        error = RuntimeError(f"{type(error).__name__}: {error}")
    return error, tb, rank


def _rebuild_error(error: BaseException, tb: str, rank: int) -> BaseException:
    error.__cause__ = RemoteTraceback(f"\n[rank {rank}] {tb}")
    if hasattr(error, "add_note"):
        error.add_note(f"(raised on rank {rank}; its traceback is the cause above)")
    return error

# --------------------------------------------------------------------------- jobs

EXIT_ERROR = 1  # the command ran but could not do its job (nothing selectable, a backend failed)
EXIT_USAGE = 2  # bad arguments or files (argparse's convention)


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def local_topology(world_size: int | None = None, *, device: str | None = None,
                   nodes: int = 1, gpus_per_node: int | None = None,
                   nvlink: bool | None = None):
    """The topology of a job of `world_size` ranks on this machine (no processes started).

    Defaults: this machine's device, one rank per GPU on CUDA and 2 ranks on CPU (the
    `moe-ep bench` default). `nodes` > 1 describes a job spread evenly over that many nodes,
    `device`/`gpus_per_node`/`nvlink` override what this machine has, for asking "what would
    this config pick on that hardware" from a laptop.
    """
    from moe_ep.distributed.topology import Topology

    here = Topology.detect(None)
    device = device or here.device
    gpus = here.gpus_per_node if gpus_per_node is None else gpus_per_node
    if world_size is None:
        world_size = (gpus * nodes if device == "cuda" and gpus else 2 * nodes)
    if world_size < 1:
        raise CLIError(f"--world-size must be >= 1, got {world_size}")
    if nodes < 1 or world_size % nodes:
        raise CLIError(f"--nodes must be >= 1 and divide --world-size {world_size}, got {nodes}")
    local = world_size // nodes
    if nvlink is None and device == "cuda" and device == here.device:
        from moe_ep.distributed.topology import nvlink_all_connected

        nvlink = nvlink_all_connected(min(local, gpus))
    if device == "cuda" and gpus_per_node is None and here.device != "cuda":
        gpus = local  # a simulated CUDA job: one rank per GPU
    return Topology(device=device, world_size=world_size, rank=0, local_world_size=local,
                    same_node=(True,) * local + (False,) * (world_size - local),
                    nvlink=nvlink, gpus_per_node=gpus)


def torchrun_topology():
    """Collective: the topology of the torchrun job (world group)."""
    import torch.distributed as dist

    from moe_ep.distributed import (
        destroy_model_parallel,
        get_world_group,
        init_distributed,
        initialize_model_parallel,
    )
    from moe_ep.distributed.topology import Topology

    # A caller that already runs a job (main() called in-process) keeps its process group.
    owned = not dist.is_initialized()
    init_distributed()
    try:
        initialize_model_parallel()
        return Topology.detect(get_world_group())
    finally:
        # Nothing else needs the job's groups: the report is printed from the topology.
        destroy_model_parallel()
        if owned:
            dist.destroy_process_group()
