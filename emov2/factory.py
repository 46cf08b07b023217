"""``create_model``: build a registered EMO model and load a checkpoint into it, strictly."""
from __future__ import annotations

import difflib
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import timm
from timm.models import adapt_input_conv
import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, read_state_dict
from .models.emo import EMO_CONFIGS, checkpoint_filter_fn

__all__ = ['create_model', 'list_models', 'load_checkpoint', 'guess_variant', 'UnknownModelError',
           'check_model_name']


def list_models() -> List[str]:
    """Names of every registered EMOv2 / EMOv1 model."""
    return list(EMO_CONFIGS)


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
    if not isinstance(name, str) or name not in EMO_CONFIGS:
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


def load_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool = False,
                    variant: Optional[str] = None) -> Dict[str, Any]:
    """Load an official or project checkpoint into ``model``; every tensor must fit.

    A head of another size is left re-initialised with a warning (fine-tuning); any other missing,
    unexpected or differently shaped tensor raises :class:`CheckpointError` naming the variant the
    file looks like and the first differing keys. Returns the file's metadata.
    """
    raw, meta = read_state_dict(path, use_ema=use_ema)
    state_dict = checkpoint_filter_fn(raw, model)
    first_conv = 'stem.0.conv.weight'
    in_chans = getattr(model, 'in_chans', 3)
    if first_conv in state_dict and state_dict[first_conv].shape[1] != in_chans:
        state_dict[first_conv] = adapt_input_conv(in_chans, state_dict[first_conv])
    model_shapes = _shapes(model)
    ckpt_shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    ckpt_head, model_head = ckpt_shapes.get('head.weight'), model_shapes.get('head.weight')
    # only the number of classes may differ: same features in, another (or no) classifier out
    features_in = getattr(model, 'num_features', None)
    head_differs = ckpt_head != model_head and (ckpt_head is None or ckpt_head[1:] == (features_in,))
    if head_differs:
        ckpt_classes = ckpt_shapes.get('head.weight', (0,))[0]
        warnings.warn(f'{path}: the checkpoint head has {ckpt_classes} classes, the model '
                      f'{getattr(model, "num_classes", "?")}; the head is re-initialised')
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('head.')}
        ckpt_shapes = {k: s for k, s in ckpt_shapes.items() if not k.startswith('head.')}
        model_shapes = {k: s for k, s in model_shapes.items() if not k.startswith('head.')}
    if model_shapes != ckpt_shapes:
        looks_like = meta.get('variant') or guess_variant(state_dict)
        raise CheckpointError(
            f'checkpoint {path} does not fit model {variant or type(model).__name__}'
            f'{f" (it looks like {looks_like})" if looks_like else ""}; first differences:\n'
            + _describe_mismatch(model_shapes, ckpt_shapes))
    model.load_state_dict(state_dict, strict=not head_differs)
    return meta


def create_model(
        name: str,
        checkpoint: Optional[str | os.PathLike] = None,
        use_ema: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
        window_size: int = 7,
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
    model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans, window_size=window_size,
                              drop_path_rate=drop_path_rate, **switches)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, use_ema=use_ema, variant=name)
    return model
