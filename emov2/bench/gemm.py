"""The machine's dense matrix-multiply throughput, measured in the benchmark's own process.

This is the yardstick for "efficiency": a model's achieved FLOP/s divided by what ``torch.mm``
reaches on large square matrices with the same threads, dtype and device.
"""
from __future__ import annotations

import statistics
import time

import torch


def measure_gemm_flops(
    dtype: torch.dtype = torch.float32,
    n: int = 2048,
    repeats: int = 5,
    device: str = "cpu",
    min_time_s: float = 0.3,
) -> dict:
    """Median FLOP/s of ``C = A @ B`` with square ``n x n`` matrices (2 n^3 FLOPs per product).

    Returns ``{"dtype", "n", "gflops", "samples_gflops"}``. Each sample loops for ``min_time_s``.
    """
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    flop = 2.0 * n ** 3
    with torch.inference_mode():
        torch.mm(a, b, out=out)
        sync()
        samples = []
        for _ in range(repeats):
            k = 0
            start = time.perf_counter()
            while True:
                torch.mm(a, b, out=out)
                k += 1
                sync()
                el = time.perf_counter() - start
                if el >= min_time_s:
                    break
            samples.append(flop * k / el / 1e9)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "gflops": statistics.median(samples),
        "samples_gflops": samples,
    }
