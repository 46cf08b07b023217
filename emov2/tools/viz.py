"""What the model sees: Grad-CAM, effective receptive fields, attention windows and the accuracy frontier.

The numbers come first (plain numpy arrays and dicts, JSON-ready), the pictures second (matplotlib,
Agg backend, PNG with titles, axis labels and colour bars):

* :func:`grad_cam` -- class activation maps of the ``grad-cam`` package (``pytorch_grad_cam``) on
  the last stage of an EMO model (the paper's Fig. 7);
* :func:`effective_receptive_field` and :func:`erf_spread` -- the gradient of the centre unit of a
  stage (or one block) w.r.t. the input, averaged over images, and the fraction of pixels holding 90%
  of its mass (the paper's Fig. 1 bottom);
* :func:`window_partition_masks` and :func:`attention_weights_for_query` -- the neighbour and distant
  window of one query pixel (spec section 2, padding included) and the attention weights a block
  gives it;
* :func:`frontier_data` -- top-1 vs params / FLOPs / throughput from ``paper_targets()`` plus our
  measured params, FLOPs and (optional) benchmark JSON (the paper's Fig. 1 top).

Images: any file, or the photographs scikit-image ships (:data:`SAMPLE_IMAGES`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint import read_metadata
from ..detection.models import create_detector, detector_names, emo_backbone_of
from ..detection.predict import load_detector
from ..factory import check_model_name, create_model, load_checkpoint
from ..layers.basic import LayerScale
from ..layers.window_attention import SpanningWindowAttention, pad_to_window
from ..segmentation.models import Segmenter, create_segmenter, segmenter_names
from ..segmentation.predict import load_segmenter
from .common import count_flops, count_params, paper_targets, read_json_text

__all__ = [
    'SAMPLE_IMAGES', 'CAM_METHODS', 'IMAGENET_MEAN', 'IMAGENET_STD',
    'load_image', 'sample_images', 'images_to_tensor', 'build_model', 'set_layer_scale',
    'grad_cam', 'task_of', 'build_task_model', 'detector_cam', 'segmenter_cam', 'effective_receptive_field', 'erf_spread', 'feature_size', 'window_partition_masks',
    'attention_weights_for_query', 'frontier_peers', 'frontier_data', 'FRONTIER_PEERS_RESOURCE',
    'plot_cam_grid', 'plot_erf_grid', 'plot_windows', 'plot_frontier', 'write_json',
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: photographs shipped with scikit-image, used when no image is given
SAMPLE_IMAGES = ('astronaut', 'coffee', 'chelsea', 'rocket')
#: ``--method`` names -> ``pytorch_grad_cam`` classes (all gradient- or activation-based CAMs it offers)
CAM_METHODS = {
    'gradcam': 'GradCAM', 'gradcam++': 'GradCAMPlusPlus', 'xgradcam': 'XGradCAM', 'hirescam': 'HiResCAM',
    'layercam': 'LayerCAM', 'eigencam': 'EigenCAM', 'eigengradcam': 'EigenGradCAM',
    'gradcamelementwise': 'GradCAMElementWise', 'scorecam': 'ScoreCAM', 'ablationcam': 'AblationCAM',
    'kpcacam': 'KPCA_CAM', 'shapleycam': 'ShapleyCAM', 'finercam': 'FinerCAM',
}
STAGE_STRIDES = {1: 4, 2: 8, 3: 16, 4: 32}


# --- images -----------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB (grey is repeated, alpha dropped); a clear error otherwise."""
    from skimage import io
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'image not found: {path}')
    try:
        img = io.imread(str(path))
    except Exception as exc:  # skimage/imageio raise many kinds
        raise ValueError(f'cannot read image {path}: {exc}') from None
    return _as_rgb_uint8(img, str(path))


def _as_rgb_uint8(img: np.ndarray, name: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f'{name}: expected an RGB or grey image, got shape {img.shape}')
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = img.astype(np.float64)
        img = img / 255.0 if img.max() > 1.0 else img
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return img


def sample_images(names: Optional[Sequence[str]] = None) -> List[Tuple[str, np.ndarray]]:
    """``(name, image)`` pairs of scikit-image's photographs (default :data:`SAMPLE_IMAGES`)."""
    from skimage import data
    out = []
    for n in names or SAMPLE_IMAGES:
        fn = getattr(data, n, None)
        if fn is None:
            raise ValueError(f'skimage.data has no image {n!r}')
        out.append((n, _as_rgb_uint8(fn(), n)))
    return out


