"""Build hook for the native CPU shared-memory library (csrc/cpu).

Package metadata lives in pyproject.toml; this file only adds the C library, so that every
`pip install .` / `pip install -e .` compiles it once (about a second, no torch headers).
It is a plain C shared object loaded with ctypes by `moe_ep.distributed.shm`, not a Python
extension module. Hot loops carry `target_clones` (x86-64 v4 / v3 / baseline picked at load
time), so the binary stays valid if the installed tree moves to another x86-64 CPU.
The extension is optional: without a C compiler the install still succeeds and the shm layer
reports itself unavailable (process groups fall back to gloo).
"""

import sys
from pathlib import Path

from setuptools import Extension, setup

_CPU = Path("csrc") / "cpu"

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "moe_ep._shm_native",
            sources=[str(p) for p in sorted(_CPU.glob("*.c"))],
            depends=[str(p) for p in sorted(_CPU.glob("*.h"))],
            extra_compile_args=["-O3", "-std=gnu11", "-fvisibility=hidden", "-Wall"],
            libraries=["rt"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
