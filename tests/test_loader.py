"""The one checkpoint loader: any registered model, its family's filter, a head policy, no casts."""
from __future__ import annotations

import pytest
import timm
import torch

import emov2
from emov2.checkpoint import CheckpointError, save_safetensors
from emov2.factory import load_checkpoint


def test_integer_tensors_are_rejected_not_cast(tmp_path):
    model = emov2.create_model('emov2_1m', num_classes=10)
    sd = model.state_dict()
    sd['head.weight'] = sd['head.weight'].to(torch.int8)
    save_safetensors(sd, tmp_path / 'q.safetensors')
    with pytest.raises(CheckpointError, match='q.safetensors.*stored as torch.int8.*head.weight'):
        load_checkpoint(emov2.create_model('emov2_1m', num_classes=10), tmp_path / 'q.safetensors')


def test_head_policy(tmp_path):
    src = emov2.create_model('emov2_1m', num_classes=10)
    save_safetensors(src.state_dict(), tmp_path / 'm.safetensors')
    dst = emov2.create_model('emov2_1m', num_classes=3)
    with pytest.raises(CheckpointError, match='head.weight'):
        load_checkpoint(dst, tmp_path / 'm.safetensors', head='strict')
    with pytest.warns(UserWarning, match='10 classes.*re-initialised'):
        load_checkpoint(dst, tmp_path / 'm.safetensors')
    assert torch.equal(dst.stem[0].conv.weight, src.stem[0].conv.weight)


def test_any_timm_model_and_official_files_through_the_same_loader(tmp_path):
    src = timm.create_model('test_resnet', num_classes=4)
    torch.save({'state_dict': {f'module.{k}': v for k, v in src.state_dict().items()}}, tmp_path / 'r.pth')
    dst = timm.create_model('test_resnet', num_classes=4)
    load_checkpoint(dst, tmp_path / 'r.pth', head='strict')
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(CheckpointError, match='does not fit'):
        load_checkpoint(timm.create_model('test_vit', num_classes=4), tmp_path / 'r.pth')
