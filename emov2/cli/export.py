"""`emov2 export`: ONNX / TorchScript / CoreML with a dynamic batch axis, checked against PyTorch."""
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..checkpoint import CheckpointError, read_metadata
from ..factory import UnknownModelError, check_model_name
from ..tools.export import (FORMATS, ExportError, build_for_export, check_onnx_parity, check_torchscript_parity,
                            check_writable, default_output, export as do_export, optimize_onnx,
                            staged_outputs)
from ..tools.quantize import CALIBRATION_SETS, calibration_images, quantize_onnx, top1_agreement
from .app import app


def _fail(message: str, code: int = 2) -> "typer.Exit":
    """Print ``error: message`` in red on stderr and return the ``typer.Exit`` to raise."""
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def _floats(given: Optional[str], recorded: Optional[list], default: tuple) -> list[float]:
    """--mean / --std as numbers: the comma-separated values given, else the checkpoint's, else ``default``."""
    return [float(v) for v in (given.split(",") if given else recorded or default)]


@app.command()
def export(
        model: str = typer.Option(..., "--model", help="Model name, e.g. emov2_5m."),
        checkpoint: Optional[Path] = typer.Option(
            None, help="Checkpoint to load (official or this project's). Required unless --random-weights."),
        random_weights: bool = typer.Option(
            False, "--random-weights",
            help="Export randomly initialised weights instead of a checkpoint: only for speed or format checks, "
                 "the model predicts nothing useful."),
        format: str = typer.Option("onnx", "--format", help="onnx, torchscript or coreml."),
        output: Optional[Path] = typer.Option(None, help="Output file (default: <model>.<ext>)."),
        img_size: Optional[int] = typer.Option(
            None, help="Input height and width (fixed; the batch axis is dynamic). Default: the size the checkpoint "
                       "was trained at (this project's checkpoints record it), else 224."),
        num_classes: Optional[int] = typer.Option(
            None, help="Classifier size. Default: the checkpoint's (its metadata or head), else 1000."),
        deploy: bool = typer.Option(True, help="Export the inference-optimised emov2.deploy() module when it exists."),
        check: bool = typer.Option(True, help="Compare the exported file with PyTorch at batch 3."),
        optimize: bool = typer.Option(False, "--optimize", help="ONNX: also save ONNX Runtime's optimised graph "
                                                                "as <output>.ort.onnx (for this kind of CPU)."),
        int8: bool = typer.Option(False, "--int8", help="ONNX: also write an int8 QDQ copy <output>.int8.onnx "
                                                        "(static quantization calibrated on --calibration)."),
        calibration: str = typer.Option("photos", help=f"int8 calibration images: {' or '.join(CALIBRATION_SETS)} "
                                                       "(built in, real pixels) or a folder of images."),
        calibration_images_n: int = typer.Option(64, "--calibration-images", help="How many calibration images."),
        mean: Optional[str] = typer.Option(None, help="Input mean the model was trained with (int8 calibration). "
                                                      "Default: the checkpoint's, else ImageNet's."),
        std: Optional[str] = typer.Option(None, help="Input std the model was trained with (int8 calibration). "
                                                    "Default: the checkpoint's, else ImageNet's."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files (default: refuse)."),
) -> None:
    """Export a model; the batch axis is dynamic; ONNX is checked in ONNX Runtime."""
    if format not in FORMATS:
        raise _fail(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    try:
        check_model_name(model)
    except UnknownModelError as exc:
        raise _fail(str(exc)) from None
    if checkpoint is None and not random_weights:
        raise _fail("no weights: pass --checkpoint FILE, or --random-weights to export an untrained model "
                    "(only for speed or format checks)")
    if checkpoint is not None and random_weights:
        raise _fail("--checkpoint and --random-weights exclude each other")
    if checkpoint is not None and not checkpoint.is_file():
        raise _fail(f"checkpoint not found: {checkpoint}" if not checkpoint.exists()
                    else f"checkpoint {checkpoint} is a folder, not a file")
    if (optimize or int8) and format != "onnx":
        raise _fail("--optimize and --int8 apply to --format onnx only")
    try:  # this project's checkpoints record how they were trained: size, classes, normalisation
        meta = read_metadata(checkpoint) if checkpoint is not None else {}
    except CheckpointError as exc:
        raise _fail(str(exc)) from None
    img_size = int(meta.get("img_size") or 224) if img_size is None else img_size
    if img_size < 32:
        raise _fail(f"--img-size {img_size}: the network downsamples 32x, so images need at least 32 px")
    try:
        norm = (_floats(mean, meta.get("mean"), IMAGENET_DEFAULT_MEAN),
                _floats(std, meta.get("std"), IMAGENET_DEFAULT_STD))
    except ValueError:
        raise _fail(f"--mean / --std must be comma-separated numbers, got {mean!r} / {std!r}") from None
    if any(len(v) != 3 for v in norm) or any(v <= 0 for v in norm[1]):
        raise _fail(f"--mean / --std need 3 values (one per RGB channel; std > 0), got {norm[0]} / {norm[1]}")
    if calibration_images_n < 1:
        raise _fail(f"--calibration-images must be at least 1, got {calibration_images_n}")
    if int8 and calibration not in CALIBRATION_SETS and not Path(calibration).is_dir():
        raise _fail(f"--calibration {calibration!r} is neither {' nor '.join(CALIBRATION_SETS)} nor a folder")
    path = output or default_output(model, format)
    stem = str(path)[:-len(".onnx")] if str(path).endswith(".onnx") else str(path)
    targets = [path] + [Path(stem + ".ort.onnx")] * optimize + [Path(stem + ".int8.onnx")] * int8
    lines = []
    try:
        check_writable(path, format)  # before minutes of tracing
        with staged_outputs(targets, overwrite) as staged:  # all files or none; existing ones refused first
            if int8:  # read before tracing: a bad calibration folder fails here
                cal, held = (calibration_images(calibration, n=calibration_images_n, img_size=img_size,
                                                mean=norm[0], std=norm[1], split=split) for split in ("train", "test"))
            net, note = build_for_export(model, checkpoint=checkpoint, num_classes=num_classes, deploy=deploy)
            if random_weights:
                Console(stderr=True).print(f"[yellow]warning:[/yellow] exporting random weights ({model} is not "
                                           "trained): use this file only for speed or format checks", soft_wrap=True)
            do_export(net, format, staged[0], img_size=img_size)
            lines.append(f"wrote {path} ({model}, {note}{', random weights' if random_weights else ''}, {format}, "
                         f"dynamic batch, {img_size}x{img_size})")
            if check and format == "coreml":
                lines.append("not checked here: Core ML models run on macOS only (conversion succeeded)")
            if check and format in ("onnx", "torchscript"):
                fn = check_onnx_parity if format == "onnx" else check_torchscript_parity
                try:
                    res = fn(net, staged[0], batch=3, img_size=img_size)
                except ExportError as exc:
                    raise ExportError(f"{exc} (nothing written; --no-check skips this check)") from None
                lines.append(f"parity at batch 3: max abs err {res['max_abs_err']:.3g}, "
                             f"max rel err {res['max_rel_err']:.3g}")
            if optimize:
                optimize_onnx(staged[0], staged[1])
                lines.append(f"wrote {targets[1]} (ONNX Runtime's optimised graph)")
            if int8:
                q = quantize_onnx(staged[0], staged[-1], cal)
                agree = top1_agreement(staged[0], q, held)
                lines.append(f"wrote {targets[-1]} (int8 QDQ, calibrated on {len(cal)} {calibration} images); top-1 "
                             f"agreement with float on {agree['n']} held-out images: {agree['agreement']:.1%}")
    except (ExportError, CheckpointError) as exc:
        raise _fail(str(exc)) from None
    for line in lines:
        typer.echo(line)
