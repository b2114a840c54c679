"""The one loader of the native libraries says why a build cannot be used, never raises."""

import ctypes

from moe_ep.native_library import load_library

_KERNELS = "moe_ep._kernels_native"
_ABI_FN = {"moe_kernels_abi": (ctypes.c_uint32, [])}


def test_loads_a_current_build():
    from moe_ep.kernels.native import _ABI

    lib, why = load_library(_KERNELS, _ABI_FN, not_built="x", abi=("moe_kernels_abi", _ABI))
    assert lib is not None and why == ""


def test_names_a_stale_abi_a_missing_function_and_a_missing_build():
    from moe_ep.kernels.native import _ABI

    lib, why = load_library(_KERNELS, _ABI_FN, not_built="x", abi=("moe_kernels_abi", _ABI + 1))
    assert lib is None and f"has ABI {_ABI}, expected {_ABI + 1}; reinstall" in why
    lib, why = load_library(_KERNELS, {"no_such_function": (None, [])}, not_built="x")
    assert lib is None and "is stale" in why and "no_such_function" in why
    lib, why = load_library("moe_ep._never_built", {}, not_built="not built here")
    assert (lib, why) == (None, "not built here")
