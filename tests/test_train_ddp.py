"""Two CPU processes under torchrun (gloo): training finishes, ranks agree, evaluation covers all data."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from emov2.train.report import read_log
from emov2.train.testing import TINY_MODEL_KWARGS, make_image_folder


def test_torchrun_two_cpu_processes(tmp_path):
    make_image_folder(tmp_path / 'data' / 'train', classes=('a', 'b', 'c'), per_class=6)
    make_image_folder(tmp_path / 'data' / 'val', classes=('a', 'b', 'c'), per_class=3)  # 9: odd, uneven shards
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           '-m', 'emov2', 'train', '--data', str(tmp_path / 'data'), '--out', str(out),
           'model.num_classes=3', f'model.kwargs={json.dumps(TINY_MODEL_KWARGS)}', 'model.drop_path_rate=0.1',
           'data.img_size=32', 'data.workers=0', 'optim.batch_size=6', 'sched.epochs=2', 'sched.warmup_epochs=1',
           'train.amp=false', 'train.progress=false', 'train.device=cpu',
           'train.log_format=csv']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    sums = summary['rank_checksums']
    assert len(sums) == 2 and sums[0] == sums[1]  # both replicas hold the same weights
    assert summary['global_step'] == 6  # 18 images, 3 per rank per step -> 3 steps per epoch
    log = read_log(out / 'log.csv')
    assert [r['epoch'] for r in log] == [0, 1]
    assert log[-1]['val_images'] == 9  # the two evaluation shards together cover the whole val set
    assert (out / 'last' / 'model.safetensors').is_file() and (out / 'curves.png').is_file()
