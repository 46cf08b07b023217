"""Reading and writing checkpoints safely.

Reads official EMO/EMOv2 pickles (``torch.load(weights_only=True)``: no code execution), timm-style
dicts and this project's safetensors files. Writes are atomic: a temporary file in the target
folder, fsync, then ``os.replace`` — a killed process never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file

PathLike = Union[str, os.PathLike]

__all__ = ['CheckpointError', 'atomic_write', 'apply_user_mode', 'save_safetensors', 'read_state_dict',
           'read_metadata']


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or does not fit the model."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_user_mode(path: PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would (0666/0777 minus the umask):
    ``tempfile`` creates private (0600/0700) files, which other users of a shared run folder could not read."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then move the finished file to ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        apply_user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_safetensors(
        state_dict: Mapping[str, torch.Tensor],
        path: PathLike,
        metadata: Optional[Mapping[str, Any]] = None,
        atomic: bool = True,
) -> Path:
    """Write tensors (made contiguous, de-aliased) and JSON-able metadata; ``atomic=False`` writes
    in place (for files inside a folder that is itself committed atomically), fsynced either way."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    meta = {'format': 'pt', 'emov2': json.dumps(dict(metadata or {}))}
    if atomic:
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    path = Path(path)
    with open(path, 'wb') as f:  # Python writes: a full disk surfaces as OSError(ENOSPC)
        f.write(save(tensors, metadata=meta))
        f.flush()
        os.fsync(f.fileno())
    apply_user_mode(path)
    return path


def _is_safetensors(path: Path) -> bool:
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], 'little')
    return 0 < header_len < 100_000_000 and head[8:9] == b'{'


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The metadata this project stores in its safetensors files ({} for other files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}' if not path.exists() else
                              f'checkpoint {path} is a folder, not a file')
    if not _is_safetensors(path):
        return {}
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f'cannot read safetensors checkpoint {path}: {e}') from e
    try:
        out = json.loads(meta.get('emov2', '{}'))
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{path}: its "emov2" metadata is not valid JSON ({e})') from e
    if not isinstance(out, dict):
        raise CheckpointError(f'{path}: its "emov2" metadata is a {type(out).__name__}, expected a JSON object')
    return out


def read_state_dict(path: PathLike, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Return ``(state_dict, metadata)`` from an official, timm-style or project checkpoint.

    Official files are a bare state dict or a dict with ``net`` (weights) and ``net_E`` (EMA
    weights); ``use_ema=True`` picks the EMA weights and fails if the file has none.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}' if not path.exists() else
                              f'checkpoint {path} is a folder, not a file')
    if _is_safetensors(path):
        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f'cannot read safetensors checkpoint {path}: {e}') from e
        meta = read_metadata(path)
        if use_ema and not meta.get('ema', False):
            raise CheckpointError(f'{path} holds no EMA weights (use_ema=True was asked for)')
        return sd, meta
    if path.suffix.lower() == '.onnx':
        raise CheckpointError(f'{path} is an exported ONNX model, not a checkpoint: run it with onnxruntime; '
                              'checkpoints are .safetensors or .pth files')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        if 'TorchScript' in str(e):
            raise CheckpointError(f'{path} is an exported TorchScript model, not a checkpoint: run it with '
                                  'torch.jit.load; checkpoints are .safetensors or .pth files') from e
        text = str(e).split('Unpickler error:', 1)[-1]  # torch names the cause after this marker
        reason = next((ln.strip() for ln in text.splitlines() if ln.strip()), '')
        raise CheckpointError(f'cannot read checkpoint {path}: not a safetensors file, and not a torch file that '
                              f'loads without running code ({type(e).__name__}: {reason[:200]})') from e
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a state dict')
    ema_keys = ('net_E', 'state_dict_ema', 'model_ema')
    weight_keys = ('net', 'state_dict', 'model')
    for key in (ema_keys if use_ema else weight_keys):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    else:
        if use_ema:
            raise CheckpointError(f'{path} holds no EMA weights (looked for {", ".join(ema_keys)})')
    sd = {k.removeprefix('module.'): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f'{path} holds no tensors')
    return sd, {}
