"""Sample-quality metrics that can be computed honestly here, and FID where its weights exist.

* :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets,
  ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (the formula of FID, ``scipy.linalg.sqrtm``).
* :class:`PixelMLPClassifier`: a classifier trained on the REAL images (scikit-learn's
  ``MLPClassifier`` on grey pixels pooled to ``size x size``). It scores generated images two ways:
  the *classifier accuracy* (does a sample of class ``c`` get label ``c``) and the Fréchet distance
  in its hidden-layer features. That distance is named after the classifier ("FD-MLP", in the
  digits demo "FD-digits"): it is **not** FID, whose features come from an ImageNet Inception net.
* :func:`fid`: FID with torch-fidelity's Inception (``pip install torch-fidelity``, the ``fid``
  extra) from a LOCAL weights file (``weights-inception-2015-12-05-6726825d.pth``); nothing is
  downloaded, and a clear error says what is missing or wrong otherwise. The file is first read
  weights-only (``emov2.checkpoint.read_state_dict``) and its Inception keys checked, so
  torch-fidelity's own full ``torch.load`` only ever sees a file of plain tensors.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from sklearn.neural_network import MLPClassifier
from torch import Tensor

from ..checkpoint import CheckpointError, read_state_dict

__all__ = ['frechet_distance', 'gaussian_stats', 'PixelMLPClassifier', 'generation_scores', 'fid', 'fid_unavailable',
           'INCEPTION_WEIGHTS', 'FID_DIMS']

#: the file torch-fidelity's FID Inception loads (its port of the TF-FID graph); it must be present locally
INCEPTION_WEIGHTS = 'weights-inception-2015-12-05-6726825d.pth'
#: the Inception layers FID can use (torch-fidelity's feature names)
FID_DIMS = (64, 192, 768, 2048)
#: a few keys (and shapes) of torch-fidelity's ``FeatureExtractorInceptionV3`` state dict: the first conv,
#: the last block, the 1008-way TF classifier (what tells its Inception from torchvision's)
_INCEPTION_KEYS = {'Conv2d_1a_3x3.conv.weight': (32, 3, 3, 3), 'Mixed_7c.branch_pool.conv.weight': (192, 2048, 1, 1),
                   'fc.weight': (1008, 2048)}


def gaussian_stats(features: np.ndarray | Tensor) -> tuple:
    """Mean and (unbiased) covariance of ``(N, D)`` features, in float64."""
    x = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f'need (N >= 2, D) features, got shape {x.shape}')
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(a: np.ndarray | Tensor, b: np.ndarray | Tensor, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (``(N, D)`` each).

    The matrix square root is ``scipy.linalg.sqrtm``; a singular product gets ``eps`` on the
    diagonals (as pytorch-fid does) and the tiny imaginary part of a numerical root is dropped."""
    mu1, s1 = gaussian_stats(a)
    mu2, s2 = gaussian_stats(b)
    if mu1.shape != mu2.shape:
        raise ValueError(f'feature sizes differ: {mu1.shape[0]} vs {mu2.shape[0]}')
    with warnings.catch_warnings():  # a singular product (dead features) is handled below / exact enough
        warnings.simplefilter('ignore', linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean), 0.0))


class PixelMLPClassifier:
    """A classifier of REAL images, used to score generated ones: grey pixels average-pooled to
    ``size x size`` (images in [-1, 1] mapped to [0, 1]) -> scikit-learn ``MLPClassifier`` with one
    hidden ReLU layer; :meth:`features` are that layer's activations."""

    def __init__(self, size: int = 8, hidden: int = 128, seed: int = 0, max_iter: int = 400) -> None:
        self.size = size
        self.mlp = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed, alpha=1e-3)

    def _inputs(self, images: Tensor) -> np.ndarray:
        x = torch.as_tensor(images).float()
        if x.dim() != 4:
            raise ValueError(f'expected (N, C, H, W) images, got shape {list(x.shape)}')
        x = ((x.mean(1, keepdim=True) + 1.0) / 2.0).clamp(0, 1)
        return F.adaptive_avg_pool2d(x, self.size).flatten(1).numpy().astype(np.float64)

    def fit(self, images: Tensor, labels: Sequence[int]) -> 'PixelMLPClassifier':
        self.mlp.fit(self._inputs(images), np.asarray(labels))
        return self

    def predict(self, images: Tensor) -> np.ndarray:
        return self.mlp.predict(self._inputs(images))

    def features(self, images: Tensor) -> np.ndarray:
        x = self._inputs(images)
        return np.maximum(x @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0.0)


