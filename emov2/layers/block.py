"""The i2RMB (EMOv2) / iRMB (EMO): one inverted residual block for 1, 2 or 3 spatial axes.

A Meta Mobile Block ``Y = X + MLP_s(F(MLP_e(X)))`` (spec section 1) with ``F = DW ∘ attention``
(spec section 2)::

    s = x
    x = norm(x)                         # BN or channel LayerNorm; modulated by c when conditioned
    x = op(x)                           # C_in -> C_mid: pointwise conv + act, or spanning window attention
    x = x + dw(x) if residual else dw(x)
    x = gate * proj(x)                  # LayerScale, or the adaLN-Zero gate of c when conditioned
    x = s + drop_path(x) if residual else x

The other instances of the Meta Mobile Block are configurations of the same class: ``mixer='conv',
dw_type='none'`` is the Transformer FFN, ``mixer='attention'`` with one window over the whole map,
``exp_ratio=1`` and ``dw_type='none'`` is multi-head self-attention. The conv and norm types follow
``spatial_dims`` (sequences, images, videos); ``cond_dim`` adds DiT-style conditioning.
"""
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from timm.layers import DropPath, SEModule

from .. import kernels
from .basic import ConvNormAct, DeformConvNormAct, LayerNormChannels, LayerScale, conv_nd, norm_nd
from .conditioning import Modulation, modulate
from .fused import (DeployOptions, DerivedParams, FusedConv2d, compiling, float32_kernels_apply,
                    fold_norm_into_next_conv)
from .window_attention import PARTITIONS, SpanningWindowAttention

__all__ = ['PointwiseMixer', 'ImprovedInvertedResidualMobileBlock']


class PointwiseMixer(nn.Module):
    """The "conv" operator: 1x1 conv with bias, then the stage activation (MLP_e, no attention)."""

    def __init__(self, dim: int, dim_out: int, act_layer: type = nn.SiLU, spatial_dims: int = 2) -> None:
        super().__init__()
        self.conv = conv_nd(spatial_dims)(dim, dim_out, 1, bias=True)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))

    def deploy_form(self, options: DeployOptions) -> nn.Module:
        """Conv and activation as one :class:`FusedConv2d` (2D, oneDNN)."""
        if options.onednn and FusedConv2d.can_fuse(self.conv, self.act):
            return FusedConv2d(self.conv, self.act, options.compiled_kernels)
        return self


