"""KV pipes: bit-exact, ordered round trips over TCP and over a group; bad input; a peer killed
mid-transfer fails the survivor within the timeout instead of hanging it."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moe_ep.distributed import GroupCoordinator, GroupKVPipe, KVPipeError, TCPKVPipe

# [layers, 2 (K and V), blocks, block_size, heads, head_dim]
KV_SHAPE = (3, 2, 5, 16, 4, 8)


def _kv(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Every bit pattern, NaNs included: a bit-exact pipe must carry them as they are.
    return torch.randint(0, 1 << 16, KV_SHAPE, generator=g, dtype=torch.int32).to(
        torch.int16).view(torch.bfloat16)


def _messages() -> list:
    return [_kv(1), None, torch.empty(0, 4, dtype=torch.bfloat16), _kv(2),
            torch.tensor(3.5, dtype=torch.float64), torch.arange(10, dtype=torch.int64)[::2],
            torch.ones(3, dtype=torch.bool)]


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                            b.contiguous().reshape(-1).view(torch.uint8)))


# ------------------------------------------------------------------------------- TCP
def test_tcp_round_trip_is_bit_exact_and_ordered():
    server = TCPKVPipe("127.0.0.1", 0, "server", timeout_s=30)
    got: list = []

    def receive():
        for _ in range(len(_messages())):
            got.append(server.recv_tensor())
        buf = torch.empty(KV_SHAPE, dtype=torch.bfloat16)
        got.append((server.recv_tensor(out=buf), buf))  # into the caller's buffer
        server.send_tensor(torch.full((2,), 7.0))  # and back

    t = threading.Thread(target=receive)
    t.start()
    with TCPKVPipe("127.0.0.1", server.port, "client", timeout_s=30) as client:
        for m in _messages():
            client.send_tensor(m)
        client.send_tensor(_kv(5))
        back = client.recv_tensor()
        client.send_tensor(torch.zeros(3))
    t.join(30)
    assert len(got) == len(_messages()) + 1
    assert all(_same(g, w) for g, w in zip(got, _messages())), got
    returned, buf = got[-1]
    assert returned is buf and _same(buf, _kv(5))
    assert torch.equal(back, torch.full((2,), 7.0))
    with pytest.raises(KVPipeError, match="the peer sent torch.float32 \\(3,\\), out is"):
        server.recv_tensor(out=torch.empty(4))
    server.close()


def test_tcp_bad_input_and_no_peer_fail_clearly():
    with pytest.raises(ValueError, match="role must be one of"):
        TCPKVPipe("127.0.0.1", 1234, "producer")
    with pytest.raises(ValueError, match="port must be an int"):
        TCPKVPipe("127.0.0.1", 70000, "client")
    server = TCPKVPipe("127.0.0.1", 0, "server", timeout_s=0.5)
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor or None"):
        server.send_tensor([1, 2])
    with pytest.raises(TypeError, match="is not carried"):
        server.send_tensor(torch.zeros(2, dtype=torch.complex64))
    t0 = time.monotonic()
    with pytest.raises(KVPipeError, match="no peer connected"):
        server.recv_tensor()
    assert time.monotonic() - t0 < 5
    port = server.port
    server.close()
    t0 = time.monotonic()
    with pytest.raises(KVPipeError, match="could not connect"):
        TCPKVPipe("127.0.0.1", port, "client", timeout_s=0.5)
    assert time.monotonic() - t0 < 5


def _tcp_stalling_sender(port: int, q) -> None:
    pipe = TCPKVPipe("127.0.0.1", port, "client", timeout_s=60)

    class Stall:  # sends the header and 1 MiB of the body, then hangs (to be killed)
        def __init__(self, sock):
            self.sock, self.sent = sock, 0

        def sendall(self, data):
            if self.sent > 1 << 20:
                q.put("stalled")
                time.sleep(600)
            self.sock.sendall(data[: 2 << 20])
            self.sent += len(data)

    pipe._sock = Stall(pipe._sock)
    pipe.send_tensor(torch.zeros(64 << 20, dtype=torch.uint8))


def _tcp_receiver_then_gone(port: int, q) -> None:
    pipe = TCPKVPipe("127.0.0.1", port, "client", timeout_s=60)
    q.put("connected")
    time.sleep(600)  # never reads: the sender fills the socket buffers and waits
    pipe.close()


def _kill_after(proc, q, want: str) -> None:
    assert q.get(timeout=120) == want
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("survivor", ["receiver", "sender"])
def test_tcp_peer_killed_mid_transfer_fails_within_timeout(survivor):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    server = TCPKVPipe("127.0.0.1", 0, "server", timeout_s=60)
    target = _tcp_stalling_sender if survivor == "receiver" else _tcp_receiver_then_gone
    proc = ctx.Process(target=target, args=(server.port, q), daemon=True)
    proc.start()
    killer = threading.Thread(
        target=_kill_after, args=(proc, q, "stalled" if survivor == "receiver" else "connected")
    )
    try:
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(KVPipeError) as err:
            if survivor == "receiver":
                server.recv_tensor()
            else:
                server.send_tensor(torch.zeros(256 << 20, dtype=torch.uint8))
        killer.join(120)
        assert time.monotonic() - t0 < 60  # well before the timeout once the kill landed
        text = str(err.value)
        assert ("closed the connection after" in text and "of 67108864 bytes" in text) if (
            survivor == "receiver") else "peer is gone" in text, text
    finally:
        server.close()
        proc.kill()
        proc.join(30)


# ---------------------------------------------------------------------------- group
def _group_round_trip(info) -> int:
    g = GroupCoordinator([[0, 1]], "kv")
    try:
        pipe = GroupKVPipe(g, 1 - info.rank)
        if info.rank == 0:
            for m in _messages():
                pipe.send_tensor(m)
            assert pipe.recv_tensor() is None
        else:
            got = [pipe.recv_tensor() for _ in _messages()]
            assert all(_same(a, b) for a, b in zip(got, _messages())), got
            pipe.send_tensor(None)
        if info.rank == 0:
            pipe.send_tensor(_kv(6))
            pipe.send_tensor(torch.zeros(3))
        else:
            buf = torch.empty(KV_SHAPE, dtype=torch.bfloat16)
            assert pipe.recv_tensor(out=buf) is buf and _same(buf, _kv(6))
            with pytest.raises(KVPipeError, match="out is torch.float32 \\(4,\\)"):
                pipe.recv_tensor(out=torch.empty(4))
        with pytest.raises(ValueError, match="peer must be another rank"):
            GroupKVPipe(g, info.rank)
        return len(_messages())
    finally:
        g.destroy()


@pytest.mark.parametrize("use_shm", [True, False], ids=["shm", "gloo"])
def test_group_pipe_round_trip_is_bit_exact(dist_pool, use_shm):
    fn = _group_round_trip if use_shm else _group_round_trip_gloo
    assert dist_pool(2).run(fn, timeout=120) == [len(_messages())] * 2


def _group_round_trip_gloo(info) -> int:
    g = GroupCoordinator([[0, 1]], "kv", use_shm=False)
    try:
        pipe = GroupKVPipe(g, 1 - info.rank)
        if info.rank == 0:
            for m in _messages():
                pipe.send_tensor(m)
        else:
            got = [pipe.recv_tensor() for _ in _messages()]
            assert all(_same(a, b) for a, b in zip(got, _messages())), got
        return len(_messages())
    finally:
        g.destroy()


def _group_killed_worker(rank: int, store: str, q) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    g = GroupCoordinator([[0, 1]], "kv", timeout_s=60)
    pipe = GroupKVPipe(g, 1 - rank)
    q.put(("ready", rank, os.getpid()))
    if rank == 1:
        time.sleep(600)  # killed before it reads anything
    t0 = time.monotonic()
    try:
        pipe.send_tensor(_kv(3).repeat(64, 1, 1, 1, 1, 1))  # ~6 MiB: many shm chunks
        q.put(("sent", rank, time.monotonic() - t0))
    except KVPipeError as e:
        q.put(("error", rank, f"{time.monotonic() - t0:.2f} {e}"))


def test_group_pipe_peer_killed_mid_transfer_fails_within_timeout(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_group_killed_worker, args=(r, str(tmp_path / "store"), q),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        ready = {}
        while len(ready) < 2:
            kind, rank, pid = q.get(timeout=120)
            ready[rank] = pid
        time.sleep(0.5)
        os.kill(ready[1], signal.SIGKILL)
        kind, rank, text = q.get(timeout=60)
        assert (kind, rank) == ("error", 0), text
        elapsed, message = text.split(" ", 1)
        assert float(elapsed) < 30 and "rank 1" in message, text
    except queue.Empty:
        pytest.fail("the survivor neither finished nor failed: it hangs")
    finally:
        for p in procs:
            p.kill()
            p.join(30)
