"""Window partitions and spanning window attention, for any number of spatial dims.

The i2RMB attention (SEW-MHSA, EMOv2 Sec. 3.2) looks at each pixel through two partitions of the
same padded grid into windows of ``w`` tokens per axis:

* **neighbour** windows are contiguous tiles: window ``a`` holds pixels ``a*w + r``;
* **distant** windows are strided grids that span the image: window ``a`` holds pixels ``r*n + a``
  (``n`` windows along that axis).

Both are plain reshapes and permutes of ``(B, C, *spatial)`` tensors, written once for 1, 2 or 3
spatial axes, so the i2RMB of :mod:`emov2.layers.block` attends over sequences, images or videos.
"""

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import register_notrace_function

from .. import kernels
from .basic import channels_first_order, channels_last_order, conv_nd
from .fused import DeployOptions, FusedConv2d

__all__ = [
    'PARTITIONS', 'pad_to_window', 'window_partition', 'window_reverse', 'windowed_attention',
    'SpanningWindowAttention', 'check_window_scores_fit', 'windowed_attention_graph',
]

PARTITIONS = ('neighbour', 'distant')
MAX_PADDED_SCORE_BYTES = 1 << 30  # attention scores of a window larger than its map: mostly zero padding


def _pad_amounts(size: List[int], window: List[int]) -> List[int]:
    """F.pad argument that pads every spatial axis at its end up to a multiple of its window."""
    pad: List[int] = []
    for i in range(len(size) - 1, -1, -1):  # F.pad lists the last axis first
        pad += [0, (window[i] - size[i] % window[i]) % window[i]]
    return pad


@register_notrace_function
def pad_to_window(x: Tensor, window: List[int]) -> Tensor:
    """Zero-pad the trailing spatial axes (right, bottom, back) to multiples of ``window``."""
    pad = _pad_amounts(_spatial_size(x), window)
    if max(pad) == 0:
        return x
    return F.pad(x, pad)


