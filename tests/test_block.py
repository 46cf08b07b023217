"""The i2RMB of emov2.layers: one class for 1, 2 and 3 spatial axes, conditioning, Meta Mobile Block
instances, and the window-size checks."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

import emov2
from emov2.layers import ImprovedInvertedResidualMobileBlock as Block
from emov2.layers import SpanningWindowAttention, pad_to_window


def naive_window_attention_nd(qk, v, window, num_heads, mode):
    """The spec's window attention as a loop over windows and heads, for any number of spatial axes."""
    c = qk.shape[1] // 2
    size = qk.shape[2:]
    grid = [s // w for s, w in zip(size, window)]
    dh, dv = c // num_heads, v.shape[1] // num_heads
    out = torch.zeros_like(v)
    for a in itertools.product(*[range(n) for n in grid]):
        pix = []
        for r in itertools.product(*[range(w) for w in window]):
            pix.append(tuple(a[i] * window[i] + r[i] if mode == 'neighbour' else r[i] * grid[i] + a[i]
                             for i in range(len(window))))
        idx = tuple(torch.tensor(axis) for axis in zip(*pix))
        for h in range(num_heads):
            q = qk[:, h * dh:(h + 1) * dh][(slice(None), slice(None)) + idx].transpose(1, 2)
            k = qk[:, c + h * dh:c + (h + 1) * dh][(slice(None), slice(None)) + idx].transpose(1, 2)
            val = v[:, h * dv:(h + 1) * dv][(slice(None), slice(None)) + idx].transpose(1, 2)
            attn = torch.softmax(q @ k.transpose(1, 2) * dh ** -0.5, dim=-1)
            out[(slice(None), slice(h * dv, (h + 1) * dv)) + idx] += (attn @ val).transpose(1, 2)
    return out


def _randomise(module):
    """Non-trivial norm statistics and layer scales, so that each parameter matters."""
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.running_mean.normal_(0, 0.2, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
        if hasattr(m, 'gamma'):
            m.gamma.data.uniform_(0.1, 0.5, generator=g)
    return module


def _attention_block(spatial_dims, window, norm='ln'):
    return _randomise(Block(8, 8, exp_ratio=2.0, norm=norm, act_layer=nn.GELU, mixer='attention', dim_head=4,
                            window_size=window, spatial_dims=spatial_dims)).double().eval()


def test_3d_block_matches_the_spec_with_naive_window_attention():
    """3D block, window (2, 5, 5), odd T x H x W: padded windows in every axis, both partitions."""
    block = _attention_block(3, (2, 5, 5))
    x = torch.randn(2, 8, 3, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        got = block(x)
        attn = block.mixer
        xn = pad_to_window(block.norm(x), [2, 5, 5])
        qk, v = attn.qk(xn), attn.act(attn.v(xn))
        mixed = sum(naive_window_attention_nd(qk, v, [2, 5, 5], attn.num_heads, m) for m in attn.partitions)
        mixed = mixed[:, :, :3, :9, :11]
        dw = block.dw
        local = mixed + dw.act(dw.norm(F.conv3d(mixed, dw.conv.weight, None, 1, 2, 1, mixed.shape[1])))
        want = x + block.layer_scale.gamma.view(-1, 1, 1, 1) * F.conv3d(local, block.proj.weight)
    assert isinstance(block.proj, nn.Conv3d) and isinstance(block.dw.norm, nn.BatchNorm3d)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _center_slice(state, nd_low):
    """State dict of an (n+1)-d block -> the n-d block it equals on inputs of size 1 along its first axis."""
    out = {}
    for k, v in state.items():
        if v.dim() == nd_low + 3:  # conv weight (out, in, k0, k1, ...): keep the middle tap of the extra axis
            v = v[:, :, v.shape[2] // 2]
        out[k] = v
    return out


@pytest.mark.parametrize('nd,window_high,window_low,size', [
    (3, (1, 5, 5), 5, (9, 11)),  # a one-frame video is an image
    (2, (1, 7), 7, (13,)),  # a one-row image is a sequence
])
@pytest.mark.parametrize('norm', ['bn', 'ln'])
def test_block_on_a_single_slice_equals_the_lower_dimensional_block(nd, window_high, window_low, size, norm):
    high = _attention_block(nd, window_high, norm)
    low = Block(8, 8, exp_ratio=2.0, norm=norm, act_layer=nn.GELU, mixer='attention', dim_head=4,
                window_size=window_low, spatial_dims=nd - 1).double().eval()
    low.load_state_dict(_center_slice(high.state_dict(), nd - 1))
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(high(x.unsqueeze(2)).squeeze(2), low(x), rtol=1e-10, atol=1e-10)


def test_1d_conv_block_runs_and_learns():
    block = Block(12, 12, exp_ratio=2.0, norm='bn', spatial_dims=1, drop_path=0.1)
    x = torch.randn(3, 12, 17, requires_grad=True)
    block(x).sum().backward()
    assert isinstance(block.mixer.conv, nn.Conv1d) and isinstance(block.norm, nn.BatchNorm1d)
    assert x.grad is not None and block.proj.weight.grad.abs().sum() > 0


def test_unconditioned_block_keeps_the_official_parameter_names():
    keys = list(Block(8, 8, mixer='attention', dim_head=4).state_dict())
    assert keys == ['norm.weight', 'norm.bias', 'norm.running_mean', 'norm.running_var', 'norm.num_batches_tracked',
                    'mixer.qk.weight', 'mixer.qk.bias', 'mixer.v.weight', 'mixer.v.bias',
                    'dw.conv.weight', 'dw.norm.weight', 'dw.norm.bias', 'dw.norm.running_mean',
                    'dw.norm.running_var', 'dw.norm.num_batches_tracked', 'proj.weight', 'layer_scale.gamma']


@pytest.mark.parametrize('nd', [1, 2, 3])
def test_conditioned_block_starts_as_the_identity_and_follows_c(nd):
    block = Block(16, 16, exp_ratio=2.0, norm='ln', act_layer=nn.GELU, mixer='attention', dim_head=8,
                  window_size=3, spatial_dims=nd, cond_dim=10).double()
    assert 'layer_scale.gamma' not in block.state_dict()  # the gate of c replaces LayerScale
    x = torch.randn(2, 16, *([5] * nd), dtype=torch.float64)
    c = torch.randn(2, 10, dtype=torch.float64)
    torch.testing.assert_close(block(x, c), x, rtol=0, atol=0)
    out = block(x, c)
    out.sum().backward()  # zero-init projection still receives gradients through the gate
    assert block.modulation.linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        block.modulation.linear.weight.normal_(0, 0.3)
        got = block(x, c)
        shift, scale, gate = block.modulation(c, nd)
        want = x + gate * block.proj(block.operator(block.norm(x) * (1 + scale) + shift))
        torch.testing.assert_close(got, want)
        assert not torch.allclose(block(x, c), block(x, c.flip(0)))  # each sample follows its own c


def test_conditioning_must_match_how_the_block_was_built():
    x = torch.randn(1, 8, 6, 6)
    with pytest.raises(ValueError, match='cond_dim'):
        Block(8, 8, cond_dim=4)(x)
    with pytest.raises(ValueError, match='without cond_dim'):
        Block(8, 8)(x, torch.randn(1, 4))


def _tokens(x):
    return x.flatten(2).transpose(1, 2)


def test_ffn_is_the_block_with_identity_operator():
    """Meta Mobile Block, λ=4 and F=identity: the Transformer MLP (output projection without bias)."""
    block = Block(16, 16, exp_ratio=4.0, norm='none', act_layer=nn.GELU, dw_type='none', layer_scale=False).double()
    mlp = Mlp(16, 64, act_layer=nn.GELU, bias=(True, False)).double()
    mlp.fc1.weight.data = block.mixer.conv.weight.data.flatten(1)
    mlp.fc1.bias.data = block.mixer.conv.bias.data
    mlp.fc2.weight.data = block.proj.weight.data.flatten(1)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(_tokens(block(x)), _tokens(x) + mlp(_tokens(x)))


def test_mhsa_is_the_block_with_one_window_over_the_map():
    """Meta Mobile Block, λ=1 and F=MHSA: multi-head self-attention (values are MLP_e)."""
    dim, dim_head, size = 16, 4, (5, 7)
    block = Block(dim, dim, exp_ratio=1.0, norm='none', act_layer=nn.Identity, mixer='attention', dim_head=dim_head,
                  window_size=size, partitions=('neighbour',), dw_type='none', layer_scale=False).double()
    mha = nn.MultiheadAttention(dim, dim // dim_head, batch_first=True).double()
    attn = block.mixer
    mha.in_proj_weight.data = torch.cat([attn.qk.weight.flatten(1), attn.v.weight.flatten(1)])
    mha.in_proj_bias.data = torch.cat([attn.qk.bias, attn.v.bias])
    mha.out_proj.weight.data = block.proj.weight.data.flatten(1)
    mha.out_proj.bias.data.zero_()
    x = torch.randn(2, dim, *size, dtype=torch.float64)
    t = _tokens(x)
    with torch.no_grad():
        torch.testing.assert_close(_tokens(block(x)), t + mha(t, t, t, need_weights=False)[0])


@pytest.mark.parametrize('window', [0, -3, (2, 0, 5)])
def test_window_size_must_be_positive(window):
    spatial_dims = 3 if isinstance(window, tuple) else 2
    with pytest.raises(ValueError, match='window_size must be positive'):
        SpanningWindowAttention(8, 8, 4, window, spatial_dims=spatial_dims)
    if not isinstance(window, tuple):
        with pytest.raises(ValueError, match='window_size must be positive'):
            emov2.create_model('emov2_1m', window_size=window)


def test_window_far_larger_than_the_map_is_refused_before_allocating():
    """window_size=100 on a 64x64 input (a 4x4 stage-3 map) needs GiBs of scores; today's OOM is a clear error."""
    model = emov2.create_model('emov2_1m', window_size=100).eval()
    with torch.inference_mode(), pytest.raises(ValueError, match=r'window \[100, 100\] on a \[4, 4\] map.*GiB.*'
                                                                 r'no larger than the map'):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize('size,window', [(32, 7), (64, 16), (224, 7)])
def test_small_maps_with_larger_windows_still_run(size, window):
    """A 7x7 window over the 1x1 stage-4 map of a 32x32 input is legitimate (a few padded tokens)."""
    model = emov2.create_model('emov2_1m', window_size=window, num_classes=5).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 5)
