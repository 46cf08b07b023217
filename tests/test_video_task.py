"""Video data, the video task and ``emov2 video``: 3D windows, sampling, multi-view eval, PyAV, CLI errors."""
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from emov2.checkpoint import read_metadata
from emov2.cli import app
from emov2.cli.video import video_app  # registers `emov2 video`
from emov2.layers import SpanningWindowAttention, pad_to_window
from emov2.train import Trainer, load_config
from emov2.train.config import ConfigError, scaled_lrs
from emov2.train.data import SeededDataset, collate_skip
from emov2.video.data import (ClipSampling, VideoDataset, find_videos, read_video, read_video_list, sample_indices,
                              write_video)
from emov2.video.demo import ClipArrays, DIRECTIONS, make_motion_clips
from emov2.video.task import VideoTask, evaluate_video

TINY = ['model.name=v_emov2_1m', 'model.kwargs={"depths": [1, 1, 1, 1], "dw_kernels": [3, 3, 3, 3]}', 'data.img_size=32', 'data.workers=0',
        'optim.lr=0.003', 'sched.warmup_epochs=0', 'eval.precise_bn_images=0', 'ema.enable=false',
        'train.amp=false', 'train.progress=false', 'video.num_frames=4', 'video.clips=2', 'video.crops=1',
        'aug.scale=[0.8, 1.0]', 'aug.hflip=0.0']


def smooth_frames(t=6, h=40, w=48, seed=0):
    """Frames a lossy codec keeps well: smooth colour gradients that move."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 1, 3)
    f = [np.stack([(np.sin(xx / 9 + i * 0.4 + base[c] * 6) * 0.5 + 0.5) * 200 + yy for c in range(3)], -1)
         for i in range(t)]
    return np.clip(np.stack(f), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def video_root(tmp_path_factory):
    """train/ and val/ class folders with mp4 files, a frame folder, a corrupt file and a too-short video."""
    root = tmp_path_factory.mktemp('videos')
    for split in ('train', 'val'):
        for k, c in enumerate(('a', 'b')):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(2):
                write_video(str(d / f'v{i}.mp4'), smooth_frames(seed=10 * k + i))
            frames = d / 'frames0'
            frames.mkdir()
            for t, f in enumerate(smooth_frames(t=5, seed=99 + k)):
                Image.fromarray(f).save(frames / f'{t:04d}.png')
        (root / split / 'a' / 'broken.mp4').write_bytes(b'\x00\x00\x00 ftypisom not really a video')
        write_video(str(root / split / 'b' / 'short.mp4'), smooth_frames(t=2))
    return root


# --- 3D windows ---------------------------------------------------------------------------------------
def naive_window_attention_3d(qk, v, window, num_heads, mode):
    """Literal loop over t x h x w windows and heads: softmax(QK^T * scale) V on each window's pixels."""
    c = qk.shape[1] // 2
    grid = [qk.shape[2 + i] // window[i] for i in range(3)]
    dh, dv = c // num_heads, v.shape[1] // num_heads
    out = torch.zeros_like(v)
    for a in itertools.product(*(range(g) for g in grid)):
        pix = []
        for r in itertools.product(*(range(w) for w in window)):
            pix.append(tuple(a[i] * window[i] + r[i] if mode == 'neighbour' else r[i] * grid[i] + a[i]
                             for i in range(3)))
        idx = [torch.tensor([p[i] for p in pix]) for i in range(3)]
        for h in range(num_heads):
            q = qk[:, h * dh:(h + 1) * dh, idx[0], idx[1], idx[2]].transpose(1, 2)
            k = qk[:, c + h * dh:c + (h + 1) * dh, idx[0], idx[1], idx[2]].transpose(1, 2)
            val = v[:, h * dv:(h + 1) * dv, idx[0], idx[1], idx[2]].transpose(1, 2)
            attn = torch.softmax(q @ k.transpose(1, 2) * dh ** -0.5, dim=-1)
            out[:, h * dv:(h + 1) * dv, idx[0], idx[1], idx[2]] += (attn @ val).transpose(1, 2)
    return out


@pytest.mark.parametrize('size,window', [((4, 6, 6), (2, 3, 3)), ((3, 5, 7), (2, 5, 5)), ((2, 4, 4), (2, 2, 2))])
def test_3d_spanning_window_attention_matches_a_naive_per_window_loop(size, window):
    attn = SpanningWindowAttention(8, 12, 4, window, spatial_dims=3).double().eval()
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    with torch.no_grad():
        got = attn(x)
        xp = pad_to_window(x, list(window))
        qk, v = attn.qk(xp), attn.act(attn.v(xp))
        want = sum(naive_window_attention_3d(qk, v, window, attn.num_heads, m) for m in ('neighbour', 'distant'))
    torch.testing.assert_close(got, want[:, :, :size[0], :size[1], :size[2]], rtol=1e-10, atol=1e-10)


# --- reading ------------------------------------------------------------------------------------------
def test_pyav_round_trip(tmp_path):
    frames = smooth_frames(t=7)
    path = tmp_path / 'clip.mp4'
    write_video(str(path), frames)
    back = read_video(str(path))
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(float) - frames).mean() < 4.0  # lossy codec, near-lossless setting
    picked = read_video(str(path), [0, 6, 3])
    np.testing.assert_array_equal(picked, back[[0, 6, 3]])