def generation_scores(classifier: PixelMLPClassifier, images: Tensor, labels: Sequence[int],
                      reference: Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Classifier accuracy (%) of ``images`` against the classes they were generated for (overall
    and per class) and the Fréchet distance of their classifier features to ``reference``'s."""
    labels = np.asarray(labels)
    pred = classifier.predict(images)
    classes = sorted(set(labels.tolist()))
    names = list(class_names) if class_names else [str(c) for c in classes]
    per_class = {names[i] if i < len(names) else str(c): float((pred[labels == c] == c).mean() * 100)
                 for i, c in enumerate(classes)}
    return {'accuracy': float((pred == labels).mean() * 100), 'per_class_accuracy': per_class,
            'fd': frechet_distance(classifier.features(images), classifier.features(reference)), 'n': int(len(labels))}


def fid_unavailable(inception_weights: Optional[str | Path]) -> Optional[str]:
    """Why FID cannot be computed here (the package or the local weights file is missing, or the file
    is not torch-fidelity's Inception state dict), or None."""
    if importlib.util.find_spec('torch_fidelity') is None:
        return ('FID needs the torch-fidelity package (pip install torch-fidelity) and its Inception weights file '
                f'{INCEPTION_WEIGHTS} on disk (--inception-weights); neither ships here')
    if inception_weights is None or not Path(inception_weights).is_file():
        return (f'FID needs the Inception weights file {INCEPTION_WEIGHTS} (torch-fidelity\'s inception-v3-compat); '
                f'not found at {inception_weights!r}. Copy it here and pass --inception-weights; it is never downloaded')
    try:
        sd, _ = read_state_dict(inception_weights)
    except CheckpointError as e:
        return f'the Inception weights file is unusable: {e}'
    wrong = [f'{k} (expected shape {list(shape)})' for k, shape in _INCEPTION_KEYS.items()
             if k not in sd or tuple(sd[k].shape) != shape]
    if wrong:
        return (f'{inception_weights} is not torch-fidelity\'s Inception state dict ({INCEPTION_WEIGHTS}): '
                f'missing or misshapen {", ".join(wrong)}')
    return None


def fid(generated_dir: str | Path, real_dir: str | Path, inception_weights: Optional[str | Path] = None,
        device: str = 'cpu', batch_size: int = 64, dims: int = 2048, save_cpu_ram: bool = False) -> float:
    """FID between two folders of images (png/jpg/jpeg, searched recursively) with torch-fidelity's
    Inception from a local weights file; nothing is downloaded or cached. ``dims`` picks the feature
    layer (2048: the pool features of the standard FID; 64, 192, 768: earlier layers, as pytorch-fid's
    ``--dims``, cheaper, e.g. for few images: the Fréchet distance takes a ``dims x dims`` matrix root).
    Raises ``RuntimeError`` naming what is missing or wrong (see :func:`fid_unavailable`), also when
    torch-fidelity rejects the inputs (an empty folder, fewer than two images, bad weights).
    ``save_cpu_ram``: torch-fidelity's switch that reads images in this process (no loader workers)."""
    if dims not in FID_DIMS:
        raise ValueError(f'dims must be one of {FID_DIMS}, got {dims}')
    why = fid_unavailable(inception_weights)
    if why:
        raise RuntimeError(why)
    for d in (generated_dir, real_dir):
        if not Path(d).is_dir():
            raise RuntimeError(f'FID needs two folders of images; {str(d)!r} is not a folder')
    torch_fidelity = importlib.import_module('torch_fidelity')  # optional dependency, present: checked above
    try:
        out = torch_fidelity.calculate_metrics(
            input1=str(generated_dir), input2=str(real_dir), fid=True, cuda=device.startswith('cuda'),
            batch_size=batch_size, verbose=False, samples_find_deep=True, cache=False, save_cpu_ram=save_cpu_ram,
            feature_layer_fid=str(dims), feature_extractor_weights_path=str(inception_weights))
    except (ValueError, RuntimeError) as e:  # torch-fidelity's vassert raises ValueError
        raise RuntimeError(f'torch-fidelity could not compute FID of {generated_dir} vs {real_dir}: {e}') from e
    return float(out['frechet_inception_distance'])
