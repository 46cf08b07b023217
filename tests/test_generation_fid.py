"""FID through torch-fidelity (``emov2.generation.metrics.fid``) without its download: the real
Inception weights cannot be fetched here, so the test writes a randomly initialised state dict with
exactly the keys and shapes of torch-fidelity's ``FeatureExtractorInceptionV3`` and runs the real
torch-fidelity pipeline (folder reading, TF-style resize, Inception, Fréchet distance) on it. The
numbers are not ImageNet-Inception FIDs; what is checked is the path: the same folder gives ~0,
different images give a clearly positive distance, and missing or wrong inputs give clear errors.
The distances use the 64-d Inception layer (``dims=64``): the 2048-d default is the same call with
another layer name, but its 2048 x 2048 matrix root (scipy) alone takes ~40 s on two busy cores."""
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from emov2.generation.metrics import INCEPTION_WEIGHTS, fid, fid_unavailable

tfi = pytest.importorskip('torch_fidelity.feature_extractor_inceptionv3')


@pytest.fixture(scope='module')
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception built without loading anything (its loader patched out while it is
    constructed), re-initialised so activations stay O(1) through ~100 layers, saved as a plain state dict."""
    with mock.patch.object(tfi, 'load_state_dict_from_url', return_value={}) as download, \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, sd, *a, **k: None):
        model = tfi.FeatureExtractorInceptionV3('inception-v3-compat', ['2048'])
    assert download.called  # (the patched one: nothing was fetched)
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
    path = tmp_path_factory.mktemp('inception') / INCEPTION_WEIGHTS
    torch.save(model.state_dict(), path)
    return path


def _write_images(folder, images):
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f'{i}.png')
    return folder


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """Two folders of 8 small RGB images each: smooth colour gradients vs uniform noise."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp('fid_images')
    ramp = np.linspace(0, 1, 32)[None, :, None] * np.linspace(0, 1, 32)[:, None, None]
    smooth = [(255 * ramp * rng.uniform(0.3, 1.0, size=(1, 1, 3))).astype(np.uint8) for _ in range(8)]
    noise = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(8)]
    return _write_images(root / 'smooth' / 'nested', smooth).parent, _write_images(root / 'noise', noise)


def test_fid_of_a_folder_with_itself_is_zero_and_with_other_images_positive(inception_weights, folders):
    smooth, noise = folders
    assert fid_unavailable(inception_weights) is None
    kw = dict(dims=64, batch_size=8, save_cpu_ram=True)
    same = fid(smooth, smooth, inception_weights, **kw)  # images found in a nested folder
    other = fid(smooth, noise, inception_weights, **kw)
    assert abs(same) < 1e-3 * max(other, 1.0), (same, other)
    assert other > 1.0, other
    assert fid(noise, smooth, inception_weights, **kw) == pytest.approx(other, rel=1e-3)  # symmetric


def test_missing_or_wrong_inputs_are_clear_errors(tmp_path, folders, inception_weights):
    smooth, _ = folders
    with pytest.raises(RuntimeError, match='Inception weights file .* not found'):
        fid(smooth, smooth, tmp_path / INCEPTION_WEIGHTS)
    with pytest.raises(RuntimeError, match='Inception weights file .* not found'):
        fid(smooth, smooth, None)
    torch.save({'conv.weight': torch.zeros(3, 3)}, tmp_path / 'other.pth')  # some other network
    with pytest.raises(RuntimeError, match="not torch-fidelity's Inception state dict.*fc.weight"):
        fid(smooth, smooth, tmp_path / 'other.pth')
    (tmp_path / 'corrupt.pth').write_bytes(b'not a torch file')
    with pytest.raises(RuntimeError, match='unusable'):
        fid(smooth, smooth, tmp_path / 'corrupt.pth')
    with pytest.raises(RuntimeError, match='not a folder'):
        fid(smooth, tmp_path / 'missing', inception_weights)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(RuntimeError, match='torch-fidelity could not compute FID'):
        fid(tmp_path / 'empty', smooth, inception_weights, save_cpu_ram=True)
    with pytest.raises(ValueError, match='dims must be one of'):
        fid(smooth, smooth, inception_weights, dims=100)
