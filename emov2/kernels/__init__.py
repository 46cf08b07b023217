"""Optional compiled CPU kernels, built on first use with the machine's C++ compiler.

* :func:`fused_window_attention` is :func:`emov2.layers.window_attention.windowed_attention` for
  2D maps as one kernel (``window_attention.cpp``): no window gathers, no score tensors, no scatter.
* :func:`depthwise_conv_bf16` is a stride-1 depthwise conv (+ SiLU, + residual) for bfloat16
  channels-last maps that multiplies in bf16 pairs (``depthwise_conv.cpp``), on CPUs with AVX512-BF16.
* :func:`depthwise_conv_f32` is a depthwise conv (stride 1 or 2, + SiLU, + residual) for float32
  channels-last maps, 1.15-2.0x oneDNN's at batch 1 on an AVX2 core (``depthwise_conv_f32.cpp``).
* :func:`pointwise_conv_f32` is a 1x1 conv (+ bias, + SiLU or GELU, + residual) for float32 channels-last
  maps: a GEMM per block of pixels with the epilogue applied in cache (``pointwise_conv_f32.cpp``).
* :func:`mobile_block_f32` is a whole conv block (optional LayerNorm, 1x1 expansion + act, depthwise conv +
  SiLU + skip, 1x1 projection + residual) for float32 channels-last maps in one pass: the expanded map is
  kept as a per-thread band of the rows the depthwise conv needs and never goes to memory
  (``mobile_block_f32.cpp``).
* :func:`attention_block_f32` is a block with window attention (optional LayerNorm, query/key and value
  projections, :func:`fused_window_attention`, depthwise conv + SiLU + skip, projection + residual) as one op
  (``mobile_block_f32.cpp``): one image per thread when the batch allows, so an image's maps stay in its caches.
* :func:`stem_conv_f32` is a dense k x k conv (+ SiLU) for float32 maps with at most four channels (an image
  stem's first conv): reads NCHW rows, writes channels-last, SiLU on the sums (``stem_conv_f32.cpp``).
* :func:`silu_` is SiLU (+ a residual add) in place on float32 maps, over twice as fast as oneDNN's
  swish post-op and ATen's silu on an AVX2 core (``activation.cpp``).

The build (about 75 s on 2 cores for the seven sources, once per machine and source version; cached by
``torch.utils.cpp_extension`` under ``~/.cache/torch_extensions``) needs a C++ compiler and ninja; where it
fails, or with ``EMOV2_FUSED_ATTENTION=0``, :func:`available` is False and callers keep the PyTorch path.
"""
import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import List, Optional

import torch
from torch import Tensor

__all__ = ['available', 'build_error', 'fused_window_attention', 'depthwise_bf16_available',
           'pack_depthwise_weight', 'depthwise_conv_bf16', 'silu_',
           'depthwise_f32_lanes', 'pack_depthwise_weight_f32', 'depthwise_conv_f32', 'POINTWISE_ACTIVATIONS',
           'pointwise_conv_f32', 'mobile_block_f32', 'attention_block_f32', 'pack_stem_weight_f32', 'stem_conv_f32']

_LOG = logging.getLogger(__name__)
_SOURCES = [Path(__file__).with_name(n) for n in
            ('window_attention.cpp', 'depthwise_conv.cpp', 'depthwise_conv_f32.cpp', 'activation.cpp',
             'pointwise_conv_f32.cpp', 'mobile_block_f32.cpp', 'stem_conv_f32.cpp')]
_HEADERS = ('bf16_math.h', 'vec_math.h', 'gemm_f32.h', 'depthwise_tile.h', 'window_attention.h')
_CAPABILITY_FLAGS = {
    'AVX512': ['-DCPU_CAPABILITY=AVX512', '-DCPU_CAPABILITY_AVX512', '-mavx512f', '-mavx512bw', '-mavx512vl',
               '-mavx512dq', '-mfma'],
    'AVX2': ['-DCPU_CAPABILITY=AVX2', '-DCPU_CAPABILITY_AVX2', '-mavx2', '-mfma', '-mf16c'],
}
_MODES = {'neighbour': 0, 'distant': 1}
POINTWISE_ACTIVATIONS = {'none': 0, 'swish': 1, 'gelu': 2}  # pointwise_conv_f32's act codes, by oneDNN's names
_lock = threading.Lock()
_state: dict = {}


