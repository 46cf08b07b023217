"""Where users deploy: EMOv2 vs EdgeNeXt per engine (PyTorch eager / deploy / compile / PT2E int8, ONNX Runtime
fp32 / int8) at batch 1 and a throughput batch, at one or more thread counts, in one process, each engine's
cases interleaved.

Both sides of each pair go through the same steps: ONNX files come from ``torch.onnx.export`` (EMO
models in :func:`~emov2.tools.export.deploy_for_export`'s graph form, EdgeNeXt as timm builds it),
int8 copies from :func:`~emov2.tools.quantize.quantize_onnx` (ONNX Runtime) and
:func:`~emov2.tools.quantize.quantize_pt2e` (PyTorch PT2E, x86 inductor quantizer, lowered by
``torch.compile``) calibrated on the same photographs, and every engine runs with the same threads.
``torch_compile`` compiles the deployed EMO model and the timm model with the same options (inductor with
weight freezing, the setting PyTorch recommends for CPU inference and the one PT2E int8 needs), once per
thread count (inductor bakes the thread count into its kernels). Ratios are EdgeNeXt ms over EMOv2 ms
(> 1: EMOv2 faster), per round (both measured in the same round) and as the ratio of the medians.
The load average is recorded before and after every group, because absolute times on a shared machine
mean little.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import timm
import torch

from . import models as catalog
from .machine import load_average, machine_info
from .timing import Case, run_interleaved
from ..export import export_onnx, onnx_session
from ..quantize import calibration_images, compile_frozen, compile_int8, quantize_onnx, quantize_pt2e

PAIRS = (("emov2_1m", "edgenext_xx_small"), ("emov2_2m", "edgenext_x_small"), ("emov2_5m", "edgenext_small"))
ENGINES = ("torch_eager", "torch_deploy", "torch_compile", "torch_int8", "ort_fp32", "ort_int8")
COMPILED = ("torch_compile", "torch_int8")

__all__ = ["PAIRS", "ENGINES", "COMPILED", "run_engines", "engines_markdown"]


def _edgenext_onnx(name: str, path: Path, img_size: int) -> Path:
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, img_size, img_size)
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"], dynamo=True,
                      opset_version=20, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                      external_data=False, verbose=False)
    return path


def _exportable(name: str) -> torch.nn.Module:
    """The plain-op form both exporters take: EMO models through ``deploy_for_export``, timm models as built."""
    return catalog.build(name, "deploy", exportable=True) if catalog.is_emo(name) else catalog.build(name, "timm")


def run_engines(pairs=PAIRS, batches=(1, 64), engines=ENGINES, repeats: int = 3, img_size: int = 224,
                min_time_s: float = 0.3, threads: Sequence[int] | None = None, warmup: int = 3,
                log: Callable[[str], None] = print, on_group: Callable[[dict], None] | None = None) -> dict:
    """Time every (threads, batch, engine) for both models of each pair; returns a JSON-able dict.

    ``threads``: the thread counts (torch and ONNX Runtime alike); the default is torch's current
    count. Each row records ``threads`` and the load average before and after its group.
    ``warmup``: untimed rounds per group. ONNX Runtime needs about three calls at a new batch size before
    its arena stops growing (Zen 4 guest, batch 64, 1 thread: EMOv2-1M 1565, 1561, 1177, 946, 923 ms;
    EdgeNeXt-XXS 933, 795, 690, 648, 660 ms), so one warm-up round left the larger model's first timed
    calls slow.
    ``on_group`` receives the result so far after every group (the CLI saves it, so that a long run
    stopped midway keeps what it measured).
    """
    default_threads = torch.get_num_threads()
    thread_counts = [int(t) for t in (threads or (default_threads,))]
    if any(t < 1 for t in thread_counts):
        raise ValueError(f"thread counts must be >= 1, got {thread_counts}")
    names = [n for pair in pairs for n in pair]
    notes: list[str] = []
    if "torch_compile" in engines:
        notes.append("torch_compile: torch.compile with inductor weight freezing (emov2.tools.quantize.compile_frozen) "
                     "of the deployed EMO model / the timm model, compiled again for each thread count; compilation "
                     "runs in the untimed warm-up round")
    if "torch_int8" in engines:
        notes.append("torch_int8: PT2E (torch.export + X86InductorQuantizer, min-max calibration on 32 photographs) of "
                     "the export form of the EMO model / the timm model, lowered by torch.compile with freezing")
    load_start = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="emov2-engines-"))
    cal = calibration_images("photos", n=32, img_size=img_size) if {"ort_int8", "torch_int8"} & set(engines) else None
    modules: dict[str, dict[str, torch.nn.Module]] = {e: {} for e in engines}
    onnx_files: dict[str, dict[str, Path]] = {"ort_fp32": {}, "ort_int8": {}}
    for n in names:
        emo = catalog.is_emo(n)
        if "torch_eager" in engines:
            modules["torch_eager"][n] = catalog.build(n, "eager" if emo else "timm")
        if "torch_deploy" in engines or "torch_compile" in engines:
            deployed = catalog.build(n, "deploy" if emo else "timm")
            for e in ("torch_deploy", "torch_compile"):
                if e in engines:
                    modules[e][n] = deployed
        if "torch_int8" in engines:
            log(f"  quantizing {n} with PT2E (X86InductorQuantizer, 32 photographs)")
            try:
                modules["torch_int8"][n] = quantize_pt2e(_exportable(n), cal)
            except Exception as exc:  # reported as the row's error, the other engines still run
                notes.append(f"torch_int8 {n}: {type(exc).__name__}: {exc}"[:500])
        if "ort_fp32" in engines or "ort_int8" in engines:
            log(f"  exporting {n} to ONNX")
            path = tmp / f"{n}.onnx"
            if emo:
                export_onnx(_exportable(n), path, img_size=img_size)
            else:
                _edgenext_onnx(n, path, img_size)
            onnx_files["ort_fp32"][n] = path
            if "ort_int8" in engines:
                log(f"  quantizing {n} (int8 QDQ, 32 photographs)")
                onnx_files["ort_int8"][n] = quantize_onnx(path, tmp / f"{n}.int8.onnx", cal)
    rows = []
    try:
        for nt in thread_counts:
            torch.set_num_threads(nt)
            if COMPILED[0] in engines or COMPILED[1] in engines:
                torch._dynamo.reset()  # dynamo does not guard on the thread count: compile afresh for this one
            callables: dict[str, dict[str, Callable]] = {e: {} for e in engines}
            for e in engines:
                if e.startswith("ort"):
                    callables[e] = {n: onnx_session(p, nt) for n, p in onnx_files[e].items()}
                elif e == "torch_compile":
                    callables[e] = {n: compile_frozen(m) for n, m in modules[e].items()}
                elif e == "torch_int8":
                    callables[e] = {n: compile_int8(m) for n, m in modules[e].items()}  # static shapes per batch
                else:
                    callables[e] = dict(modules[e])
            for batch in batches:
                x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
                feed = x.numpy()
                for engine in engines:
                    cases = []
                    for n, fn in callables[engine].items():
                        if engine.startswith("ort"):
                            call = (lambda s=fn: s.run(None, {s.get_inputs()[0].name: feed}))
                        else:
                            call = (lambda m=fn: _infer(m, x))
                        cases.append(Case(key=n, fn=call, items=batch))
                    load_before, t0 = load_average(), time.perf_counter()
                    run_interleaved(cases, repeats=repeats, warmup=warmup, min_time_s=min_time_s if batch == 1 else 0.0)
                    load_after = load_average()
                    log(f"  {engine} batch {batch} threads {nt}: {time.perf_counter() - t0:.0f}s "
                        f"(load average {load_before} -> {load_after})")
                    for c in cases:
                        rows.append({"engine": engine, "batch": batch, "threads": nt, "model": c.key,
                                     "ms": [t * 1e3 for t in c.times],
                                     "median_ms": c.median_s * 1e3 if c.median_s else None, "error": c.error,
                                     "load_before": load_before, "load_after": load_after})
                    if on_group is not None:
                        on_group(_result(rows, pairs, engines, batches, thread_counts, repeats, img_size,
                                         load_start, notes, warmup))
    finally:
        torch.set_num_threads(default_threads)
    return _result(rows, pairs, engines, batches, thread_counts, repeats, img_size, load_start, notes, warmup)


def _result(rows: list[dict], pairs, engines, batches, thread_counts: list[int], repeats: int, img_size: int,
            load_start: list[float] | None, notes: list[str], warmup: int) -> dict:
    """The JSON-able result of the rows measured so far, with the per-pair ratios."""
    index = {(r["engine"], r["batch"], r["threads"], r["model"]): r for r in rows}
    ratios = []
    for nt in thread_counts:
        for engine in engines:
            for batch in batches:
                for emo, edge in pairs:
                    a, b = index.get((engine, batch, nt, emo)), index.get((engine, batch, nt, edge))
                    if not (a and b and a["ms"] and b["ms"]) or len(a["ms"]) != len(b["ms"]):
                        continue
                    per_round = [tb / ta for ta, tb in zip(a["ms"], b["ms"])]
                    ratios.append({"engine": engine, "batch": batch, "threads": nt, "emo": emo, "edgenext": edge,
                                   "emo_ms": a["median_ms"], "edgenext_ms": b["median_ms"],
                                   "ratio": b["median_ms"] / a["median_ms"], "ratio_min": min(per_round),
                                   "ratio_max": max(per_round)})
    return {"schema": "emov2-engines/2", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": machine_info("cpu"), "threads": thread_counts, "repeats": repeats, "warmup": warmup,
            "img_size": img_size,
            "load_average": {"start": load_start, "end": load_average()},
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
            "rows": list(rows), "ratios": ratios, "notes": list(notes)}


def _infer(model: torch.nn.Module, x: torch.Tensor) -> object:
    with torch.inference_mode():
        return model(x)


def engines_markdown(result: dict) -> str:
    """One row per engine, batch and thread count: ms per call of EMOv2 / EdgeNeXt and the ratio (min-max over rounds)."""
    pairs = []
    for r in result["ratios"]:
        if (r["emo"], r["edgenext"]) not in pairs:
            pairs.append((r["emo"], r["edgenext"]))
    head = "| engine | batch | threads | " + " | ".join(f"{e} / {g} ms | ratio (min-max)" for e, g in pairs) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(pairs))]
    order = {e: i for i, e in enumerate(ENGINES)}
    keys = sorted({(r["engine"], r["batch"], r.get("threads")) for r in result["ratios"]},
                  key=lambda k: (order.get(k[0], len(order)), k[1], k[2] or 0))
    by = {(r["engine"], r["batch"], r.get("threads"), r["emo"]): r for r in result["ratios"]}
    for engine, batch, nt in keys:
        cells = []
        for emo, _ in pairs:
            r = by.get((engine, batch, nt, emo))
            cells += ["-", "-"] if r is None else [
                f"{r['emo_ms']:.1f} / {r['edgenext_ms']:.1f}",
                f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"]
        lines.append(f"| {engine} | {batch} | {nt if nt is not None else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
