"""Orchestrates a benchmark run: builds every case, times groups of cases interleaved, derives ratios."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import models as catalog
from .gemm import PEAK_SIZES, QUICK_PEAK_SIZES, measure_gemm_flops, measure_gemm_peak, sizes_beyond_cache
from .machine import bf16_support, last_level_cache_bytes, load_average, machine_info
from .memory import measure_peak_memory
from .report import PAIRED
from .timing import Case, device_sync, run_interleaved
from ..export import check_onnx_parity, export_onnx, onnx_session

SCHEMA = "emov2-bench/1"
INFER_VARIANTS = ("reference", "eager", "deploy_torch", "deploy", "timm")


@dataclass
class BenchConfig:
    """Everything that defines a run. ``None`` model lists mean "the sensible default"."""

    models: list[str] = field(default_factory=catalog.default_models)
    batch: int = 64
    large_batch: int | None = None
    img_size: int = 224
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    threads: int | None = None
    baseline: str = "edgenext_small"
    latency: bool = True
    bf16: bool = True
    onnx: bool = True
    compile: bool = False
    train: bool = True
    memory: bool = True
    bf16_models: list[str] | None = None
    train_models: list[str] | None = None
    memory_models: list[str] | None = None
    latency_min_time_s: float = 0.2
    gemm_sizes: tuple[int, ...] = PEAK_SIZES
    gemm_repeats: int = 3
    gemm_min_time_s: float = 0.3
    gemm_max_call_s: float = 2.0
    gemm_beyond_cache: bool = True
    num_classes: int = 1000
    verbose: bool = False

    @classmethod
    def quick(cls, **overrides) -> "BenchConfig":
        """A smoke-test configuration: the smallest EMOv2 and EMOv1 and EdgeNeXt-XXS, small batch, one repeat."""
        smallest = [names[0] for names in (catalog.mobile_emo_models("emov2_"), catalog.mobile_emo_models("emov1_"))
                    if names]  # the smallest mobile EMOv2 and EMOv1 of the registry
        base = dict(models=smallest + ["edgenext_xx_small"], batch=8, repeats=1, warmup=1,
                    baseline="edgenext_xx_small", latency_min_time_s=0.05, memory=False,
                    gemm_sizes=QUICK_PEAK_SIZES, gemm_min_time_s=0.2, gemm_max_call_s=1.0)
        base.update(overrides)
        return cls(**base)


def _emo_inference_variant(available: dict[tuple[str, str], bool], name: str) -> str:
    """The fastest variant of an EMO model that exists: deploy, else eager."""
    return "deploy" if available.get((name, "deploy")) else "eager"


class _Runner:
    def __init__(self, cfg: BenchConfig, log: Callable[[str], None]):
        self.cfg = cfg
        self.log = log
        self.device = torch.device(cfg.device)
        self.sync = device_sync(self.device)
        self.results: list[dict] = []
        self.notes: list[str] = []
        self.available: dict[tuple[str, str], bool] = {}
        self._eval_models: dict[tuple[str, str], nn.Module] = {}

    def model(self, name: str, variant: str) -> nn.Module | None:
        key = (name, variant)
        if key not in self._eval_models:
            try:
                m = catalog.build(name, variant, num_classes=self.cfg.num_classes, img_size=self.cfg.img_size)
                self._eval_models[key] = m.to(self.device)
                self.available[key] = True
            except catalog.VariantUnavailable as exc:
                self.available[key] = False
                self.notes.append(f"{name} ({variant}): unavailable: {exc}")
                return None
        return self._eval_models[key]

    def inference_cases(self) -> list[tuple[str, str]]:
        pairs = []
        for name in self.cfg.models:
            for variant in catalog.variants_for(name):
                if self.model(name, variant) is not None:
                    pairs.append((name, variant))
        return pairs

    def primary(self, name: str) -> str:
        return _emo_inference_variant(self.available, name) if catalog.is_emo(name) else "timm"

    def input(self, batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, self.cfg.img_size, self.cfg.img_size, generator=g).to(self.device)

    def record(self, cases: list[Case], meta: dict[str, dict]) -> None:
        for case in cases:
            row = dict(meta[case.key])
            row.update({
                "img_per_s": case.throughput,
                "ms_per_call": case.median_s * 1e3 if case.median_s else None,
                "samples_ms": [t * 1e3 for t in case.times],
                "spread": case.spread,
                "error": case.error,
            })
            self.results.append(row)

    def timed_group(self, title: str, entries: list[tuple[dict, Callable[[], object], int]], min_time_s: float = 0.0) -> None:
        if not entries:
            return
        self.log(f"[bold]{title}[/bold]: {len(entries)} cases x {self.cfg.repeats} repeats (interleaved)")
        cases, meta = [], {}
        for row, fn, items in entries:
            key = f"{row['model']}|{row['variant']}|{row['backend']}|{row['precision']}|{row['task']}|{row['batch']}"
            cases.append(Case(key=key, fn=fn, items=items, sync=self.sync))
            meta[key] = row
        start = time.perf_counter()
        run_interleaved(cases, repeats=self.cfg.repeats, warmup=self.cfg.warmup, min_time_s=min_time_s,
                        on_progress=(lambda msg: self.log(f"  {msg}")) if self.cfg.verbose else None)
        self.log(f"  done in {time.perf_counter() - start:.0f}s")
        self.record(cases, meta)

    @staticmethod
    def row(name: str, variant: str, backend: str, precision: str, task: str, batch: int) -> dict:
        return {"model": name, "variant": variant, "backend": backend, "precision": precision,
                "task": task, "batch": batch}

    def infer_fn(self, model: nn.Module, x: torch.Tensor, precision: str) -> Callable[[], object]:
        dev_type = self.device.type

        def fn() -> object:
            ctx = (torch.autocast(dev_type, dtype=torch.bfloat16) if precision == "bf16"
                   else contextlib.nullcontext())
            with torch.inference_mode(), ctx:
                return model(x)
        return fn

    def train_fn(self, model: nn.Module, x: torch.Tensor, precision: str = "fp32") -> Callable[[], object]:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        target = torch.randint(0, self.cfg.num_classes, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(self.device)
        loss_fn = nn.CrossEntropyLoss()
        dev_type = self.device.type

        def fn() -> object:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
            loss = loss_fn(logits.float(), target)
            loss.backward()
            opt.step()
            return loss
        return fn

    def run(self) -> dict:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        bf16 = bf16_support()
        out: dict = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "machine": machine_info(cfg.device), "config": asdict(cfg)}
        self.log(f"machine: {out['machine']['cpu_model']}, torch threads {torch.get_num_threads()}, "
                 f"native bf16: {bf16['native']}")

        gemm = out["gemm"] = self.gemm_peaks()

        infos = {}
        for name in cfg.models:
            info = catalog.model_info(name, cfg.img_size)
            infos[name] = asdict(info)
        out["models"] = infos

        pairs = self.inference_cases()
        x = self.input(cfg.batch)
        x1 = self.input(1)

        self.timed_group(f"throughput fp32 eager, batch {cfg.batch}", [
            (self.row(n, v, "eager", "fp32", "throughput", cfg.batch), self.infer_fn(self.model(n, v), x, "fp32"), cfg.batch)
            for n, v in pairs])
        if cfg.latency:
            self.timed_group("latency fp32 eager, batch 1", [
                (self.row(n, v, "eager", "fp32", "latency", 1), self.infer_fn(self.model(n, v), x1, "fp32"), 1)
                for n, v in pairs], min_time_s=cfg.latency_min_time_s)
        if cfg.bf16:
            if self.device.type == "cpu" and not bf16["native"]:
                self.notes.append("bf16: this CPU has no native bf16 (avx512_bf16/amx_bf16); bf16 runs emulated")
            bf_models = cfg.bf16_models if cfg.bf16_models is not None else cfg.models
            entries = []
            for n in (m for m in cfg.models if m in bf_models):
                v = self.primary(n)
                # each bf16 case next to an fp32 run of the same model in the same rounds: bf16 / fp32 then
                # divides neighbours, not two groups measured minutes apart on a machine that drifts
                entries.append((self.row(n, v, "eager", "bf16", "throughput", cfg.batch),
                                self.infer_fn(self.model(n, v), x, "bf16"), cfg.batch))
                entries.append((self.row(n, v, "eager", "fp32", PAIRED, cfg.batch),
                                self.infer_fn(self.model(n, v), x, "fp32"), cfg.batch))
            self.timed_group(f"throughput bf16 autocast (each next to fp32), batch {cfg.batch}", entries)
        if cfg.onnx:
            self.onnx_group(x)
        if cfg.compile:
            self.compile_group(x)
        if cfg.large_batch:
            xl = self.input(cfg.large_batch)
            self.timed_group(f"throughput fp32 eager, batch {cfg.large_batch}", [
                (self.row(n, self.primary(n), "eager", "fp32", "throughput", cfg.large_batch),
                 self.infer_fn(self.model(n, self.primary(n)), xl, "fp32"), cfg.large_batch)
                for n in cfg.models])
            del xl
        if cfg.train:
            self.train_group(x)
        if cfg.memory:
            out["memory"] = self.memory_group()
        out["results"] = self.results
        out["gemm_efficiency_note"] = ("efficiency = 2 x model MACs (fvcore, emov2.tools.common.count_flops: "
                                       "convs, matmuls, linears and norms, counted on the training-form model) "
                                       "x median img/s / GEMM "
                                       "peak of the same dtype (best torch.mm sample over several sizes, the "
                                       "largest beyond the last-level cache, same threads, measured before and "
                                       "after the models; bf16: the larger of the bf16 and fp32 peaks)")
        self.remeasure_gemm(gemm)
        compute_derived(out, baseline=cfg.baseline)
        load_end = load_average()
        if load_end is not None and out["machine"]["loadavg_1_5_15"] is not None:
            out["machine"]["loadavg_at_end"] = load_end
            if max(out["machine"]["loadavg_1_5_15"][0], out["machine"]["loadavg_at_end"][0]) > 1.5 * (os.cpu_count() or 1):
                self.notes.append("the machine was busy with other processes (load average above the CPU count): "
                                  "absolute numbers are pessimistic and noisy; ratios are more robust")
        out["notes"] = self.notes
        return out

    def gemm_sizes(self, dtype: torch.dtype) -> tuple[int, ...]:
        """The configured sizes, grown until the largest does not fit in the CPU's last-level cache."""
        cache = last_level_cache_bytes() if self.device.type == "cpu" and self.cfg.gemm_beyond_cache else None
        return sizes_beyond_cache(self.cfg.gemm_sizes, cache, dtype)

    def gemm_peaks(self) -> dict:
        """fp32 (and bf16) GEMM peaks with this run's threads; see :func:`measure_gemm_peak`.

        The bf16 yardstick is the larger of the bf16 and fp32 peaks: where bf16 is emulated
        (computed in fp32) a bf16 run can reach the fp32 rate, far above ``torch.mm`` in bf16.
        """
        cfg = self.cfg
        peaks = {}
        for name, dtype in [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if cfg.bf16 else []):
            sizes = self.gemm_sizes(dtype)
            self.log(f"measuring the {name} GEMM peak (n = {', '.join(map(str, sizes))}, "
                     f"{torch.get_num_threads()} threads)")
            peaks[name] = measure_gemm_peak(dtype, sizes=sizes, repeats=cfg.gemm_repeats, device=cfg.device,
                                            min_time_s=cfg.gemm_min_time_s, max_call_s=cfg.gemm_max_call_s)
            if peaks[name]["skipped"]:
                self.notes.append(f"GEMM peak {name}: sizes {peaks[name]['skipped']} skipped (one product would "
                                  f"take over {cfg.gemm_max_call_s:g} s)")
        self._bf16_yardstick(peaks)
        return peaks

    def remeasure_gemm(self, peaks: dict) -> None:
        """Measure each dtype's best size again after the models and keep the higher peak.

        A machine busy at the start would otherwise lower the yardstick of every later row.
        """
        cfg = self.cfg
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if name not in peaks:
                continue
            p = peaks[name]
            own = "gemm_gflops" if name == "bf16" else "gflops"  # bf16's "gflops" is the yardstick
            res = measure_gemm_flops(dtype, n=p["n"], repeats=cfg.gemm_repeats, device=cfg.device,
                                     min_time_s=cfg.gemm_min_time_s)
            p["gflops_at_end"] = res["best_gflops"]
            if res["best_gflops"] > p[own]:
                p[own] = p["sizes"][p["n"]] = res["best_gflops"]
                p["samples_gflops"] = res["samples_gflops"]
        self._bf16_yardstick(peaks)

    @staticmethod
    def _bf16_yardstick(peaks: dict) -> None:
        if "bf16" not in peaks:
            return
        bf = peaks["bf16"]
        own = bf.setdefault("gemm_gflops", bf["gflops"])
        bf["gflops"] = max(own, peaks["fp32"]["gflops"])
        bf["yardstick"] = "bf16 torch.mm" if own >= peaks["fp32"]["gflops"] else \
            "fp32 torch.mm (faster than bf16 torch.mm here)"

    def onnx_group(self, x: torch.Tensor) -> None:
        if self.device.type != "cpu":
            self.notes.append("onnxruntime: only measured with --device cpu")
            return
        entries = []
        tmp = Path(tempfile.mkdtemp(prefix="emov2-bench-onnx-"))
        for n in self.cfg.models:
            if not catalog.is_emo(n):
                continue
            v = self.primary(n)
            try:
                model = catalog.build(n, v, num_classes=self.cfg.num_classes, img_size=self.cfg.img_size, exportable=True)
                self.log(f"  exporting {n} ({v}) to ONNX")
                path = export_onnx(model, tmp / f"{n}-{v}.onnx", img_size=self.cfg.img_size)
                parity = check_onnx_parity(model, path, batch=2, img_size=self.cfg.img_size)
                sess = onnx_session(path, threads=torch.get_num_threads())
            except Exception as exc:
                self.notes.append(f"{n} ({v}) onnxruntime: export failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            feed = {sess.get_inputs()[0].name: x.cpu().numpy()}
            row = self.row(n, v, "onnxruntime", "fp32", "throughput", self.cfg.batch)
            row["onnx_parity_max_rel_err"] = parity["max_rel_err"]
            entries.append((row, (lambda s=sess, f=feed: s.run(None, f)), self.cfg.batch))
        self.timed_group(f"throughput ONNX Runtime fp32, batch {self.cfg.batch}", entries)

    def compile_group(self, x: torch.Tensor) -> None:
        """torch.compile of EMO models as trained (channels-last ``eager``) and as deployed (inductor
        fuses the plain convs; the attention kernel stays one opaque op), timm models as built."""
        entries = []
        for n in self.cfg.models:
            for v in (["eager", self.primary(n)] if catalog.is_emo(n) else [self.primary(n)]):
                try:
                    compiled = torch.compile(self.model(n, v))
                except Exception as exc:
                    self.notes.append(f"{n} ({v}) torch.compile failed: {exc}")
                    continue
                entries.append((self.row(n, v, "compile", "fp32", "throughput", self.cfg.batch),
                                self.infer_fn(compiled, x, "fp32"), self.cfg.batch))
        self.notes.append("torch.compile: compilation happens in the warm-up round and is not timed")
        self.timed_group(f"throughput fp32 torch.compile, batch {self.cfg.batch}", entries)

    def train_group(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        train_models = cfg.train_models if cfg.train_models is not None else cfg.models
        entries = []
        for n in (m for m in cfg.models if m in train_models):
            for v in (("reference", "eager") if catalog.is_emo(n) else ("timm",)):
                try:
                    model = catalog.build(n, v, num_classes=cfg.num_classes, img_size=cfg.img_size, train=True).to(self.device)
                except catalog.VariantUnavailable as exc:
                    self.notes.append(f"{n} ({v}) training: unavailable: {exc}")
                    continue
                entries.append((self.row(n, v, "eager", "fp32", "train", cfg.batch), self.train_fn(model, x), cfg.batch))
                if v == "eager" and cfg.bf16:  # the trainer's default on CPU: channels-last + bf16 AMP
                    entries.append((self.row(n, v, "eager", "bf16", "train", cfg.batch),
                                    self.train_fn(model, x, "bf16"), cfg.batch))
        self.timed_group(f"training step (fwd+bwd+SGD) fp32 and bf16 AMP, batch {cfg.batch}", entries)

    def memory_group(self) -> list[dict]:
        cfg = self.cfg
        mem_models = cfg.memory_models if cfg.memory_models is not None else cfg.models
        rows = []
        self.log("[bold]peak memory[/bold] (fresh subprocess per measurement)")
        for n in (m for m in cfg.models if m in mem_models):
            jobs = [("infer", self.primary(n))]
            if cfg.train:
                jobs.append(("train", "eager" if catalog.is_emo(n) else "timm"))
            for mode, v in jobs:
                res = measure_peak_memory(n, v, mode, cfg.batch, img_size=cfg.img_size,
                                          threads=torch.get_num_threads(), device=cfg.device)
                rows.append({"model": n, "variant": v, "mode": mode, "batch": cfg.batch, **res})
                self.log(f"  {n} ({v}) {mode}: {res.get('peak_mib', res.get('error'))}")
        return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compute_derived(out: dict, baseline: str) -> None:
    """Add ratios, efficiency and target verdicts to ``out`` (in place).

    Per result row: ``vs_baseline`` (img/s over the ``baseline`` model's primary variant in the
    same backend/precision/task/batch), ``vs_reference`` (EMO rows over their ``reference``
    variant), ``vs_fp32`` (bf16 rows, over the fp32 run measured beside them where there is one, else
    over the fp32 group's row), ``vs_reference_fp32`` (bf16 rows over the reference's fp32 row),
    ``vs_eager`` (onnxruntime / compile rows over eager of the
    same variant), ``efficiency`` (fraction of the same dtype's GEMM FLOP/s).
    """
    rows = out["results"]
    index = {(r["model"], r["variant"], r["backend"], r["precision"], r["task"], r["batch"]): r for r in rows}
    available_variants = {(r["model"], r["variant"]) for r in rows if r.get("img_per_s")}

    def primary(name: str) -> str:
        if not catalog.is_emo(name):
            return "timm"
        return "deploy" if (name, "deploy") in available_variants else "eager"

    gemm = out.get("gemm", {})
    infos = out.get("models", {})
    for r in rows:
        tp = r.get("img_per_s")
        key = (r["backend"], r["precision"], r["task"], r["batch"])
        base = index.get((baseline, primary(baseline), *key))
        r["vs_baseline"] = _ratio(tp, base and base.get("img_per_s"))
        ref = index.get((r["model"], "reference", *key))
        r["vs_reference"] = _ratio(tp, ref and ref.get("img_per_s")) if r["variant"] != "reference" else None
        if r["precision"] != "fp32":
            paired = index.get((r["model"], r["variant"], r["backend"], "fp32", PAIRED, r["batch"])) \
                if r["task"] == "throughput" else None
            fp = paired or index.get((r["model"], r["variant"], r["backend"], "fp32", r["task"], r["batch"]))
            r["vs_fp32"] = _ratio(tp, fp and fp.get("img_per_s"))
            ref32 = index.get((r["model"], "reference", r["backend"], "fp32", r["task"], r["batch"]))
            r["vs_reference_fp32"] = _ratio(tp, ref32 and ref32.get("img_per_s")) \
                if r["variant"] != "reference" else None
        if r["backend"] != "eager":
            eg = index.get((r["model"], r["variant"], "eager", r["precision"], r["task"], r["batch"]))
            r["vs_eager"] = _ratio(tp, eg and eg.get("img_per_s"))
        g = gemm.get(r["precision"], {}).get("gflops")
        info = infos.get(r["model"])
        if tp and g and info and r["task"] in ("throughput", "latency"):
            r["efficiency"] = 2.0 * info["gmacs"] * tp / g  # 2 FLOPs per multiply-accumulate
        else:
            r["efficiency"] = None
    out["baseline"] = baseline
    out["targets"] = evaluate_targets(out)


def evaluate_targets(out: dict) -> list[dict]:
    """The issue's targets as ``{"target", "value", "threshold", "met"}``; ``met`` is None if not measured."""
    rows = out["results"]
    batch = out["config"]["batch"]
    idx = {(r["model"], r["variant"], r["backend"], r["precision"], r["task"], r["batch"]): r.get("img_per_s")
           for r in rows}
    targets = []

    def add(desc: str, value: float | None, threshold: float, pending: str | None = None) -> None:
        targets.append({"target": desc, "value": value, "threshold": threshold,
                        "met": None if value is None else value >= threshold,
                        "note": pending if value is None else None})

    for emo, rival in catalog.TARGET_PAIRS.items():
        d = idx.get((emo, "deploy", "eager", "fp32", "throughput", batch))
        c = idx.get((rival, "timm", "eager", "fp32", "throughput", batch))
        add(f"{emo} deploy / {rival} (fp32 eager, batch {batch})", _ratio(d, c), 1.0,
            "pending: needs emov2.deploy and both models in the run")
    ratios = []
    for r in rows:
        if r["variant"] == "deploy" and r["task"] == "throughput" and r["backend"] == "eager" \
                and r["precision"] == "fp32" and r["batch"] == batch and r.get("vs_reference"):
            ratios.append(r["vs_reference"])
            add(f"{r['model']} deploy / reference (fp32 eager, batch {batch})", r["vs_reference"], 3.0)
    if not ratios:
        add("deploy / reference speed-up", None, 3.0, "not measured in this run (no deploy and reference rows)")
    eff = next((r.get("efficiency") for r in rows if r["model"] == "emov2_5m" and r["variant"] == "deploy"
                and r["backend"] == "eager" and r["precision"] == "fp32" and r["task"] == "throughput"
                and r["batch"] == batch), None)
    add(f"emov2_5m deploy fp32 efficiency (fraction of GEMM peak, batch {batch})", eff, 0.6,
        "not measured in this run (needs emov2_5m deploy)")
    if out["machine"]["bf16"]["native"] or out["config"]["device"] != "cpu":
        bf = [r for r in rows if r["precision"] == "bf16" and r.get("vs_fp32") and catalog.is_emo(r["model"])]
        for r in bf:
            add(f"{r['model']} ({r['variant']}) bf16 / fp32", r["vs_fp32"], 1.5)
    tr = [r for r in rows if r["task"] == "train" and r["variant"] == "eager" and r.get("vs_reference")]
    for r in tr:
        add(f"{r['model']} training step / reference (batch {batch})", r["vs_reference"], 2.0)
    for r in rows:
        if r["task"] == "train" and r["variant"] == "eager" and r["precision"] == "bf16" \
                and r.get("vs_reference_fp32"):
            tr.append(r)
            add(f"{r['model']} training step, channels-last + bf16 AMP (the trainer's CPU default) / "
                f"reference fp32 (batch {batch})", r["vs_reference_fp32"], 2.0)
    if not tr:
        add("training step / reference", None, 2.0, "not measured in this run (no training rows)")
    return targets


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark described by ``cfg`` and return the JSON-able result dict."""
    for name in cfg.models:
        catalog.check_model_name(name)
    try:
        device = torch.device(cfg.device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {cfg.device!r}: expected 'cpu' or 'cuda[:N]'") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {cfg.device!r}: the benchmark runs on 'cpu' or 'cuda[:N]'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r}: no CUDA device here (torch.cuda.is_available() is False; "
                         f"torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {cfg.device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return _Runner(cfg, log or (lambda s: None)).run()

