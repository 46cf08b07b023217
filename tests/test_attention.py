"""Spanning window attention against a naive per-window, per-head loop; partitions; Sec. 3.2.2."""
import itertools

import pytest
import torch
from torch import nn

from emov2.layers import SpanningWindowAttention, pad_to_window, window_partition, window_reverse


def naive_window_attention(qk, v, window, num_heads, mode):
    """Literal transcription of the spec: loop over windows and heads, softmax(QK^T * scale) V."""
    _, c2, hp, wp = qk.shape
    c = c2 // 2
    n1, n2 = hp // window, wp // window
    dh, dv = c // num_heads, v.shape[1] // num_heads
    out = torch.zeros_like(v)
    for a, b in itertools.product(range(n1), range(n2)):
        if mode == 'neighbour':
            pix = [(a * window + r, b * window + s) for r in range(window) for s in range(window)]
        else:
            pix = [(r * n1 + a, s * n2 + b) for r in range(window) for s in range(window)]
        rows = torch.tensor([p[0] for p in pix])
        cols = torch.tensor([p[1] for p in pix])
        for h in range(num_heads):
            q = qk[:, h * dh:(h + 1) * dh, rows, cols].transpose(1, 2)           # B, L, dh
            k = qk[:, c + h * dh:c + (h + 1) * dh, rows, cols].transpose(1, 2)
            val = v[:, h * dv:(h + 1) * dv, rows, cols].transpose(1, 2)
            attn = torch.softmax(q @ k.transpose(1, 2) * dh ** -0.5, dim=-1)
            out[:, h * dv:(h + 1) * dv, rows, cols] += (attn @ val).transpose(1, 2)
    return out


@pytest.mark.parametrize('size,window', [((9, 11), 4), ((7, 7), 7), ((5, 13), 3), ((14, 10), 7)])
@pytest.mark.parametrize('partitions', [('neighbour', 'distant'), ('neighbour',), ('distant',)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_spanning_attention_matches_naive_loop(size, window, partitions, channels_last):
    dim, dim_out, dim_head = 12, 18, 4
    attn = SpanningWindowAttention(dim, dim_out, dim_head, window, partitions).double().eval()
    x = torch.randn(2, dim, *size, dtype=torch.float64)
    if channels_last:
        attn = attn.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = attn(x)
        xp = pad_to_window(x, [window, window])
        qk, v = attn.qk(xp), attn.act(attn.v(xp))
        want = sum(naive_window_attention(qk, v, window, attn.num_heads, m) for m in partitions)
        want = want[:, :, :size[0], :size[1]]
    assert got.shape == (2, dim_out, *size)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_pre_attention_matches_naive_loop():
    """EMOv1 style: attention mixes the block input, then v (+act) expands the result."""
    dim, dim_out, dim_head, window, size = 8, 16, 4, 3, (5, 7)
    attn = SpanningWindowAttention(dim, dim_out, dim_head, window, ('distant',), value_position='pre').double()
    x = torch.randn(1, dim, *size, dtype=torch.float64)
    with torch.no_grad():
        xp = pad_to_window(x, [window, window])
        mixed = naive_window_attention(attn.qk(xp), xp, window, attn.num_heads, 'distant')
        want = attn.act(attn.v(mixed[:, :, :size[0], :size[1]]))
        torch.testing.assert_close(attn(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('mode', ['neighbour', 'distant'])
@pytest.mark.parametrize('shape,window', [((2, 3, 8, 12), [4, 3]), ((1, 2, 4, 10, 15), [2, 5, 5])])
def test_partition_round_trip_and_membership(mode, shape, window):
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
    parts = window_partition(x, window, mode)
    grid = [s // w for s, w in zip(shape[2:], window)]
    assert parts.shape == (shape[0] * torch.tensor(grid).prod().item(), shape[1], torch.tensor(window).prod().item())
    assert torch.equal(window_reverse(parts, list(shape[2:]), window, mode), x)
    # the first window of the first image holds pixels a*w+r (neighbour) or r*n+a (distant), a = 0
    ranges = [range(w) for w in window]
    for t, idx in enumerate(itertools.product(*ranges)):
        pix = tuple(i if mode == 'neighbour' else i * n for i, n in zip(idx, grid))
        assert parts[0, 0, t] == x[(0, 0) + pix]


def test_3d_spanning_attention_runs_with_odd_sizes():
    attn = SpanningWindowAttention(8, 16, 4, (2, 5, 5), spatial_dims=3)
    out = attn(torch.randn(2, 8, 3, 9, 11))
    assert out.shape == (2, 16, 3, 9, 11)


@pytest.mark.parametrize('partitions,bias', [(('distant',), True), (('neighbour',), True),
                                             (('neighbour', 'distant'), False)])
def test_attention_position_equivalence_proposition(partitions, bias):
    """Sec. 3.2.2: with MLP_e grouped by heads and no non-linearity, attention before or after
    MLP_e gives the same result; with a dense MLP_e it does not. (Attention rows sum to one, so a
    value bias passes through one attention unchanged; summing two partitions counts it twice in
    'post' and once in 'pre', hence no bias for the spanning case.)"""
    dim, dim_out, dim_head, window = 12, 24, 4, 4
    heads = dim // dim_head
    post = SpanningWindowAttention(dim, dim_out, dim_head, window, partitions, 'post', nn.Identity,
                                   bias=bias, value_groups=heads).double()
    pre = SpanningWindowAttention(dim, dim_out, dim_head, window, partitions, 'pre', nn.Identity,
                                  bias=bias, value_groups=heads).double()
    pre.load_state_dict(post.state_dict())
    x = torch.randn(2, dim, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(post(x), pre(x), rtol=1e-10, atol=1e-10)
        dense_post = SpanningWindowAttention(dim, dim_out, dim_head, window, partitions, 'post', nn.Identity).double()
        dense_pre = SpanningWindowAttention(dim, dim_out, dim_head, window, partitions, 'pre', nn.Identity).double()
        dense_pre.load_state_dict(dense_post.state_dict())
        assert not torch.allclose(dense_post(x), dense_pre(x), rtol=1e-4, atol=1e-4)


def test_invalid_attention_arguments():
    with pytest.raises(ValueError, match='dim_head'):
        SpanningWindowAttention(10, 20, dim_head=4)
    with pytest.raises(ValueError, match='partitions'):
        SpanningWindowAttention(8, 8, 4, partitions=('diagonal',))


@pytest.mark.parametrize('modes', [['neighbour', 'distant'], ['distant'], ['neighbour']])
def test_traced_2d_attention_matches_eager_and_keeps_rank_at_most_5(modes):
    """Under jit tracing (the Core ML exporter's path) 2D windows go through tensors of rank <= 5."""
    from emov2.layers.window_attention import windowed_attention

    qk, v = torch.randn(2, 24, 14, 21), torch.randn(2, 18, 14, 21)
    fn = lambda a, b: windowed_attention(a, b, [7, 7], 3, modes)  # noqa: E731
    traced = torch.jit.trace(fn, (qk, v), check_trace=False)
    assert max(len(n.output().type().sizes() or []) for n in traced.graph.nodes()
               if n.outputsSize() == 1 and n.output().type().kind() == 'TensorType'
               and n.output().type().sizes() is not None) <= 5
    qk2, v2 = torch.randn(3, 24, 14, 21), torch.randn(3, 18, 14, 21)  # another batch size
    torch.testing.assert_close(traced(qk2, v2), fn(qk2, v2))
