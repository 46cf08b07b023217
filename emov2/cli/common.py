"""What every ``emov2`` command shares: the one-line error exit, logging, and running a training job.

Task command groups (``emov2 detect``, ``segment``, ``video``, ``generate``) build a config and a
:class:`~emov2.train.task.Task` and call :func:`fit_or_fail`, so every task maps the trainer's
errors to the same messages and exit codes (2 bad input, 3 non-finite loss, 4 disk full).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, NoReturn, Optional, Sequence, Tuple

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from torch.utils.data import Dataset

from ..checkpoint import CheckpointError
from ..train import NonFiniteLossError, RunExistsError, RunFinishedError, Trainer, TrainResult
from ..train.state import DiskFullError, is_disk_full
from ..train.task import Task

__all__ = ['console', 'err', 'fail', 'setup_logging', 'fit_or_fail', 'overrides_from_options', 'report_run', 'report_items', 'accuracy_table']

console = Console()
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """One red line on stderr and an exit code: what the user did wrong, no traceback."""
    err.print(f'[red]error:[/red] {message}', highlight=False)
    raise typer.Exit(code)


def setup_logging(verbose: bool = True) -> None:
    """Rich log lines from the trainer on rank 0 only."""
    rank = int(os.environ.get('RANK', '0'))
    level = logging.INFO if verbose and rank == 0 else logging.WARNING
    logger = logging.getLogger('emov2.train')
    if not logger.handlers:
        logger.addHandler(RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False))
    logger.setLevel(level)
    logger.propagate = False


def fit_or_fail(cfg: Mapping[str, Any], task: Optional[Task] = None, resume: Optional[str] = None,
                train_dataset: Optional[Dataset] = None, val_dataset: Optional[Dataset] = None) -> Optional[TrainResult]:
    """``Trainer(cfg, task=task).fit()``; ``None`` when the run had already finished (message printed)."""
    try:
        return Trainer(cfg, train_dataset=train_dataset, val_dataset=val_dataset, resume=resume, task=task).fit()
    except RunFinishedError as e:
        console.print(str(e))
        return None
    except NonFiniteLossError as e:
        fail(str(e), code=3)
    except DiskFullError as e:
        fail(str(e), code=4)
    except (RunExistsError, CheckpointError, ValueError, FileNotFoundError, NotADirectoryError,
            PermissionError) as e:
        fail(str(e))
    except OSError as e:
        if is_disk_full(e, Path(cfg['train']['out'])):
            fail(f'disk full while writing to {cfg["train"]["out"]} ({e}); the last committed checkpoint is intact. '
                 'Free some space and resume with --resume auto.', code=4)
        raise


def overrides_from_options(overrides: Optional[Sequence[str]], options: Iterable[Tuple[str, Any]],
                           overwrite: bool = False) -> List[str]:
    """The config overrides of a train command: its ``key=value`` arguments, then each option the user
    gave as ``(config key, value)`` (``None`` and empty values skipped), then ``train.overwrite``."""
    extra = list(overrides or [])
    extra += [f'{key}={value}' for key, value in options if value is not None and value != '']
    if overwrite:
        extra.append('train.overwrite=true')
    return extra


def report_run(result: Optional[TrainResult], score: Optional[str] = None) -> None:
    """The one line a train command ends with: finished or resumable, how far, the best score."""
    if result is None:
        return
    state = 'stopped (resumable with --resume auto)' if result.stopped_early else 'finished'
    best = f', best {score} {result.best_score}' if score else ''
    console.print(f'{state}: epoch {result.epochs_done}, step {result.global_step}{best}, outputs in {result.out_dir}')


def report_items(results: Sequence[Dict[str, Any]], as_json: bool, name_key: str,
                 describe: Callable[[Dict[str, Any]], str], footer: Optional[str] = None) -> None:
    """What every predict command prints: JSON, or one red stderr line per unreadable input and
    ``describe(result)`` for the others (then ``footer``); exits with 1 when any input could not be read."""
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            if 'error' in r:
                err.print(f'[red]{r[name_key]}: {r["error"]}[/red]', highlight=False)
            else:
                console.print(describe(r), highlight=False)
        if footer:
            console.print(footer)
    if any('error' in r for r in results):
        raise typer.Exit(1)


def accuracy_table(title: str, result: Mapping[str, Any], unit: str = 'images') -> Table:
    """Top-1 / top-5 / loss of a checkpoint's weights and its EMA (``result['model']``, ``result['ema']``)."""
    t = Table(title=title)
    for c in ('weights', 'top-1', 'top-5', 'loss', unit, 'unreadable'):
        t.add_column(c)
    for key in ('model', 'ema'):
        m = result[key]
        if m is None:
            t.add_row(key, '-', '-', '-', '-', 'no EMA weights')
        else:
            t.add_row(key, f'{m["top1"]:.2f}', f'{m["top5"]:.2f}', f'{m["loss"]:.4f}', str(m['n']), str(m['skipped']))
    return t
