"""DiT's learned variance: the variational-bound term that trains the variance channels.

As in DiT (``diffusion/gaussian_diffusion.py``, inherited from improved DDPM): with
``learn_sigma`` the model outputs ``(eps, v)``; ``v`` in [-1, 1] interpolates the log variance of
``p(x_{t-1} | x_t)`` between the clipped posterior variance and ``beta_t``
("learned_range")::

    log sigma_t^2 = (v + 1) / 2 * log beta_t + (1 - v) / 2 * log beta~_t

and the "hybrid" loss is ``L_simple + L_vlb`` where ``L_vlb`` is, per sample, the KL between the
true posterior ``q(x_{t-1} | x_t, x_0)`` and ``p`` (``t > 0``) or the discretised Gaussian
decoder NLL of ``x_0`` (``t = 0``), in bits per dimension, computed with the mean *stopped*
(``eps.detach()``) so that only the variance learns from it. DiT uses loss type MSE (no
``num_timesteps / 1000`` rescaling of the VLB term), so neither do we.

One difference, stated: the decoder NLL uses the exact normal CDF (``torch.special.ndtr``) where
DiT uses its tanh approximation (they differ by < 2e-4 in the CDF). Sampling with the learned
variance is diffusers' ``DDPMScheduler(variance_type='learned_range')``, which uses the same
interpolation (:func:`emov2.generation.task.make_scheduler`).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

__all__ = ['LearnedVarianceVLB', 'normal_kl', 'discretized_gaussian_log_likelihood', 'mean_flat']


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.flatten(1).mean(1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 levels (bins of width 2/255) under
    N(means, e^{2 log_scales}); the end bins take the tails. Elementwise, in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class LearnedVarianceVLB:
    """The posterior and model Gaussians of a discrete-time diffusion with betas ``betas`` (float64
    tables, looked up per sample), and the VLB term of DiT's hybrid loss."""

    def __init__(self, betas: Tensor) -> None:
        b = betas.detach().to(torch.float64).cpu()
        alphas = 1.0 - b
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.num_timesteps = len(b)
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_variance = post_var
        # log(0) at t = 0: DiT clips it to the value at t = 1
        self.posterior_log_variance_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.posterior_mean_coef1 = b * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)
        self.log_betas = torch.log(b)
        self.sqrt_recip_abar = (1.0 / abar).sqrt()
        self.sqrt_recipm1_abar = (1.0 / abar - 1.0).sqrt()

    @staticmethod
    def _at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` shaped to broadcast over ``like`` (float32 on its device)."""
        v = table.to(like.device)[t.long()].to(like.dtype)
        return v.view(-1, *([1] * (like.dim() - 1)))

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean and clipped log variance of ``q(x_{t-1} | x_t, x_0)``."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_log_variance_clipped, t, xt).expand_as(xt)

    def p_mean_log_variance(self, eps: Tensor, v: Tensor, xt: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean (posterior mean at the predicted ``x_0``) and learned-range log variance of ``p``."""
        min_log = self._at(self.posterior_log_variance_clipped, t, xt)
        max_log = self._at(self.log_betas, t, xt)
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        x0_pred = self._at(self.sqrt_recip_abar, t, xt) * xt - self._at(self.sqrt_recipm1_abar, t, xt) * eps
        mean, _ = self.q_posterior(x0_pred, xt, t)
        return mean, log_var

    def vb_terms_bpd(self, eps: Tensor, v: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-sample VLB term in bits/dim: KL for ``t > 0``, decoder NLL for ``t = 0``. Pass
        ``eps.detach()`` for DiT's hybrid loss (the VLB then trains only the variance)."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        mean, log_var = self.p_mean_log_variance(eps, v, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)
