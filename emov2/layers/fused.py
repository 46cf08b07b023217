"""Inference forms of our layers: the options they follow, BatchNorm folding and a fused CPU conv.

Each layer that has a faster inference form owns it as ``deploy_form(options) -> nn.Module``
(the module to put in its place, often itself changed in place); :func:`emov2.deploy` walks a
model tree and calls it, the way ``timm.utils.reparameterize_model`` calls ``fuse()``.
"""
import copy
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .. import kernels

__all__ = ['DeployOptions', 'DerivedParams', 'FusedConv2d', 'fold_norm_into_next_conv', 'fold_conv_norm',
           'float32_kernels_apply', 'compiling', 'onednn_fusion_available', 'onednn_bf16_available',
           'cpu_autocast_bf16']

_ONEDNN_ACTS = {nn.Identity: ('none', ''), nn.SiLU: ('swish', ''), nn.GELU: ('gelu', 'none')}


@dataclass(frozen=True)
class DeployOptions:
    """What a ``deploy_form`` may use: oneDNN conv+act / conv+add kernels (``onednn``, CPU, falls back
    to plain ops elsewhere) and the compiled kernels of :mod:`emov2.kernels` (``compiled_kernels``)."""
    onednn: bool = True
    compiled_kernels: bool = True


def onednn_fusion_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_convolution_pointwise')


@torch.jit.unused
def onednn_bf16_available() -> bool:
    """oneDNN runs bf16 convs only on CPUs with AVX512-BW/VL/DQ or AVX-NE-CONVERT (not on AVX2-only ones)."""
    probe = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', None)
    return bool(probe()) if probe is not None else False


@torch.jit.unused
def cpu_autocast_bf16() -> bool:
    """True inside ``torch.autocast('cpu', dtype=torch.bfloat16)``."""
    return torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16


@torch.jit.unused
def compiling() -> bool:
    """True while torch.compile traces the model."""
    return torch.compiler.is_compiling()


@torch.jit.unused
def float32_kernels_apply(x: Tensor) -> bool:
    """Whether :mod:`emov2.kernels`' float32 CPU kernels run on ``x``: a float32 (B, C, H, W) CPU map in
    inference (no gradient), outside bf16 autocast, with the kernels built. Under torch.compile they enter the
    graph as custom ops (registered with shape functions)."""
    return (x.dtype == torch.float32 and x.dim() == 4 and not x.requires_grad and x.device.type == 'cpu'
            and not cpu_autocast_bf16() and kernels.available())


class DerivedParams:
    """Values derived from parameters (casts, packed or folded copies, kernel arguments), made once and again
    only when a source tensor is replaced or changed in place: keyed on each source's identity (the sources are
    held, so a replacement cannot reuse their memory unseen) and version counter (inference tensors have none:
    for them only replacement is seen). In-place edits through ``.data`` bypass the version counter and are not
    seen: change weights with ``load_state_dict`` or in-place ops under ``torch.no_grad()``, or deploy again.
    Tensors among the values are kept detached."""

    def __init__(self) -> None:
        self._sources: List[Optional[Tensor]] = []
        self._versions: List[int] = []
        self._values: List[Any] = []

    def get(self, sources: List[Optional[Tensor]], make: Callable[[], List[Any]]) -> List[Any]:
        try:
            versions = [-1 if t is None else t._version for t in sources]
        except RuntimeError:  # an inference tensor: no version counter
            versions = [-1 if t is None or t.is_inference() else t._version for t in sources]
        if versions != self._versions or any(a is not b for a, b in zip(sources, self._sources)):  # same lengths
            with torch.no_grad():
                self._values = [v.detach() if isinstance(v, Tensor) else v for v in make()]
            self._sources, self._versions = list(sources), versions
        return self._values


def fold_conv_norm(conv: nn.Module, norm: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """``(conv, norm)`` -> ``(conv with the eval-mode BatchNorm folded in, Identity)``; others unchanged."""
    if isinstance(norm, _BatchNorm) and isinstance(conv, nn.modules.conv._ConvNd):
        return fuse_conv_bn_eval(conv, norm), nn.Identity()
    return conv, norm


def fold_norm_into_next_conv(norm: _BatchNorm, conv: nn.modules.conv._ConvNd) -> nn.modules.conv._ConvNd:
    """``conv(norm(x))`` as one conv, for a dense 1x1 (x1) ``conv`` after an eval-mode BatchNorm."""
    if any(k != 1 for k in conv.kernel_size) or conv.groups != 1:
        raise ValueError('only a dense 1x1 conv can absorb the BatchNorm before it')
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    fused = copy.deepcopy(conv)
    w = conv.weight.flatten(1)
    fused.weight = nn.Parameter((w * scale).view_as(conv.weight))
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=w.dtype, device=w.device)
    fused.bias = nn.Parameter(bias + w @ shift)
    return fused


