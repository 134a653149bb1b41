"""sCM (Lu & Song 2024): TrigFlow on EDM-form networks (training/networks/trigflow.py), the sCT/sCD methods
(training/methods/scm*.py) and the TrigFlow sampler (training/sampling/samplers_trigflow.py), against NVlabs/FastGen's
code run on tiny inputs (tests/data/fastgen_scm/README.md) and against float64 formulas written here."""

import copy
import math
import pathlib

import numpy as np
import pytest
import torch

import dnnlib
from configs import presets
from training.checkpoints import checkpoint, reader
from training.methods import scm_loss
from training.methods.base import Progress
from training.methods.scm import SCD, SCT
from training.networks import randomness
from training.networks.precond import ECMPrecond, EDMPrecond
from training.networks.trigflow import TrigFlowPrecond, edm_sigma, trig_time, trigflow_velocity
from training.sampling.samplers import consistency_sampler
from training.sampling.samplers_trigflow import make_trigflow_steps, trigflow_sampler

DATA = pathlib.Path(__file__).parent / 'data' / 'fastgen_scm' / 'fastgen_scm.npz'
SD = 0.5
SONG = dict(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=16,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0, embedding_type='positional',
            channel_mult_noise=1, resample_filter=[1, 1])
EDM2 = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[], use_fp16=False)


@pytest.fixture(scope='module')
def ref():
    return dict(np.load(DATA))


def rel_err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def tiny(denoiser='edm', seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(EDM2 if denoiser == 'edm2' else SONG, **overrides)
    net = TrigFlowPrecond(denoiser=denoiser, **kwargs)
    with torch.no_grad():   # weights far from their zero init, so every path matters
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return net


# ----------------------------------------------------------------------------------------------------------
# The stand-in network of the fixture (make_fastgen_scm.py stub_raw / make_edm_stub), written again here.

def stub_denoiser(ref, suffix='', dtype=torch.float32):
    w = {k: torch.tensor(ref[f'w_{k}{suffix}' if f'w_{k}{suffix}' in ref else f'w_{k}'], dtype=dtype)
         for k in ('A', 'b', 'L')}

    def denoise(x, sigma, labels=None, **kwargs):
        s = torch.as_tensor(sigma, dtype=dtype).reshape(-1, 1, 1, 1)
        h = torch.einsum('oc,nchw->nohw', w['A'], x.to(dtype) / (SD ** 2 + s ** 2).sqrt())
        h = h + (s.flatten().log() / 4).reshape(-1, 1, 1, 1) * w['b'].reshape(1, -1, 1, 1)
        if labels is not None:
            h = h + (labels.to(dtype) @ w['L']).reshape(-1, w['A'].shape[0], 1, 1)
        return SD ** 2 / (s ** 2 + SD ** 2) * x.to(dtype) + s * SD / (s ** 2 + SD ** 2).sqrt() * torch.tanh(h)
    return denoise


class StubTrigFlow(torch.nn.Module):
    """The fixture's stand-in as a TrigFlow network (F through our conversion, logvar a·c_noise + a0)."""
    is_trigflow, has_logvar, sigma_data = True, True, SD

    def __init__(self, ref):
        super().__init__()
        self.denoise = stub_denoiser(ref)
        self.a, self.a0 = float(ref['w_a'][0]), float(ref['w_a0'][0])

    def forward(self, x, t, labels=None, force_fp32=False, trigflow=True, return_logvar=False):
        F = trigflow_velocity(self.denoise, x, t, SD, labels) / SD
        logvar = self.a * edm_sigma(t, SD).log() / 4 + self.a0
        return (F, logvar) if return_logvar else F


# ----------------------------------------------------------------------------------------------------------
# TrigFlow on EDM-form networks.

def test_trigflow_identities_float64(ref):
    """sCM §2 in float64: x̂ = cos t·x0 + sin t·z is EDM's x_σ·cos t at σ = σd tan t, f = cos t·x̂ − σd sin t·F is
    D(x̂/cos t, σ), and for EDM's preconditioning F = −F_EDM(x̂/σd, ln(σ)/4)."""
    gen = torch.Generator().manual_seed(1)
    x0, n = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64), torch.randn(4, 2, 3, 3, generator=gen,
                                                                                     dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.3, 2.0, 800.0], dtype=torch.float64)
    t = trig_time(sigma, SD)
    assert rel_err(edm_sigma(t, SD), sigma) < 1e-11 and torch.all((t > 0) & (t < math.pi / 2))
    c, s = t.cos().reshape(-1, 1, 1, 1), t.sin().reshape(-1, 1, 1, 1)
    x_hat = c * x0 + s * (SD * n)
    assert rel_err(x_hat / c, x0 + sigma.reshape(-1, 1, 1, 1) * n) < 1e-11
    D = stub_denoiser(ref, dtype=torch.float64)
    F = trigflow_velocity(D, x_hat, t, SD) / SD
    assert rel_err(c * x_hat - SD * s * F, D(x_hat / c, sigma)) < 1e-11
    A, b = (torch.tensor(ref[k], dtype=torch.float64) for k in ('w_A', 'w_b'))
    c_noise = (sigma.log() / 4).reshape(-1, 1, 1, 1)
    raw = torch.tanh(torch.einsum('oc,nchw->nohw', A, x_hat / SD) + c_noise * b.reshape(1, -1, 1, 1))
    assert rel_err(F, -raw) < 1e-10