def images_to_tensor(images: Sequence[np.ndarray], size: int, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> Tuple[Tensor, np.ndarray]:
    """Resize (centre square crop, then ``size x size``) and normalise; returns the batch and the resized
    uint8 images ``(B, size, size, 3)`` to draw on."""
    from skimage.transform import resize
    resized = []
    for img in images:
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        crop = img[top:top + s, left:left + s]
        resized.append((resize(crop, (size, size), anti_aliasing=True) * 255).round().astype(np.uint8))
    arr = np.stack(resized)
    x = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, arr


# --- models -----------------------------------------------------------------------------------------
def build_model(name: str, checkpoint: Optional[str | os.PathLike] = None, **switches: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """Model ``name`` in eval mode, at initialisation or with ``checkpoint`` (through the one loader,
    :func:`emov2.factory.load_checkpoint`). A project checkpoint's metadata gives the number of classes,
    the extra model kwargs (e.g. the digits demo's depths), input size and mean/std. Returns
    ``(model, info)`` with ``info`` = ``name, checkpoint, img_size, mean, std, num_classes``.
    """
    check_model_name(name)
    info: Dict[str, Any] = dict(name=name, checkpoint=None, img_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                num_classes=1000)
    kwargs: Dict[str, Any] = {}
    if checkpoint is not None:
        meta = read_metadata(checkpoint)
        kwargs.update(meta.get('model_kwargs') or {})
        if meta.get('window_size'):
            kwargs['window_size'] = int(meta['window_size'])
        if meta.get('num_classes'):
            info['num_classes'] = int(meta['num_classes'])
        for key in ('mean', 'std'):
            if meta.get(key):
                info[key] = tuple(float(v) for v in meta[key])
        if meta.get('img_size'):
            info['img_size'] = int(meta['img_size'])
        info['checkpoint'] = str(checkpoint)
    kwargs.update(switches)
    model = create_model(name, num_classes=info['num_classes'], **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, variant=name, head='strict')
    model.eval()
    return model, info


def set_layer_scale(model: nn.Module, value: float) -> int:
    """Fill every LayerScale gamma with ``value`` (at init they are 1e-6, so residual branches, attention
    included, barely touch the ERF); returns how many were set."""
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerScale):
                m.gamma.fill_(value)
                n += 1
    return n


# --- Grad-CAM ---------------------------------------------------------------------------------------
def grad_cam(model: nn.Module, x: Tensor, method: str = 'gradcam', target_class: Optional[int] = None,
             target_layer: Optional[nn.Module] = None) -> Tuple[np.ndarray, List[int]]:
    """CAMs ``(B, H, W)`` in [0, 1] of ``pytorch_grad_cam``'s ``method`` for the top class (or
    ``target_class``) on ``target_layer`` (default: the last stage, ``model.stages[-1]``).
    Returns the maps and the classes explained."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    if method not in CAM_METHODS:
        raise ValueError(f'unknown CAM method {method!r} (available: {", ".join(CAM_METHODS)})')
    if target_layer is None:
        if not hasattr(model, 'stages'):
            raise ValueError(f'{type(model).__name__} has no .stages; pass target_layer')
        target_layer = model.stages[-1]
    model.eval()
    with torch.no_grad():
        classes = model(x).argmax(-1).tolist() if target_class is None else [int(target_class)] * len(x)
    cam_cls = getattr(pgc, CAM_METHODS[method])
    with cam_cls(model=model, target_layers=[target_layer]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    return np.clip(np.asarray(maps, dtype=np.float32), 0.0, 1.0), classes


# --- CAM for detectors and segmenters -----------------------------------------------------------------
def task_of(name: str) -> str:
    """``'detect'`` for a detector kind (:func:`emov2.detection.models.detector_names`), ``'segment'`` for a
    segmenter kind, ``'classify'`` for a registered classifier; a clear error otherwise."""
    if name in detector_names():
        return 'detect'
    if name in segmenter_names():
        return 'segment'
    check_model_name(name)
    return 'classify'


def _limit_candidates(detector: nn.Module, detections: int = 20, candidates: int = 100) -> None:
    """Keep only the best ``candidates`` boxes per level / proposals and ``detections`` per image: a CAM
    explains a few top boxes, and decoding torchvision's default 1000 per level dominates the run time."""
    for obj, attr, value in ((detector, 'topk_candidates', candidates), (detector, 'detections_per_img', detections),
                             (getattr(detector, 'roi_heads', None), 'detections_per_img', detections)):
        if obj is not None and hasattr(obj, attr):
            setattr(obj, attr, value)
    rpn = getattr(detector, 'rpn', None)
    if rpn is not None:
        rpn._pre_nms_top_n['testing'] = rpn._post_nms_top_n['testing'] = candidates


def build_task_model(task: str, kind: str, backbone: str = 'emov2_1m', checkpoint: Optional[str | os.PathLike] = None,
                     num_classes: Optional[int] = None, image_size: Optional[int] = None
                     ) -> Tuple[nn.Module, Dict[str, Any]]:
    """A detector or segmenter in eval mode, at init (``kind`` on ``backbone``) or from a checkpoint written by
    ``emov2 detect train`` / ``emov2 segment train`` (their own loaders; the checkpoint names its kind).
    ``info`` holds ``kind, checkpoint, img_size, mean, std, class_names`` (detectors take [0, 1] pixels and
    normalise inside, so mean 0 / std 1) and, for detectors, ``label_offset``. Untrained detectors keep
    every candidate box (score threshold 0), so that their highest-scoring boxes can be explained."""
    if task == 'detect':
        if checkpoint is not None:
            model, meta = load_detector(str(checkpoint), score_thresh=0.0)
            size = meta.get('image_size')
        else:
            thresh = 'box_score_thresh' if kind == 'maskrcnn' else 'score_thresh'
            model = create_detector(kind, backbone=backbone, num_classes=num_classes or 80,
                                    image_size=image_size or 224, **{thresh: 0.0}).eval()
            meta = dict(kind=kind, class_names=[str(i) for i in range(num_classes or 80)], label_offset=model.label_offset)
            size = image_size
        _limit_candidates(model)
        return model, dict(kind=meta['kind'], checkpoint=str(checkpoint) if checkpoint else None,
                           img_size=size if isinstance(size, int) else None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                           class_names=meta['class_names'], label_offset=int(meta['label_offset']))
    if task == 'segment':
        if checkpoint is not None:
            model, meta = load_segmenter(str(checkpoint))
            mean, std = tuple(meta.get('mean') or IMAGENET_MEAN), tuple(meta.get('std') or IMAGENET_STD)
        else:
            model = create_segmenter(kind, backbone, num_classes or 150).eval()
            meta = dict(kind=kind, class_names=[str(i) for i in range(num_classes or 150)])
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        return model, dict(kind=meta['kind'], checkpoint=str(checkpoint) if checkpoint else None, img_size=None,
                           mean=mean, std=std, class_names=meta['class_names'])
    raise ValueError(f"task must be 'detect' or 'segment', got {task!r}")


def _cam(model: nn.Module, layer: nn.Module, x: Tensor, targets: List[Any], method: str) -> np.ndarray:
    import pytorch_grad_cam as pgc
    if method not in CAM_METHODS:
        raise ValueError(f'unknown CAM method {method!r} (available: {", ".join(CAM_METHODS)})')
    with getattr(pgc, CAM_METHODS[method])(model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=x, targets=targets)
    return np.clip(np.asarray(maps, dtype=np.float32), 0.0, 1.0)


def detector_cam(detector: nn.Module, x: Tensor, method: str = 'gradcam', max_boxes: int = 3,
                 score_thresh: float = 0.0, target_layer: Optional[nn.Module] = None
                 ) -> Tuple[np.ndarray, List[Dict[str, np.ndarray]]]:
    """CAMs ``(B, H, W)`` of a torchvision detector (``x``: ``(B, 3, H, W)`` in [0, 1]) explaining its
    ``max_boxes`` highest-scoring detections with score >= ``score_thresh`` per image: pytorch-grad-cam's
    ``FasterRCNNBoxScoreTarget`` (sum over those boxes of the IoU-matched box's score + IoU, same label),
    on ``target_layer`` (default: the EMO backbone's last stage). Returns the maps and per image the
    explained ``boxes`` (k, 4), ``labels`` (model labels) and ``scores``."""
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
    detector.eval()
    if target_layer is None:
        body = emo_backbone_of(detector).body
        target_layer = [m for n, m in body.named_children() if n.startswith('stages')][-1]
    with torch.no_grad():
        outputs = detector(x)
    explained, targets = [], []
    for i, out in enumerate(outputs):
        keep = (out['scores'] >= score_thresh).nonzero().flatten()[:max_boxes]  # sorted by score already
        if keep.numel() == 0:
            raise ValueError(f'image {i}: no detection with score >= {score_thresh} to explain '
                             f'(best {float(out["scores"].max()) if len(out["scores"]) else 0:.3f}); lower the threshold')
        boxes, labels = out['boxes'][keep].numpy(), out['labels'][keep].numpy()
        explained.append(dict(boxes=boxes, labels=labels, scores=out['scores'][keep].numpy()))
        targets.append(FasterRCNNBoxScoreTarget(labels=labels, bounding_boxes=boxes))
    return _cam(detector, target_layer, x, targets, method), explained


class _SegmentationLogits(nn.Module):
    """``Segmenter`` -> its ``'out'`` logits tensor (what pytorch-grad-cam expects a model to return)."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: Tensor) -> Tensor:
        return self.segmenter(x)['out']


def segmenter_cam(segmenter: Segmenter, x: Tensor, method: str = 'gradcam', target_class: Optional[int] = None,
                  target_layer: Optional[nn.Module] = None) -> Tuple[np.ndarray, List[int], np.ndarray]:
    """CAMs ``(B, H, W)`` of a segmenter for one class per image (default: the class its prediction covers
    most) over the pixels predicted as that class: pytorch-grad-cam's ``SemanticSegmentationTarget``, on
    ``target_layer`` (default: the backbone's last stage; a UNet's deepest encoder stage). Returns the maps,
    the classes and the predicted label maps ``(B, H, W)``."""
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    segmenter.eval()
    if target_layer is None:
        body = segmenter.backbone
        target_layer = body.stages[-1] if hasattr(body, 'stages') else body.encoder[-1]
    model = _SegmentationLogits(segmenter).eval()
    with torch.no_grad():
        logits = model(x)
    if target_class is not None and not 0 <= target_class < logits.shape[1]:
        raise ValueError(f'class {target_class} is outside the segmenter\'s {logits.shape[1]} classes')
    pred = logits.argmax(1).numpy()
    classes, targets = [], []
    for p in pred:
        c = int(np.bincount(p.ravel()).argmax()) if target_class is None else int(target_class)
        classes.append(c)
        targets.append(SemanticSegmentationTarget(c, (p == c).astype(np.float32)))
    return _cam(model, target_layer, x, targets, method), classes, pred


# --- effective receptive field ------------------------------------------------------------------------
def _features(model: nn.Module, x: Tensor, stage: Optional[int], block: Optional[int]) -> Tensor:
    """Output of stage ``stage`` (1-4, default the last) of an EMO-like model, or of its block ``block``."""
    if not (hasattr(model, 'stem') and hasattr(model, 'stages')):
        if stage is not None or block is not None:
            raise ValueError(f'{type(model).__name__} has no stem/stages: cannot pick a stage or block')
        return model.forward_features(x)
    n = len(model.stages)
    stage = n if stage is None else stage
    if not 1 <= stage <= n:
        raise ValueError(f'stage must be 1..{n}, got {stage}')
    x = model.stem(x)
    for i in range(stage - 1):
        x = model.stages[i](x)
    blocks = model.stages[stage - 1]
    if block is not None:
        if not 0 <= block < len(blocks):
            raise ValueError(f'stage {stage} has blocks 0..{len(blocks) - 1}, got {block}')
        blocks = blocks[:block + 1]
    return blocks(x)


def effective_receptive_field(model: nn.Module, images: Tensor, stage: Optional[int] = None,
                              block: Optional[int] = None) -> np.ndarray:
    """ERF ``(H, W)``: |d (centre unit, summed over channels) / d input|, summed over input channels,
    normalised to sum 1 per image, averaged over ``images`` (normalised ``(B, 3, H, W)``).
    The output of stage ``stage`` (1-4, default the last) or of block ``block`` of that stage; eval mode."""
    model.eval()
    x = images.detach().clone().requires_grad_(True)
    f = _features(model, x, stage, block)
    h, w = f.shape[-2:]
    f[:, :, h // 2, w // 2].sum().backward()
    g = x.grad.detach().abs().sum(1).double()
    g = g / g.sum((1, 2), keepdim=True).clamp_min(1e-300)
    return g.mean(0).float().numpy()


def erf_spread(erf: np.ndarray, mass: float = 0.9) -> float:
    """Fraction of pixels (0-1) that hold ``mass`` of the ERF's gradient mass, largest first."""
    v = np.sort(np.asarray(erf, dtype=np.float64).ravel())[::-1]
    total = v.sum()
    if total <= 0:
        return 0.0
    k = int(np.searchsorted(np.cumsum(v) / total, mass) + 1)
    return min(k, v.size) / v.size


# --- attention windows --------------------------------------------------------------------------------
def feature_size(input_size: Tuple[int, int], stage: int) -> Tuple[int, int]:
    """Feature map size of stage ``stage`` (1-4): the stem and each stage's block 0 halve it (rounding up)."""
    h, w = input_size
    for _ in range(stage + 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def window_partition_masks(input_size: int | Tuple[int, int], stage: int, window_size: int = 7,
                           query: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """The neighbour and distant window holding one query, on stage ``stage``'s padded grid (spec section 2).

    The map (h, w) is zero-padded to Hp, Wp (multiples of ``w = window_size``), n1 = Hp / w, n2 = Wp / w.
    Neighbour window (a, b) holds (a*w + r, b*w + c); distant window (a, b) holds (r*n1 + a, c*n2 + b),
    r, c < w. ``query`` is an input pixel (y, x), default the centre; its feature cell is (y // s, x // s)
    with s the stage's stride. Returns feature/padded sizes, the query cell, the window indices and
    boolean masks ``(Hp, Wp)`` for both partitions (cells >= h or w are padding).
    """
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if stage not in STAGE_STRIDES:
        raise ValueError(f'stage must be 1..4, got {stage}')
    if window_size < 1:
        raise ValueError(f'window_size must be positive, got {window_size}')
    stride = STAGE_STRIDES[stage]
    h, w = feature_size(input_size, stage)
    if query is None:
        query = (input_size[0] // 2, input_size[1] // 2)
    if not (0 <= query[0] < input_size[0] and 0 <= query[1] < input_size[1]):
        raise ValueError(f'query {tuple(query)} is outside the {input_size[0]}x{input_size[1]} input')
    qy, qx = min(query[0] // stride, h - 1), min(query[1] // stride, w - 1)
    ws = window_size
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    n1, n2 = hp // ws, wp // ws
    neighbour = np.zeros((hp, wp), dtype=bool)
    distant = np.zeros((hp, wp), dtype=bool)
    a, b = qy // ws, qx // ws
    da, db = qy % n1, qx % n2
    for r in range(ws):
        for c in range(ws):
            neighbour[a * ws + r, b * ws + c] = True
            distant[r * n1 + da, c * n2 + db] = True
    return dict(input_size=list(input_size), stage=stage, stride=stride, window_size=ws, feature_size=[h, w],
                padded_size=[hp, wp], grid=[n1, n2], query_pixel=list(query), query_cell=[qy, qx],
                neighbour_window=[a, b], distant_window=[da, db], neighbour=neighbour, distant=distant)


def _attention_blocks(model: nn.Module, stage: int) -> List[int]:
    return [j for j, blk in enumerate(model.stages[stage - 1]) if isinstance(getattr(blk, 'mixer', None),
                                                                             SpanningWindowAttention)]


def attention_weights_for_query(model: nn.Module, x: Tensor, stage: int = 3, block: Optional[int] = None,
                                query: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """Softmax weights ``(Hp, Wp)`` one query cell gives the keys of its neighbour and distant window in the
    spanning attention of block ``block`` (default: the first attention block) of stage ``stage``, for the
    first image of ``x``, averaged over heads. Each partition's map sums to 1 and is 0 outside its window.
    Returns the :func:`window_partition_masks` dict plus ``weights`` {partition: array}, ``head_weights``
    {partition: (heads, Hp, Wp)}, ``block``, ``heads`` and the partitions the block really uses.
    """
    model.eval()
    blocks = _attention_blocks(model, stage)
    if not blocks:
        raise ValueError(f'stage {stage} of this model has no window attention')
    block = blocks[0] if block is None else block
    if block not in blocks:
        raise ValueError(f'block {block} of stage {stage} has no window attention (those that do: {blocks})')
    attn: SpanningWindowAttention = model.stages[stage - 1][block].mixer
    if len(set(attn.window_size)) != 1:
        raise ValueError('only square windows are drawn')
    captured: Dict[str, Tensor] = {}
    hook = attn.register_forward_pre_hook(lambda m, args: captured.__setitem__('x', args[0].detach()))
    try:
        with torch.no_grad():
            _features(model, x[:1], stage, block)
    finally:
        hook.remove()
    feat = captured['x']
    in_size = tuple(int(s) for s in x.shape[-2:])
    info = window_partition_masks(in_size, stage, attn.window_size[0], query)
    if list(feat.shape[-2:]) != info['feature_size']:
        raise RuntimeError(f'stage {stage} map is {list(feat.shape[-2:])}, expected {info["feature_size"]}')
    with torch.no_grad():
        qk = attn.qk(pad_to_window(feat, attn.window_size))[0]  # (2C, Hp, Wp)
    c = qk.shape[0] // 2
    heads = attn.num_heads
    d = c // heads
    scale = attn.scale if attn.scale is not None else d ** -0.5
    q_all, k_all = qk[:c].reshape(heads, d, *qk.shape[1:]), qk[c:].reshape(heads, d, *qk.shape[1:])
    qy, qx = info['query_cell']
    q = q_all[:, :, qy, qx]  # (heads, d)
    weights, head_weights = {}, {}
    for part in ('neighbour', 'distant'):
        mask = torch.from_numpy(info[part])
        keys = k_all[:, :, mask]  # (heads, d, w*w) in row-major order of the mask
        p = torch.softmax((q[:, :, None] * keys).sum(1) * scale, dim=-1)  # (heads, w*w)
        full = torch.zeros((heads,) + tuple(mask.shape), dtype=torch.float32)
        full[:, mask] = p.float()
        head_weights[part] = full.numpy()
        weights[part] = full.mean(0).numpy()
    info.update(weights=weights, head_weights=head_weights, block=block, heads=heads,
                partitions_used=list(attn.partitions))
    return info


# --- accuracy frontier --------------------------------------------------------------------------------
def _bench_throughput(bench: Dict[str, Any]) -> Dict[str, float]:
    """Best fp32 eager throughput (img/s) per model of an ``emov2 bench`` JSON (deploy variant preferred)."""
    best: Dict[str, Tuple[float, bool]] = {}
    for r in bench.get('results', []):
        if r.get('task') != 'throughput' or r.get('precision') != 'fp32' or r.get('backend') != 'eager':
            continue
        if r.get('variant') == 'reference' or not r.get('img_per_s'):
            continue
        deploy = r.get('variant') == 'deploy'
        cur = best.get(r['model'])
        if cur is None or (deploy and not cur[1]) or (deploy == cur[1] and r['img_per_s'] > cur[0]):
            best[r['model']] = (float(r['img_per_s']), deploy)
    return {k: v[0] for k, v in best.items()}


#: ``emov2/data/frontier_peers.json``: published top-1 / params / FLOPs of the peers of the paper's Fig. 1
FRONTIER_PEERS_RESOURCE = ('emov2', 'data/frontier_peers.json')
_PEER_KEYS = ('family', 'label', 'input', 'params', 'flops', 'top1', 'source')


def frontier_peers(path: Optional[str | os.PathLike] = None) -> Dict[str, Dict[str, Any]]:
    """The peers' published figures: ``path`` if given, else the packaged ``emov2/data/frontier_peers.json``
    (``{key: {family, label, input, params (M), flops (M MACs or null), top1, distilled, source}}``).
    Raises ``FileNotFoundError`` / ``ValueError`` (not JSON, or an entry without those fields)."""
    where, text = read_json_text(path, FRONTIER_PEERS_RESOURCE, 'peers file not found: {path}',
                                 '{resource} is missing from the installed package; pass --peers PATH')
    try:
        peers = json.loads(text).get('peers')
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f'{where} is not a peers JSON object: {exc}') from None
    if not isinstance(peers, dict):
        raise ValueError(f'{where} has no "peers" object')
    for key, p in peers.items():
        missing = [k for k in _PEER_KEYS if k not in p]
        if missing:
            raise ValueError(f'{where}: peer {key!r} lacks {", ".join(missing)}')
    return peers


def frontier_data(paper: Optional[Dict[str, Any]] = None, measure: bool = True,
                  bench_json: Optional[str | os.PathLike] = None,
                  models: Optional[Sequence[str]] = None,
                  peers: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """One row per model of the paper's classification table (EMOv2, EMOv1), the Table III baselines
    (DeiT-Tiny, PVT-Tiny) and the published ``peers`` (:func:`frontier_peers`; ``{}`` for none):
    family, input, paper top-1 / params (M) / MFLOPs (MACs), our measured params / MFLOPs (``measure``,
    EMO models only), the paper's CPU/GPU throughput (Table XVI), our measured img/s from an
    ``emov2 bench`` JSON, and for peers the source of their figures and whether they were distilled.
    ``models`` keeps only those EMO models (no peers)."""
    paper = paper_targets() if paper is None else paper
    thr = _bench_throughput(json.loads(Path(bench_json).read_text())) if bench_json else {}
    xvi = paper.get('throughput_table_xvi', {})
    rows: List[Dict[str, Any]] = []
    for key, entry in paper.get('classification', {}).items():
        base = key.split('@')[0]
        if models is not None and base not in models and key not in models:
            continue
        p = entry.get('paper', {})
        row: Dict[str, Any] = dict(name=key, family=base.split('_')[0].upper().replace('EMOV', 'EMOv'),
                                   input=int(entry.get('input', 224)), top1=p.get('top1'), top1_kd=p.get('top1_kd'),
                                   paper_params_m=p.get('params'), paper_mflops=p.get('flops'),
                                   paper_cpu_img_s=xvi.get(key, {}).get('cpu'), paper_gpu_img_s=xvi.get(key, {}).get('gpu'),
                                   params_m=None, mflops=None, img_s=thr.get(key))
        if measure:
            model = create_model(base, window_size=int(entry.get('window', 7))).eval()
            row['params_m'] = round(count_params(model) / 1e6, 3)
            row['mflops'] = round(count_flops(model, row['input']) / 1e6, 1)
        rows.append(row)
    if models is not None:
        return rows
    for key, p in paper.get('toy_table_iii', {}).items():
        if key.endswith(('_irmb', '_i2rmb')):
            continue  # the toy table's block swaps are not frontier models
        rows.append(dict(name=key, family=key.split('_')[0].replace('deit', 'DeiT').replace('pvt', 'PVT'),
                         label=key.replace('deit_tiny', 'DeiT-Tiny').replace('pvt_tiny', 'PVT-Tiny'),
                         input=224, top1=p.get('top1'), top1_kd=None, paper_params_m=p.get('params'),
                         paper_mflops=p.get('flops'), paper_cpu_img_s=None, paper_gpu_img_s=None, params_m=None,
                         mflops=None, img_s=thr.get(key), peer=True, distilled=False,
                         source='EMOv2 paper, Table III'))
    for key, p in (frontier_peers() if peers is None else peers).items():
        rows.append(dict(name=key, family=p['family'], label=p['label'], input=int(p['input']), top1=p['top1'],
                         top1_kd=None, paper_params_m=p['params'], paper_mflops=p['flops'], paper_cpu_img_s=None,
                         paper_gpu_img_s=None, params_m=None, mflops=None, img_s=thr.get(key), peer=True,
                         distilled=bool(p.get('distilled')), source=p['source']))
    return rows


# --- drawing ------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    _pyplot().close(fig)
    return path


def plot_cam_grid(images: np.ndarray, cams: Dict[str, np.ndarray], path: str | os.PathLike,
                  title: str = 'Grad-CAM', labels: Optional[Dict[str, List[str]]] = None,
                  boxes: Optional[Dict[str, List[np.ndarray]]] = None) -> Path:
    """Rows = images, columns = the image then one CAM overlay per model (``cams``: name -> (B, H, W));
    ``boxes`` (name -> per image ``(k, 4)`` xyxy boxes) are drawn on that model's overlays (detectors)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle
    names = list(cams)
    n, cols = len(images), len(names) + 1
    fig, axes = plt.subplots(n, cols, figsize=(2.9 * cols + 0.8, 3.0 * n), squeeze=False, layout='constrained')
    im = None
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_title('input' if i == 0 else '')
        for j, name in enumerate(names):
            ax = axes[i, j + 1]
            ax.imshow(images[i])
            im = ax.imshow(cams[name][i], cmap='jet', alpha=0.5, vmin=0, vmax=1)
            for x0, y0, x1, y1 in (boxes or {}).get(name, [np.zeros((0, 4))] * n)[i]:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec='white', lw=1.2))
            lab = f'\n{labels[name][i]}' if labels and name in labels else ''
            ax.set_title(f'{name}{lab}', fontsize=9)
        for ax in axes[i]:
            ax.set_xlabel('x (px)', fontsize=7)
            ax.set_ylabel('y (px)', fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(title)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label='CAM (normalised)')
    return _save(fig, path)


def plot_erf_grid(erfs: Dict[str, np.ndarray], spreads: Dict[str, float], path: str | os.PathLike,
                  title: str = 'Effective receptive field') -> Path:
    """One heat map per ERF (log10 of the normalised gradient mass), the 90%-mass area in each title."""
    plt = _pyplot()
    names = list(erfs)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names) + 0.8, 3.6), squeeze=False)
    logs = {k: np.log10(np.maximum(v / max(v.max(), 1e-30), 1e-6)) for k, v in erfs.items()}
    im = None
    for ax, name in zip(axes[0], names):
        im = ax.imshow(logs[name], cmap='viridis', vmin=-4, vmax=0)
        ax.set_title(f'{name}\n90% mass in {100 * spreads[name]:.1f}% of pixels', fontsize=9)
        ax.set_xlabel('x (px)')
        ax.set_ylabel('y (px)')
    fig.suptitle(title)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label='log10 |grad| / max')
    return _save(fig, path)


def plot_windows(image: np.ndarray, info: Dict[str, Any], path: str | os.PathLike,
                 weights: Optional[Dict[str, np.ndarray]] = None, title: Optional[str] = None) -> Path:
    """The query pixel's neighbour and distant window drawn on the image (padding cells hatched), and,
    with ``weights``, the attention weights over each window."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle
    s = info['stride']
    hp, wp = info['padded_size']
    h, w = info['feature_size']
    parts = ('neighbour', 'distant')
    cols = 2 + (2 if weights else 0)
    fig, axes = plt.subplots(1, cols, figsize=(4.4 * cols, 4.8), squeeze=False, layout='constrained')
    axes = axes[0]
    qy, qx = info['query_cell']
    for ax, part in zip(axes[:2], parts):
        mask = info[part]
        ax.imshow(image, extent=(0, image.shape[1], image.shape[0], 0))
        overlay = np.ma.masked_where(~mask, mask.astype(float))
        ax.imshow(overlay, cmap='autumn', alpha=0.45, extent=(0, wp * s, hp * s, 0), vmin=0, vmax=1)
        for (y, x) in zip(*np.nonzero(mask)):
            pad = y >= h or x >= w
            ax.add_patch(Rectangle((x * s, y * s), s, s, fill=False, lw=0.6, ec='red' if pad else 'yellow',
                                   hatch='//' if pad else None))
        ax.add_patch(Rectangle((qx * s, qy * s), s, s, fill=True, fc='cyan', ec='k', lw=1))
        ax.add_patch(Rectangle((0, 0), w * s, h * s, fill=False, ec='white', lw=1, ls='--'))
        ax.set_xlim(0, max(wp * s, image.shape[1]))
        ax.set_ylim(max(hp * s, image.shape[0]), 0)
        win = info[f'{part}_window']
        ax.set_title(f'{part} window {tuple(win)}: {int(mask.sum())} cells\n'
                     f'({int((mask[h:, :].sum() + mask[:h, w:].sum()))} padding, red hatched)', fontsize=9)
        ax.set_xlabel('x (input px)')
        ax.set_ylabel('y (input px)')
    if weights:
        for ax, part in zip(axes[2:], parts):
            wmap = np.ma.masked_where(~info[part], weights[part])
            im = ax.imshow(wmap, cmap='magma', extent=(0, wp * s, hp * s, 0), vmin=0)
            ax.add_patch(Rectangle((qx * s, qy * s), s, s, fill=False, ec='cyan', lw=1.5))
            ax.set_title(f'attention weights, {part}\n(mean over heads, sum 1)', fontsize=9)
            ax.set_xlabel('x (input px)')
            ax.set_ylabel('y (input px)')
            fig.colorbar(im, ax=ax, shrink=0.8, label='softmax weight')
    fig.suptitle(title or (f'stage {info["stage"]} (stride {s}), window {info["window_size"]}, map {h}x{w} '
                           f'padded to {hp}x{wp}, grid {info["grid"][0]}x{info["grid"][1]}; query cell {tuple(info["query_cell"])}'),
                 fontsize=10)
    return _save(fig, path)


def plot_frontier(rows: List[Dict[str, Any]], path: str | os.PathLike, title: str = 'ImageNet-1k top-1 frontier') -> Path:
    """Top-1 vs params and vs FLOPs (paper figures; our measurement as open markers), and vs measured
    throughput when any row has ``img_s``. One colour and marker per family (the legend); EMO families
    are bold lines, peers thin ones; peers trained with distillation carry a ``*`` in their label."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    with_thr = any(r.get('img_s') for r in rows)
    panels = [('paper_params_m', 'params_m', 'parameters (M)'), ('paper_mflops', 'mflops', 'FLOPs (M MACs)')]
    if with_thr:
        panels.append((None, 'img_s', 'measured throughput (img/s, emov2 bench)'))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.6 * len(panels), 5.6), squeeze=False)
    by_family: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        if r.get('top1') is not None:
            by_family.setdefault(r['family'], []).append(r)
    colours = {'EMOv2': 'tab:red', 'EMOv1': 'tab:blue'}
    peer_colours = ['tab:green', 'tab:orange', 'tab:purple', 'tab:brown', 'tab:pink', 'tab:olive', 'tab:cyan',
                    'tab:gray', 'goldenrod', 'teal', 'navy', 'magenta']
    markers = ['s', '^', 'D', 'v', 'P', 'X', '<', '>', 'h', 'p', '*', 'd']
    style: Dict[str, Tuple[Any, str]] = {}
    for i, fam in enumerate(f for f in by_family if f not in colours):
        style[fam] = (peer_colours[i % len(peer_colours)], markers[i % len(markers)])
    for fam, col in colours.items():
        style[fam] = (col, 'o')

    def text(r: Dict[str, Any]) -> str:
        return r.get('label', r['name']) + ('*' if r.get('distilled') else '')

    for ax, (paper_key, ours_key, label) in zip(axes[0], panels):
        for fam, rs in by_family.items():
            col, marker = style[fam]
            emo = fam in colours
            pts = sorted([(r[paper_key], r['top1'], text(r), r['name']) for r in rs if paper_key and r.get(paper_key)])
            line = [p for p in pts if '@' not in p[3]]  # the 224 px models; other resolutions as crosses
            if line:
                ax.plot([p[0] for p in line], [p[1] for p in line], marker=marker, ls='-', color=col,
                        lw=2.0 if emo else 0.9, ms=6 if emo else 5, label=f'{fam} (paper)' if emo else fam,
                        zorder=3 if emo else 2)
            hi = [p for p in pts if '@' in p[3]]
            if hi:
                ax.scatter([p[0] for p in hi], [p[1] for p in hi], marker='x', color=col,
                           label=f'{fam} at 256/512 px (paper)')
            for x, y, n, _ in pts:
                ax.annotate(n, (x, y), fontsize=5.5, xytext=(3, -8), textcoords='offset points', color=col)
            ours = [(r[ours_key], r['top1'], text(r)) for r in rs if r.get(ours_key)]
            if ours:
                if paper_key is None and not emo:
                    ax.scatter([p[0] for p in ours], [p[1] for p in ours], marker=marker, color=col, label=fam)
                else:
                    ax.scatter([p[0] for p in ours], [p[1] for p in ours], facecolors='none', edgecolors=col, s=70,
                               label=f'{fam} (ours, measured; paper top-1)')
                if paper_key is None:
                    for x, y, n in ours:
                        ax.annotate(n, (x, y), fontsize=6, xytext=(3, -8), textcoords='offset points')
        ax.set_xscale('log')
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel('ImageNet-1k top-1 (%)')
        ax.grid(alpha=0.3, which='both')
    legend: Dict[str, Any] = {}
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    fig.legend(list(legend.values()), list(legend), loc='upper center', bbox_to_anchor=(0.5, 0.02),
               ncol=min(len(legend), 6), fontsize=7, title='family', title_fontsize=8)
    n_peers = sum(1 for r in rows if r.get('peer'))
    fig.suptitle(title + (f' (peers: published figures, {n_peers} models; * = distilled)' if n_peers else ''))
    fig.tight_layout()
    return _save(fig, path)


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """``data`` as indented JSON (numpy arrays become lists, bool masks included)."""
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, (np.floating, np.integer, np.bool_)):
            return o.item()
        raise TypeError(f'{type(o).__name__} is not JSON serialisable')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=default))
    return path
