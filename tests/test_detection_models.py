"""Detectors on EMO backbones (emov2.detection.models / onnx): interfaces, frozen stage 1 and norm_eval,
sizes against the paper, checkpoint loading, deploy equality, ONNX Runtime parity."""
import math

import pytest
import timm
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from emov2.checkpoint import CheckpointError
from emov2.deploy import deploy
from emov2.detection.models import (PAPER_INPUT, SIZE_NOTES, build_for_paper_row, create_detector, detector_names,
                                    emo_backbone_of, flops_view)
from emov2.detection.onnx import OnnxExportError, SSDLiteExportable, decode_ssdlite, export_ssdlite_onnx
from emov2.tools.bench.detection import BASELINE, bench_detection, markdown_table
from emov2.tools.common import count_flops, count_params, paper_targets

SMALL = {'ssdlite': 96, 'retinanet': (64, 96), 'maskrcnn': (64, 96)}
# few proposals / RoIs / detections keep Mask R-CNN's RoI heads cheap in tests
FEW_ROIS = {'maskrcnn': dict(rpn_post_nms_top_n_train=64, rpn_post_nms_top_n_test=32, box_batch_size_per_image=32,
                             box_detections_per_img=8)}


def _targets(images, with_masks, offset=1):
    out = []
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        t = {'boxes': torch.tensor([[4.0, 6.0, w / 2 + 3, h / 2 + 5], [w / 3, h / 3, w - 2.0, h - 3.0]]),
             'labels': torch.tensor([0, 1]) + offset}
        if with_masks:
            m = torch.zeros(2, h, w, dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(t['boxes'].int().tolist()):
                m[j, y0:y1, x0:x1] = 1
            t['masks'] = m
        out.append(t)
    return out


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize('kind', ['ssdlite', 'retinanet', 'maskrcnn'])
def test_train_losses_and_eval_outputs(kind):
    torch.manual_seed(0)
    det = create_detector(kind, 'emov2_1m', num_classes=3, image_size=SMALL[kind], **FEW_ROIS.get(kind, {}))
    assert det.num_object_classes == 3 and det.label_offset == (0 if kind == 'retinanet' else 1)
    images = [torch.rand(3, 60, 90), torch.rand(3, 70, 80)]
    det.train()
    losses = det(images, _targets(images, kind == 'maskrcnn', det.label_offset))
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    head = det.head if kind != 'maskrcnn' else det.roi_heads
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    det.eval()
    with torch.no_grad():
        out = det(images)
    keys = {'boxes', 'labels', 'scores'} | ({'masks'} if kind == 'maskrcnn' else set())
    assert len(out) == 2 and all(set(o) == keys for o in out)
    for o in out:  # labels carry the offset: class c is c + label_offset
        labels = o['labels'] - det.label_offset
        assert o['boxes'].shape[-1] == 4 and ((labels >= 0) & (labels < 3)).all()


def test_frozen_stage1_and_norm_eval_hold_after_train():
    det = create_detector('retinanet', 'emov2_1m', num_classes=2, image_size=(64, 96)).train()
    bb = emo_backbone_of(det)
    frozen = bb.frozen_modules()
    assert [n for n, m in bb.body.named_children() if any(m is f for f in frozen)] == \
        ['stem_0', 'stem_1', 'stem_2', 'stages_0']
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in bb.body.stages_1.parameters())
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not m.training for m in frozen) and bb.body.stages_2.training and det.head.training
    stats = [m.running_mean.clone() for m in bns]
    frozen_w = [p.clone() for m in frozen for p in m.parameters()]
    opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=0.1)
    images = [torch.rand(3, 64, 96)]
    sum(det(images, _targets(images, False, det.label_offset)).values()).backward()
    opt.step()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, bns))
    assert all(torch.equal(a, p) for a, p in zip(frozen_w, [p for m in frozen for p in m.parameters()]))
    # SSDLite trains its whole backbone with BN in train mode
    ssd = create_detector('ssdlite', 'emov2_1m', num_classes=2, image_size=96).train()
    assert all(p.requires_grad for p in ssd.parameters())
    assert all(m.training for m in ssd.modules() if isinstance(m, nn.BatchNorm2d))


def test_sizes_match_the_paper_rows():
    targets = paper_targets()['detection_coco']
    for row in ('ssdlite_320', 'retinanet', 'mask_rcnn'):
        det = build_for_paper_row(row, 'emov2_1m')
        params = count_params(det) / 1e6
        assert abs(params / targets[row]['emov2_1m']['params'] - 1) < 0.05, (row, params)
    ssd = build_for_paper_row('ssdlite_320', 'emov2_1m')
    flops = count_flops(flops_view(ssd), input_size=PAPER_INPUT['ssdlite_320']) / 1e9
    assert abs(flops / targets['ssdlite_320']['emov2_1m']['flops_g'] - 1) < 0.10, flops
    assert set(PAPER_INPUT) == set(targets) - {'_about'} and set(PAPER_INPUT) <= set(SIZE_NOTES)


