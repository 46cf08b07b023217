"""Params and FLOPs of every downstream model of the paper (detection, segmentation, U-EMO, V-EMO,
D-EMO) counted here, next to the paper's figures: the table of ``docs/DOWNSTREAM.md``.

Counting is the paper's (spec section 5): every parameter of the whole model, and fvcore's
multiply-accumulates (:func:`emov2.tools.common.count_flops`) at batch 1 at the paper's input size.
Detectors are counted the MMDetection way, on the network a raw image tensor runs through
(:func:`emov2.detection.models.flops_view`); each task module states its remaining gaps in its
``SIZE_NOTES``, which the table prints beside the numbers.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
from torch import nn

from ..detection import models as detection_models
from ..segmentation import models as segmentation_models
from .common import count_flops, count_params, paper_targets

__all__ = ['DownstreamRow', 'downstream_specs', 'downstream_rows', 'markdown_table', 'rows_to_json']


@dataclass
class DownstreamRow:
    """One paper figure pair (params, FLOPs) and what this package counts for the same model."""
    table: str
    row: str
    backbone: str
    input: str
    params_m: float
    flops_g: float
    paper_params_m: Optional[float]
    paper_flops_g: Optional[float]
    note: str = ''

    @property
    def params_diff(self) -> Optional[float]:
        return None if not self.paper_params_m else 100.0 * (self.params_m - self.paper_params_m) / self.paper_params_m

    @property
    def flops_diff(self) -> Optional[float]:
        return None if not self.paper_flops_g else 100.0 * (self.flops_g - self.paper_flops_g) / self.paper_flops_g


# (table, row, backbone, input label, build () -> (model counted for params, module counted for FLOPs, count_flops kwargs), note)
Spec = Tuple[str, str, str, str, Callable[[], Tuple[nn.Module, nn.Module, Dict[str, Any]]], str]


def _detection(row: str, backbone: str) -> Spec:
    h, w = detection_models.PAPER_INPUT[row]

    def build() -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
        det = detection_models.build_for_paper_row(row, backbone)
        return det, detection_models.flops_view(det), {'input_size': (h, w)}
    return ('detection_coco', row, backbone, f'{w}x{h}', build, detection_models.SIZE_NOTES.get(row, ''))


def _segmentation(table: str, row: str, backbone: str) -> Spec:
    side = segmentation_models.PAPER_INPUT[table]
    kind = segmentation_models.PAPER_ROW_TO_KIND[row]
    classes = 2 if table == 'unet_hrf_256' else 150  # HRF vessels / ADE20K

    def build() -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
        # the paper counts without the auxiliary head (MMSeg's get_flops)
        seg = segmentation_models.create_segmenter(kind, num_classes=classes, aux=False, **(
            {} if kind == backbone else {'backbone': backbone}))
        return seg, seg, {'input_size': side}
    notes = segmentation_models.SIZE_NOTES
    return (table, row, backbone, f'{side}x{side}', build, notes.get(f'{row}/{backbone}', notes.get(row, '')))


def _registered(table: str, name: str, size: int, note: str = '', **count: Any) -> Spec:
    def build() -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
        model = timm.create_model(name)  # the registered defaults (DiT takes no in_chans)
        return model, model, {'input_size': size, **count}
    frames = count.get('frames')
    label = (f'{frames}x' if frames else '') + f'{size}x{size}' + (f'x{count["in_chans"]}' if 'in_chans' in count else '')
    return (table, name, name, label, build, note)


VIDEO_NOTE = ('3D stem 3x3x3 with temporal stride 2, 5x5x5 depthwise kernels; 400-class head '
              '(docs/VIDEO.md, "Temporal kernels and strides")')
DIT_NOTE = 'latent 32x32x4 (256 px images), 1000 classes; one conditioned forward pass'
DIT_BASELINE_NOTE = (DIT_NOTE + '. The plain DiT baselines measure the DiT paper\'s own figures (Peebles & Xie, '
                     'Table 4: 6.06 / 23.01 / 80.71 / 118.64 G for S/B/L/XL-2); the EMOv2 paper prints lower '
                     'FLOPs (5.5 / 21.8 / 77.5 / 114.5) for the same models and parameters')


def downstream_specs(targets: Dict[str, Any]) -> List[Spec]:
    """Every downstream row of ``paper_targets.json`` this package builds, in the paper's order."""
    specs: List[Spec] = []
    for row, by_backbone in targets.get('detection_coco', {}).items():
        if not row.startswith('_'):
            specs += [_detection(row, backbone) for backbone in by_backbone]
    for row, by_backbone in targets.get('segmentation_ade20k_512', {}).items():
        if not row.startswith('_'):
            specs += [_segmentation('segmentation_ade20k_512', row, backbone) for backbone in by_backbone]
    for row in targets.get('unet_hrf_256', {}):
        specs.append(_segmentation('unet_hrf_256', row, row))
    for name, entry in targets.get('video_kinetics400', {}).items():
        if name.startswith('v_emov2'):
            specs.append(_registered('video_kinetics400', name, 160, VIDEO_NOTE, frames=int(entry['frames'])))
    for name in targets.get('dit_imagenet_256_400k', {}):
        note = DIT_BASELINE_NOTE if name.startswith('dit_') else DIT_NOTE
        specs.append(_registered('dit_imagenet_256_400k', name, 32, note, in_chans=4))
    return specs


