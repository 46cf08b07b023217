"""The compiled window-attention kernel against the PyTorch definition it replaces."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import emov2
from emov2 import kernels
from emov2.layers import ImprovedInvertedResidualMobileBlock
from emov2.layers.window_attention import SpanningWindowAttention, windowed_attention

needs_compiler = pytest.mark.skipif(shutil.which('c++') is None or shutil.which('ninja') is None,
                                    reason='no C++ compiler / ninja to build emov2.kernels')


@pytest.fixture(scope='module', autouse=True)
def all_cores():
    """The kernels split work over threads (at::parallel_for): test them with every core, also under xdist."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def built():
    err = kernels.build_error()
    assert err is None, f'kernel build failed on a machine with a compiler: {err}'


def _maps(b, c, cv, h, w, dtype, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(b, 2 * c, h, w, generator=g).to(dtype)
    v = torch.randn(b, cv, h, w, generator=g).to(dtype)
    if channels_last:
        qk, v = qk.contiguous(memory_format=torch.channels_last), v.contiguous(memory_format=torch.channels_last)
    return qk, v


CASES = [
    # batch, C, Cv, heads, H, W, window, partitions, scale
    (2, 40, 60, 2, 14, 21, [7, 7], ['neighbour', 'distant'], None),   # 2x3 windows, dv=30 (vector tail)
    (3, 42, 62, 2, 7, 7, [7, 7], ['distant', 'neighbour'], 0.3),      # one window: partitions coincide; odd d, dv
    (2, 64, 48, 4, 14, 14, [7, 7], ['distant'], 1.0),                 # one partition
    (2, 32, 64, 2, 8, 12, [4, 4], ['neighbour', 'distant'], None),    # 16 tokens: no register-row path
    (1, 24, 24, 3, 14, 10, [7, 5], ['neighbour', 'distant'], None),   # non-square window
]


@needs_compiler
@pytest.mark.parametrize('case', CASES, ids=[f'case{i}' for i in range(len(CASES))])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_kernel_matches_windowed_attention(built, case, dtype):
    b, c, cv, heads, h, w, window, modes, scale = case
    qk, v = _maps(b, c, cv, h, w, dtype)
    want = windowed_attention(qk.float(), v.float(), window, heads, modes, scale)
    got = kernels.fused_window_attention(qk, v, window, heads, modes, scale)
    assert got.dtype == dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


@needs_compiler
def test_kernel_takes_nchw_inputs_and_rejects_bad_shapes(built):
    qk, v = _maps(2, 40, 60, 14, 14, torch.float32, channels_last=False)
    want = windowed_attention(qk, v, [7, 7], 2, ['neighbour', 'distant'])
    torch.testing.assert_close(kernels.fused_window_attention(qk, v, [7, 7], 2, ['neighbour', 'distant']), want)
    with pytest.raises(RuntimeError, match='multiple of the window'):
        kernels.fused_window_attention(qk[..., :13], v[..., :13], [7, 7], 2, ['neighbour'])
    with pytest.raises(RuntimeError, match='split into heads'):
        kernels.fused_window_attention(qk, v, [7, 7], 3, ['neighbour'])
    with pytest.raises(RuntimeError, match='float32 or bfloat16'):
        kernels.fused_window_attention(qk.double(), v.double(), [7, 7], 2, ['neighbour'])


@needs_compiler
@pytest.mark.parametrize('name', ['emov2_1m', 'emov1_1m'])
def test_deploy_uses_the_kernel_and_matches_the_pytorch_path(built, name):
    model = emov2.create_model(name, num_classes=10).eval()
    fused = emov2.deploy(model)
    plain = emov2.deploy(model, compiled_kernels=False)
    attn = [m for m in fused.modules() if isinstance(m, SpanningWindowAttention)]
    assert attn and all(m.fused_kernel for m in attn)
    assert not any(m.fused_kernel for m in plain.modules() if isinstance(m, SpanningWindowAttention))
    x = torch.randn(2, 3, 117, 150)  # odd size: padded windows in stage 3, cropped after
    with torch.inference_mode():
        want, got = plain(x), fused(x)
        ref = model(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv('EMOV2_FUSED_ATTENTION', '0')
    assert 'EMOV2_FUSED_ATTENTION' in kernels._build()


def test_gradients_never_reach_the_kernel():
    """The kernel has no backward: a deployed layer fed a tensor that needs grad takes the PyTorch path."""
    attn = SpanningWindowAttention(32, 64, dim_head=16).eval()
    attn.fused_kernel = True
    x = torch.randn(1, 32, 14, 14, requires_grad=True)
    attn(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_compiler
def test_public_kernel_functions_build_on_first_call():
    """In a fresh process, calling a kernel function first (no available() before it) builds and runs it."""
    code = ("import torch; from emov2 import kernels; "
            "qk = torch.randn(1, 8, 7, 7); v = torch.randn(1, 8, 7, 7); "
            "print(tuple(kernels.fused_window_attention(qk, v, [7, 7], 2, ['neighbour']).shape), "
            "tuple(kernels.pack_depthwise_weight(torch.randn(20, 1, 5, 5)).shape))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split('\n')[-2] == '(1, 8, 7, 7) (2, 5, 3, 16)'


def test_kernel_functions_say_why_they_are_unavailable(monkeypatch):
    monkeypatch.setitem(kernels._state, 'error', 'no C++ compiler or ninja on PATH')
    with pytest.raises(RuntimeError, match='not available here: no C\\+\\+ compiler'):
        kernels.pack_depthwise_weight(torch.randn(20, 1, 5, 5))


@needs_compiler
@pytest.mark.parametrize('layout', ['channels_last', 'contiguous', 'residual_other_strides', 'strided_view'])
def test_silu_kernel_matches_silu_plus_residual(built, layout):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 37, 9, 11, generator=g) * 6  # 37 channels: vector tails; large |x|: exp saturation
    x[0, 0, 0, :4] = torch.tensor([float('inf'), float('-inf'), float('nan'), -100.0])
    r = torch.randn(2, 37, 9, 11, generator=g)
    if layout != 'contiguous':
        x, r = x.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    if layout == 'residual_other_strides':
        r = r.contiguous()
    if layout == 'strided_view':
        x, r = x[:, :, 1:], r[:, :, 1:]
    want = torch.nn.functional.silu(x.double()) + r.double()
    got = kernels.silu_(x.clone(), r)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(kernels.silu_(x.clone()).double(), torch.nn.functional.silu(x.double()),
                               rtol=1e-6, atol=1e-6, equal_nan=True)
    y = x.clone()
    assert kernels.silu_(y) is y  # in place
    with pytest.raises(RuntimeError, match='float32 CPU'):
        kernels.silu_(x.double())


def _per_conv_kernels(model):
    """``model`` with its conv blocks on the per-conv kernels instead of the block kernel (what attention blocks
    and blocks the block kernel does not cover run)."""
    for m in model.modules():
        if isinstance(m, ImprovedInvertedResidualMobileBlock):
            m.fused_block = False
    return model


@needs_compiler
def test_deploy_runs_batch1_convs_through_the_kernels(built, monkeypatch):
    """At batch 1 the deployed EMOv2's dense 1x1 convs call the pointwise kernel (bias, SiLU / GELU and the
    residual in its epilogue), the stem conv the stem kernel and the other SiLU convs the depthwise kernel or
    ``silu_``; at batch 2 only the stem kernel of these runs. Outputs match the oneDNN post-op path
    (compiled_kernels=False) and the training graph."""
    from emov2.layers.fused import FusedConv2d
    model = emov2.create_model('emov2_1m', num_classes=10).eval()
    fused, plain = _per_conv_kernels(emov2.deploy(model)), emov2.deploy(model, compiled_kernels=False)
    convs = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
    assert convs and all(m.compiled_kernels for m in convs)
    assert not any(m.compiled_kernels for m in plain.modules() if isinstance(m, FusedConv2d))
    pointwise = [m for m in convs if m.f32_pointwise_kernel]
    assert {m.attr for m in pointwise} == {'none', 'swish', 'gelu'}
    stem = [m for m in convs if m.f32_stem_kernel]
    assert len(stem) == 1 and stem[0].weight.shape[1] == 3 and stem[0].stride == [2, 2]
    calls = {'silu_': [], 'pointwise_conv_f32': [], 'stem_conv_f32': []}
    for name in calls:
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls[_name].append(a) or _real(*a))
    x = torch.randn(1, 3, 96, 80)
    with torch.inference_mode():
        got, want, ref = fused(x), plain(x), model(x)
        assert len(calls['pointwise_conv_f32']) == len(pointwise)
        assert any(a[4] is not None for a in calls['pointwise_conv_f32'])  # a residual in the epilogue
        lanes = kernels.depthwise_f32_lanes()
        rest = [m for m in convs if m.attr == 'swish' and not m.f32_pointwise_kernel and not m.f32_stem_kernel
                and not (m.f32_depthwise_kernel and m.out_channels >= lanes)]
        assert len(calls['silu_']) == len(rest) and len(calls['stem_conv_f32']) == 1
        for c in calls.values():
            c.clear()
        fused(torch.randn(2, 3, 96, 80))  # larger batches keep oneDNN's post-ops, the stem its kernel
        assert calls['silu_'] == calls['pointwise_conv_f32'] == [] and len(calls['stem_conv_f32']) == 1
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


@needs_compiler
@pytest.mark.parametrize('act', ['none', 'swish', 'gelu'])
def test_pointwise_kernel_matches_conv2d(built, act):
    """1x1 conv + bias + activation + residual against float64 conv2d: one block, many blocks (2 x 40 x 40
    pixels), partial vectors (37 and 70 outputs), no bias, NCHW input, and GELU / SiLU at extreme values."""
    g = torch.Generator().manual_seed(len(act))
    f = {'none': lambda y: y, 'swish': torch.nn.functional.silu, 'gelu': torch.nn.functional.gelu}[act]
    for b, cin, cout, h, w in [(1, 16, 64, 7, 9), (2, 33, 70, 40, 40), (1, 5, 37, 1, 1), (3, 80, 8, 3, 2)]:
        x = torch.randn(b, cin, h, w, generator=g)
        weight, bias = torch.randn(cout, cin, generator=g) / cin ** 0.5 * 3, torch.randn(cout, generator=g)
        r = torch.randn(b, cout, h, w, generator=g)
        conv = torch.nn.functional.conv2d(x.double(), weight.double()[:, :, None, None], bias.double())
        for layout in ('channels_last', 'nchw'):
            xin = x.contiguous(memory_format=torch.channels_last) if layout == 'channels_last' else x
            for residual in (None, r):
                want = f(conv) + (residual.double() if residual is not None else 0)
                got = kernels.pointwise_conv_f32(xin, weight, bias, act, residual)
                assert got.is_contiguous(memory_format=torch.channels_last)
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        no_bias = kernels.pointwise_conv_f32(x, weight, None, act)
        torch.testing.assert_close(no_bias.double(), f(conv - bias.double()[:, None, None]), rtol=1e-5, atol=1e-5)
    extreme = torch.tensor([float('inf'), float('-inf'), float('nan'), -100.0, 100.0, -5.0, 0.0, 5.0, -0.5])
    got = kernels.pointwise_conv_f32(torch.ones(1, 1, 1, 1), torch.zeros(9, 1), extreme, act)  # epilogue alone
    torch.testing.assert_close(got.flatten().double(), f(extreme.double()), rtol=1e-6, atol=1e-6, equal_nan=True)


@needs_compiler
def test_pointwise_kernel_rejects_bad_arguments(built):
    x, weight = torch.randn(1, 16, 4, 4), torch.randn(8, 16)
    with pytest.raises(RuntimeError, match='float32'):
        kernels.pointwise_conv_f32(x.double(), weight, None)
    with pytest.raises(RuntimeError, match=r'contiguous float32 \(C_out, 16\) matrix'):
        kernels.pointwise_conv_f32(x, torch.randn(8, 15), None)
    with pytest.raises(RuntimeError, match='8 values'):
        kernels.pointwise_conv_f32(x, weight, torch.zeros(7))
    with pytest.raises(RuntimeError, match='does not match the output'):
        kernels.pointwise_conv_f32(x, weight, None, 'none', torch.zeros(1, 8, 4, 5))
    with pytest.raises(KeyError):
        kernels.pointwise_conv_f32(x, weight, None, 'relu')


@needs_compiler
@pytest.mark.parametrize('k,stride', [(3, 1), (5, 1), (7, 1), (3, 2), (5, 2), (7, 2)])
def test_depthwise_f32_kernel_matches_conv2d(built, k, stride):
    lanes = kernels.depthwise_f32_lanes()
    g = torch.Generator().manual_seed(k * 10 + stride)
    # odd sizes, maps smaller than k; rows of 8-14 outputs (tiles of 7 and a shorter one) and row tails of
    # every length (tiles of the remaining outputs)
    for b, h, w in [(2, 13, 17), (1, 1, 1), (1, 2, 9), (3, 7, 7), (1, 16, 5), (1, 5, 14), (1, 3, 11), (1, 4, 23),
                    (1, 3, 26)]:
        c = 2 * lanes + 3 if h != 7 else lanes  # a last partial vector; exactly one vector
        x = torch.randn(b, c, h, w, generator=g)
        weight, bias = torch.randn(c, 1, k, k, generator=g) / k, torch.randn(c, generator=g)
        packed = kernels.pack_depthwise_weight_f32(weight)
        conv = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), stride, k // 2, 1, c)
        r = torch.randn(conv.shape, generator=g)
        for silu in (False, True):
            for residual in (None, r):
                want = torch.nn.functional.silu(conv) if silu else conv
                want = want + residual.double() if residual is not None else want
                got = kernels.depthwise_conv_f32(x, packed, bias, k, stride, silu, residual)
                assert got.is_contiguous(memory_format=torch.channels_last)
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_depthwise_f32_kernel_rejects_bad_arguments(built):
    lanes = kernels.depthwise_f32_lanes()
    x = torch.randn(1, lanes, 8, 8)
    packed = kernels.pack_depthwise_weight_f32(torch.randn(lanes, 1, 5, 5))
    bias = torch.zeros(lanes)
    with pytest.raises(RuntimeError, match='at least'):
        kernels.depthwise_conv_f32(torch.randn(1, lanes - 1, 8, 8), packed, torch.zeros(lanes - 1), 5, 1, False)
    with pytest.raises(RuntimeError, match='stride 1 or 2'):
        kernels.depthwise_conv_f32(x, packed, bias, 5, 3, False)
    with pytest.raises(RuntimeError, match='not packed'):
        kernels.depthwise_conv_f32(x, packed, bias, 3, 1, False)
    with pytest.raises(RuntimeError, match='float32 CPU'):
        kernels.depthwise_conv_f32(x.double(), packed, bias, 5, 1, False)
    with pytest.raises(RuntimeError, match='residual differs'):
        kernels.depthwise_conv_f32(x, packed, bias, 5, 2, False, torch.zeros(1, lanes, 8, 8))


@needs_compiler
@pytest.mark.parametrize('k,stride', [(3, 2), (3, 1), (5, 2), (7, 1)])
def test_stem_kernel_matches_conv2d(built, k, stride):
    """Dense conv + bias (+ SiLU) on 1-4 input channels against float64 conv2d: 1, 2, 3 and 5 vectors of outputs
    (single, pair and triple tiles), overlapping last vectors; maps smaller than the filter, rows ending in every
    tile length; NCHW and channels-last inputs."""
    lanes = kernels.depthwise_f32_lanes()
    g = torch.Generator().manual_seed(k * 10 + stride)
    for b, c_in, c_out, h, w in [(2, 3, 2 * lanes, 23, 29), (1, 1, lanes, 1, 1), (1, 4, 3 * lanes - 5, 9, 2),
                                 (3, 2, lanes + 3, 6, 13), (1, 3, 2 * lanes, 2, 40), (1, 3, 4 * lanes + 1, 5, 7)]:
        x = torch.randn(b, c_in, h, w, generator=g)
        weight, bias = torch.randn(c_out, c_in, k, k, generator=g) / k, torch.randn(c_out, generator=g)
        packed = kernels.pack_stem_weight_f32(weight.contiguous(memory_format=torch.channels_last))
        conv = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), stride, k // 2)
        for silu in (False, True):
            want = torch.nn.functional.silu(conv) if silu else conv
            for xin in (x, x.contiguous(memory_format=torch.channels_last)):
                got = kernels.stem_conv_f32(xin, packed, bias, k, stride, silu)
                assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == want.shape
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_stem_kernel_rejects_bad_arguments(built):
    lanes = kernels.depthwise_f32_lanes()
    x, weight = torch.randn(1, 3, 16, 16), torch.randn(lanes, 3, 3, 3)
    packed, bias = kernels.pack_stem_weight_f32(weight), torch.zeros(lanes)
    with pytest.raises(RuntimeError, match='1 to 4 input channels'):
        kernels.stem_conv_f32(torch.randn(1, 5, 16, 16), kernels.pack_stem_weight_f32(torch.randn(lanes, 5, 3, 3)),
                              bias, 3, 2, True)
    with pytest.raises(RuntimeError, match='at least'):
        kernels.stem_conv_f32(x, packed[:, :lanes - 1].contiguous(), bias[:lanes - 1], 3, 2, True)
    with pytest.raises(RuntimeError, match=r'packed weight'):
        kernels.stem_conv_f32(x, packed, bias, 5, 2, True)
    with pytest.raises(RuntimeError, match='stride 1 or 2'):
        kernels.stem_conv_f32(x, packed, bias, 3, 3, True)
    with pytest.raises(RuntimeError, match='float32 CPU'):
        kernels.stem_conv_f32(x.double(), packed, bias, 3, 2, True)
    with pytest.raises(RuntimeError, match='float32 biases'):
        kernels.stem_conv_f32(x, packed, torch.zeros(lanes + 1), 3, 2, True)


