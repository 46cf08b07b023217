"""V-EMO: EMOv2 over time for video classification (EMOv2 paper, Table XIII; spec section 7).

Every 2D op of :class:`~emov2.models.emo.EMO` becomes its 3D version: the stem is the EMOv2 stem
with Conv3d/BatchNorm3d, the four stages are the shared i2RMB of :mod:`emov2.layers.block` built with
``spatial_dims=3`` (BatchNorm3d / LayerNorm over channels, 3D depthwise convs, spanning window
attention over ``t x h x w`` windows of ``2 x 5 x 5``), then a channel LayerNorm, a global average
over ``t, h, w``, dropout 0.5 and a linear head (400 Kinetics classes by default). Inputs are clips
``(B, C, T, H, W)``.

Temporal kernels and strides (the paper does not state them; chosen to meet its 5.9M params and
1.3 GFLOPs at 4 x 160 x 160, measured with fvcore as the package counts FLOPs):

* **every conv keeps its 2D kernel size along time** (the plain ``Conv3d(k)`` inflation of every 2D
  op): stem 3x3x3, depthwise convs 5x5x5. The 5x5x5 depthwise kernels are what bring the parameter
  count from 4.95M (2D EMOv2-5M, 400-class head) to 5.98M (paper: 5.9M, +1.4%); temporal kernel 3
  would give 5.47M (-7%, 1.22G).
* **the stem halves time** (stride 2x2x2, a "tubelet" of 2 frames as in UniFormer/MViT), and **the
  stages keep it** (downsampling blocks stride 1x2x2): 4 frames become 2 and stay 2, exactly the
  temporal extent of the 2x5x5 attention windows (at 160 px the stage-4 map is 2x5x5, one window).
  That gives 1.363 GMACs (paper: 1.3G, +4.8%). Temporal stride 1 everywhere gives 2.73G (+110%);
  stride 2 in every downsampling block too (cubic strides) leaves one frame from stage 1 on, where
  the 2-frame windows attend half over zero padding, at 0.94G (-28%).

The non-cubic kernel/stride (temporal stride 1 in a block's depthwise conv, spatial stride 2) is set
on the block's :class:`~emov2.layers.ConvNormAct` after it is built (:func:`set_temporal`), since the
shared block takes one int kernel/stride for every axis.

**Inflation** (:func:`checkpoint_filter_fn`, used by the one loader
``emov2.load_checkpoint(v_model, path_of_2d_checkpoint)``): official 2D keys are converted by
:func:`emov2.models.emo.checkpoint_filter_fn`; then every 2D conv kernel ``W`` (``O, I, kh, kw``)
becomes a 3D kernel (``O, I, kt, kh, kw``) by the model's ``inflation`` rule:

* ``'repeat'`` (default; the spec's "2D weights repeated along time", as in I3D): ``W / kt`` at
  every temporal tap. On a clip of one repeated frame a conv then reproduces the 2D response on
  every frame that sees all ``kt`` taps (not on frames whose taps reach into the temporal zero
  padding; with 2 frames and kernel 5 every frame does, so the whole network is not exact);
* ``'centre'``: ``W`` at the centre tap and zeros elsewhere. Every conv then reproduces the 2D conv
  on every frame of a repeated-frame clip, attention over ``2 x 5 x 5`` windows of identical frames
  equals 2D attention over ``5 x 5`` windows (each key appears twice with the same value), and the
  average over time is the 2D average: the inflated model's logits equal the 2D model's (window 5,
  same head) exactly, up to float rounding.

Norms, LayerScale, attention projections (1x1 -> 1x1x1) and the head are copied. A 3D checkpoint
(ours) passes unchanged; the head follows the loader's policy (re-initialised for other class counts).
"""

from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from timm.layers import register_notrace_function
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from ..layers import ConvNormAct, DeployOptions, ImprovedInvertedResidualMobileBlock, LayerNormChannels
from ..layers.basic import spec_padding
from . import emo as _emo
from .emo import ATTENTION_MODES, EMO_CONFIGS, ClassifierInterface, build_stages

__all__ = ['VEMO', 'ChannelsFirstConv3d', 'VEMO_CONFIGS', 'checkpoint_filter_fn', 'inflate_state_dict', 'set_temporal', 'INFLATIONS']

INFLATIONS = ('repeat', 'centre')
MIN_INPUT_SIZE = 32


