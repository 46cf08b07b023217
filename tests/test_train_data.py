"""Config handling, datasets (corrupt images, list files) and the resumable sampler."""
from __future__ import annotations

import pytest
import torch

from emov2.train import Trainer, load_config
from emov2.train.config import ConfigError, scaled_lrs
from emov2.train.data import ListDataset, ResumableSampler, SafeImageFolder, collate_skip
from emov2.train.testing import make_image_folder, tiny_config


def test_paper_recipe_values():
    cfg = load_config('configs/emov2_5m.yaml')
    assert cfg['model']['name'] == 'emov2_5m' and cfg['model']['drop_path_rate'] is None
    o, s = cfg['optim'], cfg['sched']
    assert (o['name'], tuple(o['betas']), o['eps'], o['weight_decay']) == ('adamw', (0.9, 0.999), 1e-8, 0.05)
    assert (o['batch_size'], o['clip_grad'], o['label_smoothing']) == (1024, 5.0, 0.1)
    assert (s['epochs'], s['warmup_epochs']) == (300, 20)
    assert scaled_lrs(cfg) == pytest.approx({'lr': 3e-3, 'warmup_lr': 1e-6, 'min_lr': 1e-6})
    assert cfg['aug']['auto_augment'] == 'rand-m9-mstd0.5-inc1' and cfg['aug']['re_prob'] == 0.0
    assert cfg['ema']['decay'] == 0.9998 and cfg['eval']['crop_pct'] == 0.875
    hi = load_config('configs/emov2_5m_512.yaml')
    assert (hi['data']['img_size'], hi['model']['window_size']) == (512, 8)
    kd = load_config('configs/emov2_1m_kd.yaml', ['kd.teacher_checkpoint=t.pth'])
    assert (kd['kd']['tau'], kd['kd']['weight'], kd['model']['name']) == (1.0, 5.0, 'emov2_1m')


def test_overrides_are_typed_and_typos_fail():
    cfg = load_config('configs/emov2_1m.yaml', ['optim.batch_size=256', 'model.kwargs={depths: [1, 1, 1, 1]}',
                                                'data.root=null', 'aug.scale=[0.5, 1.0]'])
    assert cfg['optim']['batch_size'] == 256 and cfg['model']['kwargs'] == {'depths': [1, 1, 1, 1]}
    assert scaled_lrs(cfg)['lr'] == pytest.approx(1.5e-3 * 256 / 512)
    with pytest.raises(ConfigError, match='optim.lrr'):
        load_config(None, ['optim.lrr=1'])
    with pytest.raises(ConfigError, match='teacher_checkpoint'):
        load_config('configs/emov2_1m_kd.yaml')  # KD without teacher weights: nothing is downloaded


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    bad = make_image_folder(tmp_path / 'data' / 'train', classes=('a', 'b'), per_class=7, corrupt=('b',))
    make_image_folder(tmp_path / 'data' / 'val', classes=('a', 'b'), per_class=2, corrupt=('a',))
    ds = SafeImageFolder(str(tmp_path / 'data' / 'train'))
    idx = [i for i, (p, _) in enumerate(ds.samples) if p == str(bad[0])][0]
    assert ds[idx] is None and ds[0] is not None
    images, targets, skipped = collate_skip([None, (torch.zeros(3, 2, 2), 1)])
    assert images.shape == (1, 3, 2, 2) and targets.tolist() == [1] and skipped == 1

    # 15 files, batch 5: three steps see every file once, the corrupt one included
    cfg = tiny_config(tmp_path / 'run', num_classes=2, overrides=[
        f'data.root={tmp_path / "data"}', 'optim.batch_size=5', 'sched.epochs=1', 'sched.warmup_epochs=0'])
    r = Trainer(cfg).fit()
    assert r.skipped_images == 1 and r.global_step == 3
    assert r.last_metrics['val_skipped'] == 1 and r.last_metrics['val_images'] == 4
    assert r.last_metrics['skipped_images'] == 1


def test_list_file_dataset(tmp_path):
    make_image_folder(tmp_path, classes=('a', 'b'), per_class=2)
    (tmp_path / 'list.txt').write_text('# path label\na/000.png 0\nb/001.png 1\n\nmissing.png 1\n')
    ds = ListDataset(str(tmp_path), str(tmp_path / 'list.txt'))
    assert len(ds) == 3 and ds.classes == ['0', '1']
    assert ds[1][1] == 1 and ds[2] is None  # a listed file that does not exist is skipped too


def test_sampler_shards_and_resumes():
    s0 = ResumableSampler(20, batch_size=3, rank=0, world=2, seed=1)
    s1 = ResumableSampler(20, batch_size=3, rank=1, world=2, seed=1)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == 9 and not set(a) & set(b)  # 10 per rank, cut to 3 full batches
    s0.set_epoch(0, start_batch=2)
    assert list(s0) == a[6:]
    s0.set_epoch(1)
    assert list(s0) != a
