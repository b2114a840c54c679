"""KV pipes: move tensors (KV caches) between a prefill and a decode process, in order.

`KVPipeBase` is vLLM's pipe interface: `send_tensor(tensor | None)` on one side,
`recv_tensor() -> tensor | None` on the other, FIFO, with dtype, shape and device carried
(`None` and 0-element tensors included); `close()` releases the pipe. `recv_tensor(out=buf)`
(an addition) receives straight into a buffer the caller owns, e.g. its KV cache: no allocation,
so no page faults on fresh memory (a 256 MiB receive into new pages costs ~0.2 s here). Two
implementations:

* `TCPKVPipe(host, port, role)`: a plain TCP socket between two processes that share no process
  group (disaggregated prefill). `role="server"` listens on (host, port) and accepts one peer,
  `role="client"` connects (retrying until the timeout). A tensor travels as a small header
  (dtype, shape, device, byte count) and then its raw bytes, sent from and received into the
  tensors' own memory (no intermediate copies on the CPU; CUDA tensors go through the host).
* `GroupKVPipe(group, peer)`: over a `GroupCoordinator`: the metadata as a small dict
  (`send_tensor_dict`), then the tensor (`send` / `recv_into`), so on one node the bytes move
  through shared memory.

Failure modes, never a hang: a wrong argument raises TypeError / ValueError naming it; a peer
that closes or dies mid-transfer, or sends nothing within `timeout_s`, raises `KVPipeError`
(naming what was expected); the pipe is closed afterwards, as the stream position is lost.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from moe_ep.arguments import seconds
from moe_ep.cpu_allocator import tune_cpu_allocator

if TYPE_CHECKING:
    from moe_ep.distributed.group import GroupCoordinator

logger = logging.getLogger(__name__)

_MAGIC = b"MEKV"
_VERSION = 1
_PREFIX = struct.Struct("<4sBBI")  # magic, version, kind (0 None, 1 tensor), header length
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool, getattr(torch, "float8_e4m3fn", None),
        getattr(torch, "float8_e5m2", None),
    )
    if d is not None
}
_ROLES = ("server", "client")
_CHUNK = 16 << 20  # bytes per socket call: bounds a single syscall, not the transfer


class KVPipeError(RuntimeError):
    """The pipe failed: the peer closed, died or timed out, or sent something malformed."""


class KVPipeBase(ABC):
    """One end of an ordered tensor pipe (vLLM's `KVPipeBase`)."""

    @abstractmethod
    def send_tensor(self, tensor: torch.Tensor | None) -> None:
        """Queue `tensor` (any shape, a carried dtype, CPU or CUDA) or None for the peer."""

    @abstractmethod
    def recv_tensor(self, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The next tensor (or None) the peer sent, with its dtype, shape and device.

        `out`: optional contiguous tensor of the incoming dtype and shape that receives it (and
        is returned); a tensor of another dtype or shape raises KVPipeError (the pipe is then
        closed). Untouched when the peer sent None.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the pipe (idempotent); the peer's next receive then fails."""

    def __enter__(self) -> KVPipeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_send(tensor: object) -> torch.Tensor | None:
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"send_tensor: tensor must be a torch.Tensor or None, got "
                        f"{type(tensor).__name__}")
    if str(tensor.dtype).removeprefix("torch.") not in _DTYPES:
        raise TypeError(f"send_tensor: dtype {tensor.dtype} is not carried (one of "
                        f"{sorted(_DTYPES)})")
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(f"send_tensor: tensor must be on cpu or cuda, got {tensor.device}")
    return tensor


def _check_out(out: object) -> None:
    if out is not None and (not isinstance(out, torch.Tensor) or not out.is_contiguous()):
        raise TypeError(f"recv_tensor: out must be a contiguous torch.Tensor or None, got "
                        f"{type(out).__name__}")


def _mismatch(out: torch.Tensor, dtype: torch.dtype, shape: tuple) -> str:
    if out.dtype == dtype and tuple(out.shape) == tuple(shape):
        return ""
    return (f"recv_tensor: the peer sent {dtype} {tuple(shape)}, out is {out.dtype} "
            f"{tuple(out.shape)}")


def _target_device(kind: str) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise KVPipeError("recv_tensor: the peer sent a CUDA tensor but CUDA is not available")
    return torch.device("cuda", torch.cuda.current_device())


# ------------------------------------------------------------------------------ TCP
class TCPKVPipe(KVPipeBase):
    """A pipe over one TCP connection between two processes.

    Args:
        host: address to listen on (server) or connect to (client).
        port: TCP port; 0 lets a server pick one (read it from `.port`).
        role: "server" (listens, accepts one peer) or "client" (connects).
        timeout_s: bound on connecting and on every wait for the peer during a transfer.
    """

    def __init__(self, host: str, port: int, role: str, *, timeout_s: float = 60.0):
        if role not in _ROLES:
            raise ValueError(f"role must be one of {_ROLES}, got {role!r}")
        if not isinstance(host, str) or not host:
            raise TypeError(f"host must be a non-empty str, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"port must be an int in [0, 65536), got {port!r}")
        if role == "client" and port == 0:
            raise ValueError("a client needs the server's port, got 0")
        self.role = role
        self.timeout_s = seconds(timeout_s, "timeout_s")
        # Every receive returns a fresh tensor: keep freed memory, or each pays its page faults.
        tune_cpu_allocator(f"TCPKVPipe({role})")
        self._sock: socket.socket | None = None
        self._listener: socket.socket | None = None
        if role == "server":
            self._listener = socket.create_server((host, port))
            self._listener.settimeout(self.timeout_s)
            self.port = self._listener.getsockname()[1]
        else:
            self.port = port
            self._sock = self._connect(host, port)
        self._host = host

    def _connect(self, host: str, port: int) -> socket.socket:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                sock = socket.create_connection(
                    (host, port), timeout=max(0.1, deadline - time.monotonic())
                )
                logger.debug("TCPKVPipe: connected to %s:%d", host, port)
                return self._configure(sock)
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise KVPipeError(
                        f"TCPKVPipe: could not connect to {host}:{port} within "
                        f"{self.timeout_s:g} s: {e}"
                    ) from e
                time.sleep(0.05)  # the server may not be listening yet

    def _configure(self, sock: socket.socket) -> socket.socket:
        sock.settimeout(self.timeout_s)
        # Headers are small and must not wait for Nagle; buffer sizes are left to the kernel's
        # autotuning (setting SO_RCVBUF / SO_SNDBUF disables it and halved the throughput).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _conn(self) -> socket.socket:
        if self._sock is None:
            if self._listener is None:
                raise KVPipeError("TCPKVPipe is closed")
            try:
                sock, _ = self._listener.accept()
            except TimeoutError as e:
                raise KVPipeError(
                    f"TCPKVPipe: no peer connected to port {self.port} within {self.timeout_s:g} s"
                ) from e
            self._listener.close()
            self._listener = None
            self._sock = self._configure(sock)
            logger.debug("TCPKVPipe: accepted a peer on port %d", self.port)
        return self._sock

    # ------------------------------------------------------------------ transfers
    def send_tensor(self, tensor: torch.Tensor | None) -> None:
        tensor = _check_send(tensor)
        sock = self._conn()
        try:
            if tensor is None:
                sock.sendall(_PREFIX.pack(_MAGIC, _VERSION, 0, 0))
                return
            host = tensor.detach().to("cpu").contiguous()
            header = json.dumps({
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "device": tensor.device.type,
                "nbytes": host.numel() * host.element_size(),
            }).encode()
            sock.sendall(_PREFIX.pack(_MAGIC, _VERSION, 1, len(header)) + header)
            if host.numel():
                view = memoryview(host.reshape(-1).view(torch.uint8).numpy())
                for off in range(0, len(view), _CHUNK):
                    sock.sendall(view[off : off + _CHUNK])
        except OSError as e:
            self.close()
            raise KVPipeError(f"TCPKVPipe.send_tensor: the peer is gone or stuck: {e}") from e

    def recv_tensor(self, out: torch.Tensor | None = None) -> torch.Tensor | None:
        _check_out(out)
        sock = self._conn()
        prefix = self._recv_exact(sock, _PREFIX.size, "a message header")
        magic, version, kind, header_len = _PREFIX.unpack(prefix)
        if magic != _MAGIC or version != _VERSION or kind not in (0, 1):
            self.close()
            raise KVPipeError(f"TCPKVPipe.recv_tensor: malformed message header {prefix!r}")
        if kind == 0:
            return None
        try:
            meta = json.loads(self._recv_exact(sock, header_len, "the tensor header"))
            dtype, shape = _DTYPES[meta["dtype"]], tuple(int(n) for n in meta["shape"])
            device, nbytes = _target_device(meta["device"]), int(meta["nbytes"])
        except (ValueError, KeyError, TypeError) as e:
            self.close()
            raise KVPipeError(f"TCPKVPipe.recv_tensor: malformed tensor header: {e}") from e
        if out is not None and _mismatch(out, dtype, shape):
            self.close()
            raise KVPipeError(_mismatch(out, dtype, shape))
        direct = out is not None and out.device.type == "cpu"
        flat = out.reshape(-1).view(torch.uint8) if direct else torch.empty(nbytes,
                                                                             dtype=torch.uint8)
        if nbytes:
            self._recv_into(sock, memoryview(flat.numpy()), f"{nbytes} bytes of a {meta} tensor")
        if direct:
            return out
        got = flat.view(dtype).reshape(shape)
        if out is not None:
            return out.copy_(got)
        return got if device.type == "cpu" else got.to(device)

    def _recv_exact(self, sock: socket.socket, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self._recv_into(sock, memoryview(buf), what)
        return bytes(buf)

    def _recv_into(self, sock: socket.socket, view: memoryview, what: str) -> None:
        got = 0
        try:
            while got < len(view):
                n = sock.recv_into(view[got : got + _CHUNK])
                if n == 0:
                    raise KVPipeError(
                        f"TCPKVPipe.recv_tensor: the peer closed the connection after {got} of "
                        f"{len(view)} bytes of {what}"
                    )
                got += n
        except TimeoutError as e:
            self.close()
            raise KVPipeError(
                f"TCPKVPipe.recv_tensor: nothing from the peer for {self.timeout_s:g} s while "
                f"waiting for {what} ({got} of {len(view)} bytes)"
            ) from e
        except KVPipeError:
            self.close()
            raise
        except OSError as e:
            self.close()
            raise KVPipeError(f"TCPKVPipe.recv_tensor: connection failed during {what}: {e}") from e

    def close(self) -> None:
        for sock in (self._sock, self._listener):
            if sock is not None:
                sock.close()
        self._sock = self._listener = None

    def __repr__(self) -> str:
        return f"TCPKVPipe(host={self._host!r}, port={self.port}, role={self.role!r})"


# ---------------------------------------------------------------------------- group
class GroupKVPipe(KVPipeBase):
    """A pipe to rank `peer` of `group` (shared memory on one node, else gloo / NCCL).

    Both ends build one with each other's rank; the group's timeout bounds every wait.
    """

    def __init__(self, group: GroupCoordinator, peer: int):
        if isinstance(peer, bool) or not isinstance(peer, int) or not (
            0 <= peer < group.world_size
        ) or peer == group.rank_in_group:
            raise ValueError(
                f"peer must be another rank of group {group.name!r} (0 <= peer < "
                f"{group.world_size}, not {group.rank_in_group}), got {peer!r}"
            )
        self.group = group
        self.peer = peer
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise KVPipeError("GroupKVPipe is closed")

    def send_tensor(self, tensor: torch.Tensor | None) -> None:
        tensor = _check_send(tensor)
        self._check_open()
        try:
            if tensor is None:
                self.group.send_tensor_dict({"none": True}, self.peer)
                return
            meta = {"dtype": tensor.dtype, "shape": tuple(tensor.shape),
                    "device": tensor.device.type}
            self.group.send_tensor_dict(meta, self.peer)
            if tensor.numel():
                self.group.send(tensor, self.peer)
        except Exception as e:
            self._closed = True
            raise KVPipeError(
                f"GroupKVPipe.send_tensor to rank {self.peer} of {self.group.name!r} failed: {e}"
            ) from e

    def recv_tensor(self, out: torch.Tensor | None = None) -> torch.Tensor | None:
        _check_out(out)
        self._check_open()
        try:
            meta = self.group.recv_tensor_dict(self.peer)
            if meta.get("none"):
                return None
            if out is None:
                out = torch.empty(meta["shape"], dtype=meta["dtype"],
                                  device=_target_device(meta["device"]))
            elif _mismatch(out, meta["dtype"], meta["shape"]) or out.device.type != meta["device"]:
                raise KVPipeError(
                    _mismatch(out, meta["dtype"], meta["shape"])
                    or f"recv_tensor: the peer sent a {meta['device']} tensor, out is on "
                    f"{out.device}"
                )
            if out.numel():
                self.group.recv_into(out, self.peer)
            return out
        except Exception as e:
            self._closed = True
            if isinstance(e, KVPipeError):
                raise
            raise KVPipeError(
                f"GroupKVPipe.recv_tensor from rank {self.peer} of {self.group.name!r} failed: "
                f"{e}"
            ) from e

    def close(self) -> None:
        self._closed = True
