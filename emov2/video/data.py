"""Video data: Kinetics-layout folders or ``path,label`` lists of video files (decoded with PyAV) or
frame folders, uniform clip sampling, clip transforms and multi-view (clips x crops) evaluation.

Layouts (``data.root``):

* folders: ``root/train/<class>/<video file or frame folder>`` and ``root/val/<class>/...`` (Kinetics
  as distributed by most download scripts). A frame folder holds one video's frames as jpg/png files,
  in name order;
* lists: ``data.train_list`` / ``data.val_list``, one ``path,label`` per line (a space or tab works too;
  a ``path,label`` header line is skipped), paths relative to ``data.root``, labels integers or class
  names.

Sampling (``video:`` config section): ``uniform`` splits the video into ``num_frames`` equal segments
and takes one frame from each (TSN; a random offset inside each segment at training, the segment's
``(k + 0.5) / clips`` point for evaluation clip ``k``); ``dense`` takes ``num_frames`` frames
``frame_stride`` apart from a random start (evenly spaced starts at evaluation). Randomness comes from
torch's global generator, which the trainer's :class:`~emov2.train.data.SeededDataset` seeds per
(seed, epoch, index): a clip is a function of the seed.

A video that cannot be decoded, or has fewer than ``min_frames`` frames, yields ``None``: the batch
collation drops it and the trainer / evaluation counts it (never fatal).
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import av
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..train.data import class_index_by_name

__all__ = ['VIDEO_EXTENSIONS', 'FRAME_EXTENSIONS', 'ClipSampling', 'VideoDataset', 'VideoReadError',
           'read_video', 'count_frames', 'write_video', 'sample_indices', 'find_videos', 'read_video_list',
           'train_clip_transform', 'eval_views', 'build_video_datasets']

_log = logging.getLogger('emov2.train')
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mkv', '.webm', '.mov', '.m4v', '.mpg', '.mpeg', '.ogv', '.flv', '.gif')
FRAME_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
Source = Union[str, np.ndarray]  # a video file, a frame folder, or frames (T, H, W, 3) uint8 in memory


class VideoReadError(Exception):
    """A video that cannot be decoded or is too short (the dataset turns it into a skipped sample)."""


# --- reading ---------------------------------------------------------------------------------------
def _frame_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)


def read_video(path: str, indices: Optional[Sequence[int]] = None) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 RGB of a video file (PyAV) or frame folder; only ``indices`` if given.

    Raises :class:`VideoReadError` for a missing, corrupt or empty video.
    """
    p = Path(path)
    try:
        if p.is_dir():
            files = _frame_files(p)
            if not files:
                raise VideoReadError(f'{p}: a frame folder without jpg/png frames')
            pick = [files[i] for i in indices] if indices is not None else files
            frames = [np.asarray(Image.open(f).convert('RGB')) for f in pick]
        else:
            with av.open(str(p)) as container:
                if not container.streams.video:
                    raise VideoReadError(f'{p}: no video stream')
                stream = container.streams.video[0]
                stream.thread_type = 'AUTO'
                decoded = list(container.decode(stream))
            if not decoded:
                raise VideoReadError(f'{p}: no decodable frames')
            want = range(len(decoded)) if indices is None else indices
            frames = [decoded[i].to_ndarray(format='rgb24') for i in want]
    except VideoReadError:
        raise
    except Exception as e:  # PyAV / PIL raise many types for bad files
        raise VideoReadError(f'{p}: {type(e).__name__}: {e}') from e
    if not frames or any(f.shape != frames[0].shape for f in frames):
        raise VideoReadError(f'{p}: frames of different sizes' if frames else f'{p}: no frames')
    return np.stack(frames)


def count_frames(path: str) -> int:
    """Number of frames of a frame folder (files) or video file (decoded, not the header's guess)."""
    p = Path(path)
    if p.is_dir():
        return len(_frame_files(p))
    return len(read_video(path))


