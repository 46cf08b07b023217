"""emov2.deploy: folded, channels-last, fused model gives the training-graph model's outputs."""
import pytest
import torch

import emov2
from emov2 import kernels
from emov2.deploy import FusedConv2d, MicroBatched
from emov2.layers.fused import DerivedParams
from emov2.layers import ImprovedInvertedResidualMobileBlock


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize('name', emov2.list_models('emo'))
def test_deploy_matches_reference_every_variant(name):
    ref = emov2.create_model(name).eval()
    for m in ref.modules():  # non-trivial norm statistics and layer scales so that folding is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.running_var, 0.5, 2.0)
            torch.nn.init.normal_(m.running_mean, 0, 0.2)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
        if hasattr(m, 'gamma'):
            torch.nn.init.uniform_(m.gamma, 0.1, 0.5)
    dep = emov2.deploy(ref)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in dep.modules())
    assert any(isinstance(m, ImprovedInvertedResidualMobileBlock) and m.fused_output for m in dep.modules())
    sizes = [(64, 64), (45, 71)] if name.endswith(('20m', '50m')) else [(96, 96), (45, 71), (33, 50)]
    with torch.inference_mode():
        for size in sizes:
            x = torch.randn(2, 3, *size)
            want = ref(x)
            got = dep(x)
            assert _rel(got, want) < 1e-4, (name, size)
            assert [t.shape for t in dep.forward_intermediates(x, intermediates_only=True)] == \
                [t.shape for t in ref.forward_intermediates(x, intermediates_only=True)]


@pytest.mark.parametrize('fuse', [True, False])
def test_deploy_paths_and_switches(fuse):
    for switches in [dict(attention_position='pre'), dict(operator_fusion='parallel'), dict(attention='none'),
                     dict(attention_stages=(1, 2, 3, 4))]:
        ref = emov2.create_model('emov2_1m', **switches).eval()
        dep = emov2.deploy(ref, fuse=fuse)
        assert any(isinstance(m, FusedConv2d) for m in dep.modules()) == fuse
        x = torch.randn(2, 3, 70, 50)
        with torch.inference_mode():
            assert _rel(dep(x), ref(x)) < 1e-4, switches


def test_deploy_falls_back_outside_onednn():
    """float64 (no oneDNN kernel) takes the plain path and matches to float64 precision."""
    ref = emov2.create_model('emov2_1m').double().eval()
    dep = emov2.deploy(ref)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        assert _rel(dep(x), ref(x)) < 1e-10


def test_deploy_leaves_the_original_untouched_and_scripts():
    ref = emov2.create_model('emov1_1m').eval()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    dep = emov2.deploy(ref)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in before.items())
    scripted = torch.jit.script(dep)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert _rel(scripted(x), ref(x)) < 1e-4
    with pytest.raises(TypeError):
        emov2.deploy(ref.state_dict())


@pytest.mark.parametrize('budget', [1, 200_000, 0])
def test_micro_batched_stages_match(budget):
    """Stages over batch slices (1 byte: one image per slice) give the whole-batch result."""
    ref = emov2.create_model('emov2_1m').eval()
    dep = emov2.deploy(ref, micro_batch_bytes=budget)
    wrappers = [m for m in dep.modules() if isinstance(m, MicroBatched)]
    assert len(wrappers) == (4 if budget else 0)  # the four stages (the stem runs at the head of stage 1)
    assert all(m.budget_bytes == budget and not m.training for m in wrappers)
    calls = []
    for m in wrappers:
        m.module.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(5, 3, 67, 64)
    with torch.inference_mode():
        assert _rel(dep(x), ref(x)) < 1e-4
    if budget == 1:
        assert calls == [1] * 20  # every stage ran image by image
    elif budget == 200_000:
        assert 4 < len(calls) < 20 and sum(calls) == 20


def test_batch_slices_are_for_cpu_only(monkeypatch):
    """Off the CPU (GPU, or here the meta device) a deployed model runs whole batches."""
    dep = emov2.deploy(emov2.create_model('emov2_1m')).to('meta')
    monkeypatch.setattr(MicroBatched, 'slice_size', lambda *a: pytest.fail('sliced off the CPU'))
    with torch.inference_mode():
        out = dep(torch.empty(4, 3, 64, 64, device='meta'))
    assert out.shape == (4, 1000) and out.device.type == 'meta'


