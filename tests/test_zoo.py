"""Params and FLOPs of every model and ablation with an official figure are within 0.5% of it."""
import json

import pytest

import emov2
from emov2.tools.zoo import ABLATIONS, count_flops, count_params


def _cases(reference_dir):
    targets = json.loads((reference_dir / 'paper_targets.json').read_text())
    cases = []
    for key, e in targets['classification'].items():
        model = key.split('@')[0]
        cases.append((key, model, {'window_size': e.get('window', 7)}, e['input'], e['measured']))
    for key, e in targets['ablations_emov2_5m'].items():
        if key.startswith('_') or 'measured' not in e:
            continue
        cases.append((f'emov2_5m/{key}', 'emov2_5m', ABLATIONS[key], 224, e['measured']))
    return cases


def test_every_measured_figure_is_covered(reference_dir):
    names = {c[0] for c in _cases(reference_dir)}
    assert len(names) == 11 + 16
    assert set(emov2.list_models('emo')) <= names


@pytest.mark.parametrize('part', range(4))
def test_params_and_flops_match_official(reference_dir, part):
    """Every 4th case from ``part`` (four tests, so pytest-xdist spreads the fvcore counts)."""
    failures = []
    for name, model, switches, size, measured in _cases(reference_dir)[part::4]:
        m = emov2.create_model(model, **switches)
        params, flops = count_params(m) / 1e6, count_flops(m, size) / 1e6
        if abs(params - measured['params']) / measured['params'] > 0.005:
            failures.append(f'{name}: params {params:.3f}M vs {measured["params"]}M')
        if abs(flops - measured['flops']) / measured['flops'] > 0.005:
            failures.append(f'{name}: FLOPs {flops:.1f}M vs {measured["flops"]}M')
    assert not failures, '\n'.join(failures)


def test_table_iii_rows_are_in_the_zoo():
    """DeiT-Tiny (timm's), PVT-Tiny and their iRMB / i2RMB versions appear with the paper's figures;
    a row is counted from the real model (timm's DeiT-Tiny here: 5.717M, 1258 M MACs)."""
    from emov2.tools.common import paper_targets
    from emov2.tools.zoo import TOY_TABLE_III_MODELS, _row, markdown_table, zoo_specs
    targets = paper_targets()
    specs = {s[0]: s for s in zoo_specs(targets, include_ablations=False)}
    for key in targets['toy_table_iii']:
        assert key in specs and specs[key][1] == TOY_TABLE_III_MODELS[key]
        assert specs[key][4]['paper'] == targets['toy_table_iii'][key]
    row = _row(*specs['deit_tiny'])
    assert row.model == 'deit_tiny_patch16_224' and row.paper_top1 == 72.2 and row.paper_params_m == 5.7
    assert abs(row.params_m - 5.717) < 0.001 and abs(row.flops_m - 1258.4) < 0.5
    assert '| deit_tiny | 224 | 5.717 |' in markdown_table([row])
