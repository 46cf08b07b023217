"""`emov2 bench`: throughput / latency / training / memory of EMO models next to timm's mobile models."""
import difflib
from pathlib import Path
from typing import Optional

import timm
import typer
from rich.console import Console
from rich.markup import escape

from ..factory import list_models
from ..tools.export import ExportError
from ..tools.bench import BenchConfig, run_benchmark
from ..tools.bench.detection import bench_detection
from ..tools.bench.detection import markdown_table as detection_markdown
from ..tools.bench.engines import COMPILED, ENGINES, PAIRS, engines_markdown, run_engines
from ..tools.bench.models import PRESET_NAMES, check_model_name, resolve_models
from ..tools.bench.report import markdown_table, plot_throughput, print_report, write_json
from .app import app


def _fail(message: str) -> "typer.Exit":
    """Print ``error: message`` in red on stderr and return the ``typer.Exit(2)`` to raise."""
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(2)


def _unknown_model_message(name: str) -> str | None:
    """None for a name the benchmark can build; else an error suggesting the closest name."""
    try:
        check_model_name(name)
        return None
    except ValueError:
        pass
    ours = list_models()
    close = difflib.get_close_matches(name.lower(), ours + list(PRESET_NAMES), n=1, cutoff=0.6) or \
        difflib.get_close_matches(name.lower(), timm.list_models(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"unknown model {name!r}{hint}: not a registered model ({', '.join(ours)}), a preset "
            f"({', '.join(PRESET_NAMES)}) or a timm model")


def _thread_counts(spec: Optional[str]) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``; None -> ``[]``; anything else than positive integers is a usage error."""
    if spec is None:
        return []
    try:
        counts = [int(t) for t in spec.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or any(t < 1 for t in counts):
        raise _fail(f"--threads {spec!r}: give a positive integer or a comma-separated list of them (e.g. 1,2)")
    return counts


def _write_table(console: Console, result: dict, table: str, out: Path, stem: str) -> None:
    """Print ``table`` and write ``<out>/<stem>.json`` (the whole result) and ``<out>/<stem>.md``."""
    console.print(table)
    json_path = write_json(result, out / f"{stem}.json")
    (out / f"{stem}.md").write_text(table + "\n")
    console.print(f"wrote {json_path}, {out / f'{stem}.md'}")


@app.command()
def bench(
        models: str = typer.Option("default", help="Comma-separated model names or presets "
                                                    "(default, emo, emov2, emov1, emo_all, competitors, targets)."),
        batch: int = typer.Option(64, help="Batch size of the throughput and training measurements."),
        large_batch: Optional[int] = typer.Option(None, help="Also measure fp32 throughput at this batch (e.g. 256)."),
        img_size: int = typer.Option(224, help="Input resolution."),
        repeats: int = typer.Option(3, help="Timed interleaved rounds (the median is reported)."),
        warmup: Optional[int] = typer.Option(None, help="Untimed rounds first (default 1; 3 with --engines, where "
                                             "ONNX Runtime takes about three calls to settle at a new batch size)."),
        device: str = typer.Option("cpu", help="cpu or cuda."),
        threads: Optional[str] = typer.Option(None, help="torch threads (default: torch's default); with --engines "
                                              "a comma-separated list measures every engine at each count (e.g. 1,2)."),
        baseline: str = typer.Option("edgenext_small", help="Model the 'x base' ratios divide by."),
        latency: bool = typer.Option(True, help="Batch-1 latency."),
        bf16: bool = typer.Option(True, help="bf16 autocast throughput."),
        bf16_models: str = typer.Option("targets", help="Models measured in bf16 (names/presets, or 'all')."),
        onnx: bool = typer.Option(True, help="ONNX Runtime throughput of the EMO models."),
        compile: bool = typer.Option(False, "--compile", help="torch.compile throughput (slow to compile)."),
        train: bool = typer.Option(True, help="Training-step throughput (forward+backward+SGD)."),
        train_models: str = typer.Option("emov2_5m,edgenext_small", help="Models measured in training (names/presets, or 'all')."),
        memory: bool = typer.Option(True, help="Peak memory (fresh subprocess per measurement)."),
        memory_models: str = typer.Option("emov2_5m,edgenext_small", help="Models for peak memory (or 'all')."),
        quick: bool = typer.Option(False, "--quick", help="Smoke run: the smallest EMOv2, EMOv1 and EdgeNeXt, batch 8, 1 repeat, no memory."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every timed call."),
        out: Path = typer.Option(Path("runs/bench"), help="Folder for bench.json, bench.png and bench.md."),
        engines: bool = typer.Option(False, "--engines", help="Instead: EMOv2-1M/2M/5M vs EdgeNeXt-XXS/XS/S per "
                                     "engine (PyTorch eager/deploy/compile, ONNX Runtime fp32/int8) at batch 1 and "
                                     "--batch; writes engines.json and engines.md."),
        engine_list: str = typer.Option(",".join(e for e in ENGINES if e not in COMPILED), "--engine-list",
                                        help=f"Engines for --engines, of {', '.join(ENGINES)} ("
                                        f"{' and '.join(COMPILED)} compile every model per batch size and thread "
                                        "count: minutes each)."),
        pairs: str = typer.Option(",".join(e for e, _ in PAIRS), "--pairs", help="EMOv2 sizes for --engines, each "
                                  "timed beside its EdgeNeXt (" + ", ".join(f"{e}:{g}" for e, g in PAIRS) + ")."),
        detectors: bool = typer.Option(False, "--detectors", help="Instead: SSDLite-EMOv2-1M/2M/5M vs torchvision's "
                                       "SSDLite-MobileNetV3 at 320 px (batch-1 latency, throughput at --batch); "
                                       "writes detectors.json and detectors.md."),
) -> None:
    """Benchmark EMOv2/EMOv1 (reference, eager, deploy) against timm models, in one process, interleaved."""
    thread_counts = _thread_counts(threads)
    if warmup is None:
        warmup = 3 if engines else 1
    if warmup < 0:
        raise _fail(f"--warmup {warmup}: give 0 or more untimed rounds")
    if repeats < 1:
        raise _fail(f"--repeats {repeats}: give 1 or more timed rounds")
    if batch < 1 or (large_batch is not None and large_batch < 1):
        raise _fail(f"--batch {batch} / --large-batch {large_batch}: batch sizes are 1 or more")
    if img_size < 32:
        raise _fail(f"--img-size {img_size}: the networks downsample 32x, so images need at least 32 px")
    if len(thread_counts) > 1 and not engines:
        raise _fail(f"--threads {threads}: several thread counts need --engines; give one number otherwise")
    if detectors:
        console = Console(width=max(Console().width, 200))
        result = bench_detection(image_size=320, batch=batch, repeats=repeats, warmup=warmup,
                                 threads=thread_counts[0] if thread_counts else None, log=console.print)
        _write_table(console, result, detection_markdown(result), out, "detectors")
        return
    if engines:
        chosen = [e.strip() for e in engine_list.split(",") if e.strip()]
        bad = [e for e in chosen if e not in ENGINES]
        if bad or not chosen:
            raise _fail(f"unknown engine(s) {', '.join(bad) or '(none)'}; choose from {', '.join(ENGINES)}")
        known = dict(PAIRS)
        sizes = [p.strip() for p in pairs.split(",") if p.strip()]
        if not sizes or any(p not in known for p in sizes):
            raise _fail(f"--pairs {pairs!r}: choose from {', '.join(known)}")
        console = Console(width=max(Console().width, 200))
        try:
            result = run_engines(pairs=tuple((p, known[p]) for p in sizes), batches=tuple(dict.fromkeys((1, batch))),
                                 engines=tuple(chosen), repeats=repeats, img_size=img_size, warmup=warmup,
                                 threads=thread_counts or None, log=console.print,
                                 on_group=lambda partial: write_json(partial, out / "engines.json"))
        except ExportError as exc:  # e.g. torch_int8 without torchao, ort_* without onnxruntime
            raise _fail(str(exc)) from None
        _write_table(console, result, engines_markdown(result), out, "engines")
        return
    def subset(spec: str) -> Optional[list]:
        return None if spec == "all" else resolve_models(spec)

    for spec in [models] + [s for s in (bf16_models, train_models, memory_models) if s != "all"]:
        for name in resolve_models(spec):
            message = _unknown_model_message(name)
            if message:
                raise _fail(message)

    common = dict(device=device, threads=thread_counts[0] if thread_counts else None, img_size=img_size,
                  large_batch=large_batch,
                  latency=latency, bf16=bf16, onnx=onnx, compile=compile, train=train,
                  verbose=verbose)
    if quick:
        cfg = BenchConfig.quick(**common)
    else:
        cfg = BenchConfig(models=resolve_models(models), batch=batch, repeats=repeats, warmup=warmup,
                          baseline=baseline, memory=memory, bf16_models=subset(bf16_models),
                          train_models=subset(train_models), memory_models=subset(memory_models), **common)
    console = Console(width=max(Console().width, 200))
    try:
        result = run_benchmark(cfg, log=console.print)
    except ValueError as exc:  # a bad device, model list or option
        raise _fail(str(exc)) from None
    print_report(result, console)
    json_path = write_json(result, out / "bench.json")
    png_path = plot_throughput(result, out / "bench.png")
    (out / "bench.md").write_text(markdown_table(result) + "\n")
    console.print(f"wrote {json_path}, {png_path}, {out / 'bench.md'}")
