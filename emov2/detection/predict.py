"""Using trained detectors: load a checkpoint set, score it on COCO data, detect objects in images.

A detection checkpoint records its detector kind, backbone, input size, class names, category ids
and label offset (:meth:`~emov2.detection.task.DetectionTask.checkpoint_meta`); the detector is
rebuilt from that and its weights are read by the one loader, :func:`emov2.factory.load_checkpoint`.
A checkpoint argument may be a run folder (its best set, else its last), a set folder or a file.

:func:`predict_detections` writes ``predictions.json`` (per image: boxes ``xyxy`` in pixels, labels,
class names, COCO category ids, scores and, for Mask R-CNN, masks as COCO RLE) and one PNG per image
with the detections drawn (``torchvision.utils.draw_bounding_boxes`` / ``draw_segmentation_masks``).
Unreadable images get an ``error`` entry; the others are still predicted.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..checkpoint import CheckpointError, read_metadata
from ..factory import load_checkpoint
from ..train.inference import ema_path_for, resolve_device, resolve_weights
from .data import CocoDetection, collate_detection, detection_transforms, read_image
from .models import create_detector
from .task import evaluate_detections

__all__ = ['load_detector', 'draw_detections', 'predict_detections', 'evaluate_detector']

_PALETTE = ['#e6194b', '#3cb44b', '#ffe119', '#4363d8', '#f58231', '#911eb4', '#46f0f0', '#f032e6',
            '#bcf60c', '#fabebe', '#008080', '#e6beff', '#9a6324', '#fffac8', '#800000', '#aaffc3']


def load_detector(checkpoint: str, use_ema: bool = False, score_thresh: Optional[float] = None
                  ) -> Tuple[nn.Module, Dict[str, Any]]:
    """The detector a checkpoint written by ``emov2 detect train`` describes, with its (EMA) weights, in eval mode.

    Returns ``(model, metadata)``. ``score_thresh`` replaces the detector's own threshold (its kept
    detections are then those above it).
    """
    path = resolve_weights(checkpoint)
    meta = read_metadata(path)
    if meta.get('task') != 'detection':
        raise CheckpointError(f'{path} is not a detection checkpoint (its task is {meta.get("task") or "not recorded"}); '
                              'use a checkpoint written by "emov2 detect train"')
    if use_ema and not meta.get('ema'):
        ema = ema_path_for(str(path))
        if ema is None:
            raise CheckpointError(f'no EMA weights next to {path} (the run was trained with ema.enable false)')
        path = ema
    kind = meta['kind']
    rcnn = kind == 'maskrcnn'
    options: Dict[str, Any] = {}
    thresh = score_thresh if score_thresh is not None else meta.get('score_thresh')
    if thresh is not None:
        options['box_score_thresh' if rcnn else 'score_thresh'] = float(thresh)
    if meta.get('nms_thresh') is not None:
        options['box_nms_thresh' if rcnn else 'nms_thresh'] = float(meta['nms_thresh'])
    if meta.get('detections_per_img') is not None:
        options['box_detections_per_img' if rcnn else 'detections_per_img'] = int(meta['detections_per_img'])
    if kind == 'ssdlite':
        options['ssdlite_norm'] = meta.get('ssdlite_norm') or 'bn'
    size = meta.get('image_size')
    model = create_detector(kind, backbone=meta['backbone'], num_classes=int(meta['num_classes']),
                            image_size=tuple(size) if isinstance(size, list) else size,
                            backbone_kwargs=meta.get('backbone_kwargs') or {}, **options)
    load_checkpoint(model, str(path), variant=f'{kind} on {meta["backbone"]}', head='strict')
    model.eval()
    meta = dict(meta)
    meta['class_names'] = list(meta.get('class_names') or [str(i) for i in range(int(meta['num_classes']))])
    meta['label_offset'] = int(meta.get('label_offset', model.label_offset))
    return model, meta


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: Sequence[str],
                    masks: Optional[torch.Tensor] = None, scale: int = 1, width: int = 2) -> torch.Tensor:
    """``image`` (uint8 3xHxW) with ``masks`` (bool NxHxW) and ``boxes`` (xyxy) drawn, ``scale`` times larger."""
    img = image
    if scale != 1:
        img = F.interpolate(img[None].float(), scale_factor=scale, mode='nearest')[0].to(torch.uint8)
    colours = [_PALETTE[hash(str(lab).split(' ')[0]) % len(_PALETTE)] for lab in labels]
    if masks is not None and len(masks):
        m = F.interpolate(masks[None].float(), scale_factor=scale, mode='nearest')[0] > 0.5
        img = draw_segmentation_masks(img, m, alpha=0.45, colors=colours)
    if len(boxes):
        img = draw_bounding_boxes(img, boxes.float() * scale, labels=list(labels), colors=colours, width=width)
    return img


def _encode_mask(mask: torch.Tensor) -> Dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {'size': [int(s) for s in rle['size']], 'counts': rle['counts'].decode('ascii')}


@torch.no_grad()
def predict_detections(images: Sequence[str], checkpoint: str, out_dir: Optional[str] = None,
                       score_thresh: float = 0.3, use_ema: bool = False, device: str = 'cpu',
                       draw: bool = True) -> List[Dict[str, Any]]:
    """Detections above ``score_thresh`` for each image; with ``out_dir``, ``predictions.json`` and drawn PNGs.

    Each result: ``{'image', 'width', 'height', 'detections': [{'box': [x0, y0, x1, y1], 'label',
    'class_name', 'category_id', 'score'(, 'mask': COCO RLE)}], 'drawn': png path}`` or
    ``{'image', 'error'}`` for an image that could not be read.
    """
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f'score threshold must be in [0, 1], got {score_thresh}')
    dev = resolve_device(device)
    model, meta = load_detector(checkpoint, use_ema=use_ema, score_thresh=min(score_thresh, 0.05))
    model.to(dev)
    names, ids, offset = meta['class_names'], meta.get('category_ids'), meta['label_offset']
    folder = Path(out_dir) if out_dir else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    results: List[Dict[str, Any]] = []
    used: Dict[str, int] = {}
    for path in images:
        try:
            img = read_image(path)
        except Exception as e:  # PIL raises many types for bad files
            results.append({'image': str(path), 'error': f'{type(e).__name__}: {e}'})
            continue
        out = model([img.to(dev).float() / 255.0])[0]
        out = {k: v.cpu() for k, v in out.items()}
        keep = out['scores'] >= score_thresh
        boxes, scores, labels = out['boxes'][keep].float(), out['scores'][keep].float(), out['labels'][keep] - offset
        masks = out['masks'][keep][:, 0] > 0.5 if 'masks' in out else None
        dets = []
        for i in range(len(boxes)):
            lab = int(labels[i])
            d = {'box': [round(float(v), 2) for v in boxes[i]], 'label': lab,
                 'class_name': names[lab] if 0 <= lab < len(names) else str(lab),
                 'category_id': int(ids[lab]) if ids and 0 <= lab < len(ids) else None, 'score': round(float(scores[i]), 4)}
            if masks is not None:
                d['mask'] = _encode_mask(masks[i])
            dets.append(d)
        r: Dict[str, Any] = {'image': str(path), 'width': int(img.shape[-1]), 'height': int(img.shape[-2]),
                             'detections': dets}
        if folder is not None and draw:
            stem = Path(path).stem
            used[stem] = used.get(stem, 0) + 1
            name = f'{stem}.png' if used[stem] == 1 else f'{stem}_{used[stem]}.png'
            scale = max(1, int(np.ceil(384 / max(1, min(img.shape[-2:])))))
            drawn = draw_detections(img, boxes, [f'{d["class_name"]} {d["score"]:.2f}' for d in dets], masks,
                                    scale=min(scale, 4))
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(folder / name)
            r['drawn'] = str(folder / name)
        results.append(r)
    if folder is not None:
        (folder / 'predictions.json').write_text(json.dumps(
            {'checkpoint': str(checkpoint), 'kind': meta['kind'], 'backbone': meta['backbone'],
             'score_thresh': score_thresh, 'class_names': names, 'results': results}, indent=2))
    return results


def evaluate_detector(checkpoint: str, images: str, annotations: str, batch_size: int = 8, workers: int = 2,
                      device: str = 'cpu') -> Dict[str, Any]:
    """COCO summary (COCOeval) of a detection checkpoint and of its EMA weights (when present) on
    ``images`` + ``annotations``; labels are matched to the JSON by the checkpoint's category ids.

    Returns ``{'checkpoint', 'kind', 'backbone', 'model': metrics, 'ema': metrics or None, 'data': counts}``.
    """
    dev = resolve_device(device)
    out: Dict[str, Any] = {'checkpoint': str(checkpoint), 'model': None, 'ema': None}
    for key, use_ema in (('model', False), ('ema', True)):
        try:
            model, meta = load_detector(checkpoint, use_ema=use_ema)
        except CheckpointError:
            if use_ema:
                continue
            raise
        ds = CocoDetection(images, annotations, detection_transforms(meta['kind'], False),
                           category_ids=meta.get('category_ids'))
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_detection)
        iou = ('bbox', 'segm') if meta['kind'] == 'maskrcnn' else ('bbox',)
        out[key] = evaluate_detections(model.to(dev), loader, ds.coco, ds.category_ids, meta['label_offset'], iou, dev)
        out.update(kind=meta['kind'], backbone=meta['backbone'], data=dict(ds.stats))
    return out
