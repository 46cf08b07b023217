"""``emov2 video demo``: a motion task one frame cannot answer, learnt by V-EMO and not by 2D EMOv2.

Clips are built offline from real pixels that installed packages ship: a scikit-learn handwritten digit
(8x8 scans upscaled to 12x12) moves across a static background cropped from scikit-image's photographs,
16 frames of 32x32 px, at 1-2 px per frame. The label is the direction of motion (left, right, up, down). The frame is a
torus (the digit wraps around the edges) and the start position is uniform, so in every frame the
digit's position is uniform whatever the direction: a single frame carries no information about the
label, and a 2D model trained on single frames must stay at chance (25%). V-EMO sees 8 frames sampled
uniformly from the 16 (TSN segments, random offsets) and can learn the direction.

Both models are trained by the same :class:`~emov2.train.engine.Trainer`: V-EMO (``v_emov2_1m`` widths
with fewer blocks) through :class:`~emov2.video.task.VideoTask` on clips, EMOv2 (the same widths and
blocks in 2D) through the classification task on one random frame per clip (the middle frame at test).
The report folder holds both runs (curves, checkpoints), a comparison plot, frame strips of test clips
with V-EMO's predictions, and the test clips as mp4 files in class folders (``videos/``), which
``emov2 video eval --checkpoint <out>/vemo --data <out>/videos`` scores through the PyAV reading path.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata
from torch.utils.data import Dataset

from ..train.config import load_config
from ..train.demo import load_digits_split
from ..train.engine import Trainer
from ..train.report import read_log
from .data import ClipSampling, VideoDataset, sample_indices, train_clip_transform, write_video
from .predict import frame_strip
from .task import VideoTask, evaluate_video

__all__ = ['DIRECTIONS', 'make_motion_clips', 'ClipArrays', 'FrameDataset', 'run_video_demo']

DIRECTIONS = ('left', 'right', 'up', 'down')
_STEP = {'left': (0, -1), 'right': (0, 1), 'up': (-1, 0), 'down': (1, 0)}
SIZE, SOURCE_FRAMES, NUM_FRAMES, DIGIT = 32, 16, 8, 12
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
#: both demo models: EMOv2-1M's widths, heads and block design, fewer blocks (V-EMO in 3D, EMOv2 in 2D)
DEMO_DEPTHS = [1, 1, 2, 1]
AUGMENTATION = ('random resized crop scale (0.6, 1), ratio (0.9, 1.1), the same for every frame; no flips '
                '(a horizontal flip would swap left and right)')


def _backgrounds() -> List[np.ndarray]:
    """Grey scikit-image photographs (float 0..1) to crop backgrounds from."""
    out = []
    for name in ('camera', 'astronaut', 'coffee', 'chelsea', 'rocket', 'brick', 'grass', 'gravel'):
        img = np.asarray(getattr(skdata, name)(), dtype=np.float32)
        if img.ndim == 3:
            img = img[..., :3].mean(-1)
        out.append(img / max(float(img.max()), 1.0))
    return out


def make_motion_clips(digits: np.ndarray, n: int, seed: int, size: int = SIZE, frames: int = SOURCE_FRAMES,
                      background: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """``(clips (n, frames, size, size) uint8 grey, labels (n,))``: a random digit of ``digits`` (8x8, 0..16)
    moving in a random direction at 1-2 px/frame from a uniform start on a torus, over a static
    photo crop dimmed to 0..45% (or black). Labels index :data:`DIRECTIONS`."""
    rng = np.random.default_rng(seed)
    bgs = _backgrounds() if background else []
    labels = rng.integers(0, len(DIRECTIONS), n)
    clips = np.zeros((n, frames, size, size), dtype=np.uint8)
    for i in range(n):
        d = digits[rng.integers(len(digits))]
        glyph = np.asarray(Image.fromarray((d / 16.0 * 255).astype(np.uint8)).resize((DIGIT, DIGIT), Image.BILINEAR),
                           dtype=np.float32) / 255.0
        alpha = np.zeros((size, size), np.float32)
        alpha[:DIGIT, :DIGIT] = glyph
        if bgs:
            src = bgs[rng.integers(len(bgs))]
            crop = int(rng.integers(size, min(src.shape) + 1))
            y, x = rng.integers(0, src.shape[0] - crop + 1), rng.integers(0, src.shape[1] - crop + 1)
            bg = np.asarray(Image.fromarray((src[y:y + crop, x:x + crop] * 255).astype(np.uint8)).resize(
                (size, size), Image.BILINEAR), np.float32) / 255.0 * 0.45
        else:
            bg = np.zeros((size, size), np.float32)
        dy, dx = _STEP[DIRECTIONS[labels[i]]]
        speed = rng.uniform(1.0, 2.0)
        y0, x0 = rng.uniform(0, size, 2)
        for t in range(frames):
            a = np.roll(alpha, (int(round(y0 + dy * speed * t)) % size, int(round(x0 + dx * speed * t)) % size), (0, 1))
            clips[i, t] = np.clip((bg * (1 - a) + a) * 255 + 0.5, 0, 255).astype(np.uint8)
    return clips, labels


def _rgb(clip: np.ndarray) -> np.ndarray:
    return np.repeat(clip[..., None], 3, axis=-1)


class ClipArrays(VideoDataset):
    """A :class:`VideoDataset` over grey in-memory clips, made RGB when read (saves 2/3 of the memory)."""

    def __init__(self, clips: np.ndarray, labels: np.ndarray, train: bool, sampling: ClipSampling,
                 size: int = SIZE) -> None:
        super().__init__([(c, int(y)) for c, y in zip(clips, labels)], DIRECTIONS, sampling, train, size, MEAN,
                         STD, scale=(0.6, 1.0), ratio=(0.9, 1.1), hflip=0.0)

    def frames(self, index: int, clip: Optional[int] = None):
        grey = self.samples[index][0]
        idx = sample_indices(len(grey), self.sampling, clip)
        return _rgb(grey[idx]), idx


class FrameDataset(Dataset):
    """Single frames of the clips for the 2D baseline: a random frame per clip (training), the middle
    frame (test), with the clips' crop (training) and normalisation."""

    def __init__(self, clips: np.ndarray, labels: np.ndarray, train: bool) -> None:
        self.clips, self.targets, self.train = clips, [int(y) for y in labels], train
        self.classes = list(DIRECTIONS)
        self.transform = train_clip_transform(SIZE, MEAN, STD, (0.6, 1.0), (0.9, 1.1), 0.0)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        c = self.clips[index]
        t = int(torch.randint(0, len(c), (1,))) if self.train else len(c) // 2
        frame = torch.from_numpy(_rgb(c[t:t + 1])).permute(0, 3, 1, 2)  # 1, 3, H, W
        if self.train:
            x = self.transform(frame)[0]
        else:
            x = (frame[0].float() / 255.0 - 0.5) / 0.5
        return x.as_subclass(torch.Tensor), self.targets[index]