def write_video(path: str, frames: np.ndarray, fps: int = 8, codec: str = 'libx264') -> None:
    """Write ``(T, H, W, 3)`` uint8 frames as a video file with PyAV (sizes rounded to even for yuv420p)."""
    frames = np.asarray(frames, dtype=np.uint8)
    t, h, w = frames.shape[:3]
    frames = frames[:, :h - h % 2, :w - w % 2]
    with av.open(str(path), mode='w') as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = 'yuv420p'
        if codec == 'libx264':
            stream.options = {'crf': '10'}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --- sampling --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipSampling:
    """Which frames make a clip: ``num_frames`` by ``sampling`` (uniform | dense) with ``frame_stride``,
    ``clips`` temporal x ``crops`` spatial views at evaluation, videos under ``min_frames`` skipped."""
    num_frames: int = 4
    sampling: str = 'uniform'
    frame_stride: int = 4
    clips: int = 4
    crops: int = 3
    min_frames: Optional[int] = None

    def __post_init__(self) -> None:
        if self.sampling not in ('uniform', 'dense'):
            raise ValueError(f"video.sampling must be 'uniform' or 'dense', got {self.sampling!r}")
        for key in ('num_frames', 'frame_stride', 'clips'):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f'video.{key} must be an integer >= 1, got {v!r}')
        if self.crops not in (1, 3):
            raise ValueError(f'video.crops must be 1 (centre) or 3 (both ends and centre), got {self.crops!r}')
        m = self.min_frames
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f'video.min_frames must be an integer >= 1 or null, got {m!r}')

    @property
    def shortest(self) -> int:
        """Fewest frames a video needs (``min_frames``, else ``num_frames``)."""
        return self.min_frames if self.min_frames is not None else self.num_frames

    @classmethod
    def from_config(cls, video: Mapping[str, Any]) -> 'ClipSampling':
        return cls(**{k: video[k] for k in ('num_frames', 'sampling', 'frame_stride', 'clips', 'crops', 'min_frames')
                      if k in video})

    def as_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ('num_frames', 'sampling', 'frame_stride', 'clips', 'crops', 'min_frames')}


def sample_indices(n: int, s: ClipSampling, clip: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> List[int]:
    """Frame indices of one clip of an ``n``-frame video: random (``clip=None``, training) or the
    ``clip``-th of ``s.clips`` evenly placed evaluation clips. Short videos repeat their last frame."""
    if n < 1:
        raise ValueError('a video needs at least one frame')
    k = s.num_frames
    if s.sampling == 'uniform':
        seg = n / k
        if clip is None:
            u = torch.rand(k, generator=generator).tolist()
        else:
            u = [(clip + 0.5) / s.clips] * k
        return [min(int(seg * i + seg * u[i]), n - 1) for i in range(k)]
    span = (k - 1) * s.frame_stride + 1
    room = max(n - span, 0)
    if clip is None:
        start = int(torch.randint(0, room + 1, (1,), generator=generator))
    else:
        start = round(clip * room / (s.clips - 1)) if s.clips > 1 else room // 2
    return [min(start + i * s.frame_stride, n - 1) for i in range(k)]


# --- transforms ------------------------------------------------------------------------------------
def _to_video(frames: np.ndarray) -> tv_tensors.Video:
    """``(T, H, W, 3)`` uint8 -> torchvision Video ``(T, 3, H, W)`` uint8."""
    return tv_tensors.Video(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))


