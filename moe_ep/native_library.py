"""Loading one of moe_ep's native libraries with ctypes (the shared-memory transport, the CPU
kernels, the CUDA custom all-reduce): find the built module, load it, declare its functions.

Each library's own module keeps its signatures, its ABI version and its reasons; this holds
only the part that is the same for all three (find, load, declare, check the ABI), so that a
missing, unloadable or stale build is reported in one way: `(None, why)`, not an exception.
"""

from __future__ import annotations

import ctypes
import importlib.util
from typing import Any

#: function name -> (restype, argtypes)
Signatures = dict[str, tuple[Any, list[Any]]]


def load_library(module: str, signatures: Signatures, *, not_built: str,
                 abi: tuple[str, int] | None = None) -> tuple[ctypes.CDLL | None, str]:
    """`module`'s shared library with `signatures` declared, and ""; or None and why not.

    Args:
        module: the extension's import name, e.g. "moe_ep._shm_native".
        signatures: every function the caller uses; a missing one means a stale build.
        not_built: the reason to give when the module was never built here.
        abi: `(function, version)`: the library's ABI function (declared in `signatures`)
            must return `version`, else the build is stale.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None, not_built
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        return None, f"cannot load {spec.origin}: {e}"
    try:
        for name, (res, args) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
    except AttributeError as e:
        return None, f"{spec.origin} is stale ({e}); reinstall the package"
    if abi is not None:
        found = getattr(lib, abi[0])()
        if found != abi[1]:
            return None, f"{spec.origin} has ABI {found}, expected {abi[1]}; reinstall"
    return lib, ""