def _config(out: str, model: str, epochs: int, batch_size: int, seed: int, progress: bool, overwrite: bool,
            overrides: Sequence[str], video: bool) -> Dict[str, Any]:
    common = [f'model.name={model}', 'model.num_classes=4', 'model.drop_path_rate=0.0', 'model.window_size=5',
              f'model.kwargs={json.dumps({"depths": DEMO_DEPTHS})}', f'data.img_size={SIZE}',
              f'data.mean={list(MEAN)}', f'data.std={list(STD)}', 'data.workers=0', 'aug.auto_augment=null',
              'aug.color_jitter=0.0', 'aug.hflip=0.0', 'aug.scale=[0.6, 1.0]', 'aug.ratio=[0.9, 1.1]',
              f'aug.custom={json.dumps(AUGMENTATION)}', 'eval.crop_pct=1.0', 'eval.precise_bn_images=128',
              f'optim.batch_size={batch_size}', 'optim.lr=0.002', 'optim.weight_decay=0.05', 'optim.clip_grad=20.0',
              f'sched.epochs={epochs}', f'sched.warmup_epochs={min(1, epochs - 1)}', 'sched.warmup_lr=1.0e-5',
              'sched.min_lr=1.0e-5', 'ema.decay=0.9', 'train.amp=false', 'train.channels_last=false',
              f'train.out={out}', f'train.seed={seed}', f'train.progress={str(progress).lower()}',
              f'train.overwrite={str(overwrite).lower()}']
    if video:
        common += [f'video.num_frames={NUM_FRAMES}', 'video.clips=2', 'video.crops=1', 'eval.batch_size=32']
        return load_config(None, [*common, *overrides], defaults=VideoTask.defaults)
    return load_config(None, [*common, 'eval.batch_size=128', *overrides])