def test_deploy_under_bf16_autocast():
    """oneDNN kernels follow CPU autocast to bfloat16 (close to fp32, not equal)."""
    ref = emov2.create_model('emov2_1m').eval()
    dep = emov2.deploy(ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want = ref(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = dep(x)
    assert got.dtype == torch.bfloat16
    assert 0 < _rel(got.float(), want) < 5e-2


def test_derived_params_follow_in_place_updates_and_replacements():
    """The caches of packed / cast / folded weights are rebuilt when any source (bias included) changes in place
    or is replaced, and reused otherwise."""
    cache, made = DerivedParams(), []
    w, b = torch.randn(4, 3), torch.randn(4)

    def make():
        made.append(1)
        return [w * 2, b + 1]

    first = cache.get([w, b, None], make)
    assert cache.get([w, b, None], make) is first and len(made) == 1
    b.add_(1.0)  # in place: the version counter moves
    assert torch.equal(cache.get([w, b, None], make)[1], b + 1) and len(made) == 2
    w = torch.randn(4, 3)  # replaced: a new storage
    assert torch.equal(cache.get([w, b, None], make)[0], w * 2) and len(made) == 3


def test_derived_params_see_a_replacement_at_the_old_address():
    """A replaced source is seen even where the allocator would hand its memory to the replacement: the cache holds
    its sources (and compares identity), so the old memory cannot be reused while the cache refers to it."""
    cache = DerivedParams()
    w = torch.randn(64, 64)
    cache.get([w], lambda t=w: [t.clone()])
    address = w.data_ptr()
    del w
    w2 = torch.randn(64, 64)
    assert w2.data_ptr() != address  # held by the cache, so not reused
    assert torch.equal(cache.get([w2], lambda: [w2.clone()])[0], w2)


def test_deploy_in_inference_mode():
    """A model built, deployed and run inside torch.inference_mode() (inference tensors have no version counter,
    which the kernels' weight caches read) matches the eager model, in float32 and under bf16 autocast."""
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = emov2.create_model('emov2_1m').eval()
        for block in ref.modules():  # LayerScale starts at 1e-6: let every block count
            if hasattr(block, 'gamma'):
                block.gamma.fill_(1.0)
        dep = emov2.deploy(ref)
        assert _rel(dep(x), ref(x)) < 1e-4
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert _rel(dep(x).float(), ref(x)) < 5e-2


def test_deployed_kernels_refuse_oversized_windows_like_eager():
    """A window far larger than the map is refused before allocating by the kernel path too, as in eager."""
    ref = emov2.create_model('emov2_1m', window_size=100).eval()
    dep = emov2.deploy(ref)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        for model in (ref, dep):
            with pytest.raises(ValueError, match='would need'):
                model(x)


def test_bf16_weight_copies_follow_in_place_weight_updates():
    """FusedConv2d caches bf16 copies of its weights for autocast; an in-place update must refresh them."""
    conv = FusedConv2d(torch.nn.Conv2d(8, 16, 1), torch.nn.SiLU()).eval()
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        before = conv(x).float()
    with torch.no_grad():
        conv.weight.mul_(-1.0)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        after = conv(x).float()
    with torch.no_grad():
        want = torch.nn.functional.silu(torch.nn.functional.conv2d(x, conv.weight, conv.bias))
    assert not torch.allclose(before, after)
    assert _rel(after, want) < 2e-2


@pytest.mark.parametrize('batch', [1, 2])
def test_deployed_model_is_one_graph_for_torch_compile(batch):
    """No graph breaks: oneDNN calls give way to plain convs; where emov2.kernels builds, the block kernel, the
    depthwise convs, window attention and (at batch 1) the 1x1 convs enter the graph as custom ops."""
    import torch._dynamo

    model = emov2.deploy(emov2.create_model('emov2_1m', num_classes=10))
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(torch.randn(batch, 3, 64, 64))
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == 'call_function'}
    want = {'mobile_block_f32', 'depthwise_conv_f32', 'window_attention'} | ({'pointwise_conv_f32'} if batch == 1
                                                                               else set())
    if kernels.available():
        assert want <= {o.split('.')[1] for o in ops if o.startswith('emov2_kernels.')}, sorted(ops)
