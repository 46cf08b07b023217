"""V-EMO (issue 13): registry, paper size, 2D->3D inflation through the one loader, deploy, grad checkpointing."""
import pytest
import timm
import torch
from torch import nn

import emov2
from emov2.checkpoint import save_safetensors
from emov2.deploy import is_deployed
from emov2.factory import load_checkpoint
from emov2.layers import ConvNormAct
from emov2.models.vemo import VEMO, inflate_kernel, inflate_state_dict, set_temporal
from emov2.tools.common import count_flops
from emov2.tools.common import count_params, paper_targets

SMALL = (2, 3, 4, 64, 64)  # B, C, T, H, W


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and LayerScale, so folding/inflation errors show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        for n, p in model.named_parameters():
            if n.endswith('layer_scale.gamma'):
                p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
    return model


def test_registry_lists_the_video_models():
    names = emov2.list_models('vemo')
    assert names == ['v_emov2_1m', 'v_emov2_2m', 'v_emov2_5m']
    assert set(names) <= set(emov2.list_models())
    model = emov2.create_model('v_emov2_1m', num_classes=7)
    assert isinstance(model, VEMO) and model.head.out_features == 7
    assert model.stages[2][1].mixer.window_size == [2, 5, 5]  # the family's default window, as the paper's
    default = timm.create_model('v_emov2_5m')
    assert default.num_classes == 400 and default.head_drop.p == 0.5
    assert default.stages[3][1].mixer.window_size == [2, 5, 5]
    with torch.no_grad():
        assert model.eval()(torch.randn(*SMALL)).shape == (2, 7)


def test_params_and_flops_match_the_paper():
    target = paper_targets()['video_kinetics400']['v_emov2_5m']
    model = timm.create_model('v_emov2_5m')
    params = count_params(model)
    flops = count_flops(model, 160, frames=target['frames'])
    assert abs(params / 1e6 - target['params']) / target['params'] < 0.05, params
    assert abs(flops / 1e9 - target['flops_g']) / target['flops_g'] < 0.10, flops
    # the design: the stem halves time (4 -> 2 frames), the stages keep it; DW kernels 5x5x5
    assert model.stem[0].conv.stride == (2, 2, 2)
    assert model.stages[1][0].dw.conv.stride == (1, 2, 2)
    assert model.stages[1][0].dw.conv.kernel_size == (5, 5, 5)
    with torch.no_grad():
        assert model.eval().forward_features(torch.zeros(1, 3, 4, 160, 160)).shape == (1, 288, 2, 5, 5)


def test_official_2d_checkpoint_inflates_exactly_with_the_centre_rule(tmp_path, official_weights, manifest):
    """Logits of the inflated model on a clip of one repeated frame == the 2D model's logits on that
    frame (official file, 1000-class head copied, 2D attention window 5 = the clip's 2x5x5)."""
    path = tmp_path / 'emov2_1m.pth'
    torch.save({'net': official_weights.synth_state_dict(manifest('emov2_1m'), 3)}, path)
    model2d = emov2.create_model('emov2_1m', checkpoint=path, window_size=5).eval()
    model3d = timm.create_model('v_emov2_1m', num_classes=1000, inflation='centre')
    load_checkpoint(model3d, path, head='strict')
    model3d.eval()
    frame = torch.randn(2, 3, 64, 64)
    clip = frame.unsqueeze(2).repeat(1, 1, 4, 1, 1)
    with torch.no_grad():
        want = model2d(frame)
        got = model3d(clip)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
        # features too, before pooling: every frame of the 3D map is the 2D map
        f2 = model2d.forward_features(frame)
        f3 = model3d.forward_features(clip)
        assert torch.allclose(f3, f2.unsqueeze(2).expand_as(f3), atol=1e-4)


