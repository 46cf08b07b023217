"""The CUDA paths: models, deploy, fp16 training with loss scaling, exact resume, V-EMO, D-EMO,
detectors and segmenters.

They skip on machines without a GPU (CI) and run where one is lent (see docs/BENCHMARKS.md for the
card they last ran on).
"""
from __future__ import annotations

import os
import signal

import pytest
import timm
import torch

from emov2.checkpoint import read_state_dict
from emov2.deploy import deploy
from emov2.detection.models import create_detector
from emov2.generation import GenerationTask
from emov2.segmentation.models import create_segmenter
from emov2.train import Trainer
from emov2.train.testing import RandomImages, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.mark.parametrize('name', ['emov2_1m', 'emov1_1m'])
def test_cuda_forward_matches_cpu(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        out = model.cuda()(x.cuda()).cpu()
    assert torch.allclose(out, ref, atol=1e-3, rtol=1e-3), (out - ref).abs().max()


def test_cuda_deploy_equals_eager_and_half_precision_agrees():
    torch.manual_seed(0)
    model = timm.create_model('emov2_1m').eval().cuda()
    x = torch.randn(4, 3, 224, 224, device='cuda')
    with torch.no_grad():
        ref = model(x)
        fused = deploy(model)(x)
        with torch.autocast('cuda', dtype=torch.float16):
            half = model(x).float()
    assert torch.allclose(fused, ref, atol=1e-3, rtol=1e-3), (fused - ref).abs().max()
    assert (half.argmax(1) == ref.argmax(1)).all()
    assert (half - ref).abs().max() < 0.05 * ref.abs().max()


def test_cuda_fp16_training_with_loss_scaling_resumes_exactly(tmp_path):
    """fp16 autocast + GradScaler on CUDA: the loss falls, and a run stopped mid-way and resumed
    ends with the same weights as an uninterrupted one."""
    over = ['train.device=cuda', 'train.amp=true', 'train.amp_dtype=float16', 'data.workers=0']
    data, val = RandomImages(48), RandomImages(16, augment=False)
    full = Trainer(tiny_config(tmp_path / 'full', overrides=over), data, val).fit()
    assert full.global_step == 12 and not full.stopped_early
    assert full.last_metrics['train_loss'] == full.last_metrics['train_loss']  # finite

    def stop_at_7(trainer, step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config(tmp_path / 'cut', overrides=over)
    cut = Trainer(cfg, data, val, step_callback=stop_at_7).fit()
    assert cut.stopped_early and cut.global_step == 7
    Trainer(cfg, data, val, resume=str(tmp_path / 'cut')).fit()
    a, _ = read_state_dict(tmp_path / 'full' / 'last' / 'model.safetensors')
    b, _ = read_state_dict(tmp_path / 'cut' / 'last' / 'model.safetensors')
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst


def test_cuda_vemo_trains_a_step_with_gradient_checkpointing():
    model = timm.create_model('v_emov2_1m', num_classes=5).cuda().train()
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 4, 64, 64, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), torch.tensor([1, 3], device='cuda'))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_cuda_demo_sampling_is_seeded():
    model = timm.create_model('d_emov2_s_2', input_size=8, in_channels=3, num_classes=4, depth=2).cuda()
    task = GenerationTask({'model': {'name': 'd_emov2_s_2'}})
    a = task.sample(model, [0, 1], steps=3, generator=torch.Generator('cuda').manual_seed(1))
    b = task.sample(model, [0, 1], steps=3, generator=torch.Generator('cuda').manual_seed(1))
    assert a.shape == (2, 3, 8, 8) and a.is_cuda and torch.equal(a, b)


@pytest.mark.parametrize('kind', ['ssdlite', 'retinanet', 'maskrcnn'])
def test_cuda_detector_trains_under_fp16_autocast_and_predicts(kind):
    torch.manual_seed(0)
    det = create_detector(kind, 'emov2_1m', num_classes=3, image_size=128).cuda().train()
    images = [torch.rand(3, 120, 128, device='cuda'), torch.rand(3, 100, 128, device='cuda')]
    targets = []
    for _ in images:
        t = {'boxes': torch.tensor([[10., 12., 60., 70.], [50., 30., 110., 90.]], device='cuda'),
             'labels': torch.tensor([0, 2], device='cuda') + det.label_offset}
        if kind == 'maskrcnn':
            t['masks'] = torch.zeros(2, 100, 128, dtype=torch.uint8, device='cuda')
            t['masks'][0, 12:70, 10:60] = 1
            t['masks'][1, 30:90, 50:110] = 1
        targets.append(t)
    with torch.autocast('cuda', dtype=torch.float16):
        losses = det([im[:, :100] for im in images], targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2 and all(o['boxes'].is_cuda for o in out)


@pytest.mark.parametrize('kind', ['deeplabv3', 'segformer', 'u_emov2_5m'])
def test_cuda_segmenter_trains_under_bf16_autocast(kind):
    seg = create_segmenter(kind, 'emov2_1m', num_classes=4) if kind != 'u_emov2_5m' \
        else create_segmenter(kind, num_classes=2)
    seg = seg.cuda().train()
    x = torch.randn(2, 3, 128, 128, device='cuda')
    y = torch.randint(0, seg.num_classes, (2, 128, 128), device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = seg(x)
        loss = torch.nn.functional.cross_entropy(out['out'].float(), y)
    loss.backward()
    assert out['out'].shape[-2:] == (128, 128) and torch.isfinite(loss)
    seg.eval()
    with torch.no_grad():
        ref = seg(x)['out']
        fused = deploy(seg)(x)['out']
    assert torch.allclose(fused, ref, atol=1e-3, rtol=1e-3), (fused - ref).abs().max()
