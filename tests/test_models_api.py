"""Model API: timm integration, ablation switches, input checks, checkpoints, tracing/export."""
import warnings

import pytest
import timm
import torch

import emov2
from emov2 import CheckpointError
from emov2.checkpoint import save_safetensors

SMALL = dict(depths=(1, 2, 2, 2), embed_dims=(16, 24, 40, 60), exp_ratios=(2.0, 2.0, 2.0, 2.0),
             dim_heads=(8, 8, 20, 20))


def test_registry_and_list_models():
    names = emov2.list_models('emo')  # timm's registry, filtered to the modules of emov2.models
    assert names == ['emov1_1m', 'emov1_2m', 'emov1_5m', 'emov1_6m',
                     'emov2_1m', 'emov2_2m', 'emov2_5m', 'emov2_20m', 'emov2_50m']
    assert set(names) <= set(emov2.list_models()) and emov2.list_models('nonexistent') == []
    assert set(names) <= set(timm.list_models('emov*'))
    with pytest.raises(ValueError, match='unknown model'):
        emov2.create_model('emov3_1m')


def test_pretrained_cfg_and_head_api():
    m = timm.create_model('emov2_1m', num_classes=10).eval()
    cfg = m.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875
    assert cfg['interpolation'] == 'bicubic' and cfg['mean'] == (0.485, 0.456, 0.406)
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 180, 2, 2)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 180)
    assert m.forward_head(feats).shape == (2, 10)
    m.reset_classifier(5)
    assert m(x).shape == (2, 5)
    assert m.no_weight_decay() and all(n.endswith('gamma') for n in m.no_weight_decay())


@pytest.mark.parametrize('name', ['emov2_1m', 'emov1_1m'])
def test_features_only_and_intermediates(name):
    m = timm.create_model(name, features_only=True, out_indices=(1, 2, 3)).eval()
    assert m.feature_info.reduction() == [8, 16, 32]
    x = torch.randn(1, 3, 96, 128)
    outs = m(x)
    assert [o.shape[1] for o in outs] == m.feature_info.channels()
    assert [tuple(o.shape[2:]) for o in outs] == [(12, 16), (6, 8), (3, 4)]
    full = timm.create_model(name).eval()
    with torch.no_grad():
        final, inter = full.forward_intermediates(x)
        only = full.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    assert [t.shape[-1] for t in inter] == [32, 16, 8, 4]
    torch.testing.assert_close(only[0], inter[0])
    torch.testing.assert_close(full.forward_head(final), full(x))


