"""Checkpoint sets for training: safetensors weights (model, EMA) plus a state file for resuming.

``<tag>.safetensors`` and ``<tag>_ema.safetensors`` hold weights with metadata (variant, classes,
step); ``<tag>_state.pt`` holds optimiser, scheduler, scaler, counters and every rank's RNG state and
is written last. Every file is written atomically; on resume the step recorded in the weights must
match the state file, so a set torn by a kill between two writes is detected instead of used.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from ..checkpoint import CheckpointError, atomic_write, read_state_dict, save_safetensors

__all__ = ['rng_state', 'set_rng_state', 'save_weights', 'save_state', 'load_state', 'weights_paths']


def rng_state() -> Dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states in a weights-only-loadable form."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        'python': [py[0], list(py[1]), py[2]],
        'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state['numpy']
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state['torch'])
    if state.get('cuda') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def weights_paths(out_dir: Path, tag: str) -> Tuple[Path, Path, Path]:
    """``(model weights, EMA weights, state file)`` for checkpoint ``tag`` (``last``, ``best``)."""
    return out_dir / f'{tag}.safetensors', out_dir / f'{tag}_ema.safetensors', out_dir / f'{tag}_state.pt'


def save_weights(out_dir: Path, tag: str, model: torch.nn.Module, ema: Optional[torch.nn.Module],
                 meta: Mapping[str, Any]) -> None:
    """Write the model (and EMA) weights of checkpoint ``tag``."""
    w, e, _ = weights_paths(out_dir, tag)
    save_safetensors(model.state_dict(), w, {**meta, 'ema': False})
    if ema is not None:
        save_safetensors(ema.state_dict(), e, {**meta, 'ema': True})


def save_state(out_dir: Path, tag: str, state: Mapping[str, Any]) -> Path:
    """Atomically write the resume state of checkpoint ``tag``."""
    _, _, s = weights_paths(out_dir, tag)
    return atomic_write(s, lambda tmp: torch.save(dict(state), tmp))


def load_state(path: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """``(state, model weights, EMA weights or None)`` of the checkpoint whose state file or folder is ``path``."""
    path = Path(path)
    if path.is_dir():
        path = path / 'last_state.pt'
    if not path.is_file():
        raise CheckpointError(f'no resume state at {path}')
    tag = path.name[:-len('_state.pt')] if path.name.endswith('_state.pt') else path.stem
    state = torch.load(path, map_location='cpu', weights_only=True)
    w, e, _ = weights_paths(path.parent, tag)
    sd, meta = read_state_dict(w)
    if int(meta.get('step', -1)) != int(state['global_step']):
        raise CheckpointError(f'{w} (step {meta.get("step")}) does not belong to {path} '
                              f'(step {state["global_step"]}): the checkpoint set is torn')
    ema_sd = None
    if e.is_file():
        ema_sd, ema_meta = read_state_dict(e, use_ema=True)
        if int(ema_meta.get('step', -1)) != int(state['global_step']):
            raise CheckpointError(f'{e} does not belong to {path}: the checkpoint set is torn')
    if isinstance(state.get('config'), str):
        state['config'] = json.loads(state['config'])
    return state, sd, ema_sd
