"""Throughput of a KV-cache transfer: `TCPKVPipe` vs a plain socket copy of the same bytes,
and `GroupKVPipe` (shared memory on one node), between two processes on this machine.

    python bench/bench_kv_pipe.py                 # 256 MiB bf16 KV tensor, 5 repetitions
    python bench/bench_kv_pipe.py --mib 64 --reps 3

After one untimed round, each repetition times one transfer per mode (the TCP modes
interleaved, over two connections held open side by side), from the first byte sent until the
receiver acknowledges that it holds the whole tensor (TCP) or until `recv_tensor` returns on
the receiver (group).
The plain socket baseline sends the tensor's bytes with `sendall` and receives them with
`recv_into` a preallocated buffer: the least any TCP pipe must do. `recv_tensor()` returns a
new tensor (whose pages may be fresh: glibc does not always find a freed 256 MiB hole, and
faulting 65536 pages costs ~0.2 s here); `recv_tensor(out=buf)` receives into a buffer the
receiver keeps, like a KV cache. Numbers are medians.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import time

import torch

from moe_ep.distributed import GroupCoordinator, GroupKVPipe, TCPKVPipe
from moe_ep.testing import DistributedPool


def _kv(mib: int) -> torch.Tensor:
    # [layers, 2, blocks, block_size, heads, head_dim] bf16; blocks sized to reach `mib` MiB.
    layers, block_size, heads, head_dim = 8, 16, 8, 128
    blocks = max(1, (mib << 20) // (layers * 2 * block_size * heads * head_dim * 2))
    return torch.randn(layers, 2, blocks, block_size, heads, head_dim).to(torch.bfloat16)


_TCP_MODES = ("plain socket (sendall / recv_into)", "TCPKVPipe recv_tensor()",
              "TCPKVPipe recv_tensor(out=buf)")


def _tcp_receiver(raw_port: int, pipe_port: int, nbytes: int, reps: int) -> None:
    sock = socket.create_connection(("127.0.0.1", raw_port))
    pipe = TCPKVPipe("127.0.0.1", pipe_port, "client", timeout_s=120)
    raw = memoryview(bytearray(nbytes))
    buf = None
    for _ in range(reps):
        got = 0
        while got < nbytes:
            got += sock.recv_into(raw[got:], min(nbytes - got, 16 << 20))
        sock.sendall(b"k")
        t = pipe.recv_tensor()
        assert t.numel() * t.element_size() == nbytes
        pipe.send_tensor(None)
        buf = pipe.recv_tensor(out=buf if buf is not None else torch.empty_like(t))
        pipe.send_tensor(None)
    sock.close()
    pipe.close()


def _tcp(kv: torch.Tensor, reps: int) -> dict[str, list[float]]:
    """The three TCP modes, interleaved per repetition (load drift hits them alike)."""
    nbytes = kv.numel() * kv.element_size()
    listener = socket.create_server(("127.0.0.1", 0))
    pipe = TCPKVPipe("127.0.0.1", 0, "server", timeout_s=120)
    reps += 1  # one extra, untimed round first: connection set-up, the receiver's first pages
    proc = mp.get_context("spawn").Process(
        target=_tcp_receiver, args=(listener.getsockname()[1], pipe.port, nbytes, reps),
        daemon=True,
    )
    proc.start()
    times: dict[str, list[float]] = {m: [] for m in _TCP_MODES}
    try:
        sock, _ = listener.accept()
        data = memoryview(kv.reshape(-1).view(torch.uint8).numpy())
        for _ in range(reps):
            t0 = time.perf_counter()
            sock.sendall(data)
            assert sock.recv(1) == b"k"
            times[_TCP_MODES[0]].append(time.perf_counter() - t0)
            for mode in _TCP_MODES[1:]:
                t0 = time.perf_counter()
                pipe.send_tensor(kv)
                assert pipe.recv_tensor() is None
                times[mode].append(time.perf_counter() - t0)
        sock.close()
    finally:
        pipe.close()
        listener.close()
        proc.join(60)
    return {m: v[1:] for m, v in times.items()}


def _group_worker(info, mib: int, reps: int, into: bool) -> list[float]:
    g = GroupCoordinator([[0, 1]], "kv-bench")
    try:
        pipe = GroupKVPipe(g, 1 - info.rank)
        kv = _kv(mib) if info.rank == 0 else None
        buf = _kv(mib) if into and info.rank == 1 else None
        times = []
        for _ in range(reps + 1):  # the first is untimed, as for TCP
            g.barrier()
            t0 = time.perf_counter()
            if info.rank == 0:
                pipe.send_tensor(kv)
            else:
                pipe.recv_tensor(out=buf)
            g.barrier()  # the receiver holds the tensor
            times.append(time.perf_counter() - t0)
        return times[1:]
    finally:
        g.destroy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    kv = _kv(args.mib)
    nbytes = kv.numel() * kv.element_size()
    print(f"KV tensor {tuple(kv.shape)} bf16, {nbytes / 2**20:.0f} MiB; median of {args.reps}")
    results = _tcp(kv, args.reps)
    with DistributedPool(2) as pool:
        for into in (False, True):
            name = "GroupKVPipe (shm) " + ("recv_tensor(out=buf)" if into else "recv_tensor()")
            results[name] = pool.run(_group_worker, args.mib, args.reps, into, timeout=600)[1]
    base = statistics.median(results["plain socket (sendall / recv_into)"])
    for name, times in results.items():
        t = statistics.median(times)
        print(f"{name:<36} {t * 1e3:8.1f} ms  {nbytes / t / 1e9:6.2f} GB/s  "
              f"({base / t:.2f}x the plain socket)  reps: "
              + " ".join(f"{v * 1e3:.0f}" for v in times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