def _build() -> Optional[str]:
    """Compile and load the kernels; return None on success or the reason they are unavailable."""
    if os.environ.get('EMOV2_FUSED_ATTENTION', '1') == '0':
        return 'disabled by EMOV2_FUSED_ATTENTION=0'
    if shutil.which(os.environ.get('CXX', 'c++')) is None or shutil.which('ninja') is None:
        return 'no C++ compiler or ninja on PATH'
    from torch.utils import cpp_extension
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ['-O3', '-fopenmp'] + _CAPABILITY_FLAGS.get(capability, [])  # at::parallel_for is OpenMP
    if capability == 'AVX512' and _cpu_has('avx512_bf16'):
        flags.append('-mavx512bf16')  # bfloat16 products with vdpbf16ps
    text = ''.join(p.read_text() for p in _SOURCES + [_SOURCES[0].with_name(h) for h in _HEADERS])
    tag = hashlib.sha1((text + torch.__version__ + ' '.join(flags)).encode()).hexdigest()[:10]
    try:
        _LOG.info('building the emov2 kernels (once per machine and source version)')
        cpp_extension.load(name=f'emov2_kernels_{tag}', sources=[str(p) for p in _SOURCES], extra_cflags=flags,
                           extra_ldflags=['-fopenmp'], is_python_module=False, verbose=False)
    except Exception as e:  # any compiler or loader failure leaves the PyTorch path in place
        return f'build failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ""}'

    @torch.library.register_fake('emov2_kernels::window_attention')
    def _(qk, value, window, num_heads, modes, scale):  # shapes for torch.compile / FakeTensor tracing
        return torch.empty_like(value, memory_format=torch.channels_last)

    @torch.library.register_fake('emov2_kernels::depthwise_conv_bf16')
    def _(x, packed, bias, kernel_size, silu, residual):
        return torch.empty_like(x, memory_format=torch.channels_last)

    @torch.library.register_fake('emov2_kernels::depthwise_conv_f32')
    def _(x, packed, bias, kernel_size, stride, silu, residual):
        size = [(s + 2 * (kernel_size // 2) - kernel_size) // stride + 1 for s in x.shape[2:]]
        return x.new_empty([x.shape[0], x.shape[1]] + size).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake('emov2_kernels::stem_conv_f32')
    def _(x, packed, bias, kernel_size, stride, silu):
        size = [(s + 2 * (kernel_size // 2) - kernel_size) // stride + 1 for s in x.shape[2:]]
        return x.new_empty([x.shape[0], packed.shape[1]] + size).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake('emov2_kernels::pointwise_conv_f32')
    def _(x, weight, bias, act, residual):
        return x.new_empty([x.shape[0], weight.shape[0]] + list(x.shape[2:])).contiguous(
            memory_format=torch.channels_last)

    @torch.library.register_fake('emov2_kernels::mobile_block_f32')
    def _(x, w_exp, b_exp, act, layer_norm_eps, w_dw, b_dw, kernel_size, stride, dw_silu, dw_skip, w_proj, b_proj,
          residual):
        size = [(s + 2 * (kernel_size // 2) - kernel_size) // stride + 1 for s in x.shape[2:]]
        return x.new_empty([x.shape[0], w_proj.shape[1]] + size).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake('emov2_kernels::attention_block_f32')
    def _(x, w_qk, b_qk, w_v, b_v, act, layer_norm_eps, window, num_heads, modes, scale, w_dw, b_dw, kernel_size,
          dw_silu, dw_skip, w_proj, b_proj, residual):
        return x.new_empty([x.shape[0], w_proj.shape[1]] + list(x.shape[2:])).contiguous(
            memory_format=torch.channels_last)

    @torch.library.register_fake('emov2_kernels::silu_')
    def _(x, residual):
        return x
    return None


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path('/proc/cpuinfo').read_text().split()
    except OSError:
        return False


def build_error() -> Optional[str]:
    """None when the kernels are loaded, else why not (building them on the first call)."""
    if 'error' in _state:  # settled: no lock on the per-call path
        return _state['error']
    with _lock:
        if 'error' not in _state:
            error = _build()
            if error is None:  # read once, eagerly: a torch.compile trace cannot take an op's int result
                _state['lanes'] = int(torch.ops.emov2_kernels.depthwise_f32_lanes())
            _state['error'] = error
            if _state['error'] is not None:
                _LOG.warning('emov2 kernels unavailable (%s); using PyTorch / oneDNN ops', _state['error'])
    return _state['error']


def available() -> bool:
    return build_error() is None


def _ops():
    """The loaded ops (built on first use); a clear error where they cannot be built. Once built, no lock
    is taken (torch.compile traces through this without a graph break)."""
    if 'error' not in _state:
        build_error()
    if _state['error'] is not None:
        raise RuntimeError(f'emov2 kernels are not available here: {_state["error"]}')
    return torch.ops.emov2_kernels


def fused_window_attention(qk: Tensor, value: Tensor, window: List[int], num_heads: int, modes: List[str],
                           scale: Optional[float] = None) -> Tensor:
    """Same contract as ``windowed_attention`` for 2D float32/bfloat16 CPU maps; output is channels-last."""
    if scale is None:
        scale = (qk.shape[1] // 2 // num_heads) ** -0.5
    return _ops().window_attention(qk, value, window, num_heads, [_MODES[m] for m in modes], scale)


def depthwise_bf16_available() -> bool:
    """True where the kernels are loaded and were compiled for AVX512-BF16."""
    with _lock:
        if 'depthwise_bf16' in _state:
            return _state['depthwise_bf16']
    ok = available() and bool(torch.ops.emov2_kernels.depthwise_bf16_available())
    _state['depthwise_bf16'] = ok
    return ok


def pack_depthwise_weight(weight: Tensor) -> Tensor:
    """A ``(C, 1, k, k)`` depthwise weight in the bf16-pair layout :func:`depthwise_conv_bf16` reads."""
    return _ops().pack_depthwise_weight(weight)


def depthwise_conv_bf16(x: Tensor, packed: Tensor, bias: Tensor, kernel_size: int, silu: bool,
                        residual: Optional[Tensor] = None) -> Tensor:
    """``silu?(conv(x) + bias) (+ residual)`` for a bfloat16 ``(B, C, H, W)`` map: depthwise k x k conv,
    stride 1, zero padding k // 2; ``bias`` is float32. The output is channels-last bfloat16."""
    return _ops().depthwise_conv_bf16(x, packed, bias, kernel_size, silu, residual)


def silu_(x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """``x = silu(x) (+ residual)`` in place for a float32 CPU tensor (any dense layout; a residual with
    other strides is added afterwards); returns ``x``. Relative error below 4e-7 against ``F.silu``."""
    return _ops().silu_(x, residual)


def depthwise_f32_lanes() -> int:
    """Float32 lanes of the kernels' vectors (8 with AVX2, 16 with AVX512): :func:`depthwise_conv_f32` needs
    at least that many channels."""
    _ops()  # builds the kernels (and reads the lanes) on first use
    return _state['lanes']


def pack_depthwise_weight_f32(weight: Tensor) -> Tensor:
    """A ``(C, 1, k, k)`` depthwise weight as the ``(k * k, C)`` float32 layout :func:`depthwise_conv_f32` reads."""
    return _ops().pack_depthwise_weight_f32(weight)


def depthwise_conv_f32(x: Tensor, packed: Tensor, bias: Tensor, kernel_size: int, stride: int, silu: bool,
                       residual: Optional[Tensor] = None) -> Tensor:
    """``silu?(conv(x) + bias) (+ residual)`` for a float32 ``(B, C, H, W)`` map: depthwise k x k conv (k 3, 5
    or 7), stride 1 or 2, zero padding k // 2; C at least :func:`depthwise_f32_lanes`. Channels-last output."""
    return _ops().depthwise_conv_f32(x, packed, bias, kernel_size, stride, silu, residual)


def pack_stem_weight_f32(weight: Tensor) -> Tensor:
    """A dense ``(C_out, C_in, k, k)`` conv weight as the ``(C_in * k * k, C_out)`` float32 layout (tap-major, a
    vector of output channels contiguous) :func:`stem_conv_f32` reads."""
    return weight.detach().float().reshape(weight.shape[0], -1).t().contiguous()


def stem_conv_f32(x: Tensor, packed: Tensor, bias: Tensor, kernel_size: int, stride: int, silu: bool) -> Tensor:
    """``silu?(conv(x) + bias)`` for a float32 ``(B, C_in, H, W)`` CPU map with 1 to 4 channels: dense k x k conv
    (k 3, 5 or 7), stride 1 or 2, zero padding k // 2, ``packed`` from :func:`pack_stem_weight_f32`, at least
    :func:`depthwise_f32_lanes` output channels. Channels-last output."""
    return _ops().stem_conv_f32(x, packed, bias, kernel_size, stride, silu)


def pointwise_conv_f32(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str = 'none',
                       residual: Optional[Tensor] = None) -> Tensor:
    """``act(conv1x1(x) + bias) (+ residual)`` for a float32 ``(B, C_in, H, W)`` CPU map; ``weight`` is the
    contiguous ``(C_out, C_in)`` matrix, ``bias`` float32 or None, ``act`` one of :data:`POINTWISE_ACTIVATIONS`
    (GELU is the exact, erf form, absolute error below 4e-7 * |x|). Channels-last output."""
    return _ops().pointwise_conv_f32(x, weight, bias, POINTWISE_ACTIVATIONS[act], residual)


def mobile_block_f32(x: Tensor, w_exp: Tensor, b_exp: Tensor, act: str, w_dw: Tensor, b_dw: Tensor, kernel_size: int,
                     stride: int, dw_silu: bool, dw_skip: bool, w_proj: Tensor, b_proj: Optional[Tensor] = None,
                     residual: bool = False, layer_norm_eps: Optional[float] = None) -> Tensor:
    """An inverted-residual block without attention in one pass, for a float32 ``(B, C_in, H, W)`` CPU map:
    ``y = act(conv1x1(norm(x), w_exp) + b_exp)``, ``z = silu?(dwconv(y, w_dw) + b_dw) (+ y if dw_skip)``,
    ``out = conv1x1(z, w_proj) + b_proj (+ x if residual)``. ``norm`` is a LayerNorm over channels without
    affine when ``layer_norm_eps`` is given (fold its affine into ``w_exp`` / ``b_exp``), else the identity;
    ``w_exp`` / ``w_proj`` are input-major ``(C_in, C_out)`` matrices (a 1x1 conv's weight ``w.flatten(1).t()``,
    contiguous), ``w_dw`` packed by :func:`pack_depthwise_weight_f32`
    (k 3, 5 or 7, stride 1 or 2, zero padding k // 2), ``act`` one of :data:`POINTWISE_ACTIVATIONS`. The
    expanded map is never written to memory. Channels-last output."""
    return _ops().mobile_block_f32(x, w_exp, b_exp, POINTWISE_ACTIVATIONS[act], layer_norm_eps, w_dw, b_dw,
                                   kernel_size, stride, dw_silu, dw_skip, w_proj, b_proj, residual)


def attention_block_f32(x: Tensor, w_qk: Tensor, b_qk: Tensor, w_v: Tensor, b_v: Tensor, act: str, window: List[int],
                        num_heads: int, modes: List[str], scale: float, w_dw: Tensor, b_dw: Tensor, kernel_size: int,
                        dw_silu: bool, dw_skip: bool, w_proj: Tensor, b_proj: Optional[Tensor] = None,
                        residual: bool = False, layer_norm_eps: Optional[float] = None) -> Tensor:
    """A block with spanning window attention in one op, for a float32 ``(B, C, H, W)`` CPU map whose sides are
    multiples of ``window``: ``n = norm(x)``, ``qk = conv1x1(n, w_qk) + b_qk`` (queries then keys, ``2C``
    channels), ``v = act(conv1x1(n, w_v) + b_v)``, ``a`` = :func:`fused_window_attention` ``(qk, v, window,
    num_heads, modes, scale)``, ``z = silu?(dwconv(a, w_dw) + b_dw) (+ a if dw_skip)`` (stride 1),
    ``out = conv1x1(z, w_proj) + b_proj (+ x if residual)``; ``norm`` and the input-major 1x1 weights as in
    :func:`mobile_block_f32`. With at least
    as many images as threads each thread runs whole images (their maps stay in its caches). Channels-last
    output."""
    return _ops().attention_block_f32(x, w_qk, b_qk, w_v, b_v, POINTWISE_ACTIVATIONS[act], layer_norm_eps, window,
                                      num_heads, [_MODES[m] for m in modes], scale, w_dw, b_dw, kernel_size, dw_silu,
                                      dw_skip, w_proj, b_proj, residual)