def test_flops_view_of_mask_rcnn_runs_the_roi_heads():
    det = create_detector('maskrcnn', 'emov2_1m', num_classes=80).eval()
    view = flops_view(det)
    with torch.no_grad():
        out = view(torch.rand(1, 3, 128, 160))
    scores, deltas, masks = out[-3:]
    assert scores.shape == (1000, 81) and deltas.shape == (1000, 81 * 4) and masks.shape == (100, 81, 28, 28)


def test_bad_arguments_are_clear_errors(tmp_path):
    assert detector_names() == ['maskrcnn', 'retinanet', 'ssdlite']
    with pytest.raises(ValueError, match='unknown detector'):
        create_detector('yolo')
    with pytest.raises(ValueError, match='num_classes'):
        create_detector('ssdlite', 'emov2_1m', num_classes=0)
    with pytest.raises(ValueError):
        create_detector('ssdlite', 'emov2_nope')
    with pytest.raises(ValueError, match='paper row'):
        build_for_paper_row('yolo', 'emov2_1m')
    with pytest.raises(CheckpointError):
        create_detector('ssdlite', 'emov2_1m', backbone_checkpoint=tmp_path / 'missing.pth')


def test_ssdlite_groupnorm_head_and_backbone_kwargs():
    """``ssdlite_norm='gn'`` puts GroupNorm (no BatchNorm) in the extra levels and the head; ``backbone_kwargs``
    reach ``create_model`` (a shallower EMOv2-1M); a wrong norm name is a clear error."""
    det = create_detector('ssdlite', 'emov2_1m', num_classes=2, image_size=64, ssdlite_norm='gn',
                          backbone_kwargs={'depths': [1, 1, 1, 1]})
    for part in (det.backbone.extra, det.head):
        assert not any(isinstance(m, nn.BatchNorm2d) for m in part.modules())
        assert any(isinstance(m, nn.GroupNorm) for m in part.modules())
    default = create_detector('ssdlite', 'emov2_1m', num_classes=2, image_size=64)
    assert any(isinstance(m, nn.BatchNorm2d) for m in default.head.modules())
    assert sum(p.numel() for p in emo_backbone_of(det).parameters()) < \
        0.5 * sum(p.numel() for p in emo_backbone_of(default).parameters())
    det.train()
    losses = det([torch.rand(3, 64, 64)], _targets([torch.rand(3, 64, 64)], False))
    assert set(losses) == {'bbox_regression', 'classification'} and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match='ssdlite_norm'):
        create_detector('ssdlite', 'emov2_1m', ssdlite_norm='ln')


def test_backbone_checkpoint_is_loaded(tmp_path):
    torch.manual_seed(1)
    classifier = timm.create_model('emov2_1m')
    path = tmp_path / 'emov2_1m.pth'
    torch.save(classifier.state_dict(), path)
    torch.manual_seed(2)
    fresh = create_detector('retinanet', 'emov2_1m', num_classes=2)
    loaded = create_detector('retinanet', 'emov2_1m', num_classes=2, backbone_checkpoint=str(path))
    body_fresh, body = emo_backbone_of(fresh).body.state_dict(), emo_backbone_of(loaded).body.state_dict()
    ref = {k.replace('stem.', 'stem_', 1).replace('stages.', 'stages_', 1): v
           for k, v in classifier.state_dict().items()}
    assert all(torch.equal(v, ref[k]) for k, v in body.items())
    assert sum(not torch.equal(v, ref[k]) for k, v in body_fresh.items() if v.dim() == 4) > 10
    # an official-style file with plain and EMA weights: backbone_use_ema picks net_E
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in classifier.state_dict().items()}
    torch.save({'net': classifier.state_dict(), 'net_E': ema}, tmp_path / 'official.pth')
    with_ema = create_detector('ssdlite', 'emov2_1m', backbone_checkpoint=str(tmp_path / 'official.pth'),
                               backbone_use_ema=True)
    ema = {k.replace('stem.', 'stem_', 1).replace('stages.', 'stages_', 1): v for k, v in ema.items()}
    assert all(torch.equal(v, ema[k]) for k, v in emo_backbone_of(with_ema).body.state_dict().items())
    with pytest.raises(CheckpointError):  # another variant's file does not fit
        create_detector('ssdlite', 'emov2_2m', backbone_checkpoint=str(path))