class ChannelsFirstConv3d(nn.Conv3d):
    """A Conv3d that runs on channels-first input. On CPU, the backward pass of a strided depthwise
    3D conv over channels-last-3d input (what an attention stage hands the next downsampling block)
    is pathologically slow in ATen/oneDNN: 9.4 s vs 0.19 s for 288 channels, 4x8x8, kernel 5x5x5,
    stride 1x2x2, batch 8 on 2 AVX2 cores. One copy of the input avoids it; outputs are unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x.contiguous(), self.weight, self.bias)


def set_temporal(cna: ConvNormAct, kernel: int, stride: int) -> ConvNormAct:
    """Give a 3D :class:`ConvNormAct` another temporal kernel/stride (spatial ones kept), in place;
    strided convs become :class:`ChannelsFirstConv3d`."""
    old = cna.conv
    if not isinstance(old, nn.Conv3d):
        raise TypeError(f'expected a Conv3d, got {type(old).__name__}')
    k, s, d = old.kernel_size, old.stride, old.dilation
    conv_cls = ChannelsFirstConv3d if max(stride, s[1], s[2]) > 1 else nn.Conv3d
    new = conv_cls(old.in_channels, old.out_channels, (kernel, k[1], k[2]), (stride, s[1], s[2]),
                    (spec_padding(kernel, stride), old.padding[1], old.padding[2]), dilation=(1, d[1], d[2]),
                    groups=old.groups, bias=old.bias is not None)
    cna.conv = new
    return cna


def stem_v2_3d(in_chans: int, dim: int, temporal_kernel: int = 3, temporal_stride: int = 2) -> nn.Sequential:
    """The EMOv2 stem in 3D: 3x3x3/s(t,2,2) conv + BN + SiLU, 3x3x3 DW conv + BN + SiLU, 1x1x1 conv."""
    return nn.Sequential(
        set_temporal(ConvNormAct(in_chans, dim, 3, stride=2, bias=True, act_layer=nn.SiLU, spatial_dims=3),
                     temporal_kernel, temporal_stride),
        set_temporal(ConvNormAct(dim, dim, 3, groups=dim, act_layer=nn.SiLU, spatial_dims=3), temporal_kernel, 1),
        ConvNormAct(dim, dim, 1, norm='none', spatial_dims=3),
    )


@register_notrace_function
def check_video_input(x: Tensor, in_chans: int, min_size: int = MIN_INPUT_SIZE) -> None:
    """Reject inputs that are not ``(B, C, T, H, W)`` clips the model can take, saying what it expects."""
    if x.dim() != 5:
        hint = ' (a single image? add a time axis: x.unsqueeze(2))' if x.dim() == 4 else ''
        raise ValueError(f'expected a (B, C, T, H, W) clip, got {x.dim()} dims of shape {list(x.shape)}{hint}')
    if x.shape[1] != in_chans:
        raise ValueError(f'expected {in_chans} input channels on axis 1 of (B, C, T, H, W), got {x.shape[1]} '
                         f'(shape {list(x.shape)}; frames first? use x.transpose(1, 2))')
    if x.shape[2] < 1:
        raise ValueError(f'expected at least one frame, got shape {list(x.shape)}')
    if x.shape[3] < min_size or x.shape[4] < min_size:
        raise ValueError(f'expected frames of at least {min_size}x{min_size} px, got {x.shape[3]}x{x.shape[4]}')


torch.fx.wrap('check_video_input')


class VEMO(ClassifierInterface, nn.Module):
    """V-EMO classifier over clips ``(B, C, T, H, W)``: 3D stem, four stages of 3D i2RMBs, LayerNorm,
    average over ``t, h, w``, dropout, linear head. Same stage layout as :class:`~emov2.models.emo.EMO`.

    ``window_size`` is ``(t, h, w)``, or one int for the spatial window with ``temporal_window``
    frames. Any number of frames works (windows pad time at the end like space); the inflation is
    exact (``inflation='centre'``) when the frames after the stem are a multiple of the temporal window.
    """

    def __init__(
            self,
            depths: Sequence[int] = (3, 3, 9, 3),
            embed_dims: Sequence[int] = (48, 72, 160, 288),
            exp_ratios: Sequence[float] = (2.0, 3.0, 4.0, 4.0),
            dim_heads: Sequence[int] = (16, 24, 32, 32),
            dw_kernels: Sequence[int] = (5, 5, 5, 5),
            dw_temporal_kernel: Optional[int] = None,
            stem_temporal_kernel: int = 3,
            stem_temporal_stride: int = 2,
            temporal_strides: Sequence[int] = (1, 1, 1, 1),
            attention: str = 'spanning',
            attention_stages: Sequence[int] = (3, 4),
            window_size: Union[int, Sequence[int]] = (2, 5, 5),
            temporal_window: int = 2,
            layer_scale: bool = True,
            inflation: str = 'repeat',
            num_classes: int = 400,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.5,
            drop_path_rate: float = 0.0,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if not (len(depths) == len(embed_dims) == len(exp_ratios) == len(dim_heads) == len(temporal_strides) == 4):
            raise ValueError('depths, embed_dims, exp_ratios, dim_heads and temporal_strides need one entry per '
                             'stage (4)')
        if attention not in ATTENTION_MODES:
            raise ValueError(f'attention must be one of {tuple(ATTENTION_MODES)}, got {attention!r}')
        if inflation not in INFLATIONS:
            raise ValueError(f'inflation must be one of {INFLATIONS}, got {inflation!r}')
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if isinstance(window_size, int):  # one int is the spatial window (emov2.create_model passes one)
            window_size = (temporal_window, window_size, window_size)
        window_size = tuple(int(w) for w in window_size)
        if len(window_size) != 3:
            raise ValueError(f'window_size is t x h x w (3 ints) or one int, got {window_size}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.inflation = inflation
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = embed_dims[-1]

        stem_dim = embed_dims[0] // 2
        self.stem = stem_v2_3d(in_chans, stem_dim, stem_temporal_kernel, stem_temporal_stride)
        def temporal(block: ImprovedInvertedResidualMobileBlock, i: int, downsample: bool) -> None:
            kt = dw_kernels[i] if dw_temporal_kernel is None else dw_temporal_kernel
            if isinstance(block.dw, ConvNormAct):
                set_temporal(block.dw, kt, temporal_strides[i] if downsample else 1)

        self.stages, self.feature_info = build_stages(
            stem_dim, depths, embed_dims, exp_ratios, dim_heads, attention, attention_stages, drop_path_rate,
            lambda i: dict(window_size=window_size, dw_kernel=dw_kernels[i], layer_scale=layer_scale,
                           spatial_dims=3), temporal)
        self.norm = LayerNormChannels(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, T, H, W)`` -> normalised stage-4 features ``(B, C4, T', H/32, W/32)``."""
        check_video_input(x, self.in_chans)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == 'avg':
            x = x.mean((2, 3, 4))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def deploy_form(self, options: DeployOptions) -> nn.Module:
        """Nothing model-level: stems, blocks and layers deploy themselves in the walk (BN folded into
        the 3D convs, LayerScale into ``proj``, the attention scale into the query projection)."""
        return self


