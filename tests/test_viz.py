"""emov2.tools.viz and `emov2 viz`: shapes and ranges, maps that depend on the model, the spec's window
partitions, and the CLI writing its PNG and JSON files. Small inputs (64-160 px), each test a few seconds."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import emov2
from emov2.cli import app
from emov2.layers.window_attention import pad_to_window, window_partition, windowed_attention
from emov2.tools import viz as V

pytest.importorskip('skimage')
pytest.importorskip('pytorch_grad_cam')


@pytest.fixture(scope='module')
def photos():
    return [img for _, img in V.sample_images(['astronaut', 'coffee', 'chelsea'])]


def _model(name, seed=0, **switches):
    torch.manual_seed(seed)
    return emov2.create_model(name, **switches).eval()


# --- images and ERF ---------------------------------------------------------------------------------
def test_images_to_tensor_shapes(photos):
    x, arr = V.images_to_tensor(photos, 64)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    assert arr.shape == (3, 64, 64, 3) and arr.dtype == np.uint8
    assert torch.isfinite(x).all() and -3 < float(x.min()) and float(x.max()) < 3


def test_erf_shape_range_and_spread(photos):
    x, _ = V.images_to_tensor(photos[:2], 96)
    e = V.effective_receptive_field(_model('emov2_1m'), x, stage=2)
    assert e.shape == (96, 96) and (e >= 0).all()
    assert e.sum() == pytest.approx(1.0, rel=1e-4)
    s = V.erf_spread(e)
    assert 0 < s <= 1
    assert V.erf_spread(np.ones((10, 10))) == pytest.approx(0.9)
    point = np.zeros((10, 10))
    point[3, 4] = 1
    assert V.erf_spread(point) == pytest.approx(0.01)


def test_erf_of_one_block_and_bad_stage(photos):
    x, _ = V.images_to_tensor(photos[:1], 64)
    m = _model('emov2_1m')
    assert V.effective_receptive_field(m, x, stage=3, block=0).shape == (64, 64)
    with pytest.raises(ValueError, match='stage must be'):
        V.effective_receptive_field(m, x, stage=5)
    with pytest.raises(ValueError, match='blocks'):
        V.effective_receptive_field(m, x, stage=1, block=9)


def test_two_models_give_different_maps(photos):
    x, _ = V.images_to_tensor(photos[:2], 96)
    e1 = V.effective_receptive_field(_model('emov1_1m'), x)
    e2 = V.effective_receptive_field(_model('emov2_1m'), x)
    assert np.abs(e1 - e2).sum() > 0.1  # total variation distance of the two normalised maps
    cam1, _ = V.grad_cam(_model('emov1_1m'), x)
    cam2, _ = V.grad_cam(_model('emov2_1m'), x)
    assert cam1.shape == cam2.shape == (2, 96, 96)
    for c in (cam1, cam2):
        assert c.min() >= 0 and c.max() <= 1 and c.max() > 0.5
    assert np.abs(cam1 - cam2).mean() > 0.05


def test_spanning_erf_spreads_wider_than_neighbour_at_init(photos):
    """Stage 3 of EMOv2-1M at 160 px (10x10 map padded to 14x14, 2x2 windows of 7), the same backbone
    (same seed) with neighbour-only vs spanning attention, LayerScale gamma 1 (the built 1e-6 hides every
    residual branch: then all three give the same number). Measured: neighbour ~0.49-0.53, spanning ~0.69-0.72."""
    x, _ = V.images_to_tensor(photos, 160)
    spread = {}
    for mode in ('neighbour', 'spanning'):
        m = _model('emov2_1m', attention=mode)
        V.set_layer_scale(m, 1.0)
        spread[mode] = V.erf_spread(V.effective_receptive_field(m, x, stage=3))
    assert spread['spanning'] > spread['neighbour'] + 0.08, spread


# --- window partitions ----------------------------------------------------------------------------------
def _formula_masks(hp, wp, ws, qy, qx):
    """The spec's definition, written directly: the window (a, b) of each partition that holds (qy, qx)."""
    n1, n2 = hp // ws, wp // ws
    for a in range(n1):
        for b in range(n2):
            nb = {(a * ws + r, b * ws + c) for r in range(ws) for c in range(ws)}
            if (qy, qx) in nb:
                neighbour = nb
            ds = {(r * n1 + a, c * n2 + b) for r in range(ws) for c in range(ws)}
            if (qy, qx) in ds:
                distant = ds
    return neighbour, distant


