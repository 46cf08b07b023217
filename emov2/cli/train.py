"""``emov2 train | eval | predict | demo``: thin wrappers over :mod:`emov2.train`."""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import List, Optional

import timm
import torch
import typer
import yaml

from ..checkpoint import CheckpointError
from ..factory import list_models
from ..train import RunExistsError, load_config
from ..train.config import ConfigError
from ..train.demo import run_demo
from ..train.inference import evaluate_checkpoint
from ..train.inference import predict as run_predict
from .app import app
from .common import (accuracy_table, console, fail, fit_or_fail, overrides_from_options, report_items, report_run,
                     setup_logging)


def _unknown_model(name: str) -> str:
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
    return (f'unknown model {name!r}' + (f'; did you mean {" or ".join(close)}?' if close else '')
            + f' Models: {", ".join(list_models())} (or any timm model name)')


def _cuda() -> bool:
    return torch.cuda.is_available()


@app.command(context_settings={'allow_extra_args': False})
def train(
        overrides: Optional[List[str]] = typer.Argument(None, help='Config overrides: section.key=value (YAML values).'),
        config: Optional[Path] = typer.Option(None, '--config', '-c', help='Recipe YAML (configs/*.yaml).'),
        data: Optional[str] = typer.Option(None, '--data', help='Dataset root (ImageNet layout: train/, val/).'),
        out: Optional[str] = typer.Option(None, '--out', help='Output folder (default: train.out).'),
        resume: Optional[str] = typer.Option(None, '--resume', help="Checkpoint folder or *_state.pt to resume; "
                                             "'auto' resumes from the output folder if it has one."),
        pretrained: Optional[str] = typer.Option(None, '--pretrained', help='Fine-tune from this checkpoint.'),
        num_classes: Optional[int] = typer.Option(None, '--num-classes', help='Classes of the new head.'),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace a run already in the output folder.'),
        print_config: bool = typer.Option(False, '--print-config', help='Print the resolved config and exit.'),
) -> None:
    """Train a model with a paper recipe (torchrun for many processes/GPUs)."""
    setup_logging()
    extra = overrides_from_options(overrides, (('data.root', data), ('train.out', out), ('model.pretrained', pretrained),
                                               ('model.num_classes', num_classes)), overwrite)
    try:
        cfg = load_config(config, extra)
    except ConfigError as e:
        fail(str(e))
    if print_config:
        console.print(yaml.safe_dump(cfg, sort_keys=False))
        return
    if cfg['model']['name'] not in list_models() and cfg['model']['name'] not in timm.list_models():
        fail(_unknown_model(cfg['model']['name']))
    report_run(fit_or_fail(cfg, resume=resume), 'top-1')


@app.command(name='eval')
def eval_cmd(
        checkpoint: str = typer.Option(..., '--checkpoint', help='Project .safetensors or official .pth file.'),
        data: str = typer.Option(..., '--data', help='Folder of class folders (or with a val/ split).'),
        model: Optional[str] = typer.Option(None, '--model', help='Model name (read from project checkpoints).'),
        batch_size: int = typer.Option(128, '--batch-size'),
        workers: int = typer.Option(4, '--workers'),
        img_size: Optional[int] = typer.Option(None, '--img-size'),
        crop_pct: Optional[float] = typer.Option(None, '--crop-pct'),
        list_file: Optional[str] = typer.Option(None, '--list', help='List file "<path> <label>" relative to --data.'),
        device: str = typer.Option('cuda' if _cuda() else 'cpu', '--device'),
        as_json: bool = typer.Option(False, '--json', help='Print JSON.'),
) -> None:
    """Top-1 / top-5 of a checkpoint and its EMA weights (classes matched to folders by name)."""
    try:
        r = evaluate_checkpoint(checkpoint, data, model, batch_size, workers, img_size, crop_pct, list_file, device)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    console.print(accuracy_table(f'{r.get("variant", "")} on {data}', r, 'images'))


@app.command()
def predict(
        images: List[str] = typer.Argument(..., help='Image files.'),
        checkpoint: str = typer.Option(..., '--checkpoint', help='Project .safetensors or official .pth file.'),
        model: Optional[str] = typer.Option(None, '--model', help='Model name (read from project checkpoints).'),
        topk: int = typer.Option(5, '--topk', min=1, help='How many classes to show per image (>= 1).'),
        ema: bool = typer.Option(False, '--ema', help='Use the EMA weights.'),
        device: str = typer.Option('cpu', '--device', help='cpu, cuda or cuda:N.'),
        as_json: bool = typer.Option(False, '--json', help='Print JSON.'),
) -> None:
    """Top-5 classes (ImageNet names, or the fine-tuned model's own) for each image.

    Exits with 1 when any image could not be read (the others are still predicted)."""
    try:
        res = run_predict(images, checkpoint, model, topk, ema, device=device)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    report_items(res, as_json, 'image', lambda r: '\n'.join(
        [f'[bold]{r["image"]}[/bold]'] + [f'  {p * 100:6.2f}%  {name}' for name, p in r['top']]))


@app.command()
def demo(
        out: str = typer.Option('runs/demo', '--out', help='Report folder.'),
        epochs: int = typer.Option(12, '--epochs'),
        subset: Optional[int] = typer.Option(None, '--subset', help='Use only this many images (quick checks).'),
        seed: int = typer.Option(0, '--seed'),
        progress: bool = typer.Option(True, '--progress/--no-progress'),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace an earlier demo run in --out.'),
) -> None:
    """Train EMOv2 on scikit-learn's bundled handwritten digits (CPU, minutes) and write a report."""
    setup_logging()
    try:
        m = run_demo(out, epochs=epochs, subset=subset, seed=seed, progress=progress, overwrite=overwrite)
    except (RunExistsError, ValueError) as e:
        fail(str(e))
    console.print(f'held-out top-1: [bold]{m["test_top1"]:.2f}%[/bold] on {m["test_images"]} test images '
                   f'({m["model"]}, {m["params"] / 1e6:.2f}M params, {m["wall_seconds"]:.0f} s); report in {out}/')
