"""Argument checks shared by several layers; each error names the argument and what was
expected, as every public entry point of moe_ep does."""

from __future__ import annotations

__all__ = ["seconds"]


def seconds(value: object, arg: str, *, where: str = "", hint: str = "") -> float:
    """`value` as a float number of seconds, finite and > 0.

    Raises ValueError naming `arg` (after `where`, e.g. "GroupCoordinator('tp'): ", and with
    `hint` appended, e.g. " (or None for the world's timeout)") for a bool, a non-number, 0,
    a negative number, NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        0 < value < float("inf")
    ):
        raise ValueError(f"{where}{arg} must be a finite number of seconds > 0{hint}, got "
                         f"{value!r}")
    return float(value)
