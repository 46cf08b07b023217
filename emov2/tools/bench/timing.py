"""Timing core: interleaved (round-robin) repeats, warm-up, medians.

Every case is a zero-argument callable that does one unit of work (one batch). All cases of a
measurement group run in the same process; each repeat visits every case once, in an order
rotated by one position per repeat, so that slow drifts of the machine (thermal, frequency,
other load) spread over all cases instead of biasing the ones that ran last.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class Case:
    """One thing to time: ``fn()`` processes ``items`` images per call."""

    key: str
    fn: Callable[[], object]
    items: int
    sync: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        """Median wall time of one call, in seconds."""
        return statistics.median(self.times) if self.times else None

    @property
    def throughput(self) -> float | None:
        """Items per second at the median call time."""
        med = self.median_s
        return self.items / med if med else None

    @property
    def spread(self) -> float | None:
        """(max - min) / median of the call times: a rough noise indicator."""
        if len(self.times) < 2:
            return None
        return (max(self.times) - min(self.times)) / statistics.median(self.times)


def _call(case: Case, min_time_s: float) -> float:
    """Run ``case`` at least once and until ``min_time_s`` elapsed; return seconds per call."""
    n = 0
    start = time.perf_counter()
    while True:
        case.fn()
        if case.sync is not None:
            case.sync()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time_s:
            return elapsed / n


def run_interleaved(
    cases: Sequence[Case],
    repeats: int = 3,
    warmup: int = 1,
    min_time_s: float = 0.0,
    on_progress: Callable[[str], None] | None = None,
) -> list[Case]:
    """Time ``cases`` round-robin: ``warmup`` untimed rounds then ``repeats`` timed rounds.

    A case that raises is marked with ``error`` and skipped from then on. ``min_time_s`` makes
    each timed sample loop over several calls (useful for batch-1 latency).
    """
    live = list(cases)
    for rnd in range(warmup + repeats):
        timed = rnd >= warmup
        shift = rnd % max(len(live), 1)
        order = live[shift:] + live[:shift]
        for case in order:
            if case.error is not None:
                continue
            try:
                dt = _call(case, min_time_s if timed else 0.0)
            except Exception as exc:  # a broken model must not stop the whole run
                case.error = f"{type(exc).__name__}: {exc}"[:300]
                continue
            if timed:
                case.times.append(dt)
            if on_progress is not None:
                phase = "run" if timed else "warm-up"
                on_progress(f"{phase} {rnd - warmup + 1 if timed else rnd + 1}: {case.key} {dt * 1e3:.1f} ms")
    return list(cases)


def device_sync(device: torch.device | str) -> Callable[[], None] | None:
    """A synchronise function for asynchronous devices (CUDA), else None."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return None
