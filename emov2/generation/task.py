"""Class-conditional diffusion (DiT's objective) as a :class:`~emov2.train.task.Task`, for DiT / D-EMO.

Training (DiT, "L_simple"): ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with ``t`` uniform over
the 1000 steps of DiT's linear beta schedule (1e-4 .. 0.02; diffusers' :class:`DDPMScheduler`
adds the noise), and the model's first ``C`` output channels regress ``eps`` (MSE). Labels are
dropped to the null class inside the model (``class_dropout_prob``, classifier-free guidance).

What differs from DiT, stated: DiT also trains the learned-variance channels with the VLB term;
here they are not trained (the loss covers the noise channels only). Sampling is therefore
DDIM (deterministic, :class:`DDIMScheduler`) or DDPM with the schedule's fixed variance
(:class:`DDPMScheduler`), both ignoring the variance channels. Classifier-free guidance at
sampling uses :meth:`emov2.models.dit.DiT.forward_with_cfg` (scale 1 = conditional).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..train.task import Task

__all__ = ['GenerationTask', 'make_scheduler']


def make_scheduler(kind: str = 'ddpm', num_train_timesteps: int = 1000):
    """DiT's linear beta schedule (1e-4 .. 0.02, epsilon prediction) as a diffusers scheduler."""
    from diffusers import DDIMScheduler, DDPMScheduler
    args = dict(num_train_timesteps=num_train_timesteps, beta_start=1e-4, beta_end=0.02,
                beta_schedule='linear', prediction_type='epsilon', clip_sample=False)
    if kind == 'ddpm':
        return DDPMScheduler(variance_type='fixed_small', **args)
    if kind == 'ddim':
        return DDIMScheduler(set_alpha_to_one=False, **args)
    raise ValueError(f"scheduler must be 'ddpm' or 'ddim', got {kind!r}")


class GenerationTask(Task):
    """Noise-prediction training of a DiT / D-EMO on ``(images or latents, labels)`` batches.

    ``cfg['model']`` holds ``name`` (a registered DiT / D-EMO) and its keyword arguments;
    ``cfg.get('diffusion', {})`` may set ``num_train_timesteps``. The best checkpoint is picked by
    ``neg_loss`` (minus the validation loss at fixed noise and timesteps).
    """
    name = 'generation'
    score = 'neg_loss'

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.num_train_timesteps = int(cfg.get('diffusion', {}).get('num_train_timesteps', 1000))
        self.noise_scheduler = make_scheduler('ddpm', self.num_train_timesteps)

    def build_model(self, cfg: Mapping[str, Any]) -> nn.Module:
        args = dict(cfg['model'])
        return timm.create_model(args.pop('name'), **{k: v for k, v in args.items() if v is not None})

    def diffusion_loss(self, model: nn.Module, x0: Tensor, labels: Tensor, t: Optional[Tensor] = None,
                       noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """MSE between the predicted and the true noise at random (or given) ``t`` and ``noise``."""
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        out = model(xt, t, labels)
        return F.mse_loss(out[:, :x0.shape[1]].float(), noise.float())

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tuple[Tensor, Any]:
        loss = self.diffusion_loss(model, inputs, targets)
        return loss, loss.detach()

    def train_counts(self, outputs: Any, targets: Any) -> Dict[str, float]:
        return {'loss_sum': float(outputs) * int(targets.shape[0]), 'n': int(targets.shape[0])}

    def train_metrics(self, counts: Mapping[str, float]) -> Dict[str, float]:
        return {'loss': counts.get('loss_sum', 0.0) / max(counts.get('n', 0), 1)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
        """Validation loss with noise and timesteps drawn from a fixed seed (comparable across epochs)."""
        was_training = model.training
        model.eval()
        gen = torch.Generator(device=device).manual_seed(0)
        total, n, skipped = 0.0, 0, 0
        for batch in loader:
            x0, labels, bad = batch if len(batch) == 3 else (*batch, 0)
            skipped += int(bad)
            if x0.numel() == 0:
                continue
            x0, labels = x0.to(device), labels.to(device)
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with ctx:
                loss = self.diffusion_loss(model, x0, labels, generator=gen)
            total += float(loss) * x0.shape[0]
            n += x0.shape[0]
        model.train(was_training)
        mean = total / max(n, 1)
        return {'loss': mean, 'neg_loss': -mean, 'n': n, 'skipped': skipped}

    def checkpoint_meta(self) -> Dict[str, Any]:
        return {'task': self.name, 'num_train_timesteps': self.num_train_timesteps,
                'model': dict(self.cfg['model'])}

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: Sequence[int] | Tensor, steps: int = 50, cfg_scale: float = 1.0,
               size: Optional[Tuple[int, int, int]] = None, scheduler: str = 'ddim',
               generator: Optional[torch.Generator] = None) -> Tensor:
        """Images (or latents) of shape ``(len(labels), *size)`` by DDIM / DDPM in ``steps`` steps;
        ``cfg_scale != 1`` applies classifier-free guidance (the model needs a null class)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        labels = torch.as_tensor(labels, device=device, dtype=torch.long)
        size = size or (model.in_channels, model.input_size, model.input_size)
        sched = make_scheduler(scheduler, self.num_train_timesteps)
        sched.set_timesteps(steps, device=device)
        x = torch.randn((labels.shape[0], *size), generator=generator, device=device)
        for t in sched.timesteps:
            tt = torch.full((labels.shape[0],), int(t), device=device, dtype=torch.long)
            if cfg_scale == 1.0:
                out = model(x, tt, labels)
            else:
                out = model.forward_with_cfg(x, tt, labels, cfg_scale)
            eps = out[:, :size[0]]
            x = sched.step(eps, t, x, generator=generator).prev_sample
        model.train(was_training)
        return x
