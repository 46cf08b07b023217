"""Knowledge distillation: the KL term, the teacher's input adaptation and a KD training run."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from emov2.checkpoint import save_safetensors
from emov2.train import Trainer
from emov2.train.distill import KDLoss, TeacherWrapper, build_teacher, kd_loss
from emov2.train.testing import RandomImages, tiny_config


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[0.5, 2.5, 0.0], [1.0, 0.0, 2.0]])
    for tau in (1.0, 2.0):
        expected = 0.0
        for si, ti in zip(s.tolist(), t.tolist()):
            zs = sum(math.exp(v / tau) for v in si)
            zt = sum(math.exp(v / tau) for v in ti)
            ps = [math.exp(v / tau) / zs for v in si]
            pt = [math.exp(v / tau) / zt for v in ti]
            expected += sum(q * math.log(q / p) for p, q in zip(ps, pt))
        expected = expected / len(s) * tau ** 2
        assert float(kd_loss(s, t, tau)) == pytest.approx(expected, rel=1e-5)
    assert float(kd_loss(s, s, 1.0)) == pytest.approx(0.0, abs=1e-6)
    base = torch.nn.CrossEntropyLoss()
    y = torch.tensor([1, 2])
    total = KDLoss(base, tau=1.0, weight=5.0)(s, y, t)
    assert float(total) == pytest.approx(float(base(s, y) + 5.0 * kd_loss(s, t, 1.0)), rel=1e-6)


def test_teacher_input_is_renormalised_and_resized():
    s_mean, s_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t_mean, t_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # TResNet-v2 style: raw [0, 1] pixels
    raw = torch.rand(2, 3, 32, 32)
    x_student = (raw - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1)
    w = TeacherWrapper(torch.nn.Identity(), s_mean, s_std, t_mean, t_std, teacher_size=32)
    assert torch.allclose(w.prepare(x_student), raw, atol=1e-6)
    w64 = TeacherWrapper(torch.nn.Identity(), s_mean, s_std, s_mean, s_std, teacher_size=64)
    assert w64.same_norm and w64.prepare(x_student).shape == (2, 3, 64, 64)
    w64.train()
    assert not w64.teacher.training  # the teacher always runs in eval mode


def test_kd_training_with_teacher_from_file(tmp_path):
    teacher = timm.create_model('test_resnet', num_classes=4)
    save_safetensors(teacher.state_dict(), tmp_path / 'teacher.safetensors')
    student_mean, student_std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    assert tuple(teacher.pretrained_cfg['mean']) != student_mean
    wrapped = build_teacher('test_resnet', str(tmp_path / 'teacher.safetensors'), 4, student_mean, student_std)
    assert not wrapped.same_norm and wrapped.teacher_size == teacher.pretrained_cfg['input_size'][-1]
    x = torch.randn(2, 3, 32, 32)
    teacher.eval()
    assert torch.allclose(wrapped(x), teacher(wrapped.prepare(x)))

    cfg = tiny_config(tmp_path / 'run', overrides=[
        'kd.teacher=test_resnet', f'kd.teacher_checkpoint={tmp_path / "teacher.safetensors"}',
        'kd.teacher_size=32', 'sched.epochs=1'])
    t = Trainer(cfg, RandomImages(16), RandomImages(8, augment=False))
    r = t.fit()
    assert isinstance(t.task.criterion, KDLoss) and t.task.criterion.weight == 5.0
    assert r.global_step == 2 and math.isfinite(r.last_metrics['train_loss'])
    assert not any(p.requires_grad for p in t.task.teacher.parameters())
