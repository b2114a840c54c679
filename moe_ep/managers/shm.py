"""``shm``: sparse dispatch / combine through CPU shared memory (EXPERT_PACKED layout).

For the ranks of one node (CPU inference, tests). The routing is that of ``alltoallv`` with
deduplication — a token travels once to each rank owning at least one of its experts — but
the bytes move through the group's shared-memory segment (:mod:`moe_ep.distributed.shm`)
instead of gloo sockets, and without staging copies:

Dispatch (rank ``s``, N tokens, top-k K, W ranks):

1. Locally: the distinct (destination, token) rows, sorted by destination then token, and one
   routing record per valid (token, k) pair, ``[row_in_destination_chunk * max_local_experts +
   local_expert, float32 weight bits]`` (two int32).
2. One shared-memory all-to-all: each rank copies, per destination, its routing records and
   then the rows ``x[token]`` straight from ``x`` into the destination's part of its slot
   (indexed copy, no ``index_select`` staging); each rank reads only the parts addressed to
   it. Sizes travel inside the exchange, so no count all-gather is needed beyond the dispatch
   header every manager exchanges for its input check.
3. The receiver decodes the records, orders them stably by local expert and gathers one row
   per (token, local expert): ``x [R, H]`` in ``tokens_per_expert`` segments, rows of one
   expert in (source rank, token) order.

Combine: per received row, the weighted sum of its expert outputs (``sum_e w_e f_e(row)``,
fp32 accumulation, one rounding) is computed in one pass by a native kernel, sent back with one
shared-memory all-to-all, and the sender sums the (at most W) returned rows of each token in
fp32 with the same kernel: ``y[n] = sum_k w[n, k] f_{ids[n, k]}(x[n])``.

Bytes per token a rank puts in shared memory for other ranks are those of ``alltoallv`` with
``dedup=True`` (``d B + 8 p`` dispatch, ``d B`` combine), plus the dispatch header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moe_ep.managers.base import (
    _INT32_MAX,
    All2AllManager,
    CheckedDispatchInputs,
    DispatchResult,
    Layout,
    ManagerUnavailableError,
    check_option_type,
    expert_placement,
)

__all__ = ["ShmAll2AllHandle", "ShmAll2AllManager", "ShmAll2AllOptions"]

# dtypes the native segment-sum kernel handles; others (fp64) use torch.
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ShmAll2AllOptions:
    """Options of ``shm``.

    Attributes:
        buffer_bytes: half-slot size of the manager's own segment, used only when the group has
            no shared-memory communicator (``GroupCoordinator(use_shm=False)``); None = the
            default of :class:`~moe_ep.distributed.shm.ShmCommunicator`.
    """

    buffer_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.buffer_bytes is not None:
            check_option_type("buffer_bytes", self.buffer_bytes, (int,))
            if self.buffer_bytes < 4096 or self.buffer_bytes % 4096:
                raise ValueError(
                    f"option 'buffer_bytes' must be a positive multiple of 4096, "
                    f"got {self.buffer_bytes}"
                )


@dataclass(frozen=True, eq=False)
class ShmAll2AllHandle:
    """State the combine needs (shapes as on this rank).

    Attributes:
        num_tokens: N, tokens this rank dispatched.
        hidden: H.
        dtype: dtype of the dispatched x (wire and output dtype of the combine).
        send_rows: ``[W]`` rows sent to each rank (one per (token, destination)).
        recv_rows: ``[W]`` rows received from each rank.
        packed_rows: R, rows of the dispatched ``x``.
        row_order, row_offsets, row_weights: CSR of the packed rows by received row
            (``[R] int64`` packed row ids, ``[received + 1] int64``, ``[R] float32``).
        token_order, token_offsets: CSR of the sent rows by token (``[S] int64``,
            ``[N + 1] int64``).
    """

    num_tokens: int
    hidden: int
    dtype: torch.dtype
    send_rows: tuple[int, ...]
    recv_rows: tuple[int, ...]
    packed_rows: int
    row_order: torch.Tensor
    row_offsets: torch.Tensor
    row_weights: torch.Tensor
    token_order: torch.Tensor
    token_offsets: torch.Tensor


@dataclass(frozen=True, eq=False)
class _SendPlan:
    send_token: torch.Tensor  # [S] int64, sorted by destination then token
    send_rows: tuple[int, ...]  # [W]
    send_pairs: tuple[int, ...]  # [W]
    records: torch.Tensor  # [P, 2] int32: code, weight bits; grouped by destination
    token_offsets: torch.Tensor  # [N + 1] int64: CSR of the sent rows by token
    token_order: torch.Tensor  # [S] int64


def _segment_sum(
    src: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """``out[j] = sum_{t in segment j} weights[t] * src[order[t]]`` in src's dtype, fp32 sums."""
    if src.dtype in _NATIVE_DTYPES:
        from moe_ep.distributed.shm import segment_sum

        return segment_sum(src.contiguous(), order, offsets, weights)
    nseg = offsets.numel() - 1
    segment = torch.repeat_interleave(torch.arange(nseg), offsets[1:] - offsets[:-1])
    rows = src.index_select(0, order).to(torch.float64)
    if weights is not None:
        rows = rows * weights[:, None].to(torch.float64)
    out = torch.zeros((nseg, src.shape[1]), dtype=torch.float64)
    out.index_add_(0, segment, rows)
    return out.to(src.dtype)