@needs_compiler
def test_deploy_runs_float32_depthwise_convs_in_the_kernel(built, monkeypatch):
    """Deployed depthwise convs call the kernel (stride 1 with the block's inner skip, stride 2 in the
    downsampling blocks, partial vectors); outputs match the oneDNN path and the training graph (every other
    variant's deploy parity: tests/test_deploy.py, which now runs through the kernels too)."""
    from emov2.layers.fused import FusedConv2d
    model = emov2.create_model('emov2_1m', num_classes=10).eval()
    fused, plain = _per_conv_kernels(emov2.deploy(model)), emov2.deploy(model, compiled_kernels=False)
    lanes = kernels.depthwise_f32_lanes()
    dw = [m for m in fused.modules() if isinstance(m, FusedConv2d) and m.f32_depthwise_kernel]
    fits = [m for m in dw if m.out_channels >= lanes]
    assert any(m.out_channels % lanes for m in fits)  # EMOv2-1M's 630 channels
    assert fits and {m.stride[0] for m in fits} == {1, 2}
    calls = []
    real = kernels.depthwise_conv_f32
    monkeypatch.setattr(kernels, 'depthwise_conv_f32', lambda *a: calls.append(a[4]) or real(*a))
    x = torch.randn(2, 3, 97, 83)
    with torch.inference_mode():
        got, want, ref = fused(x), plain(x), model(x)
    assert len(calls) == len(fits)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def _block_reference(x, w_exp, b_exp, act, w_dw, b_dw, k, stride, dw_silu, dw_skip, w_proj, b_proj, residual, eps):
    """The block kernel's definition in float64 PyTorch ops."""
    F = torch.nn.functional
    x = x.double()
    h = x if eps is None else F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2)
    y = F.conv2d(h, w_exp.double()[:, :, None, None], b_exp.double())
    y = {'none': y, 'swish': F.silu(y), 'gelu': F.gelu(y)}[act]
    z = F.conv2d(y, w_dw.double(), b_dw.double(), stride, k // 2, groups=y.shape[1])
    z = F.silu(z) if dw_silu else z
    z = z + y if dw_skip else z
    out = F.conv2d(z, w_proj.double()[:, :, None, None], None if b_proj is None else b_proj.double())
    return out + x if residual else out


BLOCK_CASES = [
    # batch, C_in, C_mid, C_out, H, W, k, stride, act, dw SiLU, skip + residual, LayerNorm eps, proj bias
    (1, 16, 64, 32, 40, 36, 5, 2, 'swish', True, False, None, False),  # EMOv2's downsampling blocks
    (2, 32, 64, 32, 13, 11, 5, 1, 'swish', True, True, None, True),    # stride-1 blocks: inner skip, residual
    (1, 48, 36, 80, 14, 14, 5, 2, 'gelu', True, False, 1e-6, False),   # LayerNorm + GELU (stage 3's first block)
    (3, 20, 36, 20, 9, 7, 3, 1, 'none', False, True, 1e-5, True),      # partial vectors, no activations
    (1, 8, 20, 12, 7, 7, 7, 2, 'gelu', True, False, None, True),       # a 7x7 filter wider than half the map
    (2, 24, 40, 24, 1, 1, 3, 1, 'swish', True, True, None, False),     # a 1x1 map: only the centre tap
]


@needs_compiler
@pytest.mark.parametrize('case', BLOCK_CASES, ids=[f'case{i}' for i in range(len(BLOCK_CASES))])
def test_block_kernel_matches_its_definition(built, case):
    """The fused expansion -> depthwise -> projection block against float64 convs, on channels-last and NCHW
    inputs, with threads splitting the rows (each thread refills its own ring of expanded rows)."""
    b, c_in, c_mid, c_out, h, w, k, stride, act, dw_silu, skip, eps, proj_bias = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c_in, h, w, generator=g) * 2
    w_exp, b_exp = torch.randn(c_mid, c_in, generator=g) / c_in ** 0.5, torch.randn(c_mid, generator=g)
    w_dw, b_dw = torch.randn(c_mid, 1, k, k, generator=g) / k, torch.randn(c_mid, generator=g)
    w_proj = torch.randn(c_out, c_mid, generator=g) / c_mid ** 0.5
    b_proj = torch.randn(c_out, generator=g) if proj_bias else None
    want = _block_reference(x, w_exp, b_exp, act, w_dw, b_dw, k, stride, dw_silu, skip, w_proj, b_proj, skip, eps)
    packed = kernels.pack_depthwise_weight_f32(w_dw)
    for layout in (torch.channels_last, torch.contiguous_format):
        got = kernels.mobile_block_f32(x.contiguous(memory_format=layout), w_exp.t().contiguous(), b_exp, act, packed,
                                       b_dw, k, stride, dw_silu, skip, w_proj.t().contiguous(), b_proj, skip, eps)
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-6


