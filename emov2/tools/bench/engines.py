"""Where users deploy: EMOv2 vs EdgeNeXt per engine (PyTorch eager / deploy / compile, ONNX Runtime fp32 / int8)
at batch 1 and a throughput batch, in one process, each engine's cases interleaved.

Both sides of each pair go through the same steps: ONNX files come from ``torch.onnx.export`` (EMO
models in :func:`~emov2.tools.export.deploy_for_export`'s graph form, EdgeNeXt as timm builds it),
int8 copies from :func:`~emov2.tools.quantize.quantize_onnx` calibrated on the same photographs, and
ONNX Runtime runs with the same threads. Ratios are EMOv2 img/s over EdgeNeXt img/s (> 1: EMOv2
faster), per round (both measured in the same round) and as the median of the rounds.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch

from . import models as catalog
from .machine import machine_info
from .timing import Case, run_interleaved
from ..export import export_onnx, onnx_session
from ..quantize import calibration_images, quantize_onnx

PAIRS = (("emov2_1m", "edgenext_xx_small"), ("emov2_2m", "edgenext_x_small"), ("emov2_5m", "edgenext_small"))
ENGINES = ("torch_eager", "torch_deploy", "torch_compile", "ort_fp32", "ort_int8")

__all__ = ["PAIRS", "ENGINES", "run_engines", "engines_markdown"]


def _edgenext_onnx(name: str, path: Path, img_size: int) -> Path:
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, img_size, img_size)
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"], dynamo=True,
                      opset_version=20, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                      external_data=False, verbose=False)
    return path


def run_engines(pairs=PAIRS, batches=(1, 64), engines=ENGINES, repeats: int = 3, img_size: int = 224,
                min_time_s: float = 0.3, log: Callable[[str], None] = print) -> dict:
    """Time every (engine, batch) for both models of each pair; returns a JSON-able dict."""
    threads = torch.get_num_threads()
    names = [n for pair in pairs for n in pair]
    callables: dict[str, dict[str, Callable[[np.ndarray | torch.Tensor], object]]] = {e: {} for e in engines}
    notes: list[str] = ["torch_compile: torch.compile of the deployed EMO model / the timm model; compilation "
                        "runs in the untimed warm-up round"] if "torch_compile" in engines else []
    tmp = Path(tempfile.mkdtemp(prefix="emov2-engines-"))
    cal = calibration_images("photos", n=32, img_size=img_size) if "ort_int8" in engines else None
    for n in names:
        emo = catalog.is_emo(n)
        if "torch_eager" in engines:
            callables["torch_eager"][n] = catalog.build(n, "eager" if emo else "timm")
        if "torch_deploy" in engines or "torch_compile" in engines:
            deployed = catalog.build(n, "deploy" if emo else "timm")
            if "torch_deploy" in engines:
                callables["torch_deploy"][n] = deployed
            if "torch_compile" in engines:
                callables["torch_compile"][n] = torch.compile(deployed)
        if "ort_fp32" in engines or "ort_int8" in engines:
            log(f"  exporting {n} to ONNX")
            path = tmp / f"{n}.onnx"
            if emo:
                export_onnx(catalog.build(n, "deploy", exportable=True), path, img_size=img_size)
            else:
                _edgenext_onnx(n, path, img_size)
            if "ort_fp32" in engines:
                callables["ort_fp32"][n] = onnx_session(path, threads)
            if "ort_int8" in engines:
                log(f"  quantizing {n} (int8 QDQ, 32 photographs)")
                callables["ort_int8"][n] = onnx_session(quantize_onnx(path, tmp / f"{n}.int8.onnx", cal), threads)
    rows = []
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
            t0 = time.perf_counter()
            run_interleaved(cases, repeats=repeats, warmup=1, min_time_s=min_time_s if batch == 1 else 0.0)
            log(f"  {engine} batch {batch}: {time.perf_counter() - t0:.0f}s")
            for c in cases:
                rows.append({"engine": engine, "batch": batch, "model": c.key, "ms": [t * 1e3 for t in c.times],
                             "median_ms": c.median_s * 1e3 if c.median_s else None, "error": c.error})
    index = {(r["engine"], r["batch"], r["model"]): r for r in rows}
    ratios = []
    for engine in engines:
        for batch in batches:
            for emo, edge in pairs:
                a, b = index.get((engine, batch, emo)), index.get((engine, batch, edge))
                if not (a and b and a["ms"] and b["ms"]) or len(a["ms"]) != len(b["ms"]):
                    continue
                per_round = [tb / ta for ta, tb in zip(a["ms"], b["ms"])]
                ratios.append({"engine": engine, "batch": batch, "emo": emo, "edgenext": edge,
                               "emo_ms": a["median_ms"], "edgenext_ms": b["median_ms"],
                               "ratio": b["median_ms"] / a["median_ms"], "ratio_min": min(per_round),
                               "ratio_max": max(per_round)})
    return {"schema": "emov2-engines/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": machine_info("cpu"), "threads": threads, "repeats": repeats, "img_size": img_size,
            "rows": rows, "ratios": ratios, "notes": notes}


def _infer(model: torch.nn.Module, x: torch.Tensor) -> object:
    with torch.inference_mode():
        return model(x)


def engines_markdown(result: dict) -> str:
    """One row per engine and batch: ms per call of EMOv2 / EdgeNeXt and the ratio (min-max over rounds)."""
    pairs = []
    for r in result["ratios"]:
        if (r["emo"], r["edgenext"]) not in pairs:
            pairs.append((r["emo"], r["edgenext"]))
    head = "| engine | batch | " + " | ".join(f"{e} / {g} ms | ratio (min-max)" for e, g in pairs) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(pairs))]
    keys = []
    for r in result["ratios"]:
        if (r["engine"], r["batch"]) not in keys:
            keys.append((r["engine"], r["batch"]))
    by = {(r["engine"], r["batch"], r["emo"]): r for r in result["ratios"]}
    for engine, batch in keys:
        cells = []
        for emo, _ in pairs:
            r = by.get((engine, batch, emo))
            cells += ["-", "-"] if r is None else [
                f"{r['emo_ms']:.1f} / {r['edgenext_ms']:.1f}",
                f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"]
        lines.append(f"| {engine} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
