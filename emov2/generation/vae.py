"""Latent space for DiT / D-EMO: a user-supplied diffusers ``AutoencoderKL`` read from a local folder.

DiT trains on ``z = scale * E(x).sample()`` (Stable Diffusion's VAE, ``scale = 0.18215``) and
decodes ``D(z / scale)`` after sampling. Nothing is downloaded: the VAE is
``AutoencoderKL.from_pretrained(local_folder)`` (a folder written by ``save_pretrained``, e.g.
``stabilityai/sd-vae-ft-ema`` copied here by the user). The scale is the VAE config's
``scaling_factor`` unless one is given (and its ``shift_factor``, if any, is subtracted first).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

__all__ = ['LatentCodec', 'load_vae']


def load_vae(path: str | Path) -> AutoencoderKL:
    """``AutoencoderKL`` from a local diffusers folder (``config.json`` + weights), in eval mode,
    frozen; a clear ``FileNotFoundError`` / ``ValueError`` for a missing or wrong folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f'VAE folder not found: {folder} (diffusion.vae must be a local folder written by '
                                'AutoencoderKL.save_pretrained; nothing is downloaded)')
    if not (folder / 'config.json').is_file():
        raise ValueError(f'{folder} is not a diffusers model folder (no config.json); give the folder that '
                         'AutoencoderKL.save_pretrained wrote (e.g. a local copy of stabilityai/sd-vae-ft-ema)')
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # diffusers raises OSError / ValueError / EnvironmentError variants
        raise ValueError(f'cannot load an AutoencoderKL from {folder}: {type(e).__name__}: {str(e)[:300]}') from e
    vae.eval().requires_grad_(False)
    return vae


class LatentCodec(nn.Module):
    """Images in [-1, 1] <-> scaled latents with a frozen VAE (``encode`` samples the posterior, as DiT)."""

    def __init__(self, vae: AutoencoderKL, scaling_factor: Optional[float] = None) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        sf = scaling_factor if scaling_factor is not None else getattr(vae.config, 'scaling_factor', None)
        self.scaling_factor = float(sf if sf is not None else 0.18215)
        self.shift_factor = float(getattr(vae.config, 'shift_factor', None) or 0.0)  # SD3-style VAEs; 0 for DiT's
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_channels = int(vae.config.in_channels)

    def train(self, mode: bool = True) -> 'LatentCodec':  # the VAE always stays in eval mode
        return super().train(False)

    def latent_size(self, image_size: int) -> int:
        if image_size % self.downsample:
            raise ValueError(f'image size {image_size} is not a multiple of the VAE downsampling {self.downsample}')
        return image_size // self.downsample

    @torch.no_grad()
    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(images.to(dtype)).latent_dist
        return (dist.sample(generator=generator).float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((latents / self.scaling_factor + self.shift_factor).to(dtype)).sample.float()
