"""The option dataclasses of every backend, in one light module.

Configs validate a rule's options at load time, on any machine, through
`moe_ep.managers.registry.options_class`; keeping the dataclasses here means that parsing a
config imports no backend module (and no vendor package). Each backend module uses its class
from here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AllToAllVOptions", "NoOptions", "ShmAll2AllOptions", "check_option_type"]

_SHM_LAYOUTS = ("token", "expert_packed")


def check_option_type(name: str, value: object, types: tuple[type, ...]) -> None:
    """Raise TypeError unless `value` is one of `types` (bool is not accepted as int)."""
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        wanted = " or ".join(t.__name__ for t in types)
        raise TypeError(f"option {name!r} must be {wanted}, got {value!r}")


@dataclass(frozen=True)
class NoOptions:
    """Options of a manager that takes none."""


@dataclass(frozen=True)
class AllToAllVOptions:
    """Options of `alltoallv`.

    Attributes:
        dedup: send a token once per destination rank (True) rather than once per
            (token, expert) (False). Both are exact; True moves fewer bytes when a token has
            several experts on one rank.
    """

    dedup: bool = True

    def __post_init__(self) -> None:
        check_option_type("dedup", self.dedup, (bool,))


@dataclass(frozen=True)
class ShmAll2AllOptions:
    """Options of `shm`.

    Attributes:
        layout: "token" (default; rows read in place, one per (token, destination)) or
            "expert_packed" (rows grouped by local expert).
        max_tokens_per_rank: capacity of the handle a dispatch without a handle gets (grown
            to a power of two when a call needs more).
    """

    layout: str = "token"
    max_tokens_per_rank: int = 256

    def __post_init__(self) -> None:
        check_option_type("layout", self.layout, (str,))
        if self.layout not in _SHM_LAYOUTS:
            raise ValueError(
                f"option 'layout' must be one of {_SHM_LAYOUTS}, got {self.layout!r}")
        check_option_type("max_tokens_per_rank", self.max_tokens_per_rank, (int,))
        if self.max_tokens_per_rank < 1:
            raise ValueError(
                f"option 'max_tokens_per_rank' must be >= 1, got {self.max_tokens_per_rank}")
