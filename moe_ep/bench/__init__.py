"""Benchmarks: the reusable timing core (``dispatch_latency``) under the ``moe-ep bench`` CLI."""

from moe_ep.bench.dispatch_latency import LatencyResult, LatencyStats, make_inputs, measure_manager

__all__ = ["LatencyResult", "LatencyStats", "make_inputs", "measure_manager"]
