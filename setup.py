"""Build hooks for the native libraries.

Package metadata lives in pyproject.toml; this file only adds plain shared objects, loaded with
ctypes, not imported as Python extension modules:

* `moe_ep._shm_native` (csrc/cpu/shm_*.c): the shared-memory transport (segments, collectives,
  point-to-point, the MoE token exchange), bound by `moe_ep.distributed.shm` / `shm_exchange`.
* `moe_ep._kernels_native` (csrc/cpu/kernels/*.c): the local MoE kernels (routing plans,
  segment sums), bound by `moe_ep.kernels`.
* `moe_ep._custom_ar` (csrc/custom_all_reduce.cu): the CUDA IPC custom all-reduce, built only
  when `nvcc` is found *and* the torch that the build sees is a CUDA build
  (`torch.version.cuda`); a CPU install never tries. Under pip's build isolation torch is not
  importable, so install with `--no-build-isolation` on GPU machines. Architectures:
  `TORCH_CUDA_ARCH_LIST` (e.g. "8.0;9.0"), else 8.0 / 8.6 / 8.9 / 9.0 (+ PTX).

The C libraries take a couple of seconds and no torch headers. Hot loops carry `target_clones`
(x86-64 v4 / v3 / baseline picked at load time), so the binaries stay valid if the installed tree
moves to another x86-64 CPU. They are optional: without a C compiler the install still
succeeds; the shm layer reports itself unavailable (process groups fall back to gloo) and the
managers use their torch code paths.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_CPU = Path("csrc") / "cpu"
_FLAGS = ["-O3", "-std=gnu11", "-fvisibility=hidden", "-Wall"]
_CUDA_SOURCE = Path("csrc") / "custom_all_reduce.cu"
_DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def cuda_build_plan() -> tuple[list[str] | None, str]:
    """(the nvcc command line without output path, "") or (None, why the CUDA library is not
    built here)."""
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None
    )
    if nvcc is None or not os.path.exists(nvcc):
        return None, "nvcc not found"
    try:
        import torch
    except ImportError:
        return None, "torch is not importable at build time (use --no-build-isolation)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", _DEFAULT_ARCHS).replace(",", ";").split(";")
    gencode = []
    for arch in filter(None, (a.strip().removesuffix("+PTX") for a in archs)):
        cc = arch.replace(".", "")
        gencode += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    last = archs[-1].strip().removesuffix("+PTX").replace(".", "")
    gencode += ["-gencode", f"arch=compute_{last},code=compute_{last}"]
    return [nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
            "-Icsrc", *gencode, str(_CUDA_SOURCE), "-lcudart"], ""


class BuildExt(build_ext):
    """build_ext, then the CUDA library where `cuda_build_plan` allows it."""

    def run(self):
        super().run()
        cmd, why = cuda_build_plan()
        if cmd is None:
            print(f"moe_ep: not building the CUDA custom all-reduce: {why}")
            return
        out = Path(self.get_ext_fullpath("moe_ep._custom_ar"))
        out.parent.mkdir(parents=True, exist_ok=True)
        print("moe_ep: building the CUDA custom all-reduce:", " ".join(cmd))
        subprocess.check_call([*cmd, "-o", str(out)])


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

if __name__ == "__main__":
    setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
