"""generate.py: the reusable image generator, sampler defaults, PNG writing and the command line."""

import os

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
import generate
from test_samplers import assert_uint8_matches_fixture, build_fixture_net, ecm_net  # noqa: F401 (ecm_net is a fixture)
from training import cli_common, networks
from training.checkpoints import checkpoint
from training.sampling import generation
from training.networks import edm2 as networks_edm2
from training.sampling import samplers

TWO_STEP = dict(t_steps=(80.0, 0.821, 0.0))


@pytest.fixture(scope='module')
def snapshot(ecm_net, tmp_path_factory):
    path = tmp_path_factory.mktemp('net') / 'network-snapshot.pt'
    checkpoint.save_network_snapshot(path, ecm_net, mid_t=0.821, kimg=1)
    return str(path)


@pytest.fixture(scope='module')
def six_images(ecm_net):
    """Seeds 0-5, 2-step consistency, one batch of 6."""
    (seeds, images), = generation.generate_images(ecm_net, range(6), sampler='consistency', sampler_kwargs=TWO_STEP,
                                                batch_size=6)
    assert seeds == list(range(6))
    return images


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of generate.py with `args`, run in this process."""
    with pytest.raises(SystemExit) as e:
        generate.cli.main(args=['--device=cpu', *args], prog_name='generate.py')
    out, err = capsys.readouterr()
    return e.value.code, out, err


def read_png(path):
    return np.array(PIL.Image.open(path))

# --- generate_images ----------------------------------------------------------------------------------------


def test_generated_images_match_fixture(six_images, edm_forward):
    """Random class per seed from the seed's generator, as the fixture; seeds 0-3 are the reference images."""
    assert six_images.dtype == torch.uint8 and six_images.shape == (6, 32, 32, 3)
    assert_uint8_matches_fixture(six_images[:4].numpy(), edm_forward, 'ecm_2step')


def test_batch_size_does_not_change_images(ecm_net, six_images):
    batches = list(generation.generate_images(ecm_net, range(6), sampler='consistency', sampler_kwargs=TWO_STEP,
                                            batch_size=2))
    assert [seeds for seeds, _ in batches] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(torch.cat([images for _, images in batches]), six_images)


def test_ranks_share_seeds_without_overlap(ecm_net, six_images):
    by_seed = {}
    for rank in range(4):
        for seeds, images in generation.generate_images(ecm_net, range(6), sampler='consistency',
                                                      sampler_kwargs=TWO_STEP, batch_size=3, rank=rank, world_size=4):
            for seed, image in zip(seeds, images):
                assert seed not in by_seed
                by_seed[seed] = image
    assert sorted(by_seed) == list(range(6))
    assert torch.equal(torch.stack([by_seed[s] for s in range(6)]), six_images)


def test_fixed_class_uses_that_label(ecm_net, edm_forward):
    (_, images), = generation.generate_images(ecm_net, [0, 1], class_idx=3, sampler='consistency',
                                            sampler_kwargs=dict(t_steps=(80.0, 0.0)))
    latents = torch.from_numpy(edm_forward['sampler/latents'][:2])
    labels = torch.zeros([2, 10])
    labels[:, 3] = 1
    with torch.no_grad():
        expected = samplers.to_uint8(samplers.consistency_sampler(ecm_net, latents, labels, t_steps=(80.0, 0.0)))
    assert torch.equal(images, expected)
    assert not torch.equal(images[0], torch.from_numpy(edm_forward['sampler/ecm_1step_uint8'][0]))  # Class 7 there.


@pytest.mark.parametrize('class_idx', [10, -1])
def test_class_out_of_range_is_refused(ecm_net, class_idx):
    with pytest.raises(dnnlib.UserError, match='--class'):
        generation.generate_images(ecm_net, [0], class_idx=class_idx)

# --- sampler defaults ---------------------------------------------------------------------------------------


