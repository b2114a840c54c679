"""Contract model of ``deep_ep`` (DeepEP 2.1.0 as shipped by PyPI ``sgl-deep-ep`` 0.1.2.post1).

**A contract model, not DeepEP.** It reproduces the *observable* behaviour of the Python API
(argument checks, shapes, dtypes, layouts, counts, handles, which combine is weighted, the
limits) on CPU tensors over a gloo group, so that a moe_ep adapter can run unchanged against
it. It proves nothing about the CUDA kernels. Sources read (the wheel's Python files; the C++
of github.com/deepseek-ai/DeepEP at dd758ca, 2026-07-14, for what the wheel only has compiled):
``deep_ep/buffers/legacy.py``, ``deep_ep/buffers/elastic.py``, ``deep_ep/utils/{event,refs}.py``,
``csrc/legacy/{buffer,config}.hpp``, ``csrc/kernels/legacy/{intranode,internode_ll,launch}.cu*``,
``tests/legacy/test_{intranode,low_latency}.py``.

Modelled (``Buffer``, the v1 "legacy" API vLLM uses):

* construction checks of ``_C.Buffer`` (sizes aligned to 128 bytes, rank-count rules), the
  NVSHMEM settings the constructor would export (kept in ``Buffer.model_nvshmem_env``, not
  written to ``os.environ``), the QP-depth limit of the low-latency kernels;
* ``get_dispatch_layout``: per-rank / per-expert counts, ``is_token_in_rank``; ``-1`` = none;
* ``dispatch`` (intranode, <= 8 ranks): ``x`` of any 16-byte-row dtype or ``(fp8, scales)``;
  rows arrive grouped by source rank in rank order, tokens of one source in token order (what
  the intranode kernel does); ``recv_topk_idx`` holds local ids, ``-1`` for other ranks'
  experts, ``recv_topk_weights`` 0 there; per-expert counts aligned to ``expert_alignment``;
  ``num_worst_tokens`` (fixed-size, CUDA-graph form: padding rows poisoned, ids ``-1``, empty
  count list); the NVL-buffer size checks; cached-handle replay (``handle=`` without top-k);
* ``combine``: **unweighted** fp32 sum over the ranks a token went to, plus up to two biases,
  cast to bf16 (the kernel exists for bf16 only); reduces ``topk_weights`` the same way;
* ``low_latency_dispatch``: ``[E_local, W * max, H]`` bf16, or FP8 e4m3 with per-128-channel
  fp32 scales (or UE8M0 exponents packed four to an int32) as the column-major view the
  kernel returns; ``recv_count`` int32; handle ``(src_info, layout_range, max, hidden, E)``
  with ``layout_range = begin << 32 | count`` per source rank; the order of source-rank blocks
  inside an expert and of tokens inside a block is unspecified (the kernel uses atomics), so
  the model shuffles both; ``return_recv_hook`` (data lands only when the hook runs);
* ``low_latency_combine``: **weighted** fp32 sum ``sum_k w_k y_k`` (``-1`` skipped), bf16; the
  ``out=`` and ``zero_copy`` forms (``get_next_low_latency_combine_buffer``);
* the LL double buffer ("at most two live results"): in 2.1.0 the returned tensors are fresh
  allocations, but the two RDMA buffers alternate per LL launch and each launch zeroes the
  other one's signal area, so a receive hook must run before the next LL launch on the same
  Buffer, and a zero-copy combine must be the next LL launch after
  ``get_next_low_latency_combine_buffer`` (:class:`VendorContractError` otherwise);
* limits: hidden in {2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192}, top-k <= 11, tokens <=
  max, ``W * max % 4 == 0``, FP8 needs ``hidden % 512 == 0``, ``(max + 1) * 2 <= QP depth``
  (1024 by default: max <= 511), ``E % W == 0``, ``num_rdma_bytes`` >= the layout;
  every rank must pass the same max (a mismatch hangs: :class:`SimulatedHang`);
* ``get_low_latency_rdma_size_hint``, ``Config`` (+ its NVL/RDMA size hints),
  ``get_dispatch_config`` / ``get_combine_config``, ``set_num_sms``, ``capture``,
  ``clean_low_latency_buffer``, ``destroy`` (needs ``explicitly_destroy=True``), ``EventOverlap``.

Not modelled (raise :class:`ModelNotImplementedError`): internode normal kernels (> 8 ranks),
``use_nvfp4`` / ``x_global_scale``, LogFMT combine, the rank-mask ("shrink") API, the
sgl-specific ``overlap`` / ``src_signals`` combine, ``get_local_buffer_tensor``,
``get_comm_stream``, the mpi4py ``comm`` constructor, and ``ElasticBuffer`` except its
non-expanding dispatch / combine (see :class:`ElasticBuffer`). Streams and events are no-ops.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from moe_ep.testing.vendor_models._common import (
    ModelNotImplementedError,
    VendorContractError,
    agree,
    alltoallv,
    order_generator,
    poison_,
)

__all__ = [
    "Buffer",
    "Config",
    "ElasticBuffer",
    "EPHandle",
    "EventHandle",
    "EventOverlap",
    "topk_idx_t",
]

#: The real module's ``__version__`` (the sgl-deep-ep distribution is 0.1.2.post1).
VERSION = "2.1.0"
DISTRIBUTION = ("sgl-deep-ep", "0.1.2.post1")

topk_idx_t = torch.int64

# csrc/kernels/legacy/compiled.cuh
_NUM_MAX_NVL_PEERS = 8
_NUM_MAX_RDMA_PEERS = 20
_NUM_MAX_LOCAL_EXPERTS = 1024
_BUFFER_ALIGNMENT = 128
_INT_MAX = 2**31 - 1
# csrc/kernels/legacy/launch.cuh SWITCH_HIDDEN, internode_ll.cu kNumMaxTopK
LL_HIDDEN_SIZES = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
LL_MAX_TOPK = 11
# intranode.cu: EP_DEVICE_ASSERT(num_topk <= 32)
HT_MAX_TOPK = 32
# utils.cuh
_FP8_MARGIN = 1e-4
_FP8_MAX = 448.0


def _host_assert(cond: bool, text: str) -> None:
    """``EP_HOST_ASSERT``: surfaces in Python as ``RuntimeError`` (DeepEP's EPException)."""
    if not cond:
        raise RuntimeError(f"Failed: Assertion error {text} (deep_ep contract model)")


def _check_dtype(t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    # ``data_ptr<T>()`` on a wrong dtype raises c10::Error -> RuntimeError.
    if t.dtype != dtype:
        raise RuntimeError(f"expected scalar type {dtype} for {name} but found {t.dtype}")


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


# ------------------------------------------------------------------------------ events
class EventHandle:
    """``deep_ep._C.EventHandle``: a CUDA event on the current stream (a no-op here)."""

    def __init__(self) -> None:
        pass

    def current_stream_wait(self) -> None:
        pass


class EventOverlap:
    """``deep_ep.EventOverlap``: wraps an optional event; ``with`` waits on exit.

    Args:
        event: the captured event or None.
        extra_tensors: tensors kept alive until the wait (the real one's record_stream stand-in).
    """

    def __init__(self, event: Optional[EventHandle] = None,
                 extra_tensors: Optional[tuple[torch.Tensor]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self._release_handle_by_call = False
        self.hook_after_wait: Optional[Callable] = None

    def current_stream_wait(self, release_handle: bool = False) -> None:
        assert self.event is not None
        self.event.current_stream_wait()
        if self.hook_after_wait is not None:
            self.hook_after_wait()
            self.hook_after_wait = None
        if release_handle:
            self.event = None

    def register_hook_after_wait(self, hook_after_wait: Callable) -> None:
        assert self.hook_after_wait is None, "A hook is already registered on this `EventOverlap`"
        self.hook_after_wait = hook_after_wait

    def __call__(self, release_handle: bool = False) -> EventOverlap:
        self._release_handle_by_call = release_handle
        return self

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.current_stream_wait(release_handle=self._release_handle_by_call)
        self._release_handle_by_call = False


# ------------------------------------------------------------------------------ Config
class Config:
    """``deep_ep._C.Config`` (pybind): chunking of the normal kernels; size hints.

    Checks of the C++ constructor; ``num_max_rdma_chunked_recv_tokens`` is rounded up to a
    multiple of the send chunk, as there.
    """

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256,
                 num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        _host_assert(num_sms >= 0, "num_sms >= 0")
        _host_assert(num_max_nvl_chunked_send_tokens > 0 and num_max_nvl_chunked_recv_tokens > 0,
                     "num_max_nvl_chunked_send_tokens > 0 and num_max_nvl_chunked_recv_tokens > 0")
        _host_assert(num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens,
                     "num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens")
        _host_assert(num_max_rdma_chunked_send_tokens > 0
                     and num_max_rdma_chunked_recv_tokens > 0,
                     "num_max_rdma_chunked_send_tokens > 0 and "
                     "num_max_rdma_chunked_recv_tokens > 0")
        recv = _align(num_max_rdma_chunked_recv_tokens, num_max_rdma_chunked_send_tokens)
        _host_assert(num_max_rdma_chunked_send_tokens < recv,
                     "num_max_rdma_chunked_send_tokens < num_max_rdma_chunked_recv_tokens")
        _host_assert(num_max_rdma_chunked_send_tokens <= recv // 2,
                     "num_max_rdma_chunked_send_tokens <= num_max_rdma_chunked_recv_tokens / 2")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = recv

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, /) -> int:
        """NVLink buffer bytes the normal kernels need (``config.hpp``, same formula)."""
        _host_assert(num_ranks < _NUM_MAX_NVL_PEERS or num_ranks % _NUM_MAX_NVL_PEERS == 0,
                     "num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0")
        _host_assert(num_ranks <= _NUM_MAX_NVL_PEERS or self.num_sms % 2 == 0,
                     "num_ranks <= NUM_MAX_NVL_PEERS or num_sms % 2 == 0")
        max_topk = max_scales = 128
        num_rdma_ranks = max(num_ranks // _NUM_MAX_NVL_PEERS, 1)
        num_nvl_ranks = min(num_ranks, _NUM_MAX_NVL_PEERS)
        channels = self.num_sms // 2
        tokens = channels * num_nvl_ranks * self.num_max_nvl_chunked_recv_tokens
        n = channels * num_nvl_ranks * (2 * num_rdma_ranks + 3) * 4
        n += tokens * hidden_bytes
        n += tokens * _SOURCE_META_BYTES
        n += tokens * max_topk * 8
        n += tokens * max_topk * 4
        n += tokens * max_scales * 4
        return _align(n, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, /) -> int:
        """RDMA buffer bytes of the internode normal kernels; 0 within one NVLink domain."""
        if num_ranks <= _NUM_MAX_NVL_PEERS:
            return 0
        _host_assert(num_ranks % _NUM_MAX_NVL_PEERS == 0, "num_ranks % NUM_MAX_NVL_PEERS == 0")
        _host_assert(self.num_sms % 2 == 0, "num_sms % 2 == 0")
        max_topk = max_scales = 128
        num_rdma_ranks = num_ranks // _NUM_MAX_NVL_PEERS
        channels = self.num_sms // 2
        tokens = channels * num_rdma_ranks * self.num_max_rdma_chunked_recv_tokens
        n = channels * num_rdma_ranks * (_NUM_MAX_NVL_PEERS * 2 + 2) * 2 * 4
        n += tokens * hidden_bytes * 2
        n += tokens * _SOURCE_META_BYTES * 2
        n += tokens * max_topk * 8 * 2
        n += tokens * max_topk * 4 * 2
        n += tokens * max_scales * 4 * 2
        n += tokens * 16 * 2
        return _align(n, 128)


# internode.cu: sizeof(SourceMeta) = two ints.
_SOURCE_META_BYTES = 8


def _ll_layout_bytes(max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """``LowLatencyLayout.total_bytes`` (config.hpp): two send, two receive, two signal areas."""
    num_scales = hidden // 128
    _host_assert(num_scales * 4 <= hidden, "num_scales * sizeof(float) <= hidden")
    dispatch_msg = 16 + max(hidden * 2, hidden + num_scales * 4)
    combine_msg = num_scales * 4 + hidden * 2
    send = max(max_tokens * dispatch_msg, num_experts * max_tokens * combine_msg)
    recv = max(num_experts * max_tokens * dispatch_msg, num_experts * max_tokens * combine_msg)
    signal = _align(num_experts * 4, 128)
    return 2 * send + 2 * recv + 2 * signal


def _fp8_cast_per_128(x: torch.Tensor, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The LL kernels' per-token, per-128-channel e4m3 cast: ``(fp8 [N, H], scale_inv [N, H/128])``.

    amax is clamped below at 1e-4; ``round_scale`` rounds ``scale_inv`` up to a power of two
    (``calculate_fp8_scales`` in utils.cuh).
    """
    n, h = x.shape
    groups = x.float().view(n, h // 128, 128)
    amax = groups.abs().amax(dim=-1).clamp_min(_FP8_MARGIN)
    if round_scale:
        exp = torch.ceil(torch.log2(amax / _FP8_MAX))
        scale, scale_inv = torch.exp2(-exp), torch.exp2(exp)
    else:
        scale, scale_inv = _FP8_MAX / amax, amax / _FP8_MAX
    q = (groups * scale.unsqueeze(-1)).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(n, h), scale_inv


# ------------------------------------------------------------------------------ Buffer
class Buffer:
    """Contract model of ``deep_ep.Buffer`` (v1 API: normal and low-latency kernels).

    Attributes (as the real one): ``num_sms`` (class attribute, set by :meth:`set_num_sms`),
    ``rank``, ``group_size``, ``group``, ``num_nvl_bytes``, ``num_rdma_bytes``,
    ``low_latency_mode``, ``explicitly_destroy``, ``enable_shrink``, ``nvshmem_qp_depth`` (LL or
    internode only). ``runtime`` is this model's stand-in for the C++ object (None after
    :meth:`destroy`). Model-only: ``model_nvshmem_env`` (the NVSHMEM environment the real
    constructor exports).
    """

    num_sms: int = 20

    def __init__(self,
                 group: Optional[dist.ProcessGroup],
                 num_nvl_bytes: int = 0,
                 num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False,
                 use_fabric: Optional[bool] = None,
                 explicitly_destroy: bool = False,
                 enable_shrink: bool = False,
                 comm: Optional[Any] = None) -> None:
        if group is None:
            if comm is not None:
                raise ModelNotImplementedError("Buffer(comm=mpi4py communicator) is not modelled")
            raise ValueError("Either 'group' or 'comm' must be provided.")
        self.rank = group.rank()
        self.group = group
        self.group_size = group.size()
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        w = self.group_size
        # _C.Buffer constructor checks.
        _host_assert(num_nvl_bytes % _BUFFER_ALIGNMENT == 0
                     and (num_nvl_bytes <= _INT_MAX or num_rdma_bytes == 0),
                     "num_nvl_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and "
                     "(num_nvl_bytes <= INT_MAX or num_rdma_bytes == 0)")
        _host_assert(num_rdma_bytes % _BUFFER_ALIGNMENT == 0
                     and (low_latency_mode or num_rdma_bytes <= _INT_MAX),
                     "num_rdma_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and "
                     "(low_latency_mode or num_rdma_bytes <= INT_MAX)")
        _host_assert(num_nvl_bytes // 16 < _INT_MAX and num_rdma_bytes // 16 < _INT_MAX,
                     "num_*_bytes / sizeof(int4) < INT_MAX")
        _host_assert(w <= _NUM_MAX_NVL_PEERS * _NUM_MAX_RDMA_PEERS or low_latency_mode,
                     "num_ranks <= NUM_MAX_NVL_PEERS * NUM_MAX_RDMA_PEERS or low_latency_mode")
        _host_assert(w < _NUM_MAX_NVL_PEERS or w % _NUM_MAX_NVL_PEERS == 0,
                     "num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0")
        if num_rdma_bytes > 0:
            _host_assert(w > _NUM_MAX_NVL_PEERS or low_latency_mode,
                         "num_ranks > NUM_MAX_NVL_PEERS or low_latency_mode")
        self._num_rdma_ranks = max(1, w // _NUM_MAX_NVL_PEERS)
        self.model_nvshmem_env: dict[str, str] = {}
        # The real constructor all-gathers device ids, IPC handles and the NVSHMEM unique id;
        # buffers of different sizes would then be mapped across ranks (memory corruption).
        agree(group, "deep_ep.Buffer()",
              (num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank))
        if self._num_rdma_ranks > 1 or low_latency_mode:
            assert num_qps_per_rank > 0
            self.model_nvshmem_env = {
                "NVSHMEM_DISABLE_P2P": "0" if allow_nvlink_for_low_latency_mode else "1",
                "NVSHMEM_IB_ENABLE_IBGDA": "1",
                "NVSHMEM_IBGDA_NUM_RC_PER_PE": f"{num_qps_per_rank}",
                "NVSHMEM_MAX_TEAMS": "7",
                "NVSHMEM_DISABLE_NVLS": "1",
                "NVSHMEM_CUMEM_GRANULARITY": f"{2 ** 29}",
            }
            if not allow_mnnvl:
                self.model_nvshmem_env["NVSHMEM_DISABLE_MNNVL"] = "1"
            self.nvshmem_qp_depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))
            self.model_nvshmem_env["NVSHMEM_QP_DEPTH"] = str(self.nvshmem_qp_depth)
        self._num_qps_per_rank = num_qps_per_rank
        self.runtime: Optional[_Runtime] = _Runtime()

    # ------------------------------------------------------------------ lifecycle
    def destroy(self) -> None:
        """Release the buffers; needs ``explicitly_destroy=True`` at construction."""
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        self._rt()
        self.runtime = None

    def _rt(self) -> _Runtime:
        if self.runtime is None:
            # The real object calls methods of its released runtime: AttributeError on None.
            raise AttributeError("'NoneType' object has no attribute (deep_ep.Buffer used after "
                                 "destroy(); contract model)")
        return self.runtime

    @staticmethod
    def is_sm90_compiled() -> bool:
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SMs of the normal kernels (a class attribute: every Buffer sees it)."""
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        """RDMA bytes of the LL kernels: ``LowLatencyLayout`` total rounded up past 128 B."""
        n = _ll_layout_bytes(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)
        # get_low_latency_rdma_size_hint: ((n + 128) / 128) * 128 (always adds a step).
        return (n + _BUFFER_ALIGNMENT) // _BUFFER_ALIGNMENT * _BUFFER_ALIGNMENT

    def get_comm_stream(self) -> torch.Stream:
        raise ModelNotImplementedError("the contract model has no CUDA streams")

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None,
                                offset: int = 0, use_rdma_buffer: bool = False) -> torch.Tensor:
        raise ModelNotImplementedError("the contract model has no raw NVL/RDMA buffers")

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """The recommended dispatch config per rank count (same table as the real one)."""
        table = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128),
                 16: (36, 288, 20, 128), 24: (32, 288, 8, 128), 32: (32, 288, 8, 128),
                 48: (32, 288, 8, 128), 64: (32, 288, 8, 128), 96: (20, 480, 12, 128),
                 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128)}
        assert num_ranks in table, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, *table[num_ranks])

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """The recommended combine config per rank count (same table as the real one)."""
        table = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128),
                 16: (4, 288, 12, 128), 24: (1, 288, 8, 128), 32: (1, 288, 8, 128),
                 48: (1, 288, 8, 128), 64: (1, 288, 8, 128), 96: (1, 480, 8, 128),
                 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}
        assert num_ranks in table, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, *table[num_ranks])

    # ------------------------------------------------------------------ normal kernels
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False,
                            allocate_on_comm_stream: bool = False) -> \
            tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Counts of a routing (local computation, no communication).

        Args:
            topk_idx: ``[N, K]`` int64 (``topk_idx_t``) global expert ids, ``-1`` = none.
            num_experts: E (a multiple of the rank count).

        Returns:
            ``num_tokens_per_rank [W]`` int32 (tokens with at least one expert there),
            ``num_tokens_per_rdma_rank [W / 8]`` int32 or None within one NVLink domain,
            ``num_tokens_per_expert [E]`` int32, ``is_token_in_rank [N, W]`` bool, an event.
        """
        self._rt()
        _host_assert(topk_idx.dim() == 2, "topk_idx.dim() == 2")
        _host_assert(topk_idx.is_contiguous(), "topk_idx.is_contiguous()")
        _host_assert(num_experts > 0, "num_experts > 0")
        if allocate_on_comm_stream:
            _host_assert(previous_event is not None and async_finish,
                         "previous_event.has_value() and async")
        _check_dtype(topk_idx, topk_idx_t, "topk_idx")
        w = self.group_size
        per_rank = num_experts // w
        ids = topk_idx.long()
        valid = ids >= 0
        num_tokens_per_expert = torch.bincount(ids[valid], minlength=num_experts)[:num_experts]
        owner = torch.where(valid, ids // max(per_rank, 1), torch.full_like(ids, -1))
        is_token_in_rank = torch.zeros((ids.shape[0], w), dtype=torch.bool)
        for r in range(w):
            is_token_in_rank[:, r] = (owner == r).any(dim=1)
        num_tokens_per_rank = is_token_in_rank.sum(dim=0).to(torch.int32)
        per_rdma = None
        if self._num_rdma_ranks > 1:
            per_rdma = torch.stack([
                is_token_in_rank[:, g * _NUM_MAX_NVL_PEERS:(g + 1) * _NUM_MAX_NVL_PEERS]
                .any(dim=1).sum() for g in range(self._num_rdma_ranks)
            ]).to(torch.int32)
        event = EventHandle() if async_finish else None
        return (num_tokens_per_rank, per_rdma, num_tokens_per_expert.to(torch.int32),
                is_token_in_rank, EventOverlap(event))

    def dispatch(self, x: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
                 handle: Optional[tuple] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> \
            tuple[Union[tuple[torch.Tensor, torch.Tensor], torch.Tensor], Optional[torch.Tensor],
                  Optional[torch.Tensor], list[int], tuple, EventOverlap]:
        """Normal (high-throughput) dispatch, intranode.

        Args:
            x: ``[N, H]`` (any dtype with 16-byte rows; bf16 in practice) or
                ``(x_fp8 [N, H] 1-byte, scales [N, S] float32/int32, any strides)``.
            handle: a previous dispatch's handle to replay its layout (then no top-k, no counts).
            num_tokens_per_rank / is_token_in_rank / num_tokens_per_expert: from
                :meth:`get_dispatch_layout`.
            topk_idx: ``[N, K]`` int64, ``-1`` = none; topk_weights: ``[N, K]`` float32.
            expert_alignment: per-expert counts in the returned list are rounded up to it.
            num_worst_tokens: > 0 sizes the outputs to it (no CPU wait; CUDA-graph form).

        Returns:
            ``recv_x [M, H]`` (or ``(fp8 [M, H], scales [M, S])``), rows grouped by source rank
            in rank order, each source's tokens in token order; ``recv_topk_idx [M, K]`` int64
            local ids (-1 elsewhere); ``recv_topk_weights [M, K]`` float32 (0 where -1);
            ``num_recv_tokens_per_expert_list`` (Python ints, ``[E_local]``, aligned; empty with
            ``num_worst_tokens``); ``handle``; an event. Cached replay returns
            ``(recv_x, None, None, None, None, event)``.
        """
        rt = self._rt()
        config = self.get_dispatch_config(self.group_size) if config is None else config
        if self._num_rdma_ranks > 1:
            assert num_worst_tokens == 0, \
                "Internode dispatch does not support `num_worst_tokens > 0`"
            raise ModelNotImplementedError("internode normal dispatch (> 8 ranks) is not modelled")
        x, x_scales = x if isinstance(x, tuple) else (x, None)
        w, rank = self.group_size, self.rank
        _host_assert(config.num_sms % 2 == 0, "config.num_sms % 2 == 0")
        channels = config.num_sms // 2
        cached = handle is not None
        if cached:
            assert topk_idx is None and topk_weights is None
            rank_prefix, chan_prefix, _recv_chan_prefix, recv_src_idx, is_token_in_rank, _ = handle
            _host_assert(rank_prefix.dtype == torch.int32 and chan_prefix.dtype == torch.int32,
                         "cached prefix matrices are int32")
            _host_assert(tuple(rank_prefix.shape) == (w, w), "rank_prefix_matrix is [W, W]")
            _host_assert(tuple(chan_prefix.shape) == (w, channels),
                         "cached_channel_prefix_matrix.size(1) == num_channels")
        else:
            assert num_tokens_per_rank is not None and is_token_in_rank is not None \
                and num_tokens_per_expert is not None
            _check_dtype(num_tokens_per_expert, torch.int32, "num_tokens_per_expert")
            _check_dtype(num_tokens_per_rank, torch.int32, "num_tokens_per_rank")
        _host_assert(is_token_in_rank.dtype == torch.bool, "is_token_in_rank is bool")
        _host_assert(x.dim() == 2 and x.is_contiguous(), "x.dim() == 2 and x.is_contiguous()")
        _host_assert(x.shape[1] * x.element_size() % 16 == 0,
                     "(x.size(1) * x.element_size()) % sizeof(int4) == 0")
        _host_assert(is_token_in_rank.dim() == 2 and is_token_in_rank.is_contiguous(),
                     "is_token_in_rank.dim() == 2 and is_token_in_rank.is_contiguous()")
        _host_assert(is_token_in_rank.shape[0] == x.shape[0] and is_token_in_rank.shape[1] == w,
                     "is_token_in_rank.size(0) == x.size(0) and is_token_in_rank.size(1) == "
                     "num_ranks")
        num_experts = 0
        if not cached:
            _host_assert(num_tokens_per_expert.dim() == 1, "num_tokens_per_expert.dim() == 1")
            _host_assert(num_tokens_per_expert.shape[0] % w == 0,
                         "num_tokens_per_expert->size(0) % num_ranks == 0")
            _host_assert(num_tokens_per_expert.shape[0] // w <= _NUM_MAX_LOCAL_EXPERTS,
                         "num_tokens_per_expert->size(0) / num_ranks <= NUM_MAX_LOCAL_EXPERTS")
            _host_assert(tuple(num_tokens_per_rank.shape) == (w,),
                         "num_tokens_per_rank->size(0) == num_ranks")
            num_experts = num_tokens_per_expert.shape[0]
        n, hidden = x.shape
        local = num_experts // w
        num_topk = 0
        _host_assert((topk_idx is None) == (topk_weights is None),
                     "topk_idx.has_value() == topk_weights.has_value()")
        if topk_idx is not None:
            num_topk = topk_idx.shape[1]
            _host_assert(num_experts > 0, "num_experts > 0")
            _host_assert(topk_idx.dim() == 2 and topk_idx.is_contiguous(), "topk_idx 2-D")
            _host_assert(topk_weights.dim() == 2 and topk_weights.is_contiguous(),
                         "topk_weights 2-D")
            _host_assert(topk_idx.shape[0] == n and topk_weights.shape[0] == n,
                         "num_tokens == topk_idx->size(0) and num_tokens == topk_weights->size(0)")
            _host_assert(topk_weights.shape[1] == num_topk, "num_topk == topk_weights->size(1)")
            _host_assert(topk_weights.dtype == torch.float32,
                         "topk_weights->scalar_type() == torch::kFloat32")
            _check_dtype(topk_idx, topk_idx_t, "topk_idx")
            if num_topk > HT_MAX_TOPK:
                raise VendorContractError(f"num_topk={num_topk} > {HT_MAX_TOPK}: the intranode "
                                          "kernel's device assert traps")
        num_scales = 0
        if x_scales is not None:
            _host_assert(x.element_size() == 1, "x.element_size() == 1")
            _host_assert(x_scales.dtype in (torch.float32, torch.int32),
                         "x_scales float32 or int32")
            _host_assert(x_scales.dim() == 2, "x_scales->dim() == 2")
            _host_assert(x_scales.shape[0] == n, "x_scales->size(0) == num_tokens")
            num_scales = x_scales.shape[1]
        if allocate_on_comm_stream:
            _host_assert(previous_event is not None and async_finish,
                         "previous_event.has_value() and async")
        if not cached:
            _host_assert(w * (w + local) * 4 <= self.num_nvl_bytes,
                         "num_ranks * (num_ranks + num_local_experts) * sizeof(int) <= "
                         "num_nvl_bytes")
            if num_worst_tokens > 0:
                _host_assert(topk_idx is not None and topk_weights is not None,
                             "num_worst_tokens needs topk_idx and topk_weights")
        recv_chunk = config.num_max_nvl_chunked_recv_tokens
        per_slot = channels * w * recv_chunk
        needed = (w * w * 4 + channels * w * 4 * 4
                  + per_slot * (hidden * x.element_size() + 4 + num_topk * 8 + num_topk * 4
                                + 4 * num_scales))
        _host_assert(needed <= self.num_nvl_bytes,
                     f"the intranode dispatch needs {needed} NVL bytes <= num_nvl_bytes "
                     f"({self.num_nvl_bytes})")
        group = self.group
        agree(group, "deep_ep.Buffer.dispatch", ("dispatch", cached, hidden, x.dtype,
                                                 x_scales is not None, num_topk, num_experts,
                                                 next(rt.calls)))
        if not cached:
            sent = is_token_in_rank.sum(dim=0).to(torch.int32)
            if not torch.equal(sent, num_tokens_per_rank):
                raise VendorContractError(
                    f"num_tokens_per_rank {num_tokens_per_rank.tolist()} != the column sums of "
                    f"is_token_in_rank {sent.tolist()}: the receivers would size their outputs "
                    "from the wrong counts")
        # What goes to each destination: tokens with is_token_in_rank[:, j], in token order.
        send_rows = [torch.nonzero(is_token_in_rank[:, j]).flatten() for j in range(w)]
        recv_x_parts = alltoallv([x[rows] for rows in send_rows], group)
        recv_scale_parts = (alltoallv([x_scales[rows].contiguous() for rows in send_rows], group)
                            if x_scales is not None else None)
        if cached:
            expected = int(rank_prefix[w - 1, rank])
            if sum(p.shape[0] for p in recv_x_parts) != expected:
                raise VendorContractError("cached dispatch: the handle's layout does not match "
                                          "what the peers sent (handles from different calls?)")
            num_recv = recv_src_idx.shape[0]
        counts = [p.shape[0] for p in recv_x_parts]
        actual = sum(counts)
        if not cached:
            gathered = [torch.zeros_like(num_tokens_per_rank) for _ in range(w)]
            dist.all_gather(gathered, num_tokens_per_rank, group=group)
            matrix = torch.stack(gathered)  # [src, dst]
            rank_prefix = torch.cumsum(matrix, dim=0).to(torch.int32)
            experts = [torch.zeros_like(num_tokens_per_expert) for _ in range(w)]
            dist.all_gather(experts, num_tokens_per_expert, group=group)
            per_expert = torch.stack(experts)[:, rank * local:(rank + 1) * local].sum(dim=0)
            num_recv_list = [_align(int(c), expert_alignment) for c in per_expert.tolist()]
            num_recv = actual
            if num_worst_tokens > 0:
                if actual > num_worst_tokens:
                    raise VendorContractError(
                        f"{actual} tokens arrived but num_worst_tokens={num_worst_tokens}: the "
                        "real kernel writes past the outputs")
                num_recv = num_worst_tokens
                num_recv_list = []
        recv_x = poison_(torch.empty((num_recv, hidden), dtype=x.dtype))
        recv_x[:actual] = torch.cat(recv_x_parts) if actual else recv_x[:0]
        recv_scales = None
        if x_scales is not None:
            recv_scales = poison_(torch.empty((num_recv, num_scales), dtype=x_scales.dtype))
            recv_scales[:actual] = torch.cat(recv_scale_parts) if actual else recv_scales[:0]
        event = EventOverlap(EventHandle() if async_finish else None)
        packed_x = (recv_x, recv_scales) if x_scales is not None else recv_x
        if cached:
            return packed_x, None, None, None, None, event

        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            idx_parts, weight_parts = [], []
            for j, rows in enumerate(send_rows):
                ids = topk_idx[rows]
                mine = (ids >= j * local) & (ids < (j + 1) * local) & (ids >= 0)
                idx_parts.append(torch.where(mine, ids - j * local, torch.full_like(ids, -1)))
                weight_parts.append(torch.where(mine, topk_weights[rows],
                                                torch.zeros_like(topk_weights[rows])))
            got_idx = alltoallv(idx_parts, group)
            got_w = alltoallv(weight_parts, group)
            recv_topk_idx = torch.full((num_recv, num_topk), -1, dtype=topk_idx.dtype)
            recv_topk_weights = poison_(torch.empty((num_recv, num_topk), dtype=torch.float32))
            if actual:
                recv_topk_idx[:actual] = torch.cat(got_idx)
                recv_topk_weights[:actual] = torch.cat(got_w)
        src_parts = alltoallv([rows.to(torch.int32) for rows in send_rows], group)
        recv_src_idx = poison_(torch.empty(num_recv, dtype=torch.int32))
        if actual:
            recv_src_idx[:actual] = torch.cat(src_parts)
        # Channel matrices: tokens are cut into `channels` contiguous ranges (the kernel's
        # get_channel_task_range); kept so the handle has the real shapes and dtypes.
        chan_of = _channel_of(n, channels)
        channel_prefix = torch.stack([
            torch.cumsum(torch.bincount(chan_of[is_token_in_rank[:, j]], minlength=channels), 0)
            for j in range(w)
        ]).to(torch.int32) if n else torch.zeros((w, channels), dtype=torch.int32)
        recv_channel_prefix = torch.zeros((w, channels), dtype=torch.int32)
        send_head = torch.full((n, w), -1, dtype=torch.int32)
        for j, rows in enumerate(send_rows):
            send_head[rows, j] = torch.arange(rows.numel(), dtype=torch.int32)
        new_handle = (rank_prefix, channel_prefix, recv_channel_prefix, recv_src_idx,
                      is_token_in_rank, send_head)
        return (packed_x, recv_topk_idx, recv_topk_weights, num_recv_list, new_handle, event)

    def combine(self, x: torch.Tensor, handle: tuple,
                topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = None,
                config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> \
            tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Normal combine: an **unweighted** sum over the ranks each token was sent to.

        Args:
            x: ``[M, H]`` bf16, row ``i`` the result for the ``i``-th received row of the
                dispatch that made ``handle`` (M includes ``num_worst_tokens`` padding).
            handle: that dispatch's handle.
            topk_weights: optional ``[M, K]`` float32, reduced the same way.
            bias: 0, 1 or 2 ``[N, H]`` bf16 tensors added to the output.

        Returns:
            ``combined_x [N, H]`` bf16 = fp32 sum over destination ranks (rank order) plus the
            biases (0 for tokens sent nowhere), ``combined_topk_weights [N, K]`` or None, event.
        """
        rt = self._rt()
        config = self.get_combine_config(self.group_size) if config is None else config
        if self._num_rdma_ranks > 1:
            raise ModelNotImplementedError("internode normal combine (> 8 ranks) is not modelled")
        w, rank = self.group_size, self.rank
        rank_prefix, _, channel_prefix, src_idx, is_recv_token_in_rank, send_head = handle
        _host_assert(x.dim() == 2 and x.is_contiguous(), "x.dim() == 2 and x.is_contiguous()")
        _host_assert(src_idx.dim() == 1 and src_idx.dtype == torch.int32, "src_idx int32 1-D")
        _host_assert(send_head.dim() == 2 and send_head.dtype == torch.int32, "send_head int32")
        _host_assert(config.num_sms % 2 == 0, "config.num_sms % 2 == 0")
        _host_assert(src_idx.shape[0] == x.shape[0], "src_idx.size(0) == num_tokens")
        _host_assert(send_head.shape[1] == w, "send_head.size(1) == num_ranks")
        _host_assert(x.shape[1] * x.element_size() % 16 == 0,
                     "(hidden * x.element_size()) % sizeof(int4) == 0")
        num_out, hidden = send_head.shape[0], x.shape[1]
        if topk_weights is not None:
            _host_assert(topk_weights.dim() == 2 and topk_weights.is_contiguous(),
                         "topk_weights 2-D contiguous")
            _host_assert(topk_weights.shape[0] == x.shape[0], "topk_weights->size(0) == num_tokens")
            _host_assert(topk_weights.dtype == torch.float32, "topk_weights float32")
        biases = [] if bias is None else [bias] if isinstance(bias, torch.Tensor) else list(bias)
        assert len(biases) <= 2
        for b in biases:
            _host_assert(b.dim() == 2 and b.is_contiguous(), "bias.dim() == 2")
            _host_assert(b.dtype == x.dtype, "bias.scalar_type() == x.scalar_type()")
            _host_assert(tuple(b.shape) == (num_out, hidden),
                         "bias.size(0) == num_recv_tokens and bias.size(1) == hidden")
        if x.dtype != torch.bfloat16:
            # intranode::combine's SWITCH_TYPES has one case, CUDA_R_16BF.
            raise RuntimeError("Failed: Assertion error false and \"Unsupported type\" "
                               "(deep_ep contract model: the normal combine is bf16 only)")
        if allocate_on_comm_stream:
            _host_assert(previous_event is not None and async_finish,
                         "previous_event.has_value() and async")
        agree(self.group, "deep_ep.Buffer.combine",
              ("combine", hidden, topk_weights is not None, next(rt.calls)))
        bounds = [0] + [int(rank_prefix[i, rank]) for i in range(w)]
        back_x = alltoallv([x[bounds[i]:bounds[i + 1]] for i in range(w)], self.group)
        back_w = (alltoallv([topk_weights[bounds[i]:bounds[i + 1]] for i in range(w)],
                            self.group) if topk_weights is not None else None)
        out = torch.zeros((num_out, hidden), dtype=torch.float32)
        for b in biases:
            out += b.float()
        out_w = (torch.zeros((num_out, topk_weights.shape[1]), dtype=torch.float32)
                 if topk_weights is not None else None)
        for j in range(w):
            rows = torch.nonzero(is_recv_token_in_rank[:, j]).flatten()
            if back_x[j].shape[0] != rows.numel():
                raise VendorContractError("combine: the handle does not match the dispatch the "
                                          "peers combine (handles from different calls?)")
            out[rows] += back_x[j].float()
            if out_w is not None:
                out_w[rows] += back_w[j]
        event = EventOverlap(EventHandle() if async_finish else None)
        return out.to(x.dtype), out_w, event

    # ------------------------------------------------------------------ low latency
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        """Zero the LL signalling areas (collective; needed after normal-mode RDMA use)."""
        rt = self._rt()
        _host_assert(self.low_latency_mode, "low_latency_mode")
        agree(self.group, "deep_ep.Buffer.clean_low_latency_buffer",
              ("clean", num_max_dispatch_tokens_per_rank, hidden, num_experts, next(rt.calls)))
        rt.rdma_dirty = False

    def _ll_common_checks(self, max_tokens: int, hidden: int, num_experts: int,
                          num_topk: int) -> None:
        w = self.group_size
        _host_assert(self.low_latency_mode, "low_latency_mode")
        assert self.nvshmem_qp_depth >= (max_tokens + 1) * 2
        _host_assert(num_experts % w == 0, "num_experts % num_ranks == 0")
        _host_assert(hidden % 8 == 0 and hidden % 128 == 0,
                     "x.size(1) % sizeof(int4) == 0 and x.size(1) % 128 == 0")
        needed = _ll_layout_bytes(max_tokens, hidden, w, num_experts)
        _host_assert(needed <= self.num_rdma_bytes,
                     f"layout.total_bytes ({needed}) <= num_rdma_bytes ({self.num_rdma_bytes})")
        _host_assert(num_topk <= LL_MAX_TOPK, f"num_topk <= kNumMaxTopK ({LL_MAX_TOPK})")
        if hidden not in LL_HIDDEN_SIZES:
            raise RuntimeError('Failed: Assertion error false and "Unsupported hidden" '
                               f"(hidden={hidden}; the LL kernels exist for {LL_HIDDEN_SIZES})")
        if self._num_qps_per_rank < num_experts // w:
            # internode_ll.cu: EP_DEVICE_ASSERT(num_rc_per_pe >= num_local_experts).
            raise VendorContractError(
                f"num_qps_per_rank={self._num_qps_per_rank} < num_local_experts="
                f"{num_experts // w}: the LL kernel's device assert traps")
        if self.runtime.rdma_dirty:
            raise VendorContractError("LL kernel after normal-mode RDMA use without "
                                      "clean_low_latency_buffer(): stale signals")

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
                             x_global_scale: Optional[torch.Tensor] = None,
                             use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False, use_nvfp4: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False) -> \
            tuple[Any, torch.Tensor, tuple, EventOverlap, Optional[Callable]]:
        """Low-latency dispatch into an expert-major padded layout.

        Args:
            x: ``[N, H]`` bf16, ``N <= num_max_dispatch_tokens_per_rank`` (same max on every rank).
            topk_idx: ``[N, K]`` int64 global expert ids, ``-1`` = none, ``K <= 11``.
            use_fp8 / round_scale / use_ue8m0: the e4m3 cast and its scale format.

        Returns:
            ``recv_x``: ``[E_local, W * max, H]`` bf16, or with ``use_fp8`` a tuple of e4m3
            ``[E_local, W * max, H]`` and scales ``[E_local, W * max, H / 128]`` float32 (or
            ``H / 512`` int32 UE8M0 packs) whose last two dims are column-major; only the first
            ``recv_count[e]`` rows of expert ``e`` are valid (the rest poisoned); ``recv_count``
            ``[E_local]`` int32; ``handle``; event; ``hook`` (with ``return_recv_hook``: the data
            lands when it is called).
        """
        rt = self._rt()
        w, rank = self.group_size, self.rank
        max_tokens = num_max_dispatch_tokens_per_rank
        if use_nvfp4 or x_global_scale is not None:
            raise ModelNotImplementedError("use_nvfp4 / x_global_scale are not modelled")
        _host_assert(x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16,
                     "x.dim() == 2 and x.is_contiguous() and x.scalar_type() == kBFloat16")
        _host_assert(topk_idx.dim() == 2 and topk_idx.is_contiguous(), "topk_idx 2-D contiguous")
        _host_assert(x.shape[0] == topk_idx.shape[0] and x.shape[0] <= max_tokens,
                     "x.size(0) == topk_idx.size(0) and x.size(0) <= "
                     "num_max_dispatch_tokens_per_rank")
        _host_assert(topk_idx.dtype == topk_idx_t, "topk_idx.scalar_type() == topk_idx_t")
        n, hidden = x.shape
        num_topk = topk_idx.shape[1]
        self._ll_common_checks(max_tokens, hidden, num_experts, num_topk)
        local = num_experts // w
        if cumulative_local_expert_recv_stats is not None:
            s = cumulative_local_expert_recv_stats
            _host_assert(s.dtype == torch.int32 and s.dim() == 1 and s.is_contiguous()
                         and s.shape[0] == local,
                         "cumulative_local_expert_recv_stats [E_local] int32")
        if dispatch_wait_recv_cost_stats is not None:
            s = dispatch_wait_recv_cost_stats
            # The C++ wants [num_ranks] int64 (the Python docstring says [W, W]).
            _host_assert(s.dtype == torch.int64 and s.dim() == 1 and s.is_contiguous()
                         and s.shape[0] == w, "dispatch_wait_recv_cost_stats [num_ranks] int64")
        _host_assert((w * max_tokens) % 4 == 0,
                     "(num_ranks * num_max_dispatch_tokens_per_rank) % 4 == 0 (TMA)")
        if use_fp8:
            _host_assert(hidden % 512 == 0, "hidden % 512 == 0")
        if use_ue8m0:
            _host_assert(round_scale, "round_scale")
        _host_assert(not (async_finish and return_recv_hook), "not (async and return_recv_hook)")
        # Every rank must run the same LL sequence with the same sizes, or the kernels spin.
        agree(self.group, "deep_ep.Buffer.low_latency_dispatch",
              ("ll_dispatch", max_tokens, hidden, num_experts, next(rt.calls)))
        ids = topk_idx.long()
        if ((ids >= num_experts) | (ids < -1)).any():
            raise VendorContractError("topk_idx outside [-1, num_experts): the LL kernel writes "
                                      "to a rank that does not exist")
        # One message per (token, expert k); a token picking one expert twice is sent twice.
        tok, kk = torch.nonzero(ids >= 0, as_tuple=True)
        dest_expert = ids[tok, kk]
        send = []
        for j in range(w):
            sel = (dest_expert // local) == j
            send.append(torch.stack([dest_expert[sel] - j * local, tok[sel]], dim=1)
                        if sel.any() else torch.empty((0, 2), dtype=torch.int64))
        got_meta = alltoallv(send, self.group)
        send_x = []
        for j in range(w):
            sel = (dest_expert // local) == j
            send_x.append(x[tok[sel]])
        got_x = alltoallv(send_x, self.group)

        rows = w * max_tokens
        gen = order_generator(rank)
        src_info = poison_(torch.empty((local, rows), dtype=torch.int32))
        layout_range = torch.zeros((local, w), dtype=torch.int64)
        recv_count = torch.zeros(local, dtype=torch.int32)
        recv_bf16 = poison_(torch.empty((local, rows, hidden), dtype=torch.bfloat16))
        for e in range(local):
            cursor = 0
            # Source blocks land in arrival order (an atomicAdd per block in the kernel).
            for src in torch.randperm(w, generator=gen).tolist():
                sel = torch.nonzero(got_meta[src][:, 0] == e).flatten()
                if sel.numel() > max_tokens:
                    raise VendorContractError(
                        f"rank {src} sent {sel.numel()} tokens to expert {e} but the LL buffer "
                        f"holds {max_tokens} per source (a token picking one expert twice?)")
                sel = sel[torch.randperm(sel.numel(), generator=gen)]
                c = sel.numel()
                recv_bf16[e, cursor:cursor + c] = got_x[src][sel]
                src_info[e, cursor:cursor + c] = got_meta[src][sel, 1].to(torch.int32)
                layout_range[e, src] = (cursor << 32) | c
                cursor += c
            recv_count[e] = cursor
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += recv_count
        if use_fp8:
            flat = recv_bf16.view(local * rows, hidden)
            q, scale_inv = _fp8_cast_per_128(flat.nan_to_num(0.0), round_scale)
            # Padding rows stay poisoned, as in the real (uninitialised) outputs.
            valid = torch.zeros(local, rows, dtype=torch.bool)
            for e in range(local):
                valid[e, :int(recv_count[e])] = True
            valid = valid.view(-1)
            packed_x = poison_(torch.empty((local * rows, hidden), dtype=torch.float8_e4m3fn))
            packed_x[valid] = q[valid]
            packed_x = packed_x.view(local, rows, hidden)
            if use_ue8m0:
                exps = (scale_inv.view(torch.int32) >> 23).to(torch.uint8)
                base = poison_(torch.empty((local, hidden // 512, rows), dtype=torch.int32))
                packs = exps.view(local * rows, hidden // 512, 4).contiguous().view(torch.int32)
                packs = packs.view(local, rows, hidden // 512)
            else:
                base = poison_(torch.empty((local, hidden // 128, rows), dtype=torch.float32))
                packs = scale_inv.view(local, rows, hidden // 128)
            scales = base.transpose(1, 2)  # column-major in the last two dims, as the kernel's
            for e in range(local):
                c = int(recv_count[e])
                scales[e, :c] = packs[e, :c]
            ready: Any = (packed_x, scales)
        else:
            ready = recv_bf16
        handle = (src_info, layout_range, max_tokens, hidden, num_experts)
        rt.ll_launches += 1
        event = EventOverlap(EventHandle() if async_finish else None)
        if not return_recv_hook:
            return ready, recv_count, handle, event, None
        # Before the hook runs the outputs hold whatever the allocator gave (poison here).
        launch = rt.ll_launches
        shown = tuple(poison_(t.clone()) for t in ready) if use_fp8 else poison_(ready.clone())
        count_shown = poison_(recv_count.clone())

        def hook() -> None:
            # The next LL launch re-arms (zeroes) the signal area this receive polls: the
            # two RDMA buffers alternate per launch and each launch cleans the other one.
            if rt.ll_launches > launch:
                raise VendorContractError(
                    "LL receive hook called after a newer LL kernel on this Buffer: that "
                    "launch cleaned the signal area this receive waits on (hang or stale data)")
            if use_fp8:
                shown[0].copy_(ready[0])
                shown[1].copy_(ready[1])
            else:
                shown.copy_(ready)
            count_shown.copy_(recv_count)

        return shown, count_shown, handle, event, hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor,
                            topk_weights: torch.Tensor, handle: tuple, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
                            overlap: bool = False, src_signals: Optional[torch.Tensor] = None,
                            src_signal_expect_value: int = 0) -> \
            tuple[torch.Tensor, EventOverlap, Optional[Callable]]:
        """Low-latency combine: a **weighted** sum of the expert outputs.

        Args:
            x: ``[E_local, W * max, H]`` bf16 contiguous, row ``i`` of expert ``e`` the output for
                the dispatch's row ``i`` (rows past ``recv_count[e]`` ignored).
            topk_idx: ``[N, K]`` int64, the ids given to the dispatch; topk_weights: ``[N, K]``
                float32 (``N <= max``).
            handle: the dispatch's handle.

        Returns:
            ``combined_x [N, H]`` bf16 = ``sum_k w[n, k] * y(expert topk_idx[n, k], token n)`` in
            fp32 (``-1`` skipped), event, hook (with ``return_recv_hook``).
        """
        rt = self._rt()
        w, rank = self.group_size, self.rank
        src_info, layout_range, max_tokens, hidden, num_experts = handle
        assert self.nvshmem_qp_depth >= (max_tokens + 1) * 2
        if use_logfmt:
            raise ModelNotImplementedError("the LogFMT combine format is not modelled")
        if overlap or src_signals is not None:
            raise ModelNotImplementedError("the overlap / src_signals combine is not modelled")
        _host_assert(not (zero_copy and use_logfmt), "not (zero_copy and use_logfmt)")
        _host_assert(x.dim() == 3 and x.is_contiguous() and x.dtype == torch.bfloat16,
                     "x.dim() == 3 and x.is_contiguous() and x.scalar_type() == kBFloat16")
        local = num_experts // w
        _host_assert(x.shape[0] == local, "x.size(0) == num_experts / num_ranks")
        _host_assert(x.shape[1] == w * max_tokens,
                     "x.size(1) == num_ranks * num_max_dispatch_tokens_per_rank")
        _host_assert(x.shape[2] % 8 == 0 and x.shape[2] % 128 == 0, "x.size(2) % 128 == 0")
        _host_assert(topk_idx.dim() == 2 and topk_idx.is_contiguous(), "topk_idx 2-D contiguous")
        _host_assert(tuple(topk_idx.shape) == tuple(topk_weights.shape),
                     "topk_idx and topk_weights have one shape")
        _host_assert(topk_idx.dtype == topk_idx_t, "topk_idx.scalar_type() == topk_idx_t")
        _host_assert(topk_weights.dim() == 2 and topk_weights.is_contiguous(),
                     "topk_weights 2-D contiguous")
        _host_assert(topk_weights.shape[0] <= max_tokens,
                     "topk_weights.size(0) <= num_max_dispatch_tokens_per_rank")
        _host_assert(topk_weights.dtype == torch.float32, "topk_weights float32")
        _host_assert(src_info.dim() == 2 and src_info.dtype == torch.int32
                     and src_info.shape[0] == x.shape[0], "src_info [E_local, W*max] int32")
        _host_assert(tuple(layout_range.shape) == (local, w) and layout_range.dtype == torch.int64,
                     "layout_range [E_local, num_ranks] int64")
        if combine_wait_recv_cost_stats is not None:
            s = combine_wait_recv_cost_stats
            _host_assert(s.dtype == torch.int64 and s.dim() == 1 and s.shape[0] == w,
                         "combine_wait_recv_cost_stats [num_ranks] int64")
        n, num_topk = topk_idx.shape
        self._ll_common_checks(max_tokens, x.shape[2], num_experts, num_topk)
        _host_assert(not (async_finish and return_recv_hook), "not (async and return_recv_hook)")
        if out is not None:
            _host_assert(out.dim() == 2 and out.is_contiguous(), "out 2-D contiguous")
            _host_assert(tuple(out.shape) == (n, x.shape[2]),
                         "out->size(0) == num_combined_tokens and out->size(1) == hidden")
            _host_assert(out.dtype == x.dtype, "out->scalar_type() == x.scalar_type()")
        agree(self.group, "deep_ep.Buffer.low_latency_combine",
              ("ll_combine", max_tokens, hidden, num_experts, next(rt.calls)))
        data = x
        if zero_copy:
            if rt.next_combine_buffer is None or rt.next_combine_launch != rt.ll_launches:
                raise VendorContractError(
                    "zero_copy combine must be the next LL kernel after "
                    "get_next_low_latency_combine_buffer() (that buffer is the next launch's)")
            data = rt.next_combine_buffer
        rt.next_combine_buffer = None
        # Each valid row goes back to its source rank, keyed by (global expert, token).
        send_meta: list[list[torch.Tensor]] = [[] for _ in range(w)]
        send_rows: list[list[torch.Tensor]] = [[] for _ in range(w)]
        for e in range(local):
            for src in range(w):
                packed = int(layout_range[e, src])
                begin, count = packed >> 32, packed & 0xFFFFFFFF
                if count == 0:
                    continue
                tokens = src_info[e, begin:begin + count].long()
                send_meta[src].append(torch.stack(
                    [torch.full_like(tokens, rank * local + e), tokens], dim=1))
                send_rows[src].append(data[e, begin:begin + count])
        got_meta = alltoallv([torch.cat(m) if m else torch.empty((0, 2), dtype=torch.int64)
                              for m in send_meta], self.group)
        got_rows = alltoallv([torch.cat(r) if r else torch.empty((0, hidden), dtype=x.dtype)
                              for r in send_rows], self.group)
        table: dict[tuple[int, int], torch.Tensor] = {}
        for meta, rows in zip(got_meta, got_rows):
            for (e, t), row in zip(meta.tolist(), rows):
                table[(e, t)] = row
        result = torch.zeros((n, hidden), dtype=torch.float32)
        for t in range(n):
            for k in range(num_topk):
                e = int(topk_idx[t, k])
                if e < 0:
                    continue
                row = table.get((e, t))
                if row is None:
                    raise VendorContractError(
                        f"token {t} names expert {e} in the combine but was not dispatched to "
                        "it: the kernel would read a stale slot (combine topk_idx must be the "
                        "dispatch's)")
                result[t] += float(topk_weights[t, k]) * row.float()
        combined = out if out is not None else torch.empty((n, hidden), dtype=torch.bfloat16)
        rt.ll_launches += 1
        event = EventOverlap(EventHandle() if async_finish else None)
        if not return_recv_hook:
            combined.copy_(result)
            return combined, event, None
        poison_(combined)
        launch = rt.ll_launches

        def hook() -> None:
            if rt.ll_launches > launch:
                raise VendorContractError("LL receive hook called after a newer LL kernel on "
                                          "this Buffer (its signal area was re-armed)")
            combined.copy_(result)

        return combined, event, hook

    def get_next_low_latency_combine_buffer(self, handle: object) -> torch.Tensor:
        """The registered buffer the next zero-copy combine reads: ``[E_local, W*max, H]`` bf16.

        Strided like the real one: each row is followed by the combine message's scale area.
        """
        rt = self._rt()
        _, _, max_tokens, hidden, num_experts = handle
        w = self.group_size
        local = num_experts // w
        msg = hidden + 2 * (hidden // 128)  # num_bytes_per_combine_msg / sizeof(bf16)
        base = poison_(torch.empty((local, w * max_tokens, msg), dtype=torch.bfloat16))
        view = base[:, :, :hidden]
        rt.next_combine_buffer = view
        rt.next_combine_launch = rt.ll_launches
        return view

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        _host_assert(self.enable_shrink, 'mask_buffer_ptr != nullptr and "Shrink mode must be '
                     'enabled"')
        raise ModelNotImplementedError("the rank-mask (shrink) API is not modelled")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        _host_assert(self.enable_shrink, 'mask_buffer_ptr != nullptr and "Shrink mode must be '
                     'enabled"')
        raise ModelNotImplementedError("the rank-mask (shrink) API is not modelled")

    def low_latency_clean_mask_buffer(self) -> None:
        _host_assert(self.enable_shrink, 'mask_buffer_ptr != nullptr and "Shrink mode must be '
                     'enabled"')
        raise ModelNotImplementedError("the rank-mask (shrink) API is not modelled")


def _channel_of(num_tokens: int, num_channels: int) -> torch.Tensor:
    """Each token's channel: contiguous ranges of ceil(N / C) tokens (get_channel_task_range)."""
    per = max(1, -(-num_tokens // num_channels))
    return torch.arange(num_tokens) // per


class _Runtime:
    """Model state behind one Buffer (the C++ object's stand-in)."""

    def __init__(self) -> None:
        self.calls = itertools.count()
        self.ll_launches = 0
        self.rdma_dirty = False
        self.next_combine_buffer: Optional[torch.Tensor] = None
        self.next_combine_launch = -1


# ------------------------------------------------------------------------------ ElasticBuffer
class EPHandle:
    """``deep_ep.EPHandle`` (the ElasticBuffer handle); the model fills the attributes it uses.

    Attributes: ``do_expand``, ``num_experts``, ``expert_alignment``,
    ``num_max_tokens_per_rank``, ``num_sms``, ``topk_idx`` ``[N, K]``, ``num_recv_tokens``,
    ``num_recv_tokens_per_expert_list``, ``psum_num_recv_tokens_per_scaleup_rank [W]`` int32
    (inclusive prefix of received tokens per source rank), ``recv_src_metadata [M, 2 + K]``
    int32 (column 0 ``src_rank * num_max_tokens_per_rank + token``).
    """

    def __init__(self, do_expand: bool, num_experts: int, expert_alignment: int,
                 num_max_tokens_per_rank: int, num_sms: int, topk_idx: torch.Tensor,
                 num_recv_tokens: int, num_expanded_tokens: int,
                 num_recv_tokens_per_expert_list: list,
                 psum_num_recv_tokens_per_scaleup_rank: torch.Tensor,
                 psum_num_recv_tokens_per_expert: torch.Tensor,
                 num_unaligned_recv_tokens_per_expert: torch.Tensor,
                 recv_src_metadata: torch.Tensor, dst_buffer_slot_idx: torch.Tensor,
                 token_metadata_at_forward: Optional[torch.Tensor],
                 channel_linked_list: Optional[torch.Tensor]) -> None:
        assert topk_idx is not None
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.topk_idx = topk_idx
        self.psum_num_recv_tokens_per_scaleup_rank = psum_num_recv_tokens_per_scaleup_rank
        self.psum_num_recv_tokens_per_expert = psum_num_recv_tokens_per_expert
        self.num_unaligned_recv_tokens_per_expert = num_unaligned_recv_tokens_per_expert
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.recv_src_metadata = recv_src_metadata
        self.dst_buffer_slot_idx = dst_buffer_slot_idx
        self.token_metadata_at_forward = token_metadata_at_forward
        self.channel_linked_list = channel_linked_list
        self.num_recv_tokens = num_recv_tokens
        self.num_expanded_tokens = num_expanded_tokens
        self.cached_recv_src_metadata_before_sort = None
        self._model_send_rows: list[torch.Tensor] = []
        self._model_recv_order: Optional[torch.Tensor] = None


class ElasticBuffer:
    """Contract model of ``deep_ep.ElasticBuffer`` (DeepEP v2), non-expanding EP only.

    Modelled: construction arguments, :meth:`get_buffer_size_hint` (a model estimate: the real
    value comes from the C++ layout code and an NCCL communicator), :meth:`dispatch` without
    ``do_expand`` (TOKEN layout like :meth:`Buffer.dispatch`: local ids, ``-1`` elsewhere; the
    receive order is unspecified unless ``deterministic=True``, then sorted by
    ``src_rank * num_max_tokens_per_rank + token``; ``do_cpu_sync=False`` sizes the outputs to
    ``W * num_max_tokens_per_rank`` rows), cached-handle replay, :meth:`combine` (unweighted sum
    over ranks, bf16; ``topk_weights`` reduced), :meth:`barrier`, :meth:`destroy`.
    Not modelled: ``do_expand`` (the expert-major expanded layout), Engram, PP, AGRS, the
    hybrid/scale-out split, SM/QP tuning (fixed model values).
    """

    def __init__(self, group: dist.ProcessGroup, num_bytes: Optional[int] = None,
                 num_cpu_bytes: int = 0, num_max_tokens_per_rank: int = 0, hidden: int = 0,
                 num_topk: int = 0, use_fp8_dispatch: bool = False, deterministic: bool = False,
                 allow_hybrid_mode: bool = True, allow_multiple_reduction: bool = True,
                 prefer_overlap_with_compute: bool = True, sl_idx: int = 3,
                 num_allocated_qps: int = 0, num_cpu_timeout_secs: int = 300,
                 num_gpu_timeout_secs: int = 100, explicitly_destroy: bool = False) -> None:
        if num_cpu_bytes > 0:
            raise ModelNotImplementedError("CPU buffers (Engram storage) are not modelled")
        self.group = group
        self.rank_idx = group.rank()
        self.num_ranks = group.size()
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.deterministic = deterministic
        if num_bytes is None:
            num_bytes = self.get_buffer_size_hint(group, num_max_tokens_per_rank, hidden,
                                                  num_topk, use_fp8_dispatch, allow_hybrid_mode,
                                                  allow_multiple_reduction)
        self.num_bytes = num_bytes
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_allocated_qps = num_allocated_qps or (129 if allow_hybrid_mode else 17)
        self.explicitly_destroy = explicitly_destroy
        self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.scaleout_rank_idx, self.scaleup_rank_idx = 0, self.rank_idx
        self.num_rdma_ranks, self.num_nvlink_ranks = 1, self.num_ranks
        agree(group, "deep_ep.ElasticBuffer()", (num_bytes, num_max_tokens_per_rank))
        self.runtime: Optional[_Runtime] = _Runtime()

    def destroy(self) -> None:
        assert self.explicitly_destroy
        self.runtime = None

    def _rt(self) -> _Runtime:
        if self.runtime is None:
            raise AttributeError("'NoneType' object has no attribute (deep_ep.ElasticBuffer "
                                 "used after destroy(); contract model)")
        return self.runtime

    @staticmethod
    def get_buffer_size_hint(group: dist.ProcessGroup, num_max_tokens_per_rank: int,
                             hidden: int, num_topk: int = 0, use_fp8_dispatch: bool = False,
                             allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        """A **model estimate** (2 MiB aligned) of the real C++ buffer size; not the real value."""
        _host_assert(num_max_tokens_per_rank > 0 and hidden > 0,
                     "num_max_tokens_per_rank > 0 and hidden > 0")
        w = group.size()
        token = _align((hidden if use_fp8_dispatch else 2 * hidden)
                       + (4 * -(-hidden // 128) if use_fp8_dispatch else 0)
                       + max(num_topk, 1) * 8 + 16, 16)
        dispatch = (w + 1) * num_max_tokens_per_rank * token
        combine = (w + min(w, max(num_topk, 1))) * num_max_tokens_per_rank * _align(2 * hidden, 16)
        return _align(dispatch + combine, 2 << 20)

    def barrier(self, use_comm_stream: bool = True, with_cpu_sync: bool = False,
                sequential: bool = True) -> None:
        self._rt()
        dist.barrier(group=self.group)

    @staticmethod
    def capture() -> EventHandle:
        return EventHandle()

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int,
                                num_scaleout_topk: int = 0, rdma_gbs: float = 0,
                                nvlink_gbs: float = 0, sm_read_gbs: float = 200,
                                sm_write_gbs: float = 50) -> int:
        """A fixed **model value** (24): the real one models NVLink/RDMA bandwidths."""
        assert num_scaleout_topk == 0
        return 24

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        num_qps = min(num_sms, 8 + 1)
        if self.allow_hybrid_mode:
            num_qps = num_sms * 16 + 1
        return min(num_qps, self.num_allocated_qps)

    def dispatch(self, x: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
                 topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None,
                 cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                 num_experts: Optional[int] = None,
                 num_max_tokens_per_rank: Optional[int] = None,
                 expert_alignment: Optional[int] = None,
                 num_sms: int = 0, num_qps: int = 0,
                 previous_event: Optional[EventHandle] = None,
                 previous_event_before_epilogue: Optional[EventHandle] = None,
                 async_with_compute_stream: bool = False,
                 allocate_on_comm_stream: bool = False,
                 handle: Optional[EPHandle] = None,
                 do_handle_copy: bool = True,
                 do_cpu_sync: Optional[bool] = None,
                 do_expand: bool = False,
                 do_zero_padding: bool = False,
                 use_tma_aligned_col_major_sf: bool = False) \
            -> tuple[Any, Optional[torch.Tensor], Optional[torch.Tensor], EPHandle, EventOverlap]:
        """Non-expanding dispatch: like :meth:`Buffer.dispatch` (local ids, -1 elsewhere).

        Args:
            x: ``[N, H]`` bf16 or ``(fp8 [N, H], scales [N, S])``.
            topk_idx: ``[N, K]`` int64, ``-1`` = none (None with ``handle``).
            num_max_tokens_per_rank: N bound, same on every rank (default: the constructor's).

        Returns:
            ``recv_x [M, H]``, ``recv_topk_idx [M, K]``, ``recv_topk_weights [M, K]`` or None,
            ``handle``, event. With ``do_cpu_sync=False`` (or a cached handle), M is
            ``W * num_max_tokens_per_rank`` and rows from
            ``handle.psum_num_recv_tokens_per_scaleup_rank[-1]`` on are padding.
        """
        rt = self._rt()
        if do_expand:
            raise ModelNotImplementedError("ElasticBuffer.dispatch(do_expand=True) is not "
                                           "modelled")
        w, rank = self.num_ranks, self.rank_idx
        x, sf = x if isinstance(x, tuple) else (x, None)
        if handle is not None:
            assert topk_idx is None
            assert do_cpu_sync is None or not do_cpu_sync, "Cannot do CPU sync with cached handle"
            topk_idx = handle.topk_idx
            num_max_tokens_per_rank = (handle.num_max_tokens_per_rank
                                       if num_max_tokens_per_rank is None
                                       else num_max_tokens_per_rank)
            num_experts = handle.num_experts if num_experts is None else num_experts
            expert_alignment = (handle.expert_alignment if expert_alignment is None
                                else expert_alignment)
            do_cpu_sync = False
            assert (num_experts, expert_alignment, num_max_tokens_per_rank) == \
                   (handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank)
        max_tokens = (self.num_max_tokens_per_rank if num_max_tokens_per_rank is None
                      else num_max_tokens_per_rank)
        expert_alignment = 1 if expert_alignment is None else expert_alignment
        do_cpu_sync = True if do_cpu_sync is None else do_cpu_sync
        _host_assert(x.dim() == 2 and x.is_contiguous(), "x 2-D contiguous")
        _host_assert(topk_idx.dtype == topk_idx_t, "topk_idx is topk_idx_t")
        _host_assert(x.shape[0] <= max_tokens, "num_tokens <= num_max_tokens_per_rank")
        _host_assert(num_experts is not None and num_experts % w == 0,
                     "num_experts % num_ranks == 0")
        n, hidden = x.shape
        local = num_experts // w
        agree(self.group, "deep_ep.ElasticBuffer.dispatch",
              ("dispatch", handle is not None, hidden, max_tokens, num_experts, next(rt.calls)))
        ids = topk_idx.long()
        send_rows, idx_parts, weight_parts = [], [], []
        for j in range(w):
            mine = (ids >= j * local) & (ids < (j + 1) * local)
            rows = torch.nonzero(mine.any(dim=1)).flatten()
            send_rows.append(rows)
            idx_parts.append(torch.where(mine[rows], ids[rows] - j * local,
                                         torch.full_like(ids[rows], -1)))
            if topk_weights is not None:
                weight_parts.append(topk_weights[rows])
        got_x = alltoallv([x[r] for r in send_rows], self.group)
        got_sf = (alltoallv([sf[r].contiguous() for r in send_rows], self.group)
                  if sf is not None else None)
        got_idx = alltoallv(idx_parts, self.group)
        got_w = alltoallv(weight_parts, self.group) if topk_weights is not None else None
        got_src = alltoallv([(r + rank * max_tokens).to(torch.int32) for r in send_rows],
                            self.group)
        counts = [p.shape[0] for p in got_x]
        actual = sum(counts)
        src_global = torch.cat(got_src) if actual else torch.empty(0, dtype=torch.int32)
        if handle is not None:
            order = handle._model_recv_order
        elif self.deterministic:
            order = torch.argsort(src_global, stable=True)
        else:
            order = torch.randperm(actual, generator=order_generator(rank))
        rows_out = actual if do_cpu_sync else w * max_tokens

        def place(parts: list[torch.Tensor], fill: Optional[int] = None) -> torch.Tensor:
            ref = parts[0]
            out = torch.empty((rows_out, *ref.shape[1:]), dtype=ref.dtype)
            poison_(out) if fill is None else out.fill_(fill)
            if actual:
                out[:actual] = torch.cat(parts)[order]
            return out

        recv_x = place(got_x)
        recv_sf = place(got_sf) if got_sf is not None else None
        recv_idx = place(got_idx, fill=-1)
        recv_w = place(got_w) if got_w is not None else None
        event = EventOverlap(EventHandle() if async_with_compute_stream else None)
        packed = (recv_x, recv_sf) if recv_sf is not None else recv_x
        if handle is not None:
            return packed, recv_idx, recv_w, handle, event
        per_expert = [int((recv_idx[:actual] == e).sum()) for e in range(local)]
        psum = torch.cumsum(torch.tensor(counts, dtype=torch.int32), 0).to(torch.int32)
        meta = torch.full((rows_out, 2 + ids.shape[1]), -1, dtype=torch.int32)
        if actual:
            meta[:actual, 0] = src_global[order]
        new = EPHandle(False, num_experts, expert_alignment, max_tokens,
                       num_sms or 24, topk_idx.clone() if do_handle_copy else topk_idx,
                       actual, actual,
                       [_align(c, expert_alignment) for c in per_expert] if do_cpu_sync else [],
                       psum, torch.zeros(local, dtype=torch.int32),
                       torch.tensor(per_expert, dtype=torch.int32), meta,
                       torch.empty(0, dtype=torch.int32), None, None)
        new._model_send_rows = send_rows
        new._model_recv_order = order
        return packed, recv_idx, recv_w, new, event

    def combine(self, x: torch.Tensor, handle: EPHandle,
                topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = None,
                num_sms: int = 0, num_qps: int = 0,
                previous_event: EventHandle = None,
                previous_event_before_epilogue: Optional[EventHandle] = None,
                async_with_compute_stream: bool = False,
                allocate_on_comm_stream: bool = False) \
            -> tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Unweighted sum over ranks (bf16), ``topk_weights`` reduced the same way.

        Args:
            x: ``[M, H]`` bf16, one row per received row of ``handle``'s dispatch.

        Returns:
            ``combined_x [N, H]`` bf16, ``combined_topk_weights [N, K]`` float32 or None, event.
        """
        rt = self._rt()
        if handle.do_expand:
            raise ModelNotImplementedError("expanded combine is not modelled")
        _host_assert(x.dtype == torch.bfloat16, "x.scalar_type() == kBFloat16")
        w = self.num_ranks
        agree(self.group, "deep_ep.ElasticBuffer.combine",
              ("combine", x.shape[1], next(rt.calls)))
        psum = [0] + handle.psum_num_recv_tokens_per_scaleup_rank.tolist()
        actual = psum[-1]
        # Undo the receive order, then hand each source its block back.
        unordered = torch.empty((actual, x.shape[1]), dtype=x.dtype)
        unordered[handle._model_recv_order] = x[:actual]
        back = alltoallv([unordered[psum[i]:psum[i + 1]] for i in range(w)], self.group)
        if topk_weights is not None:
            uw = torch.empty((actual, topk_weights.shape[1]), dtype=torch.float32)
            uw[handle._model_recv_order] = topk_weights[:actual].float()
            back_w = alltoallv([uw[psum[i]:psum[i + 1]] for i in range(w)], self.group)
        n = handle.topk_idx.shape[0]
        out = torch.zeros((n, x.shape[1]), dtype=torch.float32)
        biases = [] if bias is None else [bias] if isinstance(bias, torch.Tensor) else list(bias)
        for b in biases:
            out += b.float()
        out_w = (torch.zeros((n, topk_weights.shape[1]), dtype=torch.float32)
                 if topk_weights is not None else None)
        for j, rows in enumerate(handle._model_send_rows):
            out[rows] += back[j].float()
            if out_w is not None:
                out_w[rows] += back_w[j]
        return out.to(torch.bfloat16), out_w, EventOverlap(
            EventHandle() if async_with_compute_stream else None)

    def _not_modelled(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelNotImplementedError("Engram / PP / AGRS of ElasticBuffer are not modelled")

    engram_write = engram_fetch = pp_set_config = pp_send = pp_recv = _not_modelled
    create_agrs_session = destroy_agrs_session = agrs_set_config = _not_modelled
    agrs_get_inplace_tensor = all_gather = agrs_new_session = _not_modelled


def get_physical_domain_size(group: dist.ProcessGroup) -> tuple[int, int]:
    """``(num_rdma_ranks, num_nvlink_ranks)``: the model places every rank in one NVLink domain."""
    return 1, group.size()


def get_logical_domain_size(group: dist.ProcessGroup,
                            allow_hybrid_mode: bool = True) -> tuple[int, int]:
    """``(num_scaleout_ranks, num_scaleup_ranks)``: one scale-up domain in the model."""
    return 1, group.size()

