"""``emov2 eval / predict / demo / train --pretrained``: the user-facing commands end to end."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import save_file
import torch
from typer.testing import CliRunner

from emov2.checkpoint import read_state_dict
from emov2.cli import app
from emov2.train import Trainer
from emov2.train.inference import eval_transform, imagenet_class_names, load_model
from emov2.train.modeling import build_model
from emov2.train.data import SafeImageFolder
from emov2.train.testing import TINY_MODEL_KWARGS, make_image_folder, tiny_config

CLASSES = ('ant', 'bee', 'cat', 'dog', 'eel', 'fox')
runner = CliRunner()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli')
    make_image_folder(root / 'data' / 'train', classes=CLASSES, per_class=4)
    make_image_folder(root / 'data' / 'val', classes=CLASSES, per_class=2, seed=1)
    cfg = tiny_config(root / 'run', num_classes=len(CLASSES), overrides=[f'data.root={root / "data"}'])
    Trainer(cfg).fit()
    return root


def test_eval_reports_model_and_ema(trained):
    ckpt = trained / 'run' / 'last' / 'model.safetensors'
    res = runner.invoke(app, ['eval', '--checkpoint', str(ckpt), '--data', str(trained / 'data'),
                              '--workers', '0', '--json'])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r['variant'] == 'emov2_1m' and r['model']['n'] == 12 and r['ema']['n'] == 12
    assert r['model']['top5'] >= r['model']['top1']
    # the same numbers by hand
    net, meta = load_model(str(ckpt))
    ds = SafeImageFolder(str(trained / 'data' / 'val'), eval_transform(net, meta=meta))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        logits = net(x)
    top1 = float((logits.argmax(-1) == y).float().mean() * 100)
    top5 = float((logits.topk(5).indices == y[:, None]).any(1).float().mean() * 100)
    assert r['model']['top1'] == pytest.approx(top1) and r['model']['top5'] == pytest.approx(top5)
    assert meta['class_names'] == list(CLASSES) and meta['img_size'] == 32


def test_predict_uses_the_fine_tuned_class_names(trained, tmp_path):
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'garbage')
    img = trained / 'data' / 'val' / 'cat' / '000.png'
    res = runner.invoke(app, ['predict', str(img), str(bad), '--checkpoint',
                              str(trained / 'run' / 'best'), '--json'])
    assert res.exit_code == 1, res.output  # one image was unreadable: reported, the other predicted
    out = json.loads(res.output)
    assert len(out[0]['top']) == 5 and all(name in CLASSES for name, _ in out[0]['top'])
    probs = [p for _, p in out[0]['top']]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    assert 'error' in out[1]  # an unreadable image is reported, not fatal


def test_predict_with_official_style_checkpoint_gives_imagenet_names(tmp_path):
    import emov2
    net = emov2.create_model('emov2_1m')
    torch.save({'net': net.state_dict(), 'net_E': net.state_dict()}, tmp_path / 'official.pth')
    make_image_folder(tmp_path / 'imgs', classes=('a',), per_class=1)
    res = runner.invoke(app, ['predict', str(tmp_path / 'imgs' / 'a' / '000.png'), '--model', 'emov2_1m',
                              '--checkpoint', str(tmp_path / 'official.pth'), '--ema', '--json'])
    assert res.exit_code == 0, res.output
    names = set(imagenet_class_names())
    top = json.loads(res.output)[0]['top']
    assert len(top) == 5 and all(n in names for n, _ in top)


def test_fine_tune_with_new_head(trained, tmp_path):
    ckpt = trained / 'run' / 'last' / 'model.safetensors'
    cfg = tiny_config(tmp_path, num_classes=3, overrides=[f'model.pretrained={ckpt}'])
    with pytest.warns(UserWarning, match='head'):
        model = build_model(cfg)
    sd, _ = read_state_dict(ckpt)
    own = model.state_dict()
    assert own['head.weight'].shape[0] == 3 and sd['head.weight'].shape[0] == len(CLASSES)
    assert all(torch.equal(own[k], v) for k, v in sd.items() if not k.startswith('head.'))
    res = runner.invoke(app, ['train', '--data', str(trained / 'data'), '--out', str(tmp_path / 'ft'),
                              '--pretrained', str(ckpt), '--num-classes', '6',
                              f'model.kwargs={json.dumps(TINY_MODEL_KWARGS)}', 'data.img_size=32',
                              'data.workers=0', 'optim.batch_size=8', 'sched.epochs=1', 'sched.warmup_epochs=0',
                              'train.amp=true', 'train.progress=false', 'train.device=cpu'])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (tmp_path / 'ft' / 'log.jsonl').read_text().splitlines()]
    assert len(log) == 1 and log[0]['val_images'] == 12


def test_demo_writes_its_report(tmp_path):
    res = runner.invoke(app, ['demo', '--out', str(tmp_path / 'demo'), '--epochs', '1', '--subset', '200',
                              '--no-progress'])
    assert res.exit_code == 0, res.output
    for name in ('curves.png', 'confusion_matrix.png', 'samples.png', 'metrics.json', 'last/model.safetensors'):
        assert (tmp_path / 'demo' / name).stat().st_size > 0, name
    m = json.loads((tmp_path / 'demo' / 'metrics.json').read_text())
    assert m['test_images'] == 40 and 0.0 <= m['test_top1'] <= 100.0 and m['epochs'] == 1
    assert len(m['per_class_accuracy']) == 10 and all(0 <= v <= 100 for v in m['per_class_accuracy'].values())
    # the saved weights, read back through `emov2 eval` with the preprocessing they record, score what
    # the demo reported on its held-out digits (written as PNG class folders)
    res = runner.invoke(app, ['eval', '--checkpoint', str(tmp_path / 'demo' / 'last'), '--data',
                              str(tmp_path / 'demo' / 'test_images'), '--workers', '0', '--json'])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r['model']['n'] == 40 and abs(r['model']['top1'] - m['test_top1']) <= 100 / 40 + 1e-9
    # a second demo into the same folder is refused (nothing is lost)
    res = runner.invoke(app, ['demo', '--out', str(tmp_path / 'demo'), '--epochs', '1', '--subset', '200',
                              '--no-progress'])
    assert res.exit_code == 2 and 'already holds a run' in res.output


def test_eval_scores_a_partial_val_folder_by_class_name(trained, tmp_path):
    ckpt = trained / 'run' / 'last'
    for name in ('cat', 'fox'):  # 2 of the 6 classes, so sorted positions would be 0 and 1
        shutil.copytree(trained / 'data' / 'val' / name, tmp_path / 'val' / name)
    net, meta = load_model(str(ckpt))
    ds = SafeImageFolder(str(trained / 'data' / 'val'), eval_transform(net, meta=meta))
    with torch.no_grad():
        pred = {ds.samples[i][0].split('/')[-2] + ds.samples[i][0][-8:]: int(net(ds[i][0][None]).argmax())
                for i in range(len(ds))}
    truth = {'cat': 2, 'fox': 5}
    expected = 100 * sum(pred[k] == truth[k[:3]] for k in pred if k[:3] in truth) / 4
    res = runner.invoke(app, ['eval', '--checkpoint', str(ckpt), '--data', str(tmp_path / 'val'), '--workers', '0',
                              '--json'])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)['model']['top1'] == pytest.approx(expected)
    (tmp_path / 'val' / 'fox').rename(tmp_path / 'val' / 'wolf')
    res = runner.invoke(app, ['eval', '--checkpoint', str(ckpt), '--data', str(tmp_path / 'val'), '--workers', '0'])
    assert res.exit_code == 2 and "does not know: 'wolf'" in res.output


def test_clear_errors_without_tracebacks(trained, tmp_path):
    ckpt = str(trained / 'run' / 'last')
    data = str(trained / 'data')
    img = str(trained / 'data' / 'val' / 'cat' / '000.png')
    bad_meta = tmp_path / 'bad.safetensors'
    save_file({'w': torch.zeros(1)}, str(bad_meta), metadata={'emov2': '{not json'})
    cases = [
        (['eval', '--checkpoint', str(tmp_path / 'missing.safetensors'), '--data', data], 2, 'checkpoint not found'),
        (['eval', '--checkpoint', str(tmp_path), '--data', data], 2, 'folder without a checkpoint'),
        (['eval', '--checkpoint', str(bad_meta), '--data', data], 2, 'bad.safetensors'),
        (['eval', '--checkpoint', ckpt, '--data', str(tmp_path / 'nowhere')], 2, 'data folder not found'),
        (['predict', img, '--checkpoint', ckpt, '--topk', '-1'], 2, '--topk'),
        (['predict', str(tmp_path / 'missing.jpg'), '--checkpoint', ckpt], 1, 'missing.jpg'),
        (['predict', img, '--checkpoint', ckpt, '--model', 'emov2_1mm'], 2, 'did you mean emov2_1m'),
        (['train', '--data', data, 'optim.batch_size=abc'], 2, 'optim.batch_size must be an integer'),
        (['train', '--data', data, 'model.name=emov2_2mm'], 2, 'did you mean emov2_2m'),
        (['train', '--data', data, '--out', str(trained / 'data' / 'val' / 'cat' / '000.png' / 'run')], 2,
         'is a file'),
    ]
    if not torch.cuda.is_available():
        cases.append((['eval', '--checkpoint', ckpt, '--data', data, '--device', 'cuda'], 2, 'no CUDA device'))
    for args, code, text in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == code, (args, res.output)
        assert text in ' '.join(res.output.split()), (args, res.output)
        assert 'Traceback' not in res.output, args
