"""ONNX export of SSDLite: the network part (normalisation, backbone, neck, head) as one graph.

torchvision's SSD resizes a list of images and decodes/NMS-filters in Python; the exported graph
is the tensor part in between: a ``(N, 3, H, W)`` batch of images in [0, 1] at the detector's
fixed size in, ``cls_logits (N, A, C + 1)`` and ``bbox_regression (N, A, 4)`` out (``A`` anchors,
class 0 the background). :func:`decode_ssdlite` turns those outputs (from ONNX Runtime or PyTorch)
into torchvision's detections with the detector's own anchors and ``postprocess_detections``.
"""
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD

__all__ = ['SSDLiteExportable', 'export_ssdlite_onnx', 'decode_ssdlite', 'OnnxExportError']


class OnnxExportError(RuntimeError):
    """The model cannot be exported (not an SSD, wrong size, both exporters failed)."""


class SSDLiteExportable(nn.Module):
    """``images in [0, 1] -> (cls_logits, bbox_regression)``: the detector's normalisation, backbone,
    neck and head, without resizing, anchors or decoding."""
    def __init__(self, detector: SSD) -> None:
        super().__init__()
        if not isinstance(detector, SSD):
            raise OnnxExportError(f'export_ssdlite_onnx takes an SSD detector, got {type(detector).__name__}')
        self.backbone = detector.backbone
        self.head = detector.head
        t = detector.transform
        self.register_buffer('mean', torch.tensor(t.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(t.image_std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        out = self.head(list(self.backbone((images - self.mean) / self.std).values()))
        return out['cls_logits'], out['bbox_regression']


def _size_of(detector: SSD, image_size: Any) -> Tuple[int, int]:
    fixed = tuple(detector.transform.fixed_size or ())
    hw = fixed if image_size is None else (
        tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size))
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
        raise OnnxExportError(f'image_size must be an int or (H, W), got {image_size!r}')
    if fixed and tuple(hw) != fixed:
        raise OnnxExportError(f'the detector takes {fixed[0]}x{fixed[1]} images (its fixed size); got {hw}')
    return hw  # type: ignore[return-value]


def export_ssdlite_onnx(detector: SSD, path: str | os.PathLike, image_size: Any = None, batch: int = 2,
                        opset: int = 18, dynamo: bool = True) -> Path:
    """Write ``detector``'s tensor part (:class:`SSDLiteExportable`) to ``path`` as ONNX, batch axis dynamic.

    Input ``images`` ``(N, 3, H, W)`` in [0, 1] at the detector's fixed size (``image_size`` checks it);
    outputs ``cls_logits`` and ``bbox_regression``. The ``torch.export``-based exporter is tried first and
    the TorchScript-based one if it fails; ``dynamo=False`` uses the TorchScript-based one only (about ten
    times faster to export, same graph to 1e-6). ``batch`` is the example batch (not 1: the exporter would
    fix a batch of 1 into the graph). The detector's train/eval mode is restored.
    """
    if batch < 2:
        raise OnnxExportError(f'export with an example batch >= 2 (a batch of 1 is fixed into the graph), got {batch}')
    h, w = _size_of(detector, image_size)
    path = Path(path)
    if not path.parent.is_dir():
        raise OnnxExportError(f'cannot write {path}: folder {path.parent} does not exist')
    was_training = detector.training
    module = SSDLiteExportable(detector.eval()).eval()
    x = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    names = dict(input_names=['images'], output_names=['cls_logits', 'bbox_regression'])
    try:
        try:
            if not dynamo:
                raise OnnxExportError('the TorchScript-based exporter was asked for')
            torch.onnx.export(module, (x,), str(path), dynamo=True, opset_version=opset, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim('batch', min=1, max=1024)},), verbose=False,
                              **names)
        except OSError:
            raise
        except Exception as dynamo_exc:
            try:
                torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=opset,
                                  dynamic_axes={n: {0: 'batch'} for n in ('images', 'cls_logits', 'bbox_regression')},
                                  **names)
            except OSError:
                raise
            except Exception as legacy_exc:
                raise OnnxExportError(f'ONNX export failed: dynamo exporter: {dynamo_exc!r}; '
                                      f'legacy exporter: {legacy_exc!r}') from legacy_exc
    finally:
        detector.train(was_training)
    return path


@torch.no_grad()
def decode_ssdlite(detector: SSD, cls_logits: Tensor, bbox_regression: Tensor,
                   original_sizes: Sequence[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
    """torchvision's detections (boxes in ``original_sizes`` pixels, labels with background 0, scores)
    from the exported graph's outputs, decoded with ``detector``'s anchors, score threshold and NMS."""
    n = cls_logits.shape[0]
    if bbox_regression.shape[0] != n or len(original_sizes) != n:
        raise ValueError(f'{n} cls_logits, {bbox_regression.shape[0]} box outputs and {len(original_sizes)} sizes')
    h, w = detector.transform.fixed_size
    images = ImageList(torch.zeros(n, 3, h, w, dtype=cls_logits.dtype), [(h, w)] * n)
    cls_logits, bbox_regression = torch.as_tensor(cls_logits), torch.as_tensor(bbox_regression)
    anchors = detector.anchor_generator(images, _feature_shapes(detector, h, w))
    dets = detector.postprocess_detections({'cls_logits': cls_logits, 'bbox_regression': bbox_regression},
                                           anchors, images.image_sizes)
    return detector.transform.postprocess(dets, images.image_sizes, [tuple(s) for s in original_sizes])


def _feature_shapes(detector: SSD, h: int, w: int) -> List[Tensor]:
    """Empty tensors with the shapes of the feature maps (all the anchor generator reads)."""
    with torch.no_grad():
        was = detector.training
        feats = detector.eval().backbone(torch.zeros(1, 3, h, w))
        detector.train(was)
    return [torch.empty(0, 0, *f.shape[-2:]) for f in feats.values()]
