"""Checkpoint sets of a training run, committed atomically as a whole.

A run folder holds its checkpoints as *sets*: one folder per saved step under ``checkpoints/``
with the model weights (``model.safetensors``), the EMA weights (``ema.safetensors``), the resume
state (``state.pt``: optimiser, scheduler, scaler, counters, every rank's RNG) and, at epoch ends,
the epoch's metrics (``metrics.json``). ``last`` and ``best`` are symbolic links to sets::

    runs/x/last -> checkpoints/step_00000120
    runs/x/best -> checkpoints/step_00000100

A save writes a new set into a temporary folder, flushes every file and the folder to disk,
renames it into place, then moves ``best`` (if it changed) and ``last`` to it, each with one
atomic ``rename`` of a new link, and only then deletes sets no link points to. A process killed
at any point, or a disk that fills up, leaves the previous complete set in use; ``best`` moves
before ``last``, so a kill between the two can only make a resumed run redo (and rewrite) the
epoch that produced the better score, never lose it. Temporary folders of killed saves are
removed by the next save.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch

from ..checkpoint import CheckpointError, apply_user_mode, read_state_dict, save_safetensors

__all__ = ['rng_state', 'set_rng_state', 'commit_checkpoint', 'load_state', 'resolve_checkpoint_set',
           'linked_set', 'run_has_checkpoints', 'check_links_supported', 'is_disk_full', 'DiskFullError', 'MODEL_FILE', 'EMA_FILE', 'STATE_FILE',
           'METRICS_FILE', 'SETS_DIR']

MODEL_FILE, EMA_FILE, STATE_FILE, METRICS_FILE = 'model.safetensors', 'ema.safetensors', 'state.pt', 'metrics.json'
SETS_DIR = 'checkpoints'
_TMP_PREFIX = '.tmp-'


class DiskFullError(CheckpointError):
    """The disk filled up while a checkpoint set was written (the previous set is intact)."""


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


def _reached(stage: str) -> None:
    """A point between two steps of a commit (tests replace this to kill the process there)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC, however the writer wrapped it (torch.save reports ``enforce fail at inline_container``)."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if e is not None and ('No space left' in str(e) or 'os error 28' in str(e)):
            return True
    if isinstance(exc, RuntimeError) and 'inline_container' in str(exc):
        try:
            return shutil.disk_usage(folder).free < 64 * 2 ** 20
        except OSError:
            return False
    return False


def linked_set(run_dir: os.PathLike, tag: str) -> Optional[Path]:
    """The set folder that ``run_dir/tag`` (``last``, ``best``) points to, or None. A real folder
    holding a set there (a run copied with links followed) counts too."""
    link = Path(run_dir) / tag
    if not link.is_symlink():
        return link.resolve() if (link / MODEL_FILE).is_file() else None
    target = (link.parent / os.readlink(link)).resolve()
    return target if target.is_dir() else None


def run_has_checkpoints(run_dir: os.PathLike) -> bool:
    """True when ``run_dir`` holds a committed checkpoint set."""
    return linked_set(run_dir, 'last') is not None


def _point(run_dir: Path, tag: str, target: Path) -> None:
    """Make ``run_dir/tag`` a link to ``target`` with one atomic rename."""
    tmp = run_dir / f'{_TMP_PREFIX}{tag}-link-{os.getpid()}'
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, run_dir), tmp)
    dest = run_dir / tag
    if dest.is_dir() and not dest.is_symlink():  # a copied run whose links became folders
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def check_links_supported(run_dir: os.PathLike) -> None:
    """Fail before training, not at the first save, where the file system cannot hold symbolic links."""
    probe = Path(run_dir) / f'{_TMP_PREFIX}link-probe-{os.getpid()}'
    try:
        if probe.is_symlink():
            probe.unlink()
        os.symlink('.', probe)
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f'{run_dir} is on a file system without symbolic links ({e.strerror}); checkpoint '
                              'sets need them: choose an output folder on another file system') from e


def _collect_garbage(run_dir: Path) -> None:
    """Delete sets no link points to and leftovers of killed saves."""
    keep = {linked_set(run_dir, tag) for tag in ('last', 'best')}
    sets = run_dir / SETS_DIR
    for p in list(sets.iterdir()) if sets.is_dir() else []:
        if p.resolve() not in keep:  # (one process per run folder: the trainer holds its lock)
            shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(f'{_TMP_PREFIX}*'):
        if p.is_symlink() or p.is_file():
            p.unlink()


