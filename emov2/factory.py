"""``create_model``: build a registered EMO model and load a checkpoint into it, strictly."""
from __future__ import annotations

import difflib
import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
from timm.models import adapt_input_conv
import torch
from torch import Tensor, nn

from . import models as _families  # noqa: F401  (registers every family in timm)
from .checkpoint import CheckpointError, read_state_dict
from .models.emo import EMO_CONFIGS

_FAMILY_PREFIX = 'emov2.models.'

__all__ = ['create_model', 'list_models', 'load_checkpoint', 'guess_variant', 'UnknownModelError',
           'check_model_name']


def list_models(module: Optional[str] = None) -> List[str]:
    """Every model this package registers in timm (all families under ``emov2.models``), or those
    of one family module (``'emo'``)."""
    names = []
    for name in timm.list_models():
        where = timm.models.model_entrypoint(name).__module__
        if where.startswith(_FAMILY_PREFIX) and (module is None or where == _FAMILY_PREFIX + module):
            names.append(name)
    return names


class UnknownModelError(ValueError):
    """A model name that is not registered. The message suggests the closest name and lists them all."""

    def __init__(self, name: object, available: Optional[List[str]] = None):
        self.name = name
        self.available = list(list_models() if available is None else available)
        lower = {a.lower(): a for a in self.available}
        close = difflib.get_close_matches(str(name).lower(), list(lower), n=1, cutoff=0.6)
        self.suggestion: Optional[str] = lower[close[0]] if close else None
        hint = f'; did you mean {self.suggestion!r}?' if self.suggestion else ''
        super().__init__(f'unknown model {name!r}{hint} (available: {", ".join(self.available)})')


def check_model_name(name: object) -> str:
    """Return ``name`` if it is a registered model, else raise :class:`UnknownModelError`."""
    if not isinstance(name, str) or name not in list_models():
        raise UnknownModelError(name)
    return name


def _shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def guess_variant(state_dict: Dict[str, Tensor], num_classes: Optional[int] = None) -> Optional[str]:
    """The registered variant whose (converted) key names and shapes match ``state_dict``, if any."""
    want = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith('head.')}
    for name in EMO_CONFIGS:
        with torch.device('meta'):
            ref = timm.create_model(name, num_classes=0)
        if {k: s for k, s in _shapes(ref).items() if not k.startswith('head.')} == want:
            return name
    return None


def _describe_mismatch(model_shapes: Dict[str, Tuple[int, ...]], ckpt_shapes: Dict[str, Tuple[int, ...]],
                       limit: int = 5) -> str:
    lines = []
    for k in model_shapes:
        if k not in ckpt_shapes:
            lines.append(f'  missing in checkpoint: {k} {list(model_shapes[k])}')
        elif model_shapes[k] != ckpt_shapes[k]:
            lines.append(f'  {k}: checkpoint {list(ckpt_shapes[k])} vs model {list(model_shapes[k])}')
        if len(lines) >= limit:
            break
    extra = [k for k in ckpt_shapes if k not in model_shapes][:max(0, limit - len(lines))]
    lines += [f'  unexpected in checkpoint: {k} {list(ckpt_shapes[k])}' for k in extra]
    return '\n'.join(lines)


def _filter_for(model: nn.Module) -> Callable[[Dict[str, Any], nn.Module], Dict[str, Tensor]]:
    """The model family's own checkpoint filter (timm's convention: ``checkpoint_filter_fn`` in the
    module that defines the model), unwrapping ``net``/``state_dict``/``model`` dicts otherwise."""
    fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    return fn if fn is not None else _unwrap


