"""Knowledge distillation: soft-logit KL loss and a teacher wrapper that adapts the student's input.

The paper's KD recipe adds ``weight * tau^2 * KL(softmax(t / tau) || softmax(s / tau))`` to the
label-smoothed cross-entropy, with the teacher seeing the same (augmented) image. A teacher trained
with other normalisation or another resolution gets the image re-normalised and resized.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import torchvision
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from ..factory import load_checkpoint

__all__ = ['kd_loss', 'KDLoss', 'TeacherWrapper', 'build_teacher']


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau^2 * KL(p_teacher || p_student)`` at temperature ``tau``, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * (tau * tau)


class KDLoss(nn.Module):
    """Base loss on labels plus ``weight`` times the soft KD term."""

    def __init__(self, base: nn.Module, tau: float = 1.0, weight: float = 5.0) -> None:
        super().__init__()
        self.base, self.tau, self.weight = base, float(tau), float(weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.base(logits, target) + self.weight * kd_loss(logits, teacher_logits, self.tau)


class TeacherWrapper(nn.Module):
    """Frozen teacher that maps the student's normalised input to its own preprocessing."""

    def __init__(self, teacher: nn.Module, student_mean: Sequence[float], student_std: Sequence[float],
                 teacher_mean: Sequence[float], teacher_std: Sequence[float],
                 teacher_size: Optional[int] = None) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(teacher_mean), torch.tensor(teacher_std)
        # x_t = (x_s * s_std + s_mean - t_mean) / t_std = x_s * scale + shift
        self.register_buffer('scale', (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('shift', ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)
        self.same_norm = bool(torch.allclose(s_mean, t_mean) and torch.allclose(s_std, t_std))
        self.teacher_size = int(teacher_size) if teacher_size else None

    def train(self, mode: bool = True) -> 'TeacherWrapper':
        super().train(False)  # the teacher always runs in eval mode
        return self

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The student's batch as the teacher expects it."""
        if not self.same_norm:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.teacher_size and tuple(x.shape[-2:]) != (self.teacher_size, self.teacher_size):
            x = F.interpolate(x, size=(self.teacher_size, self.teacher_size), mode='bicubic', align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.prepare(x))


def _teacher_preprocessing(model: nn.Module, torchvision_model: bool) -> Tuple[tuple, tuple, int]:
    if torchvision_model:
        return IMAGENET_MEAN, IMAGENET_STD, 224
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size', (3, 224, 224))[-1]
    return tuple(cfg.get('mean', IMAGENET_MEAN)), tuple(cfg.get('std', IMAGENET_STD)), int(size)


def build_teacher(name: str, checkpoint: str, num_classes: int, student_mean: Sequence[float],
                  student_std: Sequence[float], teacher_mean: Optional[Sequence[float]] = None,
                  teacher_std: Optional[Sequence[float]] = None, teacher_size: Optional[int] = None) -> TeacherWrapper:
    """A timm (``name``) or torchvision (``tv:name``) teacher with weights from ``checkpoint``."""
    is_tv = name.startswith('tv:')
    if is_tv:
        model = torchvision.models.get_model(name[3:], weights=None, num_classes=num_classes)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    load_checkpoint(model, checkpoint, variant=name, head='strict')
    mean, std, size = _teacher_preprocessing(model, is_tv)
    return TeacherWrapper(model, student_mean, student_std, teacher_mean or mean, teacher_std or std,
                          teacher_size or size)