def test_frame_folder_layout_and_list_file(video_root, tmp_path):
    samples, classes = find_videos(str(video_root / 'train'))
    assert classes == ['a', 'b']
    names = sorted(Path(p).name for p, _ in samples)
    assert names == ['broken.mp4', 'frames0', 'frames0', 'short.mp4', 'v0.mp4', 'v0.mp4', 'v1.mp4', 'v1.mp4']
    folder = next(p for p, y in samples if p.endswith('frames0') and y == 1)
    want = smooth_frames(t=5, seed=100)
    np.testing.assert_array_equal(read_video(folder, [4, 1]), want[[4, 1]])  # png: lossless
    lst = tmp_path / 'list.csv'
    lst.write_text('path,label\ntrain/b/v0.mp4,b\ntrain/a/frames0,a\n')
    samples, classes = read_video_list(str(lst), str(video_root))
    assert classes == ['a', 'b'] and [y for _, y in samples] == [1, 0]
    lst.write_text('train/b/v0.mp4 3\n')
    assert read_video_list(str(lst), str(video_root))[1] == ['0', '1', '2', '3']
    lst.write_text('train/b/v0.mp4,b\ntrain/a/v0.mp4,0\n')
    with pytest.raises(ValueError, match='mix'):
        read_video_list(str(lst), str(video_root))


def test_unreadable_and_too_short_videos_are_skipped_and_counted(video_root):
    samples, classes = find_videos(str(video_root / 'val'))
    s = ClipSampling(num_frames=4, clips=2, crops=3)
    ds = VideoDataset(samples, classes, s, False, 32, (0.5,) * 3, (0.5,) * 3)
    by_name = {Path(p).name + str(y): i for i, (p, y) in enumerate(samples)}
    assert ds[by_name['broken.mp40']] is None and ds[by_name['short.mp41']] is None
    views, label = ds[by_name['v0.mp40']]
    assert views.shape == (6, 3, 4, 32, 32) and label == 0
    train = VideoDataset(samples, classes, s, True, 32, (0.5,) * 3, (0.5,) * 3)
    assert train[by_name['broken.mp40']] is None and train[by_name['frames01']][0].shape == (3, 4, 32, 32)
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 4, 32, 32))
    r = evaluate_video(model, DataLoader(ds, batch_size=3, collate_fn=collate_skip), torch.device('cpu'))
    assert r['skipped'] == 2 and r['n'] == len(samples) - 2 and r['views'] == 6


