"""``emov2 detect train | eval | predict | demo``: detection and instance segmentation (COCO format)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
import yaml
from rich.table import Table

from ..checkpoint import CheckpointError
from ..detection.demo import DEMO_EPOCHS, DEMO_LR, PRETRAIN_EPOCHS, run_detection_demo
from ..detection.models import detector_names
from ..detection.predict import evaluate_detector, predict_detections
from ..detection.task import COCO_METRICS, DetectionTask
from ..factory import UnknownModelError, check_model_name
from ..train import RunExistsError, load_config
from ..train.config import ConfigError
from .app import app
from .common import console, fail, fit_or_fail, overrides_from_options, report_items, report_run, setup_logging

detect_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help='Object detection / instance segmentation with EMO backbones (SSDLite, RetinaNet, '
                              'Mask R-CNN on COCO-format data).')
app.add_typer(detect_app, name='detect')


@detect_app.command('train', context_settings={'allow_extra_args': False})
def train(
        overrides: Optional[List[str]] = typer.Argument(None, help='Config overrides: section.key=value (YAML values).'),
        config: Optional[Path] = typer.Option(None, '--config', '-c', help='Recipe YAML.'),
        data: Optional[str] = typer.Option(None, '--data', help='COCO root: detection.train_images/_annotations and '
                                           'val_* are relative to it (default train2017/, annotations/...).'),
        out: Optional[str] = typer.Option(None, '--out', help='Output folder (default: train.out).'),
        resume: Optional[str] = typer.Option(None, '--resume', help="Checkpoint folder to resume; 'auto' resumes "
                                             'from the output folder if it has one.'),
        kind: Optional[str] = typer.Option(None, '--kind', help=f'Detector: {", ".join(detector_names())}.'),
        backbone: Optional[str] = typer.Option(None, '--backbone', help='EMO backbone (model.name), e.g. emov2_5m.'),
        backbone_checkpoint: Optional[str] = typer.Option(None, '--backbone-checkpoint',
                                                          help='ImageNet weights of the backbone.'),
        image_size: Optional[int] = typer.Option(None, '--image-size', help='SSDLite input / R-CNN shorter side.'),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace a run already in the output folder.'),
        print_config: bool = typer.Option(False, '--print-config', help='Print the resolved config and exit.'),
) -> None:
    """Train a detector with the paper's recipe (AdamW 2e-4 at batch 16, clip 0.1, 12 epochs, cosine)."""
    setup_logging()
    extra = overrides_from_options(overrides, (('data.root', data), ('train.out', out), ('detection.kind', kind),
                                               ('model.name', backbone),
                                               ('detection.backbone_checkpoint', backbone_checkpoint),
                                               ('detection.image_size', image_size)), overwrite)
    try:
        cfg = load_config(config, extra, defaults=DetectionTask.defaults)
        check_model_name(cfg['model']['name'])
        ckpt = cfg['detection']['backbone_checkpoint']
        if ckpt and not Path(ckpt).is_file():
            raise FileNotFoundError(f'backbone checkpoint not found: {ckpt}')
        task = DetectionTask(cfg)
    except (ConfigError, UnknownModelError, FileNotFoundError) as e:
        fail(str(e))
    if print_config:
        console.print(yaml.safe_dump(cfg, sort_keys=False))
        return
    try:  # read the annotations before the output folder is touched: bad paths fail here
        train_ds, val_ds = task.build_datasets(cfg)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    report_run(fit_or_fail(cfg, task, resume, train_ds, val_ds), 'box AP')


def _summary_table(title: str, rows: dict) -> Table:
    t = Table(title=title)
    t.add_column('weights')
    types = sorted({k.split('_')[0] for m in rows.values() if m for k in m if k.endswith('_AP')})
    for iou in types:
        for k in COCO_METRICS:
            t.add_column(f'{iou} {k}')
    for name, m in rows.items():
        if m is None:
            t.add_row(name, *(['-'] * (len(types) * len(COCO_METRICS))))
        else:
            t.add_row(name, *(f'{m[f"{iou}_{k}"]:.3f}' for iou in types for k in COCO_METRICS))
    return t


