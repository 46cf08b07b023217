"""``emov2 generate train | sample | eval | demo``: DiT / D-EMO class-conditional generation."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import typer
import yaml
from rich.table import Table

from ..checkpoint import CheckpointError
from ..generation import GenerationImageFolder, GenerationTask, load_generator
from ..generation.demo import run_generation_demo, sample_per_class, save_grid, save_images
from ..generation.metrics import PixelMLPClassifier, fid, fid_unavailable, generation_scores
from ..train import RunExistsError, load_config
from ..train.config import ConfigError
from ..train.inference import resolve_device
from .app import app
from .common import console, err, fail, fit_or_fail, overrides_from_options, report_run, setup_logging

generate_app = typer.Typer(no_args_is_help=True, help='Class-conditional image generation with DiT and D-EMO.')
app.add_typer(generate_app, name='generate')


@generate_app.command(context_settings={'allow_extra_args': False})
def train(
        overrides: Optional[List[str]] = typer.Argument(None, help='Config overrides: section.key=value (YAML values), '
                                                        'e.g. diffusion.image_size=32 model.kwargs.depth=6.'),
        config: Optional[Path] = typer.Option(None, '--config', '-c', help='Recipe YAML.'),
        data: Optional[str] = typer.Option(None, '--data', help='Folder of class folders (or with train/ and val/).'),
        model: Optional[str] = typer.Option(None, '--model', help='d_emov2_s_2 ... d_emov2_xl_2, dit_s_2 ... dit_xl_2.'),
        vae: Optional[str] = typer.Option(None, '--vae', help='Local AutoencoderKL folder: train in its latent space.'),
        image_size: Optional[int] = typer.Option(None, '--image-size', help='Square image size (diffusion.image_size).'),
        out: Optional[str] = typer.Option(None, '--out', help='Output folder (default: train.out).'),
        resume: Optional[str] = typer.Option(None, '--resume', help="Checkpoint set to resume, or 'auto'."),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace a run already in the output folder.'),
        print_config: bool = typer.Option(False, '--print-config', help='Print the resolved config and exit.'),
) -> None:
    """Train a DiT / D-EMO on an image folder with DiT's recipe (hybrid loss, AdamW 1e-4, EMA 0.9999)."""
    setup_logging()
    extra = overrides_from_options(overrides, (('data.root', data), ('train.out', out), ('model.name', model),
                                               ('diffusion.vae', vae), ('diffusion.image_size', image_size)),
                                   overwrite)
    try:
        cfg = load_config(config, extra, defaults=GenerationTask.defaults)
        if print_config:
            console.print(yaml.safe_dump(cfg, sort_keys=False))
            return
        task = GenerationTask(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    report_run(fit_or_fail(cfg, task=task, resume=resume))


def _load(checkpoint: str, ema: bool, vae: Optional[str], device: str):
    try:
        dev = resolve_device(device)
        task, model, meta = load_generator(checkpoint, use_ema=ema, vae=vae)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    model.to(dev)
    task.setup(model, dev)
    return task, model, meta


def _class_ids(task: GenerationTask, num_classes: int, classes: Optional[List[str]]) -> List[int]:
    names = task.class_names or [str(i) for i in range(num_classes)]
    if not classes:
        return list(range(num_classes))
    ids = []
    for c in classes:
        if c in names:
            ids.append(names.index(c))
        elif c.isdigit() and int(c) < num_classes:
            ids.append(int(c))
        else:
            fail(f'unknown class {c!r}; the model knows {", ".join(names[:20])}{" ..." if len(names) > 20 else ""}')
    return ids


@generate_app.command()
def sample(
        checkpoint: str = typer.Option(..., '--checkpoint', help='Run folder, checkpoint set or model.safetensors.'),
        out: str = typer.Option('samples', '--out', help='Folder for the PNGs (one grid per class + all.png).'),
        classes: Optional[List[str]] = typer.Option(None, '--class', help='Class name or index (repeatable; '
                                                    'default: every class).'),
        per_class: int = typer.Option(16, '--per-class', min=1, help='Samples per class.'),
        sampler: Optional[str] = typer.Option(None, '--sampler', help='ddpm or ddim (default: the checkpoint\'s).'),
        steps: Optional[int] = typer.Option(None, '--steps', min=1, help='Sampling steps (default: the checkpoint\'s).'),
        cfg_scale: Optional[float] = typer.Option(None, '--cfg-scale', min=0.0, help='Guidance scale (1: none).'),
        seed: int = typer.Option(0, '--seed'),
        ema: bool = typer.Option(True, '--ema/--no-ema', help='EMA weights (default) or the raw weights.'),
        vae: Optional[str] = typer.Option(None, '--vae', help='VAE folder (overrides the one the run recorded).'),
        device: str = typer.Option('cpu', '--device'),
) -> None:
    """Write a grid of samples per class to PNG (deterministic under --seed)."""
    task, model, meta = _load(checkpoint, ema, vae, device)
    d = task.diffusion
    kind, n_steps = sampler or d['sampler'], steps or int(d['sample_steps'])
    scale = float(d['cfg_scale'] if cfg_scale is None else cfg_scale)
    if kind not in ('ddpm', 'ddim'):
        fail(f"--sampler must be ddpm or ddim, got {kind!r}")
    if n_steps > task.num_train_timesteps:
        fail(f'--steps {n_steps} exceeds the {task.num_train_timesteps} training timesteps')
    if scale != 1.0 and not model.y_embedder.has_null:
        fail('this model was trained without label dropout (no null class): use --cfg-scale 1')
    ids = _class_ids(task, model.num_classes, classes)
    names = task.class_names or [str(i) for i in range(model.num_classes)]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    labels = torch.tensor(ids).repeat_interleave(per_class)
    t0 = time.time()
    images = torch.cat([task.sample(model, labels[i:i + 256], steps=n_steps, cfg_scale=scale, scheduler=kind,
                                    generator=gen) for i in range(0, len(labels), 256)]).clamp(-1, 1).cpu()
    for k, c in enumerate(ids):
        save_grid(images[k * per_class:(k + 1) * per_class], max(1, int(per_class ** 0.5)),
                  folder / f'class_{c:04d}_{_safe(names[c])}.png')
    save_grid(images, len(ids), folder / 'all.png')
    console.print(f'{len(images)} samples ({len(ids)} classes x {per_class}, {kind} {n_steps} steps, cfg {scale}, '
                  f'{"EMA" if ema else "raw"} weights, {time.time() - t0:.1f} s) written to {folder}/')


def _safe(name: str) -> str:
    return ''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in str(name))[:40]


