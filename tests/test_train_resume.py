"""Resumption is exact, signals stop cleanly, and NaN/inf losses never corrupt checkpoints."""
from __future__ import annotations

import logging
import os
import signal

import pytest
import torch

from emov2.checkpoint import read_state_dict
from emov2.train import NonFiniteLossError, Trainer
from emov2.train.testing import RandomImages, tiny_config


def _weights(out, tag='last'):
    sd, _ = read_state_dict(out / tag / 'model.safetensors')
    ema, _ = read_state_dict(out / tag / 'ema.safetensors')
    return sd, ema


def test_killed_mid_epoch_and_resumed_matches_uninterrupted(tmp_path):
    data = RandomImages(48)  # batch 8 -> 6 steps per epoch, 2 epochs
    full = Trainer(tiny_config(tmp_path / 'full'), data, RandomImages(16, augment=False)).fit()
    assert full.global_step == 12 and not full.stopped_early

    def kill_at_step_8(trainer, step):
        if step == 8:  # the middle of the second epoch
            os.kill(os.getpid(), signal.SIGTERM)

    # the interrupted run also uses worker processes: augmentation must not depend on them
    cfg = tiny_config(tmp_path / 'cut', overrides=['data.workers=2'])
    handler_before = signal.getsignal(signal.SIGTERM)
    cut = Trainer(cfg, data, RandomImages(16, augment=False), step_callback=kill_at_step_8).fit()
    assert cut.stopped_early and cut.global_step == 8
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the trainer's handler is removed again
    mid, _ = _weights(tmp_path / 'cut')

    resumed = Trainer(cfg, data, RandomImages(16, augment=False), resume=str(tmp_path / 'cut')).fit()
    assert resumed.global_step == 12 and not resumed.stopped_early

    a, a_ema = _weights(tmp_path / 'full')
    b, b_ema = _weights(tmp_path / 'cut')
    assert a.keys() == b.keys()
    assert any(not torch.equal(mid[k], b[k]) for k in b)  # training really continued after the resume
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in a_ema:
        assert torch.equal(a_ema[k], b_ema[k]), k
    log = (tmp_path / 'cut' / 'log.jsonl').read_text().splitlines()
    assert len(log) == 2  # one record per epoch, none duplicated by the resume


def _nan_hook(state):
    def hook(module, args, output):
        if module.training and state['left'] > 0:
            state['left'] -= 1
            return output * float('nan')
        return output
    return hook


def test_single_nan_loss_is_skipped_with_warning(tmp_path, caplog):
    state = {'left': 0}

    def inject(trainer, step):
        if step == 2:
            trainer.model.register_forward_hook(_nan_hook(state))
            state['left'] = 1  # step 3's loss becomes NaN

    with caplog.at_level(logging.WARNING, logger='emov2.train'):
        logging.getLogger('emov2.train').propagate = True
        r = Trainer(tiny_config(tmp_path, overrides=['sched.epochs=1']), RandomImages(48),
                    RandomImages(16, augment=False), step_callback=inject).fit()
    assert r.nonfinite_steps == 1 and r.global_step == 6 and not r.stopped_early
    assert any('non-finite loss at step 3' in m for m in caplog.messages)
    sd, ema = _weights(tmp_path)
    for k, v in {**sd, **ema}.items():  # BatchNorm statistics were rolled back as well
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k


def test_repeated_nan_stops_with_error_and_keeps_good_checkpoints(tmp_path):
    state = {'left': 0}
    snapshot = {}

    def inject(trainer, step):
        if step == 6:  # last step of epoch 1: its checkpoints are written after this callback
            trainer.model.register_forward_hook(_nan_hook(state))
            state['left'] = 10 ** 6
        if step == 7:
            snapshot.update({str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob('*')
                             if p.is_file() and not p.is_symlink()})

    cfg = tiny_config(tmp_path, overrides=['train.max_nonfinite=3'])
    with pytest.raises(NonFiniteLossError, match='3 bad steps in a row'):
        Trainer(cfg, RandomImages(48), RandomImages(16, augment=False), step_callback=inject).fit()
    assert {'model.safetensors', 'ema.safetensors', 'state.pt'} <= {name.split('/')[-1] for name in snapshot}
    for name, data in snapshot.items():
        assert (tmp_path / name).read_bytes() == data, f'{name} was rewritten after the NaN losses'
    sd, _ = read_state_dict(tmp_path / 'best' / 'model.safetensors')
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
