"""Contract model of ``pplx_kernels`` (github.com/ppl-ai/pplx-kernels at 12cecfd, 2025-08-06).

**A contract model, not pplx-kernels.** pplx-kernels is not on PyPI; this models the Python
API of ``src/pplx_kernels/{all_to_all,nvshmem}.py`` and the checks and semantics of
``csrc/bindings/all_to_all_ops.cpp``, ``csrc/all_to_all/{all_to_all.cpp,intranode*.cu}``
(``tests/test_all_to_all.py`` shows the intended use) on CPU tensors over gloo.

Modelled:

* ``AllToAll.intranode(..., group_name)`` / ``.internode(...)``: the Python asserts
  (``world_size % dp_size == 0``, at least 2 DP groups) and the C++ ones (byte sizes multiples
  of 16, scale bytes <= hidden bytes, ``numLocalExperts != 0``); ``group_name`` is resolved to
  a registered process group (gloo here) whose size must be ``world_size``; ``internode``
  needs :func:`nvshmem_init` first;
* ``dispatch(out_expert_num_tokens [E_local] int32, out_expert_x [E_local, R, H'],
  out_expert_x_scale [E_local, R, S'] float32 or None, dp_x [N, H'], dp_x_scale [N, S] float32
  or None, indices [N, K] uint32, bound_m uint32 [1] or None, do_send, do_recv)``: outputs are
  **caller-allocated**; ``hidden_dim_bytes`` bytes of each token row (and
  ``hidden_dim_scale_bytes / 4`` floats of its scale row) are copied verbatim; tokens ``i <
  bound_m`` are sent, token ``i`` by the rank of its DP group with ``rank % dp_size == i %
  dp_size``; rows inside an expert come in an unspecified order (atomics; the model shuffles);
  rows past the counts are untouched; ``do_send`` / ``do_recv`` split the call in two;
* ``combine(out_tokens [>= bound_m, H] bf16/fp16, indices, weights [N, K] float32,
  expert_y [E_local, R, H] fp32/bf16/fp16, bound_m, do_send, do_recv)``: **weighted**
  ``out[i] = sum_k w[i, k] * expert_y[slot(i, k)]`` in fp32 for ``i < bound_m`` (overwritten;
  rows past ``bound_m`` untouched), every rank of the source DP group receiving the result;
* the one-dispatch-one-combine rhythm: the kernels keep the last dispatch's routing in the
  object, so a second dispatch before the combine (or a combine with other ``indices``)
  corrupts results in the real library (:class:`VendorContractError` here);
* ``destroy`` (later calls fail the Python ``assert self._ptr is not None``);
* the NVSHMEM helpers: ``nvshmem_get_unique_id`` (uint8 ``[128]`` CPU tensor),
  ``nvshmem_unique_id_size``, ``nvshmem_alloc_empty_unique_id``, ``nvshmem_init(uid, rank,
  world_size) -> 0`` (collective: every PE must pass the same id, else the real init hangs),
  ``nvshmem_finalize``, ``nvshmem_my_pe``, ``nvshmem_n_pes``, ``nvshmem_barrier_all``,
  ``nvshmem_barrier_all_on_current_stream``, ``nvshmem_alltoall``, ``nvshmem_malloc``.

Things the real kernels do not check and the model refuses (:class:`VendorContractError`):
an expert id ``>= num_experts`` (``-1`` as uint32 is one: **pplx has no "no expert" id**), more
than ``max_num_tokens`` tokens from one rank to one expert (a token naming an expert twice can
cause it), outputs too small for what arrives, ``num_experts % world_size != 0`` (the C++ mixes
``ceil`` and ``floor`` divisions and misroutes), a combine without a dispatch.

Not modelled: ``torch.compile`` registration, streams, the ``ops`` module's raw functions.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist

from moe_ep.testing.vendor_models._common import (
    VendorContractError,
    agree,
    alltoallv,
    order_generator,
)

__all__ = [
    "AllToAll",
    "nvshmem_alloc_empty_unique_id",
    "nvshmem_alltoall",
    "nvshmem_barrier_all",
    "nvshmem_barrier_all_on_current_stream",
    "nvshmem_finalize",
    "nvshmem_get_unique_id",
    "nvshmem_init",
    "nvshmem_my_pe",
    "nvshmem_n_pes",
    "nvshmem_unique_id_size",
]

SOURCE = ("github:ppl-ai/pplx-kernels", "12cecfd")
#: pyproject.toml's version (the project publishes no releases).
VERSION = "0.0.1"
#: sizeof(nvshmemx_uniqueid_t) in NVSHMEM 3.x.
UNIQUE_ID_BYTES = 128


def _pplx_assert(cond: bool, text: str) -> None:
    """``PPLX_ASSERT`` / ``TORCH_CHECK``: a RuntimeError."""
    if not cond:
        raise RuntimeError(f"{text} (pplx_kernels contract model)")


# ------------------------------------------------------------------------------ NVSHMEM
class _NvshmemState:
    initialised = False
    rank = -1
    world_size = 0
    uid: Optional[bytes] = None


_NVSHMEM = _NvshmemState()


def nvshmem_get_unique_id() -> torch.Tensor:
    """A fresh unique id: ``[128]`` uint8 on the CPU (what PE 0 broadcasts)."""
    return torch.randint(0, 256, (UNIQUE_ID_BYTES,), dtype=torch.uint8)


def nvshmem_unique_id_size() -> int:
    return UNIQUE_ID_BYTES


def nvshmem_alloc_empty_unique_id() -> torch.Tensor:
    return torch.zeros(nvshmem_unique_id_size(), dtype=torch.uint8, device="cpu")


def nvshmem_init(uid: torch.Tensor, rank: int, world_size: int) -> int:
    """Join the NVSHMEM job of ``uid`` as PE ``rank`` of ``world_size``; returns 0 (success).

    Collective over the default process group in the model (NVSHMEM bootstraps over the id).
    """
    _pplx_assert(uid.device.type == "cpu", "uid must be a CPU tensor")
    _pplx_assert(uid.dtype == torch.uint8, "uid must be a byte tensor")
    _pplx_assert(uid.numel() == UNIQUE_ID_BYTES,
                 f"Invalid unique id size (expected {UNIQUE_ID_BYTES}, got {uid.numel()})")
    if _NVSHMEM.initialised:
        raise VendorContractError("nvshmem_init called twice without nvshmem_finalize")
    if not dist.is_initialized() or dist.get_world_size() != world_size \
            or dist.get_rank() != rank:
        raise VendorContractError(
            "model limitation: nvshmem_init's (rank, world_size) must be the default process "
            f"group's; got ({rank}, {world_size})")
    # PEs with different ids (or ranks) wait for each other forever in the real bootstrap.
    agree(None, "pplx_kernels.nvshmem_init", (bytes(uid.tolist()), world_size))
    _NVSHMEM.initialised, _NVSHMEM.rank, _NVSHMEM.world_size = True, rank, world_size
    _NVSHMEM.uid = bytes(uid.tolist())
    return 0


def nvshmem_alltoall(dest: torch.Tensor, source: torch.Tensor) -> None:
    _pplx_assert(dest.is_contiguous(), "dest must be contiguous")
    _pplx_assert(source.is_contiguous(), "source must be contiguous")
    _require_nvshmem()
    dist.all_to_all_single(dest, source)


def nvshmem_finalize() -> None:
    _require_nvshmem()
    _NVSHMEM.initialised = False


def nvshmem_my_pe() -> int:
    _require_nvshmem()
    return _NVSHMEM.rank


def nvshmem_n_pes() -> int:
    _require_nvshmem()
    return _NVSHMEM.world_size


def nvshmem_malloc(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    _require_nvshmem()
    return torch.empty(tuple(shape), dtype=dtype)


def nvshmem_barrier_all() -> None:
    _require_nvshmem()
    dist.barrier()


def nvshmem_barrier_all_on_current_stream() -> None:
    nvshmem_barrier_all()


def _require_nvshmem() -> None:
    if not _NVSHMEM.initialised:
        raise VendorContractError("NVSHMEM is not initialised (nvshmem_init first): the real "
                                  "call fails or hangs")


def _resolve_group(group_name: str) -> Any:
    """The process group registered under ``group_name`` (c10d::resolve_process_group)."""
    from torch.distributed import distributed_c10d as c10d

    for pg, name in c10d._world.pg_names.items():
        if name == group_name:
            return pg
    try:
        return torch._C._distributed_c10d._resolve_process_group(group_name)
    except Exception as exc:  # noqa: BLE001 - re-raised as the real lookup's RuntimeError
        raise RuntimeError(f"Could not resolve the process group registered under the name "
                           f"{group_name} (pplx_kernels contract model)") from exc


# ------------------------------------------------------------------------------ AllToAll
class AllToAll:
    """Contract model of ``pplx_kernels.AllToAll``: build with :meth:`intranode` or
    :meth:`internode`."""

    def __init__(self, ptr: Any, combine_fn: Any, dispatch_fn: Any, has_scales: bool) -> None:
        self._ptr = ptr
        self._combine_fn = combine_fn
        self._dispatch_fn = dispatch_fn
        self._has_scales = has_scales

    def __del__(self) -> None:
        self.destroy()

    def dispatch(self, out_expert_num_tokens: torch.Tensor, out_expert_x: torch.Tensor,
                 out_expert_x_scale: Optional[torch.Tensor], dp_x: torch.Tensor,
                 dp_x_scale: Optional[torch.Tensor], indices: torch.Tensor,
                 bound_m: Optional[torch.Tensor], do_send: bool = True,
                 do_recv: bool = True) -> None:
        """Scatter tokens into caller-allocated expert-major outputs (see the module docstring).

        Args:
            out_expert_num_tokens: ``[E_local]`` int32, written.
            out_expert_x: ``[E_local, R, H']``, rows ``< out_expert_num_tokens[e]`` written.
            out_expert_x_scale: ``[E_local, R, S']`` float32 (with scales) else None.
            dp_x: ``[N, H']``; dp_x_scale: ``[N, S]`` float32 or None.
            indices: ``[N, K]`` uint32 global expert ids (all valid: no ``-1``).
            bound_m: ``[1]`` uint32, tokens to send (``<= max_num_tokens``); None: ``N``.
            do_send / do_recv: both for one call; ``(True, False)`` then ``(False, True)`` to
                split it around other work.
        """
        assert self._ptr is not None
        if self._has_scales:
            assert out_expert_x_scale is not None
            assert dp_x_scale is not None
        else:
            assert out_expert_x_scale is None
            assert dp_x_scale is None
        self._dispatch_fn(self._ptr, out_expert_num_tokens, out_expert_x, out_expert_x_scale,
                          dp_x, dp_x_scale, indices, bound_m, do_send, do_recv)

    def combine(self, out_tokens: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                expert_y: torch.Tensor, bound_m: Optional[torch.Tensor], do_send: bool = True,
                do_recv: bool = True) -> None:
        """Weighted gather of the expert outputs into ``out_tokens`` (see the module docstring).

        Args:
            out_tokens: ``[>= bound_m, H]`` bf16 or fp16; rows ``< bound_m`` overwritten.
            indices: ``[N, K]`` uint32, the dispatch's; weights: ``[N, K]`` float32.
            expert_y: ``[E_local, R, H]`` fp32 / bf16 / fp16, the expert outputs in the
                dispatch's rows.
            bound_m: as in :meth:`dispatch`.
        """
        assert self._ptr is not None
        self._combine_fn(self._ptr, out_tokens, indices, weights, expert_y, bound_m, do_send,
                         do_recv)

    def destroy(self) -> None:
        if self._ptr is not None:
            self._ptr = None

    @classmethod
    def intranode(cls, max_num_tokens: int, num_experts: int, experts_per_token: int,
                  rank: int, world_size: int, dp_size: int, hidden_dim: int,
                  hidden_dim_bytes: int, hidden_dim_scale_bytes: int,
                  group_name: str = "default") -> AllToAll:
        """Build over CUDA IPC; ``group_name`` names the group that exchanges the handles."""
        assert world_size % dp_size == 0
        assert world_size // dp_size > 1
        has_scales = hidden_dim_scale_bytes > 0
        group = _resolve_group(group_name)
        _pplx_assert(dist.get_world_size(group) == world_size
                     and dist.get_rank(group) == rank,
                     "Group size must be equal to count (the group's size and rank must be "
                     "world_size and rank)")
        ptr = _State(max_num_tokens, num_experts, experts_per_token, rank, world_size, dp_size,
                     hidden_dim, hidden_dim_bytes, hidden_dim_scale_bytes, group)
        return cls(ptr, _combine, _dispatch, has_scales)

    @classmethod
    def internode(cls, max_num_tokens: int, num_experts: int, experts_per_token: int,
                  rank: int, world_size: int, dp_size: int, hidden_dim: int,
                  hidden_dim_bytes: int, hidden_dim_scale_bytes: int) -> AllToAll:
        """Build over NVSHMEM (the caller ran :func:`nvshmem_init` on every rank)."""
        assert world_size % dp_size == 0
        assert world_size // dp_size > 1
        has_scales = hidden_dim_scale_bytes > 0
        _require_nvshmem()
        _pplx_assert(_NVSHMEM.world_size == world_size and _NVSHMEM.rank == rank,
                     "the NVSHMEM job's PEs must be the AllToAll's ranks")
        ptr = _State(max_num_tokens, num_experts, experts_per_token, rank, world_size, dp_size,
                     hidden_dim, hidden_dim_bytes, hidden_dim_scale_bytes, None)
        return cls(ptr, _combine, _dispatch, has_scales)


class _State:
    """The C++ AllToAll object's stand-in: sizes plus the last dispatch's routing."""

    def __init__(self, max_num_tokens: int, num_experts: int, experts_per_token: int, rank: int,
                 world_size: int, dp_size: int, hidden_dim: int, hidden_dim_bytes: int,
                 hidden_dim_scale_bytes: int, group: Any) -> None:
        _pplx_assert(hidden_dim_bytes % 16 == 0, "invalid hidden dim bytes")
        _pplx_assert(hidden_dim_scale_bytes % 16 == 0, "invalid hidden dim scale bytes")
        num_local = -(-num_experts // world_size)
        _pplx_assert(num_local != 0, "numLocalExperts is 0")
        _pplx_assert(-(-world_size // dp_size) > 1, "at least 2 DP groups are required")
        _pplx_assert(hidden_dim_scale_bytes <= hidden_dim_bytes, "invalid hidden dim bytes")
        if num_experts % world_size:
            raise VendorContractError(
                f"num_experts={num_experts} is not a multiple of world_size={world_size}: the "
                "buffers use ceil(E / W) local experts, the kernels E // W; tokens misroute")
        self.max_num_tokens = max_num_tokens
        self.num_experts = num_experts
        self.experts_per_token = experts_per_token
        self.rank = rank
        self.world_size = world_size
        self.dp_size = dp_size
        self.hidden_dim = hidden_dim
        self.hidden_dim_bytes = hidden_dim_bytes
        self.hidden_dim_scale_bytes = hidden_dim_scale_bytes
        self.num_local = num_experts // world_size
        self.group = group
        self.calls = itertools.count()
        agree(group, "pplx_kernels.AllToAll create",
              (max_num_tokens, num_experts, experts_per_token, world_size, dp_size,
               hidden_dim, hidden_dim_bytes, hidden_dim_scale_bytes))
        # After the send half: what arrived, waiting for the receive half.
        self.pending: Optional[dict[str, Any]] = None
        # After a dispatch: its routing, waiting for the combine.
        self.routing: Optional[dict[str, Any]] = None
        self.combine_pending: Optional[dict[str, Any]] = None


def _check_tensor(t: torch.Tensor, ndim: int, name: str) -> None:
    # _CHECK_TENSOR: is_cuda (CPU tensors stand in for CUDA ones here), contiguous, ndim.
    _pplx_assert(t.is_contiguous(), f"Tensor {name} must be contiguous")
    _pplx_assert(t.dim() == ndim, f"Tensor {name} must be {ndim} dimensional")


def _check_bound_m(bound_m: Optional[torch.Tensor]) -> None:
    if bound_m is not None:
        _check_tensor(bound_m, 1, "boundM")
        _pplx_assert(bound_m.dtype == torch.uint32, "boundM must be of type UInt32")
        _pplx_assert(bound_m.numel() == 1, "boundM must be a scalar tensor")


def _split_mode(do_send: bool, do_recv: bool) -> None:
    _pplx_assert(do_send or do_recv, "Invalid split mode")


def _dispatch(st: _State, out_expert_num_tokens: torch.Tensor, out_expert_x: torch.Tensor,
              out_expert_x_scale: Optional[torch.Tensor], dp_x: torch.Tensor,
              dp_x_scale: Optional[torch.Tensor], indices: torch.Tensor,
              bound_m: Optional[torch.Tensor], do_send: bool, do_recv: bool) -> None:
    _check_tensor(out_expert_num_tokens, 1, "outExpertNumTokens")
    _check_tensor(out_expert_x, 3, "outExpertX")
    if out_expert_x_scale is not None:
        _pplx_assert(out_expert_x_scale.dim() == 3, "Tensor outExpertXScale must be 3 dimensional")
    _check_tensor(dp_x, 2, "dpX")
    if dp_x_scale is not None:
        _pplx_assert(dp_x_scale.dim() == 2, "Tensor dpXScale must be 2 dimensional")
        _pplx_assert(dp_x_scale.dtype == torch.float32, "dpXScale must be of type Float")
    _check_tensor(indices, 2, "indices")
    _pplx_assert(indices.dtype == torch.uint32, "indices must be of type UInt32")
    _check_bound_m(bound_m)
    _pplx_assert(indices.shape[0] == dp_x.shape[0], "indices.size(0) must be equal to dpX.size(0)")
    _pplx_assert(indices.shape[1] == st.experts_per_token,
                 "indices.size(1) must be equal to the experts per token")
    _pplx_assert(out_expert_num_tokens.dtype == torch.int32,
                 "outExpertNumTokens must be int32 (data_ptr<int32_t>)")
    _split_mode(do_send, do_recv)
    if do_send:
        _dispatch_send(st, dp_x, dp_x_scale, indices, bound_m)
    if do_recv:
        _dispatch_recv(st, out_expert_num_tokens, out_expert_x, out_expert_x_scale)


def _num_tokens(bound_m: Optional[torch.Tensor], m: int, st: _State) -> int:
    n = int(bound_m.view(torch.int32)[0]) if bound_m is not None else m
    if n > st.max_num_tokens or n > m:
        raise VendorContractError(f"bound_m={n} exceeds max_num_tokens={st.max_num_tokens} or "
                                  f"the {m} rows given (device assert / out-of-bounds read)")
    return n


def _dispatch_send(st: _State, dp_x: torch.Tensor, dp_x_scale: Optional[torch.Tensor],
                   indices: torch.Tensor, bound_m: Optional[torch.Tensor]) -> None:
    if st.pending is not None or st.routing is not None:
        raise VendorContractError("dispatch while the previous dispatch awaits its receive half "
                                  "or its combine: the kernels keep one routing per object")
    agree(st.group, "pplx_kernels dispatch", ("dispatch", next(st.calls)))
    n = _num_tokens(bound_m, dp_x.shape[0], st)
    row_bytes = dp_x.shape[1] * dp_x.element_size()
    if row_bytes < st.hidden_dim_bytes:
        raise VendorContractError(f"dp_x rows hold {row_bytes} bytes < hidden_dim_bytes="
                                  f"{st.hidden_dim_bytes}: out-of-bounds read")
    num_scales = st.hidden_dim_scale_bytes // 4
    if dp_x_scale is not None and dp_x_scale.shape[1] < num_scales:
        raise VendorContractError(f"dp_x_scale has {dp_x_scale.shape[1]} columns < "
                                  f"hidden_dim_scale_bytes / 4 = {num_scales}: out-of-bounds read")
    ids = indices[:n].to(torch.int64)
    if (ids >= st.num_experts).any():
        raise VendorContractError(
            "an index >= num_experts (pplx has no 'no expert' id; -1 as uint32 is 4294967295): "
            "the kernel writes to a rank that does not exist")
    w, local = st.world_size, st.num_local
    # Token i goes out from the DP-group member with rank % dp_size == i % dp_size.
    mine = torch.arange(n) % st.dp_size == st.rank % st.dp_size
    tok, kk = torch.nonzero(mine.unsqueeze(1).expand(n, ids.shape[1]), as_tuple=True)
    expert = ids[tok, kk]
    raw = dp_x[:n].contiguous().view(torch.uint8).reshape(n, row_bytes)[:, :st.hidden_dim_bytes]
    meta, data, scales = [], [], []
    for j in range(w):
        sel = (expert // local) == j
        meta.append(torch.stack([expert[sel] - j * local, tok[sel], kk[sel]], dim=1))
        data.append(raw[tok[sel]])
        if dp_x_scale is not None:
            scales.append(dp_x_scale[tok[sel], :num_scales].float().contiguous())
    counts = torch.bincount(expert, minlength=st.num_experts)
    if counts.numel() and int(counts.max()) > st.max_num_tokens:
        raise VendorContractError(
            f"{int(counts.max())} tokens from one rank for one expert > max_num_tokens="
            f"{st.max_num_tokens} (an expert named twice by a token?): buffer overflow")
    st.pending = {
        "meta": alltoallv(meta, st.group),
        "data": alltoallv(data, st.group),
        "scales": alltoallv(scales, st.group) if dp_x_scale is not None else None,
    }
    st.routing = {"indices": indices[:n].clone(), "n": n, "rows": None}


def _dispatch_recv(st: _State, out_num: torch.Tensor, out_x: torch.Tensor,
                   out_scale: Optional[torch.Tensor]) -> None:
    got = st.pending
    if got is None:
        raise VendorContractError("dispatch receive half without its send half")
    st.pending = None
    local = st.num_local
    _pplx_assert(out_x.shape[0] >= local and out_num.shape[0] >= local,
                 "outputs must cover the local experts")
    out_row_bytes = out_x.shape[2] * out_x.element_size()
    if out_row_bytes < st.hidden_dim_bytes:
        raise VendorContractError("out_expert_x rows are shorter than hidden_dim_bytes")
    num_scales = st.hidden_dim_scale_bytes // 4
    if out_scale is not None and out_scale.shape[2] < num_scales:
        raise VendorContractError(f"out_expert_x_scale has {out_scale.shape[2]} columns < "
                                  f"hidden_dim_scale_bytes / 4 = {num_scales}")
    gen = order_generator(st.rank)
    rows_of = [[] for _ in range(local)]
    for src, meta in enumerate(got["meta"]):
        for i, (e, t, k) in enumerate(meta.tolist()):
            rows_of[e].append((src, i, t, k))
    slot: dict[tuple[int, int, int], tuple[int, int]] = {}
    out_bytes = out_x.view(torch.uint8).view(out_x.shape[0], out_x.shape[1], -1)
    for e in range(local):
        entries = rows_of[e]
        if len(entries) > out_x.shape[1]:
            raise VendorContractError(f"{len(entries)} tokens for local expert {e} but "
                                      f"out_expert_x has {out_x.shape[1]} rows: out-of-bounds")
        perm = torch.randperm(len(entries), generator=gen).tolist()
        for row, p in enumerate(perm):
            src, i, t, k = entries[p]
            out_bytes[e, row, :st.hidden_dim_bytes] = got["data"][src][i]
            if out_scale is not None:
                out_scale[e, row, :num_scales] = got["scales"][src][i]
            slot[(src, t, k)] = (e, row)
        out_num[e] = len(entries)
    st.routing["rows"] = slot


def _combine(st: _State, out_tokens: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
             expert_y: torch.Tensor, bound_m: Optional[torch.Tensor], do_send: bool,
             do_recv: bool) -> None:
    _check_tensor(out_tokens, 2, "outTokens")
    _check_tensor(indices, 2, "indices")
    _pplx_assert(indices.dtype == torch.uint32, "indices must be of type UInt32")
    _check_tensor(weights, 2, "weights")
    _pplx_assert(weights.dtype == torch.float32, "weights must be of type Float")
    _check_tensor(expert_y, 3, "expertY")
    _check_bound_m(bound_m)
    _pplx_assert(expert_y.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 "Unsupported dtype for expertY")
    _pplx_assert(out_tokens.dtype in (torch.bfloat16, torch.float16),
                 "Unsupported dtype for outTokens")
    _split_mode(do_send, do_recv)
    if do_send:
        routing = st.routing
        if routing is None or routing["rows"] is None:
            raise VendorContractError("combine without a completed dispatch: the kernels read "
                                      "the routing of whatever ran last")
        agree(st.group, "pplx_kernels combine", ("combine", next(st.calls)))
        w, local = st.world_size, st.num_local
        # Each row goes back to every rank of its source DP group, keyed by (token, k).
        send_meta: list[list[list[int]]] = [[] for _ in range(w)]
        send_rows: list[list[torch.Tensor]] = [[] for _ in range(w)]
        for (src, t, k), (e, row) in routing["rows"].items():
            group0 = src // st.dp_size * st.dp_size
            for dst in range(group0, group0 + st.dp_size):
                send_meta[dst].append([t, k, st.rank * local + e])
                send_rows[dst].append(expert_y[e, row].float())
        h = expert_y.shape[2]
        got_meta = alltoallv([torch.tensor(m, dtype=torch.int64).view(-1, 3)
                              for m in send_meta], st.group)
        got_rows = alltoallv([torch.stack(r) if r else torch.empty((0, h)) for r in send_rows],
                             st.group)
        st.combine_pending = {"meta": got_meta, "rows": got_rows, "h": h}
        st.routing = None
    if do_recv:
        got = st.combine_pending
        if got is None:
            raise VendorContractError("combine receive half without its send half")
        st.combine_pending = None
        n = _num_tokens(bound_m, indices.shape[0], st)
        table: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
        for meta, rows in zip(got["meta"], got["rows"]):
            for (t, k, e), row in zip(meta.tolist(), rows):
                table[(t, k)] = (e, row)
        acc = torch.zeros((n, got["h"]), dtype=torch.float32)
        for t in range(n):
            for k in range(indices.shape[1]):
                e = int(indices[t, k])
                entry = table.get((t, k))
                if entry is None or entry[0] != e:
                    raise VendorContractError(
                        f"combine indices[{t}, {k}]={e} differ from the dispatch's: the kernel "
                        "would read another expert's slot")
                acc[t] += float(weights[t, k]) * entry[1]
        out_tokens[:n] = acc.to(out_tokens.dtype)