@needs_compiler
def test_block_kernel_rejects_bad_arguments(built):
    x = torch.randn(1, 16, 8, 8)
    w_exp, b_exp, w_proj = torch.randn(16, 32), torch.randn(32), torch.randn(32, 16)  # input-major
    packed, b_dw = kernels.pack_depthwise_weight_f32(torch.randn(32, 1, 5, 5)), torch.randn(32)
    ok = dict(x=x, w_exp=w_exp, b_exp=b_exp, act='swish', w_dw=packed, b_dw=b_dw, kernel_size=5, stride=1,
              dw_silu=True, dw_skip=True, w_proj=w_proj, b_proj=None, residual=True)
    assert kernels.mobile_block_f32(**ok).shape == (1, 16, 8, 8)
    bad = [(dict(w_exp=torch.randn(8, 32)), 'expansion weight'), (dict(b_exp=torch.randn(31)), 'expansion bias'),
           (dict(w_dw=packed[:9]), 'packed depthwise weight'), (dict(kernel_size=4), 'kernel size'),
           (dict(stride=3), 'stride'), (dict(dw_skip=False, stride=2), 'residual needs stride 1'),
           (dict(residual=False, stride=2), 'depthwise skip needs stride 1'),
           (dict(w_proj=torch.randn(32, 16).double()), 'projection weight'),
           (dict(x=x.double()), 'float32'), (dict(x=x[0]), r'CPU map, got \[16, 8, 8\]')]
    for change, message in bad:
        with pytest.raises(RuntimeError, match=message):
            kernels.mobile_block_f32(**{**ok, **change})
    with pytest.raises(KeyError):
        kernels.mobile_block_f32(**{**ok, 'act': 'relu'})