@register_notrace_function
def window_partition(x: Tensor, window: List[int], mode: str) -> Tensor:
    """``(B, C, *S)`` -> ``(B * num_windows, C, window_tokens)``; each ``S_i`` a multiple of ``window[i]``."""
    size = list(x.shape[2:])
    grid = [size[i] // window[i] for i in range(len(window))]
    t = _heads_in_windows(x.permute(channels_last_order(x.dim())), grid, window, 1, mode)
    return t.reshape(-1, _prod(window), x.shape[1]).transpose(1, 2).contiguous()


@register_notrace_function
def window_reverse(x: Tensor, size: List[int], window: List[int], mode: str) -> Tensor:
    """Inverse of :func:`window_partition` for a padded spatial ``size``."""
    grid = [size[i] // window[i] for i in range(len(window))]
    o = x.transpose(1, 2).reshape([-1] + grid + [1] + window + [x.shape[1]])
    return _windows_to_map(o, size, mode).contiguous()


def _prod(values: List[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _heads_in_windows(t: Tensor, grid: List[int], window: List[int], num_heads: int, mode: str) -> Tensor:
    """View a channels-last ``(B, *S, C)`` tensor as ``(B, *grid, heads, *window, C / heads)``.

    Only splits and permutes axes, so it is a view for any memory layout; it costs nothing on a
    channels-last tensor until the caller gathers the windows.
    """
    shape: List[int] = [t.shape[0]]
    for i in range(len(window)):
        shape += [grid[i], window[i]] if mode == 'neighbour' else [window[i], grid[i]]
    shape += [num_heads, t.shape[-1] // num_heads]
    return t.view(shape).permute(_window_perm(mode, len(window)))


def _window_perm(mode: str, nd: int) -> List[int]:
    """Axis order taking the split view of :func:`_heads_in_windows` to (B, *grid, heads, *window, d)."""
    first = 1 if mode == 'neighbour' else 2
    second = 2 if mode == 'neighbour' else 1
    return [0] + [first + 2 * i for i in range(nd)] + [1 + 2 * nd] + [second + 2 * i for i in range(nd)] + [2 + 2 * nd]


def _windows_to_map(o: Tensor, size: List[int], mode: str) -> Tensor:
    """Inverse of :func:`_heads_in_windows` as a new ``(B, C, *S)`` tensor (no writes into views)."""
    perm = _window_perm(mode, len(size))
    inverse = [0] * len(perm)
    for i, axis in enumerate(perm):
        inverse[axis] = i
    out = o.permute(inverse).reshape([o.shape[0]] + size + [-1])
    return out.permute(channels_first_order(out.dim()))


@register_notrace_function
def windowed_attention(
        qk: Tensor,
        value: Tensor,
        window: List[int],
        num_heads: int,
        modes: List[str],
        scale: Optional[float] = None,
        skip_duplicate_partitions: bool = False,
) -> Tensor:
    """Multi-head attention inside windows, summed over the given partitions.

    ``qk``: ``(B, 2C, *S)``, queries in channels ``[0, C)`` and keys in ``[C, 2C)``; ``value``:
    ``(B, Cv, *S)``. Head ``h`` owns the ``h``-th contiguous slice of Q, K and V channels. The
    spatial size must already be a multiple of ``window``. ``scale`` defaults to ``dim_head**-0.5``
    (pass 1.0 when it is folded into Q). On a map of a single window every partition is the same
    one; ``skip_duplicate_partitions`` then computes it once and scales it (exactly equal, but
    fvcore would count fewer FLOPs than the paper, so only the deployed model does this).
    Returns ``(B, Cv, *S)`` in ``value``'s memory format; channels-last inputs take one gather per
    operand and one scatter per partition.
    """
    size = _spatial_size(qk)
    c = int(qk.shape[1]) // 2
    c_v = int(value.shape[1])
    grid = [size[i] // window[i] for i in range(len(window))]
    tokens = _prod(window)
    to_last = channels_last_order(qk.dim())
    qk_last, v_last = qk.permute(to_last), value.permute(to_last)
    out = torch.empty_like(value)
    out_last = out.permute(to_last)
    if scale is None:
        scale = (c // num_heads) ** -0.5
    repeats = 1
    if skip_duplicate_partitions and max(grid) == 1 and len(modes) > 1:
        repeats, modes = len(modes), modes[:1]
    low_rank = torch.jit.is_tracing() and len(window) == 2  # Core ML takes tensors of rank <= 5 only
    for i, mode in enumerate(modes):
        if low_rank:
            q = _split_heads(_windows_2d(qk_last[..., :c], grid, window, mode), num_heads)
            k = _split_heads(_windows_2d(qk_last[..., c:], grid, window, mode), num_heads)
            v = _split_heads(_windows_2d(v_last, grid, window, mode), num_heads)
        else:
            q = _heads_in_windows(qk_last[..., :c], grid, window, num_heads, mode).reshape(-1, tokens, c // num_heads)
            k = _heads_in_windows(qk_last[..., c:], grid, window, num_heads, mode).reshape(-1, tokens, c // num_heads)
            v = _heads_in_windows(v_last, grid, window, num_heads, mode).reshape(-1, tokens, c_v // num_heads)
        attn = torch.bmm(q, k.transpose(1, 2))
        if scale != 1.0:
            attn = attn * scale
        if attn.dtype == torch.bfloat16:  # float32 softmax is faster on CPU (and more accurate)
            weights = torch.softmax(attn, -1, dtype=torch.float32).to(v.dtype)
        else:
            weights = attn.softmax(dim=-1)
        o = torch.bmm(weights, v)
        if low_rank:
            o = _map_2d(_merge_heads(o, num_heads), size, grid, window, mode).permute(0, 3, 1, 2)
            out = o if i == 0 else out + o
            continue
        dest = _heads_in_windows(out_last, grid, window, num_heads, mode)
        o = o.view(dest.shape)
        if torch.jit.is_tracing():  # tracing exporters (coremltools) cannot follow writes into views
            out = _windows_to_map(o, size, mode) if i == 0 else out + _windows_to_map(o, size, mode)
        elif i == 0:
            dest.copy_(o)
        else:
            dest.add_(o)
    return out if repeats == 1 else out * repeats


def _graph_windows(t: Tensor, grid: List[int], window: List[int], groups: List[int], mode: str) -> Tensor:
    """Channels-last ``(B, *S, prod(groups) * d)`` -> ``(*groups[:-1], B * windows * groups[-1], tokens, d)``.

    One reshape-permute-reshape whose innermost axis stays the contiguous channel vector ``d`` (ONNX
    Runtime moves such runs as blocks; a permute that splits them copies element by element).
    ``groups`` splits the channels: ``[2, heads]`` takes Q and K in one go, ``[heads]`` the values.
    """
    nd = len(window)
    lead = len(groups) - 1
    shape: List[int] = [-1]
    for i in range(nd):
        shape += [grid[i], window[i]] if mode == 'neighbour' else [window[i], grid[i]]
    shape += groups + [int(t.shape[-1]) // _prod(groups)]
    g_axes = [1 + 2 * i + (0 if mode == 'neighbour' else 1) for i in range(nd)]
    w_axes = [1 + 2 * i + (1 if mode == 'neighbour' else 0) for i in range(nd)]
    first = 1 + 2 * nd
    perm = list(range(first, first + lead)) + [0] + g_axes + [first + lead] + w_axes + [first + lead + 1]
    x = t.reshape(shape).permute(perm)
    return x.reshape(groups[:-1] + [-1, _prod(window), int(shape[-1])])


def _graph_map(o: Tensor, size: List[int], grid: List[int], window: List[int], heads: int, mode: str) -> Tensor:
    """Inverse of :func:`_graph_windows` for the values: ``(B * windows * heads, tokens, d)`` -> ``(B, *S, C)``."""
    nd = len(window)
    d = int(o.shape[-1])
    x = o.reshape([-1] + grid + [heads] + window + [d])
    # axes of x: 0 batch, 1..nd grid, nd+1 heads, nd+2.. window, 2nd+2 d
    perm: List[int] = [0]
    for i in range(nd):
        perm += [1 + i, nd + 2 + i] if mode == 'neighbour' else [nd + 2 + i, 1 + i]
    perm += [nd + 1, 2 * nd + 2]
    return x.permute(perm).reshape([-1] + size + [heads * d])


def windowed_attention_graph(qk: Tensor, value: Tensor, window: List[int], num_heads: int, modes: List[str],
                             scale: Optional[float] = None, skip_duplicate_partitions: bool = False) -> Tensor:
    """:func:`windowed_attention` (same arguments, same result) as a short graph for exporters.

    Q and K are gathered into windows by one reshape-permute-reshape of the channels-last map, V by
    another; scores are ``q k^T`` and outputs ``softmax v``: plain MatMul and Softmax nodes that ONNX
    Runtime fuses with the transposes. Partitions are summed channels-last and the sum is made
    channels-first once; no writes into views. Returns ``(B, Cv, *S)``.
    """
    size = _spatial_size(qk)
    c = int(qk.shape[1]) // 2
    grid = [size[i] // window[i] for i in range(len(window))]
    if scale is None:
        scale = (c // num_heads) ** -0.5
    repeats = 1
    if skip_duplicate_partitions and max(grid) == 1 and len(modes) > 1:
        repeats, modes = len(modes), modes[:1]
    to_last = channels_last_order(qk.dim())
    qk_last, v_last = qk.permute(to_last), value.permute(to_last)
    out: Optional[Tensor] = None
    for mode in modes:
        qkw = _graph_windows(qk_last, grid, window, [2, num_heads], mode)  # (2, N, T, d)
        v = _graph_windows(v_last, grid, window, [num_heads], mode)  # (N, T, dv)
        attn = torch.matmul(qkw[0], qkw[1].transpose(1, 2))
        if scale != 1.0:
            attn = attn * scale
        o = _graph_map(torch.matmul(attn.softmax(dim=-1), v), size, grid, window, num_heads, mode)
        out = o if out is None else out + o
    assert out is not None
    if repeats != 1:
        out = out * float(repeats)
    return out.permute(channels_first_order(out.dim()))


def _windows_2d(t: Tensor, grid: List[int], window: List[int], mode: str) -> Tensor:
    """``(B, H, W, C)`` -> ``(B * windows, tokens, C)`` through tensors of rank <= 5 (for exporters)."""
    gh, gw = grid[0], grid[1]
    wh, ww = window[0], window[1]
    c = int(t.shape[-1])
    if mode == 'neighbour':
        x = t.reshape(-1, wh, gw, ww, c).permute(0, 2, 1, 3, 4)
    else:
        x = t.reshape(-1, wh, gh, gw * ww * c).permute(0, 2, 1, 3)
        x = x.reshape(-1, wh, ww, gw, c).permute(0, 3, 1, 2, 4)
    return x.reshape(-1, wh * ww, c)


def _map_2d(o: Tensor, size: List[int], grid: List[int], window: List[int], mode: str) -> Tensor:
    """Inverse of :func:`_windows_2d`: ``(B * windows, tokens, C)`` -> ``(B, H, W, C)``."""
    gh, gw = grid[0], grid[1]
    wh, ww = window[0], window[1]
    c = int(o.shape[-1])
    x = o.reshape(-1, gw, wh, ww, c)
    if mode == 'neighbour':
        return x.permute(0, 2, 1, 3, 4).reshape(-1, size[0], size[1], c)
    x = x.permute(0, 2, 3, 1, 4).reshape(-1, gh, wh, size[1] * c)
    return x.permute(0, 2, 1, 3).reshape(-1, size[0], size[1], c)


def _split_heads(t: Tensor, num_heads: int) -> Tensor:
    """``(N, T, C)`` -> ``(N * heads, T, C / heads)``."""
    tokens, c = int(t.shape[1]), int(t.shape[2])
    return t.reshape(-1, tokens, num_heads, c // num_heads).permute(0, 2, 1, 3).reshape(-1, tokens, c // num_heads)


def _merge_heads(t: Tensor, num_heads: int) -> Tensor:
    """``(N * heads, T, d)`` -> ``(N, T, heads * d)``."""
    tokens, d = int(t.shape[1]), int(t.shape[2])
    return t.reshape(-1, num_heads, tokens, d).permute(0, 2, 1, 3).reshape(-1, tokens, num_heads * d)


def _as_window(window_size: Union[int, Sequence[int]], spatial_dims: int) -> List[int]:
    """``window_size`` (an int or one int per axis) as a per-axis list of positive ints."""
    if isinstance(window_size, int):
        window = [window_size] * spatial_dims
    elif len(window_size) != spatial_dims:
        raise ValueError(f'window_size {tuple(window_size)} does not have {spatial_dims} axes')
    else:
        window = [int(w) for w in window_size]
    if min(window) < 1:
        raise ValueError(f'window_size must be positive on every axis, got {window_size!r}')
    return window


@register_notrace_function
def check_window_scores_fit(size: List[int], window: List[int], batch: int, num_heads: int, num_partitions: int,
                            itemsize: int, max_bytes: int = MAX_PADDED_SCORE_BYTES) -> None:
    """Refuse, before allocating, a window so much larger than the map that its scores are mostly padding.

    A map smaller than the window is padded up to one window per axis, and every padded pixel takes
    part in attention: window 100 on a 4x4 map makes 10^4 x 10^4 scores per head and image. Legitimate
    small maps (a 7x7 window over a 1x1 or 5x5 map) stay far below ``max_bytes``.
    """
    if all(window[i] <= size[i] for i in range(len(size))):
        return
    windows, tokens = 1, 1
    for i in range(len(size)):
        windows *= -(-size[i] // window[i])
        tokens *= window[i]
    need = batch * windows * num_heads * tokens * tokens * itemsize * num_partitions
    if need > max_bytes:
        raise ValueError(f'window {window} on a {size} map: the attention scores would need '
                         f'{need / 2 ** 30:.1f} GiB (the map is padded to whole windows); '
                         f'use a window no larger than the map, e.g. window_size={min(size)}')


class SpanningWindowAttention(nn.Module):
    """SEW-MHSA: window attention over neighbour and/or distant windows with one shared Q/K/V.

    ``qk`` (1x1 conv, dim -> 2*dim) gives queries and keys; ``v`` (1x1 conv, dim -> dim_out, then
    ``act``) is the block's expansion MLP_e. With ``value_position='post'`` (EMOv2) attention mixes
    the expanded values; with ``'pre'`` (EMOv1) it mixes the block input, and ``v`` is applied to
    the result. Inputs are zero-padded at the end of each axis to whole windows; the padded pixels
    pass through ``qk``/``v`` and take part in attention, then are cropped away.
    """

    def __init__(
            self,
            dim: int,
            dim_out: int,
            dim_head: int = 32,
            window_size: Union[int, Sequence[int]] = 7,
            partitions: Sequence[str] = PARTITIONS,
            value_position: str = 'post',
            act_layer: type = nn.GELU,
            bias: bool = True,
            value_groups: int = 1,
            spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if dim % dim_head:
            raise ValueError(f'dim {dim} is not a multiple of dim_head {dim_head}')
        bad = [p for p in partitions if p not in PARTITIONS]
        if bad or not partitions:
            raise ValueError(f'partitions must be a non-empty subset of {PARTITIONS}, got {tuple(partitions)}')
        if value_position not in ('post', 'pre'):
            raise ValueError(f"value_position must be 'post' or 'pre', got {value_position!r}")
        self.num_heads = dim // dim_head
        if value_position == 'post' and dim_out % self.num_heads:
            raise ValueError(f'dim_out {dim_out} does not split into {self.num_heads} heads')
        self.window_size = _as_window(window_size, spatial_dims)
        self.partitions = list(partitions)
        self.value_position = value_position
        self.scale: Optional[float] = None  # deploy folds dim_head**-0.5 into Q and sets 1.0
        self.skip_duplicate_partitions = False  # set by deploy (see windowed_attention)
        self.fused_kernel = False  # set by deploy: use emov2.kernels.fused_window_attention where it applies
        self.graph_form = False  # set by exporters: attention as windowed_attention_graph (a short ONNX graph)
        conv = conv_nd(spatial_dims)
        self.qk = conv(dim, dim * 2, 1, bias=bias)
        self.v = conv(dim, dim_out, 1, bias=bias, groups=value_groups)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        size = _spatial_size(x)
        x = pad_to_window(x, self.window_size)
        qk = self.qk(x)
        if self.value_position == 'post':
            return _crop(self._attend(qk, self.act(self.v(x)), size), size)
        return self.act(self.v(_crop(self._attend(qk, x, size), size)))

    def _attend(self, qk: Tensor, value: Tensor, size: List[int]) -> Tensor:
        if not torch.jit.is_scripting():
            check_window_scores_fit(size, self.window_size, value.shape[0], self.num_heads, len(self.partitions),
                                    value.element_size())
            if self.fused_kernel and _fused_kernel_applies(qk, value):
                return _fused_kernel(qk.to(value.dtype), value, self.window_size, self.num_heads, self.partitions,
                                     self.scale)
        if self.graph_form:
            return windowed_attention_graph(qk, value, self.window_size, self.num_heads, self.partitions,
                                            self.scale, self.skip_duplicate_partitions)
        return windowed_attention(qk, value, self.window_size, self.num_heads, self.partitions, self.scale,
                                  self.skip_duplicate_partitions)

    def deploy_form(self, options: DeployOptions) -> nn.Module:
        """``dim_head**-0.5`` folded into the query projection; single-window maps attend once; 2D
        projections as :class:`FusedConv2d` and attention in the compiled kernel where allowed."""
        if self.scale is None:
            dim = self.qk.out_channels // 2
            with torch.no_grad():
                self.qk.weight[:dim] *= (dim // self.num_heads) ** -0.5
                if self.qk.bias is not None:
                    self.qk.bias[:dim] *= (dim // self.num_heads) ** -0.5
            self.scale = 1.0
            self.skip_duplicate_partitions = True
        if options.onednn and FusedConv2d.can_fuse(self.qk, nn.Identity()) and FusedConv2d.can_fuse(self.v, self.act):
            self.qk = FusedConv2d(self.qk, nn.Identity(), options.compiled_kernels)
            self.v, self.act = FusedConv2d(self.v, self.act, options.compiled_kernels), nn.Identity()
            self.fused_kernel = options.compiled_kernels and len(self.window_size) == 2 and kernels.available()
        return self


@torch.jit.unused
def _fused_kernel(qk: Tensor, value: Tensor, window: List[int], num_heads: int, modes: List[str],
                  scale: Optional[float]) -> Tensor:
    return kernels.fused_window_attention(qk, value, window, num_heads, modes, scale)


@torch.jit.unused
def _fused_kernel_applies(qk: Tensor, value: Tensor) -> bool:
    """The compiled kernel covers 2D float32/bfloat16 CPU inference outside jit tracing (torch.compile
    keeps it as one opaque op)."""
    return (value.dim() == 4 and value.device.type == 'cpu' and value.dtype in (torch.float32, torch.bfloat16)
            and not (qk.requires_grad or value.requires_grad) and not torch.jit.is_tracing())


@register_notrace_function
def _spatial_size(x: Tensor) -> List[int]:
    """Spatial sizes as ints: jit tracing bakes them in and keeps the batch axis free."""
    return [int(s) for s in x.shape[2:]]


@register_notrace_function
def _crop(x: Tensor, size: List[int]) -> Tensor:
    """Crop the trailing spatial axes back to ``size`` after window padding."""
    if _spatial_size(x) == size:
        return x
    if len(size) == 2:  # slicing rather than narrow: Core ML converts it with a free batch axis
        return x[:, :, :size[0], :size[1]].contiguous()
    for axis, n in enumerate(size):
        x = x.narrow(axis + 2, 0, n)
    return x.contiguous()


for _fn in ('pad_to_window', 'windowed_attention', '_spatial_size', '_crop', 'check_window_scores_fit'):
    torch.fx.wrap(_fn)
