"""``emov2 segment train | eval | predict | demo``: semantic segmentation over :mod:`emov2.segmentation`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer
import yaml
from rich.table import Table

from ..checkpoint import CheckpointError
from ..segmentation.demo import DEMO_EPOCHS, DEMO_LR, DEMO_PRETRAIN_EPOCHS, run_segmentation_demo
from ..segmentation.metrics import per_class_rows
from ..segmentation.predict import evaluate_checkpoint, predict_images
from ..segmentation.task import SegmentationTask
from ..train import RunExistsError, load_config
from ..train.config import ConfigError
from .app import app
from .common import console, fail, fit_or_fail, overrides_from_options, report_items, report_run, setup_logging

segment_app = typer.Typer(no_args_is_help=True, help='Semantic segmentation: DeepLabv3, FPN, SegFormer, PSPNet '
                                                     'on EMOv2 backbones and U-EMO.')
app.add_typer(segment_app, name='segment')


def _pct(v: float) -> str:
    return 'nan' if v is None or math.isnan(v) else f'{v:.2f}'


@segment_app.command('train')
def train_cmd(
        overrides: Optional[List[str]] = typer.Argument(None, help='Config overrides: section.key=value (YAML values), '
                                                        'e.g. segmentation.kind=fpn segmentation.backbone=emov2_2m.'),
        config: Optional[Path] = typer.Option(None, '--config', '-c', help='Recipe YAML.'),
        data: Optional[str] = typer.Option(None, '--data', help='Dataset root (see segmentation.layout).'),
        layout: Optional[str] = typer.Option(None, '--layout', help='ade20k, folder or hrf.'),
        out: Optional[str] = typer.Option(None, '--out', help='Output folder (default: train.out).'),
        resume: Optional[str] = typer.Option(None, '--resume', help="Checkpoint folder to resume; 'auto' resumes "
                                             'from the output folder if it has one.'),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace a run already in the output folder.'),
        print_config: bool = typer.Option(False, '--print-config', help='Print the resolved config and exit.'),
) -> None:
    """Train a segmenter with the paper's MMSeg recipe (torchrun for many processes/GPUs)."""
    setup_logging()
    extra = overrides_from_options(overrides, (('data.root', data), ('segmentation.layout', layout),
                                               ('train.out', out)), overwrite)
    try:
        cfg = load_config(config, extra, defaults=SegmentationTask.defaults)
        task = SegmentationTask(cfg)
    except ConfigError as e:
        fail(str(e))
    if print_config:
        console.print(yaml.safe_dump(cfg, sort_keys=False))
        return
    if not cfg['data']['root']:
        fail('no data: pass --data DIR (or set data.root)')
    report_run(fit_or_fail(cfg, task=task, resume=resume), 'mIoU')


@segment_app.command('eval')
def eval_cmd(
        checkpoint: str = typer.Option(..., '--checkpoint', help='Run folder, checkpoint set or model.safetensors.'),
        data: str = typer.Option(..., '--data', help='Dataset root (its validation split).'),
        layout: Optional[str] = typer.Option(None, '--layout', help="ade20k, folder or hrf (default: the checkpoint's)."),
        split_dir: Optional[str] = typer.Option(None, '--split-dir', help='Validation folder under --data (folder/hrf).'),
        mode: Optional[str] = typer.Option(None, '--mode', help="whole or slide (default: the checkpoint's)."),
        workers: int = typer.Option(2, '--workers', min=0),
        device: str = typer.Option('cpu', '--device', help='cpu, cuda or cuda:N.'),
        as_json: bool = typer.Option(False, '--json', help='Print JSON.'),
) -> None:
    """mIoU / aAcc / mAcc / mDice and the per-class IoU / Acc table of a checkpoint (and its EMA)."""
    try:
        r = evaluate_checkpoint(checkpoint, data, layout, split_dir, device, workers, mode)
    except (CheckpointError, ValueError, FileNotFoundError, ConfigError) as e:
        fail(str(e))
    for key in ('model', 'ema'):
        if r[key] is not None:
            r[key]['per_class'] = per_class_rows(r[key].pop('table'))
            r[key] = {k: v for k, v in r[key].items() if not k.startswith(('IoU.', 'Acc.'))}
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    for key in ('model', 'ema'):
        m = r[key]
        if m is None:
            continue
        t = Table(title=f'{r.get("variant", "")} ({key} weights) on {data}: {m["n"]} images, {m["skipped"]} skipped')
        for c in ('class', 'IoU', 'Acc', 'Dice'):
            t.add_column(c, justify='left' if c == 'class' else 'right')
        for row in m['per_class']:
            t.add_row(str(row['class']), _pct(row['IoU']), _pct(row['Acc']), _pct(row['Dice']))
        t.add_section()
        t.add_row('[bold]mean[/bold]', f'[bold]{_pct(m["mIoU"])}[/bold]', _pct(m['mAcc']), _pct(m['mDice']))
        console.print(t)
        console.print(f'{key}: mIoU {_pct(m["mIoU"])}  aAcc {_pct(m["aAcc"])}  mAcc {_pct(m["mAcc"])}  '
                      f'mDice {_pct(m["mDice"])}  (percent; nan: class neither in the ground truth nor predicted)')


