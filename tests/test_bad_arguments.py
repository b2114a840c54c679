"""Every public foundation function rejects bad arguments with an error naming them."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from moe_ep.distributed import (
    GroupCoordinator,
    Topology,
    get_ep_group,
    group_layout,
    init_distributed,
    initialize_model_parallel,
)
from moe_ep.testing import DistributedPool, run_distributed

# (description, call, exception type, regex the message must match) - run in this process,
# where torch.distributed is not initialised.
LOCAL_CASES = [
    ("world not divisible", lambda: group_layout(6, 4), ValueError, r"world size 6 .* 4"),
    ("tp < 1", lambda: group_layout(4, 0), ValueError, r"tensor_parallel_size .*>= 1, got 0"),
    ("pp not int", lambda: group_layout(4, 1, 1.5), ValueError, r"pipeline_parallel_size"),
    ("dp mismatch", lambda: group_layout(8, 2, 1, 3), ValueError, r"\(3\) = 6 must equal .* 8"),
    ("init world 0", lambda: init_distributed(0, 0, init_method="tcp://127.0.0.1:1"),
     ValueError, r"world_size must be >= 1, got 0"),
    ("init rank out of range", lambda: init_distributed(2, 2, init_method="tcp://127.0.0.1:1"),
     ValueError, r"rank must be in \[0, 2\), got 2"),
    ("init bad backend", lambda: init_distributed(1, 0, backend="mpi",
                                                  init_method="tcp://127.0.0.1:1"),
     ValueError, r"backend must be one of .*'mpi'"),
    ("init no rank", lambda: init_distributed(2, None, init_method="tcp://127.0.0.1:1"),
     ValueError, r"pass rank= or set the environment variable RANK"),
    ("init bad timeout", lambda: init_distributed(1, 0, init_method="tcp://127.0.0.1:1",
                                                  timeout=5), TypeError, r"timeout"),
    ("init float rank", lambda: init_distributed(2, 1.0, init_method="tcp://127.0.0.1:1"),
     TypeError, r"rank must be an int"),
    ("groups before init", lambda: initialize_model_parallel(), RuntimeError,
     r"torch.distributed is not initialised"),
    ("getter before init", lambda: get_ep_group(), RuntimeError, r"initialize_model_parallel"),
    ("coordinator before init", lambda: GroupCoordinator([[0]], "x"), RuntimeError,
     r"init_distributed"),
    ("run world 0", lambda: run_distributed(0, print), ValueError, r"world_size .*got 0"),
    ("run not callable", lambda: run_distributed(1, 42), TypeError, r"fn must be callable"),
    ("run bad timeout", lambda: run_distributed(1, print, timeout=0), ValueError, r"timeout"),
    ("run endless timeout", lambda: run_distributed(1, print, timeout=float("inf")), ValueError,
     r"timeout must be a finite number of seconds > 0, got inf"),
    ("pool bool start timeout", lambda: DistributedPool(1, start_timeout=True), ValueError,
     r"start_timeout must be a finite number of seconds"),
    ("pool bad device", lambda: DistributedPool(1, device="tpu"), ValueError, r"device .*tpu"),
    ("topology bad device", lambda: Topology(device="tpu"), ValueError, r"device .*tpu"),
    ("topology rank", lambda: Topology(world_size=2, rank=2), ValueError, r"rank must be in"),
    ("topology same_node", lambda: Topology(world_size=2, same_node=(True, False, True)),
     ValueError, r"same_node must have world_size=2 entries"),
]


@pytest.mark.parametrize("case", LOCAL_CASES, ids=[c[0] for c in LOCAL_CASES])
def test_bad_arguments_local(case, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call()


def _group_cases(g):
    x = torch.zeros(4, 3)
    return [
        ("all_reduce not tensor", lambda: g.all_reduce([1, 2]), TypeError, r"x must be a torch"),
        ("all_gather dim", lambda: g.all_gather(x, dim=2), ValueError, r"dim=2 is out of range"),
        ("all_gather dim type", lambda: g.all_gather(x, dim="0"), TypeError, r"dim must be an int"),
        ("gatherv sizes length", lambda: g.all_gatherv(x, sizes=[4]), ValueError,
         r"sizes must list one int >= 0 per rank \(2 entries\)"),
        ("gatherv negative size", lambda: g.all_gatherv(x, sizes=[4, -1]), ValueError, r"sizes"),
        ("gatherv my size", lambda: g.all_gatherv(x, sizes=[3, 4] if g.rank_in_group == 0
                                                  else [4, 3]),
         ValueError, r"x\[0\] has 4 rows along dim 0 but sizes\[\d\]=3"),
        ("gatherv empty list", lambda: g.all_gatherv([]), ValueError, r"at least one tensor"),
        ("reduce_scatter divisible", lambda: g.reduce_scatter(torch.zeros(3)), ValueError,
         r"x.shape\[0\]=3 to be a multiple of world_size=2"),
        ("reduce_scatterv sum", lambda: g.reduce_scatterv(x, sizes=[1, 1]), ValueError,
         r"sum\(sizes\)=2 must equal x.shape\[0\]=4"),
        ("a2a split sum", lambda: g.all_to_all_single(x, [2, 2], [1, 1]), ValueError,
         r"sum\(input_split_sizes\)=2 must equal x.shape\[0\]=4"),
        ("a2a uneven", lambda: g.all_to_all_single(torch.zeros(3, 1)), ValueError,
         r"not a multiple of world_size=2"),
        ("a2a uneven sends, no recvs", lambda: g.all_to_all_single(x, None, [1, 3]), ValueError,
         r"pass output_split_sizes when input_split_sizes are uneven"),
        ("all_gather 0-dim", lambda: g.all_gather(torch.tensor(1.0)), ValueError,
         r"at least one dimension"),
        ("broadcast src", lambda: g.broadcast(x, src=2), ValueError, r"src=2 is not a rank"),
        ("broadcast strided", lambda: g.broadcast(x.t()), ValueError, r"contiguous"),
        ("gather dst type", lambda: g.gather(x, dst=0.0), TypeError, r"dst must be an int"),
        ("bcast dict type", lambda: g.broadcast_tensor_dict([1], src=g.rank_in_group),
         TypeError, r"tensor_dict must be a dict"),
        ("bcast dict key", lambda: g.broadcast_tensor_dict({1: x}, src=g.rank_in_group),
         TypeError, r"keys must be str"),
        ("send to self", lambda: g.send_tensor_dict({}, dst=g.rank_in_group), ValueError,
         r"dst=\d is this rank"),
        ("recv bad src", lambda: g.recv_tensor_dict(src=-1), ValueError, r"src=-1 is not a rank"),
        ("group ranks overlap", lambda: GroupCoordinator([[0, 1], [1]], "bad"), ValueError,
         r"ranks \[1\] appear in more than one group"),
        ("group ranks outside", lambda: GroupCoordinator([[0, 1, 2]], "bad"), ValueError,
         r"outside the world \[0, 2\)"),
        ("twice", lambda: initialize_model_parallel(), RuntimeError, r"already called"),
        ("tp too big", None, ValueError, r"world size 2 is not divisible"),
    ]


def _run_group_cases(info):
    initialize_model_parallel()
    g = get_ep_group()
    failures = []
    for name, call, exc, pattern in _group_cases(g):
        if call is None:  # needs no groups: checked after destroying them below
            continue
        try:
            call()
            failures.append(f"{name}: no error")
        except exc as e:
            if not __import__("re").search(pattern, str(e)):
                failures.append(f"{name}: message {str(e)!r} does not match {pattern!r}")
        except Exception as e:  # wrong type
            failures.append(f"{name}: {type(e).__name__}: {e}")
    # Nothing above communicated: the group still works and the ranks are in step.
    assert int(g.all_reduce(torch.ones(1))) == 2
    from moe_ep.distributed import destroy_model_parallel

    destroy_model_parallel()
    try:
        initialize_model_parallel(4)
        failures.append("tp too big: no error")
    except ValueError as e:
        if "world size 2 is not divisible" not in str(e):
            failures.append(f"tp too big: {e}")
    return failures


def test_bad_arguments_in_groups(dist_pool):
    for failures in dist_pool(2).run(_run_group_cases):
        assert failures == []


def test_missing_master_address_is_named(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT"):
        init_distributed(1, 0, timeout=timedelta(seconds=1))