@pytest.mark.parametrize('denoiser,cls', [('edm', EDMPrecond), ('ecm', ECMPrecond)])
def test_wrapper_is_the_edm_network_unconverted(denoiser, cls):
    """Same state-dict names and weights as the EDM-form network (a transfer copies everything but the head), its
    forward is D(x, σ) in the plain (EDM) form, and F_θ = −F_EDM(x̂/σd, ln(σd tan t̂)/4) from the same weights."""
    net, src = tiny(denoiser), cls(**SONG)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    report = checkpoint.transfer_weights(src, net)
    assert report.skipped == [] and report.untouched == ['logvar_linear.weight', 'logvar_linear.bias']
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.01, 1.0, 50.0])
    kwargs = dict(boundary=False) if denoiser == 'ecm' else {}
    assert torch.equal(net(x, sigma), src(x, sigma, **kwargs))
    t = torch.tensor([0.05, 0.8, 1.5])
    F = net(x, t, trigflow=True)
    raw = src.model(x / SD, (SD * t.tan()).log() / 4, None)
    assert rel_err(F, -raw) < 2e-5


def test_logvar_head_is_a_linear_map_of_the_noise_embedding():
    """w_φ input as FastGen's EDM networks (logvar_linear(map_noise(c_noise))): EDM's positional embedding of
    c_noise = ln(σd tan t̂)/4 (cosines then sines, frequencies (1/10000)^(i/(C/2 − 1))), written out in float64."""
    net = tiny()
    t = torch.tensor([0.1, 0.7, 1.4], dtype=torch.float64)
    _, logvar = net(torch.zeros(3, 3, 8, 8), t.float(), trigflow=True, return_logvar=True)
    c_noise = (SD * t.tan()).log() / 4
    half = net.logvar_linear.in_features // 2
    freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float64) / (half - 1))
    emb = torch.cat([(c_noise[:, None] * freqs).cos(), (c_noise[:, None] * freqs).sin()], dim=1)
    expected = emb @ net.logvar_linear.weight.double().t() + net.logvar_linear.bias.double()
    assert rel_err(logvar, expected.flatten()) < 1e-5


@pytest.mark.parametrize('denoiser', ['edm', 'edm2'])
def test_snapshot_state_and_ema_copy_keep_the_head(tmp_path, denoiser):
    """The head is a submodule: in the state dict (training states), in snapshots read by load_network, in EMA
    copies; the copy's wrapped denoiser uses the copy's weights."""
    net = tiny(denoiser).eval()
    assert net.has_logvar and any(k.startswith('logvar_linear') for k in net.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 1.2])
    expected = net(x, t, trigflow=True, return_logvar=True)
    checkpoint.save_network_snapshot(tmp_path / 'net.pt', net, kimg=1)
    loaded, meta = reader.load_network(tmp_path / 'net.pt')
    fresh = tiny(denoiser, seed=1).eval()
    fresh.load_state_dict(net.state_dict())
    ema = copy.deepcopy(net)
    assert ema.wrapped.model is ema.model if denoiser == 'edm' else ema.wrapped.unet is ema.unet
    with torch.no_grad():
        next(net.parameters()).add_(1.0)   # the copy must not follow the original
    for other in (loaded, fresh, ema):
        got = other(x, t, trigflow=True, return_logvar=True)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert meta['kimg'] == 1


# ----------------------------------------------------------------------------------------------------------
# The loss against FastGen's _scm_pred_to_loss and a float64 formula.

