"""Build hook for the native CPU libraries (csrc/cpu).

Package metadata lives in pyproject.toml; this file only adds two plain C shared objects, so
that every `pip install .` / `pip install -e .` compiles them once (a couple of seconds, no
torch headers). Both are loaded with ctypes, not imported as Python extension modules:

* `moe_ep._shm_native` (csrc/cpu/shm_*.c): the shared-memory transport (segments, collectives,
  point-to-point, the MoE token exchange), bound by `moe_ep.distributed.shm` / `shm_exchange`.
* `moe_ep._kernels_native` (csrc/cpu/kernels/*.c): the local MoE kernels (routing plans,
  segment sums), bound by `moe_ep.kernels`.

Hot loops carry `target_clones` (x86-64 v4 / v3 / baseline picked at load time), so the
binaries stay valid if the installed tree moves to another x86-64 CPU. The extensions are
optional: without a C compiler the install still succeeds; the shm layer reports itself
unavailable (process groups fall back to gloo) and the managers use their torch code paths.
"""

import sys
from pathlib import Path

from setuptools import Extension, setup

_CPU = Path("csrc") / "cpu"
_FLAGS = ["-O3", "-std=gnu11", "-fvisibility=hidden", "-Wall"]


def _native(name: str, sources: list[Path], headers: list[Path]) -> Extension:
    return Extension(
        name,
        sources=[str(p) for p in sources],
        depends=[str(p) for p in headers],
        extra_compile_args=_FLAGS,
        libraries=["rt"],
        optional=True,
    )


ext_modules = []
if sys.platform.startswith("linux"):
    headers = sorted(_CPU.glob("*.h")) + sorted((_CPU / "kernels").glob("*.h"))
    ext_modules = [
        _native("moe_ep._shm_native", sorted(_CPU.glob("shm_*.c")), headers),
        _native("moe_ep._kernels_native", sorted((_CPU / "kernels").glob("*.c")), headers),
    ]

setup(ext_modules=ext_modules)
