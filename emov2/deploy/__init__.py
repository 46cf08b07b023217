"""Inference forms of models built from :mod:`emov2.layers`: same outputs, fewer ops, channels-last.

:func:`deploy` copies a model and walks its module tree, as ``timm.utils.reparameterize_model``
does: every module that has a faster inference form owns it as ``deploy_form(options)`` and the
walk puts the returned module in its place, then visits that module's children. Modules without
one (yours, timm's, torch's) are left as they are. What the layers do:

* every BatchNorm that follows a conv is folded into that conv (stems, DW convs); the BatchNorm
  before a block's pointwise expansion (stages 1-2) is folded into the expansion;
* LayerScale is folded into the block's output projection, the attention scale ``dim_head**-0.5``
  into the query projection; on a map that is a single window (stage 4 at 224 px) the neighbour
  and distant partitions coincide and are computed once;
* :class:`~emov2.models.EMO` merges its stem's last 1x1 conv into the first block's expansion (two
  linear maps in a row at the largest resolution), so the deployed stem output is not stage 0;
* on CPU, each 2D conv runs with its activation, or the block's residual add, in one oneDNN kernel
  (:class:`~emov2.layers.FusedConv2d`; plain ops where that kernel is missing or the dtype/device is
  not supported); in float32 a block without attention runs as one compiled kernel, its expanded map
  never written to memory, and so does an attention block on whole windows (an image per thread); the stem's
  first conv reads the NCHW image in a compiled kernel (no channels-last copy of the input); other 2D
  window attention runs in one compiled kernel (:mod:`emov2.kernels`), and under
  bf16 autocast stride-1 depthwise convs use the compiled bf16-pair kernel on AVX512-BF16 CPUs.

Then :func:`deploy` makes weights channels-last (1x1 convs run as GEMMs, depthwise convs use the
NHWC kernels, window partitions gather contiguous channel vectors) and wraps every stage in
:class:`MicroBatched`, which on CPU runs it over batch slices sized to the last-level cache.
The training-graph model (what :func:`emov2.create_model` returns) stays the plain reference.
"""
import copy
from typing import Any, Optional, Tuple

import torch
from torch import nn

from ..layers import DeployOptions, FusedConv2d, fold_norm_into_next_conv
from .micro_batch import MicroBatched, cache_budget, install_micro_batching, live_floats_per_pixel

__all__ = ['deploy', 'deploy_modules', 'is_deployed', 'to_channels_last', 'DeployOptions', 'MicroBatched',
           'FusedConv2d', 'fold_norm_into_next_conv', 'cache_budget', 'live_floats_per_pixel']

_DEPLOYED = '_emov2_deployed'
_CHANNELS_LAST_INPUTS = '_emov2_channels_last_inputs'


def deploy_modules(module: nn.Module, options: DeployOptions) -> nn.Module:
    """Replace ``module`` and, recursively, its children by their ``deploy_form`` (pre-order, in place)."""
    form = getattr(module, 'deploy_form', None)
    if callable(form):
        module = form(options)
    for name, child in list(module.named_children()):
        new = deploy_modules(child, options)
        if new is not child:
            setattr(module, name, new)
    return module


def is_deployed(model: nn.Module) -> bool:
    """True if ``model`` or a module inside it came out of :func:`deploy`."""
    return any(getattr(m, _DEPLOYED, False) for m in model.modules())


def _inputs_to_channels_last(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                 else a for a in args)


@torch.no_grad()
def _channels_last_weights(model: nn.Module) -> None:
    """4D parameters and buffers (2D conv weights) channels-last, in place."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Make ``model`` keep its 2D conv weights channels-last and take its 4D inputs channels-last
    (a forward pre-hook: converting a whole NCHW batch once is faster than the first conv's own
    reorder). In place; also for training. Tensors of other ranks (1D/3D blocks) stay as they are."""
    _channels_last_weights(model)
    if not getattr(model, _CHANNELS_LAST_INPUTS, False):
        model.register_forward_pre_hook(_inputs_to_channels_last)
        setattr(model, _CHANNELS_LAST_INPUTS, True)
    return model


@torch.no_grad()
def deploy(model: nn.Module, channels_last: bool = True, fuse: bool = True,
           micro_batch_bytes: Optional[int] = None, compiled_kernels: bool = True) -> nn.Module:
    """An eval-mode inference copy of ``model`` (any tree built from our layers; others pass through).

    ``fuse=False`` keeps plain PyTorch ops only (for exporters that do not know oneDNN ops).
    ``compiled_kernels`` (with ``fuse``) runs float32 blocks, 2D window attention, depthwise and (batch 1)
    1x1 convs, and bf16 depthwise convs in :mod:`emov2.kernels`' compiled kernels, built on first use (falls back to PyTorch/oneDNN ops where
    they cannot be built). ``micro_batch_bytes`` sizes the batch slices each stage runs on (default:
    from the CPU's last-level cache; 0 runs whole batches). The kernels' packed weights follow later weight
    changes made with ``load_state_dict``, in-place ops or replaced parameters, not edits through ``.data``
    (which bypass the version counter). Works inside ``torch.inference_mode()`` too.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'deploy expects an nn.Module, got {type(model).__name__}')
    if is_deployed(model):
        raise ValueError(f'{type(model).__name__} is already deployed: call emov2.deploy on the training-graph '
                         'model (folding twice would scale weights twice)')
    with torch.inference_mode(False):  # normal tensors even when called in inference mode: kernel caches read versions
        model = copy.deepcopy(model).eval()
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_inference():  # a model built in inference mode
                t.data = t.clone()
        model = deploy_modules(model, DeployOptions(onednn=fuse, compiled_kernels=fuse and compiled_kernels))
    if channels_last:  # weights only: FusedConv2d makes inputs channels-last per (micro-)batch slice
        _channels_last_weights(model)
    budget = int(micro_batch_bytes if micro_batch_bytes is not None else cache_budget())
    if budget > 0:
        model = install_micro_batching(model, budget)
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, _DEPLOYED, True)
    return model.eval()
