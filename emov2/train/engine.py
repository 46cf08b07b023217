"""The training loop: the paper's recipe on timm's building blocks, resumable to the bit.

``Trainer(cfg, task=...).fit()`` asks its :class:`~emov2.train.task.Task` (classification by default)
for the data, the model, the loss and the metrics, and brings the rest: AdamW (no decay on the
model's ``no_weight_decay()`` set and 1-D parameters), a per-iteration cosine schedule with warm-up,
``ModelEmaV3``, gradient clipping and AMP, per-epoch evaluation, logs and checkpoints.

Guarantees:

* Resume: ``last`` checkpoints hold model, EMA, optimiser, scheduler, scaler, step counters and every
  rank's RNG state; data order and augmentation are functions of (seed, epoch, index), so a run
  stopped mid-epoch and resumed ends with exactly the weights of an uninterrupted run.
* SIGTERM / SIGINT: the current step finishes, a resumable checkpoint is written, ``fit`` returns.
* A NaN/inf loss (or gradient), or an update that makes the weights non-finite or changes them by
  more than ``train.max_update_ratio`` times their norm, is undone with a warning (weights, optimiser
  state and BatchNorm statistics); after ``train.max_nonfinite`` bad steps in a row
  ``NonFiniteLossError`` is raised without writing any checkpoint, so the last good sets stay as they
  were. Resuming with other hyperparameters (``optim.lr=...``) applies them and logs each change.
* Checkpoints are sets committed atomically as a whole (:mod:`emov2.train.state`): a kill or a full
  disk during a save leaves the previous set in use.
* Evaluation is right from the first epoch: before each evaluation and epoch checkpoint the
  BatchNorm statistics of the model and of its EMA are recomputed on training images with the
  weights fixed (fvcore's precise BN; early in training the running averages lag far behind the
  weights, and EMO's block-0 LayerScale of 1e-6 makes the first statistics tiny), and the EMA decay
  warms up (timm ``ModelEmaV3``).
* A run never overwrites another: a folder that holds a run is refused unless resumed or
  ``train.overwrite`` is set.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoint import atomic_write
from .config import ConfigError, scaled_lrs
from .data import ResumableSampler, SeededDataset, ignore_sigint_in_worker, shard_indices
from .distributed import DistInfo, all_gather_object, all_reduce_min, all_reduce_sum, barrier, init_distributed, is_dist
from .report import MetricsLogger, plot_curves, read_log
from .state import (check_links_supported, commit_checkpoint, linked_set, load_state, rng_state, run_has_checkpoints,
                    set_rng_state)
from .task import ClassificationTask, Task

__all__ = ['Trainer', 'TrainResult', 'NonFiniteLossError', 'RunExistsError', 'RunFinishedError', 'amp_dtype_for',
           'RUN_FILES', 'clear_run_folder']

_log = logging.getLogger('emov2.train')


class NonFiniteLossError(RuntimeError):
    """Too many bad steps (NaN/inf losses, exploding updates) in a row: skipping steps cannot recover."""


class RunExistsError(ValueError):
    """The output folder already holds a run and neither resuming nor overwriting was asked for."""


class RunFinishedError(ValueError):
    """A resume of a run that already trained all its epochs (nothing to do, nothing rewritten)."""


#: what a run writes into its folder (``clear_run_folder`` removes exactly these)
RUN_FILES = ('config.json', 'log.jsonl', 'log.csv', 'summary.json', 'curves.png', 'last', 'best', 'checkpoints',
             'tensorboard', 'metrics.json', 'confusion_matrix.png', 'samples.png', 'test_images',
             # files of the earlier flat layout
             'last.safetensors', 'last_ema.safetensors', 'last_state.pt', 'best.safetensors',
             'best_ema.safetensors', 'best.json')


def holds_run(folder: Path) -> bool:
    """True when ``folder`` has files a training run wrote."""
    return folder.is_dir() and any((folder / n).exists() or (folder / n).is_symlink() for n in RUN_FILES)


def clear_run_folder(folder: Path) -> None:
    """Remove a run's own files from ``folder`` (and nothing else the user keeps there)."""
    for n in RUN_FILES:
        p = folder / n
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def check_out_dir(folder: Path) -> None:
    """Fail early, naming the culprit, when ``folder`` cannot be a folder (it or a parent is a file)."""
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f'output folder {folder} cannot be created: {p} is a file')