def _unwrap(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    for key in ('net', 'state_dict', 'model'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return {k.removeprefix('module.'): v for k, v in state_dict.items() if isinstance(v, Tensor)}


def _head_prefixes(model: nn.Module) -> Tuple[str, ...]:
    """State-dict prefixes of the classifier (``pretrained_cfg['classifier']``; ``head`` for EMO)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('classifier', 'head')
    return tuple(f'{n}.' for n in ([names] if isinstance(names, str) else names))


def load_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool = False,
                    variant: Optional[str] = None, head: str = 'reinit') -> Dict[str, Any]:
    """Load an official, timm-style or project checkpoint into ``model``: the one loader.

    The file is read once, weights-only (safetensors or ``torch.load(weights_only=True)``), passed
    through the model family's checkpoint filter (official EMO keys -> ours), its first conv adapted
    to ``model``'s input channels. ``head='reinit'`` leaves a classifier of another size initialised
    (with a warning: fine-tuning); ``head='strict'`` fails on it. Any other missing, unexpected or
    differently shaped tensor, and any integer/bool tensor where the model holds floats, raises
    :class:`CheckpointError` naming the first differences (and the variant the file looks like).
    Returns the file's metadata.
    """
    if head not in ('reinit', 'strict'):
        raise ValueError(f"head must be 'reinit' or 'strict', got {head!r}")
    raw, meta = read_state_dict(path, use_ema=use_ema)
    state_dict = _filter_for(model)(raw, model)
    own = model.state_dict()
    first_conv = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')
    key = f'{first_conv}.weight' if first_conv else None
    if key in state_dict and key in own and state_dict[key].shape[1] != own[key].shape[1]:
        state_dict[key] = adapt_input_conv(own[key].shape[1], state_dict[key])
    wrong_dtype = [k for k, v in state_dict.items()
                   if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if wrong_dtype:
        raise CheckpointError(f'{path}: tensors that must be floating point are stored as '
                              f'{state_dict[wrong_dtype[0]].dtype} ({", ".join(wrong_dtype[:3])}'
                              f'{" ..." if len(wrong_dtype) > 3 else ""}); a quantised or corrupt file is not loaded')
    model_shapes = _shapes(model)
    ckpt_shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    heads = _head_prefixes(model)
    in_head = lambda k: k.startswith(heads)  # noqa: E731
    # only the number of classes may differ: same features in, another (or no) classifier out
    body_fits = {k: s for k, s in model_shapes.items() if not in_head(k)} == \
        {k: s for k, s in ckpt_shapes.items() if not in_head(k)}
    head_differs = body_fits and {k: s for k, s in model_shapes.items() if in_head(k)} != \
        {k: s for k, s in ckpt_shapes.items() if in_head(k)}
    if head_differs and head == 'reinit':
        ckpt_classes = next((s[0] for k, s in ckpt_shapes.items() if in_head(k) and k.endswith('weight')), 0)
        warnings.warn(f'{path}: the checkpoint head has {ckpt_classes} classes, the model '
                      f'{getattr(model, "num_classes", "?")}; the head is re-initialised')
        state_dict = {k: v for k, v in state_dict.items() if not in_head(k)}
        ckpt_shapes = {k: s for k, s in ckpt_shapes.items() if not in_head(k)}
        model_shapes = {k: s for k, s in model_shapes.items() if not in_head(k)}
    if model_shapes != ckpt_shapes:
        looks_like = meta.get('variant') or guess_variant(state_dict)
        raise CheckpointError(
            f'checkpoint {path} does not fit model {variant or type(model).__name__}'
            f'{f" (it looks like {looks_like})" if looks_like else ""}; first differences:\n'
            + _describe_mismatch(model_shapes, ckpt_shapes))
    model.load_state_dict(state_dict, strict=not (head_differs and head == 'reinit'))
    return meta


def create_model(
        name: str,
        checkpoint: Optional[str | os.PathLike] = None,
        use_ema: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        window_size: Optional[int | Tuple[int, ...]] = None,
        drop_path_rate: Optional[float] = None,
        **switches: Any,
) -> nn.Module:
    """Build ``name`` (see :func:`list_models`) with the paper's ablation ``switches`` and load ``checkpoint``.

    With ``in_chans != 3`` the checkpoint's first conv is adapted as timm does (summed for one
    channel, repeated and rescaled for more).

    An unknown ``name`` raises :class:`UnknownModelError` (a ``ValueError``) naming the closest models.

    ``checkpoint`` is an official file (a bare state dict, or ``net``/``net_E`` with ``use_ema``)
    or a safetensors file this project wrote. Files are read with ``weights_only=True``.
    """
    check_model_name(name)
    if window_size is not None:  # else the family's own default (7 for EMO, 2x5x5 for V-EMO)
        switches['window_size'] = window_size
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate,
                              **switches)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, use_ema=use_ema, variant=name)
    return model
