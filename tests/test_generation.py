"""Generation (issue 14): DiT's hybrid loss pieces against hand values, the VAE latent path with a
tiny random AutoencoderKL, training on the shared Trainer, sampling, metrics and the CLI."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm
from typer.testing import CliRunner

from emov2.cli import app
from emov2.cli import generate as generate_cli  # registers `emov2 generate` (until the lead imports it)
from emov2.generation import (GenerationImageFolder, GenerationTask, LearnedVarianceVLB, discretized_gaussian_log_likelihood,
                              load_generator, make_scheduler, normal_kl)
from emov2.generation.metrics import PixelMLPClassifier, fid, frechet_distance, generation_scores
from emov2.train import Trainer, load_config
from emov2.train.data import collate_skip

TINY = {'hidden_size': 32, 'num_heads': 2, 'depth': 2}


def _task(name='d_emov2_s_2', size=8, learn_sigma=True, **diff):
    kwargs = dict(TINY, **({'block_args': {'window_size': 4}} if name.startswith('d_emov2') else {}))
    cfg = {'model': {'name': name, 'num_classes': 10, 'kwargs': kwargs},
           'diffusion': {'image_size': size, 'channels': 1, 'learn_sigma': learn_sigma, **diff}}
    task = GenerationTask(cfg)
    torch.manual_seed(0)
    return task, task.build_model(task.cfg)


def _randomise_zero_inits(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'modulation' in name or 'final_layer' in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# --- VLB / hybrid loss pieces --------------------------------------------------------------------
def test_normal_kl_hand_values():
    z = torch.zeros(3)
    assert torch.allclose(normal_kl(z, z, z, z), z)
    # KL(N(1, 1) || N(0, 4)) = 0.5 * (-1 + log 4 + 1/4 + 1/4)
    kl = normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(math.log(4.0)))
    assert kl.item() == pytest.approx(0.5 * (math.log(4.0) - 0.5), rel=1e-6)


def test_discretized_gaussian_log_likelihood_hand_values():
    s = 0.1
    x = torch.tensor([0.0, 1.0, -1.0, 0.3])
    mean = torch.tensor([0.0, 0.9, -1.0, 0.25])
    got = discretized_gaussian_log_likelihood(x, mean, torch.full_like(x, math.log(s)))
    want = [math.log(norm.cdf(1 / 255 / s) - norm.cdf(-1 / 255 / s)),       # interior bin
            math.log(1 - norm.cdf((1.0 - 1 / 255 - 0.9) / s)),              # top bin takes the upper tail
            math.log(norm.cdf(1 / 255 / s)),                                  # bottom bin takes the lower tail
            math.log(norm.cdf((0.05 + 1 / 255) / s) - norm.cdf((0.05 - 1 / 255) / s))]
    assert got.tolist() == pytest.approx(want, rel=1e-5)


def test_posterior_and_learned_range_two_step_schedule():
    """betas (0.1, 0.2): abar = (0.9, 0.72); posterior variance at t=1 is 0.2 * 0.1 / 0.28."""
    vlb = LearnedVarianceVLB(torch.tensor([0.1, 0.2]))
    pv = 0.2 * 0.1 / 0.28
    assert vlb.posterior_log_variance_clipped.tolist() == pytest.approx([math.log(pv)] * 2)
    x0, noise = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), -0.3)
    t = torch.tensor([1])
    xt = math.sqrt(0.72) * x0 + math.sqrt(0.28) * noise
    mean, _ = vlb.q_posterior(x0, xt, t)
    want_mean = 0.2 * math.sqrt(0.9) / 0.28 * 0.5 + 0.1 * math.sqrt(0.8) / 0.28 * xt.item()
    assert mean.item() == pytest.approx(want_mean, rel=1e-6)
    # exact eps: v = -1 gives the posterior itself (KL 0), v = +1 the variance beta_t (hand KL)
    assert vlb.vb_terms_bpd(noise, torch.full_like(x0, -1.0), x0, xt, t).item() == pytest.approx(0.0, abs=1e-9)
    kl = 0.5 * (-1 + math.log(0.2) - math.log(pv) + pv / 0.2) / math.log(2)
    assert vlb.vb_terms_bpd(noise, torch.ones_like(x0), x0, xt, t).item() == pytest.approx(kl, rel=1e-6)
    # t = 0: the decoder NLL of x0 under N(mean, sigma^2) in bits
    t0 = torch.tensor([0])
    xt0 = math.sqrt(0.9) * x0 + math.sqrt(0.1) * noise
    nll = vlb.vb_terms_bpd(noise, torch.ones_like(x0), x0, xt0, t0).item()
    m, s = 0.5, math.sqrt(0.1)  # predicted x0 exact -> mean x0; v=1 -> variance beta_0
    want = -math.log(norm.cdf((1 / 255) / s) - norm.cdf((-1 / 255) / s)) / math.log(2)
    assert nll == pytest.approx(want, rel=1e-5) and m == 0.5


def test_learned_range_matches_diffusers_sampler():
    """The variance we train is the one diffusers' DDPMScheduler(learned_range) samples with."""
    sched = make_scheduler('ddpm', 1000, learned_variance=True)
    vlb = LearnedVarianceVLB(sched.betas)
    x = torch.zeros(1, 1, 1, 1)
    for t, v in ((999, 0.3), (500, -0.7), (7, 0.0)):
        ours = vlb.p_mean_log_variance(x, torch.full_like(x, v), x, torch.tensor([t]))[1].item()
        theirs = sched._get_variance(t, predicted_variance=torch.tensor(v)).item()
        assert ours == pytest.approx(theirs, rel=1e-4), t


