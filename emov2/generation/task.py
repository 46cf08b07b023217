"""Class-conditional diffusion (DiT's objective and recipe) as a :class:`~emov2.train.task.Task`.

Training: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with ``t`` uniform over the 1000 steps
of DiT's linear beta schedule (1e-4 .. 0.02; diffusers' :class:`DDPMScheduler` adds the noise).
The model's first ``C`` output channels regress ``eps`` (L_simple, MSE); with ``learn_sigma`` the
other ``C`` channels are trained by the VLB term with the mean stopped (DiT's "hybrid" loss,
:mod:`emov2.generation.vlb`). Labels are dropped to the null class inside the model
(``diffusion.class_dropout``, classifier-free guidance).

Data: pixel space (images in [-1, 1], for small images) or latent space: images encoded on the fly
by a user-supplied frozen ``AutoencoderKL`` (:mod:`emov2.generation.vae`), latents decoded after
sampling. Sampling: DDPM (diffusers' ``DDPMScheduler``, ``variance_type='learned_range'`` when the
variance is learned, the schedule's fixed variance otherwise) or DDIM (deterministic, the variance
channels unused), with classifier-free guidance (:meth:`emov2.models.dit.DiT.forward_with_cfg`).

The recipe (:attr:`GenerationTask.defaults`) is DiT's: AdamW, lr 1e-4 constant, no weight decay,
no gradient clipping, batch 256, EMA 0.9999 (no warm-up), plus a ``diffusion:`` section.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..checkpoint import CheckpointError, read_metadata
from ..factory import list_models, load_checkpoint
from ..train.config import DEFAULTS, ConfigError, merge
from ..train.distributed import all_reduce_sum
from ..train.inference import ema_path_for, resolve_weights
from ..train.task import Task
from .data import GenerationImageFolder, find_splits
from .vae import LatentCodec, load_vae
from .vlb import LearnedVarianceVLB, mean_flat

__all__ = ['GenerationTask', 'make_scheduler', 'DIFFUSION_DEFAULTS', 'load_generator']

#: the ``diffusion:`` config section
DIFFUSION_DEFAULTS: Dict[str, Any] = {
    'num_train_timesteps': 1000,  # DiT's linear schedule, betas 1e-4 .. 0.02
    'learn_sigma': True,          # variance channels trained by the VLB term (hybrid loss), as DiT
    'class_dropout': 0.1,         # labels dropped to the null class (classifier-free guidance)
    'space': None,                # 'pixel' or 'latent'; null: latent when diffusion.vae is set, else pixel
    'vae': None,                  # local diffusers AutoencoderKL folder (save_pretrained); nothing is downloaded
    'vae_scaling_factor': None,   # null: the VAE config's scaling_factor (0.18215 for Stable Diffusion's VAE)
    'image_size': 256,            # images are resized and centre-cropped to this square
    'channels': 3,                # pixel space: 1 (grey) or 3 (RGB)
    'hflip': 0.5,                 # DiT's random horizontal flip
    'sampler': 'ddpm',            # ddpm (DiT: 250 steps) or ddim
    'sample_steps': 250,
    'cfg_scale': 1.5,             # DiT's FID setting (4.0 for its sample figures); 1 = no guidance
}


def make_scheduler(kind: str = 'ddpm', num_train_timesteps: int = 1000, learned_variance: bool = False):
    """DiT's linear beta schedule (1e-4 .. 0.02, epsilon prediction) as a diffusers scheduler; DDPM
    uses the learned variance (``learned_range``) when the model has one."""
    args = dict(num_train_timesteps=num_train_timesteps, beta_start=1e-4, beta_end=0.02,
                beta_schedule='linear', prediction_type='epsilon', clip_sample=False)
    if kind == 'ddpm':
        return DDPMScheduler(variance_type='learned_range' if learned_variance else 'fixed_small', **args)
    if kind == 'ddim':
        return DDIMScheduler(set_alpha_to_one=False, **args)
    raise ValueError(f"scheduler must be 'ddpm' or 'ddim', got {kind!r}")


def _check_diffusion(d: Mapping[str, Any]) -> None:
    """Types and ranges of the ``diffusion:`` section, each error naming its key."""
    def need(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f'diffusion.{key} must be {what}, got {d[key]!r}')

    def is_int(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    need('num_train_timesteps', is_int(d['num_train_timesteps'], 2), 'an integer >= 2')
    need('learn_sigma', isinstance(d['learn_sigma'], bool), 'true or false')
    need('class_dropout', is_num(d['class_dropout']) and 0 <= d['class_dropout'] < 1, 'a number in [0, 1)')
    need('space', d['space'] in (None, 'pixel', 'latent'), 'pixel, latent or null')
    need('vae', d['vae'] is None or isinstance(d['vae'], str), 'a folder path or null')
    need('vae_scaling_factor', d['vae_scaling_factor'] is None or (is_num(d['vae_scaling_factor'])
                                                                   and d['vae_scaling_factor'] > 0), 'positive or null')
    need('image_size', is_int(d['image_size'], 2), 'an integer >= 2')
    need('channels', d['channels'] in (1, 3), '1 or 3')
    need('hflip', is_num(d['hflip']) and 0 <= d['hflip'] <= 1, 'a number in [0, 1]')
    need('sampler', d['sampler'] in ('ddpm', 'ddim'), 'ddpm or ddim')
    need('sample_steps', is_int(d['sample_steps'], 1), 'an integer >= 1')
    need('cfg_scale', is_num(d['cfg_scale']) and d['cfg_scale'] >= 0, 'a number >= 0')
    if d['sample_steps'] > d['num_train_timesteps']:
        raise ConfigError(f'diffusion.sample_steps {d["sample_steps"]} exceeds num_train_timesteps '
                          f'{d["num_train_timesteps"]}')
    if d['space'] == 'latent' and not d['vae']:
        raise ConfigError('diffusion.space=latent needs diffusion.vae: a local AutoencoderKL folder (nothing is '
                          'downloaded); or use diffusion.space=pixel for small images')


class GenerationTask(Task):
    """DiT / D-EMO noise prediction on ``(images, labels)`` batches, in pixel or VAE-latent space.

    ``cfg['model']``: ``name`` (a registered DiT / D-EMO), ``num_classes`` (null: the class folders),
    ``kwargs`` (e.g. ``depth``, ``hidden_size``, ``num_heads``, ``block_args``), ``pretrained``;
    ``model.window_size`` and ``model.drop_path_rate`` do not apply (D-EMO's window is in
    ``block_args``). The best checkpoint is picked by ``neg_loss`` (minus the validation loss at
    fixed noise, timesteps and label-drop pattern).
    """
    name = 'generation'
    score = 'neg_loss'
    architecture_keys = ('diffusion.learn_sigma', 'diffusion.class_dropout', 'diffusion.space', 'diffusion.vae',
                         'diffusion.image_size', 'diffusion.channels')
    defaults: Mapping[str, Any] = {
        'model': {'name': 'd_emov2_s_2'},
        'optim': {'name': 'adamw', 'batch_size': 256, 'lr': 1.0e-4, 'weight_decay': 0.0, 'clip_grad': None,
                  'label_smoothing': 0.0, 'betas': [0.9, 0.999]},
        'sched': {'name': 'constant', 'epochs': 80, 'warmup_epochs': 0},  # DiT: 400K steps x 256 = 80 ImageNet epochs
        'ema': {'enable': True, 'decay': 0.9999, 'warmup': False},
        'eval': {'batch_size': 256, 'precise_bn_images': 1024},  # D-EMO's DW convs have BN; DiT has none (skipped)
        'train': {'out': 'runs/generate'},
        'diffusion': DIFFUSION_DEFAULTS,
    }

    def __init__(self, cfg: Mapping[str, Any], class_names: Optional[Sequence[str]] = None,
                 codec: Optional[LatentCodec] = None) -> None:
        """``cfg`` is a full config (``load_config(..., defaults=GenerationTask.defaults)``); a config
        holding only ``model`` (and ``diffusion``) is completed with the defaults. ``codec`` replaces
        loading ``diffusion.vae`` (tests, or a VAE already in memory)."""
        if 'train' not in cfg:
            cfg = merge(merge(DEFAULTS, self.defaults, strict=False), cfg, strict=False)
        super().__init__(cfg)
        if cfg['model']['name'] not in list_models('dit'):
            raise ValueError(f'model.name {cfg["model"]["name"]!r} is not a DiT / D-EMO model; choose one of '
                             f'{", ".join(list_models("dit"))}')
        d = dict(DIFFUSION_DEFAULTS, **cfg.get('diffusion', {}))
        if codec is not None and d['space'] is None:
            d['space'] = 'latent'
        _check_diffusion({**d, 'vae': d['vae'] or ('<in memory>' if codec is not None else None)})
        self.diffusion = d
        self.space = d['space'] or ('latent' if d['vae'] or codec is not None else 'pixel')
        self.num_train_timesteps = int(d['num_train_timesteps'])
        self.learn_sigma = bool(d['learn_sigma'])
        self.noise_scheduler = make_scheduler('ddpm', self.num_train_timesteps)
        self.vlb = LearnedVarianceVLB(self.noise_scheduler.betas)
        self.class_names: Optional[List[str]] = list(class_names) if class_names else None
        self.codec: Optional[LatentCodec] = None
        if self.space == 'latent':
            self.codec = codec or LatentCodec(load_vae(d['vae']), d['vae_scaling_factor'])
            self.input_size = self.codec.latent_size(int(d['image_size']))
            self.model_channels = self.codec.latent_channels
            self.image_channels = self.codec.image_channels
        else:
            self.input_size = int(d['image_size'])
            self.model_channels = self.image_channels = int(d['channels'])

    # -- data -----------------------------------------------------------------------------------------
    def build_datasets(self, cfg: Mapping[str, Any]) -> Tuple[Dataset, Optional[Dataset]]:
        train, val = find_splits(cfg)
        d = self.diffusion
        tr = GenerationImageFolder(train, int(d['image_size']), self.image_channels, float(d['hflip']))
        va = GenerationImageFolder(val, int(d['image_size']), self.image_channels, 0.0, class_names=tr.classes) \
            if val is not None else None
        return tr, va

    def bind_data(self, train: Dataset) -> None:
        names = list(getattr(train, 'classes', None) or []) or None
        self.class_names = self.class_names or names
        want = self.cfg['model'].get('num_classes')
        if want is None:
            if not self.class_names:
                raise ValueError('cannot tell the number of classes from the data; set model.num_classes')
            want = len(self.class_names)
        elif self.class_names and len(self.class_names) != int(want):
            raise ValueError(f'the training data has {len(self.class_names)} classes but model.num_classes is {want}')
        self.cfg['model']['num_classes'] = int(want)

    # -- model and loss -------------------------------------------------------------------------------
    def build_model(self, cfg: Mapping[str, Any]) -> nn.Module:
        m = cfg['model']
        if m['name'] not in list_models('dit'):
            raise ValueError(f'model.name {m["name"]!r} is not a DiT / D-EMO model; choose one of '
                             f'{", ".join(list_models("dit"))}')
        if m.get('num_classes') is None:
            raise ValueError('model.num_classes is not set (and no training data told it)')
        kwargs = dict(m.get('kwargs') or {})
        owned = {'input_size': 'diffusion.image_size', 'in_channels': 'diffusion.channels / the VAE',
                 'num_classes': 'model.num_classes', 'learn_sigma': 'diffusion.learn_sigma',
                 'class_dropout_prob': 'diffusion.class_dropout'}
        clash = [k for k in kwargs if k in owned]
        if clash:
            raise ValueError(f'model.kwargs.{clash[0]} is set by {owned[clash[0]]}; set it there instead')
        model = timm.create_model(m['name'], input_size=self.input_size, in_channels=self.model_channels,
                                  num_classes=int(m['num_classes']), learn_sigma=self.learn_sigma,
                                  class_dropout_prob=float(self.diffusion['class_dropout']), **kwargs)
        if m.get('pretrained'):
            load_checkpoint(model, m['pretrained'], head='strict', variant=m['name'])
        return model

    def setup(self, model: nn.Module, device: torch.device) -> None:
        if self.codec is not None:
            self.codec.to(device)

    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """What the diffusion runs on: the images themselves (pixel space) or their scaled latents."""
        if self.codec is None:
            return images.float()
        return self.codec.encode(images.float(), generator=generator)

    def decode(self, x: Tensor) -> Tensor:
        """Samples back to images in about [-1, 1]."""
        return x if self.codec is None else self.codec.decode(x)

    def diffusion_terms(self, model: nn.Module, x0: Tensor, labels: Tensor, t: Optional[Tensor] = None,
                        noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                        force_drop_ids: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Per-sample ``mse`` (L_simple), ``vb`` (VLB term in bits/dim, zero without learned sigma)
        and their sum ``loss`` at random (or given) ``t`` and ``noise``."""
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (b,), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        kwargs = {'force_drop_ids': force_drop_ids} if force_drop_ids is not None else {}
        out = model(xt, t, labels, **kwargs).float()
        c = x0.shape[1]
        eps = out[:, :c]
        mse = mean_flat((eps - noise.float()) ** 2)
        if self.learn_sigma:
            vb = self.vlb.vb_terms_bpd(eps.detach(), out[:, c:2 * c], x0.float(), xt.float(), t)
        else:
            vb = torch.zeros_like(mse)
        return {'mse': mse, 'vb': vb, 'loss': mse + vb}

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tuple[Tensor, Any]:
        terms = self.diffusion_terms(model, self.encode(inputs), targets)
        return terms['loss'].mean(), {k: v.detach().mean() for k, v in terms.items()}

    def forward_for_bn(self, model: nn.Module, inputs: Tensor) -> Any:
        """Precise BN (D-EMO's depthwise convs): the model (in train mode) on noised inputs at random
        timesteps with random class labels (the hook gets no targets), dropped to the null class at
        the training rate by the model's label embedder."""
        x0 = self.encode(inputs)
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.noise_scheduler.add_noise(x0, torch.randn_like(x0), t)
        labels = torch.randint(0, model.num_classes, (x0.shape[0],), device=x0.device)
        return model(xt, t, labels)

    def train_counts(self, outputs: Any, targets: Any) -> Dict[str, float]:
        n = int(targets.shape[0])
        return {'loss_sum': float(outputs['loss']) * n, 'mse_sum': float(outputs['mse']) * n,
                'vb_sum': float(outputs['vb']) * n, 'n': n}

    def train_metrics(self, counts: Mapping[str, float]) -> Dict[str, float]:
        n = max(counts.get('n', 0), 1)
        return {'loss': counts.get('loss_sum', 0.0) / n, 'mse': counts.get('mse_sum', 0.0) / n,
                'vb': counts.get('vb_sum', 0.0) / n}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
        """Validation loss (and its ``mse`` / ``vb`` parts) with noise, timesteps and VAE samples
        drawn from a fixed seed and no label dropout (comparable across epochs and models)."""
        was_training = model.training
        model.eval()
        gen = torch.Generator(device=device).manual_seed(0)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, mse, vb, n, skipped
        for batch in loader:
            x, labels, bad = batch if len(batch) == 3 else (*batch, 0)
            sums[4] += int(bad)
            if x.numel() == 0:
                continue
            x, labels = x.to(device), labels.to(device)
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with ctx:
                terms = self.diffusion_terms(model, self.encode(x, generator=gen), labels, generator=gen)
            for i, k in enumerate(('loss', 'mse', 'vb')):
                sums[i] += float(terms[k].sum())
            sums[3] += x.shape[0]
        if device.type == 'cuda':
            sums = sums.to(device)
        sums = all_reduce_sum(sums).cpu()
        model.train(was_training)
        n = max(float(sums[3]), 1.0)
        loss = float(sums[0]) / n
        return {'loss': loss, 'mse': float(sums[1]) / n, 'vb': float(sums[2]) / n, 'neg_loss': -loss,
                'n': int(sums[3]), 'skipped': int(sums[4])}

    # -- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_meta(self) -> Dict[str, Any]:
        m, d = self.cfg['model'], self.diffusion
        return {'task': self.name, 'variant': m['name'], 'model_kwargs': dict(m.get('kwargs') or {}),
                'num_classes': m.get('num_classes'), 'class_names': self.class_names,
                'input_size': self.input_size, 'in_channels': self.model_channels,
                'diffusion': {**{k: d[k] for k in DIFFUSION_DEFAULTS}, 'space': self.space,
                              'vae_scaling_factor': self.codec.scaling_factor if self.codec else None}}

    def state(self) -> Dict[str, Any]:
        return {'class_names': self.class_names}

    def load_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get('class_names')
        if saved and self.class_names and list(saved) != list(self.class_names):
            raise ConfigError('cannot resume: the class folders of the data changed; labels would be permuted')
        self.class_names = self.class_names or saved

    # -- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model: nn.Module, labels: Sequence[int] | Tensor, steps: int = 50, cfg_scale: float = 1.0,
               size: Optional[Tuple[int, int, int]] = None, scheduler: str = 'ddim',
               generator: Optional[torch.Generator] = None, decode: bool = True) -> Tensor:
        """``len(labels)`` images (decoded from latents in latent space; ``decode=False`` keeps the
        latents) by DDIM / DDPM in ``steps`` steps; ``cfg_scale != 1`` applies classifier-free
        guidance (the model needs a null class). DDPM uses the learned variance when there is one."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        labels = torch.as_tensor(labels, device=device, dtype=torch.long)
        size = size or (model.in_channels, model.input_size, model.input_size)
        learned = bool(getattr(model, 'learn_sigma', False))
        sched = make_scheduler(scheduler, self.num_train_timesteps, learned_variance=learned)
        sched.set_timesteps(steps, device=device)
        x = torch.randn((labels.shape[0], *size), generator=generator, device=device)
        c = size[0]
        for t in sched.timesteps:
            tt = torch.full((labels.shape[0],), int(t), device=device, dtype=torch.long)
            if cfg_scale == 1.0:
                out = model(x, tt, labels)
            else:
                out = model.forward_with_cfg(x, tt, labels, cfg_scale)
            out = out.float()
            pred = out[:, :2 * c] if (learned and scheduler == 'ddpm') else out[:, :c]
            x = sched.step(pred, t, x, generator=generator).prev_sample
        model.train(was_training)
        return self.decode(x) if decode else x


def load_generator(checkpoint: str | Path, use_ema: bool = True, vae: Optional[str] = None,
                   codec: Optional[LatentCodec] = None) -> Tuple[GenerationTask, nn.Module, Dict[str, Any]]:
    """``(task, model, metadata)`` from a generation checkpoint (a run folder: its best set, else
    last; a set folder; or a ``model.safetensors`` file) through :func:`emov2.factory.load_checkpoint`.

    ``use_ema`` loads the EMA weights beside the file (an error if there are none). ``vae``
    overrides the VAE folder recorded at training (latent-space checkpoints need one)."""
    weights = resolve_weights(str(checkpoint))
    meta = read_metadata(weights)
    if meta.get('task') != 'generation':
        raise CheckpointError(f'{weights} is not a generation checkpoint (its task is {meta.get("task")!r}); '
                              'train one with emov2 generate train')
    path = weights
    if use_ema:
        path = ema_path_for(str(weights))
        if path is None:
            raise CheckpointError(f'{weights} has no EMA weights beside it (ema.safetensors); use the raw weights '
                                  '(--no-ema) instead')
    diff = dict(meta.get('diffusion') or {})
    if vae:
        diff['vae'] = vae
    cfg = copy.deepcopy(merge(DEFAULTS, GenerationTask.defaults, strict=False))
    cfg['model'].update(name=meta['variant'], num_classes=meta['num_classes'], kwargs=meta.get('model_kwargs') or {})
    cfg['diffusion'] = {k: diff.get(k, v) for k, v in DIFFUSION_DEFAULTS.items()}
    task = GenerationTask(cfg, class_names=meta.get('class_names'), codec=codec)
    model = task.build_model(cfg)
    load_checkpoint(model, path, use_ema=use_ema, variant=meta['variant'], head='strict')
    return task, model.eval(), meta