def _write_state(state: Mapping[str, Any], path: Path) -> None:
    with open(path, 'wb') as f:  # a Python file object: a full disk surfaces as OSError(ENOSPC)
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    apply_user_mode(path)


def commit_checkpoint(run_dir: os.PathLike, tags: Iterable[str], step: int, model_state: Mapping[str, torch.Tensor],
                      ema_state: Optional[Mapping[str, torch.Tensor]], meta: Mapping[str, Any],
                      state: Optional[Mapping[str, Any]] = None,
                      metrics: Optional[Mapping[str, Any]] = None) -> Path:
    """Write one checkpoint set and point each of ``tags`` at it, atomically as a whole.

    Raises :class:`DiskFullError` (after removing the partial set) when the disk fills up; the
    sets the links pointed to before stay complete and in use.
    """
    run_dir = Path(run_dir)
    sets = run_dir / SETS_DIR
    sets.mkdir(parents=True, exist_ok=True)
    name = f'step_{int(step):08d}'
    n = 1
    while (sets / name).exists():  # a re-run of the same step (after a resume) gets its own folder
        n += 1
        name = f'step_{int(step):08d}-{n}'
    tmp = sets / f'{_TMP_PREFIX}{name}'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _reached('tmp_created')
    try:
        save_safetensors(model_state, tmp / MODEL_FILE, {**meta, 'ema': False, 'step': int(step)}, atomic=False)
        _reached('model_written')
        if ema_state is not None:
            save_safetensors(ema_state, tmp / EMA_FILE, {**meta, 'ema': True, 'step': int(step)}, atomic=False)
        if metrics is not None:
            (tmp / METRICS_FILE).write_text(json.dumps(dict(metrics), indent=2))
            apply_user_mode(tmp / METRICS_FILE)
        _reached('weights_written')
        if state is not None:
            _write_state({**state, 'global_step': int(step)}, tmp / STATE_FILE)
        _reached('state_written')
        _fsync_dir(tmp)
        apply_user_mode(tmp, directory=True)
        os.rename(tmp, sets / name)
        _fsync_dir(sets)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e, sets):
            before = linked_set(run_dir, 'last')
            free = shutil.disk_usage(sets).free / 2 ** 20
            raise DiskFullError(
                f'disk full: could not write the checkpoint of step {step} to {sets} ({free:.0f} MiB free); '
                f'the previous checkpoint {"(" + before.name + ") " if before else ""}is intact. '
                'Free some space and resume with --resume auto.') from e
        raise
    _reached('set_renamed')
    target = sets / name
    for tag in sorted(tags):  # 'best' before 'last' (see the module docstring)
        _point(run_dir, tag, target)
        _reached(f'{tag}_linked')
    _fsync_dir(run_dir)
    _collect_garbage(run_dir)
    _reached('garbage_collected')
    return target


def resolve_checkpoint_set(path: os.PathLike) -> Path:
    """The set folder named by ``path``: a run folder (its ``last``), a ``last``/``best`` link, a set
    folder, or a file inside one."""
    path = Path(path)
    if path.is_file() and (path.parent / MODEL_FILE).is_file():
        return path.parent.resolve()
    if path.is_dir():
        last = linked_set(path, 'last')
        if last is not None:
            return last
        if (path / STATE_FILE).is_file() or (path / MODEL_FILE).is_file():
            return path.resolve()
    raise CheckpointError(f'no checkpoint set at {path} (expected a run folder with a "last" link, or a '
                          f'folder holding {STATE_FILE})')


def load_state(path: os.PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """``(state, model weights, EMA weights or None)`` of the set ``path`` names (see
    :func:`resolve_checkpoint_set`)."""
    folder = resolve_checkpoint_set(path)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f'{folder} holds weights but no resume state ({STATE_FILE})')
    try:
        state = torch.load(state_path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'cannot read resume state {state_path} ({type(e).__name__}: {str(e)[:200]})') from e
    sd, meta = read_state_dict(folder / MODEL_FILE)
    if int(meta.get('step', -1)) != int(state['global_step']):  # cannot happen with commit_checkpoint
        raise CheckpointError(f'{folder / MODEL_FILE} (step {meta.get("step")}) does not belong to {state_path} '
                              f'(step {state["global_step"]})')
    ema_sd = None
    if (folder / EMA_FILE).is_file():
        ema_sd, _ = read_state_dict(folder / EMA_FILE, use_ema=True)
    if isinstance(state.get('config'), str):
        state['config'] = json.loads(state['config'])
    return state, sd, ema_sd

