"""DeiT-Tiny / PVT-Tiny with iRMB and i2RMB (EMOv2 Table III): the shared block in the stated
configuration, its attention being the host Transformer's (DeiT's global attention, PVT's
spatial-reduction attention, checked against timm's), params and FLOPs against the paper's figures,
inputs of other sizes, deploy, and a few training steps through the Trainer (``emov2 train`` builds
models the same way)."""
import json

import pytest
import timm
import torch
from timm.models.pvt_v2 import Attention as TimmSpatialReductionAttention

import emov2
from emov2.deploy import deploy
from emov2.layers import ImprovedInvertedResidualMobileBlock
from emov2.layers.window_attention import SpanningWindowAttention
from emov2.models.deit_pvt import HostAttention, PVTBlock, PyramidVisionTransformer, TokenMapViT
from emov2.tools.common import count_flops, count_params, paper_targets
from emov2.train import Trainer
from emov2.train.testing import RandomImages, tiny_config

NAMES = ['deit_tiny_irmb', 'deit_tiny_i2rmb', 'pvt_tiny', 'pvt_tiny_irmb', 'pvt_tiny_i2rmb']
#: toy_table_iii key -> model name (DeiT-Tiny is timm's own)
MODEL_OF = {'deit_tiny': 'deit_tiny_patch16_224', **{n: n for n in NAMES}}
TINY_DEIT = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=32)
TINY_PVT = dict(embed_dims=[16, 16, 32, 32], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], img_size=32)


@pytest.fixture(scope='module')
def counts():
    """(params M, GMACs) of every Table III row at 224 px, counted once (timm's DeiT-Tiny: params only,
    its FLOPs are checked by tests/test_zoo.py)."""
    out = {}
    for key, name in MODEL_OF.items():
        m = timm.create_model(name)
        out[key] = (count_params(m) / 1e6, None if key == 'deit_tiny' else count_flops(m) / 1e9)
    return out


def test_registered_in_timm_and_the_package():
    assert set(emov2.list_models('deit_pvt')) == set(NAMES)
    assert set(NAMES) <= set(timm.list_models())
    assert isinstance(emov2.create_model('deit_tiny_i2rmb'), TokenMapViT)
    assert isinstance(emov2.create_model('pvt_tiny_irmb'), PyramidVisionTransformer)
    with pytest.raises(ValueError, match='pretrained'):
        timm.create_model('pvt_tiny', pretrained=True)


def _mobile_blocks(model):
    return [m for m in model.modules() if isinstance(m, ImprovedInvertedResidualMobileBlock)]


