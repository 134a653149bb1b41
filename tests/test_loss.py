"""ECT and EDM losses against independent float64 recomputations (docs/ECT.md §3-4)."""

import math

import numpy as np
import pytest
import torch

import dnnlib
from training.methods import loss as loss_lib
from training.methods.base import Progress
from training.methods.ect import ECT, curriculum_stage
from training.methods.edm import EDM

#----------------------------------------------------------------------------
# Helpers.

class ToyDenoiser(torch.nn.Module):
    """Deterministic EDM-preconditioned toy: D = c_skip·x + c_out·conv(c_in·x)·(1 + c_noise), with c_noise = ln(σ)/4.

    Accepts `boundary` like ECMPrecond and records the keyword arguments of every call.
    """

    def __init__(self, channels=3, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.calls = []

    def forward(self, x, sigma, class_labels=None, boundary=True):
        self.calls.append(dict(boundary=boundary, sigma=sigma.detach().clone()))
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        F = torch.tanh(self.conv(c_in * x)) * (1 + c_noise)
        if class_labels is not None:
            F = F + class_labels.reshape(x.shape[0], -1)[:, :1, None, None]
        return c_skip * x + c_out * F


class ZeroMapping:
    def __call__(self, t, stage):
        return torch.zeros_like(t)


class IdentityMapping:
    def __call__(self, t, stage):
        return t.clone()


def _toy(seed=0):
    torch.manual_seed(seed)
    return ToyDenoiser()


def _np_sigmoid_mapping(t, stage, q, k, b):
    r = t * (1 - q ** -(stage + 1) * (1 + k / (1 + np.exp(b * t))))
    return np.maximum(r, 0)


def _toy_f64(net, x, sigma):
    """The toy denoiser recomputed in float64 with NumPy-free torch ops on double copies."""
    conv = torch.nn.functional.conv2d
    w, bias = net.conv.weight.detach().double(), net.conv.bias.detach().double()
    sd = net.sigma_data
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / np.sqrt(sigma ** 2 + sd ** 2)
    c_in = 1 / np.sqrt(sigma ** 2 + sd ** 2)
    c_in, c_skip, c_out = (torch.from_numpy(np.asarray(v)).reshape(-1, 1, 1, 1) for v in (c_in, c_skip, c_out))
    c_noise = torch.from_numpy(np.log(sigma) / 4).reshape(-1, 1, 1, 1)
    F = torch.tanh(conv(c_in * x, w, bias, padding=1)) * (1 + c_noise)
    return (c_skip * x + c_out * F).numpy()

N_VALUES = np.array([-3.0, -1.0, 0.0, 0.7, 1.5, 2.5])  # t = exp(-1.1 + 2n): 0.008 ... 49, some r = 0 at stage 0

#----------------------------------------------------------------------------
# Mapping functions and curriculum.

@pytest.mark.parametrize('q,k,b', [(2, 8, 1), (4, 8, 1), (256, 8, 1), (2, 3, 0.5)])
def test_sigmoid_mapping_matches_float64_formula(q, k, b):
    t = np.logspace(-3, np.log10(80), 200)
    mapping = loss_lib.SigmoidMapping(q=q, k=k, b=b)
    for stage in range(6):
        expected = _np_sigmoid_mapping(t, stage, q, k, b)
        got64 = mapping(torch.from_numpy(t), stage).numpy()
        np.testing.assert_allclose(got64, expected, rtol=1e-12, atol=1e-15)
        got32 = mapping(torch.from_numpy(t).float(), stage).double().numpy()
        assert (np.abs(got32 - expected) <= 1e-6 * t).all()  # float32: error relative to t (cancellation)


def test_constant_mapping_matches_float64_formula():
    t = np.logspace(-3, np.log10(80), 50)
    for q in (2, 4, 256):
        for stage in range(5):
            got = loss_lib.ConstantMapping(q=q)(torch.from_numpy(t), stage).numpy()
            np.testing.assert_allclose(got, t * (1 - q ** -(stage + 1)), rtol=1e-12)


@pytest.mark.parametrize('mapping', [loss_lib.SigmoidMapping(), loss_lib.ConstantMapping(), loss_lib.SigmoidMapping(q=4)])
def test_mappings_bounded_and_gap_shrinks_with_stage(mapping):
    t = torch.logspace(-3, math.log10(80), 300, dtype=torch.float64)
    gaps = []
    for stage in range(10):
        r = mapping(t, stage)
        assert bool((r >= 0).all()) and bool((r <= t).all())
        gaps.append(t - r)
    for stage in range(9):
        assert bool((gaps[stage + 1] <= gaps[stage]).all())
    assert bool((gaps[9] < gaps[0]).all()) and float(gaps[9].max() / t[gaps[9].argmax()]) < 0.02


def test_sigmoid_mapping_clamps_at_zero_for_small_t():
    t = torch.tensor([1e-3, 0.01, 0.1], dtype=torch.float64)
    r = loss_lib.SigmoidMapping()(t, 0)
    assert torch.equal(r, torch.zeros_like(t))  # 1 - 0.5·(1 + 8·sigmoid(-t)) < 0 there


def test_curriculum_stage_follows_ticks_and_doubling():
    tick_nimg = 12800
    for cur_nimg in [0, 1, 12799, 12800, tick_nimg * 250 - 1, tick_nimg * 250, tick_nimg * 500 + 7, 25_600_000]:
        expected = (cur_nimg // tick_nimg) // 250
        assert curriculum_stage(cur_nimg, 12.8, 250) == expected
    assert curriculum_stage(tick_nimg * 250, 12.8, 250) == 1
    assert curriculum_stage(6400 * 500 * 3, 6.4, 500) == 3
    assert curriculum_stage(6400 * 500 * 3 - 1, 6.4, 500) == 2
    assert curriculum_stage(10**9, 12.8, None) == 0
    assert curriculum_stage(10**9, 12.8, math.inf) == 0


@pytest.mark.parametrize('args', [(100, 0, 10), (100, 12.8, 0), (100, -1, 10), (100, 12.8, -5)])
def test_curriculum_stage_rejects_bad_settings(args):
    with pytest.raises(dnnlib.UserError):
        curriculum_stage(*args)

def test_ect_method_schedule_follows_progress_and_logs_changes(capsys):
    method = ECT(double_ticks=2, mapping=dict(class_name='training.methods.loss.ConstantMapping', q=2))
    tick_nimg = 8
    stages = []
    for cur_nimg in range(0, 8 * tick_nimg, 4):
        progress = Progress(cur_nimg=cur_nimg, batch_size=4, total_nimg=64, tick_kimg=tick_nimg / 1000)
        stages.append(method.schedule(progress)['stage'])
        assert method.loss_fn.stage == stages[-1] == (cur_nimg // tick_nimg) // 2
    assert stages[-1] == 3
    log = capsys.readouterr().out.splitlines()
    assert log == [f'Curriculum stage {s} at {s * 2 * tick_nimg / 1e3:.1f} kimg' for s in range(4)]
    assert method.state_dict() == dict(stage=3) and method.snapshot_metadata() == dict(stage=3)
    resumed = ECT(double_ticks=2)
    resumed.load_state_dict(method.state_dict())
    assert resumed.loss_fn.stage == 3
    assert ECT(double_ticks=None).schedule(Progress(10**9, 128, 10**9, 12.8)) == dict(stage=0)
    with pytest.raises(dnnlib.UserError, match='--double'):
        ECT(double_ticks=0)

#----------------------------------------------------------------------------
# ECT loss.

@pytest.mark.parametrize('stage,c,weighting', [
    (0, 0.0, 'training.methods.loss.InverseGapWeighting'),
    (3, 0.0, 'training.methods.loss.InverseGapWeighting'),
    (1, 0.06, 'training.methods.loss.InverseSquareWeighting'),
    (2, 0.06, 'training.methods.loss.NoWeighting'),
])
def test_ect_loss_matches_float64_reference(stage, c, weighting):
    net = _toy()
    P_mean, P_std, q, k, b = -1.1, 2.0, 2, 8, 1
    loss_fn = loss_lib.ECTLoss(P_mean=P_mean, P_std=P_std, c=c, weighting=dict(class_name=weighting),
                               mapping=dict(class_name='training.methods.loss.SigmoidMapping', q=q, k=k, b=b))
    loss_fn.set_stage(stage)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand([len(N_VALUES), 3, 6, 6], generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    rnd_normal = torch.from_numpy(N_VALUES).float().reshape(-1, 1, 1, 1)
    got = loss_fn.loss_from_noise(net, x0, rnd_normal, eps).detach().double().numpy()

    t = np.exp(P_mean + P_std * N_VALUES.astype(np.float32).astype(np.float64))
    r = _np_sigmoid_mapping(t, stage, q, k, b)
    x0d, epsd = x0.double(), eps.double()
    tt, rr = torch.from_numpy(t).reshape(-1, 1, 1, 1), torch.from_numpy(r).reshape(-1, 1, 1, 1)
    f_t = _toy_f64(net, x0d + tt * epsd, t)
    with np.errstate(divide='ignore', invalid='ignore'):
        f_r = np.where(r.reshape(-1, 1, 1, 1) > 0, _toy_f64(net, x0d + rr * epsd, r), x0d.numpy())
    d = ((f_t - f_r) ** 2).reshape(len(t), -1).sum(axis=1)
    adaptive = np.sqrt(d + c ** 2) - c
    w = {'training.methods.loss.InverseGapWeighting': 1 / (t - r), 'training.methods.loss.InverseSquareWeighting': 1 / t ** 2 + 1 / 0.25,
         'training.methods.loss.NoWeighting': np.ones_like(t)}[weighting]
    expected = adaptive * w
    if stage == 0:
        assert (r == 0).any() and (r > 0).any()  # the case covers both kinds of target
    assert got.shape == (len(t),)
    np.testing.assert_allclose(got, expected, rtol=2e-4)


@pytest.mark.parametrize('method', [ECT(), EDM()])
def test_methods_pass_boundary_false_decided_once_in_setup(method, monkeypatch):
    net = _toy()
    method.setup(net, torch.device('cpu'))
    assert method.net_kwargs == {'boundary': False}
    # The decision is made once: loss() never inspects the network again.
    monkeypatch.setattr(loss_lib.inspect, 'signature', lambda *a, **k: pytest.fail('signature inspected per call'))
    images = torch.randn(4, 3, 6, 6)
    method.loss(net, images)
    assert net.calls and all(call['boundary'] is False for call in net.calls)
    net.calls.clear()
    net.eval()  # the form must not depend on net.training
    method.loss(net, images)
    assert net.calls and all(call['boundary'] is False for call in net.calls)


def test_method_loss_before_setup_is_an_error():
    with pytest.raises(RuntimeError, match='setup'):
        ECT().loss(_toy(), torch.randn(2, 3, 6, 6))


def test_ect_call_uses_documented_draw_order():
    net = _toy()
    loss_fn = loss_lib.ECTLoss()
    images = torch.randn(4, 3, 6, 6)
    torch.manual_seed(7)
    got = loss_fn(net, images)
    torch.manual_seed(7)
    rnd_normal = torch.randn([4, 1, 1, 1])
    eps = torch.randn([4, 3, 6, 6])
    expected = loss_fn.loss_from_noise(net, images, rnd_normal, eps)
    assert torch.equal(got, expected)


def test_target_is_x0_where_r_is_zero_also_when_all_zero():
    net = _toy()
    loss_fn = loss_lib.ECTLoss()
    x0 = torch.randn(len(N_VALUES), 3, 6, 6)
    eps = torch.randn_like(x0)
    t, r = loss_fn.times(torch.from_numpy(N_VALUES).float().reshape(-1, 1, 1, 1))
    zero = (r == 0).flatten()
    assert zero.any() and (~zero).any()
    f_t, f_r = loss_fn.prediction_and_target(net, x0, t, r, eps)
    assert torch.isfinite(f_r).all()
    assert torch.equal(f_r[zero], x0[zero])
    assert not torch.equal(f_r[~zero], x0[~zero])
    assert f_t.requires_grad and not f_r.requires_grad

    net.calls.clear()
    f_t, f_r = loss_fn.prediction_and_target(net, x0, t, torch.zeros_like(t), eps)
    assert len(net.calls) == 1 and torch.equal(f_r, x0)   # on the CPU no r > 0: no target pass at all
    zero_fn = loss_lib.ECTLoss(mapping=ZeroMapping(), weighting=dict(class_name='training.methods.loss.NoWeighting'))
    got = zero_fn.loss_from_noise(net, x0, torch.zeros(len(x0), 1, 1, 1), eps)
    f_t64 = _toy_f64(net, x0.double() + np.exp(-1.1) * eps.double(), np.full(len(x0), np.exp(-1.1)))
    expected = np.sqrt(((f_t64 - x0.double().numpy()) ** 2).reshape(len(x0), -1).sum(1))
    np.testing.assert_allclose(got.detach().double().numpy(), expected, rtol=1e-4)


def _dropout_net(kind='ecm'):
    """A tiny network with dropout 0.5 in train mode: ECMPrecond (SongUNet) or EDM2 Precond (class-conditional)."""
    from training import networks
    from training.networks import edm2 as networks_edm2
    torch.manual_seed(0)
    if kind == 'ecm':
        net = networks.ECMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16,
                                  channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.5)
    else:
        net = networks_edm2.Precond(img_resolution=8, img_channels=3, label_dim=4, use_fp16=False,
                                    ecm_sigma_min=0.003, model_channels=16, channel_mult=[1], num_blocks=1,
                                    attn_resolutions=[], dropout=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no zero-initialised layer, so dropout changes the output
    return net.train()


@pytest.mark.parametrize('kind', ['ecm', 'edm2'])
def test_shared_dropout_masks_make_prediction_and_target_identical(kind):
    net = _dropout_net(kind)
    labels = torch.eye(4)[[0, 2, 3]] if kind == 'edm2' else None
    loss_fn = loss_lib.ECTLoss(mapping=IdentityMapping())
    x0 = torch.randn(3, 3, 8, 8)
    eps = torch.randn_like(x0)
    t, r = loss_fn.times(torch.tensor([-0.5, 0.3, 1.0]).reshape(-1, 1, 1, 1))
    assert torch.equal(r, t)
    torch.manual_seed(11)
    f_t, f_r = loss_fn.prediction_and_target(net, x0, t, r, eps, labels)
    after_shared = torch.rand(8)
    assert torch.equal(f_t.detach(), f_r)
    torch.manual_seed(11)
    f_t2, f_r2 = loss_fn.prediction_and_target(net, x0, t, r, eps, labels, shared_dropout=False)
    assert torch.equal(f_t2, f_t)
    assert (f_t2 - f_r2).abs().max() > 1e-3  # fresh masks would give a different target

    # The global stream continues as if only the prediction pass had run.
    torch.manual_seed(11)
    net(x0 + t * eps, t, labels, boundary=False)
    assert torch.equal(torch.rand(8), after_shared)


def test_cpu_target_pass_runs_only_on_samples_with_positive_r_and_keeps_their_masks():
    net = _dropout_net()
    loss_fn = loss_lib.ECTLoss(mapping=IdentityMapping())
    x0 = torch.randn(4, 3, 8, 8)
    eps = torch.randn_like(x0)
    t, _ = loss_fn.times(torch.tensor([-0.5, 0.3, 1.0, 0.1]).reshape(-1, 1, 1, 1))
    r = t * torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(-1, 1, 1, 1)     # r = t for samples 0 and 2, else r = 0
    batch_sizes = []
    net.register_forward_pre_hook(lambda module, args: batch_sizes.append(len(args[0])))
    torch.manual_seed(3)
    f_t, f_r = loss_fn.prediction_and_target(net, x0, t, r, eps)
    assert batch_sizes == [4, 2]
    torch.testing.assert_close(f_r[[0, 2]], f_t.detach()[[0, 2]], rtol=0, atol=1e-6)   # the same masks
    assert torch.equal(f_r[[1, 3]], x0[[1, 3]])
    torch.manual_seed(3)
    _, fresh = loss_fn.prediction_and_target(net, x0, t, r, eps, shared_dropout=False)
    assert (fresh[[0, 2]] - f_t.detach()[[0, 2]]).abs().max() > 1e-3


def test_ect_loss_uses_tuning_form_of_ecm_precond():
    net = _dropout_net().eval()
    method = ECT()
    method.setup(net, torch.device('cpu'))
    x0 = torch.randn(2, 3, 8, 8)
    eps = torch.randn_like(x0)
    t, r = method.loss_fn.times(torch.tensor([0.5, 1.0]).reshape(-1, 1, 1, 1))
    f_t, _ = method.loss_fn.prediction_and_target(net, x0, t, r, eps, net_kwargs=method.net_kwargs)
    with torch.no_grad():
        tuning = net(x0 + t * eps, t, None, boundary=False)
        evaluation = net(x0 + t * eps, t, None)
    assert torch.equal(f_t.detach(), tuning)
    assert (evaluation - tuning).abs().max() > 1e-6


def test_weighting_components_and_sigma_data_default():
    t = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    r = t * 0.25
    assert torch.allclose(loss_lib.InverseGapWeighting()(t, r), 1 / (0.75 * t))
    assert torch.allclose(loss_lib.InverseSquareWeighting(sigma_data=0.5)(t, r), 1 / t ** 2 + 4)
    assert torch.equal(loss_lib.NoWeighting()(t, r), torch.ones_like(t))
    fn = loss_lib.ECTLoss(sigma_data=0.7, weighting=dict(class_name='training.methods.loss.InverseSquareWeighting'))
    assert fn.weighting.sigma_data == 0.7
    fn = loss_lib.ECTLoss(sigma_data=0.7, weighting=dict(class_name='training.methods.loss.InverseSquareWeighting', sigma_data=0.3))
    assert fn.weighting.sigma_data == 0.3


@pytest.mark.parametrize('kwargs', [
    dict(c=-1.0), dict(P_std=0), dict(sigma_data=-0.5), dict(mapping=dict(q=2)),
    dict(mapping=dict(class_name='training.methods.loss.NoSuchMapping')),
    dict(mapping=dict(class_name='training.methods.loss.SigmoidMapping', q=0)),
    dict(mapping=dict(class_name='training.methods.loss.SigmoidMapping', z=3)),
])
def test_ect_loss_rejects_bad_config(kwargs):
    with pytest.raises(dnnlib.UserError):
        loss_lib.ECTLoss(**kwargs)


@pytest.mark.parametrize('stage', [-1, 1.5, '2', True])
def test_set_stage_rejects_bad_stage(stage):
    with pytest.raises(dnnlib.UserError):
        loss_lib.ECTLoss().set_stage(stage)

#----------------------------------------------------------------------------
# EDM loss.

def test_edm_loss_matches_float64_reference():
    net = _toy()
    loss_fn = loss_lib.EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    x0 = torch.rand(len(N_VALUES), 3, 6, 6) * 2 - 1
    eps = torch.randn_like(x0)
    rnd_normal = torch.from_numpy(N_VALUES).float().reshape(-1, 1, 1, 1)
    got = loss_fn.loss_from_noise(net, x0, rnd_normal, eps, net_kwargs=dict(boundary=False)).detach().double().numpy()
    sigma = np.exp(-1.2 + 1.2 * N_VALUES.astype(np.float32).astype(np.float64))
    denoised = _toy_f64(net, x0.double() + torch.from_numpy(sigma).reshape(-1, 1, 1, 1) * eps.double(), sigma)
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    expected = lam * ((denoised - x0.double().numpy()) ** 2).reshape(len(sigma), -1).sum(1)
    assert got.shape == (len(sigma),)
    np.testing.assert_allclose(got, expected, rtol=2e-4)
    assert all(call['boundary'] is False for call in net.calls)


def test_edm_call_draws_noise_in_documented_order():
    net = _toy()
    loss_fn = loss_lib.EDMLoss()
    images = torch.randn(3, 3, 6, 6)
    torch.manual_seed(3)
    got = loss_fn(net, images)
    torch.manual_seed(3)
    rnd_normal, eps = torch.randn([3, 1, 1, 1]), torch.randn([3, 3, 6, 6])
    assert torch.equal(got, loss_fn.loss_from_noise(net, images, rnd_normal, eps))

#----------------------------------------------------------------------------
# Gradient accumulation.

@pytest.mark.parametrize('make_loss', [lambda: loss_lib.ECTLoss(), lambda: loss_lib.EDMLoss()])
def test_gradient_accumulation_invariance(make_loss):
    net = _toy().double()  # float64 so summation order cannot hide a real difference at 1e-6
    loss_fn = make_loss()
    gen = torch.Generator().manual_seed(5)
    images = torch.randn([8, 3, 6, 6], generator=gen, dtype=torch.float64)
    rnd_normal = torch.randn([8, 1, 1, 1], generator=gen, dtype=torch.float64)
    eps = torch.randn([8, 3, 6, 6], generator=gen, dtype=torch.float64)

    def grads(num_rounds, reduce):
        net.zero_grad(set_to_none=True)
        for sl in torch.arange(8).chunk(num_rounds):
            reduce(loss_fn.loss_from_noise(net, images[sl], rnd_normal[sl], eps[sl])).backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()]).clone()

    whole = grads(1, lambda l: loss_lib.reduce_loss(l, 8))
    accumulated = grads(4, lambda l: loss_lib.reduce_loss(l, 8))
    assert whole.abs().max() > 0
    torch.testing.assert_close(accumulated, whole, rtol=1e-6, atol=1e-6)
    mean_per_round = grads(4, lambda l: l.mean())  # the official scheme: grows with the number of rounds
    torch.testing.assert_close(mean_per_round, whole * 4, rtol=1e-5, atol=1e-5)


def test_the_accelerator_whole_batch_target_pass_equals_the_cpu_subset_pass(monkeypatch):
    """On a GPU the target pass runs on the whole batch (target_rows None: r = 0 rows at σ = 0 give NaN, replaced
    by x0), a branch the CPU never takes by itself: forced here, the losses and gradients equal the subset branch's
    (dropout 0.5, shared masks, r = 0 rows present)."""
    loss_fn = loss_lib.ECTLoss(mapping=IdentityMapping())
    x0 = torch.randn(4, 3, 8, 8)
    eps = torch.randn_like(x0)
    t, _ = loss_fn.times(torch.tensor([-0.5, 0.3, 1.0, 0.1]).reshape(-1, 1, 1, 1))
    r = t * torch.tensor([0.5, 0.0, 0.9, 0.0]).reshape(-1, 1, 1, 1)
    results = []
    for rows in (loss_lib.ECTLoss.target_rows, lambda r: None):
        monkeypatch.setattr(loss_lib.ECTLoss, 'target_rows', staticmethod(rows))
        net = _dropout_net()
        torch.manual_seed(3)
        f_t, f_r = loss_fn.prediction_and_target(net, x0, t, r, eps)
        (f_t - f_r).square().sum().backward()
        results.append((f_r, [p.grad for p in net.parameters()]))
    (subset, subset_grads), (whole, whole_grads) = results
    assert torch.isfinite(whole).all() and torch.equal(whole[[1, 3]], x0[[1, 3]])
    torch.testing.assert_close(whole, subset, rtol=1e-5, atol=1e-6)
    for a, b in zip(whole_grads, subset_grads):   # f_r rounds differently in a batch of 4 than of 2
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
