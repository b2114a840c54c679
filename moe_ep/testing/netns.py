"""Two "hosts" on one Linux machine: multi-node jobs without a cluster.

Each host is a set of namespaces made for it and for nothing else:

- a network namespace (its own loopback, interfaces and routes), joined to the other host's by a
  veth pair created directly inside the two namespaces, with addresses in a random
  `10.213.X.0/24` subnet that exists only there (nothing is added to the machine's own network);
- a UTS namespace: its own host name, as two real hosts have;
- a mount namespace: a private tmpfs on `/dev/shm` (so shared memory written on one host is
  invisible on the other) and its own `/etc/hosts` naming both hosts (the cluster's DNS);
- a PID namespace: every process a host starts dies with the host's launcher.

Needs root, `ip` (iproute2) and `unshare` (util-linux); `namespace_support()` says why not.
`TwoHosts.close()` (also reached on errors, timeouts and Ctrl-C through `with`) kills every
process of both hosts, deletes the namespaces (and with them the veth pair; the tmpfs mounts
go with their mount namespaces) and the temporary directory. `processes_left()` lists any
process still inside one of the network namespaces, so callers can check that nothing leaked.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Host", "HostProcess", "TwoHosts", "namespace_support"]

# Every `ip` / `unshare` command is short; one that takes longer than this is stuck.
_CMD_TIMEOUT_S = 20.0
RDZV_PORT = 29400  # the ports are private to the namespaces: no clash with other jobs


@dataclass(frozen=True)
class Host:
    """One simulated host."""

    index: int
    hostname: str  # its UTS host name, also in both hosts' /etc/hosts
    netns: str  # `ip netns` name
    ifname: str  # its end of the veth pair
    addr: str  # its IPv4 address on the veth pair


@dataclass
class HostProcess:
    """A command running on one host (its launcher is the PID-namespace parent)."""

    host: Host
    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if it is still running after `timeout` seconds."""
        try:
            return self.popen.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the launcher: its PID-namespace init dies with it, and so does every process
        of the host (`unshare --kill-child`)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(timeout=_CMD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass

    def output(self) -> tuple[str, str]:
        return (self.stdout_path.read_text(errors="replace"),
                self.stderr_path.read_text(errors="replace"))


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT_S,
                          check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (status {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _die_with_parent() -> None:
    """In the launcher, before exec: SIGKILL it if the process that started it dies (a killed
    test run must not leave hosts running; the PID namespace takes the rest with it)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def namespace_support() -> tuple[bool, str]:
    """Whether `TwoHosts` can be built here, and if not, why (no side effects left behind)."""
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return False, "creating network and mount namespaces needs root"
    missing = [tool for tool in ("ip", "unshare") if shutil.which(tool) is None]
    if missing:
        return False, (f"{' and '.join(missing)} not found (install iproute2 / util-linux)")
    name = f"moeep-probe-{secrets.token_hex(4)}"
    try:
        _run(["ip", "netns", "add", name])
        try:
            _run(["ip", "-n", name, "link", "add", "probe0", "type", "veth", "peer", "name",
                  "probe1"])
            _run(["ip", "netns", "exec", name, "unshare", "--uts", "--mount", "--pid", "--fork",
                  "--kill-child", "--mount-proc", "--", "/bin/sh", "-c",
                  "hostname moeep-probe && mount -t tmpfs tmpfs /dev/shm"])
        finally:
            _run(["ip", "netns", "delete", name], check=False)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot create namespaces here: {exc}"
    return True, "root, ip and unshare available; namespaces can be created"


class TwoHosts:
    """Two hosts joined by a veth pair (see the module docstring). Use as a context manager.

    Args:
        shm_size: size limit of each host's private /dev/shm tmpfs.
    """

    def __init__(self, *, shm_size: str = "512m"):
        self._shm_size = shm_size
        self._processes: list[HostProcess] = []
        self._netns: list[str] = []
        self._ns_inodes: set[int] = set()
        self.tmp = Path(tempfile.mkdtemp(prefix="moe_ep_two_hosts_"))
        tag = secrets.token_hex(3)
        subnet = f"10.213.{secrets.randbelow(256)}"
        self.hosts = tuple(
            Host(i, f"moeep-{tag}-h{i}", f"moeep-{tag}-h{i}", f"mep{tag}h{i}", f"{subnet}.{i + 1}")
            for i in range(2)
        )
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        a, b = self.hosts
        for host in self.hosts:
            _run(["ip", "netns", "add", host.netns])
            self._netns.append(host.netns)
            self._ns_inodes.add(os.stat(f"/run/netns/{host.netns}").st_ino)
            _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
        # Both ends are created inside their namespaces: the machine's own network never sees
        # the pair, so parallel runs cannot collide on interface names.
        _run(["ip", "link", "add", a.ifname, "netns", a.netns, "type", "veth",
              "peer", "name", b.ifname, "netns", b.netns])
        for host in self.hosts:
            _run(["ip", "-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.ifname])
            _run(["ip", "-n", host.netns, "link", "set", host.ifname, "up"])
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{h.addr} {h.hostname}\n" for h in self.hosts)
        (self.tmp / "hosts").write_text(hosts_file)

    # ------------------------------------------------------------------ processes
    def popen(self, index: int, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              label: str = "job") -> HostProcess:
        """Start `argv` on host `index`, its stdout / stderr going to files in `self.tmp`."""
        host = self.hosts[index]
        # sh stays as the PID namespace's init (not exec'd) so that the command runs as an
        # ordinary process; its exit status becomes the launcher's.
        setup = ('set -e; hostname "$1"; '
                 f'mount -t tmpfs -o mode=1777,size={self._shm_size} moe_ep_shm /dev/shm; '
                 'mount --bind "$2" /etc/hosts; shift 2; set +e; "$@"')
        full = ["ip", "netns", "exec", host.netns, "unshare", "--uts", "--mount", "--pid",
                "--fork", "--kill-child", "--mount-proc", "--", "/bin/sh", "-c", setup, "sh",
                host.hostname, str(self.tmp / "hosts"), *argv]
        stdout_path = self.tmp / f"{label}.h{index}.out"
        stderr_path = self.tmp / f"{label}.h{index}.err"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            popen = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                     env=dict(os.environ if env is None else env),
                                     start_new_session=True, preexec_fn=_die_with_parent)
        proc = HostProcess(host, popen, stdout_path, stderr_path)
        self._processes.append(proc)
        return proc

    def cut(self, index: int) -> None:
        """Take host `index` off the network: its end of the veth pair goes down."""
        host = self.hosts[index]
        _run(["ip", "-n", host.netns, "link", "set", host.ifname, "down"])

    def reconnect(self, index: int) -> None:
        """Undo `cut(index)`."""
        host = self.hosts[index]
        _run(["ip", "-n", host.netns, "link", "set", host.ifname, "up"])

    def processes_left(self, wait: float = 0.0) -> list[int]:
        """PIDs of the processes inside either host's network namespace, after waiting up to
        `wait` seconds for that list to become empty (killed processes take a moment to go)."""
        deadline = time.monotonic() + wait
        left = self._processes_in_namespaces()
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = self._processes_in_namespaces()
        return left

    def _processes_in_namespaces(self) -> list[int]:
        wanted = {f"net:[{ino}]" for ino in self._ns_inodes}
        left = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/net") in wanted:
                    left.append(int(entry))
            except OSError:
                continue  # exited meanwhile, or a kernel thread
        return left

    def kill_all(self, timeout: float = 10.0) -> list[int]:
        """Kill every process of both hosts; returns the PIDs still there after `timeout`."""
        for proc in self._processes:
            proc.kill()
        deadline = time.monotonic() + timeout
        left = self.processes_left(wait=1.0)
        while left and time.monotonic() < deadline:
            for pid in left:  # chosen by namespace, and only this object made the namespaces
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
            left = self.processes_left()
        return left

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Tear everything down (idempotent; every step runs even if an earlier one failed)."""
        try:
            self.kill_all()
        finally:
            for name in self._netns:
                _run(["ip", "netns", "delete", name], check=False)
            self._netns.clear()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> TwoHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
