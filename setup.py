"""Build hooks for the native libraries: the CPU shared-memory library (csrc/cpu) and, where
CUDA is present, the CUDA IPC custom all-reduce (csrc/custom_all_reduce.cu).

Package metadata lives in pyproject.toml. Both libraries are plain shared objects loaded with
ctypes, not Python extension modules:

* `moe_ep._shm_native` (C, about a second, no torch headers) is built on every Linux install.
  Hot loops carry `target_clones` (x86-64 v4 / v3 / baseline picked at load time), so the binary
  stays valid if the installed tree moves to another x86-64 CPU. It is optional: without a C
  compiler the install still succeeds and the shm layer reports itself unavailable.
* `moe_ep._custom_ar` (CUDA) is built only when `nvcc` is found *and* the torch that the build
  sees is a CUDA build (`torch.version.cuda`); a CPU install never tries. Under pip's build
  isolation torch is not importable, so install with `--no-build-isolation` on GPU machines.
  Architectures: `TORCH_CUDA_ARCH_LIST` (e.g. "8.0;9.0"), else 8.0 / 8.6 / 8.9 / 9.0 (+ PTX).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_CPU = Path("csrc") / "cpu"
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

if __name__ == "__main__":
    setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
