"""No lost runs: checkpoint sets commit atomically (kills at every stage of a save, a full disk),
runs are never overwritten silently, and resumes apply the user's fixes."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import emov2.train.state as state_mod
from emov2.checkpoint import read_state_dict
from emov2.train import NonFiniteLossError, RunExistsError, RunFinishedError, Trainer
from emov2.train.config import ConfigError
from emov2.train.state import SETS_DIR, DiskFullError, linked_set, load_state
from emov2.train.testing import RandomImages, tiny_config

# 6 steps per epoch, 2 epochs; a set at steps 2, 4, 6 (epoch end: best + last), 8, 10, 12
SAVE_EVERY = ['train.save_every_steps=2']


def _fit(out, overrides=(), resume=None, **kw):
    cfg = tiny_config(out, overrides=[*SAVE_EVERY, *overrides])
    return Trainer(cfg, RandomImages(48), RandomImages(16, augment=False), resume=resume, **kw).fit()


def _weights(run, tag='last'):
    folder = linked_set(run, tag)
    sd, _ = read_state_dict(folder / 'model.safetensors')
    ema, _ = read_state_dict(folder / 'ema.safetensors')
    return sd, ema


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp('full') / 'run'
    r = _fit(out)
    assert r.global_step == 12
    return out


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import emov2.train.state as st
    from emov2.train import Trainer
    from emov2.train.testing import RandomImages, tiny_config
    stage, nth, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    seen = [0]
    def reached(name):
        if name == stage:
            seen[0] += 1
            if seen[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
    st._reached = reached
    cfg = tiny_config(out, overrides=['train.save_every_steps=2'])
    Trainer(cfg, RandomImages(48), RandomImages(16, augment=False)).fit()
''')


@pytest.mark.parametrize('stage', ['tmp_created', 'model_written', 'weights_written', 'state_written',
                                   'set_renamed', 'best_linked', 'last_linked', 'garbage_collected'])
def test_kill_at_every_stage_of_a_save_loses_nothing(stage, tmp_path, uninterrupted):
    out = tmp_path / 'run'
    # the 3rd save is the end of epoch 1 (best and last move together); sets of steps 2 and 4 exist
    nth = '1' if stage == 'best_linked' else '3'  # 'best' moves only at epoch ends
    proc = subprocess.run([sys.executable, '-c', KILL_SCRIPT, stage, nth, str(out)], capture_output=True,
                          text=True, env={**os.environ, 'OMP_NUM_THREADS': str(torch.get_num_threads())},
                          timeout=300)  # the same threads as this process: float sums in the same order
    assert proc.returncode == -9, proc.stderr[-2000:]
    st, _, _ = load_state(out)  # the link points at a complete, loadable set
    expected = 6 if stage in ('last_linked', 'garbage_collected') else 4
    assert st['global_step'] == expected
    r = _fit(out, resume='auto')
    assert r.global_step == 12 and not r.stopped_early
    a, a_ema = _weights(uninterrupted)
    b, b_ema = _weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in a_ema:
        assert torch.equal(a_ema[k], b_ema[k]), k
    assert linked_set(out, 'best') is not None
    assert json.loads((linked_set(out, 'best') / 'metrics.json').read_text())['best_top1'] == \
        json.loads((out / 'summary.json').read_text())['best_top1']
    log = [json.loads(x) for x in (out / 'log.jsonl').read_text().splitlines()]
    assert [x['epoch'] for x in log] == [0, 1]
    # nothing left behind: only the linked sets, no temporary folders or links
    kept = {p.name for p in (out / SETS_DIR).iterdir()}
    assert kept == {linked_set(out, 'last').name, linked_set(out, 'best').name}
    assert not [p for p in out.iterdir() if p.name.startswith('.tmp')]


def test_full_disk_keeps_the_previous_set_and_says_disk_full(tmp_path, monkeypatch):
    out = tmp_path / 'run'
    _fit(out, ['sched.epochs=1', 'train.save_every_steps=0'])
    before = linked_set(out, 'last')
    files_before = sorted(p.name for p in before.iterdir())

    def write_to_full_device(state, path):  # the kernel's own ENOSPC, from /dev/full
        with open('/dev/full', 'wb') as f:
            torch.save(dict(state), f)
            f.flush()

    monkeypatch.setattr(state_mod, '_write_state', write_to_full_device)
    with pytest.raises(DiskFullError, match='disk full.*previous checkpoint.*intact'):
        _fit(out, ['sched.epochs=2', 'train.save_every_steps=0'], resume='auto')
    assert linked_set(out, 'last') == before and sorted(p.name for p in before.iterdir()) == files_before
    assert load_state(out)[0]['global_step'] == 6
    assert [p.name for p in (out / SETS_DIR).iterdir()] == [before.name]  # the partial set is gone


def test_new_run_into_a_run_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / 'run'
    _fit(out, ['sched.epochs=1'])
    (out / 'notes.txt').write_text('mine')
    log_before = (out / 'log.jsonl').read_text()
    with pytest.raises(RunExistsError, match='already holds a run.*--resume auto.*--overwrite'):
        _fit(out, ['sched.epochs=1'])
    assert (out / 'log.jsonl').read_text() == log_before
    _fit(out, ['sched.epochs=1', 'train.overwrite=true'])
    assert len((out / 'log.jsonl').read_text().splitlines()) == 1  # replaced, not appended
    assert (out / 'notes.txt').read_text() == 'mine'  # files that are not the run's are kept


def test_out_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ValueError, match='is a file'):
        _fit(tmp_path / 'file' / 'run')


def test_exploding_update_is_undone_and_a_resume_applies_the_new_lr(tmp_path, caplog):
    out = tmp_path / 'run'
    _fit(out, ['train.stop_after_steps=6', 'train.save_every_steps=0'])
    good, _ = _weights(out)
    with pytest.raises(NonFiniteLossError, match='3 bad steps in a row'):
        _fit(out, ['optim.lr=1e9', 'sched.warmup_epochs=0', 'train.max_nonfinite=3', 'train.save_every_steps=0'],
             resume='auto')
    after, _ = _weights(out)  # no step of the huge lr reached a checkpoint (or the weights)
    assert all(torch.equal(good[k], after[k]) for k in good)
    caplog.set_level(logging.WARNING, logger='emov2.train')
    logging.getLogger('emov2.train').propagate = True
    seen = {}

    def record_lr(trainer, step):
        seen[step] = trainer.optimizer.param_groups[0]['lr']

    r = _fit(out, ['optim.lr=0.001', 'sched.warmup_epochs=0', 'train.save_every_steps=0'], resume='auto',
             step_callback=record_lr)
    assert r.global_step == 12 and r.nonfinite_steps == 0
    assert max(seen.values()) <= 0.001 + 1e-12 and min(seen.values()) > 0  # the new peak lr, cosine below it
    assert any('optim.lr changed from 0.002 to 0.001' in m for m in caplog.messages)
    final, _ = _weights(out)
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / 'run'
    _fit(out, ['sched.epochs=1'])
    files = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    with pytest.raises(RunFinishedError, match='already finished.*sched.epochs'):
        _fit(out, ['sched.epochs=1'], resume='auto')
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == files


def test_resume_with_another_architecture_says_what_differs(tmp_path):
    out = tmp_path / 'run'
    _fit(out, ['train.stop_after_steps=2'])
    with pytest.raises(ConfigError, match='model.window_size was 7, now 5'):
        _fit(out, ['model.window_size=5'], resume='auto')


def test_checkpoint_files_get_the_users_file_mode(tmp_path):
    out = tmp_path / 'run'
    old = os.umask(0o022)
    try:
        _fit(out, ['train.stop_after_steps=2'])
    finally:
        os.umask(old)
    for p in linked_set(out, 'last').iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert (out / 'summary.json').stat().st_mode & 0o777 == 0o644


def test_resume_auto_never_deletes_what_it_cannot_resume(tmp_path):
    out = tmp_path / 'old'
    out.mkdir()
    for name in ('last_state.pt', 'last.safetensors', 'log.jsonl', 'config.json'):  # the earlier flat layout
        (out / name).write_text('keep me')
    with pytest.raises(RunExistsError, match='no checkpoint this version can resume'):
        _fit(out, resume='auto')
    assert all((out / n).read_text() == 'keep me' for n in ('last_state.pt', 'last.safetensors', 'log.jsonl'))


def test_a_copied_run_and_a_cut_log_line_still_resume(tmp_path):
    import shutil
    _fit(tmp_path / 'run', ['train.stop_after_steps=4'])
    out = tmp_path / 'copy'
    shutil.copytree(tmp_path / 'run', out, symlinks=False)  # links become folders, as rsync -L does
    with open(out / 'log.jsonl', 'a') as f:
        f.write('{"epoch": 0, "step": 6, "lo')  # a kill in the middle of a log write
    r = _fit(out, resume='auto')
    assert r.global_step == 12
    assert [json.loads(x)['epoch'] for x in (out / 'log.jsonl').read_text().splitlines()] == [0, 1]
    assert (out / 'last').is_symlink()


def test_resume_refuses_what_would_silently_change_the_run(tmp_path):
    out = tmp_path / 'run'
    _fit(out, ['train.stop_after_steps=2'])
    with pytest.raises(ConfigError, match='train.seed'):
        _fit(out, ['train.seed=1'], resume='auto')
    with pytest.raises(ConfigError, match='weight_decay 0.05 -> 0'):
        _fit(out, ['optim.weight_decay=0'], resume='auto')
    _fit(out, ['optim.weight_decay=0.1', 'train.stop_after_steps=3'], resume='auto')  # other values apply


def test_one_trainer_per_run_folder(tmp_path):
    out = tmp_path / 'run'
    seen = {}

    def second_trainer(trainer, step):
        if step == 1:
            try:
                _fit(out, resume='auto')
            except RunExistsError as e:
                seen['error'] = str(e)

    _fit(out, ['train.stop_after_steps=2'], step_callback=second_trainer)
    assert 'another process is training into' in seen['error']


def test_update_check_can_be_turned_off(tmp_path):
    r = _fit(tmp_path / 'run', ['train.max_update_ratio=null', 'sched.epochs=1'])
    assert r.global_step == 6 and r.nonfinite_steps == 0
    with pytest.raises(ConfigError, match='max_update_ratio must be positive'):
        tiny_config(tmp_path, overrides=['train.max_update_ratio=0'])
