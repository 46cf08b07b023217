"""Inference-optimised EMO models: same outputs, fewer ops, channels-last memory.

:func:`deploy` returns an eval-mode copy in which

* every BatchNorm that follows a conv is folded into that conv (stems, DW convs);
* the BatchNorm before a block's pointwise expansion (stages 1-2) is folded into the expansion;
* LayerScale is folded into the output projection, the attention scale ``dim_head**-0.5`` into
  the query projection; on a map that is a single window (stage 4 at 224 px) the neighbour and
  distant partitions coincide and are computed once;
* the stem's last 1x1 conv and the first block's expansion merge into one 1x1 conv (two linear
  maps in a row at the largest resolution), so the deployed stem output is not the spec's stage 0;
* weights and activations are channels-last, so 1x1 convs run as GEMMs, depthwise convs use the
  NHWC kernels, and window partitions are gathers over contiguous channel vectors;
* on CPU, inference runs stem and stages over batch slices sized to the last-level cache (the early,
  large maps are memory-bound; a whole batch of them does not fit any cache);
* on CPU, each conv runs with its activation or its residual add in one oneDNN kernel
  (``torch.ops.mkldnn._convolution_pointwise``, the kernels torch.compile uses), falling back to
  separate ops where that kernel is missing or the dtype/device is not supported;
* 2D window attention runs in one compiled kernel (:mod:`emov2.kernels`: no window gathers, no
  score tensors, both partitions written straight into the output map), where it builds;
* under bf16 autocast, stride-1 depthwise convs run with their SiLU and the block's inner skip in
  one compiled kernel that multiplies in bf16 pairs, on CPUs with AVX512-BF16 (oneDNN's bf16
  depthwise kernels are no faster than its float32 ones there).

The training-graph model (what :func:`emov2.create_model` returns) stays the plain reference.
"""
import copy
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from . import kernels
from .layers.basic import ConvNormAct, LayerScale, cpu_autocast_bf16
from .layers.window_attention import SpanningWindowAttention
from .models.emo import EMO, ImprovedInvertedResidualMobileBlock, PointwiseMixer

__all__ = ['deploy', 'to_channels_last', 'fold_norm_into_next_conv', 'FusedConv2d', 'DeployedBlock']

_ONEDNN_ACTS = {nn.Identity: ('none', ''), nn.SiLU: ('swish', ''), nn.GELU: ('gelu', 'none')}


def onednn_fusion_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_convolution_pointwise')


@torch.jit.unused
def _compiling() -> bool:
    return torch.compiler.is_compiling()


class FusedConv2d(nn.Module):
    """``act(conv(x))`` or ``conv(x) + residual`` as one oneDNN kernel on CPU (float32/bfloat16)."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        if type(act) not in _ONEDNN_ACTS or (isinstance(act, nn.GELU) and act.approximate != 'none'):
            raise ValueError(f'cannot fuse activation {act}')
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride: List[int] = list(conv.stride)
        self.padding: List[int] = list(conv.padding)
        self.dilation: List[int] = list(conv.dilation)
        self.groups = conv.groups
        self.attr, self.algorithm = _ONEDNN_ACTS[type(act)]
        self.act = act
        self.use_onednn = onednn_fusion_available()
        k = conv.kernel_size[0]
        self.kernel_size = k
        # set by deploy: bf16 stride-1 depthwise convs run in emov2.kernels (bf16 pair products) where it builds
        self.bf16_depthwise_kernel = False
        self.is_plain_depthwise = (conv.groups == conv.in_channels == conv.out_channels and
                                   conv.kernel_size == (k, k) and k in (3, 5, 7) and self.stride == [1, 1] and
                                   self.dilation == [1, 1] and self.padding == [k // 2] * 2 and
                                   self.attr in ('swish', 'none'))
        self._cast_key: Tuple[int, int] = (-1, -1)
        self._cast_params: List[Tensor] = []
        self._pack_key: Tuple[int, int] = (-1, -1)
        self._packed: List[Tensor] = []

    def _fusable(self, x: Tensor) -> bool:
        if not torch.jit.is_scripting() and _compiling():  # inductor fuses plain convs itself
            return False
        return self.use_onednn and x.device.type == 'cpu' and not x.requires_grad and \
            not self.weight.requires_grad and (x.dtype == torch.float32 or x.dtype == torch.bfloat16)

    @torch.jit.unused
    def _bfloat16_params(self) -> Tuple[Tensor, Optional[Tensor]]:
        """bfloat16 copies of weight and bias, made once per weight version (autocast does not cache
        casts of frozen weights, so a deployed model would otherwise re-cast every conv on every call)."""
        key = (self.weight.data_ptr(), self.weight._version)
        if key != self._cast_key:
            self._cast_params = [self.weight.to(torch.bfloat16)] + \
                ([] if self.bias is None else [self.bias.to(torch.bfloat16)])
            self._cast_key = key
        return self._cast_params[0], self._cast_params[1] if self.bias is not None else None

    @torch.jit.unused
    def _depthwise_bf16(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        """The conv, its SiLU and the residual add in emov2.kernels' bf16-pair depthwise kernel."""
        key = (self.weight.data_ptr(), self.weight._version)
        if key != self._pack_key:
            bias = self.bias.float() if self.bias is not None else self.weight.new_zeros(self.weight.shape[0]).float()
            self._packed = [kernels.pack_depthwise_weight(self.weight.detach()), bias.detach()]
            self._pack_key = key
        return kernels.depthwise_conv_bf16(x, self._packed[0], self._packed[1], self.kernel_size,
                                           self.attr == 'swish', residual)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if not self._fusable(x):
            y = self.act(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups))
            return y if residual is None else residual + y
        weight, bias = self.weight, self.bias
        if not torch.jit.is_scripting() and cpu_autocast_bf16():
            # oneDNN ops are not autocast-aware: cast like autocast would cast a conv
            x = x.to(torch.bfloat16)
            residual = residual.to(torch.bfloat16) if residual is not None else None
            if self.bf16_depthwise_kernel and kernels.depthwise_bf16_available():
                return self._depthwise_bf16(x, residual)
            weight, bias = self._bfloat16_params()
        elif x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        if residual is not None and self.attr == 'none':
            return torch.ops.mkldnn._convolution_pointwise(
                x, residual.to(x.dtype), weight, bias, self.padding, self.stride, self.dilation, self.groups,
                'add', None, None, [], None)
        y = torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, self.padding, self.stride, self.dilation, self.groups, self.attr, [], self.algorithm)
        return y if residual is None else y.add_(residual)  # y is a fresh tensor


