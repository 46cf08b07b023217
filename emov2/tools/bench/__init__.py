"""Benchmark harness: throughput, latency, training speed, memory and efficiency of EMO models vs timm.

``run_benchmark(BenchConfig(...))`` returns a JSON-able dict; ``emov2.tools.bench.report`` prints it,
writes it and plots it. See ``docs/BENCHMARKS.md``.
"""
from .gemm import measure_gemm_flops
from .runner import BenchConfig, compute_derived, run_benchmark
from .timing import Case, run_interleaved

__all__ = ["BenchConfig", "run_benchmark", "compute_derived", "measure_gemm_flops", "Case", "run_interleaved"]
