"""The Meta Mobile Block (EMO Fig. 2, left): ``Y = X + MLP_s(F(MLP_e(X)))``.

One abstraction, three classic instances: ``λ=4, F=identity`` is the Transformer FFN,
``λ=1, F=MHSA`` is multi-head self-attention (MLP_e is the value projection, queries and keys come
from the block input), ``λ>1, F=DW-conv`` is MobileNetV2's inverted residual block. The i2RMB of
:mod:`emov2.models.emo` is the same pattern with ``F = DW-conv ∘ spanning window attention``.
"""
from typing import List

from torch import Tensor, nn

from .basic import ConvNormAct
from .window_attention import windowed_attention

__all__ = ['MetaMobileBlock', 'GlobalAttentionOperator']


class GlobalAttentionOperator(nn.Module):
    """MHSA as an operator F: queries/keys from the block input, values = the expanded features."""

    def __init__(self, dim: int, dim_head: int) -> None:
        super().__init__()
        self.num_heads = dim // dim_head
        self.qk = nn.Conv2d(dim, dim * 2, 1)

    def forward(self, values: Tensor, source: Tensor) -> Tensor:
        window: List[int] = list(source.shape[2:])  # one window covering the whole map
        return windowed_attention(self.qk(source), values, window, self.num_heads, ['neighbour'])


class MetaMobileBlock(nn.Module):
    """``x + MLP_s(F(MLP_e(x), x))`` with expansion ratio λ and an efficient operator F.

    ``operator``: ``'identity'``, ``'dwconv'`` or ``'mhsa'``. ``conv_norm`` puts a BatchNorm after
    MLP_e and MLP_s (MobileNetV2 style); MHSA keeps MLP_e linear (it is the value projection).
    """

    def __init__(
            self,
            dim: int,
            expansion_ratio: float,
            operator: str = 'dwconv',
            act_layer: type = nn.GELU,
            conv_norm: bool = False,
            dw_kernel: int = 3,
            dim_head: int = 32,
    ) -> None:
        super().__init__()
        hidden = int(dim * expansion_ratio)
        norm = 'bn' if conv_norm else 'none'
        linear = operator == 'mhsa'
        self.expand = ConvNormAct(dim, hidden, 1, bias=not conv_norm, norm=norm,
                                  act_layer=nn.Identity if linear else act_layer)
        if operator == 'identity':
            self.operator = nn.Identity()
        elif operator == 'dwconv':
            self.operator = ConvNormAct(hidden, hidden, dw_kernel, groups=hidden, act_layer=act_layer)
        elif operator == 'mhsa':
            if hidden != dim:
                raise ValueError('MHSA is the instance with expansion ratio 1')
            self.operator = GlobalAttentionOperator(dim, dim_head)
        else:
            raise ValueError(f"operator must be 'identity', 'dwconv' or 'mhsa', got {operator!r}")
        self.uses_source = linear
        self.shrink = ConvNormAct(hidden, dim, 1, bias=not conv_norm, norm=norm)

    @classmethod
    def ffn(cls, dim: int, expansion_ratio: float = 4.0, act_layer: type = nn.GELU) -> 'MetaMobileBlock':
        return cls(dim, expansion_ratio, 'identity', act_layer)

    @classmethod
    def mhsa(cls, dim: int, dim_head: int = 32) -> 'MetaMobileBlock':
        return cls(dim, 1.0, 'mhsa', dim_head=dim_head)

    @classmethod
    def inverted_residual(cls, dim: int, expansion_ratio: float = 4.0, dw_kernel: int = 3,
                          act_layer: type = nn.ReLU6) -> 'MetaMobileBlock':
        return cls(dim, expansion_ratio, 'dwconv', act_layer, conv_norm=True, dw_kernel=dw_kernel)

    def forward(self, x: Tensor) -> Tensor:
        expanded = self.expand(x)
        mixed = self.operator(expanded, x) if self.uses_source else self.operator(expanded)
        return x + self.shrink(mixed)