@pytest.mark.parametrize('name', ['deit_tiny_irmb', 'deit_tiny_i2rmb', 'pvt_tiny_irmb', 'pvt_tiny_i2rmb'])
def test_every_transformer_block_is_the_shared_block_attending_as_its_host(name):
    model = emov2.create_model(name)
    blocks = _mobile_blocks(model)
    assert len(blocks) == (12 if name.startswith('deit') else 8)
    assert not any(isinstance(m, PVTBlock) for m in model.modules())
    assert not any(isinstance(m, SpanningWindowAttention) for m in model.modules())
    v2 = name.endswith('i2rmb')
    srs = [1] if name.startswith('deit') else [8, 4, 2, 1]  # DeiT: global; PVT: its sr ratios, every stage
    for stage, sr in zip(model.stages, srs):
        for blk in stage[1:]:
            assert isinstance(blk.mixer, HostAttention) and blk.mixer.sr_ratio == sr
            assert blk.mixer.value_position == ('post' if v2 else 'pre')
            assert isinstance(blk.layer_scale, torch.nn.Identity) != v2  # LayerScale is EMOv2's
            assert blk.mixer.num_heads * 64 == blk.dim  # dim_head = the Transformer's (64)
            assert blk.dw.conv.kernel_size == (5, 5)
    if name.startswith('pvt'):  # the expansion is PVT's MLP ratio 8, 8, 4, 4
        assert [model.stages[i][1].dim_mid // model.stages[i][1].dim for i in range(4)] == [8, 8, 4, 4]
        # PVT's spatial-reduction convs + LayerNorms are kept: the same parameter shapes as in pvt_tiny
        plain = emov2.create_model('pvt_tiny')
        ours = [(tuple(b.mixer.sr.weight.shape), tuple(b.mixer.sr_norm.weight.shape)) for b in blocks
                if b.mixer.sr_ratio > 1]
        theirs = [(tuple(b.attn.sr.weight.shape), tuple(b.attn.norm.weight.shape)) for b in plain.modules()
                  if isinstance(b, PVTBlock) and b.attn.sr is not None]
        assert ours == theirs and len(ours) == 6


def _load_qk(window_attn, host):
    with torch.no_grad():
        window_attn.qk.weight.copy_(torch.cat([host.q.weight, host.k.weight]))
        window_attn.qk.bias.copy_(torch.cat([host.q.bias, host.k.bias]))
        window_attn.v.load_state_dict(host.v.state_dict())


@pytest.mark.parametrize('position', ['pre', 'post'])
def test_host_attention_without_reduction_is_one_window_over_the_map(position):
    """sr 1 (DeiT): global attention = EMO's window attention with one window covering the map."""
    torch.manual_seed(0)
    host = HostAttention(32, 64, dim_head=16, sr_ratio=1, value_position=position)
    window = SpanningWindowAttention(32, 64, dim_head=16, window_size=(6, 10), partitions=('distant',),
                                     value_position=position)
    _load_qk(window, host)
    x = torch.randn(2, 32, 6, 10)
    assert torch.allclose(host(x), window(x), atol=1e-5)
    small = SpanningWindowAttention(32, 64, dim_head=16, window_size=3, partitions=('distant',), value_position=position)
    _load_qk(small, host)  # the same weights in smaller windows attend differently
    assert not torch.allclose(host(x), small(x), atol=1e-3)


@pytest.mark.parametrize('position', ['pre', 'post'])
def test_host_attention_with_reduction_is_pvts(position):
    """sr 2: PVT's spatial-reduction attention (timm's) with the block's value conv before ('post', with
    timm's key/value linear as the expansion) or after ('pre', timm's value and output projections the identity)."""
    torch.manual_seed(0)
    dim, heads, h, w = 32, 2, 6, 8
    host = HostAttention(dim, dim if position == 'post' else 64, dim_head=16, sr_ratio=2, value_position=position,
                         act_layer=torch.nn.Identity if position == 'post' else torch.nn.GELU)
    sra = TimmSpatialReductionAttention(dim, num_heads=heads, sr_ratio=2)
    host.sr_norm.eps = sra.norm.eps
    with torch.no_grad():
        sra.q.weight.copy_(host.q.weight.flatten(1)); sra.q.bias.copy_(host.q.bias)
        sra.sr.load_state_dict(host.sr.state_dict()); sra.norm.load_state_dict(host.sr_norm.state_dict())
        sra.kv.weight[:dim].copy_(host.k.weight.flatten(1)); sra.kv.bias[:dim].copy_(host.k.bias)
        value = host.v if position == 'post' else None
        sra.kv.weight[dim:].copy_(value.weight.flatten(1) if value is not None else torch.eye(dim))
        sra.kv.bias[dim:].copy_(value.bias if value is not None else torch.zeros(dim))
        sra.proj.weight.copy_(torch.eye(dim)); sra.proj.bias.zero_()
    x = torch.randn(2, dim, h, w)
    with torch.no_grad():
        theirs = sra(x.flatten(2).transpose(1, 2), [h, w]).transpose(1, 2).reshape(2, dim, h, w)
        if position == 'pre':
            theirs = host.act(host.v(theirs))
        assert torch.allclose(host(x), theirs, atol=1e-5)
    assert host.sr(x).shape[-2:] == (3, 4)
    with pytest.raises(ValueError, match='smaller than the spatial reduction'):
        HostAttention(dim, 64, 16, sr_ratio=4)(torch.randn(1, dim, 3, 8))
    with pytest.raises(ValueError, match='sr_ratio'):
        HostAttention(dim, 64, 16, sr_ratio=0)


def test_window_attention_reading_is_kept_as_an_option():
    deit = emov2.create_model('deit_tiny_i2rmb', attention='window', window_size=4, **TINY_DEIT)
    assert all(isinstance(b.mixer, SpanningWindowAttention) and tuple(b.mixer.partitions) == ('neighbour', 'distant')
               for b in _mobile_blocks(deit))
    pvt = emov2.create_model('pvt_tiny_irmb', attention='window', attention_stages=(3, 4), window_size=4, **TINY_PVT)
    mixers = [type(s[1].mixer).__name__ for s in pvt.stages]
    assert mixers == ['PointwiseMixer', 'PointwiseMixer', 'SpanningWindowAttention', 'SpanningWindowAttention']
    assert pvt.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    with pytest.raises(ValueError, match='attention must be'):
        emov2.create_model('deit_tiny_irmb', attention='global')


def test_plain_pvt_tiny_is_v1(counts):
    model = emov2.create_model('pvt_tiny')
    assert sum(isinstance(m, PVTBlock) for m in model.modules()) == 8
    assert [model.stages[i][1].attn.sr.kernel_size[0] if model.stages[i][1].attn.sr is not None else 1
            for i in range(4)] == [8, 4, 2, 1]
    params, gmacs = counts['pvt_tiny']
    assert abs(params - 13.2) / 13.2 < 0.01 and abs(gmacs - 1.9) / 1.9 < 0.03


def test_params_and_flops_against_the_paper(counts):
    """Within 5% (params) / 10% (FLOPs) of Table III, except the one gap of the chosen reading
    (docs/MODEL_ZOO.md): PVT-i2RMB's FLOPs are 13-14% low (its expansion runs on PVT's reduced keys/values)."""
    paper = paper_targets()['toy_table_iii']
    failures = []
    for key, (params, gmacs) in counts.items():
        p_rel = (params - paper[key]['params']) / paper[key]['params']
        if abs(p_rel) > 0.05:
            failures.append(f'{key}: params {params:.3f}M ({100 * p_rel:+.1f}%)')
        if gmacs is None:
            continue
        f_rel = (gmacs - paper[key]['flops'] / 1000) / (paper[key]['flops'] / 1000)
        if key == 'pvt_tiny_i2rmb':
            assert -0.14 < f_rel < -0.12, f_rel  # the stated gap; a change here needs the docs updated
        elif abs(f_rel) > 0.10:
            failures.append(f'{key}: FLOPs {gmacs:.3f}G ({100 * f_rel:+.1f}%)')
    assert not failures, '\n'.join(failures)
    # the ordering of Table III: the mobile blocks are smaller than the Transformers they replace,
    # and the i2RMB is larger than the iRMB (+0.1M: DW 5x5 everywhere and LayerScale)
    assert counts['deit_tiny_irmb'][0] < counts['deit_tiny'][0] and counts['pvt_tiny_irmb'][0] < counts['pvt_tiny'][0]
    assert counts['deit_tiny_irmb'][0] < counts['deit_tiny_i2rmb'][0]
    assert counts['pvt_tiny_irmb'][0] < counts['pvt_tiny_i2rmb'][0]
    assert counts['deit_tiny_irmb'][1] < counts['deit_tiny_i2rmb'][1]  # post attention mixes 4x wider values


def test_token_map_layout_other_sizes_and_bad_input():
    torch.manual_seed(0)
    deit = emov2.create_model('deit_tiny_i2rmb', num_classes=5).eval()
    with torch.no_grad():
        assert deit.forward_features(torch.randn(1, 3, 112, 112)).shape == (1, 192, 7, 7)  # no class token
        assert deit(torch.randn(2, 3, 96, 80)).shape == (2, 5)  # position map resized to 6x5
    pvt = emov2.create_model('pvt_tiny_i2rmb', num_classes=5).eval()
    with torch.no_grad():
        maps = pvt.forward_intermediates(torch.randn(1, 3, 64, 96), intermediates_only=True)
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 16, 24), (128, 8, 12), (320, 4, 6), (512, 2, 3)]
    feats = timm.create_model('pvt_tiny_irmb', features_only=True).eval()  # timm's feature extraction
    with torch.no_grad():
        assert [tuple(f.shape[1:]) for f in feats(torch.randn(1, 3, 64, 64))] == \
            [(64, 16, 16), (128, 8, 8), (320, 4, 4), (512, 2, 2)]
    with pytest.raises(ValueError, match='channels'):
        deit(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='block must be'):
        emov2.create_model('pvt_tiny', block='mlp')


