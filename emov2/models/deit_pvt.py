"""DeiT-Tiny and PVT-Tiny with their Transformer blocks replaced by the iRMB / i2RMB (EMOv2 Table III).

The paper's "toy" experiment swaps every Transformer block of two plain vision Transformers for the
mobile block and trains them like the originals. Neither official repository (github.com/zhangzjn/EMO,
github.com/zhangzjn/EMOv2) has these models, so the reading below is ours. The block is the package's
shared :class:`~emov2.layers.block.ImprovedInvertedResidualMobileBlock`, in two configurations:

* ``irmb`` (EMOv1): "pre" attention (the weights are applied to the block input, then the
  value/expansion conv), no LayerScale, DW kernel 5 where it attends (EMOv1's kernel there), 3 where not;
* ``i2rmb`` (EMOv2): "post" attention (the expansion conv is the value), LayerScale, DW kernel 5.

The reading of "the block in place of the Transformer block", in one sentence: **the block's attention
sees what the replaced Transformer's attention saw** (:class:`HostAttention`), and its expansion /
DW conv / projection take the FFN's place. So:

* one block per Transformer block, the same depth and width; the expansion ratio is the Transformer's
  MLP ratio (DeiT 4; PVT 8, 8, 4, 4); ``dim_head`` is the Transformer's ``dim / heads`` (64 for both);
* DeiT: global attention over the whole 14 x 14 map, as DeiT's (the official iRMB's
  ``window_size <= 0``). With one window covering the map the i2RMB's neighbour and distant windows
  are the same window, so it attends once;
* PVT: PVT's spatial-reduction attention in all four stages, as PVT attends: queries from every token,
  keys and values from the map reduced by PVT's ``sr x sr`` / stride-``sr`` conv + LayerNorm
  (sr 8, 4, 2, 1), so those convs (1.87M parameters) stay. For the i2RMB, "post" means the value
  (expansion) conv runs on the reduced map, as PVT's key/value projection does;
* tokens stay a ``B x C x H x W`` map so the depthwise conv sees the image layout: the learned
  absolute position embedding is a ``C x H x W`` map (resized bicubically for other input sizes);
* **DeiT's class token is dropped**: the classifier averages the final map (LayerNorm over channels,
  global average pool, linear, as EMO's head).

Against Table III (fvcore, 224 px; ``docs/MODEL_ZOO.md``): 5.070M / 1.124G (paper 4.9M / 1.1G),
5.072M / 1.390G (5.0M / 1.3G), 11.941M / 1.927G (11.7M / 1.8G), 11.943M / 1.644G (11.9M / 1.9G): all
within 5% (params) and 10% (FLOPs) except PVT-i2RMB's FLOPs (-13%: its expansion runs on PVT's reduced
keys/values). ``attention='window'`` builds the earlier reading instead: EMO's window attention
(``window_size``, neighbour + distant windows for the i2RMB) where ``attention_stages`` say, no
spatial-reduction convs (DeiT 5.07M / 0.99G and 1.17G; PVT with ``attention_stages=(3, 4)`` 9.94M /
9.99M, 15-16% under the paper's parameters).

The plain baselines: DeiT-Tiny is timm's ``deit_tiny_patch16_224``; PVT-Tiny (v1, Wang et al., ICCV
2021) is not in timm (it has PVTv2), so :class:`PyramidVisionTransformer` builds it from timm's
spatial-reduction attention (``timm.models.pvt_v2.Attention`` with ``sr_ratio``: a ``sr x sr``
stride-``sr`` conv + LayerNorm shrinks keys/values, as in v1) and MLP, with one difference: the
last map is average-pooled instead of v1's class token in stage 4 (1,024 parameters, as PVTv2 does),
so the three PVT rows share one head.
"""
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import Tensor, nn
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.pvt_v2 import Attention as SpatialReductionAttention

from ..layers import PARTITIONS, ImprovedInvertedResidualMobileBlock, LayerNormChannels
from .emo import ClassifierInterface, check_input

__all__ = ['BLOCK_TYPES', 'ATTENTION_TYPES', 'mobile_block', 'HostAttention', 'PatchEmbedMap', 'PVTBlock', 'TokenMapViT', 'PyramidVisionTransformer',
           'DEIT_PVT_CONFIGS']

