"""Consistency Models: weightings, the Karras grid, the CD/CT/progdist schedules and the ODE steps against the
official numbers (openai_cm fixtures) and float64 formulas."""

import math

import numpy as np
import pytest
import torch

import dnnlib
from conftest import load_npz_meta
from training.methods import loss_cm


@pytest.fixture(scope='module')
def cm(fixtures_dir):
    return np.load(fixtures_dir / 'openai_cm' / 'openai_cm.npz')


@pytest.fixture(scope='module')
def cm_meta(cm):
    return load_npz_meta(cm)


@pytest.mark.parametrize('schedule', loss_cm.WEIGHT_SCHEDULES)
def test_weightings_match_official(cm, schedule):
    sigma = torch.from_numpy(cm['weightings/sigma'])
    got = loss_cm.get_weightings(schedule, sigma ** -2, 0.5)
    np.testing.assert_array_equal(got.numpy(), cm[f'weightings/{schedule}'])


def test_unknown_weighting_is_refused():
    with pytest.raises(dnnlib.UserError, match='--weighting'):
        loss_cm.get_weightings('lognormal', torch.ones(2))


@pytest.mark.parametrize('n', [2, 8, 40])
def test_karras_grid_matches_official_float32(cm, n):
    got = loss_cm.karras_sigmas(n, 0.002, 80, 7)
    np.testing.assert_array_equal(got.numpy(), cm[f'sigmas_karras/{n}'])
    assert got[0].item() != 80.0   # the float32 quirk: 79.999985


def test_level_sigma_is_the_karras_formula():
    index = torch.arange(40)
    got = loss_cm.level_sigma(index.double(), 39)
    ref = [(80 ** (1 / 7) + i / 39 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(40)]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)


def test_schedules_match_official(cm, cm_meta):
    steps = cm['schedules/steps']
    for recipe, kwargs in cm_meta['schedules'].items():
        kwargs = dict(kwargs)
        kwargs['distill_steps'] = kwargs.pop('distill_steps_per_iter')
        got = [loss_cm.ema_and_scales(int(k), **kwargs) for k in steps]
        np.testing.assert_array_equal([n for _, n in got], cm[f'schedules/{recipe}/scales'], err_msg=recipe)
        np.testing.assert_allclose([mu for mu, _ in got], cm[f'schedules/{recipe}/target_ema'], rtol=0, atol=1e-12)


def test_ct_schedule_formula_in_float64():
    # M(k) = max(1, ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1)), N = M + 1, mu = exp(s0 ln mu0 / M).
    for k in (0, 1, 12345, 400000, 800000):
        m = max(1, math.ceil(math.sqrt(k / 800000 * (201 ** 2 - 4) + 4) - 1))
        mu, n = loss_cm.ema_and_scales(k, 'adaptive', 0.95, 'progressive', 2, 200, 800000)
        assert n == m + 1
        assert abs(mu - math.exp(2 * math.log(0.95) / m)) < 1e-15


def test_impossible_schedule_is_refused():
    with pytest.raises(dnnlib.UserError, match='not a schedule'):
        loss_cm.ema_and_scales(0, 'adaptive', 0.95, 'fixed', 40, 40, 1000)


def test_ode_steps_on_a_linear_denoiser():
    # D(x, t) = c x: the ODE dx/dt = (1 - c) x / t has the solution x (t'/t)^(1 - c); Euler and Heun
    # are its first- and second-order approximations.
    x = torch.randn(3, 2, dtype=torch.float64)
    t, t_next = torch.full([3], 2.0, dtype=torch.float64), torch.full([3], 1.9, dtype=torch.float64)
    c = 0.3
    exact = x * (1.9 / 2.0) ** (1 - c)
    euler = loss_cm.ode_step(x, t, t_next, lambda a, s: c * a, 'euler')
    heun = loss_cm.ode_step(x, t, t_next, lambda a, s: c * a, 'heun')
    np.testing.assert_allclose(euler.numpy(), (x * (1 + (1 - c) * (-0.1) / 2.0)).numpy(), rtol=1e-14)
    assert (heun - exact).abs().max() < (euler - exact).abs().max() / 10


def test_distances(cm):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    np.testing.assert_allclose(loss_cm.distance('l2', x, y).numpy(), ((x - y) ** 2).mean((1, 2, 3)).numpy())
    np.testing.assert_allclose(loss_cm.distance('l1', x, y).numpy(), (x - y).abs().mean((1, 2, 3)).numpy())
    with pytest.raises(dnnlib.UserError, match='--loss-norm'):
        loss_cm.distance('l3', x, y)
    with pytest.raises(dnnlib.UserError, match='LPIPS'):
        loss_cm.distance('lpips', x, y)
