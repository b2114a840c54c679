"""The option dataclasses of every backend, in one light module.

Configs validate a rule's options at load time, on any machine, through
`moe_ep.managers.registry.options_class`; keeping the dataclasses here means that parsing a
config imports no backend module (and no vendor package). Each backend module uses its class
from here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AllToAllVOptions",
    "DeepEPHighThroughputOptions",
    "DeepEPLowLatencyOptions",
    "NoOptions",
    "PplxOptions",
    "ShmAll2AllOptions",
    "VendorOptions",
    "check_option_type",
]

_SHM_LAYOUTS = ("token", "expert_packed")


def check_option_type(name: str, value: object, types: tuple[type, ...]) -> None:
    """Raise TypeError unless `value` is one of `types` (bool is not accepted as int)."""
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        wanted = " or ".join(t.__name__ for t in types)
        raise TypeError(f"option {name!r} must be {wanted}, got {value!r}")


def _check_capacity(value: object) -> None:
    """The `max_tokens_per_rank` option: an int >= 1."""
    check_option_type("max_tokens_per_rank", value, (int,))
    if value < 1:
        raise ValueError(f"option 'max_tokens_per_rank' must be >= 1, got {value}")


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
        _check_capacity(self.max_tokens_per_rank)


@dataclass(frozen=True)
class VendorOptions:
    """Options every vendor backend takes.

    Attributes:
        exchange: exchange the per-call header (default; see `moe_ep.managers.vendor`). False
            for CUDA-graph capture: local checks only, and a rank's error leaves its peers waiting
            in the vendor kernel until its timeout.
        max_tokens_per_rank: capacity of the handle a dispatch without a handle gets (grown to
            a power of two when a call needs more; the same on every rank).
    """

    exchange: bool = True
    max_tokens_per_rank: int = 256

    def __post_init__(self) -> None:
        check_option_type("exchange", self.exchange, (bool,))
        _check_capacity(self.max_tokens_per_rank)


@dataclass(frozen=True)
class DeepEPHighThroughputOptions(VendorOptions):
    """Options of `deepep_high_throughput` (and those of `VendorOptions`).

    Attributes:
        num_nvl_bytes: NVLink buffer bytes per rank (a multiple of 128); None: DeepEP's size
            hint for the spec (vLLM passes 1 GiB).
        fixed_rows: intranode, receive `W * max_tokens_per_rank` rows (`num_worst_tokens`):
            no CPU wait, CUDA-graph capturable. False: exactly the rows that arrive, after a
            CPU wait for the count. Internode DeepEP always waits.
    """

    num_nvl_bytes: int | None = None
    fixed_rows: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_nvl_bytes is not None:
            check_option_type("num_nvl_bytes", self.num_nvl_bytes, (int,))
            if self.num_nvl_bytes <= 0 or self.num_nvl_bytes % 128:
                raise ValueError("option 'num_nvl_bytes' must be a positive multiple of 128, "
                                 f"got {self.num_nvl_bytes}")
        check_option_type("fixed_rows", self.fixed_rows, (bool,))


@dataclass(frozen=True)
class DeepEPLowLatencyOptions(VendorOptions):
    """Options of `deepep_low_latency` (and those of `VendorOptions`).

    Attributes:
        use_fp8: DeepEP casts the bfloat16 input to float8_e4m3fn inside the dispatch kernel
            (per-token, per-128-channel float32 scales in `x_scales`).
        round_scale: with `use_fp8`, round the scales up to powers of two.
        allow_mnnvl: let NVSHMEM use multi-node NVLink (GB200/GB300 racks).
    """

    use_fp8: bool = False
    round_scale: bool = False
    allow_mnnvl: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("use_fp8", "round_scale", "allow_mnnvl"):
            check_option_type(name, getattr(self, name), (bool,))
        if self.round_scale and not self.use_fp8:
            raise ValueError("option 'round_scale' needs use_fp8=True")


@dataclass(frozen=True)
class PplxOptions(VendorOptions):
    """Options of `pplx` (and those of `VendorOptions`).

    Attributes:
        internode: True: NVSHMEM (`AllToAll.internode`); False: CUDA IPC within one node
            (`AllToAll.intranode`); None (default): intranode when every rank shares rank 0's
            node.
    """

    internode: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.internode is not None:
            check_option_type("internode", self.internode, (bool,))