class _FixedOutput(torch.nn.Module):
    """A 'model' whose output is two parameters: eps and the variance channel."""

    def __init__(self, shape):
        super().__init__()
        self.eps = torch.nn.Parameter(torch.randn(shape))
        self.v = torch.nn.Parameter(torch.zeros(shape))
        self.in_channels, self.learn_sigma = shape[1], True

    def forward(self, x, t, y, **_):
        return torch.cat([self.eps, self.v], 1)


def test_hybrid_loss_stops_the_mean_gradient_in_the_vlb_term():
    task, _ = _task()
    fake = _FixedOutput((4, 1, 8, 8))
    x0, y, t = torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4), torch.tensor([0, 3, 400, 999])
    terms = task.diffusion_terms(fake, x0, y, t=t)
    terms['vb'].sum().backward()
    assert fake.eps.grad is None or torch.count_nonzero(fake.eps.grad) == 0
    assert torch.count_nonzero(fake.v.grad) > 0
    fake.zero_grad()
    terms = task.diffusion_terms(fake, x0, y, t=t)
    terms['mse'].sum().backward()
    assert torch.count_nonzero(fake.eps.grad) > 0 and (fake.v.grad is None or torch.count_nonzero(fake.v.grad) == 0)
    assert torch.allclose(terms['loss'], terms['mse'] + terms['vb'])


# --- training, sampling --------------------------------------------------------------------------
def _digits(size=8):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    return x, torch.tensor(d.target)