def _layer_masks(hp, wp, ws, qy, qx):
    """The same windows as the layers cut them (window_partition of a map of pixel indices)."""
    idx = torch.arange(hp * wp, dtype=torch.float32).view(1, 1, hp, wp)
    out = {}
    for mode in ('neighbour', 'distant'):
        wins = window_partition(idx, [ws, ws], mode)[:, 0].long()  # (windows, w*w)
        row = [w for w in wins if int(qy * wp + qx) in w.tolist()][0]
        out[mode] = {(int(i) // wp, int(i) % wp) for i in row}
    return out['neighbour'], out['distant']


@pytest.mark.parametrize('size, stage, ws, query', [
    (224, 3, 7, None), (160, 3, 7, (150, 20)), (128, 3, 7, (127, 127)), (100, 2, 7, (5, 90)),
    (224, 4, 7, (0, 0)), (200, 3, 4, (199, 10)), (64, 1, 5, (33, 60)),
])
def test_window_masks_match_the_spec_definition(size, stage, ws, query):
    info = V.window_partition_masks(size, stage, ws, query)
    h, w = info['feature_size']
    hp, wp = info['padded_size']
    assert hp % ws == 0 and wp % ws == 0 and hp - h < ws and wp - w < ws
    qy, qx = info['query_cell']
    q = query or (size // 2, size // 2)
    assert (qy, qx) == (q[0] // info['stride'], q[1] // info['stride'])
    nb, ds = _formula_masks(hp, wp, ws, qy, qx)
    got_nb = {tuple(p) for p in np.argwhere(info['neighbour'])}
    got_ds = {tuple(p) for p in np.argwhere(info['distant'])}
    assert got_nb == nb and got_ds == ds
    assert (got_nb, got_ds) == _layer_masks(hp, wp, ws, qy, qx)
    assert len(got_nb) == len(got_ds) == ws * ws


def test_padded_case_marks_padding_cells():
    info = V.window_partition_masks(160, 3, 7, (150, 20))  # 10x10 map padded to 14x14
    assert info['feature_size'] == [10, 10] and info['padded_size'] == [14, 14]
    h, w = info['feature_size']
    for part in ('neighbour', 'distant'):
        m = info[part]
        assert m[h:, :].any() or m[:, w:].any()  # the window reaches into the zero padding


def test_feature_size_matches_the_model():
    m = _model('emov2_1m')
    for size in (64, 97, 130):
        feats = m.forward_intermediates(torch.zeros(1, 3, size, size), intermediates_only=True)
        assert [tuple(f.shape[-2:]) for f in feats] == [V.feature_size((size, size), s) for s in (1, 2, 3, 4)]


def test_attention_weights_are_those_of_the_layer(photos):
    """Per-head weights of the query reproduce the layer's output at the query (neighbour-only model)."""
    m = _model('emov2_1m', attention='neighbour')
    x, _ = V.images_to_tensor(photos[:1], 160)
    res = V.attention_weights_for_query(m, x, stage=3, query=(150, 20))
    for part in ('neighbour', 'distant'):
        wmap = res['weights'][part]
        assert wmap.sum() == pytest.approx(1.0, abs=1e-5)
        assert (wmap[~res[part]] == 0).all() and (wmap[res[part]] > 0).all()
    attn = m.stages[2][res['block']].mixer
    captured = {}
    hook = attn.register_forward_pre_hook(lambda mod, args: captured.__setitem__('x', args[0]))
    with torch.no_grad():
        m(x)
    hook.remove()
    with torch.no_grad():
        xp = pad_to_window(captured['x'], attn.window_size)
        qk, v = attn.qk(xp), attn.act(attn.v(xp))
        out = windowed_attention(qk, v, attn.window_size, attn.num_heads, ['neighbour'])[0]
    qy, qx = res['query_cell']
    hw = res['head_weights']['neighbour']  # (heads, Hp, Wp)
    dv = v.shape[1] // res['heads']
    expect = torch.cat([(torch.from_numpy(hw[h]) * v[0, h * dv:(h + 1) * dv]).sum((1, 2))
                        for h in range(res['heads'])])
    torch.testing.assert_close(out[:, qy, qx], expect, rtol=1e-4, atol=1e-5)


# --- frontier -----------------------------------------------------------------------------------------
def test_frontier_rows_from_paper_targets(tmp_path):
    bench = {'results': [{'model': 'emov2_1m', 'variant': 'deploy', 'backend': 'eager', 'precision': 'fp32',
                          'task': 'throughput', 'batch': 8, 'img_per_s': 123.0}]}
    (tmp_path / 'bench.json').write_text(json.dumps(bench))
    rows = V.frontier_data(measure=False, bench_json=tmp_path / 'bench.json')
    by = {r['name']: r for r in rows}
    assert by['emov2_5m']['top1'] == 79.4 and by['emov1_1m']['paper_params_m'] == 1.3
    assert by['emov2_1m']['img_s'] == 123.0 and 'deit_tiny' in by
    one = V.frontier_data(measure=True, models=['emov2_1m'])
    assert len(one) == 1 and one[0]['params_m'] == pytest.approx(1.461, abs=0.01)
    assert one[0]['mflops'] == pytest.approx(284.8, rel=0.01)
    png = V.plot_frontier(rows, tmp_path / 'f.png')
    assert png.stat().st_size > 10_000


# --- CLI ----------------------------------------------------------------------------------------------
runner = CliRunner()


def _ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res


def test_cli_cam(tmp_path):
    _ok(['viz', 'cam', '-m', 'emov1_1m', '-m', 'emov2_1m', '--size', '64', '--json', '--out', str(tmp_path)])
    assert (tmp_path / 'cam.png').stat().st_size > 10_000
    data = json.loads((tmp_path / 'cam.json').read_text())
    assert set(data['models']) == {'emov1_1m (init)', 'emov2_1m (init)'}
    assert np.asarray(data['models']['emov2_1m (init)']['cams']).shape == (4, 64, 64)


def test_cli_erf_compare(tmp_path):
    res = _ok(['viz', 'erf', '--compare', '--size', '64', '--json', '--out', str(tmp_path)])
    data = json.loads((tmp_path / 'erf_compare.json').read_text())
    assert len(data['runs']) == 4 and 'spanning' in res.output
    assert all(0 < r['spread90'] <= 1 for r in data['runs'].values())
    assert (tmp_path / 'erf_compare.png').stat().st_size > 10_000


def test_cli_windows_and_frontier(tmp_path):
    img = tmp_path / 'img.png'
    from skimage import data, io
    io.imsave(str(img), data.coffee()[:200, :200])
    _ok(['viz', 'windows', str(img), '--size', '96', '--stage', '3', '--json', '--out', str(tmp_path)])
    info = json.loads((tmp_path / 'windows.json').read_text())
    assert info['feature_size'] == [6, 6] and info['padded_size'] == [7, 7]
    assert (tmp_path / 'windows.png').is_file()
    _ok(['viz', 'frontier', '--no-measure', '--json', '--out', str(tmp_path)])
    assert (tmp_path / 'frontier.png').is_file() and json.loads((tmp_path / 'frontier.json').read_text())


@pytest.mark.parametrize('args, message', [
    (['viz', 'cam', '-m', 'emov2_1mm'], "did you mean 'emov2_1m'"),
    (['viz', 'cam', 'no/such.png'], 'image not found'),
    (['viz', 'erf', '--checkpoint', 'no/such.safetensors'], 'checkpoint not found'),
    (['viz', 'cam', '--method', 'magic'], 'unknown CAM method'),
])
def test_cli_clear_errors(tmp_path, args, message):
    res = runner.invoke(app, args + ['--out', str(tmp_path)])
    assert res.exit_code == 2 and 'Traceback' not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith('error:')]
    assert len(lines) == 1 and message in res.output, res.output


def test_frontier_peers_are_published_figures_with_sources(tmp_path):
    """The packaged peers (emov2/data/frontier_peers.json) name their source, carry plausible ImageNet
    figures, and become rows of their own family; a broken peers file is a clear error."""
    peers = V.frontier_peers()
    assert {'MobileNetV2', 'MobileNetV3', 'EfficientNet', 'MobileViT', 'EdgeNeXt'} <= {p['family'] for p in peers.values()}
    for key, p in peers.items():
        assert p['source'] and 0.5 < p['params'] < 30 and 60 < p['top1'] < 85, key
        assert p['flops'] is None or 20 < p['flops'] < 5000, key
    rows = V.frontier_data(measure=False)
    by = {r['name']: r for r in rows}
    assert by['edgenext_small']['family'] == 'EdgeNeXt' and by['edgenext_small']['paper_params_m'] == 5.6
    assert by['deit_tiny']['family'] == 'DeiT' and by['pvt_tiny']['family'] == 'PVT'
    assert all(r.get('peer') for r in rows if not r['family'].startswith('EMO'))
    only = V.frontier_data(measure=False, peers={})
    assert not any(r['name'] in peers for r in only) and len(only) == len(rows) - len(peers)
    bad = tmp_path / 'peers.json'
    bad.write_text(json.dumps({'peers': {'x': {'family': 'X'}}}))
    with pytest.raises(ValueError, match='lacks'):
        V.frontier_peers(bad)
    res = runner.invoke(app, ['viz', 'frontier', '--no-measure', '--peers', str(bad), '--out', str(tmp_path)])
    assert res.exit_code == 2 and 'lacks' in res.output and 'Traceback' not in res.output
    _ok(['viz', 'frontier', '--no-measure', '--no-peers', '--json', '--out', str(tmp_path)])
    assert not any(r['name'] in peers for r in json.loads((tmp_path / 'frontier.json').read_text()))


# --- CAM for detectors and segmenters ------------------------------------------------------------------
def test_detector_cam_explains_its_top_boxes(photos):
    """RetinaNet (pytorch-grad-cam's FasterRCNNBoxScoreTarget on the EMO backbone's last stage): maps in
    [0, 1] at the input size, the explained boxes are the detector's best-scoring ones, and an image with
    nothing to explain is a clear error."""
    torch.manual_seed(0)
    det, info = V.build_task_model('detect', 'retinanet', 'emov2_1m', num_classes=3, image_size=64)
    assert info['mean'] == (0.0, 0.0, 0.0) and info['label_offset'] == 0
    x, _ = V.images_to_tensor(photos[:1], 64, info['mean'], info['std'])
    maps, found = V.detector_cam(det, x, max_boxes=2)
    assert maps.shape == (1, 64, 64) and 0 <= maps.min() and maps.max() <= 1 and maps.max() > 0
    with torch.no_grad():
        ref = det(x)[0]
    np.testing.assert_allclose(found[0]['boxes'], ref['boxes'][:2].numpy())
    assert list(found[0]['scores']) == sorted(found[0]['scores'], reverse=True)
    with pytest.raises(ValueError, match='no detection'):
        V.detector_cam(det, x, score_thresh=1.5)


def test_segmenter_cam_targets_the_pixels_of_one_class(photos):
    """DeepLabv3 (SemanticSegmentationTarget over the pixels predicted as the class): the default class is
    the one covering most pixels and gets a non-empty map; a class predicted nowhere has an empty target,
    hence an all-zero map; a class outside the head is an error."""
    torch.manual_seed(0)
    seg, info = V.build_task_model('segment', 'deeplabv3', 'emov2_1m', num_classes=3)
    x, _ = V.images_to_tensor(photos[:1], 64, info['mean'], info['std'])
    maps, classes, pred = V.segmenter_cam(seg, x)
    assert maps.shape == (1, 64, 64) and pred.shape == (1, 64, 64)
    assert classes[0] == np.bincount(pred[0].ravel()).argmax() and maps.max() > 0
    absent = [c for c in range(3) if not (pred[0] == c).any()]
    if absent:
        empty, _, _ = V.segmenter_cam(seg, x, target_class=absent[0])
        assert float(np.abs(empty).max()) == 0.0
    with pytest.raises(ValueError, match='outside'):
        V.segmenter_cam(seg, x, target_class=3)


def test_cli_cam_detector_and_segmenter_by_name(tmp_path):
    """`emov2 viz cam -m retinanet -m deeplabv3`: the task follows from the name; boxes and classes in the JSON."""
    from skimage import data, io
    img = tmp_path / 'coffee.png'
    io.imsave(str(img), data.coffee()[::4, ::4])
    res = _ok(['viz', 'cam', str(img), '-m', 'retinanet', '-m', 'deeplabv3', '--num-classes', '3', '--boxes', '2',
               '--size', '64', '--layer-scale', '1', '--json', '--out', str(tmp_path)])
    assert 'cam.png' in res.output and (tmp_path / 'cam.png').stat().st_size > 10_000
    data_ = json.loads((tmp_path / 'cam.json').read_text())
    det, seg = data_['models']['retinanet (init)'], data_['models']['deeplabv3 (init)']
    assert det['task'] == 'detect' and len(det['detections']) == 1
    assert len(det['detections'][0]['boxes']) == 2 and all(0 <= c < 3 for c in det['detections'][0]['classes'])
    assert seg['task'] == 'segment' and 0 <= seg['classes'][0] < 3
    assert np.asarray(seg['cams']).shape == (1, 64, 64)
    assert det['layer_scale_init'] == seg['layer_scale_init'] == 1.0 and max(seg['cam_mean']) > 0
    res = runner.invoke(app, ['viz', 'cam', '-m', 'retinanet', '--task', 'segment', '--out', str(tmp_path)])
    assert res.exit_code == 2 and 'detect model' in res.output and 'Traceback' not in res.output