# --- configs: the EMOv2 sizes, over time ----------------------------------------------------------
VEMO_CONFIGS: Dict[str, Dict[str, Any]] = {
    f'v_{name}': {k: v for k, v in cfg.items() if k in ('depths', 'embed_dims', 'exp_ratios', 'dim_heads')}
    for name, cfg in EMO_CONFIGS.items() if name in ('emov2_1m', 'emov2_2m', 'emov2_5m')
}


# --- inflation of 2D checkpoints ------------------------------------------------------------------
def inflate_kernel(weight: Tensor, kt: int, rule: str = 'repeat') -> Tensor:
    """A 2D conv kernel ``(O, I, kh, kw)`` as a 3D kernel ``(O, I, kt, kh, kw)`` (see the module doc)."""
    if rule == 'repeat':
        return weight.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt
    if rule == 'centre':
        out = weight.new_zeros(weight.shape[:2] + (kt,) + weight.shape[2:])
        out[:, :, kt // 2] = weight
        return out
    raise ValueError(f'inflation must be one of {INFLATIONS}, got {rule!r}')


def inflate_state_dict(state_dict: Dict[str, Tensor], model: nn.Module, rule: Optional[str] = None
                       ) -> Dict[str, Tensor]:
    """2D conv kernels where ``model`` holds 3D ones inflated along time by ``rule`` (default: the
    model's ``inflation``); every other tensor unchanged."""
    rule = rule or getattr(model, 'inflation', 'repeat')
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        ref = own.get(k)
        if ref is not None and v.dim() == 4 and ref.dim() == 5:
            v = inflate_kernel(v, ref.shape[2], rule)
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    """The loader's filter: official/our 2D EMO checkpoints (through :func:`emo.checkpoint_filter_fn`)
    inflated to ``model``'s 3D kernels; 3D (V-EMO) checkpoints pass unchanged."""
    return inflate_state_dict(_emo.checkpoint_filter_fn(state_dict, model), model)


# --- timm registration ----------------------------------------------------------------------------
def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return dict(
        url='', num_classes=400, input_size=(3, 160, 160), pool_size=(2, 5, 5), crop_pct=1.0,
        interpolation='bilinear', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv='stem.0.conv', classifier='head', min_input_size=(3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        license='apache-2.0', paper_ids='arXiv:2412.06674', **kwargs)


default_cfgs = generate_default_cfgs({f'{name}.k400': _cfg() for name in VEMO_CONFIGS})


def _create_vemo(variant: str, pretrained: bool = False, **kwargs: Any) -> VEMO:
    model_args = dict(VEMO_CONFIGS[variant])
    model_args.update({k: v for k, v in kwargs.items() if v is not None})
    return build_model_with_cfg(
        VEMO, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        **model_args,
    )


@register_model
def v_emov2_1m(pretrained: bool = False, **kwargs: Any) -> VEMO:
    return _create_vemo('v_emov2_1m', pretrained, **kwargs)


@register_model
def v_emov2_2m(pretrained: bool = False, **kwargs: Any) -> VEMO:
    return _create_vemo('v_emov2_2m', pretrained, **kwargs)


@register_model
def v_emov2_5m(pretrained: bool = False, **kwargs: Any) -> VEMO:
    return _create_vemo('v_emov2_5m', pretrained, **kwargs)
