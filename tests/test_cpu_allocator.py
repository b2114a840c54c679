"""retain_freed_memory keeps freed large tensors in the heap (the property the benchmark needs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROBE = """
import sys, torch
from moe_ep.cpu_allocator import retain_freed_memory
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
ok = retain_freed_memory() if sys.argv[1] == "retain" else None
before = rss_mib()
x = torch.ones(64 * 2**20 // 4)      # 64 MiB, every page touched
del x
print(ok, rss_mib() - before)
"""


def _retained_mib(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_freed_memory_is_retained_only_when_asked():
    ok, retained = _retained_mib("retain")
    assert ok == "True"
    assert retained > 48, f"only {retained:.1f} MiB of a freed 64 MiB tensor stayed mapped"
    _, default = _retained_mib("default")
    assert default < 16, f"glibc kept {default:.1f} MiB by default: the probe proves nothing here"


_POLICY = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from moe_ep import cpu_allocator
if sys.argv[1] == "opt-out":
    cpu_allocator.set_retain_freed_memory(False)
print(cpu_allocator.tune_cpu_allocator(), cpu_allocator.tune_cpu_allocator())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
@pytest.mark.parametrize("mode", ["default", "opt-out", "env"])
def test_library_tunes_the_allocator_once_logged_with_an_opt_out(mode):
    import os

    env = dict(os.environ, MOE_EP_SYSTEM_MALLOC="1" if mode == "env" else "")
    out = subprocess.run([sys.executable, "-c", _POLICY, mode], capture_output=True, text=True,
                         check=True, timeout=120, env=env)
    if mode == "default":
        assert out.stdout.split() == ["True", "True"]
        assert out.stderr.count("glibc malloc now keeps freed memory") == 1
    else:
        assert out.stdout.split() == ["False", "False"]
        assert "glibc malloc now" not in out.stderr