class ImprovedInvertedResidualMobileBlock(nn.Module):
    """i2RMB: ``x + LS * proj(DW(Attn(norm(x))))`` over 1, 2 or 3 spatial axes, optionally conditioned.

    ``mixer`` is the operator before the depthwise conv: ``'conv'`` (pointwise conv + act),
    ``'attention'`` (spanning window attention whose value projection is the expansion MLP_e) or
    ``'identity'`` (EMOv1 stem block). Downsampling blocks (``stride=2``) have no residuals.
    Ablation switches of the paper: ``operator_order`` puts the DW conv before attention,
    ``operator_fusion='parallel'`` runs attention and DW conv side by side on half the
    expanded channels each, ``dw_type`` picks a plain, deformable (DCNv2, 2D) or no DW conv.
    ``window_size`` is an int or one int per spatial axis. With ``cond_dim``, ``forward(x, c)``
    takes ``c`` of shape ``(B, cond_dim)`` (see :class:`~emov2.layers.conditioning.Modulation`),
    whose gate replaces LayerScale; the block then starts as the identity.
    """
    # set by deploy_form (TorchScript constants, so the scripted graph keeps one branch)
    fused_output: torch.jit.Final[bool]
    fused_dw_skip: torch.jit.Final[bool]
    fused_block: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            dim_out: int,
            exp_ratio: float = 4.0,
            stride: int = 1,
            residual: bool = True,
            norm: str = 'bn',
            act_layer: type = nn.SiLU,
            mixer: str = 'conv',
            dim_head: int = 32,
            window_size: Union[int, Sequence[int]] = 7,
            partitions: Sequence[str] = PARTITIONS,
            attention_position: str = 'post',
            dw_kernel: int = 5,
            dw_dilation: int = 1,
            dw_type: str = 'conv',
            operator_order: str = 'attention_first',
            operator_fusion: str = 'cascade',
            squeeze_excite: bool = False,
            layer_scale: bool = True,
            drop_path: float = 0.0,
            spatial_dims: int = 2,
            cond_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if mixer not in ('conv', 'attention', 'identity'):
            raise ValueError(f"mixer must be 'conv', 'attention' or 'identity', got {mixer!r}")
        if operator_order not in ('attention_first', 'conv_first'):
            raise ValueError(f"operator_order must be 'attention_first' or 'conv_first', got {operator_order!r}")
        if operator_fusion not in ('cascade', 'parallel'):
            raise ValueError(f"operator_fusion must be 'cascade' or 'parallel', got {operator_fusion!r}")
        if dw_type not in ('conv', 'deform', 'none'):
            raise ValueError(f"dw_type must be 'conv', 'deform' or 'none', got {dw_type!r}")
        if spatial_dims != 2 and (dw_type == 'deform' or squeeze_excite):
            raise ValueError('the deformable DW conv and squeeze-excite exist for 2D blocks only')
        if residual and (stride != 1 or dim != dim_out):
            raise ValueError(f'a residual block keeps shape: got stride {stride}, dim {dim} -> {dim_out}')
        dim_mid = int(dim * exp_ratio)
        attention = mixer == 'attention'
        self.dim, self.dim_mid, self.dim_out, self.stride = dim, dim_mid, dim_out, stride
        self.has_attention = attention
        self.residual = residual
        self.parallel = attention and operator_fusion == 'parallel'
        self.conv_first = attention and operator_order == 'conv_first' and not self.parallel
        self.has_dw = dw_type != 'none' or stride > 1  # a downsampling block always keeps its DW conv
        if self.parallel:
            dim_attn = dim_mid // 2
            dim_dw = dim_mid - dim_attn
        else:
            dim_attn = dim_mid
            dim_dw = dim if self.conv_first else dim_mid

        self.norm = norm_nd(norm, dim, spatial_dims)
        if attention:
            self.mixer = SpanningWindowAttention(
                dim, dim_attn, dim_head=dim_head, window_size=window_size, partitions=partitions,
                value_position=attention_position, act_layer=act_layer, spatial_dims=spatial_dims)
        elif mixer == 'conv':
            self.mixer = PointwiseMixer(dim, dim_mid, act_layer, spatial_dims)
        else:
            if dim_mid != dim:
                raise ValueError('an identity mixer needs exp_ratio 1')
            self.mixer = nn.Identity()
        self.conv_branch = PointwiseMixer(dim, dim_dw, act_layer, spatial_dims) if self.parallel else nn.Identity()
        if not self.has_dw:
            self.dw = nn.Identity()
        elif dw_type == 'deform':
            self.dw = DeformConvNormAct(dim_dw, dw_kernel, stride, dw_dilation, act_layer=nn.SiLU)
        else:
            self.dw = ConvNormAct(dim_dw, dim_dw, dw_kernel, stride, dw_dilation, groups=dim_dw, act_layer=nn.SiLU,
                                  spatial_dims=spatial_dims)
        self.se = SEModule(dim_dw, rd_ratio=1.0, act_layer=nn.SiLU) if squeeze_excite else nn.Identity()
        self.proj = conv_nd(spatial_dims)(dim_mid, dim_out, 1, bias=False)
        self.modulation = Modulation(cond_dim, dim, dim_out) if cond_dim else None
        self.layer_scale = LayerScale(dim_out) if layer_scale and not cond_dim else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fused_output = False
        self.fused_dw_skip = False
        self.fused_block = False
        self._block_params = DerivedParams()  # the block kernels' arguments

    def local(self, x: Tensor) -> Tensor:
        """The depthwise conv (with its inner skip in non-downsampling blocks)."""
        if not self.has_dw:
            return x
        if self.fused_dw_skip:  # deployed: DW conv, its act and the inner skip in one kernel
            return self.dw(x, x)
        y = self.se(self.dw(x))
        return x + y if self.residual else y

    def operator(self, x: Tensor) -> Tensor:
        """F(MLP_e(x)) of the Meta Mobile Block: attention/conv mixer and DW conv, C_in -> C_mid."""
        if self.parallel:
            return torch.cat([self.mixer(x), self.local(self.conv_branch(x))], dim=1)
        if self.conv_first:
            return self.mixer(self.local(x))
        return self.local(self.mixer(x))

    def forward(self, x: Tensor, c: Optional[Tensor] = None) -> Tensor:
        if self.fused_block and not torch.jit.is_scripting() and c is None:
            y = self._block_kernel(x)
            if y is not None:
                return y
        shortcut = x
        x = self.norm(x)
        gate: Optional[Tensor] = None
        if self.modulation is not None:
            if c is None:
                raise ValueError('this block was built with cond_dim: pass the conditioning c')
            shift, scale, gate = self.modulation(c, x.dim() - 2)
            x = modulate(x, shift, scale)
        elif c is not None:
            raise ValueError('a conditioning c was passed to a block built without cond_dim')
        x = self.operator(x)
        if self.fused_output:  # deployed: LayerScale folded into proj, the residual added by its kernel
            if self.residual:
                return self.proj(x, shortcut)
            return self.proj(x)
        x = self.layer_scale(self.proj(x))
        if gate is not None:
            x = x * gate
        if self.residual:
            return shortcut + self.drop_path(x)
        return x

    def fold_norm_into_mixer(self) -> None:
        """An eval-mode BatchNorm before the pointwise expansion becomes part of that conv (exact)."""
        if isinstance(self.norm, _BatchNorm) and isinstance(self.mixer, PointwiseMixer) and self.modulation is None:
            self.mixer.conv = fold_norm_into_next_conv(self.norm, self.mixer.conv)
            self.norm = nn.Identity()

    def deploy_form(self, options: DeployOptions) -> nn.Module:
        """Norm folded into the expansion, LayerScale into ``proj``; with oneDNN, ``proj`` adds the
        residual and the DW conv its inner skip inside their conv kernels; with the compiled kernels a block
        without attention runs in :func:`emov2.kernels.mobile_block_f32` (float32 CPU inference; the per-conv
        forms stay for everything else). Children follow in the walk."""
        self.fold_norm_into_mixer()
        self.drop_path = nn.Identity()  # identity in eval mode anyway
        if isinstance(self.layer_scale, LayerScale):
            gamma = self.layer_scale.gamma.detach()
            shape = [-1] + [1] * (self.proj.weight.dim() - 1)
            self.proj.weight = nn.Parameter(self.proj.weight.detach() * gamma.view(shape))
            self.layer_scale = nn.Identity()
        if not options.onednn or self.modulation is not None:
            return self
        self.fused_block = options.compiled_kernels and self._fits_block_kernel()
        if FusedConv2d.can_fuse(self.proj, nn.Identity()):
            self.proj = FusedConv2d(self.proj, nn.Identity(), options.compiled_kernels)
            self.fused_output = True
        if self.residual and isinstance(self.dw, ConvNormAct) and isinstance(self.se, nn.Identity):
            self.dw = self.dw.deploy_form(options)
            self.fused_dw_skip = isinstance(self.dw, FusedConv2d)
        return self

    def _fits_block_kernel(self) -> bool:
        """Whether a block kernel computes this block (asked before the convs become :class:`FusedConv2d`): a 2D
        block after no norm or a channel LayerNorm, a plain depthwise conv (k 3/5/7) and a 1x1 projection, with a
        1x1-conv mixer (:func:`emov2.kernels.mobile_block_f32`, stride 1 or 2) or, at stride 1, spanning window
        attention on the expanded values (:func:`emov2.kernels.attention_block_f32`); no squeeze-excite,
        conditioning, parallel or conv-first operators."""
        dw = self.dw
        if not (isinstance(dw, ConvNormAct) and isinstance(dw.norm, (_BatchNorm, nn.Identity))
                and FusedConv2d.can_fuse(dw.conv, dw.act) and type(self.proj) is nn.Conv2d):
            return False
        conv, k = dw.conv, dw.conv.kernel_size[0]
        if not (self.modulation is None and isinstance(self.se, nn.Identity)
                and isinstance(self.norm, (nn.Identity, LayerNormChannels))
                and conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size == (k, k)
                and k in (3, 5, 7) and conv.stride in ((1, 1), (2, 2)) and conv.dilation == (1, 1)
                and conv.padding == (k // 2, k // 2) and self.proj.kernel_size == (1, 1)):
            return False
        mixer = self.mixer
        if isinstance(mixer, PointwiseMixer):
            return FusedConv2d.can_fuse(mixer.conv, mixer.act) and mixer.conv.kernel_size == (1, 1)
        return (isinstance(mixer, SpanningWindowAttention) and not (self.parallel or self.conv_first)
                and mixer.value_position == 'post' and len(mixer.window_size) == 2 and conv.stride == (1, 1)
                and FusedConv2d.can_fuse(mixer.qk, nn.Identity()) and FusedConv2d.can_fuse(mixer.v, mixer.act)
                and mixer.qk.kernel_size == (1, 1) and mixer.v.kernel_size == (1, 1) and mixer.v.groups == 1)

    @torch.jit.unused
    def _block_kernel(self, x: Tensor) -> Optional[Tensor]:
        """The deployed block in one kernel call (float32 CPU inference); None where it does not apply. Without
        attention, :func:`emov2.kernels.mobile_block_f32` (the expanded map never written to memory); with it,
        :func:`emov2.kernels.attention_block_f32` on maps whose sides are multiples of the window."""
        if not float32_kernels_apply(x):
            return None
        args = self._block_kernel_args()
        if not args:
            return None
        if not self.has_attention:
            return kernels.mobile_block_f32(x, *args)
        window = self._modules['mixer'].window_size
        if x.shape[2] % window[0] or x.shape[3] % window[1]:
            return None  # padded windows: the per-op path pads and crops
        return kernels.attention_block_f32(x, *args)

    @torch.jit.unused
    def _block_kernel_args(self) -> List[Any]:
        """The block kernel's arguments after the input (matrices, packed depthwise weight, settings), or [] where
        these modules do not fit it: made once per parameter version, so that a batch-1 call spends ~18 µs of
        Python instead of ~65 (EMOv2-1M); under torch.compile made in the graph (inductor's freezing folds the
        matrices)."""
        modules = self._modules
        mixer, dw, proj, norm = modules['mixer'], modules['dw'], modules['proj'], modules['norm']
        convs = [mixer.qk, mixer.v] if self.has_attention else [mixer]
        if compiling():
            return self._make_block_kernel_args(convs)
        sources: List[Optional[Tensor]] = []
        for m in convs + [dw, proj, norm]:  # parameter dicts: no nn.Module.__getattr__ on the per-call path
            params = m._parameters
            sources += [params.get('weight'), params.get('bias')]
        return self._block_params.get(sources, lambda: self._make_block_kernel_args(convs))

    @torch.jit.unused
    def _make_block_kernel_args(self, convs: List[nn.Module]) -> List[Any]:
        mixer, dw, proj = self.mixer, self.dw, self.proj
        if not (all(isinstance(m, FusedConv2d) for m in convs + [dw, proj])
                and dw.attr in ('swish', 'none') and dw.out_channels >= kernels.depthwise_f32_lanes()
                and all(m.weight.dtype == torch.float32 for m in convs + [dw, proj])):
            return []
        eps = self.norm.eps if isinstance(self.norm, LayerNormChannels) else None
        w_dw, b_dw = dw._packed_f32(kernels.pack_depthwise_weight_f32)
        matrices = self._matrices(convs)
        if not self.has_attention:
            w_exp, b_exp, w_proj = matrices
            return [w_exp, b_exp, mixer.attr, w_dw, b_dw, dw.kernel_size, dw.stride[0], dw.attr == 'swish',
                    self.residual, w_proj, proj.bias, self.residual, eps]
        w_qk, b_qk, w_v, b_v, w_proj = matrices
        scale = mixer.scale if mixer.scale is not None else (mixer.qk.out_channels // 2 // mixer.num_heads) ** -0.5
        return [w_qk, b_qk, w_v, b_v, mixer.v.attr, mixer.window_size, mixer.num_heads, mixer.partitions, scale,
                w_dw, b_dw, dw.kernel_size, dw.attr == 'swish', self.residual, w_proj, proj.bias, self.residual, eps]

    @torch.jit.unused
    def _matrices(self, convs: List[nn.Module]) -> List[Tensor]:
        out: List[Tensor] = []
        for conv in convs:
            w = conv.weight.flatten(1)
            b = conv.bias if conv.bias is not None else w.new_zeros(w.shape[0])
            if isinstance(self.norm, LayerNormChannels):
                b = b + w @ self.norm.bias
                w = w * self.norm.weight
            out += [w.t().contiguous(), b.contiguous()]  # input-major, as the block kernels read them
        return out + [self.proj.weight.flatten(1).t().contiguous()]
