"""Throughput of a KV-cache transfer: `TCPKVPipe` vs a plain socket copy of the same bytes,
and `GroupKVPipe` (shared memory on one node), between two processes on this machine.

    python bench/bench_kv_pipe.py                 # 256 MiB bf16 KV tensor, 5 repetitions
    python bench/bench_kv_pipe.py --mib 64 --reps 3

Each repetition times one transfer from the first byte sent until the receiver acknowledges
that it holds the whole tensor (TCP) or until `recv_tensor` returns on the receiver (group).
The plain socket baseline sends the tensor's bytes with `sendall` and receives them with
`recv_into` a preallocated buffer: the least any TCP pipe must do. Numbers are medians.
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


def _tcp_receiver(port: int, nbytes: int, reps: int, raw: bool) -> None:
    if raw:
        sock = socket.create_connection(("127.0.0.1", port))
        buf = bytearray(nbytes)
        view = memoryview(buf)
        for _ in range(reps):
            got = 0
            while got < nbytes:
                got += sock.recv_into(view[got:], min(nbytes - got, 16 << 20))
            sock.sendall(b"k")
        sock.close()
        return
    pipe = TCPKVPipe("127.0.0.1", port, "client", timeout_s=120)
    for _ in range(reps):
        t = pipe.recv_tensor()
        assert t.numel() * t.element_size() == nbytes
        pipe.send_tensor(None)  # the acknowledgement
    pipe.close()


def _tcp(kv: torch.Tensor, reps: int, raw: bool) -> list[float]:
    nbytes = kv.numel() * kv.element_size()
    ctx = mp.get_context("spawn")
    if raw:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    else:
        pipe = TCPKVPipe("127.0.0.1", 0, "server", timeout_s=120)
        port = pipe.port
    proc = ctx.Process(target=_tcp_receiver, args=(port, nbytes, reps, raw), daemon=True)
    proc.start()
    times = []
    try:
        if raw:
            sock, _ = listener.accept()
            data = memoryview(kv.reshape(-1).view(torch.uint8).numpy())
        for _ in range(reps):
            t0 = time.perf_counter()
            if raw:
                sock.sendall(data)
                assert sock.recv(1) == b"k"
            else:
                pipe.send_tensor(kv)
                assert pipe.recv_tensor() is None
            times.append(time.perf_counter() - t0)
    finally:
        (sock if raw else pipe).close()
        if raw:
            listener.close()
        proc.join(60)
    return times


def _group_worker(info, mib: int, reps: int) -> list[float]:
    g = GroupCoordinator([[0, 1]], "kv-bench")
    try:
        pipe = GroupKVPipe(g, 1 - info.rank)
        kv = _kv(mib) if info.rank == 0 else None
        times = []
        for _ in range(reps):
            g.barrier()
            t0 = time.perf_counter()
            if info.rank == 0:
                pipe.send_tensor(kv)
            else:
                pipe.recv_tensor()
            g.barrier()  # the receiver holds the tensor
            times.append(time.perf_counter() - t0)
        return times
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
    results = {
        "plain socket (sendall / recv_into)": _tcp(kv, args.reps, raw=True),
        "TCPKVPipe": _tcp(kv, args.reps, raw=False),
    }
    with DistributedPool(2) as pool:
        results["GroupKVPipe (shm)"] = pool.run(_group_worker, args.mib, args.reps,
                                                timeout=600)[1]
    base = statistics.median(results["plain socket (sendall / recv_into)"])
    for name, times in results.items():
        t = statistics.median(times)
        print(f"{name:<36} {t * 1e3:8.1f} ms  {nbytes / t / 1e9:6.2f} GB/s  "
              f"({base / t:.2f}x the plain socket)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
