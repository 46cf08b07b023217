"""Segmentation task: metrics by hand, sliding windows, datasets that skip bad files, short training runs, CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from emov2.cli import app
from emov2.cli import segment as _segment_cli  # noqa: F401  (registers `emov2 segment`)
from emov2.segmentation.data import (RandomCropCatMax, SegmentationDataset, collate_segmentation, find_samples,
                                     keep_ratio_size, train_transform)
from emov2.segmentation.demo import DigitOnPhoto, make_scenes
from emov2.segmentation.inference import segment_logits, slide_inference, slide_windows
from emov2.segmentation.metrics import ConfusionMatrix, flat_per_class
from emov2.segmentation.predict import load_segmenter
from emov2.segmentation.task import SegmentationTask, evaluate_segmenter, segmentation_loss
from emov2.train import load_config
from emov2.train.config import ConfigError
from emov2.train.demo import DigitsDataset
from emov2.train.engine import Trainer
from emov2.train.report import read_log
from torchvision import tv_tensors

TINY = {'depths': [1, 1, 1, 1]}


# --- metrics -----------------------------------------------------------------------------------------
def test_metrics_match_hand_computed_values():
    gt = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 3]])  # the ignored pixel's prediction (3) must not count
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(pred, gt)
    m = cm.metrics(['a', 'b', 'c', 'd'])
    # class 0: I 2, G 3, P 3; class 1: I 2, G 2, P 3; class 2: I 1, G 2, P 1; class 3: nothing -> NaN
    assert m['IoU'][:3] == pytest.approx([50.0, 200 / 3, 50.0])
    assert m['Acc'][:3] == pytest.approx([200 / 3, 100.0, 50.0])
    assert m['Dice'][:3] == pytest.approx([200 / 3, 80.0, 200 / 3])
    assert all(math.isnan(m[k][3]) for k in ('IoU', 'Acc', 'Dice'))
    assert m['mIoU'] == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert m['mAcc'] == pytest.approx((200 / 3 + 100 + 50) / 3)
    assert m['mDice'] == pytest.approx((200 / 3 + 80 + 200 / 3) / 3)
    assert m['aAcc'] == pytest.approx(500 / 7)
    assert m['pixels'] == 7
    flat = flat_per_class(m)
    assert flat['IoU.b'] == pytest.approx(200 / 3) and math.isnan(flat['IoU.d'])


def test_metrics_false_positive_class_and_accumulation():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    cm.update(torch.tensor([2, 1]), torch.tensor([0, 1]))  # class 2 predicted, never in the ground truth
    m = cm.metrics()
    assert m['IoU'][2] == 0.0 and math.isnan(m['Acc'][2])   # a false positive costs IoU; Acc undefined
    assert m['IoU'][0] == pytest.approx(200 / 3) and m['IoU'][1] == 100.0
    assert m['mIoU'] == pytest.approx((200 / 3 + 100 + 0) / 3)
    with pytest.raises(ValueError, match='outside'):
        cm.update(torch.tensor([0]), torch.tensor([7]))


# --- inference ---------------------------------------------------------------------------------------
class _Local(nn.Module):
    """A 1x1 conv: each output pixel depends on its input pixel only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return {'out': self.conv(x)}