@pytest.mark.parametrize('name,kwargs', [('deit_tiny_irmb', TINY_DEIT), ('pvt_tiny_i2rmb', TINY_PVT),
                                         ('pvt_tiny', TINY_PVT)])
def test_deploy_keeps_outputs(name, kwargs):
    torch.manual_seed(0)
    model = emov2.create_model(name, window_size=4, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(deploy(model)(x), model(x), atol=1e-4, rtol=1e-4)


def test_trainer_trains_deit_i2rmb_and_the_checkpoint_loads(tmp_path):
    cfg = tiny_config(tmp_path / 'run', overrides=[
        'model.name=deit_tiny_i2rmb', f'model.kwargs={json.dumps(TINY_DEIT)}', 'model.window_size=4',
        'sched.epochs=1', 'sched.warmup_epochs=0', 'eval.precise_bn_images=0'])
    result = Trainer(cfg, RandomImages(24), RandomImages(8, augment=False)).fit()
    assert result.global_step == 3 and not result.stopped_early
    assert result.last_metrics['train_loss'] == result.last_metrics['train_loss']  # finite
    model = emov2.create_model('deit_tiny_i2rmb', num_classes=4, window_size=4, **TINY_DEIT)
    emov2.load_checkpoint(model, tmp_path / 'run' / 'last' / 'model.safetensors', head='strict')
    trained = model.stages[0][1].proj.weight
    fresh = emov2.create_model('deit_tiny_i2rmb', num_classes=4, window_size=4, **TINY_DEIT).stages[0][1].proj.weight
    assert not torch.equal(trained, fresh)
