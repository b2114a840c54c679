"""Wire accounting: the bytes each rank puts on the wire per dispatch / combine.

Each manager records, per call, the bytes this rank sends (`WireBytes`), computed from the
sizes of the tensors it hands to each collective under that collective's standard algorithm
(broadcast: the root sends its tensor to every other rank; all-gather: a rank's part goes to
every other rank; ring all-reduce: `2 (W-1)/W` of the tensor; reduce-scatter and all-to-all:
every chunk addressed to another rank). Chunks a rank keeps are not counted. torch.distributed
exposes no byte counters, so this is the data volume handed to the collectives, not a hardware
counter; a transport may move more (over plain gloo, `all_gatherv` pads every rank to the
largest count and `reduce_scatterv` is an all-reduce).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["WireBytes", "WireCounter"]


@dataclass(frozen=True)
class WireBytes:
    """Bytes one rank put on the wire during one dispatch or combine.

    Attributes:
        payload: token rows (activations, expert outputs, scales).
        metadata: expert ids, router weights sent beside the rows.
        header: the per-call exchange of counts, errors and identity.
        collectives: number of collective calls issued.
    """

    payload: int = 0
    metadata: int = 0
    header: int = 0
    collectives: int = 0

    @property
    def total(self) -> int:
        return self.payload + self.metadata + self.header


class WireCounter:
    """Mutable accumulator behind `WireBytes`; one per dispatch / combine call."""

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size = world_size
        self.rank = rank
        self.payload = self.metadata = self.header = self.collectives = 0

    def _add(self, payload: int, metadata: int) -> None:
        self.payload += int(payload)
        self.metadata += int(metadata)
        self.collectives += 1

    def all_gather(self, own_payload: int, own_metadata: int = 0) -> None:
        """This rank's part goes to each of the other W-1 ranks."""
        if self.world_size > 1:
            w = self.world_size
            self._add((w - 1) * own_payload, (w - 1) * own_metadata)

    def header_exchange(self, own_nbytes: int) -> None:
        """The per-call exchange (an all-gather), counted apart from payload and metadata."""
        if self.world_size > 1:
            self.header += (self.world_size - 1) * int(own_nbytes)
            self.collectives += 1

    def broadcast(self, src: int, payload: int, metadata: int = 0) -> None:
        """The root sends its tensor to the other W-1 ranks; the others send nothing."""
        if self.world_size > 1:
            w = self.world_size
            if src == self.rank:
                self._add((w - 1) * payload, (w - 1) * metadata)
            else:
                self._add(0, 0)

    def all_reduce(self, total_payload: int) -> None:
        """Ring all-reduce: reduce-scatter then all-gather, each sending (W-1)/W of the data."""
        if self.world_size > 1:
            w = self.world_size
            self._add(2 * (w - 1) * total_payload // w, 0)

    def to_others(self, payload_chunks: Sequence[int], metadata_chunks: Sequence[int] = ()) -> None:
        """Reduce-scatter / all-to-all: chunk r goes to rank r; the own chunk stays local."""
        if self.world_size > 1:
            self._add(
                sum(n for r, n in enumerate(payload_chunks) if r != self.rank),
                sum(n for r, n in enumerate(metadata_chunks) if r != self.rank),
            )

    def sent(self, payload: int, metadata: int = 0) -> None:
        """One collective that put these bytes (all for other ranks) on the wire."""
        if self.world_size > 1:
            self._add(payload, metadata)

    def freeze(self) -> WireBytes:
        return WireBytes(self.payload, self.metadata, self.header, self.collectives)