def test_sliding_window_equals_whole_image():
    torch.manual_seed(0)
    model, x = _Local(), torch.randn(2, 3, 12, 16)
    whole = model(x)['out']
    assert slide_windows(12, 16, 4, 4) == [(y, y + 4, x0, x0 + 4) for y in (0, 4, 8) for x0 in (0, 4, 8, 12)]
    torch.testing.assert_close(slide_inference(model, x, 4, 4), whole)                 # exact tiling
    torch.testing.assert_close(slide_inference(model, x, (5, 7), (3, 5)), whole)       # overlaps averaged
    torch.testing.assert_close(slide_inference(model, x, 32, 20), whole)               # one window, image smaller
    # the last window is moved back to the border (MMSeg): 10 px with crop 4 stride 4 -> 0, 4, 6
    assert [w[0] for w in slide_windows(10, 4, 4, 4)] == [0, 4, 6]
    up = segment_logits(model, x, 'slide', 4, 4, out_size=(24, 32))
    assert up.shape == (2, 5, 24, 32)
    # the task's evaluation in slide mode scores exactly what whole-image inference scores
    masks = [torch.randint(0, 5, (12, 16)), torch.randint(0, 5, (24, 32))]      # the second at 2x (resized logits)
    loader = [([x[0], x[1]], masks, 0)]
    args = (torch.device('cpu'), 5, None, 255)
    whole_r = evaluate_segmenter(model, loader, *args, mode='whole')
    slide_r = evaluate_segmenter(model, loader, *args, mode='slide', crop=[4, 4], stride=[4, 4])
    assert whole_r['n'] == 2 and whole_r['table']['pixels'] == 12 * 16 + 24 * 32
    assert slide_r['mIoU'] == pytest.approx(whole_r['mIoU']) and slide_r['table']['IoU'] == whole_r['table']['IoU']