#: config keys that define the network: a resumed run must keep them
_ARCHITECTURE_KEYS = ('model.name', 'model.kwargs', 'model.window_size', 'model.num_classes')
#: config keys whose change makes an exact resume impossible (sample order / positions)
_POSITION_KEYS = ('optim.batch_size', 'train.seed', 'optim.name')
#: config keys that may differ on resume without being worth a log line
_QUIET_KEYS = ('train.out', 'train.progress', 'train.overwrite', 'data.workers', 'data.pin_memory', 'data.root',
               'model.pretrained')


def _flat(cfg: Mapping[str, Any], prefix: str = '') -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping) and k != 'kwargs':
            out.update(_flat(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


class _Together(nn.Module):
    """Runs several networks on one input (BatchNorm statistics of a model and its EMA in one pass)."""

    def __init__(self, nets: Sequence[nn.Module], run: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.run = run

    def forward(self, x: Any) -> None:
        for net in self.nets:
            self.run(net, x)


class _ConstantSchedule:
    """The peak lr after a linear warm-up of ``warmup_steps`` from ``warmup_lr`` (a pure function of the step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, warmup_lr: float) -> None:
        self.optimizer, self.warmup_steps, self.warmup_lr = optimizer, warmup_steps, warmup_lr

    def step_update(self, num_updates: int) -> None:
        frac = min(1.0, num_updates / self.warmup_steps) if self.warmup_steps else 1.0
        for group in self.optimizer.param_groups:
            group['lr'] = self.warmup_lr + frac * (group['initial_lr'] - self.warmup_lr)


@dataclass
class TrainResult:
    """What ``fit`` did: where it wrote, how far it got and the final/best metrics."""
    out_dir: Path
    epochs_done: int
    global_step: int
    stopped_early: bool
    best_score: Optional[float]
    last_metrics: Dict[str, Any] = field(default_factory=dict)
    skipped_images: int = 0
    nonfinite_steps: int = 0
    rank_checksums: List[float] = field(default_factory=list)
    score_name: str = 'top1'

    @property
    def best_top1(self) -> Optional[float]:
        """The best validation score of a classification run (top-1, model or EMA)."""
        return self.best_score


def amp_dtype_for(cfg: Mapping[str, Any], device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype from ``train.amp`` / ``train.amp_dtype`` (bf16 on CPU, fp16 on CUDA by default)."""
    if not cfg['train']['amp']:
        return None
    name = cfg['train']['amp_dtype']
    if name == 'auto':
        return torch.float16 if device.type == 'cuda' else torch.bfloat16
    return getattr(torch, name)


def _checksum(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() + p.detach().double().sum() * 1e-3
                         for p in model.parameters()))


class _StopFlag:
    """Set by SIGTERM/SIGINT; the previous handlers come back on ``restore``."""

    def __init__(self) -> None:
        self.set = False
        self._old: Dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.set:
            _log.warning('received signal %d: finishing this step, saving a checkpoint and stopping', signum)
        self.set = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


class Trainer:
    """Train one model from a config (see :mod:`emov2.train.config`).

    ``train_dataset`` / ``val_dataset`` replace the datasets built from ``data.root`` (the demo and
    tests pass in-memory data); they must return ``(tensor image, int label)`` or ``None`` for a
    sample to skip. ``step_callback(trainer, global_step)`` runs after every step (tests use it to
    deliver a signal or inject a fault). ``resume`` is a checkpoint folder or ``*_state.pt`` file.
    """

    def __init__(self, cfg: Mapping[str, Any], train_dataset: Optional[Dataset] = None,
                 val_dataset: Optional[Dataset] = None, class_names: Optional[Sequence[str]] = None,
                 resume: Optional[str] = None, step_callback: Optional[Callable[['Trainer', int], None]] = None,
                 out_dir: Optional[str] = None, task: Optional[Task] = None) -> None:
        self.cfg = json.loads(json.dumps(cfg))  # private, JSON-able copy
        self.task = task or ClassificationTask(self.cfg, class_names)
        self.task.cfg = self.cfg
        self.out_dir = Path(out_dir or self.cfg['train']['out'])
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.resume = resume
        self.step_callback = step_callback
        self.stop = _StopFlag()
        self.global_step = 0

    # -- setup --------------------------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)

    def _setup(self) -> None:
        cfg = self.cfg
        dev = self.dist.device
        seed = int(cfg['train']['seed'])
        self._seed(seed)  # same initial weights on every rank
        if self.train_dataset is None:
            self.train_dataset, self.val_dataset = self.task.build_datasets(cfg)
        self.task.bind_data(self.train_dataset)
        model = self.task.build_model(cfg)
        self.train_seeded = SeededDataset(self.train_dataset, seed)

        world = self.dist.world
        total_bs = int(cfg['optim']['batch_size'])
        if total_bs % world:
            raise ValueError(f'optim.batch_size {total_bs} is not divisible by the {world} processes')
        self.batch_size = total_bs // world
        self.sampler = ResumableSampler(len(self.train_seeded), self.batch_size, self.dist.rank, world,
                                        shuffle=True, seed=seed, drop_last=True)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch < 1:
            raise ValueError(f'{len(self.train_seeded)} training images are fewer than one batch of '
                             f'{self.batch_size} per process; lower optim.batch_size')
        self.workers = int(cfg['data']['workers'])
        self.pin = bool(cfg['data']['pin_memory']) and dev.type == 'cuda'
        self.train_loader = DataLoader(self.train_seeded, batch_size=self.batch_size, sampler=self.sampler,
                                       num_workers=self.workers, collate_fn=self.task.collate, pin_memory=self.pin,
                                       generator=torch.Generator(), persistent_workers=False,
                                       worker_init_fn=ignore_sigint_in_worker)
        self.val_loader = None
        if self.val_dataset is not None and len(self.val_dataset) > 0:
            shard = Subset(self.val_dataset, shard_indices(len(self.val_dataset), self.dist.rank, world))
            self.val_loader = DataLoader(shard, batch_size=int(cfg['eval']['batch_size']), shuffle=False,
                                         num_workers=self.workers, collate_fn=self.task.collate,
                                         pin_memory=self.pin, worker_init_fn=ignore_sigint_in_worker)

        model.to(dev)
        self.channels_last = bool(cfg['train']['channels_last'])
        if self.channels_last:  # NHWC convs and window gathers: about 1.5-2x a CPU training step
            model.to(memory_format=torch.channels_last)
        if world > 1 and cfg['train']['sync_bn']:
            if dev.type == 'cuda':
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.dist.main:
                _log.warning('train.sync_bn ignored: PyTorch SyncBatchNorm needs CUDA')
        self.model = model
        self.ddp = None
        if world > 1:
            ids = [dev.index] if dev.type == 'cuda' else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)

        self.lrs = scaled_lrs(cfg)
        o = cfg['optim']
        self.optimizer = create_optimizer_v2(model, o['name'], lr=self.lrs['lr'], weight_decay=float(o['weight_decay']),
                                             betas=tuple(o['betas']), eps=float(o['eps']), filter_bias_and_bn=True)
        self.epochs = int(cfg['sched']['epochs'])

        self.ema = None
        e = cfg['ema']
        if e['enable']:
            self.ema = ModelEmaV3(model, decay=float(e['decay']), use_warmup=bool(e['warmup']),
                                  warmup_power=float(e['warmup_power']))

        self.task.setup(model, dev)

        self.amp_dtype = amp_dtype_for(cfg, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16 and dev.type == 'cuda')

        # counters (restored on resume)
        self.start_epoch, self.start_batch = 0, 0
        self.best_score: Optional[float] = None
        self.best_epoch = -1
        self.skipped_images = 0
        self.nonfinite_total = 0
        self.epoch_sums: Dict[str, float] = {}  # loss, steps and the task's training counts
        if self.resume:
            self._load_resume(self.resume)
        else:
            self._seed(seed + 1000 * self.dist.rank)  # per-rank stream for drop path etc.
        self._build_scheduler()
        self.logger = MetricsLogger(self.out_dir, cfg['train']['log_format'],
                                    cfg['train']['tensorboard']) if self.dist.main else None

    def _build_scheduler(self) -> None:
        """Per-iteration cosine with warm-up from the current config (a pure function of the step)."""
        s = self.cfg['sched']
        for group in self.optimizer.param_groups:
            group['initial_lr'] = self.lrs['lr'] * group.get('lr_scale', 1.0)
        if s['name'] == 'constant':  # DiT's recipe; timm before 1.0.10 has no 'constant' scheduler
            self.scheduler = _ConstantSchedule(self.optimizer, int(s['warmup_epochs']) * self.steps_per_epoch,
                                               self.lrs['warmup_lr'])
            return
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=s['name'], num_epochs=self.epochs, warmup_epochs=int(s['warmup_epochs']),
            warmup_lr=self.lrs['warmup_lr'], min_lr=self.lrs['min_lr'], step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)

    def _meta(self) -> Dict[str, Any]:
        """What a checkpoint must say to be used without the config (from the task), and its step."""
        return {**self.task.checkpoint_meta(), 'step': self.global_step}

    def _check_resumable_config(self, saved: Mapping[str, Any]) -> None:
        """Refuse a resume that changes the network or the sample order; log every other change."""
        old, new = _flat(saved), _flat(self.cfg)
        changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        arch_keys = (*_ARCHITECTURE_KEYS, *self.task.architecture_keys)
        arch = {k: v for k, v in changed.items() if k in arch_keys}
        if arch:
            raise ConfigError('cannot resume with a changed architecture: ' + '; '.join(
                f'{k} was {a!r}, now {b!r}' for k, (a, b) in arch.items())
                + '. Resume with the saved values, or start a new run (model.pretrained=... to fine-tune).')
        wd_old, wd_new = old.get('optim.weight_decay'), new.get('optim.weight_decay')
        if 'optim.weight_decay' in changed and (not wd_old) != (not wd_new):
            raise ConfigError(f'cannot resume with optim.weight_decay {wd_old!r} -> {wd_new!r}: turning weight decay '
                              'on or off changes the optimiser\'s parameter groups. Any other non-zero value works.')
        pos = {k: v for k, v in changed.items() if k in _POSITION_KEYS}
        if pos:
            raise ConfigError('cannot resume with a changed ' + ', '.join(
                f'{k} ({a!r} -> {b!r})' for k, (a, b) in pos.items())
                + ': the saved position in the epoch would mean other samples. Resume with the saved value.')
        if self.dist.main:
            for k, (a, b) in changed.items():
                if k not in _QUIET_KEYS:
                    _log.warning('resume: %s changed from %r to %r (applied)', k, a, b)

    def _apply_hyperparameters(self) -> None:
        """Put the current config's optimiser settings into the (restored) parameter groups."""
        o = self.cfg['optim']
        for group in self.optimizer.param_groups:
            if group.get('weight_decay', 0.0) > 0.0:  # groups without decay (norms, biases) keep 0
                group['weight_decay'] = float(o['weight_decay'])
            if 'betas' in group:
                group['betas'] = tuple(o['betas'])
            if 'eps' in group:
                group['eps'] = float(o['eps'])
        if self.ema is not None:
            self.ema.decay = float(self.cfg['ema']['decay'])

    def _load_resume(self, path: str) -> None:
        state, sd, ema_sd = load_state(Path(path))
        if isinstance(state.get('config'), Mapping):
            self._check_resumable_config(state['config'])
        if int(state['world']) != self.dist.world:
            raise ValueError(f'checkpoint was written by {state["world"]} processes, this run has {self.dist.world}; '
                             'exact resumption needs the same number')
        self.model.load_state_dict(sd)
        if self.ema is not None:
            if ema_sd is None:
                raise ValueError('the checkpoint has no EMA weights but ema.enable is true')
            self.ema.module.load_state_dict(ema_sd)
        self.optimizer.load_state_dict(state['optimizer'])
        self._apply_hyperparameters()
        self.scaler.load_state_dict(state['scaler'])
        self.global_step = int(state['global_step'])
        self.start_epoch, self.start_batch = int(state['epoch']), int(state['batch_in_epoch'])
        self.best_score, self.best_epoch = state['best_score'], int(state['best_epoch'])
        self.skipped_images, self.nonfinite_total = int(state['skipped_images']), int(state['nonfinite_total'])
        self.epoch_sums = dict(state['epoch_sums'])
        self.task.load_state(json.loads(state.get('task', '{}')))
        best_set = linked_set(self.out_dir, 'best')  # the best link may be ahead of last (kill between the two)
        if best_set is not None and (best_set / 'metrics.json').is_file():
            linked_best = json.loads((best_set / 'metrics.json').read_text()).get(f'best_{self.task.score}')
            if linked_best is not None and (self.best_score is None or linked_best > self.best_score):
                self.best_score = linked_best
        set_rng_state(state['rng'][self.dist.rank])
        if self.start_epoch >= self.epochs:
            raise RunFinishedError(
                f'the run in {self.out_dir} already finished: {self.start_epoch} of {self.epochs} epochs, '
                f'best {self.task.score} {self.best_score}; nothing was changed. To train longer, resume with '
                f'sched.epochs=N (N > {self.start_epoch}).')
        if self.dist.main:
            _log.info('resumed from %s at epoch %d, batch %d (step %d)', path, self.start_epoch,
                      self.start_batch, self.global_step)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save(self, epoch: int, batch_in_epoch: int, best: bool = False,
              metrics: Optional[Mapping[str, Any]] = None) -> None:
        """Commit a checkpoint set for ``last`` (and ``best``): weights, EMA, resume state, metrics."""
        rngs = all_gather_object(rng_state())
        if self.dist.main:
            state = {
                'epoch': epoch, 'batch_in_epoch': batch_in_epoch, 'global_step': self.global_step,
                'optimizer': self.optimizer.state_dict(), 'scaler': self.scaler.state_dict(), 'rng': rngs,
                'world': self.dist.world, 'best_score': self.best_score, 'best_epoch': self.best_epoch,
                'skipped_images': self.skipped_images, 'nonfinite_total': self.nonfinite_total,
                'epoch_sums': dict(self.epoch_sums), 'task': json.dumps(self.task.state()),
                'config': json.dumps(self.cfg)}
            meta = {**self._meta(), **({self.task.score: self.best_score} if best else {})}
            commit_checkpoint(self.out_dir, ('best', 'last') if best else ('last',), self.global_step,
                              self.model.state_dict(), self.ema.module.state_dict() if self.ema else None,
                              meta, state, metrics)
        barrier()

    def _prepare_out_dir(self) -> None:
        """Refuse to write a new run over an existing one (unless asked to), then lock and create the folder."""
        check_out_dir(self.out_dir)
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.out_dir / '.lock', 'w')
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock.close()
                raise RunExistsError(f'another process is training into {self.out_dir}') from None
            check_links_supported(self.out_dir)
        if not self.resume and holds_run(self.out_dir):
            if not self.cfg['train']['overwrite']:
                if run_has_checkpoints(self.out_dir):
                    step = linked_set(self.out_dir, 'last').name[5:].split('-')[0].lstrip('0') or '0'
                    raise RunExistsError(f'{self.out_dir} already holds a run with checkpoints up to step {step}; '
                                         'resume it (--resume auto), replace it (--overwrite) or choose another '
                                         'output folder')
                raise RunExistsError(f'{self.out_dir} already holds files of a run but no checkpoint this version can '
                                     'resume (killed before its first save, or an older layout); replace it '
                                     '(--overwrite) or choose another output folder')
            if self.dist.main:
                _log.warning('overwriting the run in %s', self.out_dir)
                clear_run_folder(self.out_dir)
        barrier()

    # -- loop ----------------------------------------------------------------------------------------
    def _progress(self, total: int, start: int, epoch: int) -> Optional[Progress]:
        if not (self.dist.main and self.cfg['train']['progress']):
            return None
        prog = Progress(TextColumn(f'epoch {epoch + 1}/{self.epochs}'), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn('{task.fields[info]}'), transient=True)
        prog.start()
        prog.add_task('train', total=total, completed=start, info='')
        return prog

    def _stop_agreed(self) -> bool:
        """True when any rank was asked to stop (all ranks must leave the loop at the same step)."""
        flag = torch.tensor([1.0 if self.stop.set else 0.0], device=self.dist.device)
        if is_dist():
            all_reduce_sum(flag)
        self.stop.set = bool(flag.item() > 0)
        return self.stop.set

    def _update_checked(self) -> bool:
        return self.cfg['train']['max_update_ratio'] is not None

    def _step_tensors(self) -> List[torch.Tensor]:
        """What an undone step restores in the model: buffers always, weights when updates are checked."""
        tensors = (*self.model.parameters(), *self.model.buffers()) if self._update_checked() else self.model.buffers()
        return [t.detach() for t in tensors]

    def _snapshot(self) -> Tuple[List[torch.Tensor], Dict[Any, Dict[str, Any]]]:
        """Copies of everything a step changes: buffers (BatchNorm statistics) and, when updates are
        checked, weights and optimiser state. Copied into buffers allocated once (one foreach copy)."""
        guard = self._update_checked()
        live = self._step_tensors()
        opt_live = [(p, k, v) for p, st in self.optimizer.state.items() for k, v in st.items()
                    if isinstance(v, torch.Tensor)] if guard else []
        keys = [id(t) for t in live] + [id(v) for _, _, v in opt_live]
        if getattr(self, '_snapshot_keys', None) != keys:
            self._snapshot_keys = keys
            self._snapshot_bufs = [torch.empty_like(t) for t in live] + [torch.empty_like(v) for _, _, v in opt_live]
        bufs = self._snapshot_bufs
        if bufs:
            torch._foreach_copy_(bufs, live + [v for _, _, v in opt_live])
        saved_opt: Dict[Any, Dict[str, Any]] = {p: dict(st) for p, st in self.optimizer.state.items()} if guard else {}
        for (p, k, _), buf in zip(opt_live, bufs[len(live):]):
            saved_opt[p][k] = buf
        return bufs[:len(live)], saved_opt

    def _restore(self, saved: Tuple[List[torch.Tensor], Dict[Any, Dict[str, Any]]]) -> None:
        tensors, opt = saved
        guard = self._update_checked()
        live = self._step_tensors()
        with torch.no_grad():
            if live:
                torch._foreach_copy_(live, tensors)
            if not guard:
                return
            for p in list(self.optimizer.state):
                if p not in opt:  # created by the undone step
                    del self.optimizer.state[p]
                    continue
                for k, v in opt[p].items():
                    cur = self.optimizer.state[p].get(k)
                    if isinstance(v, torch.Tensor) and isinstance(cur, torch.Tensor):
                        cur.copy_(v)
                    else:
                        self.optimizer.state[p][k] = v

    def _update_is_sane(self, before: Tuple[List[torch.Tensor], Any]) -> bool:
        """The step left the weights finite and moved them by at most ``max_update_ratio`` x their norm."""
        if not self._update_checked():
            return True
        params = [p.detach() for p in self.model.parameters()]
        with torch.no_grad():
            new_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params)))
            old = before[0][:len(params)]
            old_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(old)))
            delta = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(torch._foreach_sub(params, old))))
            ok = torch.isfinite(new_norm) & (delta <= float(self.cfg['train']['max_update_ratio']) * old_norm)
        return bool(all_reduce_min(ok.float().reshape(1)).item() > 0)

    def _train_step(self, inputs: Any, targets: Any) -> Tuple[Optional[float], str]:
        """One optimisation step: ``(loss, '')``, or ``(None, why)`` when the step was undone."""
        dev = self.dist.device
        inputs, targets = self.task.to_device(inputs, targets, dev, self.channels_last)
        net = self.ddp or self.model
        saved = self._snapshot()
        ctx = torch.autocast(dev.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            loss, outputs = self.task.loss(net, inputs, targets)
        finite = all_reduce_min(torch.isfinite(loss.detach()).float().reshape(1).to(dev))
        why = '' if finite.item() > 0 else 'non-finite loss'
        if not why:
            self.scaler.scale(loss).backward()
            clip = self.cfg['optim']['clip_grad']
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip) if clip else math.inf)
            if not self.scaler.is_enabled() and not torch.isfinite(norm):
                why = 'non-finite gradient'
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if not self._update_is_sane(saved):
                    why = 'update made the weights non-finite or moved them by more than ' \
                          f'{self.cfg["train"]["max_update_ratio"]}x their norm'
        self.optimizer.zero_grad(set_to_none=True)
        if why:
            self._restore(saved)
            return None, why
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)
        with torch.no_grad():
            for k, v in self.task.train_counts(outputs, targets).items():
                self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + float(v)
        return float(loss.detach()), ''

    def _bn_batches(self, epoch: int, count: int) -> Iterator[Any]:
        """``count`` training batches with this epoch's augmentation, ready for the model."""
        sampler = ResumableSampler(len(self.train_seeded), self.batch_size, self.dist.rank, self.dist.world,
                                   shuffle=True, seed=int(self.cfg['train']['seed']) + 7919, drop_last=True)
        loader = DataLoader(self.train_seeded, batch_size=self.batch_size, sampler=sampler,
                            num_workers=self.workers, collate_fn=self.task.collate, pin_memory=self.pin,
                            worker_init_fn=ignore_sigint_in_worker)
        done, rounds = 0, 0
        while done < count and rounds < 1 + count:  # more rounds only if whole batches were unreadable
            sampler.set_epoch(epoch * 1000 + rounds)
            rounds += 1
            for inputs, targets, _ in loader:
                if done == count:
                    return
                if self.task.batch_size_of(inputs) == 0:
                    continue
                yield self.task.to_device(inputs, targets, self.dist.device, self.channels_last)[0]
                done += 1

    def _recompute_bn_statistics(self, epoch: int) -> None:
        """Precise BatchNorm statistics for the model and its EMA, with the weights fixed.

        The running averages of a young network trail its weights by many steps (and EMO's block-0
        LayerScale starts at 1e-6, so the first statistics are ~1e-6 while the running variance starts
        at 1): evaluated as-is, the model predicts one class for the first few hundred steps. The
        random streams of training are left untouched, so resumed runs stay exact.
        """
        want = int(self.cfg['eval']['precise_bn_images'])
        both = _Together([self.model] + ([self.ema.module] if self.ema is not None else []),
                         self.task.forward_for_bn).train()
        try:
            bns = get_bn_modules(both)
            if want <= 0 or not bns:
                return
            count = min(self.steps_per_epoch, max(1, math.ceil(want / (self.batch_size * self.dist.world))))
            py_state, np_state = random.getstate(), np.random.get_state()
            devices = [self.dist.device.index or 0] if self.dist.device.type == 'cuda' else []
            amp = torch.autocast(self.dist.device.type, dtype=self.amp_dtype) if self.amp_dtype \
                else contextlib.nullcontext()
            with torch.random.fork_rng(devices=devices), amp:
                update_bn_stats(both, self._bn_batches(epoch, count), num_iters=count)
            random.setstate(py_state)
            np.random.set_state(np_state)
            if self.dist.world > 1:  # each rank measured its own shard: average them
                with torch.no_grad():
                    for bn in bns:
                        for buf in (bn.running_mean, bn.running_var):
                            buf.copy_(all_reduce_sum(buf.clone()) / self.dist.world)
        finally:
            if self.ema is not None:
                self.ema.module.eval()

    def _evaluate(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.val_loader is None:
            return out
        for prefix, net in (('', self.model), ('ema_', self.ema.module if self.ema else None)):
            if net is None:
                continue
            r = dict(self.task.evaluate(net, self.val_loader, self.dist.device, self.amp_dtype))
            n, skipped = r.pop('n', None), r.pop('skipped', None)
            out.update({f'{prefix}val_{k}': v for k, v in r.items() if isinstance(v, (int, float))})
            if not prefix:
                out['val_images'], out['val_skipped'] = n, skipped
        return out

    def fit(self) -> TrainResult:
        """Train to ``sched.epochs`` (or until stopped); returns what happened."""
        check_out_dir(self.out_dir)
        self.dist: DistInfo = init_distributed(self.cfg['train']['device'])
        if self.resume == 'auto':  # continue the run in the output folder; a fresh start only in a fresh folder
            self.resume = str(self.out_dir) if run_has_checkpoints(self.out_dir) else None
        elif self.resume and holds_run(self.out_dir) and not Path(self.resume).resolve().is_relative_to(
                self.out_dir.resolve()):
            raise RunExistsError(f'{self.out_dir} already holds another run; resume {self.resume} into its own '
                                 'folder or an empty one')
        try:
            self._prepare_out_dir()
            return self._run()
        finally:
            if getattr(self, '_lock', None) is not None:
                self._lock.close()  # releases the flock
                self._lock = None

    def _run(self) -> TrainResult:
        self._setup()
        cfg = self.cfg
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out_dir / 'config.json', lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))
            if self.logger is not None:
                self.logger.truncate_after(self.start_epoch)
        self.stop.install()
        max_bad, consecutive_bad = int(cfg['train']['max_nonfinite']), 0
        stop_after = cfg['train']['stop_after_steps']
        save_every = int(cfg['train']['save_every_steps'] or 0)
        stopped, last_metrics = False, {}
        epoch = self.start_epoch
        try:
            self.scheduler.step_update(num_updates=self.global_step)
            for epoch in range(self.start_epoch, self.epochs):
                start_batch = self.start_batch if epoch == self.start_epoch else 0
                if start_batch == 0:
                    self.epoch_sums = {}
                self.sampler.set_epoch(epoch, start_batch)
                self.train_seeded.set_epoch(epoch)
                self.model.train()
                t0 = time.time()
                prog = self._progress(self.steps_per_epoch, start_batch, epoch)
                batch_idx = start_batch
                try:
                    for inputs, targets, skipped in self.train_loader:
                        if self._stop_agreed():
                            stopped = True
                            break
                        self.skipped_images += int(skipped)
                        has_data = self.task.batch_size_of(inputs) > 0
                        loss, why = self._train_step(inputs, targets) if has_data else (None, '')
                        batch_idx += 1
                        self.global_step += 1
                        self.scheduler.step_update(num_updates=self.global_step)
                        if why:
                            consecutive_bad += 1
                            self.nonfinite_total += 1
                            _log.warning('%s at step %d: step undone (%d in a row, limit %d)',
                                         why, self.global_step, consecutive_bad, max_bad)
                            if consecutive_bad >= max_bad:
                                raise NonFiniteLossError(
                                    f'{consecutive_bad} bad steps in a row ({why}; last at step {self.global_step}); '
                                    'stopping without writing a checkpoint. Lower the learning rate or check the '
                                    f'data, then resume from the last good checkpoint with --resume auto '
                                    f'(e.g. optim.lr=...; changed settings apply).')
                        elif loss is not None:
                            consecutive_bad = 0
                            self.epoch_sums['loss'] = self.epoch_sums.get('loss', 0.0) + loss
                            self.epoch_sums['steps'] = self.epoch_sums.get('steps', 0.0) + 1
                        if prog is not None:
                            prog.update(prog.task_ids[0], advance=1,
                                        info=f'loss {loss:.4f} lr {self.optimizer.param_groups[0]["lr"]:.2e}'
                                        if loss is not None else 'skipped')
                        if self.step_callback is not None:
                            self.step_callback(self, self.global_step)
                        if stop_after is not None and self.global_step >= int(stop_after):
                            self.stop.set = True
                        if save_every and self.global_step % save_every == 0 and batch_idx < self.steps_per_epoch:
                            self._save(epoch, batch_idx)
                finally:
                    if prog is not None:
                        prog.stop()
                if stopped or (self.stop.set and batch_idx < self.steps_per_epoch):
                    stopped = True
                    self._save(epoch, batch_idx)
                    break
                last_metrics = self._end_epoch(epoch, time.time() - t0)
                if self._stop_agreed():
                    stopped = True
                    break
        finally:
            self.stop.restore()
            if self.logger is not None:
                self.logger.close()
        if self.dist.main and not stopped:
            self._final_plot()
        checks = [float(c) for c in all_gather_object(_checksum(self.model))]
        result = TrainResult(self.out_dir, epoch + (0 if stopped else 1), self.global_step, stopped, self.best_score,
                             last_metrics, self.skipped_images, self.nonfinite_total, checks, self.task.score)
        if self.dist.main:
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
            summary[f'best_{self.task.score}'] = result.best_score
            atomic_write(self.out_dir / 'summary.json', lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        return result

    def _end_epoch(self, epoch: int, seconds: float) -> Dict[str, Any]:
        every = int(self.cfg['eval']['every'])
        last = epoch == self.epochs - 1
        self._recompute_bn_statistics(epoch)
        metrics: Dict[str, Any] = {}
        if every and ((epoch + 1) % every == 0 or last):
            metrics = self._evaluate()
        keys = sorted(set(self.epoch_sums) | {'loss', 'steps'})
        summed = all_reduce_sum(torch.tensor([self.epoch_sums.get(k, 0.0) for k in keys] + [self.skipped_images],
                                             dtype=torch.float64, device=self.dist.device)).cpu().tolist()
        sums = dict(zip(keys, summed))
        record: Dict[str, Any] = {
            'epoch': epoch, 'step': self.global_step, 'lr': self.optimizer.param_groups[0]['lr'],
            'train_loss': sums['loss'] / max(sums['steps'], 1.0), **self.task.train_metrics(sums),
            'nonfinite_steps': self.nonfinite_total, 'skipped_images': int(summed[-1]),
            'epoch_seconds': round(seconds, 2), **metrics}
        score = self.task.score
        top = max([metrics[k] for k in (f'val_{score}', f'ema_val_{score}') if k in metrics], default=None)
        improved = top is not None and (self.best_score is None or top > self.best_score)
        if improved:
            self.best_score, self.best_epoch = top, epoch
        record[f'best_{score}'] = self.best_score
        if self.dist.main:  # the log line first: a resume from an older set drops it again (truncate_after)
            self.logger.log(record)
        self._save(epoch + 1, 0, best=improved, metrics=record)
        if self.dist.main:
            shown = ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in record.items()
                              if '.' not in k)  # per-class values (val_IoU.<class>) stay in the log only
            _log.info('%s', shown)
        return record

    def _final_plot(self) -> None:
        log = self.out_dir / f'log.{self.cfg["train"]["log_format"]}'
        if log.exists():
            records = read_log(log)
            if records:
                plot_curves(records, self.out_dir / 'curves.png', self.task.score,
                            'accuracy (%)' if self.task.score.startswith('top') else self.task.score)