def _compare_plot(logs: Dict[str, List[Dict[str, Any]]], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, recs in logs.items():
        ep = [r['epoch'] + 1 for r in recs]
        ax[0].plot(ep, [r['train_loss'] for r in recs], marker='o', label=name)
        ax[1].plot(ep, [r.get('val_top1') for r in recs], marker='o', label=name)
    ax[1].axhline(25.0, color='grey', ls='--', lw=1, label='chance (25%)')
    ax[0].set(xlabel='epoch', ylabel='training loss', title='training loss')
    ax[1].set(xlabel='epoch', ylabel='top-1 (%)', title='held-out clips: direction of motion', ylim=(0, 100))
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def _predict(model: torch.nn.Module, ds: VideoDataset) -> np.ndarray:
    model.eval()
    return np.concatenate([model(ds.views(i)).float().mean(0, keepdim=True).softmax(-1).numpy()
                           for i in range(len(ds))])


def run_video_demo(out: str = 'runs/video_demo', epochs: int = 6, train_clips: int = 800, test_clips: int = 200,
                   batch_size: int = 32, seed: int = 0, background: bool = True, progress: bool = True,
                   overwrite: bool = False, overrides: Sequence[str] = (), baseline: bool = True,
                   vemo: bool = True) -> Dict[str, Any]:
    """Build the clips, train V-EMO and the 2D baseline (either can be left out), write the report folder;
    returns the metrics."""
    t0 = time.time()
    cpu0 = time.process_time()
    out_dir = Path(out)
    tx, _, vx, _ = load_digits_split(seed=seed)
    train_c, train_y = make_motion_clips(tx, train_clips, seed, background=background)
    test_c, test_y = make_motion_clips(vx, test_clips, seed + 1, background=background)
    build_s = time.time() - t0

    cfg = _config(str(out_dir / 'vemo'), 'v_emov2_1m', epochs, batch_size, seed, progress, overwrite, overrides,
                  video=True)
    s = ClipSampling.from_config(cfg['video'])
    train_ds, test_ds = ClipArrays(train_c, train_y, True, s), ClipArrays(test_c, test_y, False, s)
    logs: Dict[str, List[Dict[str, Any]]] = {}
    vemo_m: Optional[Dict[str, Any]] = None
    if vemo:
        t1, c1 = time.time(), time.process_time()
        trainer = Trainer(cfg, train_ds, test_ds, task=VideoTask(cfg, DIRECTIONS))
        result = trainer.fit()
        vemo_s, vemo_cpu = time.time() - t1, time.process_time() - c1
        prob = _predict(trainer.model, test_ds)
        pred = prob.argmax(1)
        ema_top1 = None
        if trainer.ema is not None:
            loader = torch.utils.data.DataLoader(test_ds, batch_size=32, collate_fn=trainer.task.collate)
            ema_top1 = evaluate_video(trainer.ema.module, loader, torch.device('cpu'))['top1']
        logs['V-EMO (8 frames)'] = read_log(out_dir / 'vemo' / 'log.jsonl')
        vemo_m = {'model': 'v_emov2_1m', 'depths': DEMO_DEPTHS, 'params': sum(p.numel() for p in trainer.model.parameters()),
                  'test_top1': float((pred == test_y).mean() * 100), 'test_top1_ema': ema_top1,
                  'views': '2 clips x 1 crop', 'train_seconds': round(vemo_s, 1), 'train_cpu_seconds': round(vemo_cpu, 1),
                  'stopped_early': result.stopped_early}
    else:
        prob = np.full((len(test_y), len(DIRECTIONS)), 1.0 / len(DIRECTIONS))
        pred = np.zeros(len(test_y), dtype=int)

    frame_top1, frame_s, frame_cpu = None, None, None
    if baseline:
        cfg2 = _config(str(out_dir / 'frame2d'), 'emov2_1m', epochs, batch_size, seed, progress, overwrite,
                       overrides, video=False)
        t2, c2 = time.time(), time.process_time()
        tr2 = Trainer(cfg2, FrameDataset(train_c, train_y, True), FrameDataset(test_c, test_y, False),
                      class_names=DIRECTIONS)
        tr2.fit()
        frame_s, frame_cpu = time.time() - t2, time.process_time() - c2
        fds = FrameDataset(test_c, test_y, False)
        with torch.no_grad():
            tr2.model.eval()
            x = torch.stack([fds[i][0] for i in range(len(fds))])
            p2 = torch.cat([tr2.model(x[i:i + 128]) for i in range(0, len(x), 128)]).argmax(1).numpy()
        frame_top1 = float((p2 == test_y).mean() * 100)
        logs['EMOv2 2D (one frame)'] = read_log(out_dir / 'frame2d' / 'log.jsonl')
    _compare_plot(logs, out_dir / 'comparison.png')

    # pictures and real video files of held-out clips
    samples = out_dir / 'samples'
    for i in range(12 if vemo else 0):
        frames, idx = test_ds.frames(i, 0)
        ok = 'ok' if pred[i] == test_y[i] else 'WRONG'
        frame_strip(frames, f'true {DIRECTIONS[test_y[i]]}, V-EMO {DIRECTIONS[pred[i]]} {prob[i, pred[i]] * 100:.0f}% '
                    f'({ok}); frames {idx}', str(samples / f'clip_{i:02d}_{DIRECTIONS[test_y[i]]}.png'), height=72)
    videos = out_dir / 'videos'
    for i in range(len(test_c)):
        d = videos / DIRECTIONS[test_y[i]]
        d.mkdir(parents=True, exist_ok=True)
        write_video(str(d / f'clip_{i:04d}.mp4'), _rgb(test_c[i]))

    metrics = {
        'task': f'direction of motion of a digit on a photo ({SIZE}x{SIZE}, {SOURCE_FRAMES} frames, '
                f'{NUM_FRAMES} sampled), 4 classes, chance 25%',
        'train_clips': train_clips, 'test_clips': test_clips, 'epochs': epochs, 'batch_size': batch_size,
        'vemo': vemo_m,
        'frame2d': None if frame_top1 is None else {
            'model': 'emov2_1m', 'depths': DEMO_DEPTHS, 'test_top1': frame_top1, 'input': 'middle frame',
            'train_seconds': round(frame_s, 1), 'train_cpu_seconds': round(frame_cpu, 1)},
        'build_seconds': round(build_s, 1), 'wall_seconds': round(time.time() - t0, 1),
        'cpu_seconds': round(time.process_time() - cpu0, 1), 'threads': torch.get_num_threads(),
        'videos': str(videos), 'weights': str(out_dir / 'vemo' / 'last' / 'model.safetensors'),
    }
    (out_dir / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    return metrics
