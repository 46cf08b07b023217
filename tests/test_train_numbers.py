"""Right numbers: evaluation right from the first epoch, a recipe that survives Pillow 13, the head
size from the data, labels matched by class name."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from emov2.checkpoint import read_metadata
from emov2.train import Trainer, load_config
from emov2.train.config import ConfigError
from emov2.train.data import SafeImageFolder, build_transforms, posterize
from emov2.train.demo import DEMO_MODEL_KWARGS, DigitsDataset, demo_config, load_digits_split
from emov2.train.testing import RandomImages, make_image_folder, tiny_config


def test_eval_accuracy_matches_train_accuracy_from_the_first_epoch(tmp_path):
    """~100 steps on real digits: the eval-mode model and its EMA score like the train-mode model.

    Without precise BatchNorm statistics and the EMA warm-up, eval mode predicts one class here
    (val ~10%, the EMA at 0.9998 never leaves its initial weights) while train accuracy is ~80%.
    """
    tx, ty, vx, vy = load_digits_split(subset=1000)
    cfg = demo_config(str(tmp_path / 'run'), epochs=2, batch_size=16, overrides=[
        'ema.decay=0.9998', 'train.progress=false', 'sched.warmup_epochs=1'])
    assert cfg['model']['kwargs'] == DEMO_MODEL_KWARGS
    Trainer(cfg, DigitsDataset(tx, ty, train=True), DigitsDataset(vx, vy, train=False),
            class_names=[str(i) for i in range(10)]).fit()
    log = [json.loads(x) for x in (tmp_path / 'run' / 'log.jsonl').read_text().splitlines()]
    assert log[-1]['step'] == 100
    for rec in log:
        assert rec['val_top1'] >= rec['train_top1'] - 10, rec
    assert log[-1]['train_top1'] > 60 and log[-1]['val_top1'] > 60
    assert log[-1]['ema_val_top1'] >= log[-1]['val_top1'] - 15  # the EMA follows the weights


def test_paper_recipe_augmentation_survives_4000_draws():
    cfg = load_config('configs/emov2_1m.yaml', ['data.img_size=32'])
    train_tf, _ = build_transforms(cfg, (0.5,) * 3, (0.5,) * 3)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    calls = []
    ra = next(t for t in train_tf.transforms if type(t).__name__ == 'RandAugment')
    for op in ra.ops:
        if op.name == 'PosterizeIncreasing':
            inner = op.aug_fn
            op.aug_fn = lambda im, bits, _f=inner, **kw: calls.append(bits) or _f(im, bits, **kw)
    for _ in range(4000):
        assert train_tf(img).shape == (3, 32, 32)
    assert calls and min(calls) == 0  # magnitude 10 was drawn and posterize kept 0 bits


def test_augmix_policy_gets_the_safe_posterize_too():
    cfg = load_config(None, ['data.img_size=32', 'aug.auto_augment=augmix-m10-w3'])
    train_tf, _ = build_transforms(cfg, (0.5,) * 3, (0.5,) * 3)
    fns = [op.aug_fn for t in train_tf.transforms for op in getattr(t, 'ops', ()) if 'Posterize' in op.name]
    assert fns and all(fn is posterize for fn in fns)


def test_posterize_to_zero_bits_is_black_like_older_pillow():
    img = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    try:
        ImageOps.posterize(img, 0)
        raised = False
    except ValueError:
        raised = True
    out = np.asarray(posterize(img, 0))
    assert out.max() == 0 and out.shape == (4, 4, 3)
    assert np.array_equal(np.asarray(posterize(img, 4)), np.asarray(ImageOps.posterize(img, 4)))
    assert raised or Image.__version__ < '13'  # the crash this guards against is real on Pillow >= 13


def test_head_size_comes_from_the_class_folders(tmp_path):
    make_image_folder(tmp_path / 'data' / 'train', classes=('a', 'b', 'c'), per_class=4)
    cfg = tiny_config(tmp_path / 'run', overrides=[f'data.root={tmp_path / "data"}', 'model.num_classes=null',
                                                   'sched.epochs=1'])
    t = Trainer(cfg)
    t.fit()
    assert t.model.num_classes == 3 and t.model.head.out_features == 3
    bad = tiny_config(tmp_path / 'run2', num_classes=5, overrides=[f'data.root={tmp_path / "data"}'])
    with pytest.raises(ValueError, match='has 3 classes.*model.num_classes is 5'):
        Trainer(bad).fit()
    assert not (tmp_path / 'run2' / 'log.jsonl').exists()  # failed before training
    for n in ('0', '-2', 'abc'):
        with pytest.raises(ConfigError, match='model.num_classes'):
            load_config(None, [f'model.num_classes={n}'])


def test_typed_config_errors_name_the_key():
    with pytest.raises(ConfigError, match='optim.batch_size must be an integer'):
        load_config(None, ['optim.batch_size=abc'])
    with pytest.raises(ConfigError, match='model.window_size must be an integer >= 1'):
        load_config(None, ['model.window_size=0'])
    assert load_config(None, ['optim.lr=1e9'])['optim']['lr'] == 1e9  # YAML 1.1 reads 1e9 as text


def test_validation_folders_are_labelled_by_class_name(tmp_path):
    make_image_folder(tmp_path / 'val', classes=('cat', 'eel'), per_class=1)
    ds = SafeImageFolder(str(tmp_path / 'val'), class_names=['ant', 'bee', 'cat', 'dog', 'eel'])
    assert sorted({t for _, t in ds.samples}) == [2, 4]
    with pytest.raises(ValueError, match="does not know: 'eel'"):
        SafeImageFolder(str(tmp_path / 'val'), class_names=['ant', 'cat'])


def test_training_data_size_check_uses_list_labels(tmp_path):
    make_image_folder(tmp_path / 'imgs', classes=('a',), per_class=8)
    (tmp_path / 'train.txt').write_text(''.join(f'a/{i:03d}.png {i % 4}\n' for i in range(8)))
    cfg = tiny_config(tmp_path / 'run', num_classes=3, overrides=[
        f'data.root={tmp_path / "imgs"}', f'data.train_list={tmp_path / "train.txt"}'])
    with pytest.raises(ValueError, match='labels up to 3 but model.num_classes is 3'):
        Trainer(cfg).fit()


def test_checkpoints_record_the_preprocessing(tmp_path):
    cfg = tiny_config(tmp_path / 'run', overrides=['data.mean=[0.5, 0.5, 0.5]', 'data.std=[0.25, 0.25, 0.25]',
                                                   'eval.interpolation=bilinear', 'eval.crop_pct=1.0',
                                                   'train.stop_after_steps=1'])
    Trainer(cfg, RandomImages(48), RandomImages(16, augment=False)).fit()
    meta = read_metadata(tmp_path / 'run' / 'last' / 'model.safetensors')
    assert (meta['mean'], meta['std'], meta['interpolation'], meta['crop_pct'], meta['img_size']) == \
        ([0.5] * 3, [0.25] * 3, 'bilinear', 1.0, 32)
    assert meta['class_names'] == [f'class{i}' for i in range(4)] and meta['num_classes'] == 4