def reference_loss(F, F_jvp, x_hat, dxdt, logvar, sigma, r, c=0.1, rms=False, prior=True, dims_divided=1):
    """sCM Algorithm 1 in float64 numpy (F_jvp = cos t sin t·dF/dt): g, g/(‖g‖ + c), λ e^{−u}/D ‖F − F⁻ − g‖² + u;
    its gradients in F and u."""
    t = np.arctan(sigma / SD).reshape(-1, 1, 1, 1)
    g = -np.cos(t) ** 2 * (SD * F - dxdt) - r * (np.cos(t) * np.sin(t) * x_hat + SD * F_jvp)
    dim = F[0].size
    norm = np.sqrt((g ** 2).reshape(len(g), -1).sum(1)) / (np.sqrt(dim) if rms else 1)
    g = g / (norm.reshape(-1, 1, 1, 1) + c)
    scale = (1 / sigma if prior else 1) * np.exp(-logvar) / dim ** dims_divided
    loss = scale * (g ** 2).reshape(len(g), -1).sum(1) + logvar
    return loss, -2 * scale.reshape(-1, 1, 1, 1) * g, 1 - (loss - logvar)


@pytest.mark.parametrize('case,rms,prior', [('paper', False, True), ('rms', True, True), ('no_prior', False, False)])
def test_loss_and_gradients_match_fastgen(ref, case, rms, prior):
    """Where FastGen agrees with the paper (D divided once) the loss and its gradients in F_θ and the logvar equal
    FastGen's _scm_pred_to_loss and the float64 formula; 'rms' is FastGen's g_norm_spatial_invariance."""
    F = torch.tensor(ref['F_theta'], requires_grad=True)
    logvar = torch.tensor(ref['logvar'].reshape(-1), requires_grad=True)
    sigma = torch.tensor(ref['sigma'])
    t_hat = trig_time(sigma, SD).float()
    r = scm_loss.tangent_warmup(3, 10)
    args = [torch.tensor(ref[k]) for k in ('F_jvp', 'images', 'dxdt')]
    g = scm_loss.scm_tangent(F.detach(), args[0], args[1], args[2], t_hat, r, SD)
    g = scm_loss.normalize_tangent(g, 0.1, 'rms' if rms else 'l2')
    loss = scm_loss.scm_loss(F, g, logvar, (1 / sigma).float() if prior else 1.0)
    loss.sum().backward()
    expected = reference_loss(ref['F_theta'], ref['F_jvp'], ref['images'], ref['dxdt'], ref['logvar'].reshape(-1),
                              ref['sigma'], r, rms=rms, prior=prior)
    assert r == float(ref[f'r_{case}'])
    for ours, official, formula in ((loss, ref[f'loss_{case}'], expected[0]), (F.grad, ref[f'grad_F_{case}'],
                                    expected[1]), (logvar.grad, ref[f'grad_logvar_{case}'], expected[2])):
        assert rel_err(ours, official) < 1e-5 and rel_err(ours, formula) < 1e-5


def test_fastgen_divides_the_loss_by_D_twice(ref):
    """FastGen's defaults (divide_x_0_spatial_dim) divide the squared term by D = C·H·W twice: its loss is the
    paper's (with its rms norm) with λ e^{−u}‖·‖² / D² instead of / D."""
    expected = reference_loss(ref['F_theta'], ref['F_jvp'], ref['images'], ref['dxdt'], ref['logvar'].reshape(-1),
                              ref['sigma'], 0.3, rms=True, dims_divided=2)[0]
    once = ref['loss_rms'] - ref['logvar'].reshape(-1)
    twice = ref['loss_defaults'] - ref['logvar'].reshape(-1)
    dim = ref['F_theta'][0].size
    assert rel_err(twice, expected - ref['logvar'].reshape(-1)) < 1e-6 and rel_err(twice * dim, once) < 1e-6


def test_time_proposal_matches_fastgen(ref):
    """FastGen's truncated log-normal (EDMNoiseSchedule lognormal, P_mean −1, P_std 1.4, [0.002, 80]): same draws."""
    torch.manual_seed(0)
    sigma = scm_loss.truncated_lognormal_sigma(64, -1.0, 1.4, 0.002, 80.0, 'cpu')
    assert rel_err(sigma, ref['sample_t']) < 1e-12 and sigma.min() >= 0.002 and sigma.max() <= 80.0


