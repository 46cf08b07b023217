"""Ctrl-C (SIGINT to the whole process group, data workers included) stops a CLI run cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from emov2.train.testing import TINY_MODEL_KWARGS, make_image_folder


def test_sigint_to_process_group_saves_and_exits_cleanly(tmp_path):
    make_image_folder(tmp_path / 'data' / 'train', classes=('a', 'b'), per_class=8)
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'emov2', 'train', '--data', str(tmp_path / 'data'), '--out', str(out),
           'model.num_classes=2', f'model.kwargs={json.dumps(TINY_MODEL_KWARGS)}', 'data.img_size=32',
           'data.workers=2', 'optim.batch_size=4', 'sched.epochs=1000', 'train.amp=false',
           'train.progress=false', 'train.device=cpu', 'train.save_every_steps=1']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    state = out / 'last' / 'state.pt'
    deadline = time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C in a terminal: main process and data workers
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert 'stopped (resumable' in output
    saved = torch.load(state, weights_only=True)
    assert 0 < saved['global_step'] < 1000 * 4
