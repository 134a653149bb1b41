"""training/sampling/samplers_karras.py against openai's karras_sample (fixtures/openai_cm, determ-indiv seeds 0-3)."""

import numpy as np
import pytest
import torch

import dnnlib
from conftest import load_npz_meta, load_openai_cm_net
from training.sampling import samplers
from training.sampling import samplers_karras

CASES = ['in_cm_onestep', 'in_cm_multistep', 'in_cm_multistep_ct', 'in_edm_heun', 'lsun_cm_onestep',
         'lsun_cm_multistep', 'lsun_cm_multistep_noisy_end', 'lsun_edm_heun', 'lsun_edm_heun_churn', 'lsun_edm_euler',
         'lsun_edm_ancestral', 'lsun_edm_dpm', 'lsun_edm_dpm_churn', 'lsun_edm_progdist']
QUANTIZERS = dict(uint8_openai=samplers_karras.to_uint8_openai, uint8_edm=samplers.to_uint8)


@pytest.fixture(scope='module')
def nets():
    return {(name, form): load_openai_cm_net(name, form) for name in ('imagenet_like', 'lsun_like')
            for form in ('edm', 'consistency')}


def _settings(openai_cm, case):
    c = load_npz_meta(openai_cm)['samplers'][case]
    kwargs = {k: c[k] for k in ('s_churn', 's_tmin', 's_tmax', 's_noise') if k in c}
    kwargs.update(sampler=c['sampler'], steps=c['steps'], ts=c['ts'], sigma_min=c['sigma_min'],
                  sigma_max=c['sigma_max'], rho=c['rho'], clip_denoised=c['clip_denoised'])
    return c, kwargs


def _sample(nets, openai_cm, case, seeds, randn_like_hook=None):
    c, kwargs = _settings(openai_cm, case)
    net = nets[(c['net'], 'edm' if c['form'] == 'edm' else 'consistency')]
    rnd = samplers.StackedRandomGenerator('cpu', seeds)
    latents = rnd.randn([len(seeds), 3, 16, 16])
    labels = None if c['class_label'] is None else torch.full([len(seeds)], c['class_label'])
    with torch.no_grad():
        return latents, samplers_karras.karras_sample(net, latents, labels, randn_like_hook or rnd.randn_like, **kwargs)


@pytest.mark.parametrize('case', CASES)
def test_sampler_matches_official_seed_by_seed(nets, openai_cm, case):
    latents, x = _sample(nets, openai_cm, case, [0, 1, 2, 3])
    assert torch.equal(latents, torch.from_numpy(openai_cm['samplers/latents']))
    ref = torch.from_numpy(openai_cm[f'samplers/{case}/float'])
    assert x.dtype == torch.float32 and (x - ref).abs().max() <= 1e-4
    exact = []
    for key, quantize in QUANTIZERS.items():
        ours, expected = quantize(x).numpy().astype(int), openai_cm[f'samplers/{case}/{key}'].astype(int)
        # A value counts as equal when it is the quantisation of a float within 1e-5 of the reference float.
        lo, hi = (quantize(ref + delta).numpy().astype(int) for delta in (-1e-5, 1e-5))
        assert ((ours >= lo) & (ours <= hi)).all(), key
        assert np.abs(ours - expected).max() <= 1, key
        exact.append((ours == expected).mean())
    assert max(exact) >= 0.995


@pytest.mark.parametrize('case, seed', [('in_cm_multistep', 2), ('lsun_edm_heun_churn', 3), ('lsun_edm_ancestral', 1)])
def test_image_depends_on_its_seed_only(nets, openai_cm, case, seed):
    _, x = _sample(nets, openai_cm, case, [seed])
    assert (x[0] - torch.from_numpy(openai_cm[f'samplers/{case}/float'][seed])).abs().max() <= 1e-4


@pytest.mark.parametrize('case', ['in_cm_multistep', 'lsun_edm_heun', 'lsun_edm_euler', 'lsun_edm_dpm'])
def test_draw_count_matches_official(nets, openai_cm, case):
    rnd = samplers.StackedRandomGenerator('cpu', [0, 1, 2, 3])
    rnd.randn([4, 3, 16, 16])
    draws = []

    def recording_randn_like(x):
        draws.append(rnd.randn_like(x))
        return draws[-1]
    _sample(nets, openai_cm, case, [0, 1, 2, 3], recording_randn_like)
    assert len(draws) == load_npz_meta(openai_cm)['samplers'][case]['draws_after_latent']
    assert all(d.dtype == torch.float32 for d in draws)
    if case == 'in_cm_multistep':
        assert torch.equal(torch.stack(draws), torch.from_numpy(openai_cm['samplers/in_cm_multistep/draws']))


def test_noise_levels_match_official(openai_cm):
    for n in (2, 8, 40):
        assert torch.equal(samplers_karras.karras_sigmas(n), torch.from_numpy(openai_cm[f'sigmas_karras/{n}']))
    for case in CASES:
        c, _ = _settings(openai_cm, case)
        if c['sampler'] == 'multistep':
            t = samplers_karras.multistep_times(c['ts'], c['steps'])
            np.testing.assert_allclose(t, openai_cm[f'samplers/{case}/t'], rtol=1e-15)
        elif c['sampler'] != 'onestep':
            n = c['steps'] + 1 if c['sampler'] == 'progdist' else c['steps']
            assert torch.equal(samplers_karras.karras_sigmas(n), torch.from_numpy(openai_cm[f'samplers/{case}/sigmas']))


def test_multistep_times_float64_reference():
    rho, lo, hi = 7.0, 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    expected = [(hi + i / 39 * (lo - hi)) ** rho for i in (0, 22, 39)]
    assert samplers_karras.multistep_times([0, 22, 39], 40) == pytest.approx(expected, rel=1e-15)
    assert expected[0] == pytest.approx(80.0) and expected[-1] == pytest.approx(0.002)


@pytest.mark.parametrize('ts, steps', [([0], 40), ([0, 40], 40), ([5, 3], 40), ([-1, 3], 40)])
def test_bad_ts_is_refused(ts, steps):
    with pytest.raises(dnnlib.UserError, match='--ts'):
        samplers_karras.check_ts(ts, steps)


def test_unknown_sampler_is_refused():
    with pytest.raises(dnnlib.UserError, match='--sampler=lms'):
        samplers_karras.karras_sample(None, torch.zeros(1, 3, 4, 4), sampler='lms')


@pytest.mark.parametrize('case', CASES)
def test_nfe_counts_network_calls(nets, openai_cm, case):
    c, kwargs = _settings(openai_cm, case)
    net = nets[(c['net'], 'edm' if c['form'] == 'edm' else 'consistency')]
    calls = []

    def counting_net(x, sigma, labels):
        calls.append(1)
        return net(x, sigma, labels)
    samplers_karras.karras_sample(counting_net, torch.zeros(1, 3, 16, 16), None if c['class_label'] is None
                                  else torch.tensor([c['class_label']]), **kwargs)
    assert samplers_karras.karras_nfe(**kwargs) == len(calls)