def _paper(targets: Dict[str, Any], table: str, row: str, backbone: str) -> Dict[str, Any]:
    entry = targets.get(table, {}).get(row, {})
    return entry.get(backbone, {}) if table in ('detection_coco', 'segmentation_ade20k_512') else entry


def downstream_rows(targets: Optional[Dict[str, Any]] = None,
                    on_row: Optional[Callable[[int, int, str], None]] = None) -> List[DownstreamRow]:
    """Count every spec of :func:`downstream_specs` (several seconds each on a CPU)."""
    targets = targets if targets is not None else paper_targets()
    specs = downstream_specs(targets)
    rows = []
    for i, (table, row, backbone, label, build, note) in enumerate(specs):
        if on_row is not None:
            on_row(i, len(specs), f'{row} {backbone}')
        model, counted, kwargs = build()
        paper = _paper(targets, table, row, backbone)
        rows.append(DownstreamRow(table, row, backbone, label, count_params(model) / 1e6,
                                  count_flops(counted, **kwargs) / 1e9, paper.get('params'), paper.get('flops_g'), note))
    if on_row is not None:
        on_row(len(specs), len(specs), '')
    return rows


def _num(v: Optional[float], digits: int) -> str:
    return '-' if v is None else f'{v:.{digits}f}'


def _pct(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:+.1f}%'


HEADER = ['model', 'backbone', 'input', 'params (M)', 'paper (M)', 'Δ', 'FLOPs (G)', 'paper (G)', 'Δ', 'note']


def table_cells(r: DownstreamRow, note: str = '') -> List[str]:
    return [r.row, r.backbone, r.input, _num(r.params_m, 2), _num(r.paper_params_m, 1), _pct(r.params_diff),
            _num(r.flops_g, 2), _num(r.paper_flops_g, 1), _pct(r.flops_diff), note if note else r.note]


def section_notes() -> Dict[str, List[str]]:
    """How each paper table is counted (printed once under it)."""
    det, seg = detection_models.SIZE_NOTES, segmentation_models.SIZE_NOTES
    return {'detection_coco': [det['counting']],
            'segmentation_ade20k_512': [seg['counting'], seg['final_upsample']],
            'unet_hrf_256': [seg['counting']]}


DOC_HEADER = """# Downstream models: measured vs paper

Generated by `emov2 downstream --markdown docs/DOWNSTREAM.md` (do not edit by hand). Params count every
parameter of the model as the paper builds it (80 COCO classes, 150 ADE20K classes, 2 HRF classes,
400 Kinetics classes, 1000 ImageNet classes for D-EMO); FLOPs are fvcore multiply-accumulates at
batch 1 at the paper's input (spec section 5). Δ is ours minus the paper's, relative to the paper's;
the paper prints one decimal, so a Δ of a few percent on sub-1 G rows is its rounding. Accuracy
figures (mAP, mIoU, top-1, FID) are the paper's and cannot be reproduced here: no COCO, ADE20K, HRF,
Kinetics or ImageNet, and no GPU time for them. What the task code learns is shown on real pixels by
each task's demo (docs/DETECTION.md, SEGMENTATION.md, VIDEO.md, GENERATION.md).
"""


def markdown_table(rows: List[DownstreamRow], header: bool = False) -> str:
    """One Markdown table per paper table; each distinct note is printed once under its table and
    referenced from the rows by number. ``header``: start with :data:`DOC_HEADER` (the whole document)."""
    out: List[str] = [DOC_HEADER] if header else []
    extra = section_notes()
    for table in dict.fromkeys(r.table for r in rows):
        notes: List[str] = list(dict.fromkeys(r.note for r in rows if r.table == table and r.note))
        out += [f'### {table}', '', '| ' + ' | '.join(HEADER) + ' |', '|' + '---|' * len(HEADER)]
        out += ['| ' + ' | '.join(table_cells(r, f'({notes.index(r.note) + 1})' if r.note else '')) + ' |'
                for r in rows if r.table == table]
        out.append('')
        out += [f'* {text}' for text in extra.get(table, [])]
        out += [f'* ({i}) {text}' for i, text in enumerate(notes, 1)]
        out.append('')
    return '\n'.join(out)


def rows_to_json(rows: List[DownstreamRow]) -> str:
    return json.dumps([{**asdict(r), 'params_diff_pct': r.params_diff, 'flops_diff_pct': r.flops_diff}
                       for r in rows], indent=2)
