"""emov2.deploy as a protocol: it walks any module tree, deploys what it knows, leaves the rest alone."""
import pytest
import timm
import torch
from torch import nn

import emov2
from emov2.deploy import FusedConv2d, MicroBatched
from emov2.layers import ImprovedInvertedResidualMobileBlock as Block


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.running_mean.normal_(0, 0.2, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
        if hasattr(m, 'gamma'):
            m.gamma.data.uniform_(0.1, 0.5, generator=g)
    return model.eval()


@pytest.mark.parametrize('name,out_indices', [('emov2_1m', (0, 1, 2, 3)), ('emov1_1m', (1, 3))])
def test_features_only_backbone_deploys_and_matches(name, out_indices):
    ref = _randomise(timm.create_model(name, features_only=True, out_indices=out_indices))
    dep = emov2.deploy(ref, micro_batch_bytes=200_000)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules())
    assert any(isinstance(m, FusedConv2d) for m in dep.modules())
    stages = [n for n, _ in ref.named_children() if n.startswith('stages_')]
    assert len(stages) == max(out_indices) + 1
    assert all(isinstance(getattr(dep, n), MicroBatched) for n in stages)  # each stage runs in cache-sized slices
    x = torch.randn(3, 3, 117, 150)
    with torch.inference_mode():
        want, got = ref(x), dep(x)
    assert [t.shape for t in got] == [t.shape for t in want]
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-4


class _Foreign(nn.Module):
    """A module with a timm-style ``fuse()`` that deploy must not call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)

    def fuse(self):
        raise AssertionError('deploy called a foreign fuse()')

    def forward(self, x):
        return self.norm(self.conv(x))


def test_unknown_modules_are_left_untouched():
    model = _randomise(nn.Sequential(_Foreign(), Block(8, 8, exp_ratio=2.0), nn.Conv2d(8, 4, 1)))
    dep = emov2.deploy(model)
    assert type(dep[0]) is _Foreign and isinstance(dep[0].norm, nn.BatchNorm2d)  # not folded: not ours
    assert type(dep[2]) is nn.Conv2d
    assert dep[1].fused_output and isinstance(dep[1].mixer, FusedConv2d)
    x = torch.randn(2, 8, 13, 9)
    with torch.inference_mode():
        assert _rel(dep(x), model(x)) < 1e-5
    linear = nn.Linear(3, 2)
    assert type(emov2.deploy(linear)) is nn.Linear


class _Conditioned(nn.Module):
    """A small DiT-like trunk: a stem conv and conditioned blocks."""

    def __init__(self, spatial_dims):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.stem = conv(3, 16, 1)
        self.blocks = nn.ModuleList([
            Block(16, 16, exp_ratio=2.0, norm=norm, mixer=mixer, dim_head=8, window_size=3,
                  spatial_dims=spatial_dims, cond_dim=6) for norm, mixer in [('bn', 'conv'), ('ln', 'attention')]])

    def forward(self, x, c):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x, c)
        return x


@pytest.mark.parametrize('nd', [1, 2, 3])
def test_conditioned_and_nd_blocks_deploy_and_match(nd):
    model = _randomise(_Conditioned(nd))
    for block in model.blocks:
        nn.init.normal_(block.modulation.linear.weight, 0, 0.3)  # leave adaLN-Zero's identity start
    dep = emov2.deploy(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dep.blocks[0].dw.modules())
    assert isinstance(dep.blocks[0].norm, nn.modules.batchnorm._BatchNorm)  # modulated after it: not foldable
    assert not dep.blocks[0].fused_output  # the per-sample gate cannot go into the projection
    x, c = torch.randn(2, 3, *([7, 5, 6][:nd])), torch.randn(2, 6)
    with torch.inference_mode():
        assert _rel(dep(x, c), model(x, c)) < 1e-5


def test_deploying_twice_is_refused():
    dep = emov2.deploy(emov2.create_model('emov2_1m', num_classes=10))
    with pytest.raises(ValueError, match='already deployed'):
        emov2.deploy(dep)
    with pytest.raises(ValueError, match='already deployed'):
        emov2.deploy(nn.Sequential(dep, nn.Identity()))  # also when wrapped


def test_to_channels_last_takes_nchw_inputs_and_keeps_values():
    model = emov2.create_model('emov2_1m', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    with torch.inference_mode():
        want = model(x)
        emov2.to_channels_last(emov2.to_channels_last(model))  # in place and idempotent: one input hook
        model.stem.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        got = model(x)
    assert len(model._forward_pre_hooks) == 1
    assert model.stem[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)  # the batch was converted once, up front
    assert _rel(got, want) < 1e-5