@detect_app.command('eval')
def eval_cmd(
        checkpoint: str = typer.Option(..., '--checkpoint', help='Run folder, checkpoint set or model.safetensors.'),
        images: str = typer.Option(..., '--images', help='Folder of the images the annotations name.'),
        annotations: str = typer.Option(..., '--annotations', help='COCO instances JSON.'),
        batch_size: int = typer.Option(8, '--batch-size', min=1),
        workers: int = typer.Option(2, '--workers', min=0),
        device: str = typer.Option('cpu', '--device', help='cpu, cuda or cuda:N.'),
        as_json: bool = typer.Option(False, '--json', help='Print JSON.'),
) -> None:
    """COCO box (and mask) AP/AR of a detection checkpoint and its EMA weights."""
    try:
        r = evaluate_detector(checkpoint, images, annotations, batch_size, workers, device)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    console.print(_summary_table(f'{r.get("kind")} on {r.get("backbone")}: {images}', {'model': r['model'],
                                                                                       'ema': r['ema']}))
    m = r['model']
    console.print(f'{m["n"]} images scored, {m["skipped"]} unreadable; data: {r.get("data")}')


@detect_app.command('predict')
def predict(
        images: List[str] = typer.Argument(..., help='Image files.'),
        checkpoint: str = typer.Option(..., '--checkpoint', help='Run folder, checkpoint set or model.safetensors.'),
        out: str = typer.Option('runs/detect_predict', '--out', help='Folder for predictions.json and drawn PNGs.'),
        score_thresh: float = typer.Option(0.3, '--score-thresh', min=0.0, max=1.0, help='Keep detections above.'),
        ema: bool = typer.Option(False, '--ema', help='Use the EMA weights.'),
        device: str = typer.Option('cpu', '--device', help='cpu, cuda or cuda:N.'),
        as_json: bool = typer.Option(False, '--json', help='Print JSON.'),
) -> None:
    """Detect objects in images: predictions.json (boxes, classes, scores, RLE masks) and drawn PNGs.

    Exits with 1 when any image could not be read (the others are still predicted)."""
    try:
        res = predict_detections(images, checkpoint, out, score_thresh, ema, device)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    def describe(r: dict) -> str:
        found = ', '.join(f'{d["class_name"]} {d["score"]:.2f}' for d in r['detections']) or 'nothing'
        return f'[bold]{r["image"]}[/bold]: {found} -> {r.get("drawn")}'
    report_items(res, as_json, 'image', describe, footer=f'predictions in {Path(out) / "predictions.json"}')


@detect_app.command('demo')
def demo(
        out: str = typer.Option('runs/detect_demo', '--out', help='Report folder.'),
        kind: str = typer.Option('ssdlite', '--kind', help=f'Detector: {", ".join(detector_names())}.'),
        backbone: str = typer.Option('emov2_1m', '--backbone'),
        epochs: int = typer.Option(DEMO_EPOCHS, '--epochs', min=1, help='Epochs of detection fine-tuning.'),
        train_images: int = typer.Option(1200, '--train-images', min=8, help='Number of training scenes.'),
        val_images: int = typer.Option(200, '--val-images', min=1, help='Number of validation scenes.'),
        size: int = typer.Option(64, '--size', min=64, help='Scene side in pixels.'),
        input_size: Optional[int] = typer.Option(None, '--input-size', min=64,
                                                 help='Detector input side (default: the scene side).'),
        seed: int = typer.Option(0, '--seed'),
        progress: bool = typer.Option(True, '--progress/--no-progress'),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace an earlier demo run in --out.'),
        pretrain_epochs: int = typer.Option(PRETRAIN_EPOCHS, '--pretrain-epochs', min=0,
                                            help='Epochs of digit classification that pretrain the backbone.'),
        backbone_checkpoint: Optional[str] = typer.Option(None, '--backbone-checkpoint',
                                                          help='Backbone weights to start from (skips pretraining).'),
        lr: float = typer.Option(DEMO_LR, '--lr', min=0.0, help='Peak learning rate of the detector.'),
) -> None:
    """Detect scikit-learn's handwritten digits pasted on scikit-image photographs (made offline; CPU minutes)."""
    setup_logging()
    if kind not in detector_names():
        fail(f'unknown detector {kind!r}; choose one of {", ".join(detector_names())}')
    try:
        check_model_name(backbone)
        m = run_detection_demo(out, kind=kind, backbone=backbone, epochs=epochs, n_train=train_images,
                               n_val=val_images, size=size, seed=seed, progress=progress, overwrite=overwrite,
                               pretrain_epochs=pretrain_epochs, backbone_checkpoint=backbone_checkpoint, lr=lr,
                               input_size=input_size)
    except (RunExistsError, UnknownModelError, ValueError) as e:
        fail(str(e))
    console.print(f'box AP [bold]{m["bbox_AP"]:.3f}[/bold] (AP50 {m["bbox_AP50"]:.3f}) on {m["val_images"]} '
                  f'validation scenes; trivial detectors: mean box {m["baseline_mean_box_AP"]:.3f}, random '
                  f'{m["baseline_random_AP"]:.3f} ({kind} on {backbone}, {m["wall_seconds"]:.0f} s); report in {out}/')