def test_our_2d_checkpoint_inflates_with_the_repeat_rule(tmp_path):
    """The default (spec) rule: 2D kernels repeated over time and divided by kt; 1x1 convs, norms and
    LayerScale copied; the 1000-class head re-initialised for a 400-class model (loader policy)."""
    src = _randomise_norms(emov2.create_model('emov2_1m'))
    save_safetensors(src.state_dict(), tmp_path / 'm.safetensors')
    dst = timm.create_model('v_emov2_1m')
    with pytest.warns(UserWarning, match='re-initialised'):
        load_checkpoint(dst, tmp_path / 'm.safetensors')
    s2, s3 = src.state_dict(), dst.state_dict()
    w2, w3 = s2['stages.1.1.dw.conv.weight'], s3['stages.1.1.dw.conv.weight']
    assert w3.shape == w2.shape[:2] + (5,) + w2.shape[2:]
    assert torch.allclose(w3, w2.unsqueeze(2).expand_as(w3) / 5)
    assert torch.allclose(w3.sum(2), w2, atol=1e-6)
    assert torch.equal(s3['stages.2.1.mixer.qk.weight'][..., 0, :, :], s2['stages.2.1.mixer.qk.weight'])
    assert torch.equal(s3['stages.1.0.norm.running_var'], s2['stages.1.0.norm.running_var'])
    # a 3D checkpoint (ours) passes unchanged
    save_safetensors(dst.state_dict(), tmp_path / 'v.safetensors')
    again = timm.create_model('v_emov2_1m')
    load_checkpoint(again, tmp_path / 'v.safetensors', head='strict')
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), dst.state_dict().values()))


def test_repeat_rule_is_exact_on_frames_that_see_every_tap():
    """A repeat-inflated conv on a static clip equals the 2D conv wherever all kt taps fall in the clip."""
    conv2d = ConvNormAct(8, 8, 5, groups=8, act_layer=nn.SiLU).eval()
    conv3d = set_temporal(ConvNormAct(8, 8, 5, groups=8, act_layer=nn.SiLU, spatial_dims=3), 5, 1).eval()
    _randomise_norms(conv2d)
    conv3d.load_state_dict(inflate_state_dict(conv2d.state_dict(), conv3d, 'repeat'))
    x = torch.randn(1, 8, 12, 12)
    with torch.no_grad():
        y2, y3 = conv2d(x), conv3d(x.unsqueeze(2).repeat(1, 1, 9, 1, 1))
    for t in range(9):
        close = torch.allclose(y3[:, :, t], y2, atol=1e-5)
        assert close == (2 <= t <= 6), t  # frames 0, 1, 7, 8 reach into the temporal zero padding
    with pytest.raises(ValueError, match='inflation'):
        inflate_kernel(torch.zeros(1, 1, 3, 3), 3, 'mean')


def test_deploy_gives_equal_outputs():
    model = _randomise_norms(timm.create_model('v_emov2_1m', num_classes=10)).eval()
    x = torch.randn(*SMALL)
    with torch.no_grad():
        want = model(x)
        deployed = emov2.deploy(model)
        got = deployed(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert is_deployed(deployed) and not is_deployed(model)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = timm.create_model('v_emov2_1m', num_classes=5, drop_rate=0.0)
    b = timm.create_model('v_emov2_1m', num_classes=5, drop_rate=0.0)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing()
    x, y = torch.randn(*SMALL), torch.tensor([1, 3])
    for m in (a, b):
        nn.functional.cross_entropy(m(x), y).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), n


def test_any_number_of_frames_and_bad_shapes():
    model = timm.create_model('v_emov2_1m', num_classes=3).eval()
    with torch.no_grad():
        for t in (1, 3, 5):
            assert model(torch.randn(1, 3, t, 64, 64)).shape == (1, 3)
        with pytest.raises(ValueError, match=r'\(B, C, T, H, W\).*unsqueeze'):
            model(torch.randn(1, 3, 64, 64))
        with pytest.raises(ValueError, match='3 input channels.*transpose'):
            model(torch.randn(1, 4, 3, 64, 64))
        with pytest.raises(ValueError, match='at least 32x32'):
            model(torch.randn(1, 3, 4, 16, 64))
    with pytest.raises(ValueError, match='window_size'):
        VEMO(window_size=(2, 5))
    with pytest.raises(ValueError, match='inflation'):
        VEMO(inflation='mean')