# --- data --------------------------------------------------------------------------------------------
def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_dataset_skips_and_counts_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda h=16, w=16: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    lab = lambda h=16, w=16: rng.integers(0, 3, (h, w), dtype=np.uint8)  # noqa: E731
    d = tmp_path / 'val'
    _png(d / 'images' / 'good.png', img())
    _png(d / 'masks' / 'good.png', lab())
    _png(d / 'images' / 'nomask.png', img())                                  # missing mask
    _png(d / 'images' / 'small.png', img())
    _png(d / 'masks' / 'small.png', lab(8, 8))                               # size mismatch
    (d / 'images' / 'garbage.png').write_bytes(b'not an image at all')        # unreadable header
    _png(d / 'masks' / 'garbage.png', lab())
    _png(d / 'images' / 'rgbmask.png', img())
    _png(d / 'masks' / 'rgbmask.png', img())                                  # colour mask, not indices
    _png(d / 'images' / 'cut.png', rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    _png(d / 'masks' / 'cut.png', lab(64, 64))
    data = (d / 'images' / 'cut.png').read_bytes()
    (d / 'images' / 'cut.png').write_bytes(data[:len(data) // 2])            # header fine, pixels truncated
    samples, missing = find_samples(str(tmp_path), 'folder', 'val')
    ds = SegmentationDataset(samples, None, False, 3, problems=missing)
    assert len(ds) == 2 and ds.skipped == 4
    reasons = ' '.join(r for _, r in ds.problems)
    for word in ('no mask', 'size mismatch', 'unreadable image', 'not single-channel'):
        assert word in reasons
    batch = collate_segmentation([ds[i] for i in range(len(ds))])
    assert batch[2] == 1 and len(batch[0]) == 1                               # the truncated file dropped, counted


def test_ade20k_reduce_zero_label_and_hrf_field_of_view(tmp_path):
    _png(tmp_path / 'images' / 'training' / 'a.jpg', np.zeros((4, 4, 3), np.uint8))
    _png(tmp_path / 'annotations' / 'training' / 'a.png', np.array([[0, 1, 2, 150]] * 4, np.uint8))
    s, _ = find_samples(str(tmp_path), 'ade20k', 'train')
    label = SegmentationDataset(s, None, False, 150, reduce_zero_label=True).read_label(s[0])
    assert label[0].tolist() == [255, 0, 1, 149]
    h = tmp_path / 'hrf'
    for i in range(3):
        _png(h / 'images' / f'{i:02d}_h.jpg', np.zeros((4, 4, 3), np.uint8))
        _png(h / 'manual1' / f'{i:02d}_h.tif', np.array([[0, 255, 255, 0]] * 4, np.uint8))
        _png(h / 'mask' / f'{i:02d}_h_mask.tif', np.array([[255, 255, 0, 0]] * 4, np.uint8))
    train, _ = find_samples(str(h), 'hrf', 'train', hrf_train_count=2)
    val, _ = find_samples(str(h), 'hrf', 'val', hrf_train_count=2)
    assert len(train) == 2 and len(val) == 1
    label = SegmentationDataset(val, None, False, 2, binary=True).read_label(val[0])
    assert label[0].tolist() == [0, 1, 255, 255]                              # outside the field of view: ignored


def test_training_augmentation_shapes_and_ignore_padding():
    torch.manual_seed(0)
    tf = train_transform((32, 32), (64, 16), (0.5,) * 3, (0.5,) * 3, ratio_range=(0.5, 1.0))
    img = tv_tensors.Image(torch.randint(0, 255, (3, 20, 40), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 4, (20, 40), dtype=torch.uint8))
    x, y = tf(img, mask)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (32, 32) and y.dtype == torch.int64
    assert (y == 255).any()                       # resized to <= 16 px tall, padded with the ignore index
    assert set(y.unique().tolist()) <= {0, 1, 2, 3, 255}
    assert keep_ratio_size(512, 683, (2048, 512)) == (512, 683)
    # cat_max_ratio: a crop that is all one class is re-drawn when a mixed one exists
    m = torch.zeros(1, 8, 64, dtype=torch.uint8)
    m[..., 56:] = 1
    crop = RandomCropCatMax((8, 16), cat_max_ratio=0.75)
    params = [crop.make_params([tv_tensors.Mask(m)]) for _ in range(20)]
    assert sum(p['left'] > 40 for p in params) > 10   # plain random crops land there 8 times in 49


# --- training ----------------------------------------------------------------------------------------
def _colour_scenes(root: Path, split: str, n: int, size: int, seed: int) -> None:
    """Class = colour: 8x8 blocks of red, green or blue (+ noise) labelled 0, 1, 2."""
    rng = np.random.default_rng(seed)
    colours = np.array([[220, 30, 30], [30, 200, 40], [40, 50, 220]])
    for i in range(n):
        blocks = rng.integers(0, 3, (size // 8, size // 8))
        label = blocks.repeat(8, 0).repeat(8, 1).astype(np.uint8)
        img = (colours[label] + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
        _png(root / split / 'images' / f'{i:03d}.png', img)
        _png(root / split / 'masks' / f'{i:03d}.png', label)
    (root / 'classes.txt').write_text('red\ngreen\nblue\n')


def _cfg(root: Path, out: Path, epochs: int, *extra: str):
    return load_config(None, [
        f'data.root={root}', 'segmentation.layout=folder', 'segmentation.kind=segformer',
        'segmentation.backbone=emov2_1m', 'segmentation.channels=32', f'model.kwargs={json.dumps(TINY)}',
        'segmentation.crop_size=[32, 32]', 'segmentation.scale=[32, 32]', 'segmentation.ratio_range=[1.0, 1.0]',
        'segmentation.photometric=false', 'segmentation.stride=[16, 16]', 'data.workers=0', 'optim.batch_size=8',
        'optim.lr=0.01', 'optim.clip_grad=5.0', f'sched.epochs={epochs}', 'sched.warmup_epochs=0',
        'sched.min_lr=0.001', 'train.amp=false', 'train.progress=false', f'train.out={out}', 'eval.batch_size=4', 'eval.every=1',
        'eval.precise_bn_images=32',
        *extra], defaults=SegmentationTask.defaults)


@pytest.fixture(scope='module')
def colour_run(tmp_path_factory):
    """A short run on the class = colour scenes (shared by the learning, predict and CLI tests)."""
    root = tmp_path_factory.mktemp('colour')
    _colour_scenes(root, 'train', 32, 32, 0)
    _colour_scenes(root, 'val', 8, 32, 1)
    out = root / 'run'
    torch.manual_seed(0)
    cfg = _cfg(root, out, 4)
    task = SegmentationTask(cfg)
    result = Trainer(cfg, task=task).fit()
    return root, out, result


def test_short_run_lowers_loss_and_learns_colour_classes(colour_run):
    root, out, result = colour_run
    log = read_log(out / 'log.jsonl')
    assert len(log) == 4 and log[-1]['train_loss'] < 0.7 * log[0]['train_loss']
    assert log[-1]['val_mIoU'] > 90.0, log[-1]                 # chance: ~33 % IoU per class at best
    assert result.score_name == 'mIoU' and result.best_score == max(r['val_mIoU'] for r in log)
    metrics = json.loads((out / 'last' / 'metrics.json').read_text())
    assert {'val_IoU.red', 'val_Acc.blue', 'val_aAcc', 'val_mAcc', 'val_mDice'} <= set(metrics)
    model, meta = load_segmenter(str(out))
    assert meta['class_names'] == ['red', 'green', 'blue'] and len(meta['palette']) == 3
    assert meta['kind'] == 'segformer' and not model.training


def test_cli_eval_predict_and_bad_input(colour_run, tmp_path):
    root, out, _ = colour_run
    assert {c.name for c in _segment_cli.segment_app.registered_commands} == {'train', 'eval', 'predict', 'demo'}
    runner = CliRunner()
    r = runner.invoke(app, ['segment', 'eval', '--checkpoint', str(out), '--data', str(root), '--json',
                            '--workers', '0'])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    best = json.loads((out / 'best' / 'metrics.json').read_text())
    assert res['model']['mIoU'] == pytest.approx(best['val_mIoU'], abs=1e-6)
    assert [row['class'] for row in res['model']['per_class']] == ['red', 'green', 'blue']
    r = runner.invoke(app, ['segment', 'eval', '--checkpoint', str(out), '--data', str(root), '--workers', '0'])
    assert r.exit_code == 0 and 'green' in r.output and 'mIoU' in r.output
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(b'\x00' * 10)
    good = root / 'val' / 'images' / '000.png'
    r = runner.invoke(app, ['segment', 'predict', str(good), str(bad), '--checkpoint', str(out),
                            '--out', str(tmp_path / 'pred')])
    assert r.exit_code == 1 and 'bad.jpg' in r.output
    label = np.asarray(Image.open(tmp_path / 'pred' / '000.png'))
    truth = np.asarray(Image.open(root / 'val' / 'masks' / '000.png'))
    assert label.shape == truth.shape and (label == truth).mean() > 0.9
    assert (tmp_path / 'pred' / '000_overlay.png').is_file()
    # user mistakes: one red line, exit 2, no traceback
    for args in (['segment', 'train', '--data', str(tmp_path / 'missing'), '--out', str(tmp_path / 'o'),
                  'segmentation.layout=folder', 'model.num_classes=3'],
                 ['segment', 'train', 'segmentation.kind=unet9', '--data', str(root)],
                 ['segment', 'train', 'segmentation.crop_size=12', '--data', str(root)],
                 ['segment', 'eval', '--checkpoint', str(tmp_path / 'nope'), '--data', str(root)],
                 ['segment', 'predict', str(good), '--checkpoint', str(tmp_path / 'nope')]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert 'error' in r.output and 'Traceback' not in r.output


def test_demo_scenes_label_each_digit_by_its_class():
    digits = np.zeros((2, 8, 8))
    digits[0, 2:6, 3:5] = 16          # a bar of full ink
    digits[1, 1:7, 1:7] = 16
    scenes = make_scenes(6, digits, np.array([3, 7]), ('camera', 'coffee'), seed=0, per_scene=(1, 1))
    for img, mask in scenes:
        assert img.dtype == np.uint8 and img.shape[:2] == mask.shape and 96 <= min(mask.shape) <= 128
        labels = set(np.unique(mask).tolist())
        assert labels in ({0, 4}, {0, 8})                      # background + digit 3 or digit 7 (class d + 1)
        assert 0.003 < (mask > 0).mean() < 0.5
        # the label is exactly the painted pixels: one flat colour, contrasting with the photo around it
        ink = mask > 0
        colours = np.unique(img[ink].reshape(-1, 3), axis=0)
        assert len(colours) == 1
        ys, xs = np.nonzero(ink)
        y0, y1, x0, x1 = max(ys.min() - 4, 0), ys.max() + 5, max(xs.min() - 4, 0), xs.max() + 5
        around = img[y0:y1, x0:x1][~ink[y0:y1, x0:x1]].astype(float)
        assert abs(colours[0].mean() - around.mean()) > 30


def test_class_weight_loss_and_config():
    """segmentation.class_weight (MMSeg's class_weight): each pixel weighted by its true class, weighted mean."""
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    target[0, 0, 0] = 255
    w = torch.tensor([0.1, 1.0, 2.0])
    plain = segmentation_loss({'out': logits}, target)
    weighted = segmentation_loss({'out': logits}, target, class_weight=w)
    nll = -logits.log_softmax(1).gather(1, target.clamp(max=2)[:, None])[:, 0]
    keep = target != 255
    pw = w[target.clamp(max=2)] * keep
    assert weighted == pytest.approx(float((nll * pw).sum() / pw.sum()), rel=1e-5)
    assert plain == pytest.approx(float(nll[keep].mean()), rel=1e-5) and weighted != pytest.approx(float(plain))
    # a zero weight removes that class from the loss
    only12 = segmentation_loss({'out': logits}, target, class_weight=torch.tensor([0.0, 1.0, 1.0]))
    sel = keep & (target != 0)
    assert only12 == pytest.approx(float(nll[sel].mean()), rel=1e-5)
    for bad in ('3', '[]', '[-1, 1, 1]', '[0, 0, 0]', '["a", 1, 1]'):
        with pytest.raises(ConfigError, match='class_weight'):
            SegmentationTask(load_config(None, [f'segmentation.class_weight={bad}'], defaults=SegmentationTask.defaults))
    task = SegmentationTask(load_config(None, ['segmentation.class_weight=[1, 2]', 'segmentation.layout=folder',
                                               'segmentation.class_names=[a, b, c]'],
                                        defaults=SegmentationTask.defaults))
    with pytest.raises(ConfigError, match='2 weights but the data has 3 classes'):
        task.bind_data(None)


def test_digit_on_photo_renders_pretraining_digits_like_the_scenes():
    """The pretraining composer paints the thresholded ink in one colour contrasting with the photo piece."""
    ink = torch.zeros(1, 32, 32)
    ink[0, 6:26, 12:20] = 1.0
    ink[0, 6:26, 20] = 0.3                         # below the 0.4 threshold: not painted
    compose = DigitOnPhoto(('camera', 'coffee'), seed=0)
    for _ in range(4):
        img = compose(ink)
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        painted = img[:, 6:26, 12:20].reshape(3, -1)
        assert (painted == painted[:, :1]).all()    # one flat colour
        rest = torch.cat([img[:, :, :12].reshape(3, -1), img[:, :, 21:].reshape(3, -1)], 1)
        assert abs(float(painted.mean()) - float(rest.mean())) > 0.1
    digits = np.zeros((2, 8, 8))
    digits[:, 2:6, 3:5] = 16
    train = DigitsDataset(digits, np.array([1, 2]), train=True, compose=compose)
    test = DigitsDataset(digits, np.array([1, 2]), train=False, compose=compose)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and y == 1
    assert not (torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]))   # painted in colour on a photo
    xt, _ = test[0]
    assert torch.equal(xt[0], xt[1]) and torch.equal(xt[1], xt[2])   # held-out digits stay plain grey