# --- sampling -----------------------------------------------------------------------------------------
def test_clip_sampling_is_a_function_of_the_seed():
    s = ClipSampling(num_frames=8)
    draw = lambda seed: sample_indices(40, s, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(1) == draw(1) and draw(1) != draw(2)
    idx = draw(3)
    assert all(5 * i <= j < 5 * (i + 1) for i, j in enumerate(idx))  # one frame per segment
    assert sample_indices(40, s, clip=0) == [int(5 * i + 5 * 0.5 / 4) for i in range(8)]  # eval: fixed
    dense = ClipSampling(num_frames=4, sampling='dense', frame_stride=3, clips=3)
    assert [sample_indices(20, dense, clip=k) for k in range(3)] == [[0, 3, 6, 9], [5, 8, 11, 14], [10, 13, 16, 19]]
    clips, labels = make_motion_clips(np.random.default_rng(0).integers(0, 17, (20, 8, 8)), 6, seed=0)
    ds = ClipArrays(clips, labels, True, ClipSampling(num_frames=8), size=32)
    a, b, c = SeededDataset(ds, 5), SeededDataset(ds, 5), SeededDataset(ds, 6)  # the trainer's seeding
    assert torch.equal(a[2][0], b[2][0]) and not torch.equal(a[2][0], c[2][0])


def test_multi_view_evaluation_averages_logits_per_video():
    class ViewScore(nn.Module):  # logits = (mean of the clip, -mean): class 0 when the clip is bright
        def forward(self, x):
            m = x.mean((1, 2, 3, 4))
            return torch.stack([m, -m], 1)
    # video 0: views +3, -1, -1 -> mean +1/3 -> class 0 (a majority vote of views would say 1)
    views = torch.tensor([[3.0, -1.0, -1.0], [-3.0, 1.0, 1.0]]).view(2, 3, 1, 1, 1, 1).expand(2, 3, 3, 2, 4, 4)
    r = evaluate_video(ViewScore(), [(views, torch.tensor([0, 1]), 1)], torch.device('cpu'))
    assert r['top1'] == 100.0 and r['n'] == 2 and r['skipped'] == 1 and r['views'] == 3
    r = evaluate_video(ViewScore(), [(views, torch.tensor([1, 0]), 0)], torch.device('cpu'))
    assert r['top1'] == 0.0


# --- the task on the trainer --------------------------------------------------------------------------
def test_defaults_are_the_paper_recipe_and_bad_values_are_refused():
    cfg = load_config(None, [], defaults=VideoTask.defaults)
    assert scaled_lrs(cfg)['lr'] == pytest.approx(1e-4) and cfg['optim']['batch_size'] == 256
    assert (cfg['sched']['epochs'], cfg['sched']['warmup_epochs'], cfg['optim']['clip_grad']) == (200, 30, 20.0)
    assert cfg['data']['img_size'] == 160 and cfg['model']['name'] == 'v_emov2_5m'
    for bad, msg in (('video.crops=2', 'crops'), ('video.sampling=random', 'sampling'), ('video.layout=x', 'layout'),
                     ('video.num_frames=0', 'num_frames')):
        with pytest.raises(ConfigError, match=msg):
            VideoTask(load_config(None, [bad], defaults=VideoTask.defaults))


@pytest.fixture(scope='module')
def motion_run(tmp_path_factory):
    """A short V-EMO run on digit-motion clips through the trainer (and its checkpoint)."""
    out = tmp_path_factory.mktemp('run')
    clips, labels = make_motion_clips(np.random.default_rng(0).integers(0, 17, (30, 8, 8)), 16, seed=1,
                                      size=32, frames=8, background=False)
    cfg = load_config(None, [*TINY, 'optim.batch_size=8', 'sched.epochs=6', 'eval.every=0', f'train.out={out}'],
                      defaults=VideoTask.defaults)
    s = ClipSampling.from_config(cfg['video'])
    result = Trainer(cfg, ClipArrays(clips, labels, True, s, size=32), task=VideoTask(cfg, DIRECTIONS)).fit()
    return out, result


def test_a_short_run_lowers_the_loss_and_records_the_sampling(motion_run):
    out, result = motion_run
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert len(log) == 6 and log[-1]['train_loss'] < log[0]['train_loss'] - 0.05
    meta = read_metadata(str(out / 'last' / 'model.safetensors'))
    assert meta['task'] == 'video' and meta['class_names'] == list(DIRECTIONS)
    assert meta['video']['num_frames'] == 4 and meta['video']['clips'] == 2 and meta['img_size'] == 32


def test_cli_predict_eval_and_bad_input(motion_run, video_root, tmp_path):
    out, _ = motion_run
    assert {c.name or c.callback.__name__ for c in video_app.registered_commands} == {'train', 'eval', 'predict', 'demo'}
    runner = CliRunner()
    good, bad = video_root / 'val' / 'a' / 'v0.mp4', video_root / 'val' / 'a' / 'broken.mp4'
    r = runner.invoke(app, ['video', 'predict', str(good), str(bad), '--checkpoint', str(out), '--topk', '2',
                            '--strips', str(tmp_path / 'strips'), '--json'])
    assert r.exit_code == 1, r.output
    res = json.loads(r.stdout)
    assert len(res[0]['top']) == 2 and res[0]['top'][0][0] in DIRECTIONS and 'error' in res[1]
    assert Image.open(res[0]['strip']).size[0] > 4 * 90  # 4 frames side by side
    # eval: class folders a/b are not the checkpoint's classes -> a clear error, not a traceback
    r = runner.invoke(app, ['video', 'eval', '--checkpoint', str(out), '--data', str(video_root)])
    assert r.exit_code == 2 and 'class folders the model does not know' in r.output
    for args, msg in ((['video', 'train', '--data', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'o'),
                        'data.workers=0'], 'not found'),
                      (['video', 'train', 'video.clips=zero'], 'video.clips'),
                      (['video', 'train', '--model', 'emov2_1m', '--data', str(video_root)], 'does not take clips'),
                      (['video', 'predict', str(good), '--checkpoint', str(tmp_path / 'none')], 'not found'),
                      (['video', 'eval', '--checkpoint', str(out), '--data', str(tmp_path / 'none')], 'not found')):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output and 'Traceback' not in r.output