def _read_folder(data: str, task: GenerationTask):
    """Every readable image of ``data`` (class folders named like the model's classes) and how many were not."""
    size = int(task.diffusion['image_size'])
    ds = GenerationImageFolder(data, size, task.image_channels, 0.0, class_names=task.class_names)
    items = [ds[i] for i in range(len(ds))]
    good = [it for it in items if it is not None]
    if len(good) < 2:
        raise ValueError(f'{data} holds {len(good)} readable images; need at least 2 per evaluation')
    return torch.stack([g[0] for g in good]), [int(g[1]) for g in good], len(items) - len(good)


@generate_app.command(name='eval')
def eval_cmd(
        checkpoint: str = typer.Option(..., '--checkpoint', help='Run folder, checkpoint set or model.safetensors.'),
        data: str = typer.Option(..., '--data', help='REAL images: folder of class folders named like the classes.'),
        per_class: int = typer.Option(50, '--per-class', min=2, help='Samples generated per class.'),
        sampler: Optional[str] = typer.Option(None, '--sampler', help='ddpm or ddim (default: the checkpoint\'s).'),
        steps: Optional[int] = typer.Option(None, '--steps', min=1),
        cfg_scale: Optional[float] = typer.Option(None, '--cfg-scale', min=0.0),
        seed: int = typer.Option(0, '--seed'),
        ema: bool = typer.Option(True, '--ema/--no-ema'),
        vae: Optional[str] = typer.Option(None, '--vae'),
        inception_weights: Optional[str] = typer.Option(None, '--inception-weights', help='Local torch-fidelity '
                                                        'Inception weights: also compute FID.'),
        device: str = typer.Option('cpu', '--device'),
        as_json: bool = typer.Option(False, '--json'),
) -> None:
    """Classifier accuracy and FD-MLP (Fréchet distance in the features of a classifier trained on the
    real images; not FID) of generated samples; FID too when Inception weights are given."""
    if inception_weights and fid_unavailable(inception_weights):
        fail(fid_unavailable(inception_weights))
    task, model, meta = _load(checkpoint, ema, vae, device)
    try:
        real, real_labels, unreadable = _read_folder(data, task)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    d = task.diffusion
    kind, n_steps = sampler or d['sampler'], steps or int(d['sample_steps'])
    scale = float(d['cfg_scale'] if cfg_scale is None else cfg_scale)
    if kind not in ('ddpm', 'ddim'):
        fail(f"--sampler must be ddpm or ddim, got {kind!r}")
    clf = PixelMLPClassifier(size=min(16, int(d['image_size'])), seed=seed).fit(real, real_labels)
    classes = sorted(set(real_labels))
    images, labels = sample_per_class(task, model, per_class, model.num_classes, n_steps, scale, kind, seed,
                                      batch_size=256)
    keep = torch.isin(labels, torch.tensor(classes))  # score only classes the real folder has
    r = generation_scores(clf, images.cpu()[keep], labels[keep].tolist(), real,
                          [task.class_names[c] for c in classes] if task.class_names else None)
    report = {'checkpoint': checkpoint, 'weights': 'ema' if ema else 'raw', 'sampler': kind, 'steps': n_steps,
              'cfg_scale': scale, 'generated': int(keep.sum()), 'real_images': len(real_labels),
              'real_unreadable': unreadable, 'classifier_accuracy': r['accuracy'], 'fd_mlp': r['fd'],
              'per_class_accuracy': r['per_class_accuracy'], 'fid': None}
    if inception_weights:
        with tempfile.TemporaryDirectory() as gen_dir:
            save_images(images, Path(gen_dir))
            try:
                report['fid'] = fid(gen_dir, data, inception_weights, device)
            except RuntimeError as e:  # torch-fidelity's input errors, already worded for the user
                fail(str(e))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    t = Table(title=f'{meta.get("variant")} samples vs {data}')
    for c in ('weights', 'samples', 'classifier accuracy', 'FD-MLP (not FID)', 'FID'):
        t.add_column(c)
    t.add_row(report['weights'], str(report['generated']), f'{r["accuracy"]:.1f}%', f'{r["fd"]:.3f}',
              f'{report["fid"]:.2f}' if report['fid'] is not None else 'not computed (--inception-weights)')
    console.print(t)
    if unreadable:
        err.print(f'[yellow]{unreadable} unreadable real image(s) skipped[/yellow]')