def test_default_samplers(ecm_net, edm_forward):
    assert samplers.resolve_sampler(ecm_net) == ('consistency', TWO_STEP)
    assert samplers.resolve_sampler(ecm_net, num_steps=1) == ('consistency', dict(t_steps=(80.0, 0.0)))
    assert samplers.resolve_sampler(ecm_net, metadata=dict(mid_t=[1.2])) == \
        ('consistency', dict(t_steps=(80.0, 1.2, 0.0)))
    assert samplers.resolve_sampler(ecm_net, mid_t=[5.0, 0.5], t_max=40.0) == \
        ('consistency', dict(t_steps=(40.0, 5.0, 0.5, 0.0)))
    edm_net = build_fixture_net(edm_forward, networks.EDMPrecond)
    assert samplers.resolve_sampler(edm_net) == ('heun', {})
    assert samplers.resolve_sampler(edm_net, num_steps=9, S_churn=5.0) == ('heun', dict(num_steps=9, S_churn=5.0))
    edm2_kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1],
                       num_blocks=1, attn_resolutions=[])
    assert samplers.resolve_sampler(networks_edm2.Precond(**edm2_kwargs, ecm_sigma_min=0.002)) == \
        ('consistency', dict(t_steps=(80.0, 1.526, 0.0)))
    assert samplers.resolve_sampler(networks_edm2.Precond(**edm2_kwargs))[0] == 'heun'


@pytest.mark.parametrize('kwargs, flag', [
    (dict(num_steps=3), '--steps'),
    (dict(num_steps=2, mid_t=[2.0, 1.0]), '--steps'),
    (dict(sampler='heun', mid_t=[1.0]), '--mid_t'),
    (dict(sampler='heun', t_max=40.0), '--t-max'),
    (dict(sampler='consistency', rho=5.0), '--rho'),
])
def test_conflicting_sampler_options_are_refused(ecm_net, kwargs, flag):
    with pytest.raises(dnnlib.UserError, match=flag):
        samplers.resolve_sampler(ecm_net, **kwargs)

# --- helpers ------------------------------------------------------------------------------------------------


def test_parse_int_list():
    assert cli_common.parse_int_list('0-3,7, 10-11') == [0, 1, 2, 3, 7, 10, 11]
    for bad in ['a', '3-1', '1,,2', '-4', '1.5']:
        with pytest.raises(dnnlib.UserError, match='--seeds'):
            cli_common.parse_int_list(bad)


def test_make_grid_tiles_row_major():
    images = np.arange(5 * 2 * 3 * 1, dtype=np.uint8).reshape(5, 2, 3, 1) + 1
    grid = generation.make_grid(images)
    assert grid.shape == (2 * 2, 3 * 3, 1)
    for i in range(5):
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(grid[r * 2:(r + 1) * 2, c * 3:(c + 1) * 3], images[i])
    assert not grid[2:, 6:].any()


def test_image_path_subdirs():
    assert generate.image_path('out', 1234) == os.path.join('out', '001234.png')
    assert generate.image_path('out', 1234, subdirs=True) == os.path.join('out', '001000', '001234.png')

# --- command line -------------------------------------------------------------------------------------------


def test_cli_writes_fixture_pixels(capsys, snapshot, tmp_path, edm_forward):
    """Snapshot metadata mid_t=0.821 selects the 2-step sampler; PNG pixels equal the reference."""
    code, out, _ = run_cli(capsys, f'--network={snapshot}', f'--outdir={tmp_path}', '--seeds=0-3', '--batch=3')
    assert code == 0, out
    assert sorted(os.listdir(tmp_path)) == [f'{s:06d}.png' for s in range(4)]
    pngs = np.stack([read_png(tmp_path / f'{seed:06d}.png') for seed in range(4)])
    assert_uint8_matches_fixture(pngs, edm_forward, 'ecm_2step')