def test_tangent_warmup_schedule():
    method = SCT(warmup_steps=10000)
    steps = (0, 2500, 10000, 10 ** 5)
    values = [method.schedule(Progress(step * 4, 4, 10 ** 6, 1.0))['tangent_warmup'] for step in steps]
    assert values == [0.0, 0.25, 1.0, 1.0]
    assert SCT(warmup_steps=0).schedule(Progress(0, 4, 8, 1.0))['tangent_warmup'] == 1


# ----------------------------------------------------------------------------------------------------------
# The whole loss, the JVP and the dropout masks.

def run_method(method, net, ref, seed, labels=None):
    method.schedule(Progress(3 * 4, 4, 10 ** 6, 1.0))   # step 3 of warm-up 10: r = 0.3, as the fixture
    torch.manual_seed(seed)
    return method.loss(net, torch.tensor(ref['images']), labels)


def test_full_loss_matches_fastgen(ref):
    """sCT and sCD (teacher tangent, guidance 2) from the same random draws as FastGen's sample_t + _compute_scm_loss
    on the fixture's stand-in network and teacher."""
    net = StubTrigFlow(ref)
    sct = SCT(warmup_steps=10)   # no setup: it only checks the network, and the stand-in is a formula, not one
    assert rel_err(run_method(sct, net, ref, 11).detach(), ref['full_loss_sct']) < 1e-4
    assert sct.snapshot_metadata() == dict(method='sCT', sampler='trigflow', sigma_data=SD)
    scd = SCD(teacher='stand-in', guidance=2.0, warmup_steps=10)
    scd.teacher, scd.teacher_kwargs = stub_denoiser(ref, '_teacher'), {}
    loss = run_method(scd, net, ref, 12, torch.tensor(ref['labels'])).detach()
    assert rel_err(loss, ref['full_loss_scd']) < 1e-4


def test_jvp_follows_the_tangent_fastgen_finite_difference_follows_the_path(ref):
    """Forward-mode JVPs agree with FastGen's; our finite difference moves along dx̂/dt (the teacher's tangent in
    sCD) and matches them, FastGen's moves along the data–noise path: it matches the JVP along cos t·z − sin t·x0."""
    net = StubTrigFlow(ref)
    x_hat, t_hat = torch.tensor(ref['jvp_x_hat']), torch.tensor(ref['jvp_t_hat']).float()
    teacher = torch.tensor(ref['teacher_dxdt'])
    ours = scm_loss.jvp_autograd(net, x_hat, t_hat, teacher)
    with randomness.sharing_draws(net) as tape:
        ours_fd = scm_loss.jvp_finite_difference(net, x_hat, t_hat, teacher, 1e-3, tape)
    assert rel_err(ours, ref['jvp_ad_teacher']) < 1e-5 and rel_err(ours_fd, ours) < 1e-3
    assert rel_err(ref['jvp_fd_teacher'], ref['jvp_ad_path']) < 2e-3
    assert rel_err(ref['jvp_fd_teacher'], ref['jvp_ad_teacher']) > 0.5


def test_dropout_masks_are_shared_between_jvp_and_gradient_pass(ref, monkeypatch):
    """FastGen's gradient pass and JVP draw their own masks (fixture); ours records them in the JVP pass and the
    gradient pass replays every one of them, drawing nothing."""
    assert (ref['dropout_mask_grad'] != ref['dropout_mask_jvp']).any()
    net = tiny(dropout=0.5).train()
    log = []
    take = randomness.DrawTape.take
    monkeypatch.setattr(randomness.DrawTape, 'take', lambda self, make: log.append((self.mode, take(self, make)))
                        or log[-1][1])
    method = SCT()
    method.setup(net, 'cpu')
    run_method(method, net, dict(images=np.zeros((2, 3, 8, 8), np.float32)), 0).sum().backward()
    recorded = [v for mode, v in log if mode == 'record']
    replayed = [v for mode, v in log if mode == 'replay']
    assert len(recorded) == len(replayed) > 0 and all(a is b for a, b in zip(recorded, replayed))


def test_jvp_runs_in_float32_under_bf16_autocast():
    net = tiny()
    method = SCT()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.4, 1.1])
    dxdt = torch.randn_like(x)
    with randomness.sharing_draws(net) as tape:
        plain = method._jvp(net, x, t, dxdt, None, tape)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            mixed = method._jvp(net, x, t, dxdt, None, tape)
    assert mixed.dtype == torch.float32 and torch.equal(plain, mixed)


