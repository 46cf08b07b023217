"""The goldens of ../shared/reference reproduce through the official-checkpoint loader."""
import pytest
import torch

import emov2


def _forward(model, x):
    """Logits and the stem + stage 1-4 outputs from one pass."""
    seen = []
    hook = model.stem.register_forward_hook(lambda m, i, o: seen.append(o))
    final, stages = model.forward_intermediates(x)
    hook.remove()
    return model.forward_head(final), seen + stages


@pytest.mark.parametrize('variant', ['emov2_1m', 'emov1_1m'])
@pytest.mark.parametrize('dtype,rtol', [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_golden_outputs(variant, dtype, rtol, reference_dir, official_weights, manifest, tmp_path):
    golden = torch.load(reference_dir / f'golden_{variant}_224.pt', weights_only=True)
    sd = official_weights.synth_state_dict(manifest(variant), golden['weight_seed'])
    path = tmp_path / 'official.pth'
    torch.save(sd, path)  # a bare official state dict
    model = emov2.create_model(variant, checkpoint=path).to(dtype).eval()
    x = official_weights.synth_input(golden['input_shape'], golden['input_seed']).to(dtype)
    with torch.no_grad():
        logits, feats = _forward(model, x)
    ref = golden['logits']
    assert ((logits.double() - ref).abs().max() / ref.abs().max()).item() < rtol
    for i, f in enumerate(feats):
        r = golden['features'][f'stage{i}']
        assert f.shape == r.shape
        assert ((f.double() - r).abs().max() / r.abs().max()).item() < rtol, f'stage{i}'


def test_official_net_and_ema_are_picked(reference_dir, official_weights, manifest, tmp_path):
    golden = torch.load(reference_dir / 'golden_emov2_1m_224.pt', weights_only=True)
    good = official_weights.synth_state_dict(manifest('emov2_1m'), golden['weight_seed'])
    other = official_weights.synth_state_dict(manifest('emov2_1m'), golden['weight_seed'] + 1)
    path = tmp_path / 'train_state.pth'
    torch.save({'net': other, 'net_E': good, 'epoch': 3}, path)
    x = official_weights.synth_input(golden['input_shape'], golden['input_seed'])
    with torch.no_grad():
        ema = emov2.create_model('emov2_1m', checkpoint=path, use_ema=True).double().eval()(x)
        raw = emov2.create_model('emov2_1m', checkpoint=path).double().eval()(x)
    assert torch.allclose(ema, golden['logits'], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(raw, golden['logits'], rtol=1e-3, atol=1e-3)