@pytest.mark.parametrize('size', [(32, 32), (33, 47), (65, 100), (224, 224), (225, 199)])
def test_any_input_of_at_least_32px(size):
    m = emov2.create_model('emov2_1m', num_classes=7).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, *size))
    assert out.shape == (1, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize('shape,match', [((3, 64, 64), 'B, C, H, W'), ((1, 4, 64, 64), '3 input channels'),
                                         ((1, 3, 31, 64), 'at least 32x32')])
def test_bad_input_raises_clear_error(shape, match):
    m = emov2.create_model('emov2_1m')
    with pytest.raises(ValueError, match=match):
        m(torch.randn(*shape))


SWITCHES = [
    dict(attention='none'), dict(attention='neighbour'), dict(attention='distant'),
    dict(attention_stages=(1, 2, 3, 4)), dict(attention_stages=(4,)), dict(dw_kernel=3, dw_dilation=2),
    dict(dw_type='deform'), dict(dw_type='none'), dict(attention_position='pre'),
    dict(operator_order='conv_first'), dict(operator_fusion='parallel'), dict(window_size=4),
]


@pytest.mark.parametrize('switches', SWITCHES, ids=lambda s: '-'.join(f'{k}={v}' for k, v in s.items()))
def test_ablation_switches_build_train_and_reach_every_parameter(switches):
    m = emov2.create_model('emov2_1m', num_classes=4, **SMALL, **switches)
    x = torch.randn(2, 3, 45, 61)
    m(x).logsumexp(-1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_default_models_reach_every_parameter():
    for name in ('emov2_1m', 'emov1_1m'):
        m = emov2.create_model(name, num_classes=3)
        m(torch.randn(2, 3, 64, 64)).sum().backward()
        assert all(p.grad is not None for p in m.parameters())


def test_invalid_switch_values_are_rejected():
    for kwargs, match in [(dict(attention='global'), 'attention must be'), (dict(attention_stages=(5,)), '1-4'),
                          (dict(dw_type='sparse'), 'dw_type'), (dict(operator_fusion='mixed'), 'operator_fusion'),
                          (dict(depths=(1, 1, 1)), 'one entry per stage')]:
        with pytest.raises(ValueError, match=match):
            emov2.create_model('emov2_1m', **kwargs)


def _official_file(tmp_path, official_weights, manifest, variant, seed=0):
    path = tmp_path / f'{variant}.pth'
    torch.save({'net': official_weights.synth_state_dict(manifest(variant), seed)}, path)
    return path


def test_wrong_variant_checkpoint_names_the_mismatch(tmp_path, official_weights, manifest):
    path = _official_file(tmp_path, official_weights, manifest, 'emov2_2m')
    with pytest.raises(CheckpointError) as err:
        emov2.create_model('emov2_1m', checkpoint=path)
    msg = str(err.value)
    assert 'looks like emov2_2m' in msg and 'stages.' in msg and 'vs model' in msg


def test_other_num_classes_reinitialises_head_with_warning(tmp_path, official_weights, manifest):
    path = _official_file(tmp_path, official_weights, manifest, 'emov2_1m', seed=3)
    with pytest.warns(UserWarning, match='re-initialised'):
        m = emov2.create_model('emov2_1m', checkpoint=path, num_classes=10)
    ref = emov2.create_model('emov2_1m', checkpoint=path)
    torch.testing.assert_close(m.stages[3][1].mixer.qk.weight, ref.stages[3][1].mixer.qk.weight)
    assert m.head.weight.shape == (10, 180)


def test_checkpoint_into_other_in_chans(tmp_path, official_weights, manifest):
    path = _official_file(tmp_path, official_weights, manifest, 'emov2_1m', seed=2)
    gray = emov2.create_model('emov2_1m', checkpoint=path, in_chans=1).eval()
    rgb = emov2.create_model('emov2_1m', checkpoint=path).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_project_safetensors_round_trip(tmp_path):
    m = emov2.create_model('emov1_1m', num_classes=5).eval()
    path = save_safetensors(m.state_dict(), tmp_path / 'w.safetensors', {'variant': 'emov1_1m'})
    m2 = emov2.create_model('emov1_1m', num_classes=5, checkpoint=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m2(x), rtol=0, atol=0)


def test_timm_pretrained_overlay_file_goes_through_filter(tmp_path, official_weights, manifest):
    path = _official_file(tmp_path, official_weights, manifest, 'emov2_1m', seed=5)
    m = timm.create_model('emov2_1m', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ref = emov2.create_model('emov2_1m', checkpoint=path)
    for a, b in zip(m.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match='not found'):
        emov2.create_model('emov2_1m', checkpoint=tmp_path / 'nope.pth')
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'PK\x03\x04 this is not a checkpoint')
    with pytest.raises(CheckpointError, match='cannot read'):
        emov2.create_model('emov2_1m', checkpoint=bad)
    with pytest.raises(CheckpointError, match='no EMA'):
        m = emov2.create_model('emov2_1m')
        path = save_safetensors(m.state_dict(), tmp_path / 'w.safetensors', {})
        emov2.create_model('emov2_1m', checkpoint=path, use_ema=True)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('pwned',))
    path = tmp_path / 'evil.pth'
    torch.save({'net': Evil()}, path)
    with pytest.raises(CheckpointError, match='loads without running code') as err:
        emov2.create_model('emov2_1m', checkpoint=path)
    assert 'print' in str(err.value)  # the reason: torch names the refused global


def test_exported_files_are_named_as_such_not_as_corrupt_checkpoints(tmp_path):
    """An ONNX or TorchScript export given where a checkpoint is expected gets a message saying what it is."""
    onnx_file = tmp_path / 'm.onnx'
    onnx_file.write_bytes(b'\x08\x07')
    with pytest.raises(CheckpointError, match='exported ONNX model'):
        emov2.create_model('emov2_1m', checkpoint=onnx_file)
    scripted = tmp_path / 'm.pt'
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(CheckpointError, match='exported TorchScript model'):
        emov2.create_model('emov2_1m', checkpoint=scripted)


@pytest.mark.parametrize('name', ['emov2_1m', 'emov1_1m'])
def test_torchscript_fx_and_export(name):
    m = emov2.create_model(name, num_classes=4, **SMALL).eval()
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        want = m(x)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            scripted = torch.jit.script(m)
        torch.testing.assert_close(scripted(x), want)
        traced = torch.fx.symbolic_trace(m)
        torch.testing.assert_close(traced(x), want)
    exported = torch.export.export(m, (x,))
    torch.testing.assert_close(exported.module()(x), want)


def test_prune_intermediate_layers_drops_norm_and_head_in_either_order():
    """timm's forward_intermediates contract: pruning both the norm and the head leaves stage outputs."""
    model = timm.create_model('emov2_1m')
    kept = model.prune_intermediate_layers([1, 3], prune_norm=True, prune_head=True)
    assert kept == [1, 3] and isinstance(model.norm, torch.nn.Identity) and isinstance(model.head, torch.nn.Identity)
    model.reset_classifier(5)  # a head can come back after the norm is gone
    assert model.head.out_features == 5
    feats = model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[1, 3], intermediates_only=True)
    assert [f.shape[1] for f in feats] == [model.feature_info[1]['num_chs'], model.feature_info[3]['num_chs']]