class FusedConv2d(nn.Module):
    """``act(conv(x))`` or ``conv(x) + residual`` as one oneDNN kernel on CPU (float32/bfloat16).

    With ``compiled_kernels`` (and :mod:`emov2.kernels` built), float32 depthwise convs (stride 1 or 2,
    SiLU or none, at least a vector of channels) run in :func:`emov2.kernels.depthwise_conv_f32`, dense convs
    on images (1 to 4 input channels: the stem) in :func:`emov2.kernels.stem_conv_f32`;
    at batch 1 dense 1x1 convs run :func:`emov2.kernels.pointwise_conv_f32` (a GEMM per block of pixels with
    bias, SiLU / GELU and the residual applied in cache) and the other float32 convs ATen's conv (less
    per-call overhead) and then :func:`emov2.kernels.silu_` (over twice as fast per element as oneDNN's swish
    post-op on an AVX2 core) with the residual add in the same pass, or GELU / the add; larger batches keep
    the fused oneDNN post-ops;
    bfloat16 stride-1 depthwise convs run in :func:`emov2.kernels.depthwise_conv_bf16` where the CPU has
    AVX512-BF16.

    With channels-last weights an NCHW input is made channels-last first (oneDNN's own reorder of
    it is slower: 1.4 vs 0.84 s for the stem and stage 1 of emov2_5m at batch 64), so outputs are
    channels-last. Elsewhere (GPU, float64, gradients, torch.compile) it runs the plain ops.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module, compiled_kernels: bool = False) -> None:
        super().__init__()
        if not self.can_fuse(conv, act):
            raise ValueError(f'cannot fuse {conv} with activation {act}')
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride: List[int] = list(conv.stride)
        self.padding: List[int] = list(conv.padding)
        self.dilation: List[int] = list(conv.dilation)
        self.groups = conv.groups
        self.attr, self.algorithm = _ONEDNN_ACTS[type(act)]
        self.act = act
        self.use_onednn = onednn_fusion_available()
        self.onednn_bf16 = onednn_bf16_available()
        k = conv.kernel_size[0]
        self.kernel_size = k
        depthwise = (conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size == (k, k) and
                     k in (3, 5, 7) and self.dilation == [1, 1] and self.padding == [k // 2] * 2 and
                     self.attr in ('swish', 'none'))  # what the depthwise kernels compute, at any stride
        self.is_plain_depthwise = depthwise and self.stride == [1, 1]
        # where emov2.kernels builds: bf16 stride-1 depthwise convs in bf16 pair products, float32 depthwise convs
        # (stride 1 or 2), float32 SiLU (+ residual) after the other convs
        self.bf16_depthwise_kernel = compiled_kernels and self.is_plain_depthwise
        self.f32_depthwise_kernel = compiled_kernels and depthwise and self.stride in ([1, 1], [2, 2])
        # float32 dense convs on images (at most 4 input channels: a stem's first conv), stride 1 or 2
        self.f32_stem_kernel = (compiled_kernels and conv.groups == 1 and conv.in_channels <= 4 and
                                conv.kernel_size == (k, k) and k in (3, 5, 7) and self.dilation == [1, 1] and
                                self.padding == [k // 2] * 2 and self.stride in ([1, 1], [2, 2]) and
                                self.attr in ('swish', 'none'))
        self.f32_pointwise_kernel = (compiled_kernels and conv.kernel_size == (1, 1) and self.stride == [1, 1]
                                     and self.padding == [0, 0] and conv.groups == 1)
        self.compiled_kernels = compiled_kernels
        self._bf16_params = DerivedParams()  # weight and bias cast to bfloat16
        self._bf16_packed = DerivedParams()  # for the bf16-pair depthwise kernel
        self._f32_packed = DerivedParams()  # for the float32 depthwise or stem kernel

    @staticmethod
    def can_fuse(conv: nn.Module, act: nn.Module) -> bool:
        """A plain 2D conv (zero padding) followed by identity, SiLU or exact GELU."""
        return (type(conv) is nn.Conv2d and conv.padding_mode == 'zeros' and isinstance(conv.padding, tuple)
                and type(act) in _ONEDNN_ACTS and not (isinstance(act, nn.GELU) and act.approximate != 'none'))

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def _fusable(self, x: Tensor) -> bool:
        if not torch.jit.is_scripting() and compiling():  # inductor fuses plain convs itself
            return False
        if not self.onednn_bf16:  # ATen's bf16 conv (autocast) runs on every CPU, oneDNN's does not
            if x.dtype == torch.bfloat16:
                return False
            if not torch.jit.is_scripting() and cpu_autocast_bf16():
                return False
        return self.use_onednn and x.device.type == 'cpu' and not x.requires_grad and \
            not self.weight.requires_grad and (x.dtype == torch.float32 or x.dtype == torch.bfloat16)

    @torch.jit.unused
    def _bfloat16_params(self) -> Tuple[Tensor, Optional[Tensor]]:
        """bfloat16 copies of weight and bias, made once per weight version (autocast does not cache
        casts of frozen weights, so a deployed model would otherwise re-cast every conv on every call)."""
        cast = self._bf16_params.get([self.weight, self.bias], lambda: [
            t.to(torch.bfloat16) for t in [self.weight, self.bias] if t is not None])
        return cast[0], cast[1] if self.bias is not None else None

    @torch.jit.unused
    def _depthwise_bf16(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        """The conv, its SiLU and the residual add in emov2.kernels' bf16-pair depthwise kernel."""
        packed, bias = self._bf16_packed.get([self.weight, self.bias], lambda: [
            kernels.pack_depthwise_weight(self.weight), self._bias_or_zeros().float()])
        return kernels.depthwise_conv_bf16(x, packed, bias, self.kernel_size,
                                           self.attr == 'swish', residual)

    @torch.jit.unused
    def _float32_kernels(self, x: Tensor, residual: Optional[Tensor]) -> Optional[Tensor]:
        """Float32 CPU inference with emov2.kernels: depthwise convs in their kernel (1.2-2.0x oneDNN's conv +
        SiLU + add on EMOv2-1M's shapes at batch 1, 1.0-1.7x at batch 16). At batch 1, dense 1x1 convs run
        the pointwise kernel (EMOv2-1M at batch 1: 1.24x the model with ATen's conv + ``silu_`` at 2 threads,
        about even at 1 thread, where its GELU epilogue gains 1.2-1.6x on the value convs); the other convs run
        ATen's conv, whose call costs less than ``mkldnn._convolution_pointwise``'s (18 vs 82 us on a 2x2
        map), and SiLU (+ residual) in :func:`emov2.kernels.silu_`: 1.17-1.53x on EMOv2-1M's expansions.
        None: the oneDNN post-op path, which is faster for larger batches (0.82-1.07x at batch 16)."""
        weight = self.weight
        if weight.requires_grad or weight.dtype != torch.float32 or not float32_kernels_apply(x):
            return None
        if residual is not None and residual.dtype != torch.float32:
            residual = residual.float()
        if self.f32_depthwise_kernel and self.out_channels >= kernels.depthwise_f32_lanes():
            packed, bias = self._packed_f32(kernels.pack_depthwise_weight_f32)
            return kernels.depthwise_conv_f32(x, packed, bias, self.kernel_size, self.stride[0], self.attr == 'swish',
                                              residual)
        if self.f32_stem_kernel and residual is None and self.out_channels >= kernels.depthwise_f32_lanes():
            packed, bias = self._packed_f32(kernels.pack_stem_weight_f32)
            return kernels.stem_conv_f32(x, packed, bias, self.kernel_size, self.stride[0], self.attr == 'swish')
        if x.shape[0] != 1:
            return None
        if self.f32_pointwise_kernel:
            return kernels.pointwise_conv_f32(x, weight.view(weight.shape[0], weight.shape[1]), self.bias, self.attr,
                                              residual)
        if compiling():  # inductor fuses the conv and its activation itself (silu_ works in place)
            return None
        y = F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.attr == 'swish':
            return kernels.silu_(y, residual)
        if self.attr == 'gelu':
            y = F.gelu(y)
        return y if residual is None else y.add_(residual)

    @torch.jit.unused
    def _packed_f32(self, pack: Callable[[Tensor], Tensor]) -> Tuple[Tensor, Tensor]:
        """The weight packed by ``pack`` for a float32 kernel (depthwise or stem) and a float32 bias, made once
        per weight version; under torch.compile packed in the graph (inductor's freezing folds it)."""
        if compiling():
            return pack(self.weight), self._bias_or_zeros()
        packed, bias = self._f32_packed.get([self.weight, self.bias], lambda: [
            pack(self.weight), self._bias_or_zeros().float().contiguous()])
        return packed, bias

    @torch.jit.unused
    def _bias_or_zeros(self) -> Tensor:
        return self.bias if self.bias is not None else self.weight.new_zeros(self.weight.shape[0])

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.compiled_kernels and not torch.jit.is_scripting():  # first: batch-1 calls are dominated by overhead
            y = self._float32_kernels(x, residual)
            if y is not None:
                return y
        if not self._fusable(x):
            y = self.act(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups))
            return y if residual is None else residual + y
        weight, bias = self.weight, self.bias
        if x.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # a no-op on channels-last maps
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
