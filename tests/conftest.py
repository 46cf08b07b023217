import json
import os
import sys
from pathlib import Path

import pytest
import torch

# pytest-xdist workers share the machine's cores: one torch thread pool per core each, not one per worker
# per core (with `-n 2` on 2 cores, 2 x 2 OpenMP threads spin against each other and slow every test).
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('EMOV2_SHARED', REPO.parent / 'shared'))
REFERENCE = SHARED / 'reference'


@pytest.fixture(scope='session')
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f'shared reference data not found at {REFERENCE} (set EMOV2_SHARED)')
    return REFERENCE


@pytest.fixture(scope='session')
def official_weights(reference_dir):
    """The reference's synth_state_dict / synth_input helpers."""
    sys.path.insert(0, str(reference_dir))
    import official_weights as ow
    return ow


@pytest.fixture(scope='session')
def manifest(reference_dir):
    def load(variant: str):
        return json.loads((reference_dir / 'official_keys' / f'{variant}.keys.json').read_text())
    return load


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