@generate_app.command()
def demo(
        out: str = typer.Option('runs/generate_demo', '--out', help='Report folder.'),
        epochs: int = typer.Option(34, '--epochs', min=1, help='Epochs of the 1,437 training digits per model.'),
        per_class: int = typer.Option(30, '--per-class', min=2),
        steps: int = typer.Option(50, '--steps', min=1, help='DDPM sampling steps.'),
        cfg_scale: float = typer.Option(4.0, '--cfg-scale', min=0.0),
        seed: int = typer.Option(0, '--seed'),
        progress: bool = typer.Option(True, '--progress/--no-progress'),
        overwrite: bool = typer.Option(False, '--overwrite', help='Replace an earlier demo run in --out.'),
        threads: Optional[int] = typer.Option(None, '--threads', min=1, help='torch threads (1: CPU time = one core).'),
) -> None:
    """D-EMO vs DiT on scikit-learn's digits (pixel space, CPU): sample grids and scores side by side."""
    setup_logging()
    try:
        m = run_generation_demo(out, epochs=epochs, per_class=per_class, steps=steps, cfg_scale=cfg_scale, seed=seed,
                                progress=progress, overwrite=overwrite, threads=threads)
    except (RunExistsError, ValueError) as e:
        fail(str(e))
    t = Table(title=f'digits generation ({m["sampler"]} {m["sample_steps"]} steps, cfg {m["cfg_scale"]})')
    for c in ('images', 'params', 'classifier accuracy', 'FD-digits (not FID)', 'seconds'):
        t.add_column(c)
    for key, row in m['rows'].items():
        t.add_row(key, f'{row["params"] / 1e6:.2f}M' if 'params' in row else '-', f'{row["accuracy"]:.1f}%',
                  f'{row["fd"]:.3f}', str(m['seconds_per_model'].get(key, '-')))
    console.print(t)
    console.print(f'sample grids and metrics.json in {out}/ ({m["wall_seconds"]:.0f} s, {np.round(m["wall_seconds"] / 60, 1)} min)')