#: the two configurations of the shared block (EMOv1's iRMB and EMOv2's i2RMB), and 'transformer'
BLOCK_TYPES = ('transformer', 'irmb', 'i2rmb')
#: what the block's attention sees: the replaced Transformer's ('host') or EMO's windows ('window')
ATTENTION_TYPES = ('host', 'window')
_BLOCK_ARGS: Dict[str, Dict[str, Any]] = {
    'irmb': dict(partitions=('distant',), attention_position='pre', layer_scale=False),
    'i2rmb': dict(partitions=PARTITIONS, attention_position='post', layer_scale=True),
}
_LN_EPS = 1e-6


def mobile_block(block: str, dim: int, exp_ratio: float, dim_head: int, attention: bool, window_size: int,
                 drop_path: float = 0.0, dw_kernel: Optional[int] = None,
                 sr_ratio: Optional[int] = None) -> ImprovedInvertedResidualMobileBlock:
    """One shared block in the ``'irmb'`` (EMOv1) or ``'i2rmb'`` (EMOv2) configuration, keeping ``dim``.

    With ``attention``: LayerNorm, GELU and attention, which is EMO's window attention
    (``window_size``) or, given ``sr_ratio``, the host Transformer's :class:`HostAttention`; without:
    BN, SiLU and the pointwise mixer (EMO's stages 1-2). ``dw_kernel`` defaults to EMOv1's 3 / 5
    (without / with attention) for ``irmb`` and 5 for ``i2rmb``."""
    if block not in _BLOCK_ARGS:
        raise ValueError(f"block must be one of {tuple(_BLOCK_ARGS)}, got {block!r}")
    if dw_kernel is None:
        dw_kernel = 5 if (attention or block == 'i2rmb') else 3
    blk = ImprovedInvertedResidualMobileBlock(
        dim, dim, exp_ratio=exp_ratio, norm='ln' if attention else 'bn',
        act_layer=nn.GELU if attention else nn.SiLU, mixer='attention' if attention else 'conv',
        dim_head=dim_head, window_size=window_size, dw_kernel=dw_kernel, drop_path=drop_path,
        **_BLOCK_ARGS[block])
    if attention and sr_ratio is not None:  # the block's operator F is the host's attention (MMBlock's F)
        blk.mixer = HostAttention(dim, blk.dim_mid, dim_head, sr_ratio, blk.mixer.value_position)
    return blk