def train_clip_transform(size: int, mean: Sequence[float], std: Sequence[float],
                         scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                         hflip: float = 0.5) -> v2.Compose:
    """Random resized crop and flip, the same for every frame of a clip (torchvision v2 on a Video), then
    float and normalise. Input ``(T, 3, H, W)`` uint8, output ``(T, 3, size, size)`` float."""
    ops: List[Any] = [v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def eval_views(video: Tensor, size: int, crops: int, mean: Sequence[float], std: Sequence[float],
               crop_pct: float = 1.0) -> Tensor:
    """``(T, 3, H, W)`` uint8 -> ``(crops, T, 3, size, size)`` float: shorter side resized to
    ``size / crop_pct``, then the centre crop (``crops=1``) or three crops along the longer side (its
    start, centre and end; SlowFast/MViT's 3-crop test), normalised."""
    short = int(math.floor(size / crop_pct))
    x = v2.functional.resize(video, [short], antialias=True)
    h, w = x.shape[-2:]
    if crops == 1:
        starts = [((h - size) // 2, (w - size) // 2)]
    elif h >= w:
        starts = [(0, (w - size) // 2), ((h - size) // 2, (w - size) // 2), (h - size, (w - size) // 2)]
    else:
        starts = [((h - size) // 2, 0), ((h - size) // 2, (w - size) // 2), ((h - size) // 2, w - size)]
    views = [x[..., i:i + size, j:j + size] for i, j in starts]
    out = torch.stack([v2.functional.to_dtype(v.as_subclass(Tensor), torch.float32, scale=True) for v in views])
    m = torch.tensor(mean, dtype=torch.float32).view(1, 1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 1, 3, 1, 1)
    return (out - m) / s


# --- datasets --------------------------------------------------------------------------------------
class VideoDataset(Dataset):
    """Clips of videos: ``samples`` are ``(source, label)`` with a source a video file, a frame folder or
    an in-memory ``(T, H, W, 3)`` uint8 array.

    Training (``train=True``) returns ``(clip (3, T, size, size), label)``; evaluation returns all views
    ``(clips * crops, 3, T, size, size)`` of the video. ``None`` for an unreadable or too-short video.
    """

    def __init__(self, samples: Sequence[Tuple[Source, int]], classes: Sequence[str], sampling: ClipSampling,
                 train: bool, size: int, mean: Sequence[float], std: Sequence[float],
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, crop_pct: float = 1.0) -> None:
        self.samples = list(samples)
        self.targets = [int(t) for _, t in self.samples]
        self.classes = list(classes)
        self.sampling = sampling
        self.train = train
        self.size, self.mean, self.std, self.crop_pct = int(size), tuple(mean), tuple(std), float(crop_pct)
        self.transform = train_clip_transform(size, mean, std, scale, ratio, hflip) if train else None

    def __len__(self) -> int:
        return len(self.samples)

    def frames(self, index: int, clip: Optional[int] = None) -> Tuple[np.ndarray, List[int]]:
        """The sampled frames ``(T, H, W, 3)`` uint8 of one clip and their indices (``clip=None``: random)."""
        src = self.samples[index][0]
        s = self.sampling
        if isinstance(src, np.ndarray):
            n = len(src)
        elif Path(src).is_dir():
            n = count_frames(src)
        else:
            everything = read_video(src)
            n = len(everything)
        if n < s.shortest:
            raise VideoReadError(f'{src if isinstance(src, str) else "clip"}: {n} frames, fewer than the '
                                 f'{s.shortest} needed (video.min_frames)')
        idx = sample_indices(n, s, clip)
        if isinstance(src, np.ndarray):
            return src[idx], idx
        if Path(src).is_dir():
            return read_video(src, idx), idx
        return everything[idx], idx

    def views(self, index: int) -> Tensor:
        """All evaluation views ``(clips * crops, 3, T, size, size)`` of one video."""
        s = self.sampling
        src = self.samples[index][0]
        if isinstance(src, str) and not Path(src).is_dir():
            everything = read_video(src)  # decode once for every clip
            if len(everything) < s.shortest:
                raise VideoReadError(f'{src}: {len(everything)} frames, fewer than the {s.shortest} needed '
                                     '(video.min_frames)')
            clips = [everything[sample_indices(len(everything), s, k)] for k in range(s.clips)]
        else:
            clips = [self.frames(index, k)[0] for k in range(s.clips)]
        out = [eval_views(_to_video(c), self.size, s.crops, self.mean, self.std, self.crop_pct) for c in clips]
        return torch.cat(out).permute(0, 2, 1, 3, 4).contiguous()  # V, 3, T, H, W

    def __getitem__(self, index: int) -> Optional[Tuple[Tensor, int]]:
        label = self.targets[index]
        try:
            if not self.train:
                return self.views(index), label
            frames, _ = self.frames(index)
        except VideoReadError as e:
            _log.warning('skipping video: %s', e)
            return None
        clip = self.transform(_to_video(frames))
        return clip.as_subclass(Tensor).permute(1, 0, 2, 3).contiguous(), label  # 3, T, H, W


def _is_video_entry(p: Path) -> bool:
    return (p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS) or p.is_dir()


def find_videos(folder: str, class_names: Optional[Sequence[str]] = None) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``(samples, classes)`` of a folder of class folders, each holding video files or frame folders.

    With ``class_names`` (a model's classes) each folder is labelled by its name (unknown names are an
    error), else classes are the sorted folder names.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f'video folder not found: {root}')
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not folders:
        raise ValueError(f'{root} has no class folders (expected {root}/<class>/<video file or frame folder>)')
    if class_names:
        index = class_index_by_name(folders, class_names, where=str(root))
        classes = list(class_names)
    else:
        index = {f: i for i, f in enumerate(folders)}
        classes = folders
    samples = [(str(p), index[f]) for f in folders for p in sorted((root / f).iterdir()) if _is_video_entry(p)]
    if not samples:
        raise ValueError(f'{root}: no videos ({", ".join(VIDEO_EXTENSIONS[:5])}, ... files or frame folders) '
                         'in its class folders')
    return samples, classes


def read_video_list(list_file: str, root: Optional[str] = None, class_names: Optional[Sequence[str]] = None
                    ) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``(samples, classes)`` from a ``path,label`` list (CSV, or space/tab separated); labels are integers
    or class names (looked up in ``class_names`` if given, else the sorted names of the file)."""
    lf = Path(list_file)
    if not lf.is_file():
        raise FileNotFoundError(f'video list not found: {lf}')
    base = Path(root) if root else lf.parent
    rows: List[Tuple[str, str, int]] = []
    with open(lf, newline='') as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            if ',' in line:
                parts = next(csv.reader([line]))
                path, label = ','.join(parts[:-1]).strip(), parts[-1].strip()
            else:
                path, _, label = line.rpartition(' ' if ' ' in line else '\t')
                path = path.strip()
            if n == 1 and label.lower() in ('label', 'class') and path.lower() in ('path', 'video', 'file'):
                continue
            if not path or not label:
                raise ValueError(f'{lf}:{n}: expected "path,label", got {line!r}')
            rows.append((path, label, n))
    if not rows:
        raise ValueError(f'{lf} lists no videos')
    numeric = [r[1].lstrip('-').isdigit() for r in rows]
    if all(numeric):
        labels = [int(r[1]) for r in rows]
        bad = [r for r, v in zip(rows, labels) if v < 0]
        if bad:
            raise ValueError(f'{lf}:{bad[0][2]}: negative label {bad[0][1]}')
        top = max(labels) + 1
        classes = list(class_names) if class_names else [str(i) for i in range(top)]
        if top > len(classes):
            raise ValueError(f'{lf} has labels up to {top - 1} but there are {len(classes)} classes')
    elif any(numeric):
        r = rows[numeric.index(True)] if not numeric[0] else rows[numeric.index(False)]
        raise ValueError(f'{lf}:{r[2]}: labels mix integers and class names ({r[1]!r})')
    else:
        names = sorted({r[1] for r in rows})
        index = class_index_by_name(names, class_names, where=str(lf)) if class_names else \
            {c: i for i, c in enumerate(names)}
        classes = list(class_names) if class_names else names
        labels = [index[r[1]] for r in rows]
    samples = [(str(Path(p) if Path(p).is_absolute() else base / p), y) for (p, _, _), y in zip(rows, labels)]
    return samples, classes


def _split(cfg: Mapping[str, Any], which: str, class_names: Optional[Sequence[str]]
           ) -> Optional[Tuple[List[Tuple[str, int]], List[str]]]:
    d = cfg['data']
    layout = cfg['video']['layout']
    list_file = d[f'{which}_list']
    if layout == 'list' or (layout == 'auto' and list_file):
        if not list_file:
            return None if which == 'val' else _raise(f'video.layout=list needs data.{which}_list')
        return read_video_list(list_file, d['root'], class_names)
    if not d['root']:
        raise ValueError('no training videos: set data.root (Kinetics layout: root/train/<class>/<video>) '
                         'or data.train_list (path,label lines)')
    folder = Path(d['root']) / d[f'{which}_dir']
    if which == 'val' and not folder.is_dir():
        return None
    if which == 'train' and not folder.is_dir():
        raise FileNotFoundError(f'training videos not found: {folder} (expected {folder}/<class>/<video file or '
                                'frame folder>)')
    return find_videos(str(folder), class_names)


def _raise(message: str) -> Any:
    raise ValueError(message)


def _class_names_file(cfg: Mapping[str, Any]) -> Optional[List[str]]:
    path = cfg['data']['class_names']
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f'data.class_names file not found: {p}')
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def build_video_datasets(cfg: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]
                         ) -> Tuple[VideoDataset, Optional[VideoDataset]]:
    """Training and validation clip datasets from the config's ``data``, ``aug``, ``eval`` and ``video``
    sections (validation labels follow the training classes, by name)."""
    s = ClipSampling.from_config(cfg['video'])
    a, size = cfg['aug'], int(cfg['data']['img_size'])
    train_samples, classes = _split(cfg, 'train', _class_names_file(cfg))
    train = VideoDataset(train_samples, classes, s, True, size, mean, std, a['scale'], a['ratio'], float(a['hflip']))
    val_split = _split(cfg, 'val', classes)
    val = None
    if val_split is not None:
        val = VideoDataset(val_split[0], classes, s, False, size, mean, std, crop_pct=float(cfg['eval']['crop_pct']))
    return train, val