def test_cli_grid_one_step(capsys, snapshot, tmp_path, edm_forward):
    code, out, _ = run_cli(capsys, f'--network={snapshot}', f'--outdir={tmp_path}', '--seeds=0-3', '--steps=1', '--grid')
    assert code == 0, out
    assert os.listdir(tmp_path) == ['grid.png']
    grid = read_png(tmp_path / 'grid.png')
    assert grid.shape == (64, 64, 3)
    tiles = grid.reshape(2, 32, 2, 32, 3).transpose(0, 2, 1, 3, 4).reshape(4, 32, 32, 3)
    assert_uint8_matches_fixture(tiles, edm_forward, 'ecm_1step')


def test_cli_subdirs_and_mid_t_flag(capsys, snapshot, tmp_path, ecm_net):
    code, out, _ = run_cli(capsys, f'--network={snapshot}', f'--outdir={tmp_path}', '--seeds=1001', '--subdirs',
                           '--mid-t=2.0', '--class=4')
    assert code == 0, out
    (_, expected), = generation.generate_images(ecm_net, [1001], class_idx=4, sampler='consistency',
                                              sampler_kwargs=dict(t_steps=(80.0, 2.0, 0.0)))
    np.testing.assert_array_equal(read_png(tmp_path / '001000' / '001001.png'), expected[0].numpy())


@pytest.mark.parametrize('args, flag', [
    (['--class=10'], '--class'),
    (['--seeds=1-x'], '--seeds'),
    (['--steps=3'], '--steps'),
    (['--sampler=heun', '--mid_t=0.5'], '--mid_t'),
    (['--mid_t=0.5,abc'], '--mid_t'),
    (['--mid_t=90'], '--mid_t'),
])
def test_cli_bad_flags_fail_before_sampling(capsys, snapshot, tmp_path, args, flag):
    outdir = tmp_path / 'out'
    code, _, err = run_cli(capsys, f'--network={snapshot}', f'--outdir={outdir}', *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and flag in err
    assert not outdir.exists()


def test_cli_missing_network(capsys, tmp_path):
    missing = tmp_path / 'nope.pt'
    code, _, err = run_cli(capsys, f'--network={missing}', f'--outdir={tmp_path / "out"}')
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(missing) in err


@pytest.mark.parametrize('family', ['trigflow', 'meanflow'])
def test_snapshots_of_continuous_time_methods_pick_their_sampler(capsys, tmp_path, family):
    """An sCM or MeanFlow snapshot (its method recorded as sampler=...) samples with its own 2-step sampler at its
    recorded mid_t, with no flag; the images equal the sampler's, written out per seed (latent from the seed's
    generator, then the re-noising draws)."""
    from training.networks.meanflow_unet import MeanFlowPrecond
    from training.networks.trigflow import TrigFlowPrecond
    from training.sampling import samplers_meanflow, samplers_trigflow
    tiny = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1], num_blocks=1,
                attn_resolutions=[])
    torch.manual_seed(0)
    net = (TrigFlowPrecond(**tiny) if family == 'trigflow' else MeanFlowPrecond(**tiny)).eval()
    mid_t = 1.1 if family == 'trigflow' else 0.4
    checkpoint.save_network_snapshot(tmp_path / 'net.pt', net, kimg=1, mid_t=[mid_t], sampler=family)
    code, out, _ = run_cli(capsys, f'--network={tmp_path / "net.pt"}', f'--outdir={tmp_path / "out"}', '--seeds=3')
    assert code == 0 and f'with the {family} sampler' in out, out
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn([1, 3, 8, 8], generator=gen)
    if family == 'trigflow':
        steps = samplers_trigflow.make_trigflow_steps(mid_t=[mid_t])
        x = samplers_trigflow.trigflow_sampler(net, latents, t_steps=steps,
                                               randn_like=lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype))
    else:
        x = samplers_meanflow.meanflow_sampler(net, latents, t_steps=(1.0, mid_t, 0.0))
    np.testing.assert_array_equal(read_png(tmp_path / 'out' / '000003.png'), samplers.to_uint8(x)[0].numpy())
