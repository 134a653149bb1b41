"""training/sampling/samplers.py against the official sampler references (edm_forward.npz, network ddpmpp_cond)."""

import math

import numpy as np
import pytest
import torch

import dnnlib
from conftest import load_npz_meta
from training import networks
from training.sampling import samplers, samplers_meanflow, samplers_trigflow

CASE = 'ddpmpp_cond'
SEEDS = [0, 1, 2, 3]


def build_fixture_net(edm_forward, cls):
    """The fixture's ddpmpp_cond weights in preconditioner `cls` (EDMPrecond or ECMPrecond), in eval mode."""
    meta = load_npz_meta(edm_forward)[CASE]
    kwargs = dict(img_resolution=meta['img_resolution'], img_channels=meta['img_channels'],
                  label_dim=meta['label_dim'], sigma_data=meta['sigma_data'], **meta['network_kwargs'])
    if cls is networks.ECMPrecond:
        kwargs['sigma_min'] = meta['ecm_sigma_min']
    net = cls(**kwargs)
    prefix = f'{CASE}/param/'
    net.load_state_dict({k[len(prefix):]: torch.from_numpy(edm_forward[k]) for k in edm_forward.files
                         if k.startswith(prefix)})
    return net.eval().requires_grad_(False)


@pytest.fixture(scope='module')
def ecm_net(edm_forward):
    return build_fixture_net(edm_forward, networks.ECMPrecond)


@pytest.fixture(scope='module')
def edm_net(edm_forward):
    return build_fixture_net(edm_forward, networks.EDMPrecond)


def draw_inputs(seeds, label_dim=10):
    """Latents and one-hot class labels in the fixture's order, plus the generator for later noise."""
    rnd = samplers.StackedRandomGenerator('cpu', seeds)
    latents = rnd.randn([len(seeds), 3, 32, 32])
    class_labels = torch.eye(label_dim)[rnd.randint(label_dim, size=[len(seeds)])]
    return latents, class_labels, rnd


def assert_uint8_matches_fixture(images, edm_forward, name, atol=1e-4):
    """uint8 N,H,W,C images equal the reference wherever a float error below `atol` cannot change the pixel
    (a float32 network may legitimately flip one whose reference lies within `atol` of a truncation boundary)."""
    expected_float = edm_forward[f'sampler/{name}_float']
    expected_uint8 = edm_forward[f'sampler/{name}_uint8']
    np.testing.assert_array_equal(samplers.to_uint8(torch.from_numpy(expected_float)).numpy(), expected_uint8)
    scaled = expected_float.transpose(0, 2, 3, 1) * 127.5 + 128
    decided = np.abs(scaled - np.round(scaled)) > atol * 127.5
    assert decided.mean() > 0.95
    np.testing.assert_array_equal(np.asarray(images)[decided], expected_uint8[decided])


def assert_matches_fixture(x, edm_forward, name, atol=1e-4):
    """Float64 samples within `atol` of the reference, and their uint8 conversion as above."""
    assert x.dtype == torch.float64
    assert np.abs(x.numpy() - edm_forward[f'sampler/{name}_float']).max() < atol
    assert_uint8_matches_fixture(samplers.to_uint8(x).numpy(), edm_forward, name, atol)


