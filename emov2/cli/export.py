"""`emov2 export`: ONNX / TorchScript / CoreML with a dynamic batch axis, checked against PyTorch."""
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from .app import app


def _fail(message: str, code: int = 2) -> "typer.Exit":
    """Print ``error: message`` in red on stderr and return the ``typer.Exit`` to raise."""
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


@app.command()
def export(
        model: str = typer.Option(..., "--model", help="Model name, e.g. emov2_5m."),
        checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint to load (official or this project's)."),
        format: str = typer.Option("onnx", "--format", help="onnx, torchscript or coreml."),
        output: Optional[Path] = typer.Option(None, help="Output file (default: <model>.<ext>)."),
        img_size: int = typer.Option(224, help="Input height and width (fixed; the batch axis is dynamic)."),
        num_classes: int = typer.Option(1000, help="Classifier size (must match the checkpoint)."),
        deploy: bool = typer.Option(True, help="Export the inference-optimised emov2.deploy() module when it exists."),
        check: bool = typer.Option(True, help="Compare the exported file with PyTorch at batch 3."),
) -> None:
    """Export a model; the batch axis is dynamic; ONNX is checked in ONNX Runtime."""
    from ..factory import UnknownModelError, check_model_name
    from ..export import (FORMATS, ExportError, build_for_export, check_onnx_parity, check_torchscript_parity,
                          default_output, export as do_export)

    if format not in FORMATS:
        raise typer.BadParameter(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}", param_hint="--format")
    try:
        check_model_name(model)
    except UnknownModelError as exc:
        raise _fail(str(exc)) from None
    net, note = build_for_export(model, checkpoint=checkpoint, num_classes=num_classes, deploy=deploy)
    path = output or default_output(model, format)
    try:
        do_export(net, format, path, img_size=img_size)
    except ExportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"wrote {path} ({model}, {note}, {format}, dynamic batch, {img_size}x{img_size})")
    if check and format == "coreml":
        typer.echo("not checked here: Core ML models run on macOS only (conversion succeeded)")
    if check and format in ("onnx", "torchscript"):
        fn = check_onnx_parity if format == "onnx" else check_torchscript_parity
        res = fn(net, path, batch=3, img_size=img_size)
        typer.echo(f"parity at batch 3: max abs err {res['max_abs_err']:.3g}, max rel err {res['max_rel_err']:.3g}")
