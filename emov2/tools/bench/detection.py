"""SSDLite speed: EMOv2 backbones against torchvision's SSDLite-MobileNetV3-Large, on CPU.

Every model runs in eval mode in one process, timed round-robin (:func:`run_interleaved`, medians),
in two forms: the *raw* tensor path (normalisation + backbone + neck + head on a ``(B, 3, S, S)``
batch: what the ONNX export holds) and the *full* torchvision model (a list of images in, resize,
anchors, decoding and NMS out). Batch 1 gives latency, a larger batch throughput. EMO detectors run
as :func:`emov2.deploy.deploy` makes them (and, with ``eager=True``, also as the training graph);
torchvision's model has no such form and runs as built. Both use the same post-processing settings
and 80 classes; weights are random (the post-processing cost of trained weights differs: fewer boxes
pass the score threshold). Ratios are reported, never asserted.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from ...deploy import deploy
from ...detection.models import create_detector, flops_view
from ...detection.onnx import SSDLiteExportable
from ..common import count_flops, count_params
from .timing import Case, run_interleaved

BASELINE = 'ssdlite320_mobilenet_v3_large'
# post-processing shared by all models (the EMO detectors' defaults: MMDetection's SSDLite test settings)
POSTPROCESS = dict(score_thresh=0.02, nms_thresh=0.45, detections_per_img=200, topk_candidates=400)


def _baseline(num_classes: int) -> nn.Module:
    return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                         **POSTPROCESS).eval()


def detection_models(backbones: Sequence[str], image_size: int = 320, eager: bool = False,
                     num_classes: int = 80) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{name: (eval-mode SSD to time, its training graph to count)}``: torchvision's baseline, then each
    backbone deployed (and, with ``eager``, as built). MACs are counted on the training graph (fvcore cannot
    trace the deployed form's fused oneDNN ops; deploy does not change the arithmetic)."""
    base = _baseline(num_classes)
    models = {BASELINE: (base, base)}
    for bb in backbones:
        det = create_detector('ssdlite', bb, num_classes=num_classes, image_size=image_size, **POSTPROCESS).eval()
        if eager:
            models[f'ssdlite_{bb}'] = (det, det)
        models[f'ssdlite_{bb}_deployed'] = (deploy(det), det)
    return models


def bench_detection(backbones: Sequence[str] = ('emov2_1m', 'emov2_2m', 'emov2_5m'), image_size: int = 320,
                    batch: int = 16, repeats: int = 5, warmup: int = 1, min_time_s: float = 0.5,
                    threads: int | None = None, eager: bool = False, count_macs: bool = True,
                    log: Callable[[str], None] | None = None) -> dict:
    """Time SSDLite on ``backbones`` against torchvision's SSDLite-MobileNetV3 at ``image_size`` px.

    Returns ``{'config', 'rows', 'baseline'}``: one row per model with ``params_m``, ``gmacs`` (fvcore, the
    raw path at batch 1), ``raw_latency_ms`` (batch 1), ``raw_img_per_s`` (``batch``), ``full_latency_ms``,
    ``full_img_per_s`` and, for EMO rows, the ratios to the baseline (``*_speedup``: baseline time / this
    time; > 1 is faster).
    """
    if threads:
        torch.set_num_threads(threads)
    models = detection_models(backbones, image_size, eager)
    g = torch.Generator().manual_seed(0)
    x1 = torch.rand(1, 3, image_size, image_size, generator=g)
    xb = torch.rand(batch, 3, image_size, image_size, generator=g)
    # the full models take images of another size and resize them, as in use (640x480 like COCO)
    imgs1 = [torch.rand(3, 480, 640, generator=g)]
    imgsb = [torch.rand(3, 480, 640, generator=g) for _ in range(batch)]
    cases: list[Case] = []
    macs = {name: count_flops(flops_view(graph), (image_size, image_size)) / 1e9 if count_macs else None
            for name, (_, graph) in models.items()}
    for name, (det, _) in models.items():
        raw = SSDLiteExportable(det).eval()
        cases += [Case(f'{name}|raw_latency', _no_grad(raw, x1), 1), Case(f'{name}|raw_tput', _no_grad(raw, xb), batch),
                  Case(f'{name}|full_latency', _no_grad(det, imgs1), 1),
                  Case(f'{name}|full_tput', _no_grad(det, imgsb), batch)]
    # latency with several calls per sample, throughput batches one call each
    lat = [c for c in cases if c.key.endswith('latency')]
    tput = [c for c in cases if c.key.endswith('tput')]
    run_interleaved(lat, repeats=repeats, warmup=warmup, min_time_s=min_time_s, on_progress=log)
    run_interleaved(tput, repeats=repeats, warmup=warmup, on_progress=log)
    by_key = {c.key: c for c in cases}
    rows = []
    for name, (_, graph) in models.items():
        row = {'model': name, 'params_m': count_params(graph) / 1e6, 'gmacs': macs[name]}
        for task in ('raw', 'full'):
            lat_case, tput_case = by_key[f'{name}|{task}_latency'], by_key[f'{name}|{task}_tput']
            row[f'{task}_latency_ms'] = lat_case.median_s * 1e3 if lat_case.median_s else None
            row[f'{task}_img_per_s'] = tput_case.throughput
            row[f'{task}_spread'] = max(filter(None, (lat_case.spread, tput_case.spread)), default=None)
            errors = [c.error for c in (lat_case, tput_case) if c.error]
            if errors:
                row['error'] = '; '.join(errors)
        rows.append(row)
    base = rows[0]
    for row in rows[1:]:
        for task in ('raw', 'full'):
            row[f'{task}_latency_speedup'] = _ratio(base[f'{task}_latency_ms'], row[f'{task}_latency_ms'])
            row[f'{task}_throughput_speedup'] = _ratio(row[f'{task}_img_per_s'], base[f'{task}_img_per_s'])
    config = dict(backbones=list(backbones), image_size=image_size, batch=batch, repeats=repeats, warmup=warmup,
                  min_time_s=min_time_s, threads=torch.get_num_threads(), eager=eager, postprocess=POSTPROCESS)
    return {'config': config, 'baseline': BASELINE, 'rows': rows}


def _no_grad(module: nn.Module, inputs) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return module(inputs)
    return call


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def markdown_table(result: dict) -> str:
    """The rows of :func:`bench_detection` as a markdown table."""
    cfg = result['config']
    head = ['model', 'params M', 'GMACs', 'raw ms b1', 'raw img/s', 'full ms b1', 'full img/s',
            'raw x lat', 'raw x tput', 'full x lat', 'full x tput']
    keys = ['model', 'params_m', 'gmacs', 'raw_latency_ms', 'raw_img_per_s', 'full_latency_ms', 'full_img_per_s',
            'raw_latency_speedup', 'raw_throughput_speedup', 'full_latency_speedup', 'full_throughput_speedup']
    lines = [f"SSDLite at {cfg['image_size']} px, batch {cfg['batch']} for img/s, {cfg['threads']} threads; "
             f"x = speed-up over {result['baseline']} (> 1 is faster)", '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in result['rows']:
        cells = [r.get(k) for k in keys]
        lines.append('| ' + ' | '.join('-' if v is None else (f'{v:.2f}' if isinstance(v, float) else str(v))
                                       for v in cells) + ' |')
    return '\n'.join(lines) + '\n'