class CountingNet(torch.nn.Module):
    """Wraps a network and records the noise levels it is called with."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.sigmas = []
        for name in ('img_channels', 'img_resolution', 'label_dim', 'sigma_min', 'sigma_max'):
            setattr(self, name, getattr(net, name))

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None):
        self.sigmas.append(float(sigma.reshape(-1)[0]))
        return self.net(x, sigma, class_labels)


# --- per-seed generators ------------------------------------------------------------------------------------

def test_generator_reproduces_fixture_latents_and_labels(edm_forward):
    np.testing.assert_array_equal(edm_forward['sampler/seeds'], SEEDS)
    latents, class_labels, _ = draw_inputs(SEEDS)
    np.testing.assert_array_equal(latents.numpy(), edm_forward['sampler/latents'])
    np.testing.assert_array_equal(class_labels.numpy(), edm_forward['sampler/class_labels'])


def test_generator_rows_do_not_depend_on_batch_composition():
    together = samplers.StackedRandomGenerator('cpu', [5, 6, 7])
    alone = samplers.StackedRandomGenerator('cpu', [6])
    a = together.randn([3, 4, 2], dtype=torch.float64)
    b = alone.randn([1, 4, 2], dtype=torch.float64)
    assert torch.equal(a[1:2], b)
    assert not torch.equal(a[0], a[1])
    like = together.randn_like(a)
    assert like.dtype == torch.float64 and like.shape == a.shape
    with pytest.raises(ValueError, match='3 seeds'):
        together.randn([2, 4])


# --- consistency sampler ------------------------------------------------------------------------------------

def test_consistency_1step_matches_fixture(ecm_net, edm_forward):
    latents, class_labels, rnd = draw_inputs(SEEDS)
    x = samplers.consistency_sampler(ecm_net, latents, class_labels, t_steps=(80.0, 0.0), randn_like=rnd.randn_like)
    assert_matches_fixture(x, edm_forward, 'ecm_1step')


def test_consistency_2step_matches_fixture(ecm_net, edm_forward):
    latents, class_labels, rnd = draw_inputs(SEEDS)
    t_steps = samplers.make_consistency_steps(80, [0.821])
    assert t_steps == (80.0, 0.821, 0.0)
    x = samplers.consistency_sampler(ecm_net, latents, class_labels, t_steps=t_steps, randn_like=rnd.randn_like)
    assert_matches_fixture(x, edm_forward, 'ecm_2step')


def test_consistency_nfe_and_steps(ecm_net):
    latents, class_labels, rnd = draw_inputs([0, 1])
    counting = CountingNet(ecm_net)
    samplers.consistency_sampler(counting, latents, class_labels, t_steps=(80.0, 2.0, 0.5, 0.0),
                                 randn_like=rnd.randn_like)
    assert counting.sigmas == [80.0, 2.0, 0.5]


@pytest.mark.parametrize('mid_t', [[0.0], [90.0], [0.5, 0.8], [-1.0], [float('nan')]])
def test_consistency_steps_reject_non_decreasing(mid_t):
    with pytest.raises(dnnlib.UserError, match='mid_t'):
        samplers.make_consistency_steps(80.0, mid_t)


def test_samplers_keep_module_modes(ecm_net, edm_forward):
    """Sampling a net left in train mode still uses the evaluation (boundary) form and leaves modes alone."""
    latents, class_labels, rnd = draw_inputs(SEEDS)
    ecm_net.train()
    try:
        x = samplers.consistency_sampler(ecm_net, latents, class_labels, t_steps=(80.0, 0.0))
        assert all(m.training for m in ecm_net.modules())
    finally:
        ecm_net.eval()
    assert_matches_fixture(x, edm_forward, 'ecm_1step')
    samplers.consistency_sampler(ecm_net, latents, class_labels, t_steps=(80.0, 0.0))
    assert not any(m.training for m in ecm_net.modules())


# --- EDM Heun sampler ---------------------------------------------------------------------------------------

def test_heun18_matches_fixture_with_35_nfe(edm_net, edm_forward):
    latents, class_labels, rnd = draw_inputs(SEEDS)
    counting = CountingNet(edm_net)
    x = samplers.edm_sampler(counting, latents, class_labels, randn_like=rnd.randn_like)
    assert len(counting.sigmas) == 2 * 18 - 1
    assert_matches_fixture(x, edm_forward, 'heun18')


class _Sigmas:
    """Just the attributes edm_sigma_steps reads."""
    sigma_min, sigma_max = 0.0, float('inf')

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def test_edm_sigma_steps_formula_and_clamping():
    steps = samplers.edm_sigma_steps(_Sigmas(), num_steps=5, sigma_min=0.002, sigma_max=80.0, rho=7.0).tolist()
    reference = [(80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(5)] + [0.0]
    assert np.allclose(steps, reference, rtol=1e-12, atol=0)
    narrow = _Sigmas()
    narrow.sigma_min, narrow.sigma_max = 0.01, 50.0
    clamped = samplers.edm_sigma_steps(narrow, num_steps=5).tolist()
    assert math.isclose(clamped[0], 50.0) and math.isclose(clamped[4], 0.01) and clamped[5] == 0.0
    with pytest.raises(dnnlib.UserError, match='--steps'):
        samplers.edm_sigma_steps(_Sigmas(), num_steps=1)


def test_heun_churn_is_per_seed_deterministic(edm_net):
    churn = dict(num_steps=4, S_churn=40.0, S_min=0.05, S_max=50.0)

    def run(seeds, **kwargs):
        latents, class_labels, rnd = draw_inputs(seeds)
        return samplers.edm_sampler(edm_net, latents, class_labels, randn_like=rnd.randn_like, **kwargs)

    first = run([0, 1, 2], **churn)
    assert torch.equal(first, run([0, 1, 2], **churn))
    assert torch.equal(first[1:], run([1, 2], **churn))
    assert torch.isfinite(first).all()
    assert (first - run([0, 1, 2], num_steps=4)).abs().max() > 1e-3  # Churn does change the result.


# --- output conversion --------------------------------------------------------------------------------------

def test_to_uint8_truncates_and_clips():
    values = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 0.999, 1.0, 3.0], dtype=torch.float64)
    x = values.reshape(1, 1, 2, 4).expand(1, 3, 2, 4)
    out = samplers.to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 2, 4, 3)
    reference = [min(max(math.floor(v * 127.5 + 128), 0), 255) for v in values.tolist()]
    assert out[0, :, :, 2].flatten().tolist() == reference


@pytest.mark.parametrize('make, t_max, too_far', [
    (samplers.make_consistency_steps, 80.0, math.inf),                          # σ: any finite t_max
    (samplers_trigflow.make_trigflow_steps, math.nextafter(math.pi / 2, 0), math.pi / 2),   # radians, below π/2
    (samplers_meanflow.make_meanflow_steps, 1.0, math.nextafter(1.0, 2)),     # flow time, at most 1
])
def test_every_family_checks_its_steps_one_way(make, t_max, too_far):
    """One check (training/sampling/time_steps.py) for the three families: strictly decreasing, finite, ending at
    0, t_max within the family's bound; a violation is one UserError naming the flags."""
    assert make(t_max, [t_max / 2]) == (t_max, t_max / 2, 0.0)
    for bad in ((too_far, None), (t_max, [t_max]), (t_max, [t_max / 4, t_max / 2]), (t_max, [math.nan]),
                (t_max, [-t_max / 2])):
        with pytest.raises(dnnlib.UserError, match='--t-max/--mid_t: .* steps must decrease strictly'):
            make(*bad)
