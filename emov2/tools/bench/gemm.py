"""The machine's dense matrix-multiply throughput, measured in the benchmark's own process.

This is the yardstick for "efficiency": a model's achieved FLOP/s divided by the best that
``torch.mm`` reaches with the same threads and device (:func:`measure_gemm_peak`).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

# Square sizes tried for the peak. Small ones are cache-resident and leave threads idle; the
# largest must not fit in the last-level cache (see :func:`sizes_beyond_cache`).
PEAK_SIZES = (512, 1024, 2048, 4096)
QUICK_PEAK_SIZES = (512, 1024, 2048)


def gemm_working_set(n: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes touched by one ``n x n`` product: A, B and C."""
    return 3 * n * n * torch.empty((), dtype=dtype).element_size()


def sizes_beyond_cache(sizes: Sequence[int], cache_bytes: int | None, dtype: torch.dtype = torch.float32,
                       limit: int = 16384) -> tuple[int, ...]:
    """``sizes`` (sorted), plus doublings of the largest until its working set exceeds ``cache_bytes``."""
    out = sorted(set(int(n) for n in sizes))
    if cache_bytes:
        while out[-1] * 2 <= limit and gemm_working_set(out[-1], dtype) <= cache_bytes:
            out.append(out[-1] * 2)
    return tuple(out)


def measure_gemm_flops(
    dtype: torch.dtype = torch.float32,
    n: int = 2048,
    repeats: int = 5,
    device: str = "cpu",
    min_time_s: float = 0.3,
) -> dict:
    """FLOP/s of ``C = A @ B`` with square ``n x n`` matrices (2 n^3 FLOPs per product).

    Returns ``{"dtype", "n", "gflops" (median), "best_gflops", "samples_gflops", "call_s"}``. Each
    sample loops for at least ``min_time_s`` (and at least one product); ``call_s`` is the
    fastest time of one product.
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
        "best_gflops": max(samples),
        "samples_gflops": samples,
        "call_s": flop / max(samples) / 1e9,
    }


def measure_gemm_peak(
    dtype: torch.dtype = torch.float32,
    sizes: Sequence[int] = PEAK_SIZES,
    repeats: int = 3,
    device: str = "cpu",
    min_time_s: float = 0.3,
    max_call_s: float = 2.0,
    measure: Callable[..., dict] | None = None,
) -> dict:
    """The peak dense FLOP/s: the best sample over several square sizes, with the current threads.

    Why the best and not one size's median: a model's efficiency is its median FLOP/s divided
    by this peak, and must stay below 100% by construction. A single small size (the old quick
    mode used n=512, whose 3 MiB fit in cache) leaves threads idle and per-call overhead large,
    so fused conv kernels beat it and the ratio went above 100%. Several sizes, the largest one
    beyond the last-level cache, each sampled ``repeats`` times for at least ``min_time_s``,
    give the fastest sustained rate ``torch.mm`` reaches; interference from other processes only
    lowers samples, so the maximum is the least disturbed one. Sizes are tried in ascending
    order and a size whose estimated product time (from the previous size's rate) exceeds
    ``max_call_s`` is skipped (emulated bf16 runs at ~1 GFLOP/s on CPUs without native bf16).

    ``measure`` (default :func:`measure_gemm_flops`) measures one size.

    Returns ``{"dtype", "n" (the best size), "gflops" (the peak), "sizes": {n: best GFLOP/s},
    "skipped": [n, ...], "threads", "samples_gflops" (of the best size)}``.
    """
    measure = measure or measure_gemm_flops
    per_size: dict[int, dict] = {}
    skipped: list[int] = []
    rate = None
    for n in sorted(set(int(s) for s in sizes)):
        if rate is not None and 2.0 * n ** 3 / (rate * 1e9) > max_call_s:
            skipped.append(n)
            continue
        res = measure(dtype, n=n, repeats=repeats, device=device, min_time_s=min_time_s)
        per_size[n] = res
        rate = res["best_gflops"]
    best = max(per_size.values(), key=lambda r: r["best_gflops"])
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "n": best["n"],
        "gflops": best["best_gflops"],
        "sizes": {n: r["best_gflops"] for n, r in per_size.items()},
        "skipped": skipped,
        "threads": torch.get_num_threads(),
        "samples_gflops": best["samples_gflops"],
    }
