"""Detection task: COCO data hygiene, category mapping, COCOeval, training, resume, CLI, predict."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from emov2.cli import app
from emov2.cli import detect as detect_cli  # registers `emov2 detect` (until emov2.cli imports it)
from emov2.detection.data import CocoDetection, collate_detection, detection_transforms
from emov2.detection.demo import make_digit_scenes
from emov2.detection.predict import predict_detections
from emov2.detection.task import DetectionTask, coco_evaluate, to_coco_results
from emov2.train import Trainer, load_config
from emov2.train.config import ConfigError


def _write_png(path: Path, w: int = 40, h: int = 30) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture()
def messy_coco(tmp_path):
    """Images: good, missing, corrupt, without annotations; boxes: fine, degenerate, partly and fully
    outside the image, crowd, unknown category. Category ids are not contiguous."""
    img = tmp_path / 'images'
    img.mkdir()
    _write_png(img / 'good.png')
    _write_png(img / 'empty.png')
    (img / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    images = [{'id': 1, 'file_name': 'good.png', 'width': 40, 'height': 30},
              {'id': 2, 'file_name': 'missing.png', 'width': 40, 'height': 30},
              {'id': 3, 'file_name': 'corrupt.png', 'width': 40, 'height': 30},
              {'id': 4, 'file_name': 'empty.png', 'width': 40, 'height': 30}]
    anns = [
        {'id': 1, 'image_id': 1, 'category_id': 90, 'bbox': [2, 3, 10, 8]},  # fine
        {'id': 2, 'image_id': 1, 'category_id': 7, 'bbox': [30, 20, 20, 20]},  # partly outside: clipped
        {'id': 3, 'image_id': 1, 'category_id': 7, 'bbox': [5, 5, 0, 6]},  # zero width: dropped
        {'id': 4, 'image_id': 1, 'category_id': 3, 'bbox': [50, 40, 5, 5]},  # fully outside: dropped
        {'id': 5, 'image_id': 1, 'category_id': 3, 'bbox': [1, 1, 20, 20], 'iscrowd': 1},  # crowd
        {'id': 6, 'image_id': 1, 'category_id': 55, 'bbox': [1, 1, 5, 5]},  # unknown category
        {'id': 7, 'image_id': 3, 'category_id': 3, 'bbox': [1, 1, 5, 5]},
        {'id': 8, 'image_id': 2, 'category_id': 3, 'bbox': [1, 1, 5, 5]},
    ]
    cats = [{'id': 90, 'name': 'ninety'}, {'id': 7, 'name': 'seven'}, {'id': 3, 'name': 'three'}]
    ann = tmp_path / 'instances.json'
    ann.write_text(json.dumps({'images': images, 'annotations': anns, 'categories': cats}))
    return img, ann


def test_dataset_skips_and_counts_bad_data(messy_coco):
    img, ann = messy_coco
    ds = CocoDetection(img, ann, detection_transforms('retinanet', False))
    s = ds.stats
    assert (s['images'], s['missing_images'], s['degenerate_boxes'], s['crowd_boxes'], s['unknown_category']) == \
        (3, 1, 2, 1, 1)
    assert ds.classes == ['three', 'seven', 'ninety']  # sorted by category id
    samples = [ds[i] for i in range(len(ds))]
    images, targets, skipped = collate_detection(samples)
    assert skipped == 1 and len(images) == 2  # the corrupt file is dropped and counted, never fatal
    good = next(t for t in targets if t['image_id'] == 1)
    assert good['boxes'].tolist() == [[2, 3, 12, 11], [30, 20, 40, 30]]  # second one clipped to 40x30
    assert [ds.category_id(int(lab)) for lab in good['labels']] == [90, 7]
    empty = next(t for t in targets if t['image_id'] == 4)
    assert empty['boxes'].shape == (0, 4) and images[0].dtype == torch.float32
    dropped = CocoDetection(img, ann, keep_empty=False)
    assert dropped.stats['empty_images'] == 1 and len(dropped) == 2


def test_category_mapping_round_trip(messy_coco):
    img, ann = messy_coco
    ds = CocoDetection(img, ann, masks=True)
    assert ds.category_ids == [3, 7, 90] and ds.label_of == {3: 0, 7: 1, 90: 2}
    for offset in (0, 1):  # RetinaNet (no background) and SSD / Mask R-CNN (background 0)
        out = {'boxes': torch.tensor([[0., 0., 4., 4.], [1., 1., 3., 5.]]),
               'labels': torch.tensor([2, 0]) + offset, 'scores': torch.tensor([0.9, 0.5]),
               'masks': torch.ones(2, 1, 30, 40)}
        res = to_coco_results(out, 1, ds.category_ids, offset)
        assert [r['category_id'] for r in res] == [90, 3]
        assert res[1]['bbox'] == [1.0, 1.0, 2.0, 4.0] and res[0]['segmentation']['size'] == [30, 40]
    # a validation set takes the training set's label order, whatever its own categories
    val = CocoDetection(img, ann, category_ids=[90, 3, 7])
    assert val.label_of == {90: 0, 3: 1, 7: 2}
    # masks come from the annotations (boxes without outline: box masks)
    _, t = ds[0]
    assert t['masks'].shape == (2, 30, 40) and int(t['masks'][0].sum()) == 10 * 8


def test_coco_eval_perfect_and_shifted(tmp_path):
    paths = make_digit_scenes(tmp_path, n_train=1, n_val=6, size=64, seed=3)
    ds = CocoDetection(paths['val_images'], paths['val_annotations'])
    gt = [a for a in ds.coco.dataset['annotations']]
    assert len(gt) >= 4
    perfect = [{'image_id': a['image_id'], 'category_id': a['category_id'], 'bbox': a['bbox'], 'score': 1.0,
                'segmentation': a['segmentation']} for a in gt]
    m = coco_evaluate(ds.coco, perfect, ds.ids, ('bbox', 'segm'))
    assert m['bbox_AP'] == pytest.approx(1.0) and m['segm_AP'] == pytest.approx(1.0)
    assert set(m) == {f'{t}_{k}' for t in ('bbox', 'segm') for k in
                      ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')}
    shifted = [{**p, 'bbox': [p['bbox'][0] + 0.25 * p['bbox'][2], p['bbox'][1], p['bbox'][2], p['bbox'][3]]}
               for p in perfect]
    s = coco_evaluate(ds.coco, shifted, ds.ids, ('bbox',))
    assert 0.0 < s['bbox_AP'] < 0.9 and s['bbox_AP50'] == pytest.approx(1.0)
    assert coco_evaluate(ds.coco, [], ds.ids)['bbox_AP'] == 0.0


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    return make_digit_scenes(tmp_path_factory.mktemp('scenes'), n_train=8, n_val=3, size=64, seed=1)


def _cfg(scenes, out, **extra):
    over = [f'detection.{k}={v}' for k, v in scenes.items()] + [
        'model.name=emov2_1m', 'detection.kind=ssdlite', 'detection.image_size=64', 'optim.batch_size=4',
        'optim.lr=0.003', 'optim.clip_grad=1.0', 'sched.epochs=2', 'sched.warmup_epochs=0', 'data.workers=0',
        'eval.batch_size=4', 'train.amp=false', 'train.progress=false', f'train.out={out}']
    return load_config(None, over + [f'{k}={v}' for k, v in extra.items()], defaults=DetectionTask.defaults)


def test_short_run_lowers_loss(scenes, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(scenes, tmp_path / 'run', **{'detection.zoom_out': 1.0})
    task = DetectionTask(cfg)
    train, _ = task.build_datasets(cfg)
    task.bind_data(train)
    model = task.build_model(cfg).train()
    images, targets, _ = task.collate([train[i] for i in range(4)])
    images, targets = task.to_device(images, targets, torch.device('cpu'), False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(10):
        loss, parts = task.loss(model, images, targets)
        assert set(parts) == {'bbox_regression', 'classification'}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.95 * losses[0] and losses[-1] < min(losses[:3]), losses  # 12.2 -> 11.2 in 6 steps here


@pytest.fixture(scope='module')
def trained_run(scenes, tmp_path_factory):
    """A 2-epoch SSDLite run stopped after its first step and resumed to the end."""
    out = tmp_path_factory.mktemp('detrun')
    bn = {'eval.precise_bn_images': 4}  # SSDLite's norms train: forward_for_bn runs too
    cfg = _cfg(scenes, out, **{'train.stop_after_steps': 1}, **bn)
    first = Trainer(cfg, task=DetectionTask(cfg)).fit()
    cfg = _cfg(scenes, out, **bn)
    second = Trainer(cfg, task=DetectionTask(cfg), resume='auto').fit()
    return out, first, second


def test_resume_works(trained_run):
    out, first, second = trained_run
    assert first.stopped_early and first.global_step == 1
    assert not second.stopped_early and second.global_step == 4 and second.epochs_done == 2
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in log] == [0, 1]
    assert all('val_bbox_AP' in r and 'train_classification' in r for r in log)
    meta = json.loads((out / 'last' / 'metrics.json').read_text())
    assert 'val_bbox_AP75' in meta and (out / 'curves.png').is_file()


def test_resume_refuses_another_ssdlite_norm(trained_run, scenes):
    out, _, _ = trained_run
    cfg = _cfg(scenes, out, **{'eval.precise_bn_images': 4, 'detection.ssdlite_norm': 'gn'})
    with pytest.raises(ConfigError, match='detection.ssdlite_norm'):
        Trainer(cfg, task=DetectionTask(cfg), resume='auto').fit()


def test_predict_writes_json_and_png(trained_run, scenes, tmp_path):
    out, _, _ = trained_run
    imgs = sorted(str(p) for p in Path(scenes['val_images']).glob('*.png'))[:2]
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'nope')
    res = predict_detections(imgs + [str(bad)], str(out), str(tmp_path / 'pred'), score_thresh=0.0)
    assert 'error' in res[-1] and all('detections' in r for r in res[:2])
    saved = json.loads((tmp_path / 'pred' / 'predictions.json').read_text())
    assert saved['class_names'] == [str(i) for i in range(10)] and len(saved['results']) == 3
    d = res[0]['detections']
    assert d and {'box', 'label', 'class_name', 'category_id', 'score'} <= set(d[0])
    assert d[0]['category_id'] == d[0]['label'] + 1  # the demo's ids are digit + 1
    png = Image.open(res[0]['drawn'])
    assert png.size[0] >= 64 * 4  # small images are drawn enlarged
    r = CliRunner().invoke(app, ['detect', 'predict', imgs[0], str(bad), '--checkpoint', str(out),
                                 '--out', str(tmp_path / 'cli')])
    assert r.exit_code == 1 and (tmp_path / 'cli' / 'predictions.json').is_file()


def _squares(folder: Path, n: int = 64, size: int = 64, seed: int = 0):
    """``n`` noisy grey images with one red (category id 9) or blue (id 5) square of 21-32 px each, as COCO."""
    rng = np.random.default_rng(seed)
    (folder / 'img').mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        img = rng.normal(100, 15, (size, size, 3))
        cat = (9, 5)[i % 2]
        s = int(rng.integers(size // 3, size // 2 + 1))
        x, y = (int(v) for v in rng.integers(0, size - s + 1, 2))
        img[y:y + s, x:x + s] = (230, 40, 40) if cat == 9 else (40, 80, 230)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / 'img' / f'{i}.png')
        images.append({'id': i + 1, 'file_name': f'{i}.png', 'width': size, 'height': size})
        anns.append({'id': i + 1, 'image_id': i + 1, 'category_id': cat, 'bbox': [x, y, s, s]})
    ann = folder / 'squares.json'
    ann.write_text(json.dumps({'images': images, 'annotations': anns,
                               'categories': [{'id': 9, 'name': 'red'}, {'id': 5, 'name': 'blue'}]}))
    return folder / 'img', ann


def test_trivial_case_learns(tmp_path):
    """Red and blue squares on grey noise, trained by the task and trainer (SSDLite, GroupNorm head, a
    shallow EMOv2-1M, flips only) and scored by COCOeval on the same images: box AP far above zero,
    where the untrained detector scores ~0. Catches label / category-id / box-coordinate mistakes and
    the BatchNorm failure of docs/DETECTION.md (with ``ssdlite_norm=bn`` this run stays far lower)."""
    img, ann = _squares(tmp_path / 'data')
    cfg = load_config(None, [
        f'detection.train_images={img}', f'detection.train_annotations={ann}', f'detection.val_images={img}',
        f'detection.val_annotations={ann}', 'model.name=emov2_1m', 'model.kwargs={"depths": [1, 1, 1, 1]}',
        'detection.kind=ssdlite', 'detection.ssdlite_norm=gn', 'detection.image_size=64', 'optim.batch_size=8',
        'optim.lr=0.005', 'sched.epochs=10', 'sched.warmup_epochs=1', 'eval.every=0', 'data.workers=0',
        'eval.precise_bn_images=64',  # the trainer's precise BN: backbone BN statistics of the final weights
        'train.amp=false', 'train.progress=false', f'train.out={tmp_path / "run"}'], defaults=DetectionTask.defaults)
    torch.manual_seed(0)
    task = DetectionTask(cfg)
    clean = CocoDetection(img, ann, detection_transforms('ssdlite', False))
    flips = CocoDetection(img, ann, detection_transforms('retinanet', True))  # horizontal flips only
    loader = DataLoader(clean, batch_size=32, collate_fn=task.collate)
    task.bind_data(flips)
    untrained = task.evaluate(task.build_model(cfg), loader, torch.device('cpu'))['bbox_AP']
    trainer = Trainer(cfg, flips, clean, task=task)
    trainer.fit()
    m = task.evaluate(trainer.model, loader, torch.device('cpu'))
    assert untrained < 0.05 and m['bbox_AP'] > 0.3 and m['bbox_AP50'] > 0.6, (untrained, m)
    assert task.category_ids == [5, 9] and task.class_names == ['blue', 'red']


def test_cli_missing_annotations_exit_2(tmp_path):
    assert {c.name for c in detect_cli.detect_app.registered_commands} == {'train', 'eval', 'predict', 'demo'}
    r = CliRunner().invoke(app, ['detect', 'train', '--data', str(tmp_path), '--out', str(tmp_path / 'o'),
                                 '--kind', 'ssdlite', '--backbone', 'emov2_1m'])
    assert r.exit_code == 2 and 'annotation file not found' in r.output
    assert not (tmp_path / 'o').exists()  # nothing written for bad input
    r = CliRunner().invoke(app, ['detect', 'train', '--data', str(tmp_path), '--kind', 'yolo'])
    assert r.exit_code == 2 and 'detection.kind must be one of' in r.output
    r = CliRunner().invoke(app, ['detect', 'eval', '--checkpoint', str(tmp_path), '--images', str(tmp_path),
                                 '--annotations', str(tmp_path / 'x.json')])
    assert r.exit_code == 2 and 'error' in r.output