class DeployedBlock(ImprovedInvertedResidualMobileBlock):
    """The i2RMB after :func:`deploy`: LayerScale folded away, output projection fused with the residual."""

    def local(self, x: Tensor) -> Tensor:
        if not self.has_dw:
            return x
        if self.residual and isinstance(self.se, nn.Identity) and isinstance(self.dw, ConvNormAct) and \
                isinstance(self.dw.conv, FusedConv2d):
            return self.dw.conv(x, x)  # DW conv, its act and the inner skip in one kernel where one exists
        y = self.se(self.dw(x))
        if self.residual:
            y += x  # the DW output is a fresh tensor: add the inner skip in place
        return y

    def forward(self, x: Tensor) -> Tensor:
        y = self.operator(self.norm(x))
        return self.proj(y, x if self.residual else None)



def fold_norm_into_next_conv(norm: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """``conv(norm(x))`` as one conv, for a 1x1 ``conv`` (no padding) after an eval-mode BatchNorm."""
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        raise ValueError('only a dense 1x1 conv can absorb the BatchNorm before it')
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    fused = copy.deepcopy(conv)
    w = conv.weight.flatten(1)
    fused.weight = nn.Parameter((w * scale).view_as(conv.weight))
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=w.dtype, device=w.device)
    fused.bias = nn.Parameter(bias + w @ shift)
    return fused


def _fold_conv_norm(m: ConvNormAct) -> None:
    if isinstance(m.norm, nn.BatchNorm2d) and isinstance(m.conv, nn.Conv2d):
        m.conv = fuse_conv_bn_eval(m.conv, m.norm)
        m.norm = nn.Identity()


def _fold_block(block: ImprovedInvertedResidualMobileBlock) -> None:
    if isinstance(block.norm, nn.BatchNorm2d) and isinstance(block.mixer, PointwiseMixer):
        block.mixer.conv = fold_norm_into_next_conv(block.norm, block.mixer.conv)
        block.norm = nn.Identity()
    block.drop_path = nn.Identity()  # identity in eval mode anyway
    if isinstance(block.layer_scale, LayerScale):
        gamma = block.layer_scale.gamma.detach()
        block.proj.weight = nn.Parameter(block.proj.weight.detach() * gamma.view(-1, 1, 1, 1))
        block.layer_scale = nn.Identity()


def _fold_attention_scale(attn: SpanningWindowAttention) -> None:
    if attn.scale is not None:
        return
    dim = attn.qk.out_channels // 2
    scale = (dim // attn.num_heads) ** -0.5
    with torch.no_grad():
        attn.qk.weight[:dim] *= scale
        if attn.qk.bias is not None:
            attn.qk.bias[:dim] *= scale
    attn.scale = 1.0
    attn.skip_duplicate_partitions = True


def _cache_budget() -> int:
    """Bytes of activations per stage slice: 60% of the largest CPU cache (16 MiB if unknown)."""
    sizes = []
    for f in Path('/sys/devices/system/cpu/cpu0/cache').glob('index*/size'):
        text = f.read_text().strip().upper()
        mult = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip('KMG')) * mult)
        except ValueError:
            continue
    return int(0.6 * max(sizes)) if sizes else 16 << 20


