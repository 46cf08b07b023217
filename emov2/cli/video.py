"""``emov2 video train | eval | predict | demo``: V-EMO video classification over :mod:`emov2.video`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
import yaml

from ..checkpoint import CheckpointError
from ..factory import list_models
from ..train import RunExistsError, load_config
from ..train.config import ConfigError
from ..video.demo import run_video_demo
from ..video.predict import evaluate_video_checkpoint, predict_videos
from ..video.task import VideoTask
from .app import app
from .common import (accuracy_table, console, fail, fit_or_fail, overrides_from_options, report_items, report_run,
                     setup_logging)

video_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help='V-EMO video classification: train, eval, predict, demo.')
app.add_typer(video_app, name='video')


@video_app.command()
def train(
        overrides: Optional[List[str]] = typer.Argument(None, help='Config overrides: section.key=value (YAML values), '
                                                        'e.g. video.num_frames=8 video.clips=4.'),
        config: Optional[Path] = typer.Option(None, '--config', '-c', help='Recipe YAML.'),
        data: Optional[str] = typer.Option(None, '--data', help='Video root (Kinetics layout: train/<class>/<video>, '
                                           'val/<class>/<video>; videos or frame folders).'),
        train_list: Optional[str] = typer.Option(None, '--train-list', help='"path,label" list of training videos.'),
        val_list: Optional[str] = typer.Option(None, '--val-list', help='"path,label" list of validation videos.'),
        out: Optional[str] = typer.Option(None, '--out', help='Output folder (default: train.out).'),
        resume: Optional[str] = typer.Option(None, '--resume', help="Checkpoint folder to resume; 'auto': the "
                                             'output folder.'),
        pretrained: Optional[str] = typer.Option(None, '--pretrained', help='2D EMOv2 (official .pth or ours, '
                                                 'inflated) or V-EMO checkpoint to fine-tune from.'),
        model: Optional[str] = typer.Option(None, '--model', help='v_emov2_1m, v_emov2_2m or v_emov2_5m.'),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace a run already in the output folder.'),
        print_config: bool = typer.Option(False, '--print-config', help='Print the resolved config and exit.'),
) -> None:
    """Train V-EMO on videos (paper recipe: AdamW, lr 1e-4 at batch 256, 200 epochs, 160 px, 4 frames)."""
    setup_logging()
    extra = overrides_from_options(overrides, (('data.root', data), ('data.train_list', train_list),
                                               ('data.val_list', val_list), ('train.out', out),
                                               ('model.pretrained', pretrained), ('model.name', model)), overwrite)
    try:
        cfg = load_config(config, extra, defaults=VideoTask.defaults)
        task = VideoTask(cfg)
    except ConfigError as e:
        fail(str(e))
    if print_config:
        console.print(yaml.safe_dump(cfg, sort_keys=False))
        return
    video_models = list_models('vemo')
    if cfg['model']['name'] not in video_models:
        fail(f'model {cfg["model"]["name"]!r} does not take clips; use one of {", ".join(video_models)}')
    if cfg['model']['pretrained'] and not Path(cfg['model']['pretrained']).is_file():
        fail(f'pretrained checkpoint not found: {cfg["model"]["pretrained"]}')
    report_run(fit_or_fail(cfg, task, resume=resume), 'video top-1')


@video_app.command(name='eval')
def eval_cmd(
        checkpoint: str = typer.Option(..., '--checkpoint', help='V-EMO run folder, checkpoint set or .safetensors.'),
        data: str = typer.Option(..., '--data', help='Folder of class folders of videos (or with a val/ split).'),
        list_file: Optional[str] = typer.Option(None, '--list', help='"path,label" list relative to --data.'),
        clips: Optional[int] = typer.Option(None, '--clips', min=1, help='Temporal views (default: the checkpoint\'s).'),
        crops: Optional[int] = typer.Option(None, '--crops', min=1, max=3, help='Spatial views, 1 or 3.'),
        batch_size: int = typer.Option(8, '--batch-size', min=1, help='Videos per batch.'),
        workers: int = typer.Option(2, '--workers', min=0),
        device: str = typer.Option('cpu', '--device', help='cpu, cuda or cuda:N.'),
        as_json: bool = typer.Option(False, '--json', help='Print JSON.'),
) -> None:
    """Video-level top-1 / top-5 of a checkpoint and its EMA (logits averaged over clips x crops)."""
    try:
        r = evaluate_video_checkpoint(checkpoint, data, list_file, batch_size, workers, device, clips, crops)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    console.print(accuracy_table(f'{r.get("variant", "")} on {data} ({r.get("views", "")})', r, 'videos'))


@video_app.command()
def predict(
        videos: List[str] = typer.Argument(..., help='Video files or frame folders.'),
        checkpoint: str = typer.Option(..., '--checkpoint', help='V-EMO run folder, checkpoint set or .safetensors.'),
        topk: int = typer.Option(5, '--topk', min=1, help='Classes shown per video.'),
        strips: Optional[str] = typer.Option(None, '--strips', help='Folder for a frame-strip PNG per video.'),
        ema: bool = typer.Option(False, '--ema', help='Use the EMA weights.'),
        device: str = typer.Option('cpu', '--device', help='cpu, cuda or cuda:N.'),
        as_json: bool = typer.Option(False, '--json', help='Print JSON.'),
) -> None:
    """Top-k classes per video. Exits with 1 when any video could not be read (the others are predicted)."""
    try:
        res = predict_videos(videos, checkpoint, topk, ema, device, strips)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    report_items(res, as_json, 'video', lambda r: '\n'.join(
        [f'[bold]{r["video"]}[/bold]' + (f'  (strip: {r["strip"]})' if 'strip' in r else '')]
        + [f'  {p * 100:6.2f}%  {name}' for name, p in r['top']]))


@video_app.command()
def demo(
        out: str = typer.Option('runs/video_demo', '--out', help='Report folder.'),
        epochs: int = typer.Option(6, '--epochs', min=1),
        train_clips: int = typer.Option(800, '--train-clips', min=32),
        test_clips: int = typer.Option(200, '--test-clips', min=8),
        seed: int = typer.Option(0, '--seed', min=0),
        baseline: bool = typer.Option(True, '--baseline/--no-baseline', help='Also train the 2D single-frame model.'),
        background: bool = typer.Option(True, '--photo/--plain', help='Photo or black background.'),
        progress: bool = typer.Option(True, '--progress/--no-progress'),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace an earlier demo run in --out.'),
) -> None:
    """Direction of motion of a digit (one frame cannot tell): V-EMO learns it, 2D EMOv2 stays at chance."""
    setup_logging()
    try:
        m = run_video_demo(out, epochs, train_clips, test_clips, seed=seed, background=background, progress=progress,
                           overwrite=overwrite, baseline=baseline)
    except (RunExistsError, ValueError) as e:
        fail(str(e))
    v, f = m['vemo'], m['frame2d']
    console.print(f'V-EMO held-out top-1: [bold]{v["test_top1"]:.1f}%[/bold] on {m["test_clips"]} clips '
                  f'({v["params"] / 1e6:.2f}M params, {v["train_seconds"]:.0f} s)')
    if f is not None:
        console.print(f'EMOv2 2D on the middle frame: [bold]{f["test_top1"]:.1f}%[/bold] (chance 25%)')
    console.print(f'report in {out}/ (comparison.png, samples/, videos/)')
