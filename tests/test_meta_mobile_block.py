"""The Meta Mobile Block instantiates FFN, MHSA and MobileNetV2's IRB (EMO Fig. 2, left)."""
import torch
from timm.layers import Mlp
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

from emov2.layers import MetaMobileBlock


def _tokens(x):
    return x.flatten(2).transpose(1, 2)


def _copy_in_order(dst: nn.Module, src: nn.Module):
    """Copy tensors between two modules whose state dicts list the same shapes in the same order."""
    d, s = dst.state_dict(), src.state_dict()
    assert [v.shape for v in d.values()] == [v.shape for v in s.values()]
    dst.load_state_dict(dict(zip(d.keys(), s.values())))


def test_ffn_instance_is_the_transformer_mlp():
    block = MetaMobileBlock.ffn(16, 4.0).double()
    mlp = Mlp(16, 64, act_layer=nn.GELU).double()
    mlp.fc1.weight.data = block.expand.conv.weight.data.flatten(1)
    mlp.fc1.bias.data = block.expand.conv.bias.data
    mlp.fc2.weight.data = block.shrink.conv.weight.data.flatten(1)
    mlp.fc2.bias.data = block.shrink.conv.bias.data
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    want = _tokens(x) + mlp(_tokens(x))
    torch.testing.assert_close(_tokens(block(x)), want)


def test_mhsa_instance_is_multi_head_attention():
    dim, dim_head = 16, 4
    block = MetaMobileBlock.mhsa(dim, dim_head).double()
    mha = nn.MultiheadAttention(dim, dim // dim_head, batch_first=True).double()
    qk = block.operator.qk
    mha.in_proj_weight.data = torch.cat([qk.weight.flatten(1), block.expand.conv.weight.flatten(1)])
    mha.in_proj_bias.data = torch.cat([qk.bias, block.expand.conv.bias])
    mha.out_proj.weight.data = block.shrink.conv.weight.data.flatten(1)
    mha.out_proj.bias.data = block.shrink.conv.bias.data
    x = torch.randn(2, dim, 5, 7, dtype=torch.float64)
    t = _tokens(x)
    want = t + mha(t, t, t, need_weights=False)[0]
    with torch.no_grad():
        torch.testing.assert_close(_tokens(block(x)), want)


def test_dwconv_instance_is_mobilenetv2_inverted_residual():
    block = MetaMobileBlock.inverted_residual(16, 4.0, dw_kernel=3).double().eval()
    irb = InvertedResidual(16, 16, stride=1, expand_ratio=4).double().eval()
    for m in irb.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-6
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_var, 0.5, 1.5)
            nn.init.normal_(m.running_mean)
    _copy_in_order(irb, block)
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), irb(x))