def _fuse_activations(model: nn.Module, compiled_kernels: bool) -> None:
    """Give every (conv, activation) pair and every block projection a FusedConv2d; switch 2D window
    attention and bf16 depthwise convs to the compiled kernels where ``compiled_kernels`` and they build."""
    for m in list(model.modules()):
        if isinstance(m, ConvNormAct) and isinstance(m.conv, nn.Conv2d) and isinstance(m.norm, nn.Identity):
            m.conv, m.act = FusedConv2d(m.conv, m.act), nn.Identity()
            m.conv.bf16_depthwise_kernel = compiled_kernels and m.conv.is_plain_depthwise
            m.depthwise = False  # inference: bf16 depthwise forward is as fast as fp32, so skip the casts around it
        elif isinstance(m, PointwiseMixer):
            m.conv, m.act = FusedConv2d(m.conv, m.act), nn.Identity()
        elif isinstance(m, SpanningWindowAttention) and type(m.act) in _ONEDNN_ACTS:
            m.qk = FusedConv2d(m.qk, nn.Identity())
            m.v, m.act = FusedConv2d(m.v, m.act), nn.Identity()
            m.fused_kernel = compiled_kernels and len(m.window_size) == 2 and kernels.available()
        elif isinstance(m, ImprovedInvertedResidualMobileBlock) and isinstance(m.layer_scale, nn.Identity):
            m.proj = FusedConv2d(m.proj, nn.Identity())
            m.__class__ = DeployedBlock


def _merge_stem_into_first_block(model: EMO) -> None:
    """stem 1x1 conv (no norm/act) then the first block's BN-folded 1x1 expansion -> one 1x1 conv."""
    last, first = model.stem[-1], model.stages[0][0]
    if not (isinstance(last, ConvNormAct) and isinstance(last.norm, nn.Identity) and
            isinstance(last.act, nn.Identity) and last.conv.kernel_size == (1, 1) and last.conv.groups == 1 and
            isinstance(first.norm, nn.Identity) and isinstance(first.mixer, PointwiseMixer)):
        return
    outer, inner = first.mixer.conv, last.conv
    merged = copy.deepcopy(outer)
    merged.in_channels = inner.in_channels
    merged.weight = nn.Parameter((outer.weight.flatten(1) @ inner.weight.flatten(1))[:, :, None, None])
    bias = outer.bias if outer.bias is not None else torch.zeros(outer.out_channels)
    if inner.bias is not None:
        bias = bias + outer.weight.flatten(1) @ inner.bias
    merged.bias = nn.Parameter(bias)
    first.mixer.conv = merged
    model.stem[-1] = nn.Identity()


def to_channels_last(model: EMO) -> EMO:
    """Make ``model`` keep weights and activations channels-last (in place; also for training)."""
    model = model.to(memory_format=torch.channels_last)
    model.channels_last = True
    return model


@torch.no_grad()
def deploy(model: EMO, channels_last: bool = True, fuse: bool = True,
           micro_batch_bytes: Optional[int] = None, compiled_kernels: bool = True) -> EMO:
    """An inference copy of ``model``: folded norms and scales, merged stem, channels-last, fused kernels.

    ``fuse=False`` keeps plain PyTorch ops only (for exporters that do not know oneDNN ops).
    ``compiled_kernels`` (with ``fuse``) runs 2D window attention and bf16 depthwise convs in
    :mod:`emov2.kernels`' compiled kernels, built on first use (falls back to PyTorch/oneDNN ops where
    they cannot be built).
    ``micro_batch_bytes`` sizes the batch slices each stage runs on (default: from the CPU's last-level
    cache; 0 runs whole batches).
    """
    if not isinstance(model, EMO):
        raise TypeError(f'deploy expects an EMO model, got {type(model).__name__}')
    model = copy.deepcopy(model).eval()
    for m in list(model.modules()):
        if isinstance(m, ConvNormAct):
            _fold_conv_norm(m)
        elif isinstance(m, ImprovedInvertedResidualMobileBlock):
            _fold_block(m)
        elif isinstance(m, SpanningWindowAttention):
            _fold_attention_scale(m)
    _merge_stem_into_first_block(model)
    if fuse:
        _fuse_activations(model, compiled_kernels)
    if channels_last:
        model = to_channels_last(model)
    model.micro_batch_bytes = int(micro_batch_bytes if micro_batch_bytes is not None else _cache_budget())
    for p in model.parameters():
        p.requires_grad_(False)
    return model