@pytest.mark.parametrize('make,words', [
    (lambda: SCT(jvp='finite_difference', fd_step=0), 'fd_step'),
    (lambda: SCT(jvp='finite_difference', fd_step=0.5), 'fd_step'),
    (lambda: SCT(jvp='forward'), 'jvp'),
    (lambda: SCT(tangent_norm='max'), 'tangent_norm'),
    (lambda: SCT(sigma_min=1.0, sigma_max=0.5), 'sigma_min'),
    (lambda: SCD(), '--teacher'),
    (lambda: SCD(teacher='t.pt', guidance=0.5), 'guidance'),
    (lambda: SCT().setup(EDMPrecond(**SONG), 'cpu'), '--precond'),
    (lambda: SCT(adaptive_weighting=False).setup(tiny(), 'cpu'), 'adaptive_weighting'),
    (lambda: SCD(teacher='t.pt', guidance=2.0).setup(tiny(), 'cpu'), 'guidance'),
])
def test_bad_arguments_are_one_line_refusals(make, words):
    with pytest.raises(dnnlib.UserError) as info:
        make()
    assert words in str(info.value) and '\n' not in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# The TrigFlow sampler.

def test_trigflow_sampler_is_the_papers_algorithm_and_ects_consistency_sampler():
    """sCM Algorithm 2 in float64 with f = cos t·x̂ − σd sin t·F_θ(x̂, t); the same as the consistency sampler on the
    noise levels σ = σd tan t."""
    net = tiny().eval()
    steps = make_trigflow_steps(mid_t=[1.1])
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    z2 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = trigflow_sampler(net, z, t_steps=steps, randn_like=lambda x: z2.double())
        x = SD * math.sin(steps[0]) * z.double()
        for t, t_next in ((steps[0], steps[1]), (steps[1], 0.0)):
            F = net(x, torch.full([2], t, dtype=torch.float64), trigflow=True).double()
            x = math.cos(t) * x - SD * math.sin(t) * F
            x = math.cos(t_next) * x + math.sin(t_next) * SD * z2.double() if t_next > 0 else x
        cm = consistency_sampler(net, z, t_steps=[SD * math.tan(t) for t in steps], randn_like=lambda x: z2.double())
    assert rel_err(ours, x) < 1e-5 and rel_err(ours, cm) < 1e-6
    for bad in ([math.pi / 2, 0.0], [1.0, 1.2, 0.0], [1.0, 0.5]):
        with pytest.raises(dnnlib.UserError, match='--t-max/--mid_t: TrigFlow steps'):
            trigflow_sampler(net, z, t_steps=bad)


def test_training_grids_and_metrics_use_the_trigflow_sampler():
    """A TrigFlow network's initial grids (EDM's Heun, then 1 and 2 TrigFlow steps at mid_t in radians) and metrics
    sample in TrigFlow time; a snapshot's recorded sampler decides for files."""
    from metrics import metric_main, scoring
    from training.sampling import samplers
    net = tiny().eval()
    runs = scoring.initial_grid_runs(net, [1.1])
    assert [tag for tag, _, _ in runs] == ['heun', '1step', '2step']
    assert runs[2][1] is trigflow_sampler and runs[2][2]['t_steps'] == make_trigflow_steps(mid_t=[1.1])
    sampling = metric_main.sampling_for('two_step_fd_randnet', net, mid_t=[1.1])
    assert sampling['sampler'] == 'trigflow' and sampling['sampler_kwargs']['t_steps'][1] == 1.1
    assert samplers.resolve_sampler(net, metadata=dict(sampler='trigflow', mid_t=[0.9]))[1]['t_steps'][1] == 0.9
    assert samplers.resolve_sampler(net, 'consistency', metadata=dict(sampler='trigflow', mid_t=[0.9]))[1] == dict(
        t_steps=(80.0, 0.821, 0.0))   # another family does not read the recorded (radian) mid_t


@pytest.mark.parametrize('preset, norm', [('cifar10-sct', None), ('cifar10-scd', None), ('imagenet64-scd', 10.0)])
def test_presets_clip_gradients_as_fastgen(preset, norm):
    """NVlabs/FastGen clips the global gradient norm to 10 for ImageNet-64 sCD (configs/experiments/EDM/
    config_scd_in64.py:19) and to 1e6, i.e. never, for CIFAR-10 (configs/methods/config_scm.py:104)."""
    assert presets.resolve(preset, dict(data='unused')).grad_clip_norm == norm
