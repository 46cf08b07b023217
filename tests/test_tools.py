"""emov2.tools: layout and layering, one FLOP counter, the registry as the model list, and the paper's
figures shipped as package data (``emov2 zoo`` without ``../shared``)."""
import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest

import emov2

PACKAGE = Path(emov2.__file__).resolve().parent

# layers -> models -> (deploy, kernels) -> factory/checkpoint -> train -> (detection, segmentation, video,
# generation) -> tools -> cli
LEVEL = {'layers': 0, 'models': 1, 'deploy': 2, 'kernels': 2, 'factory': 3, 'checkpoint': 3, 'reference': 3,
         'train': 4, 'detection': 4.5, 'segmentation': 4.5, 'video': 4.5, 'generation': 4.5,
         'tools': 5, 'cli': 6}


def _imports(path: Path):
    """``(emov2 subpackage imported, line, inside a function)`` for every import of ``path``."""
    rel = path.relative_to(PACKAGE.parent).with_suffix('').parts  # ('emov2', 'tools', 'bench', 'runner')
    pkg = rel[:-1]  # the package a relative import starts from (also for __init__.py)
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg[:len(pkg) - node.level + 1])
                names = [base + (node.module.split('.') if node.module else [a.name])
                         for a in (node.names if not node.module else [None])]
            else:
                names = [node.module.split('.')] if node.module else []
        elif isinstance(node, ast.Import):
            names = [a.name.split('.') for a in node.names]
        else:
            continue
        for parts in names:
            if parts and parts[0] == 'emov2':
                yield (parts[1] if len(parts) > 1 else '__init__'), node.lineno, id(node) in nested


def _modules(sub: str):
    return sorted((PACKAGE / sub).rglob('*.py')) if (PACKAGE / sub).is_dir() else [PACKAGE / f'{sub}.py']


def test_tools_layout():
    for name in ('__init__', 'common', 'zoo', 'export', 'bench/__init__', 'bench/runner', 'bench/models'):
        assert (PACKAGE / 'tools' / f'{name}.py').is_file(), name
    for old in ('zoo.py', 'export.py', 'bench'):
        assert not (PACKAGE / old).exists(), f'emov2/{old} moved to emov2/tools/'


def test_no_upward_imports_into_tools_or_cli():
    """Nothing below ``tools`` imports ``tools``; ``tools`` imports nothing from ``cli``."""
    bad = []
    for sub, level in LEVEL.items():
        if level >= LEVEL['tools']:
            continue
        for path in _modules(sub):
            bad += [f'{path.relative_to(PACKAGE)}:{line} imports emov2.{target}'
                    for target, line, _ in _imports(path) if LEVEL.get(target, -1) >= LEVEL['tools']]
    for path in _modules('tools'):
        bad += [f'{path.relative_to(PACKAGE)}:{line} imports emov2.cli' for target, line, _ in _imports(path)
                if target == 'cli']
    assert not bad, '\n'.join(bad)


def test_tools_and_their_commands_import_emov2_at_the_top():
    """No import of our own modules hidden in a function (the bench <-> export cycle is gone)."""
    paths = _modules('tools') + [PACKAGE / 'cli' / f'{c}.py' for c in ('bench', 'zoo', 'export')]
    hidden = [f'{p.relative_to(PACKAGE)}:{line} imports emov2.{t} inside a function'
              for p in paths for t, line, inside in _imports(p) if inside]
    assert not hidden, '\n'.join(hidden)
    export_imports = {t for t, _, _ in _imports(PACKAGE / 'tools' / 'export.py')}
    assert 'tools' not in export_imports  # export needs nothing from bench (bench uses export)
    text = (PACKAGE / 'tools' / 'export.py').read_text()
    assert 'bench' not in {a.module for a in ast.walk(ast.parse(text)) if isinstance(a, ast.ImportFrom)}


def test_one_flop_counter_in_macs():
    from emov2.tools import common, zoo
    from emov2.tools.bench import models as bench_models

    assert zoo.count_flops is common.count_flops and bench_models.count_flops is common.count_flops
    assert 'multiply-accumulates' in common.count_flops.__doc__.lower()
    counters = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob('*.py')
                if 'FlopCountAnalysis(' in p.read_text() or 'FlopCounterMode' in p.read_text()
                or 'def count_flops' in p.read_text()]
    assert counters == ['tools/common.py'], counters
    m = emov2.create_model('emov2_1m')
    assert common.count_flops(m) / 1e6 == pytest.approx(284.8, rel=0.005)  # the official fvcore figure


