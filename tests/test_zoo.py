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


def test_params_and_flops_match_official(reference_dir):
    failures = []
    for name, model, switches, size, measured in _cases(reference_dir):
        m = emov2.create_model(model, **switches)
        params, flops = count_params(m) / 1e6, count_flops(m, size) / 1e6
        if abs(params - measured['params']) / measured['params'] > 0.005:
            failures.append(f'{name}: params {params:.3f}M vs {measured["params"]}M')
        if abs(flops - measured['flops']) / measured['flops'] > 0.005:
            failures.append(f'{name}: FLOPs {flops:.1f}M vs {measured["flops"]}M')
    assert not failures, '\n'.join(failures)
