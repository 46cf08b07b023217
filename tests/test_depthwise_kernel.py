"""The bf16-pair depthwise conv kernel against F.conv2d, and its use by deployed models."""
import pytest
import torch
import torch.nn.functional as F

import emov2
from emov2 import kernels
from emov2.deploy import FusedConv2d

pytestmark = pytest.mark.skipif(not kernels.depthwise_bf16_available(),
                                reason=f'no AVX512-BF16 depthwise kernel here ({kernels.build_error() or "no AVX512-BF16"})')


def _reference(x, weight, bias, silu, residual):
    """What the kernel computes, in float32 from the same bf16 inputs and weights."""
    k = weight.shape[-1]
    y = F.conv2d(x.float(), weight.to(torch.bfloat16).float(), bias, 1, k // 2, 1, x.shape[1])
    y = F.silu(y) if silu else y
    return y + residual.float() if residual is not None else y


@pytest.mark.parametrize('k', [3, 5, 7])
@pytest.mark.parametrize('shape', [(2, 37, 9, 11), (1, 16, 1, 3), (3, 20, 7, 7), (1, 64, 14, 5)],
                         ids=['tails', 'one-row', '7x7', 'narrow'])
@pytest.mark.parametrize('silu,add', [(True, True), (False, False), (True, False)], ids=['silu+add', 'conv', 'silu'])
def test_kernel_matches_conv2d(k, shape, silu, add):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(shape, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], 1, k, k, generator=g) * 0.2
    bias = torch.randn(shape[1], generator=g)
    residual = x if add else None
    got = kernels.depthwise_conv_bf16(x, kernels.pack_depthwise_weight(weight), bias, k, silu, residual)
    want = _reference(x, weight, bias, silu, residual)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 1e-2


def test_non_finite_inputs_reach_exactly_the_outputs_whose_window_holds_them():
    """Pairs never multiply a pixel outside an output's window (no stray 0 * inf)."""
    x = torch.randn(1, 16, 9, 9).to(torch.bfloat16)
    x[0, :, 4, 6] = float('inf')
    weight, bias = torch.rand(16, 1, 5, 5) + 0.1, torch.zeros(16)
    got = kernels.depthwise_conv_bf16(x, kernels.pack_depthwise_weight(weight), bias, 5, False, None)
    want = _reference(x, weight, bias, False, None)
    assert torch.equal(torch.isfinite(got.float()), torch.isfinite(want))
    assert not torch.isfinite(want).all()


def test_kernel_rejects_bad_arguments():
    x = torch.randn(1, 20, 8, 8).to(torch.bfloat16)
    packed = kernels.pack_depthwise_weight(torch.randn(20, 1, 5, 5))
    with pytest.raises(RuntimeError, match='not packed for'):
        kernels.depthwise_conv_bf16(x, packed, torch.zeros(20), 3, True, None)
    with pytest.raises(RuntimeError, match='bfloat16'):
        kernels.depthwise_conv_bf16(x.float(), packed, torch.zeros(20), 5, True, None)
    with pytest.raises(RuntimeError, match='float32 biases'):
        kernels.depthwise_conv_bf16(x, packed, torch.zeros(19), 5, True, None)
    with pytest.raises(RuntimeError, match='residual'):
        kernels.depthwise_conv_bf16(x, packed, torch.zeros(20), 5, True, x[:, :10])
    with pytest.raises(RuntimeError, match='odd k'):
        kernels.pack_depthwise_weight(torch.randn(20, 1, 4, 4))


def test_deployed_bf16_model_runs_its_depthwise_convs_in_the_kernel(monkeypatch):
    model = emov2.create_model('emov2_1m', num_classes=10).eval()
    fused, plain = emov2.deploy(model), emov2.deploy(model, compiled_kernels=False)
    eligible = [m for m in fused.modules() if isinstance(m, FusedConv2d) and m.bf16_depthwise_kernel]
    assert len(eligible) == 12  # stem 3x3 DW conv and the 11 stride-1 5x5 DW convs of the blocks
    assert not any(m.bf16_depthwise_kernel for m in plain.modules() if isinstance(m, FusedConv2d))
    calls = []
    original = kernels.depthwise_conv_bf16
    monkeypatch.setattr(kernels, 'depthwise_conv_bf16', lambda *a: calls.append(a[3]) or original(*a))
    x = torch.randn(2, 3, 117, 150)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        got, want = fused(x).float(), plain(x).float()
    assert len(calls) == 12 and sorted(set(calls)) == [3, 5]
    assert ((got - want).abs().max() / want.abs().max()).item() < 3e-2
    with torch.inference_mode():  # float32 never takes the bf16 kernel
        calls.clear()
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-5)
    assert not calls
