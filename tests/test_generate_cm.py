"""generate.py with openai consistency_models networks: flags, openai's RNG rules, --npz (fixtures/openai_cm)."""

import shutil

import numpy as np
import PIL.Image
import pytest
import torch

import generate
from conftest import FIXTURES_DIR, load_openai_cm_net
from training.sampling import generation
from training.sampling import samplers
from training.sampling import samplers_karras

TINY_IN = ['--resolution=16', '--num_head_channels=16']


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as e:
        generate.cli.main(args=['--device=cpu', '--no-progress', *args], prog_name='generate.py')
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope='module')
def released_name(tmp_path_factory):
    """The tiny ImageNet-like state dict under a released consistency-form name (cd_*: no --parameterization)."""
    path = tmp_path_factory.mktemp('net') / 'cd_imagenet64_l2.pt'
    shutil.copy(FIXTURES_DIR / 'openai_cm' / 'tiny_imagenet_like.pt', path)
    return path


def test_cli_multistep_npz_and_pngs_match_official(capsys, tmp_path, released_name, openai_cm):
    outdir, npz = tmp_path / 'out', tmp_path / 'samples.npz'
    code, _, err = run_cli(capsys, f'--network={released_name}', f'--outdir={outdir}', *TINY_IN, '--seeds=0-3',
                           '--class=7', '--sampler=multistep', '--ts=0,22,39', '--steps=40', '--batch=3', f'--npz={npz}')
    assert code == 0, err
    data = np.load(npz)
    official = openai_cm['samplers/in_cm_multistep/uint8_openai']
    assert data['arr_0'].dtype == np.uint8 and data['arr_0'].shape == official.shape
    assert (data['arr_0'] == official).mean() >= 0.995 and np.abs(data['arr_0'].astype(int) - official).max() <= 1
    np.testing.assert_array_equal(data['arr_1'], [7, 7, 7, 7])
    for seed in range(4):
        png = np.array(PIL.Image.open(outdir / f'{seed:06d}.png'))
        assert np.abs(png.astype(int) - openai_cm['samplers/in_cm_multistep/uint8_edm'][seed]).max() <= 1


def test_default_is_onestep_for_consistency_form(released_name):
    net = load_openai_cm_net('imagenet_like', 'consistency')
    assert samplers.resolve_sampler(net) == ('karras', dict(sampler='onestep', steps=40))
    assert samplers.resolve_sampler(net, ts=[0, 22, 39])[1]['sampler'] == 'multistep'
    assert samplers.resolve_sampler(load_openai_cm_net('lsun_like', 'edm'))[1] == dict(sampler='heun', steps=40)


def test_openai_spellings_reach_the_sampler():
    net = load_openai_cm_net('lsun_like', 'edm')
    _, kwargs = samplers.resolve_sampler(net, 'dpm', 6, S_churn=2.0, S_min=0.1, S_max=20.0, S_noise=1.0,
                                         clip_denoised=False, sigma_max=40.0)
    assert kwargs == dict(sampler='dpm', steps=6, s_churn=2.0, s_tmin=0.1, s_tmax=20.0, s_noise=1.0, sigma_max=40.0,
                          clip_denoised=False)


def test_no_class_index_from_the_image_generator(openai_cm):
    """Labels come from their own stream: the image generator's draws after the latent stay openai's, so with the
    labels fixed the images are the official ones; without --class each seed keeps its label in any batch."""
    net = load_openai_cm_net('imagenet_like', 'consistency')
    kwargs = dict(sampler='multistep', steps=40, ts=[0, 22, 39])
    (_, images, labels), = generation.generate_batches(net, [0, 1, 2, 3], 7, 'karras', kwargs, batch_size=4)
    assert (images - torch.from_numpy(openai_cm['samplers/in_cm_multistep/float'])).abs().max() <= 1e-4
    assert labels.tolist() == [7] * 4
    both = list(generation.generate_batches(net, [5, 9], None, 'karras', kwargs, batch_size=2))
    alone = list(generation.generate_batches(net, [9], None, 'karras', kwargs, batch_size=1))
    assert both[0][2][1] == alone[0][2][0] and (both[0][1][1] - alone[0][1][0]).abs().max() <= 1e-5
    assert both[0][2].tolist() == samplers_karras.seed_labels([5, 9], 10).tolist()


@pytest.mark.parametrize('args, flag', [
    (['--sampler=heun', '--ts=0,10'], '--ts'),
    (['--sampler=onestep', '--s_churn=1'], '--s_churn'),
    (['--sampler=multistep', '--ts=0,50'], '--ts'),
    (['--sampler=multistep', '--mid_t=1'], '--mid_t'),
    (['--ts=a,b'], '--ts'),
])
def test_bad_flags_fail_before_sampling(capsys, tmp_path, released_name, args, flag):
    outdir = tmp_path / 'out'
    code, _, err = run_cli(capsys, f'--network={released_name}', f'--outdir={outdir}', *TINY_IN, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and flag in err, err
    assert not outdir.exists()


def test_state_dict_without_released_name_needs_parameterization(capsys, tmp_path):
    code, _, err = run_cli(capsys, f'--network={FIXTURES_DIR / "openai_cm" / "tiny_lsun_like.pt"}',
                           f'--outdir={tmp_path / "out"}', '--resolution=16', '--num_head_channels=8')
    assert code == 2 and '--parameterization' in err
