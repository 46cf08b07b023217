"""Segmenters (DeepLabv3, Semantic FPN, SegFormer head, PSPNet on EMOv2) and U-EMO: shapes, sizes vs the
paper, the shared block inside U-EMO, deploy equality, backbone checkpoints."""
import pytest
import timm
import torch

from emov2.deploy import deploy
from emov2.layers.block import ImprovedInvertedResidualMobileBlock
from emov2.segmentation import PAPER_INPUT, PAPER_ROW_TO_KIND, SIZE_NOTES, create_segmenter, segmenter_names
from emov2.tools.common import count_flops, paper_targets

torch.manual_seed(0)


def _params(model: torch.nn.Module) -> float:
    """Millions of parameters the paper counts: the auxiliary head removed (MMSeg get_flops)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith('aux_head.')) / 1e6


@pytest.mark.parametrize('kind', ['deeplabv3', 'fpn', 'segformer', 'pspnet'])
def test_shapes_and_aux(kind):
    model = create_segmenter(kind, backbone='emov2_1m', num_classes=7)
    x = torch.randn(2, 3, 64, 96)
    out = model.train()(x)
    assert out['out'].shape == (2, 7, 64, 96)
    has_aux = kind in ('deeplabv3', 'pspnet')
    assert ('aux' in out) == has_aux
    if has_aux:
        assert out['aux'].shape == (2, 7, 64, 96)
        (out['out'].mean() + out['aux'].mean()).backward()
        assert model.aux_head.conv[0].weight.grad is not None
    with torch.no_grad():
        assert set(model.eval()(x)) == {'out'}  # the auxiliary head runs in training only


def test_options_and_errors():
    assert create_segmenter('deeplabv3', backbone='emov2_1m', aux=False).aux_head is None
    assert create_segmenter('segformer', backbone='emov2_1m', channels=64).decode_head.fusion_conv[0].out_channels == 64
    with pytest.raises(ValueError, match='unknown segmenter kind'):
        create_segmenter('maskformer')
    with pytest.raises(ValueError, match='unknown backbone'):
        create_segmenter('fpn', backbone='resnet50')
    with pytest.raises(ValueError, match='divisible by 16'):
        create_segmenter('unet_s5_d16', num_classes=2)(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match='drop_path_rate do not apply'):
        create_segmenter('u_emov2_5m', drop_path_rate=0.1)
    assert set(PAPER_ROW_TO_KIND.values()) == set(segmenter_names())


@pytest.mark.parametrize('row,backbone', [('deeplabv3', 'emov2_5m'), ('semantic_fpn', 'emov2_2m'),
                                          ('segformer', 'emov2_20m'), ('pspnet', 'emov2_1m')])
def test_params_match_paper(row, backbone):
    target = paper_targets()['segmentation_ade20k_512'][row][backbone]['params']
    with torch.device('meta'):
        model = create_segmenter(PAPER_ROW_TO_KIND[row], backbone=backbone)
    assert _params(model) == pytest.approx(target, rel=0.05)


def test_flops_match_paper():
    target = paper_targets()['segmentation_ade20k_512']['pspnet']['emov2_1m']['flops_g']
    model = create_segmenter('pspnet', backbone='emov2_1m')
    assert count_flops(model, PAPER_INPUT['segmentation_ade20k_512']) / 1e9 == pytest.approx(target, rel=0.10)
    assert model.training  # count_flops restores the mode


def test_size_notes_cover_gaps():
    assert 'segformer/emov2_1m' in SIZE_NOTES and 'u_emov2_5m' in SIZE_NOTES


def test_u_emo_uses_the_shared_block():
    model = create_segmenter('u_emov2_5m', num_classes=2)
    assert _params(model) == pytest.approx(paper_targets()['unet_hrf_256']['u_emov2_5m']['params'], rel=0.05)
    blocks = [m for m in model.backbone.modules() if isinstance(m, ImprovedInvertedResidualMobileBlock)]
    assert len(blocks) == 16  # encoder stages 2-5 and all four decoder stages, two each
    assert all(b.dim >= 64 and b.has_attention and b.dim_mid == 2 * b.dim for b in blocks)
    first = model.backbone.encoder[0]  # 3 input channels: plain convs
    assert not any(isinstance(m, ImprovedInvertedResidualMobileBlock) for m in first.modules())
    with torch.device('meta'):
        baseline = create_segmenter('unet_s5_d16', num_classes=2)
    assert _params(baseline) == pytest.approx(paper_targets()['unet_hrf_256']['unet_s5_d16']['params'], rel=0.05)
    assert not any(isinstance(m, ImprovedInvertedResidualMobileBlock) for m in baseline.modules())


def _randomise_norms(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so folding them is really tested."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize('kind', ['deeplabv3', 'fpn', 'segformer', 'pspnet', 'u_emov2_5m'])
def test_deploy_keeps_outputs(kind):
    model = create_segmenter(kind, backbone='emov2_1m', num_classes=3).eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, 48, 64) if kind != 'u_emov2_5m' else torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        ref = model(x)['out']
        out = deploy(model)(x)['out']
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_backbone_checkpoint_loads(tmp_path):
    classifier = timm.create_model('emov2_1m', num_classes=1000)
    torch.nn.init.normal_(classifier.stages[2][1].proj.weight)
    path = tmp_path / 'emo2_1M.pth'
    torch.save(classifier.state_dict(), path)  # a bare state dict, as the official files are
    fresh = create_segmenter('deeplabv3', backbone='emov2_1m')
    loaded = create_segmenter('deeplabv3', backbone='emov2_1m', backbone_checkpoint=path)
    key = 'stages.2.1.proj.weight'
    want = classifier.state_dict()[key]
    assert not torch.equal(fresh.backbone.state_dict()[key], want)
    assert torch.equal(loaded.backbone.state_dict()[key], want)
    assert torch.equal(loaded.backbone.stem[0].conv.weight, classifier.stem[0].conv.weight)
    wrong = tmp_path / 'emo2_5M.pth'
    torch.save(timm.create_model('emov2_5m').state_dict(), wrong)
    with pytest.raises(Exception, match='does not fit'):
        create_segmenter('fpn', backbone='emov2_1m', backbone_checkpoint=wrong)
    with pytest.raises(ValueError, match='from scratch'):
        create_segmenter('u_emov2_5m', backbone_checkpoint=path)