class ShmAll2AllManager(All2AllManager):
    """Sparse dispatch / combine through CPU shared memory, for the ranks of one node."""

    name: ClassVar[str] = "shm"
    layout: ClassVar[Layout] = Layout.EXPERT_PACKED
    options_cls: ClassVar[type] = ShmAll2AllOptions

    @classmethod
    def availability(cls, topology: Any) -> tuple[bool, str]:
        from moe_ep.distributed.shm import ShmCommunicator

        device = str(getattr(topology, "device", "cpu"))
        if device != "cpu":
            return False, f"CPU shared memory only (this topology's device is {device!r})"
        if getattr(topology, "internode", False):
            return False, "needs every rank on one node (this topology spans several nodes)"
        ok, reason = ShmCommunicator.available()
        if not ok:
            return False, reason
        return True, "CPU ranks on one node: data moves through a shared-memory segment"

    def __init__(self, group: Any, **options: Any) -> None:
        super().__init__(group, **options)
        self._placement_tables: dict[int, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        self._comm = None
        self._own_comm = None
        if self.world_size == 1:
            return
        if torch.device(group.device).type != "cpu":
            raise ManagerUnavailableError(
                f"manager 'shm' needs a CPU group, group {self.group_name!r} is on {group.device}"
            )
        comm = getattr(group, "shm", None)
        if comm is None:
            from moe_ep.distributed.group import in_the_same_node_as
            from moe_ep.distributed.shm import ShmCommunicator, ShmUnavailableError

            # Decided collectively, so that every rank refuses alike instead of leaving its
            # peers in the segment set-up below: ranks on other hosts cannot map a segment
            # made in this host's /dev/shm, and the native library may be missing on one host.
            apart = [r for r, same in enumerate(in_the_same_node_as(group, 0)) if not same]
            if apart:
                raise ManagerUnavailableError(
                    f"manager 'shm' needs every rank of group {self.group_name!r} on one node; "
                    f"ranks {apart} are not on the node of rank 0"
                )
            usable = group.all_gather_object(ShmCommunicator.available())
            missing = [f"rank {r}: {reason}" for r, (ok, reason) in enumerate(usable) if not ok]
            if missing:
                raise ManagerUnavailableError(f"manager 'shm' is unavailable: {'; '.join(missing)}")
            kwargs = {}
            if self.options.buffer_bytes is not None:
                kwargs["buffer_bytes"] = self.options.buffer_bytes
            try:
                # Collective: every rank of the group builds the manager.
                comm = ShmCommunicator(
                    group.cpu_group, self.rank, self.world_size, f"{self.group_name}-a2a", **kwargs
                )
            except ShmUnavailableError as e:
                raise ManagerUnavailableError(f"manager 'shm' is unavailable: {e}") from e
            self._own_comm = comm
        self._comm = comm

    def destroy(self) -> None:
        """Free the handles and the manager's own segment, if it made one (idempotent)."""
        if self._own_comm is not None:
            self._own_comm.destroy()
            self._own_comm = None
        self._comm = None
        super().destroy()

    # ---- planning (local, before the header) -------------------------------------------------

    def _tables(self, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Owner rank and local index of every expert ``[E] int64``, max and own local count."""
        tables = self._placement_tables.get(num_experts)
        if tables is None:
            placement = expert_placement(num_experts, self.world_size)
            owner = placement.owner_table()
            local = torch.arange(num_experts) - torch.tensor(placement.starts)[owner]
            tables = (owner, local, placement.max_local, placement.num_local(self.rank))
            self._placement_tables[num_experts] = tables
        return tables

    def _plan(self, checked: CheckedDispatchInputs) -> tuple[list[int], _SendPlan]:
        from moe_ep.distributed.shm import _lib

        w_size = self.world_size
        ids, n, k = checked.topk_ids, checked.num_tokens, checked.topk
        owner, local, max_local, _ = self._tables(checked.num_experts)
        send_rows = torch.empty(w_size, dtype=torch.int64)
        send_pairs = torch.empty(w_size, dtype=torch.int64)
        send_token = torch.empty(n * min(k, w_size), dtype=torch.int64)
        records = torch.empty((n * k, 2), dtype=torch.int32)
        token_offsets = torch.empty(n + 1, dtype=torch.int64)
        token_order = torch.empty(n * min(k, w_size), dtype=torch.int64)
        rc = _lib().shm_moe_plan(
            ids.data_ptr(), checked.topk_weights.data_ptr(), n, k, owner.data_ptr(),
            local.data_ptr(), w_size, max_local, send_rows.data_ptr(), send_pairs.data_ptr(),
            send_token.data_ptr(), records.data_ptr(), token_offsets.data_ptr(),
            token_order.data_ptr(),
        )
        if rc:
            raise MemoryError("shm manager: out of memory while planning the dispatch")
        rows_list, pairs_list = send_rows.tolist(), send_pairs.tolist()
        if max(rows_list, default=0) * max_local > _INT32_MAX:
            raise ValueError(
                f"shm cannot encode {max(rows_list)} rows per destination with {max_local} "
                "local experts in int32; dispatch fewer tokens per call"
            )
        total_rows, total_pairs = sum(rows_list), sum(pairs_list)
        return [], _SendPlan(
            send_token=send_token[:total_rows],
            send_rows=tuple(rows_list),
            send_pairs=tuple(pairs_list),
            records=records[:total_pairs],
            token_offsets=token_offsets,
            token_order=token_order[:total_rows],
        )

    # ---- the contract -------------------------------------------------------------------------

    def dispatch(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        num_experts: int,
    ) -> DispatchResult:
        """Send each token's row once to every rank owning one of its experts.

        Returns an EXPERT_PACKED result: ``x [R, H]`` one row per (token, local expert) in
        ``tokens_per_expert [E_local] int64`` segments; ``topk_ids [R] int64`` local expert of
        each row; ``topk_weights [R] float32`` its router weight (applied by the combine).
        """
        from moe_ep.distributed.shm import _lib

        counter = self._new_counter()
        w_size = self.world_size
        checked, _headers, plan = self._checked_dispatch(
            x, topk_weights, topk_ids, num_experts, counter, plan=self._plan
        )
        hidden, es = checked.hidden, checked.x.element_size()
        row_ids = list(plan.send_token.split(list(plan.send_rows)))
        heads = list(plan.records.split(list(plan.send_pairs)))
        if w_size == 1:
            recv_flat = checked.x.index_select(0, plan.send_token)
            recv_rows = plan.send_rows
            records = [plan.records]
        else:
            exchange = self._comm.all_to_all_rows(checked.x, row_ids, heads)
            recv_flat = exchange.flat
            recv_rows = tuple(r.shape[0] for r in exchange.rows)
            records = [h.view(torch.int32).view(-1, 2) for h in exchange.heads]
        counter.to_others(
            [r * hidden * es for r in plan.send_rows], [p * 8 for p in plan.send_pairs]
        )

        _, _, max_local, num_local = self._tables(checked.num_experts)
        all_records = (records[0] if len(records) == 1 else torch.cat(records)).contiguous()
        total = all_records.shape[0]
        pairs_per_src = torch.tensor([r.shape[0] for r in records], dtype=torch.int64)
        rows_per_src = torch.tensor(recv_rows, dtype=torch.int64)
        packed_row = torch.empty(total, dtype=torch.int64)
        packed_weight = torch.empty(total, dtype=torch.float32)
        packed_local = torch.empty(total, dtype=torch.int64)
        tokens_per_expert = torch.empty(num_local, dtype=torch.int64)
        row_offsets = torch.empty(sum(recv_rows) + 1, dtype=torch.int64)
        row_order = torch.empty(total, dtype=torch.int64)
        row_weights = torch.empty(total, dtype=torch.float32)
        rc = _lib().shm_moe_decode(
            all_records.data_ptr(), pairs_per_src.data_ptr(),
            rows_per_src.data_ptr(), len(records), max_local, num_local, packed_row.data_ptr(),
            packed_weight.data_ptr(), packed_local.data_ptr(), tokens_per_expert.data_ptr(),
            row_offsets.data_ptr(), row_order.data_ptr(), row_weights.data_ptr(),
        )
        if rc:
            raise RuntimeError(f"shm manager: corrupt routing records received (code {rc})")
        handle = ShmAll2AllHandle(
            num_tokens=checked.num_tokens,
            hidden=hidden,
            dtype=checked.x.dtype,
            send_rows=plan.send_rows,
            recv_rows=recv_rows,
            packed_rows=total,
            row_order=row_order,
            row_offsets=row_offsets,
            row_weights=row_weights,
            token_order=plan.token_order,
            token_offsets=plan.token_offsets,
        )
        self.last_dispatch_bytes = counter.freeze()
        return DispatchResult(
            layout=Layout.EXPERT_PACKED,
            x=recv_flat.index_select(0, packed_row),
            x_scales=None,
            topk_ids=packed_local,
            topk_weights=packed_weight,
            tokens_per_expert=tokens_per_expert,
            handle=handle,
        )

    def combine(self, expert_out: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        """Weight and sum per received row, send back, sum per token: ``[N, H]``."""
        handle = self._combine_checks(
            expert_out, result, ShmAll2AllHandle, lambda h: h.packed_rows,
            "one row per dispatched (token, expert) row",
        )
        if expert_out.device.type != "cpu":
            raise ValueError(f"expert_out must be a CPU tensor, got one on {expert_out.device}")
        counter = self._new_counter()
        out = expert_out.to(handle.dtype).contiguous()
        # Partial sums per received row (the experts of that token on this rank), one rounding.
        partial = _segment_sum(out, handle.row_order, handle.row_offsets, handle.row_weights)
        if self.world_size == 1:
            back = partial
        else:
            back = self._comm.all_to_all_single(partial, list(handle.recv_rows))
        es = torch.empty((), dtype=handle.dtype).element_size()
        counter.to_others([r * handle.hidden * es for r in handle.recv_rows])
        y = _segment_sum(back, handle.token_order, handle.token_offsets, None)
        self.last_combine_bytes = counter.freeze()
        return y

    # ---- cost model --------------------------------------------------------------------------

    @classmethod
    def wire_bytes_per_token(
        cls,
        *,
        world_size: int,
        hidden: int,
        elem_size: int,
        topk: int,
        num_experts: int,
        **options: Any,
    ) -> float:
        """Expected bytes per token for uniform random routing: those of deduplicated
        ``alltoallv`` (the same rows and records cross between ranks)."""
        from moe_ep.managers.alltoallv import AllToAllVManager

        return AllToAllVManager.wire_bytes_per_token(
            world_size=world_size,
            hidden=hidden,
            elem_size=elem_size,
            topk=topk,
            num_experts=num_experts,
            dedup=True,
        )
