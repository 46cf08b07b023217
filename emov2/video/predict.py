"""Using trained V-EMO checkpoints: top-k labels per video (with a frame strip picture) and evaluation.

Checkpoints written by the video task record the class names, the preprocessing (size, mean/std) and
the clip sampling (``video`` metadata); predict and eval sample and crop exactly as evaluation during
training did (all clips x crops of a video, logits averaged), unless told other view counts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointError
from ..train.data import collate_skip
from ..train.inference import load_model, resolve_device
from .data import ClipSampling, VideoDataset, VideoReadError, find_videos, read_video_list
from .task import evaluate_video, video_meta_sampling

__all__ = ['load_video_model', 'predict_videos', 'frame_strip', 'evaluate_video_checkpoint']


def load_video_model(checkpoint: str, use_ema: bool = False) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """A V-EMO checkpoint's model (eval mode) and metadata; a checkpoint of another task is an error."""
    net, meta = load_model(checkpoint, use_ema=use_ema)
    if meta.get('task') not in (None, 'video') or not meta.get('variant', '').startswith('v_'):
        raise CheckpointError(f'{checkpoint} holds a {meta.get("task") or "non-video"} model '
                              f'({meta.get("variant")}), not a V-EMO video classifier')
    return net, meta


def _dataset(samples: Sequence[Tuple[str, int]], meta: Dict[str, Any], s: ClipSampling) -> VideoDataset:
    return VideoDataset(samples, meta['class_names'], s, False, int(meta.get('img_size') or 160),
                        meta.get('mean') or (0.485, 0.456, 0.406), meta.get('std') or (0.229, 0.224, 0.225),
                        crop_pct=float(meta.get('crop_pct') or 1.0))


def frame_strip(frames: np.ndarray, text: str, path: str, height: int = 96) -> None:
    """The frames ``(T, H, W, 3)`` uint8 side by side (each ``height`` px tall) under a line of ``text``."""
    tiles = [Image.fromarray(f).resize((max(1, round(f.shape[1] * height / f.shape[0])), height), Image.NEAREST)
             for f in frames]
    gap, bar = 2, 18
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new('RGB', (max(width, 8 * len(text)), height + bar), 'white')
    x = 0
    for t in tiles:
        canvas.paste(t, (x, bar))
        x += t.width + gap
    ImageDraw.Draw(canvas).text((2, 3), text, fill='black')
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


@torch.no_grad()
def predict_videos(videos: Sequence[str], checkpoint: str, topk: int = 5, use_ema: bool = False,
                   device: str = 'cpu', strips: Optional[str] = None, clips: Optional[int] = None,
                   crops: Optional[int] = None) -> List[Dict[str, Any]]:
    """Top-k ``(class name, probability)`` per video file or frame folder (logits averaged over the
    checkpoint's views); unreadable / too short videos get an ``error``. With ``strips`` a PNG per video
    (the frames of its middle clip, the prediction written above) is saved in that folder."""
    if topk < 1:
        raise ValueError(f'topk must be at least 1, got {topk}')
    dev = resolve_device(device)
    net, meta = load_video_model(checkpoint, use_ema)
    net.to(dev)
    s = video_meta_sampling(meta, clips, crops)
    names = meta['class_names']
    ds = _dataset([(str(v), 0) for v in videos], meta, s)
    out: List[Dict[str, Any]] = []
    for i, video in enumerate(videos):
        p = Path(video)
        if not p.exists():
            out.append({'video': str(video), 'error': 'file not found'})
            continue
        try:
            views = ds.views(i)
        except VideoReadError as e:
            out.append({'video': str(video), 'error': str(e)})
            continue
        prob = net(views.to(dev)).float().mean(0).softmax(-1).cpu()
        top = prob.topk(min(topk, len(prob)))
        res = {'video': str(video), 'top': [(names[j], float(q)) for q, j in zip(top.values, top.indices)]}
        if strips:
            frames, _ = ds.frames(i, s.clips // 2)
            name, q = res['top'][0]
            path = Path(strips) / f'{i:03d}_{p.stem}.png'
            frame_strip(frames, f'{name} {q * 100:.0f}%', str(path))
            res['strip'] = str(path)
        out.append(res)
    return out


def evaluate_video_checkpoint(checkpoint: str, data: str, list_file: Optional[str] = None, batch_size: int = 8,
                              workers: int = 2, device: str = 'cpu', clips: Optional[int] = None,
                              crops: Optional[int] = None) -> Dict[str, Any]:
    """``{'model': metrics, 'ema': metrics or None}``: video-level top-1/top-5 (views averaged) on ``data``
    (a folder of class folders, or with a ``val/`` split, or the root of ``list_file``)."""
    dev = resolve_device(device)
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f'data folder not found: {root}')
    results: Dict[str, Any] = {'checkpoint': str(checkpoint), 'model': None, 'ema': None}
    for key, use_ema in (('model', False), ('ema', True)):
        try:
            net, meta = load_video_model(checkpoint, use_ema)
        except CheckpointError:
            if use_ema:
                continue
            raise
        if list_file:
            samples, _ = read_video_list(list_file, str(root), meta['class_names'])
        else:
            folder = root / 'val' if (root / 'val').is_dir() else root
            samples, _ = find_videos(str(folder), meta['class_names'])
        s = video_meta_sampling(meta, clips, crops)
        loader = DataLoader(_dataset(samples, meta, s), batch_size=batch_size, num_workers=workers,
                            collate_fn=collate_skip)
        results[key] = evaluate_video(net.to(dev), loader, dev)
        results['variant'] = meta['variant']
        results['views'] = f'{s.clips} clips x {s.crops} crops'
    return results
