"""Object detection / instance segmentation as a :class:`~emov2.train.task.Task` of the shared trainer.

The detectors are torchvision's (built by :func:`emov2.detection.models.create_detector`): in train
mode ``model(images, targets)`` returns a dict of losses, whose sum is the training loss (each part
is logged as ``train_<name>``); in eval mode ``model(images)`` returns boxes, labels, scores (and
masks) in the input images' pixels. Evaluation is COCO's own: the detections of every process are
gathered, written in COCO's results format (category ids of the JSON, ``xywh`` boxes, RLE masks)
and scored by pycocotools' ``COCOeval`` against the validation JSON (crowd regions ignored as COCO
does), giving the full 12-number summary for ``bbox`` (and ``segm`` for Mask R-CNN) as
``bbox_AP``, ``bbox_AP50`` ... ``bbox_ARl``. The best checkpoint is the one with the highest
``bbox_AP`` (COCO's scale, 0-1).

The paper's optimiser is the default (spec section 7, MMDetection 1x): AdamW, lr 2e-4 at batch 16,
weight decay 0.05 (none on norms and biases: the trainer's rule), gradient clipping at 0.1 (norm),
12 epochs, cosine. Differences, stated: the warm-up is the trainer's, in whole epochs (1 epoch; the
paper warms up for 500 iterations) and the cosine spans all epochs after it. SSDLite keeps the same
optimiser and clip (MMDetection trains SSDLite with SGD for 600 epochs; the paper does not give
its SSDLite schedule). No EMA (MMDetection's 1x configs have none). Precise BN is off: the
backbone's norms are frozen (RetinaNet, Mask R-CNN).
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Dataset

from ..factory import load_checkpoint
from ..train.config import ConfigError
from ..train.distributed import all_gather_object, is_dist
from ..train.task import Task
from .data import AUGMENTATION, CocoDetection, collate_detection, detection_transforms
from .models import IMAGENET_MEAN, SSDLITE_NORMS, create_detector, detector_names

__all__ = ['DetectionTask', 'DETECTION_DEFAULTS', 'COCO_METRICS', 'coco_evaluate', 'to_coco_results',
           'find_coco_dataset', 'evaluate_detections', 'predict_batch']

_log = logging.getLogger('emov2.train')

#: the 12 numbers of COCOeval.summarize(), in its order
COCO_METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')

DETECTION_DEFAULTS: Dict[str, Any] = {
    'model': {'name': 'emov2_5m', 'window_size': 10},
    'data': {'workers': 4},
    'aug': {'auto_augment': None, 'color_jitter': 0.0, 'custom': 'detection: see detection.kind'},
    'detection': {
        'kind': 'retinanet',           # ssdlite, retinanet or maskrcnn
        'image_size': None,            # ssdlite: fixed input (320); others: shorter side (None: 800, longer <= 1333)
        'train_scales': None,          # retinanet / maskrcnn: shorter sides drawn per training image (multi-scale)
        'train_images': 'train2017',   # paths relative to data.root (or absolute)
        'train_annotations': 'annotations/instances_train2017.json',
        'val_images': 'val2017',
        'val_annotations': 'annotations/instances_val2017.json',  # null: no validation
        'backbone_checkpoint': None,   # ImageNet weights of the backbone (official .pth or ours)
        'zoom_out': 4.0,               # ssdlite: SSD's largest zoom-out (1: off)
        'hflip': True,                 # random horizontal flips in training (false for non-symmetric objects)
        'keep_empty': True,            # images without boxes train as negatives (else left out, counted)
        'score_thresh': None,          # None: the detector's own (0.05 RetinaNet / Mask R-CNN, 0.02 SSDLite)
        'nms_thresh': None,
        'detections_per_img': 100,
        'ssdlite_norm': 'bn',          # ssdlite: norm of the extra levels and head, bn (the spec's) or gn (GroupNorm)
    },
    'optim': {'batch_size': 16, 'lr': 2.0e-4, 'weight_decay': 0.05, 'clip_grad': 0.1, 'label_smoothing': 0.0},
    'sched': {'epochs': 12, 'warmup_epochs': 1, 'warmup_lr': 6.4e-6, 'min_lr': 6.4e-6},  # per 512: 2e-7 at 16
    'ema': {'enable': False},
    'eval': {'batch_size': 8, 'precise_bn_images': 0},
}


def find_coco_dataset(ds: Any) -> CocoDetection:
    """The :class:`CocoDetection` under wrappers (``Subset``, ``SeededDataset``: their ``.dataset``)."""
    seen = 0
    while not isinstance(ds, CocoDetection) and hasattr(ds, 'dataset') and seen < 10:
        ds, seen = ds.dataset, seen + 1
    if not isinstance(ds, CocoDetection):
        raise TypeError(f'detection evaluation needs a CocoDetection dataset, got {type(ds).__name__}')
    return ds


def to_coco_results(output: Mapping[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
                    label_offset: int, mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
    """One image's detections in COCO's results format (``xywh`` boxes, JSON category ids, RLE masks)."""
    boxes = output['boxes'].detach().float().cpu()
    if boxes.numel() == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    labels = (output['labels'].cpu() - label_offset).tolist()
    scores = output['scores'].detach().float().cpu().tolist()
    rles = None
    if 'masks' in output:
        m = (output['masks'].detach().float().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        rles = [mask_utils.encode(np.asfortranarray(x)) for x in m]
        for r in rles:
            r['counts'] = r['counts'].decode('ascii')
    out = []
    for i, (b, lab, s) in enumerate(zip(xywh, labels, scores)):
        if not 0 <= lab < len(category_ids):
            continue
        d = {'image_id': int(image_id), 'category_id': int(category_ids[lab]), 'bbox': [round(v, 2) for v in b],
             'score': round(float(s), 5)}
        if rles is not None:
            d['segmentation'] = rles[i]
        out.append(d)
    return out


def coco_evaluate(coco_gt: COCO, results: List[Dict[str, Any]], image_ids: Sequence[int],
                  iou_types: Sequence[str] = ('bbox',)) -> Dict[str, float]:
    """COCOeval's 12-number summary per IoU type (``bbox_AP`` ... ``segm_ARl``) on ``image_ids``.

    No detections at all score 0 where there are ground-truth objects (-1 where COCO has none, as
    COCOeval reports it).
    """
    out: Dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
        for iou in iou_types:
            # as COCO's own loader wants each type: boxes alone, or masks alone (area and box from the mask)
            drop = 'segmentation' if iou == 'bbox' else 'bbox'
            mine = [{k: v for k, v in r.items() if k != drop} for r in results]
            if mine:
                dt = coco_gt.loadRes(mine)
            else:
                dt = COCO()
                dt.dataset = {'images': list(coco_gt.dataset['images']), 'categories':
                              list(coco_gt.dataset['categories']), 'annotations': []}
                dt.createIndex()
            ev = COCOeval(coco_gt, dt, iou)
            ev.params.imgIds = sorted(int(i) for i in image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out.update({f'{iou}_{k}': float(v) for k, v in zip(COCO_METRICS, ev.stats)})
    return out


@torch.no_grad()
def predict_batch(model: nn.Module, images: List[torch.Tensor], device: torch.device,
                  amp_dtype: Optional[torch.dtype] = None) -> List[Dict[str, torch.Tensor]]:
    """Eval-mode detections for a list of float images (boxes in their pixels), as float32 on the CPU."""
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with ctx:
        outs = model([img.to(device) for img in images])
    return [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in o.items()} for o in outs]


def evaluate_detections(model: nn.Module, loader: Iterable, coco_gt: COCO, category_ids: Sequence[int],
                        label_offset: int, iou_types: Sequence[str] = ('bbox',),
                        device: torch.device = torch.device('cpu'),
                        amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """Run ``model`` (eval mode) over ``loader`` (``(images, targets, skipped)`` batches with ``image_id``
    in each target) and score the detections with COCOeval against ``coco_gt``.

    Under DDP each process passes its shard: the detections are gathered, rank 0 scores them and
    every rank returns rank 0's numbers. Adds ``n`` (images scored), ``skipped`` and ``detections``.
    """
    was_training = model.training
    model.eval()
    results: List[Dict[str, Any]] = []
    image_ids: List[int] = []
    skipped = 0
    try:
        for images, targets, bad in loader:
            skipped += int(bad)
            if not images:
                continue
            for out, t in zip(predict_batch(model, images, device, amp_dtype), targets):
                image_ids.append(int(t['image_id']))
                results.extend(to_coco_results(out, int(t['image_id']), category_ids, label_offset))
    finally:
        model.train(was_training)
    gathered = all_gather_object((results, image_ids, skipped))
    metrics: Dict[str, Any] = {}
    if not is_dist() or torch.distributed.get_rank() == 0:
        all_results = [r for g in gathered for r in g[0]]
        all_ids = sorted({i for g in gathered for i in g[1]})
        metrics = coco_evaluate(coco_gt, all_results, all_ids, iou_types) if all_ids else \
            {f'{t}_{k}': 0.0 for t in iou_types for k in COCO_METRICS}
        metrics.update(n=len(all_ids), skipped=sum(int(g[2]) for g in gathered), detections=len(all_results))
    return dict(all_gather_object(metrics)[0])


class DetectionTask(Task):
    """COCO-format detection (SSDLite, RetinaNet) and instance segmentation (Mask R-CNN) on EMO backbones.

    Config: ``model.name`` is the backbone; the ``detection`` section (see :data:`DETECTION_DEFAULTS`)
    holds the detector kind, sizes, annotation paths and thresholds. Classes come from the training
    JSON's categories (sorted by id) and are recorded, with their ids, in every checkpoint.
    """
    name = 'detection'
    score = 'bbox_AP'
    defaults = DETECTION_DEFAULTS
    architecture_keys = ('detection.kind', 'detection.image_size', 'detection.ssdlite_norm')  # a resume keeps the detector

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        d = cfg['detection']
        if d['kind'] not in detector_names():
            raise ConfigError(f'detection.kind must be one of {", ".join(detector_names())}, got {d["kind"]!r}')
        if d['ssdlite_norm'] not in SSDLITE_NORMS:
            raise ConfigError(f'detection.ssdlite_norm must be one of {", ".join(sorted(SSDLITE_NORMS))}, '
                              f'got {d["ssdlite_norm"]!r}')
        self.kind: str = d['kind']
        self.masks = self.kind == 'maskrcnn'
        self.class_names: Optional[List[str]] = None
        self.category_ids: Optional[List[int]] = None
        self.label_offset = 1 if self.kind != 'retinanet' else 0  # set from the model when it is built

    # data -------------------------------------------------------------------------------------------
    def _path(self, key: str) -> Optional[Path]:
        value = self.cfg['detection'][key]
        if value is None:
            return None
        p = Path(str(value)).expanduser()
        if p.is_absolute():
            return p
        root = self.cfg['data']['root']
        if not root:
            raise ValueError(f'detection.{key} is a relative path ({value}) but no data root is given: pass --data DIR '
                             'or set data.root (or give absolute paths)')
        return Path(root) / p

    def build_datasets(self, cfg: Mapping[str, Any]) -> Tuple[Dataset, Optional[Dataset]]:
        d = cfg['detection']
        train_ann, train_img = self._path('train_annotations'), self._path('train_images')
        if train_ann is None or train_img is None:
            raise ValueError('detection.train_annotations and detection.train_images must be set')
        train = CocoDetection(train_img, train_ann, detection_transforms(self.kind, True, IMAGENET_MEAN, float(d['zoom_out']),
                                                                    bool(d['hflip'])),
                              masks=self.masks, keep_empty=bool(d['keep_empty']))
        _log.info('training data: %s', train.stats)
        val = None
        val_ann = self._path('val_annotations')
        if val_ann is not None:
            val_img = self._path('val_images')
            if val_img is None:
                raise ValueError('detection.val_annotations is set but detection.val_images is not')
            val = CocoDetection(val_img, val_ann, detection_transforms(self.kind, False), masks=False,
                                keep_empty=True, category_ids=train.category_ids)
            _log.info('validation data: %s', val.stats)
        return train, val

    def bind_data(self, train: Dataset) -> None:
        ds = find_coco_dataset(train)
        self.class_names, self.category_ids = list(ds.classes), list(ds.category_ids)
        want = self.cfg['model']['num_classes']
        if want is not None and int(want) != len(self.category_ids):
            raise ValueError(f'the training annotations have {len(self.category_ids)} categories but '
                             f'model.num_classes is {want}; leave it unset to take it from the data')
        self.cfg['model']['num_classes'] = len(self.category_ids)

    def collate(self, samples: Sequence[Any]) -> Tuple[List[torch.Tensor], List[Dict[str, Any]], int]:
        return collate_detection(samples)

    def to_device(self, inputs: Any, targets: Any, device: torch.device,
                  channels_last: bool) -> Tuple[Any, Any]:
        """Images and target tensors to ``device``; labels shifted by the detector's ``label_offset``."""
        images = [img.to(device, non_blocking=True) for img in inputs]
        out = []
        for t in targets:
            moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
            if 'labels' in moved:
                moved['labels'] = moved['labels'] + self.label_offset
            out.append(moved)
        return images, out

    # model and loss ---------------------------------------------------------------------------------
    def build_model(self, cfg: Mapping[str, Any]) -> nn.Module:
        d, m = cfg['detection'], cfg['model']
        options: Dict[str, Any] = {}
        if m.get('drop_path_rate') is not None:
            options['drop_path_rate'] = float(m['drop_path_rate'])
        rcnn = self.kind == 'maskrcnn'
        if d['score_thresh'] is not None:
            options['box_score_thresh' if rcnn else 'score_thresh'] = float(d['score_thresh'])
        if d['nms_thresh'] is not None:
            options['box_nms_thresh' if rcnn else 'nms_thresh'] = float(d['nms_thresh'])
        if d['detections_per_img'] is not None:
            options['box_detections_per_img' if rcnn else 'detections_per_img'] = int(d['detections_per_img'])
        if self.kind == 'ssdlite':
            options['ssdlite_norm'] = str(d['ssdlite_norm'])
        image_size = d['image_size']
        model = create_detector(self.kind, backbone=m['name'], num_classes=int(m['num_classes']),
                                image_size=tuple(image_size) if isinstance(image_size, list) else image_size,
                                backbone_checkpoint=d['backbone_checkpoint'],
                                backbone_kwargs=dict(m.get('kwargs') or {}), **options)
        scales = d['train_scales']
        if scales:
            if self.kind == 'ssdlite':
                raise ConfigError('detection.train_scales is for retinanet / maskrcnn (SSDLite has a fixed input size)')
            # torchvision draws the training size from min_size and evaluates at its last entry
            model.transform.min_size = tuple(int(s) for s in scales) + (model.transform.min_size[-1],)
        if m.get('pretrained'):  # fine-tune a whole detector (another class count: head re-initialised)
            load_checkpoint(model, m['pretrained'], head='reinit')
        self.label_offset = int(model.label_offset)
        return model

    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> Tuple[torch.Tensor, Any]:
        losses = model(inputs, targets)
        total = sum(v.float() for v in losses.values())
        return total, {k: float(v.detach()) for k, v in losses.items()}

    def forward_for_bn(self, model: nn.Module, inputs: Any) -> Any:
        """The detector's own resize/normalise, then backbone (+ neck) and, where there is one, the dense
        head: every BatchNorm a training step runs (torchvision detectors need targets in train mode)."""
        images, _ = model.transform(list(inputs))
        feats = model.backbone(images.tensors)
        if isinstance(feats, torch.Tensor):
            feats = {'0': feats}
        if self.kind in ('ssdlite', 'retinanet'):
            return model.head(list(feats.values()))
        return feats

    def train_counts(self, outputs: Any, targets: Any) -> Dict[str, float]:
        counts = {f'sum_{k}': float(v) for k, v in outputs.items()}
        counts['boxes'] = float(sum(len(t['boxes']) for t in targets))
        counts['images'] = float(len(targets))
        return counts

    def train_metrics(self, counts: Mapping[str, float]) -> Dict[str, float]:
        steps = max(counts.get('steps', 0.0), 1.0)
        out = {f'train_{k[4:]}': v / steps for k, v in counts.items() if k.startswith('sum_')}
        out['train_boxes_per_image'] = counts.get('boxes', 0.0) / max(counts.get('images', 0.0), 1.0)
        return out

    # evaluation and checkpoints ---------------------------------------------------------------------
    def predict_batch(self, model: nn.Module, images: List[torch.Tensor], device: torch.device,
                      amp_dtype: Optional[torch.dtype] = None) -> List[Dict[str, torch.Tensor]]:
        """Eval-mode detections for a list of images (boxes in their pixels), as float32 on the CPU."""
        return predict_batch(model, images, device, amp_dtype)

    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
        """COCO summary on the loader's images (each process its shard; rank 0 scores, all return it)."""
        ds = find_coco_dataset(getattr(loader, 'dataset', None))
        return evaluate_detections(model, loader, ds.coco, self.category_ids or ds.category_ids, self.label_offset,
                                   ('bbox', 'segm') if self.masks else ('bbox',), device, amp_dtype)

    def checkpoint_meta(self) -> Dict[str, Any]:
        d, m = self.cfg['detection'], self.cfg['model']
        return {'task': self.name, 'kind': self.kind, 'backbone': m['name'], 'variant': m['name'],
                'backbone_kwargs': dict(m.get('kwargs') or {}), 'ssdlite_norm': d['ssdlite_norm'],
                'image_size': d['image_size'], 'num_classes': int(m['num_classes']), 'class_names': self.class_names,
                'category_ids': self.category_ids, 'label_offset': self.label_offset, 'masks': self.masks,
                'score_thresh': d['score_thresh'], 'nms_thresh': d['nms_thresh'],
                'detections_per_img': d['detections_per_img'], 'augmentation': AUGMENTATION[self.kind]}

    def state(self) -> Dict[str, Any]:
        return {'kind': self.kind, 'class_names': self.class_names, 'category_ids': self.category_ids}

    def load_state(self, state: Mapping[str, Any]) -> None:
        if state.get('kind') and state['kind'] != self.kind:
            raise ConfigError(f'cannot resume: the run trained a {state["kind"]} detector, this config asks for '
                              f'{self.kind}; resume with detection.kind={state["kind"]} or start a new run')
        saved = state.get('category_ids')
        if saved and self.category_ids and list(saved) != list(self.category_ids):
            raise ConfigError('cannot resume: the categories of the training annotations changed '
                              f'({len(saved)} ids before, {len(self.category_ids)} now, or another order); labels '
                              'would be permuted. Resume with the original annotation file.')
        self.category_ids = self.category_ids or saved
        self.class_names = self.class_names or state.get('class_names')