@segment_app.command('predict')
def predict_cmd(
        images: List[str] = typer.Argument(..., help='Image files.'),
        checkpoint: str = typer.Option(..., '--checkpoint', help='Run folder, checkpoint set or model.safetensors.'),
        out: str = typer.Option('segment_predictions', '--out', help='Folder for label PNGs and overlays.'),
        ema: bool = typer.Option(False, '--ema', help='Use the EMA weights.'),
        mode: Optional[str] = typer.Option(None, '--mode', help="whole or slide (default: the checkpoint's)."),
        device: str = typer.Option('cpu', '--device', help='cpu, cuda or cuda:N.'),
        as_json: bool = typer.Option(False, '--json', help='Print JSON.'),
) -> None:
    """Label PNGs (palette, values = class indices) and colour overlays for images.

    Exits with 1 when any image could not be read (the others are still segmented)."""
    try:
        res = predict_images(images, checkpoint, out, ema, device, mode)
    except (CheckpointError, ValueError, FileNotFoundError, OSError) as e:
        fail(str(e))
    def describe(r: dict) -> str:
        top = ', '.join(f'{k} {v:.1f}%' for k, v in list(r['classes'].items())[:4])
        return f'[bold]{r["image"]}[/bold] -> {r["label"]}, {r["overlay"]}  ({top})'
    report_items(res, as_json, 'image', describe)


@segment_app.command('demo')
def demo_cmd(
        out: str = typer.Option('runs/segment_demo', '--out', help='Report folder.'),
        epochs: int = typer.Option(DEMO_EPOCHS, '--epochs', min=1),
        train_scenes: int = typer.Option(800, '--train-scenes', min=16),
        val_scenes: int = typer.Option(160, '--val-scenes', min=1),
        seed: int = typer.Option(0, '--seed', min=0),
        progress: bool = typer.Option(True, '--progress/--no-progress'),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace an earlier demo run in --out.'),
        pretrain_epochs: int = typer.Option(DEMO_PRETRAIN_EPOCHS, '--pretrain-epochs', min=0,
                                            help='Epochs of digit classification that pretrain the backbone (0: none).'),
        lr: float = typer.Option(DEMO_LR, '--lr', min=0.0, help='Peak learning rate of the segmenter.'),
) -> None:
    """Segment handwritten digits pasted on photographs (CPU, minutes) and write a report."""
    setup_logging()
    try:
        m = run_segmentation_demo(out, epochs, train_scenes, val_scenes, seed, progress, overwrite,
                                  pretrain_epochs=pretrain_epochs, lr=lr)
    except (RunExistsError, ValueError) as e:
        fail(str(e))
    console.print(f'validation mIoU [bold]{m["val_mIoU"]:.2f}%[/bold] (majority class {m["majority_mIoU"]:.2f}%, '
                  f'uniform random {m["uniform_random_mIoU"]:.2f}%), aAcc {m["val_aAcc"]:.2f}% on '
                  f'{m["val_scenes"]} scenes ({m["kind"]} on {m["backbone"]}, {m["params"] / 1e6:.2f}M params, '
                  f'{m["train_seconds"]:.0f} s training); report in {out}/')
