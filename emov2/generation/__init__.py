"""Class-conditional image generation with DiT and D-EMO (DiT whose blocks are conditioned i2RMBs):
DiT's hybrid objective and recipe on the shared trainer, pixel or VAE-latent space, sampling,
metrics and the digits demo."""
from .data import GenerationImageFolder, find_splits, generation_transform
from .task import DIFFUSION_DEFAULTS, GenerationTask, load_generator, make_scheduler
from .vae import LatentCodec, load_vae
from .vlb import LearnedVarianceVLB, discretized_gaussian_log_likelihood, normal_kl

__all__ = ['GenerationTask', 'make_scheduler', 'DIFFUSION_DEFAULTS', 'load_generator', 'LatentCodec', 'load_vae',
           'GenerationImageFolder', 'find_splits', 'generation_transform', 'LearnedVarianceVLB', 'normal_kl',
           'discretized_gaussian_log_likelihood']
