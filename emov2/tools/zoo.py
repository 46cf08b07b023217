"""Params and FLOPs of every model and ablation row, counted the paper's way, next to its figures.

FLOPs are :func:`emov2.tools.common.count_flops`: fvcore's multiply-accumulates (conv, matmul,
linear and the norms) at batch 1 in eval mode (attention is written as batched matmuls, which
fvcore counts). The paper's figures are the package's ``emov2/data/paper_targets.json``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..factory import list_models
from ..train.modeling import create
from .common import count_flops, count_params, paper_targets

__all__ = ['ZooRow', 'ABLATIONS', 'TOY_TABLE_III_MODELS', 'count_params', 'count_flops', 'zoo_rows', 'zoo_specs', 'paper_targets', 'markdown_table']

# Paper ablation rows (Tables V, XV, XVII) as create_model switches on EMOv2-5M.
ABLATIONS: Dict[str, Dict[str, Any]] = {
    'attention_none': dict(attention='none'),
    'attention_neighbour': dict(attention='neighbour'),
    'attention_distant': dict(attention='distant'),
    'attention_spanning': dict(attention='spanning'),
    'stages_4': dict(attention_stages=(4,)),
    'stages_34': dict(attention_stages=(3, 4)),
    'stages_234': dict(attention_stages=(2, 3, 4)),
    'stages_1234': dict(attention_stages=(1, 2, 3, 4)),
    'kernel_1': dict(dw_kernel=1),
    'kernel_3': dict(dw_kernel=3),
    'kernel_5': dict(dw_kernel=5),
    'kernel_7': dict(dw_kernel=7),
    'kernel_9': dict(dw_kernel=9),
    'kernel_5_dilation_2': dict(dw_kernel=5, dw_dilation=2),
    'kernel_5_dilation_3': dict(dw_kernel=5, dw_dilation=3),
    'no_attention_no_dwconv': dict(attention='none', dw_type='none'),
    'attention_only_no_dwconv': dict(dw_type='none'),
    'pre_attention': dict(attention_position='pre'),
    'depths_2_2_10_3': dict(depths=(2, 2, 10, 3)),
    'depths_2_2_12_2': dict(depths=(2, 2, 12, 2)),
    'depths_4_4_8_3': dict(depths=(4, 4, 8, 3)),
    'depths_2_2_12_3': dict(depths=(2, 2, 12, 3)),
    'depths_2_2_8_2_dims_48_72_224_288': dict(depths=(2, 2, 8, 2), embed_dims=(48, 72, 224, 288)),
}

# Table III (``toy_table_iii``): row key -> model. DeiT-Tiny is timm's own; the rest are
# emov2.models.deit_pvt (PVT-Tiny v1 and the iRMB / i2RMB swaps).
TOY_TABLE_III_MODELS: Dict[str, str] = {
    'deit_tiny': 'deit_tiny_patch16_224',
    'deit_tiny_irmb': 'deit_tiny_irmb',
    'deit_tiny_i2rmb': 'deit_tiny_i2rmb',
    'pvt_tiny': 'pvt_tiny',
    'pvt_tiny_irmb': 'pvt_tiny_irmb',
    'pvt_tiny_i2rmb': 'pvt_tiny_i2rmb',
}


@dataclass
class ZooRow:
    """One model or ablation: what we count, what the official code gives, what the paper prints."""
    name: str
    model: str
    input_size: int
    switches: Dict[str, Any] = field(default_factory=dict)
    params_m: float = 0.0
    flops_m: float = 0.0
    measured_params_m: Optional[float] = None
    measured_flops_m: Optional[float] = None
    paper_params_m: Optional[float] = None
    paper_flops_m: Optional[float] = None
    paper_top1: Optional[float] = None

    def diff_pct(self, ours: float, ref: Optional[float]) -> Optional[float]:
        return None if ref is None else 100.0 * (ours - ref) / ref


def _row(name: str, model: str, size: int, switches: Dict[str, Any], entry: Dict[str, Any]) -> ZooRow:
    m = create(model, **switches)  # this package's models, or timm's (DeiT-Tiny)
    paper, measured = entry.get('paper', {}), entry.get('measured', {})
    return ZooRow(
        name=name, model=model, input_size=size, switches=switches,
        params_m=count_params(m) / 1e6, flops_m=count_flops(m, size) / 1e6,
        measured_params_m=measured.get('params'), measured_flops_m=measured.get('flops'),
        paper_params_m=paper.get('params'), paper_flops_m=paper.get('flops'), paper_top1=paper.get('top1'))


def zoo_specs(targets: Dict[str, Any], include_ablations: bool = True
              ) -> List[Tuple[str, str, int, Dict[str, Any], Dict[str, Any]]]:
    """``(row name, model, input size, switches, paper entry)`` of every row :func:`zoo_rows` builds:
    the EMO models, their 256/512 px recipes, Table III (DeiT-Tiny / PVT-Tiny and their iRMB / i2RMB
    versions; the paper gives params, FLOPs and top-1 only) and the EMOv2-5M ablations."""
    cls = targets.get('classification', {})
    specs = [(name, name, 224, {}, cls.get(name, {})) for name in list_models('emo')]
    for key, entry in cls.items():
        if '@' in key:
            specs.append((key, key.split('@')[0], int(entry['input']), {'window_size': entry.get('window', 7)}, entry))
    toy = targets.get('toy_table_iii', {})
    specs += [(key, model, 224, {}, {'paper': toy[key]} if key in toy else {})
              for key, model in TOY_TABLE_III_MODELS.items()]
    if include_ablations:
        abl = targets.get('ablations_emov2_5m', {})
        specs += [(f'emov2_5m/{key}', 'emov2_5m', 224, switches, abl.get(key, {}))
                  for key, switches in ABLATIONS.items()]
    return specs


def zoo_rows(targets: Optional[Dict[str, Any]] = None, include_ablations: bool = True,
             on_row: Optional[Callable[[int, int, str], None]] = None) -> List[ZooRow]:
    """Every EMO model (plus the 256/512 px recipes), the Table III rows and every EMOv2-5M ablation row.

    ``on_row(done, total, name)`` is called before each row is counted (about 4 s each on a CPU)
    and once more with ``done == total`` at the end, for progress displays.
    """
    targets = targets if targets is not None else paper_targets()
    specs = zoo_specs(targets, include_ablations)
    rows = []
    for i, (name, model, size, switches, entry) in enumerate(specs):
        if on_row is not None:
            on_row(i, len(specs), name)
        rows.append(_row(name, model, size, switches, entry))
    if on_row is not None:
        on_row(len(specs), len(specs), '')
    return rows


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return '-' if v is None else f'{v:.{digits}f}'


def _pct(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:+.2f}%'


TABLE_HEADER = ['name', 'input', 'params (M)', 'official (M)', 'Δ', 'paper (M)', 'FLOPs (M)', 'official (M)', 'Δ',
                'paper (M)', 'Δ paper', 'paper top-1']


def table_cells(r: ZooRow) -> List[str]:
    return [
        r.name, str(r.input_size),
        _fmt(r.params_m), _fmt(r.measured_params_m), _pct(r.diff_pct(r.params_m, r.measured_params_m)),
        _fmt(r.paper_params_m, 1),
        _fmt(r.flops_m, 1), _fmt(r.measured_flops_m, 1), _pct(r.diff_pct(r.flops_m, r.measured_flops_m)),
        _fmt(r.paper_flops_m, 0), _pct(r.diff_pct(r.flops_m, r.paper_flops_m)), _fmt(r.paper_top1, 1),
    ]


def markdown_table(rows: List[ZooRow]) -> str:
    lines = ['| ' + ' | '.join(TABLE_HEADER) + ' |', '|' + '---|' * len(TABLE_HEADER)]
    lines += ['| ' + ' | '.join(table_cells(r)) + ' |' for r in rows]
    return '\n'.join(lines)


def rows_to_json(rows: List[ZooRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