class HostAttention(nn.Module):
    """The replaced Transformer's attention as the block's mixer (C -> C_mid): global multi-head
    attention whose keys and values come from the map reduced by an ``sr x sr`` / stride-``sr`` conv +
    LayerNorm (PVT's spatial-reduction attention; ``sr_ratio=1``: DeiT's global attention, no conv).

    ``q``/``k`` (1x1 convs, C -> C each: the block's ``qk``) and ``v`` (1x1 conv C -> C_mid + GELU,
    the expansion) as in :class:`~emov2.layers.window_attention.SpanningWindowAttention`. With
    ``value_position='post'`` (EMOv2) the weights mix ``act(v(reduced))``; with ``'pre'`` (EMOv1)
    they mix the reduced map itself and ``v`` is applied to the result at every token."""

    def __init__(self, dim: int, dim_out: int, dim_head: int = 64, sr_ratio: int = 1, value_position: str = 'post',
                 act_layer: type = nn.GELU) -> None:
        super().__init__()
        if dim % dim_head:
            raise ValueError(f'dim {dim} is not a multiple of dim_head {dim_head}')
        if value_position not in ('post', 'pre'):
            raise ValueError(f"value_position must be 'post' or 'pre', got {value_position!r}")
        if sr_ratio < 1:
            raise ValueError(f'sr_ratio must be >= 1, got {sr_ratio}')
        self.num_heads, self.sr_ratio, self.value_position = dim // dim_head, sr_ratio, value_position
        if value_position == 'post' and dim_out % self.num_heads:
            raise ValueError(f'dim_out {dim_out} does not split into {self.num_heads} heads')
        self.q = nn.Conv2d(dim, dim, 1)
        self.k = nn.Conv2d(dim, dim, 1)
        self.v = nn.Conv2d(dim, dim_out, 1)
        self.act = act_layer()
        self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio) if sr_ratio > 1 else nn.Identity()
        self.sr_norm = LayerNormChannels(dim, eps=_LN_EPS) if sr_ratio > 1 else nn.Identity()

    def _heads(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        return x.reshape(b, self.num_heads, c // self.num_heads, -1).transpose(-1, -2)  # (B, heads, N, d)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if self.sr_ratio > 1 and min(h, w) < self.sr_ratio:
            raise ValueError(f'a {h}x{w} map is smaller than the spatial reduction {self.sr_ratio}x{self.sr_ratio}')
        reduced = self.sr_norm(self.sr(x))
        value = self.act(self.v(reduced)) if self.value_position == 'post' else reduced
        out = F.scaled_dot_product_attention(self._heads(self.q(x)), self._heads(self.k(reduced)), self._heads(value))
        out = out.transpose(-1, -2).reshape(b, -1, h, w)
        return out if self.value_position == 'post' else self.act(self.v(out))


class PatchEmbedMap(nn.Module):
    """``p x p`` / stride ``p`` conv patch embedding (+ LayerNorm over channels for PVT) plus a learned
    absolute position map ``(1, C, H/p, W/p)``, resized bicubically when the input size differs."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, grid: Tuple[int, int], norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = LayerNormChannels(dim, eps=_LN_EPS) if norm else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *grid))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.proj(x))
        pos = self.pos_embed
        if pos.shape[-2:] != x.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode='bicubic', align_corners=False)
        return x + pos


class PVTBlock(nn.Module):
    """PVT's Transformer block on a ``(B, C, H, W)`` map: ``x + SRA(LN(x))``, then ``x + MLP(LN(x))``
    over the flattened tokens (spatial-reduction attention with ratio ``sr_ratio``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = SpatialReductionAttention(dim, num_heads=num_heads, sr_ratio=sr_ratio, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.drop_path(self.attn(self.norm1(t), [h, w]))
        t = t + self.drop_path(self.mlp(self.norm2(t)))
        return t.transpose(1, 2).reshape(b, c, h, w)


class _MapClassifier(ClassifierInterface, nn.Module):
    """Shared tail of both models: ``stages`` (each starting with its patch embedding), LayerNorm
    over channels, global average pool, dropout, linear head. ``stem`` is the identity (viz/timm
    tools look for ``stem`` + ``stages``)."""

    def _finish(self, num_features: int, num_classes: int, drop_rate: float, global_pool: str) -> None:
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.stem = nn.Identity()
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = num_features
        self.norm = LayerNormChannels(num_features, eps=_LN_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return super().no_weight_decay() | {n for n, _ in self.named_parameters() if n.endswith('pos_embed')}

    def forward_features(self, x: Tensor) -> Tensor:
        check_input(x, self.in_chans, self.min_input_size)
        for stage in self.stages:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
                              intermediates_only: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Every stage's output map (all stages by default, or those in ``indices``)."""
        check_input(x, self.in_chans, self.min_input_size)
        take = range(len(self.stages)) if indices is None else ([indices] if isinstance(indices, int) else indices)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in take:
                out.append(x)
        return out if intermediates_only else (self.norm(x), out)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == 'avg':
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class TokenMapViT(_MapClassifier):
    """DeiT with each Transformer block replaced by one shared block (``block='irmb'`` / ``'i2rmb'``) on
    the ``embed_dim x H/p x W/p`` token map; no class token (the map is averaged), one stage. Every block
    attends over the whole map (``attention='host'``, DeiT's global attention) or EMO's windows of
    ``window_size`` (``'window'``; otherwise ``window_size`` is not used)."""

    def __init__(
            self,
            img_size: int = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            mlp_ratio: float = 4.0,
            block: str = 'i2rmb',
            attention: str = 'host',
            window_size: int = 7,
            dw_kernel: Optional[int] = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if block not in _BLOCK_ARGS:
            raise ValueError(f"block must be one of {tuple(_BLOCK_ARGS)} for TokenMapViT, got {block!r}")
        if attention not in ATTENTION_TYPES:
            raise ValueError(f'attention must be one of {ATTENTION_TYPES}, got {attention!r}')
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
        self.in_chans, self.block_type, self.min_input_size = in_chans, block, patch_size
        grid = (img_size // patch_size, img_size // patch_size)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        sr = 1 if attention == 'host' else None
        blocks = [mobile_block(block, embed_dim, mlp_ratio, embed_dim // num_heads, True, window_size, dpr[i],
                               dw_kernel, sr) for i in range(depth)]
        self.stages = nn.Sequential(nn.Sequential(PatchEmbedMap(in_chans, embed_dim, patch_size, grid, norm=False),
                                                  *blocks))
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module='stages.0')]
        self._finish(embed_dim, num_classes, drop_rate, global_pool)


class PyramidVisionTransformer(_MapClassifier):
    """PVT (v1) with ``block='transformer'`` (spatial-reduction attention + MLP), or with each block
    replaced by one shared block (``'irmb'`` / ``'i2rmb'``) that attends in ``attention_stages`` (the
    others mix with a pointwise conv): with PVT's spatial-reduction attention (``attention='host'``,
    ``sr_ratios``) or EMO's windows of ``window_size`` (``'window'``; otherwise ``window_size`` is not used).
    Stage ``i`` = patch embedding (stride 4, then 2) + LayerNorm + position map, then ``depths[i]`` blocks."""

    def __init__(
            self,
            img_size: int = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            depths: Sequence[int] = (2, 2, 2, 2),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            block: str = 'transformer',
            attention: str = 'host',
            attention_stages: Sequence[int] = (1, 2, 3, 4),
            window_size: int = 7,
            dw_kernel: Optional[int] = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if block not in BLOCK_TYPES:
            raise ValueError(f'block must be one of {BLOCK_TYPES}, got {block!r}')
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(depths) == len(sr_ratios) == 4):
            raise ValueError('embed_dims, num_heads, mlp_ratios, depths and sr_ratios need one entry per stage (4)')
        if attention not in ATTENTION_TYPES:
            raise ValueError(f'attention must be one of {ATTENTION_TYPES}, got {attention!r}')
        if any(s not in (1, 2, 3, 4) for s in attention_stages):
            raise ValueError(f'attention_stages are stage numbers 1-4, got {tuple(attention_stages)}')
        self.in_chans, self.block_type, self.min_input_size = in_chans, block, 32
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        stages, self.feature_info = [], []
        dim_in, stride, idx = in_chans, 1, 0
        for i in range(4):
            patch = 4 if i == 0 else 2
            stride *= patch
            grid = (img_size // stride, img_size // stride)
            blocks: List[nn.Module] = []
            for _ in range(depths[i]):
                if block == 'transformer':
                    blocks.append(PVTBlock(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], dpr[idx]))
                else:
                    blocks.append(mobile_block(block, embed_dims[i], mlp_ratios[i], embed_dims[i] // num_heads[i],
                                               i + 1 in attention_stages, window_size, dpr[idx], dw_kernel,
                                               sr_ratios[i] if attention == 'host' else None))
                idx += 1
            stages.append(nn.Sequential(PatchEmbedMap(dim_in, embed_dims[i], patch, grid, norm=True), *blocks))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f'stages.{i}'))
            dim_in = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self._finish(embed_dims[-1], num_classes, drop_rate, global_pool)


# --- configs and timm registration ------------------------------------------------------------------
DEIT_PVT_CONFIGS: Dict[str, Tuple[type, Dict[str, Any]]] = {
    'deit_tiny_irmb': (TokenMapViT, dict(block='irmb')),
    'deit_tiny_i2rmb': (TokenMapViT, dict(block='i2rmb')),
    'pvt_tiny': (PyramidVisionTransformer, dict(block='transformer')),
    'pvt_tiny_irmb': (PyramidVisionTransformer, dict(block='irmb')),
    'pvt_tiny_i2rmb': (PyramidVisionTransformer, dict(block='i2rmb')),
}


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    cfg = dict(
        url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv='stages.0.0.proj', classifier='head', license='apache-2.0', paper_ids='arXiv:2412.06674')
    cfg.update(kwargs)
    return cfg


default_cfgs = generate_default_cfgs({
    f'{name}.untrained': _cfg(pool_size=(14, 14) if name.startswith('deit') else (7, 7))
    for name in DEIT_PVT_CONFIGS})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError(f'no pretrained {variant} weights are shipped; load a checkpoint instead')
    cls, args = DEIT_PVT_CONFIGS[variant]
    model_args = dict(args)
    model_args.update({k: v for k, v in kwargs.items() if v is not None})
    out_indices = model_args.pop('out_indices', (0,) if cls is TokenMapViT else (0, 1, 2, 3))
    return build_model_with_cfg(cls, variant, pretrained,
                                feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **model_args)


@register_model
def deit_tiny_irmb(pretrained: bool = False, **kwargs: Any) -> TokenMapViT:
    return _create('deit_tiny_irmb', pretrained, **kwargs)


@register_model
def deit_tiny_i2rmb(pretrained: bool = False, **kwargs: Any) -> TokenMapViT:
    return _create('deit_tiny_i2rmb', pretrained, **kwargs)


@register_model
def pvt_tiny(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    return _create('pvt_tiny', pretrained, **kwargs)


@register_model
def pvt_tiny_irmb(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    return _create('pvt_tiny_irmb', pretrained, **kwargs)


@register_model
def pvt_tiny_i2rmb(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    return _create('pvt_tiny_i2rmb', pretrained, **kwargs)