@pytest.mark.parametrize('kind', ['ssdlite', 'retinanet'])
def test_deploy_keeps_outputs(kind):
    torch.manual_seed(0)
    det = _randomise_bn(create_detector(kind, 'emov2_1m', num_classes=3, image_size=SMALL[kind])).eval()
    fast = deploy(det)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in emo_backbone_of(fast).modules()) < \
        sum(isinstance(m, nn.BatchNorm2d) for m in emo_backbone_of(det).modules())
    x = torch.rand(1, 3, 64, 96) if kind == 'retinanet' else torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        ref, out = flops_view(det)(x), flops_view(fast)(x)
        for k in ref:
            assert torch.allclose(ref[k], out[k], atol=1e-4, rtol=1e-4), k
        images = [torch.rand(3, 60, 90)]
        a, b = det(images)[0], fast(images)[0]
    assert torch.allclose(a['scores'], b['scores'], atol=1e-4) and torch.allclose(a['boxes'], b['boxes'], atol=1e-2)


def test_ssdlite_onnx_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    det = _randomise_bn(create_detector('ssdlite', 'emov2_1m', num_classes=3, image_size=96)).eval()
    path = export_ssdlite_onnx(det, tmp_path / 'ssdlite.onnx', 96, batch=2, dynamo=False)  # the fast exporter
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = torch.rand(3, 3, 96, 96)
    cls, reg = sess.run(None, {'images': x.numpy()})
    with torch.no_grad():
        ref_cls, ref_reg = SSDLiteExportable(det)(x)
        full = det(list(x))
    assert cls.shape == tuple(ref_cls.shape) and reg.shape == tuple(ref_reg.shape)
    assert torch.allclose(torch.from_numpy(cls), ref_cls, atol=1e-4)
    assert torch.allclose(torch.from_numpy(reg), ref_reg, atol=1e-4)
    decoded = decode_ssdlite(det, torch.from_numpy(cls), torch.from_numpy(reg), [(96, 96)] * 3)
    assert torch.allclose(decoded[0]['scores'], full[0]['scores'], atol=1e-4)
    assert math.isclose(len(decoded[1]['boxes']), len(full[1]['boxes']))
    with pytest.raises(OnnxExportError, match='fixed size'):
        export_ssdlite_onnx(det, tmp_path / 'x.onnx', 128)
    with pytest.raises(OnnxExportError, match='does not exist'):
        export_ssdlite_onnx(det, tmp_path / 'no' / 'x.onnx', 96)


def test_ssdlite_anchors_follow_the_spec():
    det = create_detector('ssdlite', 'emov2_1m', num_classes=2).eval()
    with torch.no_grad():
        feats = list(det.backbone(torch.zeros(1, 3, 320, 320)).values())
    assert [f.shape[-1] for f in feats] == [20, 10, 5, 3, 2, 1]
    assert [f.shape[1] for f in feats][2:] == [512, 256, 256, 128]
    anchors = det.anchor_generator(ImageList(torch.zeros(1, 3, 320, 320), [(320, 320)]), feats)[0]
    assert anchors.shape == (6 * (400 + 100 + 25 + 9 + 4 + 1), 4)
    wh = anchors[:, 2:] - anchors[:, :2]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    s2, s3 = math.sqrt(2), math.sqrt(3)
    first = torch.tensor([[48, 48], [math.sqrt(4800)] * 2, [48 * s2, 48 / s2], [48 / s2, 48 * s2],
                          [48 * s3, 48 / s3], [48 / s3, 48 * s3]])
    assert torch.allclose(wh[:6], first, atol=1e-3) and torch.allclose(centres[:6], torch.full((6, 2), 8.0))
    level4 = 6 * (400 + 100 + 25)  # stride 107: centres at 53.5, 160.5, 267.5
    assert torch.allclose(centres[level4 + 6 * 4, 0], torch.tensor(160.5), atol=1e-3)
    assert torch.allclose(wh[-6], torch.tensor([304.0, 304.0]))
    assert torch.allclose(wh[-5], torch.full((2,), math.sqrt(304 * 320)))


def test_bench_detection_reports_rows_and_ratios():
    result = bench_detection(['emov2_1m'], image_size=64, batch=2, repeats=1, warmup=0, min_time_s=0.0,
                             count_macs=False)
    base, emo = result['rows']
    assert base['model'] == BASELINE and emo['model'] == 'ssdlite_emov2_1m_deployed' and 'error' not in emo
    for key in ('raw_latency_ms', 'raw_img_per_s', 'full_latency_ms', 'full_img_per_s'):
        assert base[key] > 0 and emo[key] > 0
    assert math.isclose(emo['raw_throughput_speedup'], emo['raw_img_per_s'] / base['raw_img_per_s'])
    assert 'ssdlite_emov2_1m_deployed' in markdown_table(result)