def _attention_block_reference(x, w_qk, b_qk, w_v, b_v, act, window, heads, modes, scale, w_dw, b_dw, k, dw_silu,
                               skip, w_proj, b_proj, eps):
    """The attention block kernel's definition in float64 PyTorch ops (the window attention of the layers)."""
    F = torch.nn.functional
    x = x.double()
    h = x if eps is None else F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2)
    qk = F.conv2d(h, w_qk.double()[:, :, None, None], b_qk.double())
    v = F.conv2d(h, w_v.double()[:, :, None, None], b_v.double())
    v = {'none': v, 'swish': F.silu(v), 'gelu': F.gelu(v)}[act]
    a = windowed_attention(qk, v, list(window), heads, list(modes), scale)
    z = F.conv2d(a, w_dw.double(), b_dw.double(), 1, k // 2, groups=a.shape[1])
    z = F.silu(z) if dw_silu else z
    z = z + a if skip else z
    out = F.conv2d(z, w_proj.double()[:, :, None, None], None if b_proj is None else b_proj.double())
    return out + x if skip else out


ATTENTION_BLOCK_CASES = [
    # batch, C, Cv, C_out, H, W, window, heads, act, k, dw SiLU, skip + residual, LayerNorm eps, proj bias, modes
    (1, 80, 240, 80, 14, 14, (7, 7), 4, 'gelu', 5, True, True, 1e-6, False, ('neighbour', 'distant')),  # 1M stage 3
    (3, 80, 240, 80, 14, 14, (7, 7), 4, 'gelu', 5, True, True, 1e-6, False, ('neighbour', 'distant')),
    (2, 36, 60, 36, 7, 7, (7, 7), 3, 'swish', 3, True, True, None, True, ('neighbour', 'distant')),  # one window
    (1, 24, 36, 16, 8, 12, (4, 3), 2, 'none', 7, False, False, 1e-5, True, ('distant',)),  # partial vectors
]


@needs_compiler
@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('case', ATTENTION_BLOCK_CASES, ids=[f'case{i}' for i in range(len(ATTENTION_BLOCK_CASES))])
def test_attention_block_kernel_matches_its_definition(built, case, threads):
    """The whole attention block in one op against float64 ops, on channels-last and NCHW inputs; with one and two
    threads, so both schedules run (whole images per thread when the batch covers the threads, else step by
    step over the batch)."""
    b, c, cv, c_out, h, w, window, heads, act, k, dw_silu, skip, eps, proj_bias, modes = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, c, h, w, generator=g)
    w_qk, b_qk = torch.randn(2 * c, c, generator=g) / c ** 0.5, torch.randn(2 * c, generator=g) / 4
    w_v, b_v = torch.randn(cv, c, generator=g) / c ** 0.5, torch.randn(cv, generator=g)
    w_dw, b_dw = torch.randn(cv, 1, k, k, generator=g) / k, torch.randn(cv, generator=g)
    w_proj = torch.randn(c_out, cv, generator=g) / cv ** 0.5
    b_proj = torch.randn(c_out, generator=g) if proj_bias else None
    scale = (c // heads) ** -0.5
    want = _attention_block_reference(x, w_qk, b_qk, w_v, b_v, act, window, heads, modes, scale, w_dw, b_dw, k,
                                      dw_silu, skip, w_proj, b_proj, eps)
    packed = kernels.pack_depthwise_weight_f32(w_dw)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for layout in (torch.channels_last, torch.contiguous_format):
            got = kernels.attention_block_f32(x.contiguous(memory_format=layout), w_qk.t().contiguous(), b_qk,
                                              w_v.t().contiguous(), b_v, act, list(window), heads, list(modes), scale,
                                              packed, b_dw, k, dw_silu, skip, w_proj.t().contiguous(), b_proj, skip,
                                              eps)
            assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
            assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-6
    finally:
        torch.set_num_threads(before)


@needs_compiler
def test_attention_block_kernel_rejects_bad_arguments(built):
    x = torch.randn(1, 16, 8, 8)
    packed = kernels.pack_depthwise_weight_f32(torch.randn(32, 1, 3, 3))
    ok = dict(x=x, w_qk=torch.randn(16, 32), b_qk=torch.randn(32), w_v=torch.randn(16, 32), b_v=torch.randn(32),
              act='gelu', window=[4, 4], num_heads=2, modes=['neighbour', 'distant'], scale=0.25, w_dw=packed,
              b_dw=torch.randn(32), kernel_size=3, dw_silu=True, dw_skip=True, w_proj=torch.randn(32, 16),
              b_proj=None, residual=True)
    assert kernels.attention_block_f32(**ok).shape == (1, 16, 8, 8)
    bad = [(dict(window=[3, 4]), 'not a multiple of the window'), (dict(num_heads=3), 'do not split into 3 heads'),
           (dict(w_qk=torch.randn(16, 16)), 'query/key weight'), (dict(b_v=torch.randn(31)), 'value bias'),
           (dict(w_dw=packed[:4]), 'packed depthwise weight'), (dict(kernel_size=4), 'kernel size'),
           (dict(w_proj=torch.randn(32, 8)), 'residual needs C_out == C_in'), (dict(modes=[]), 'no partitions'),
           (dict(x=x.double()), 'float32'), (dict(window=[4]), '2D window')]
    for change, message in bad:
        with pytest.raises(RuntimeError, match=message):
            kernels.attention_block_f32(**{**ok, **change})


def _deployed_kernel_calls(monkeypatch, kernel: str, x):
    """Deploys EMOv2-1M with the kernels and with oneDNN only, runs both and the training graph on ``x``, checks
    that they agree and returns the deployed blocks, the oneDNN-only model and the arguments of each call of
    ``kernels.<kernel>``."""
    model = emov2.create_model('emov2_1m', num_classes=10).eval()
    fused, plain = emov2.deploy(model), emov2.deploy(model, compiled_kernels=False)
    calls = []
    real = getattr(kernels, kernel)
    monkeypatch.setattr(kernels, kernel, lambda *a: calls.append(a) or real(*a))
    with torch.inference_mode():
        got, want, ref = fused(x), plain(x), model(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
    return [m for m in fused.modules() if isinstance(m, ImprovedInvertedResidualMobileBlock)], plain, calls


@needs_compiler
@pytest.mark.parametrize('batch', [1, 2])
def test_deploy_runs_attention_blocks_in_one_kernel(built, monkeypatch, batch):
    """At 224 px (stage maps 14 x 14 and 7 x 7, whole 7 x 7 windows) every deployed EMOv2 attention block is one
    attention-block kernel call; outputs match the oneDNN path and the training graph. Maps that need window
    padding keep the per-op path (the conv-block test below runs at 97 x 83)."""
    blocks, _, calls = _deployed_kernel_calls(monkeypatch, 'attention_block_f32', torch.randn(batch, 3, 224, 224))
    assert len(calls) == sum(m.has_attention for m in blocks) > 0
    assert {tuple(a[0].shape[2:]) for a in calls} == {(14, 14), (7, 7)}


@needs_compiler
@pytest.mark.parametrize('batch', [1, 2])
def test_deploy_runs_conv_blocks_in_the_block_kernel(built, monkeypatch, batch):
    """Every deployed EMOv2 block without attention (stage 1-2 blocks, the downsampling blocks, the LayerNorm
    block that opens stage 3) is one block-kernel call; outputs match the oneDNN path and the training graph."""
    blocks, plain, calls = _deployed_kernel_calls(monkeypatch, 'mobile_block_f32', torch.randn(batch, 3, 97, 83))
    assert all(m.fused_block for m in blocks)  # attention blocks: see test_deploy_runs_attention_blocks_in_one_kernel
    assert not any(m.fused_block for m in plain.modules() if isinstance(m, ImprovedInvertedResidualMobileBlock))
    assert len(calls) == sum(not m.has_attention for m in blocks) > 0
    assert {a[7] for a in calls} == {1, 2} and any(a[13] is not None for a in calls)  # strides; a LayerNorm block


@needs_compiler
def test_block_kernels_follow_in_place_parameter_edits(built):
    """The block kernels' arguments (folded matrices, packed depthwise weights) are cached per parameter version:
    after in-place edits of a deployed block's parameters the kernel computes with the new values, as the
    per-op path does."""
    torch.manual_seed(0)
    model = emov2.deploy(emov2.create_model('emov2_1m', num_classes=10, depths=[1, 2, 2, 1]).eval())
    blocks = [m for m in model.modules() if isinstance(m, ImprovedInvertedResidualMobileBlock) and m.fused_block]
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.setdefault(m, a[0])) for b in blocks]
    with torch.inference_mode():
        model(torch.randn(1, 3, 112, 112))  # stage maps down to 7 x 7: whole windows
        for h in hooks:
            h.remove()
        assert all(b._block_params._sources for b in blocks) and any(b.has_attention for b in blocks)
        for b in blocks:
            x = inputs[b]
            before = b(x)
            b.proj.weight.add_(0.01)  # in place: a weight (LayerScale is folded in), a bias, a LayerNorm affine
            b.dw.bias.add_(0.1)
            if b.has_attention:
                b.mixer.v.weight.mul_(-1.0)
                b.norm.weight.add_(0.2)
            got = b(x)
            b.fused_block = False
            want = b(x)
            assert ((got - before).abs().max() / before.abs().max()).item() > 1e-2
            assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@needs_compiler
def test_compiled_deployed_model_runs_the_kernels_and_matches(built):
    """torch.compile (inductor, weight freezing) of the deployed model keeps the kernels as ops in its graph and
    gives the eager deployed model's outputs."""
    from emov2.tools.quantize import compile_frozen
    model = emov2.deploy(emov2.create_model('emov2_1m', num_classes=10).eval())
    x = torch.randn(1, 3, 224, 224)  # whole windows: attention blocks run the attention-block kernel
    with torch.inference_mode():
        want = model(x)
        got = compile_frozen(model)(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@needs_compiler
def test_blocks_narrower_than_a_vector_keep_the_per_conv_path(built):
    """A deployed block whose expanded width is below the kernels' vector width (4 < 8 channels) runs the
    per-conv path instead of failing in the block kernel, and matches the training graph."""
    blocks = torch.nn.Sequential(ImprovedInvertedResidualMobileBlock(2, 2, exp_ratio=2.0),
                                 ImprovedInvertedResidualMobileBlock(2, 4, exp_ratio=3.0, stride=2, residual=False))
    blocks.eval()
    deployed = emov2.deploy(blocks)
    x = torch.randn(1, 2, 16, 16)
    with torch.inference_mode():
        want, got = blocks(x), deployed(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