def test_short_run_lowers_the_loss_on_digits():
    task, model = _task()
    x0, y = _digits()
    val = [(x0[:256], y[:256], 0)]
    before = task.evaluate(model, val, torch.device('cpu'))
    assert before['n'] == 256 and before['neg_loss'] == -before['loss'] and before['vb'] > 0
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(x0), (32,), generator=g)
        loss, _ = task.loss(model, x0[idx], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task.evaluate(model, val, torch.device('cpu'))
    assert after['mse'] < 0.8 * before['mse'] and after['loss'] < before['loss'], (before, after)


@pytest.mark.parametrize('scheduler,cfg_scale', [('ddpm', 1.0), ('ddpm', 3.0), ('ddim', 2.0)])
def test_sampling_is_deterministic_under_a_seed(scheduler, cfg_scale):
    task, model = _task()
    _randomise_zero_inits(model)
    run = lambda seed: task.sample(model, [0, 3, 9], steps=4, cfg_scale=cfg_scale, scheduler=scheduler,  # noqa: E731
                                   generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert model.training


def test_cfg_scale_one_is_the_conditional_sampler():
    task, model = _task()
    _randomise_zero_inits(model)
    a = task.sample(model, [1, 2], steps=3, cfg_scale=1.0, scheduler='ddpm', generator=torch.Generator().manual_seed(5))
    b = task.sample(model, [1, 2], steps=3, cfg_scale=1.0 + 1e-9, scheduler='ddpm',
                    generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-4)


def test_recipe_defaults_are_dits():
    cfg = load_config(None, [], defaults=GenerationTask.defaults)
    assert cfg['optim']['lr'] == 1e-4 and cfg['optim']['weight_decay'] == 0.0 and cfg['optim']['batch_size'] == 256
    assert cfg['ema']['decay'] == 0.9999 and cfg['sched']['name'] == 'constant'
    assert cfg['diffusion']['learn_sigma'] and cfg['diffusion']['class_dropout'] == 0.1
    with pytest.raises(ValueError, match='diffusion.vae'):
        GenerationTask(load_config(None, ['diffusion.space=latent'], defaults=GenerationTask.defaults))
    with pytest.raises(ValueError, match='diffusion.sampler'):
        GenerationTask(load_config(None, ['diffusion.sampler=euler'], defaults=GenerationTask.defaults))


# --- image folders and the VAE latent path ------------------------------------------------------
def _image_folder(root, n=3, size=20, corrupt=True):
    rng = np.random.default_rng(0)
    for c in ('cat', 'dog'):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f'{i}.png')
    if corrupt:
        (root / 'dog' / 'broken.png').write_bytes(b'not a png at all')
    return root


def test_image_folder_skips_and_counts_a_corrupt_file(tmp_path):
    ds = GenerationImageFolder(_image_folder(tmp_path / 'imgs'), image_size=8, channels=1)
    assert ds.classes == ['cat', 'dog'] and len(ds) == 7
    images, labels, skipped = collate_skip([ds[i] for i in range(len(ds))])
    assert skipped == 1 and images.shape == (6, 1, 8, 8) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert images.min() >= -1 and images.max() <= 1
    with pytest.raises(FileNotFoundError, match='not found'):
        GenerationImageFolder(tmp_path / 'nope', 8)


@pytest.fixture
def tiny_vae(tmp_path):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2,
                        up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16)
    vae.save_pretrained(tmp_path / 'vae')
    return tmp_path / 'vae'


def test_latent_space_trains_on_the_trainer_and_samples_decoded_images(tmp_path, tiny_vae):
    """Image folder (one corrupt file) -> VAE latents on the fly -> Trainer steps -> checkpoint set ->
    load_generator (EMA) -> sample latents -> decode to images."""
    data = _image_folder(tmp_path / 'imgs', n=4, size=16)
    cfg = load_config(None, [
        f'data.root={data}', 'data.workers=0', f'diffusion.vae={tiny_vae}', 'diffusion.image_size=16',
        'model.name=d_emov2_s_2', f'model.kwargs={json.dumps(dict(TINY, block_args={"window_size": 4}))}',
        'optim.batch_size=4', 'optim.lr=1e-3', 'sched.epochs=2', 'eval.every=0', 'train.amp=false',
        'train.progress=false', 'eval.precise_bn_images=4', f'train.out={tmp_path / "run"}'],
        defaults=GenerationTask.defaults)
    task = GenerationTask(cfg)
    assert task.space == 'latent' and task.input_size == 8 and task.model_channels == 4
    assert task.codec.scaling_factor == pytest.approx(0.18215)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = task.encode(x)
    assert z.shape == (2, 4, 8, 8) and task.decode(z).shape == (2, 3, 16, 16)
    result = Trainer(cfg, task=task).fit()
    assert result.global_step == 4 and result.skipped_images >= 1  # 9 files, 1 unreadable: 2 batches x 2 epochs
    meta_task, model, meta = load_generator(tmp_path / 'run', use_ema=True)
    assert meta['task'] == 'generation' and meta['class_names'] == ['cat', 'dog'] and meta['diffusion']['space'] == 'latent'
    assert model.in_channels == 4 and model.input_size == 8 and model.num_classes == 2
    latents = meta_task.sample(model, [0, 1], steps=2, scheduler='ddpm', decode=False,
                               generator=torch.Generator().manual_seed(0))
    images = meta_task.decode(latents)
    assert latents.shape == (2, 4, 8, 8) and images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