def test_count_flops_counts_sdpa_like_bmm():
    import torch
    from torch import nn
    from emov2.tools.common import count_flops

    class Attn(nn.Module):
        def __init__(self, sdpa):
            super().__init__()
            self.sdpa, self.proj = sdpa, nn.Conv2d(3, 3, 1)

        def forward(self, x):  # q, k, v of shape (1, 2 heads, 16 tokens, 6 channels)
            q = k = v = self.proj(x).reshape(1, 2, 16, 6)
            if self.sdpa:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return (q @ k.transpose(-2, -1)).softmax(-1) @ v

    assert count_flops(Attn(True), 8) == count_flops(Attn(False), 8) == 3 * 3 * 64 + 2 * (2 * 16 * 16 * 6)


def test_bench_reads_the_registry():
    from emov2.tools.bench import BenchConfig
    from emov2.tools.bench.models import default_models, is_emo, model_presets, resolve_models

    registry = emov2.list_models()
    assert model_presets()['emo_all'] == emov2.list_models('emo')
    assert all(n in registry for n in model_presets()['emo'])
    emo_default = [n for n in default_models() if is_emo(n)]
    assert emo_default and set(emo_default) <= set(registry)
    assert not is_emo('edgenext_small') and is_emo('emov2_5m')
    assert set(BenchConfig.quick().models) - {'edgenext_xx_small'} <= set(registry)
    assert resolve_models('emo_all') == emov2.list_models('emo')
    source = (PACKAGE / 'tools' / 'bench' / 'models.py').read_text()
    assert '"emov2_1m", "emov2_2m"' not in source and 'EMOV2 = ' not in source  # no hard-coded EMO list


def test_bench_paper_figures_come_from_the_package_data():
    from emov2.tools.bench.models import paper_throughput, paper_top1
    from emov2.tools.common import paper_targets

    targets = paper_targets()
    assert paper_top1('emov2_1m') == targets['classification']['emov2_1m']['paper']['top1'] == 72.3
    assert paper_throughput('edgenext_small')['cpu'] == targets['throughput_table_xvi']['edgenext_small']['cpu']
    assert paper_top1('mobilenetv3_small_050') is None and paper_throughput('mobilenetv3_small_050') == {}


# --- paper_targets.json as package data -----------------------------------------------------------

def test_packaged_paper_targets_equal_the_shared_ones(reference_dir):
    packaged = resources.files('emov2').joinpath('data/paper_targets.json')
    assert packaged.is_file()
    assert json.loads(packaged.read_text()) == json.loads((reference_dir / 'paper_targets.json').read_text())
    from emov2.tools.common import paper_targets
    assert paper_targets() == json.loads(packaged.read_text())


def test_paper_targets_are_declared_package_data():
    import tomllib

    pyproject = tomllib.loads((PACKAGE.parent / 'pyproject.toml').read_text())
    assert 'data/*.json' in pyproject['tool']['setuptools']['package-data']['emov2']


def test_zoo_needs_no_shared_folder(tmp_path):
    """``emov2 zoo`` from a copy of the package with no checkout or ``shared`` folder beside it."""
    site = tmp_path / 'site'
    shutil.copytree(PACKAGE, site / 'emov2', ignore=shutil.ignore_patterns('__pycache__', '*.so', 'build'))
    script = textwrap.dedent('''
        import json, sys
        from typer.testing import CliRunner
        import emov2, emov2.tools.zoo as zoo_mod
        from emov2.cli import app
        assert emov2.__file__.startswith(sys.argv[1]), emov2.__file__
        def fake_row(name, model, size, switches, entry):  # the 4 s fvcore count is not what is tested
            return zoo_mod.ZooRow(name=name, model=model, input_size=size, switches=switches,
                                  paper_top1=entry.get('paper', {}).get('top1'))
        zoo_mod._row = fake_row
        res = CliRunner().invoke(app, ['zoo', '--json'])
        assert res.exit_code == 0, res.output
        rows = {r['name']: r for r in json.loads(res.stdout)}
        print(json.dumps({'n': len(rows), 'top1': rows['emov2_5m']['paper_top1']}))
    ''')
    env = {k: v for k, v in os.environ.items() if k not in ('EMOV2_SHARED', 'PYTHONPATH')}
    env.update(PYTHONPATH=str(site), EMOV2_SHARED=str(tmp_path / 'no_shared'), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', script, str(site)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['n'] > 30 and out['top1'] == 79.4