# --- metrics -------------------------------------------------------------------------------------
def test_frechet_distance_hand_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    mu = np.array([1.0, -2.0, 0.5, 0.0])
    assert frechet_distance(a, a + mu) == pytest.approx(float(mu @ mu), rel=1e-6)  # same covariance
    s = np.cov(a, rowvar=False)  # b = 2a: Tr(S + 4S - 2 * 2S) = Tr(S), same (zero) mean shift
    assert frechet_distance(a, 2 * a) == pytest.approx(float(np.trace(s) + 0.0 + (a.mean(0) @ a.mean(0))), rel=1e-5)
    # independent Gaussians N(0, I) vs N(m, 4I) in 2-D: |m|^2 + 2 * (1 + 4 - 2 * 2) = |m|^2 + 2
    b = rng.normal(size=(200_000, 2)) * 2 + np.array([3.0, 0.0])
    c = rng.normal(size=(200_000, 2))
    assert frechet_distance(c, b) == pytest.approx(9.0 + 2.0, rel=0.02)
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :3])


def test_classifier_scores_real_digits_above_noise():
    x, y = _digits(16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # sklearn's ConvergenceWarning at 200 iterations
        clf = PixelMLPClassifier(size=8, hidden=32, max_iter=200).fit(x[:1200], y[:1200].tolist())
        real = generation_scores(clf, x[1200:1500], y[1200:1500].tolist(), x[:1200])
        noise = generation_scores(clf, torch.randn(300, 1, 16, 16).clamp(-1, 1), y[1200:1500].tolist(), x[:1200])
    assert real['accuracy'] > 85 and noise['accuracy'] < 40 and real['fd'] < noise['fd']


def test_fid_says_what_is_missing(tmp_path):
    with pytest.raises(RuntimeError, match='torch-fidelity|Inception weights'):
        fid(tmp_path, tmp_path, None)


# --- CLI -----------------------------------------------------------------------------------------
def test_cli_bad_input_is_a_clear_error(tmp_path):
    runner = CliRunner()
    assert any(g.name == 'generate' and g.typer_instance is generate_cli.generate_app for g in app.registered_groups)
    r = runner.invoke(app, ['generate', 'sample', '--checkpoint', str(tmp_path / 'missing')])
    assert r.exit_code == 2 and 'not found' in r.output and 'Traceback' not in r.output
    r = runner.invoke(app, ['generate', 'train', '--data', str(tmp_path / 'nope'), '--out', str(tmp_path / 'o')])
    assert r.exit_code == 2 and 'not found' in r.output
    r = runner.invoke(app, ['generate', 'train', 'diffusion.space=latent', '--out', str(tmp_path / 'o')])
    assert r.exit_code == 2 and 'diffusion.vae' in r.output
    r = runner.invoke(app, ['generate', 'train', '--model', 'emov2_1m', '--data', str(_image_folder(tmp_path / 'i')),
                            '--out', str(tmp_path / 'o2'), 'data.workers=0'])
    assert r.exit_code == 2 and 'not a DiT' in r.output
