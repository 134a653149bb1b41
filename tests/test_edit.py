"""Zero-shot editing end to end: the official results of the three tasks with the lsun_like network (fixtures
`edit/*/result`, determ-indiv seeds), and edit.py on PNG folders (any batch size, outputs, user errors)."""

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import edit
from training.checkpoints import reader
from training.sampling import editing
from training.sampling import samplers
from training.sampling.generation import save_png


@pytest.fixture(scope='module')
def cm(fixtures_dir):
    return np.load(fixtures_dir / 'openai_cm' / 'openai_cm.npz')


@pytest.fixture(scope='module')
def lsun_path(fixtures_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp('net') / 'cd_lsun_like16.pt'   # cd_*: the consistency form
    path.write_bytes((fixtures_dir / 'openai_cm' / 'tiny_lsun_like.pt').read_bytes())
    return path


@pytest.fixture(scope='module')
def lsun_net(lsun_path):
    net, _ = reader.load_network(str(lsun_path), resolution=16, num_head_channels=8)
    return net


def _official_run(net, cm, op, n):
    """Algorithm 4 as the fixture ran it: images 0..n-1, determ-indiv seeds 0..n-1, ts 0,12,24,39 of 40."""
    images = torch.from_numpy(cm['edit/images'][:n])
    rnd = samplers.StackedRandomGenerator('cpu', range(n))
    latents = rnd.randn([n, 3, 16, 16])
    ts = tuple(int(t) for t in cm['edit/ts'])
    with torch.no_grad():
        return editing.iterative_edit(edit.denoiser(net, None), op, images, latents, ts=ts, steps=40,
                                      randn_like=rnd.randn_like)


@pytest.mark.parametrize('task, n', [('colorize', 4), ('superres', 4), ('inpaint', 14)])
def test_results_match_the_official_procedure(cm, lsun_net, task, n):
    if task == 'inpaint':
        mask = editing.mask_from_image(cm['edit/inpaint/letter'], 16)
        op = editing.Inpainting(editing.batch_masks(mask, range(n)))
    else:
        op = editing.Colorization() if task == 'colorize' else editing.SuperResolution(8)
    result, degraded = _official_run(lsun_net, cm, op, n)
    np.testing.assert_allclose(degraded.numpy(), cm[f'edit/{task}/degraded'], rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.numpy(), cm[f'edit/{task}/result'], rtol=0, atol=1e-5)   # measured 9e-7


# ----------------------------------------------------------------------------------------------------------
# edit.py


@pytest.fixture(scope='module')
def png_folder(cm, tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    images = samplers.to_uint8(torch.from_numpy(cm['edit/images'][:9])).numpy()
    for i, image in enumerate(images):
        save_png(root / f'img{i:02d}.png', image)
    return root, images


def _run(*args):
    return CliRunner().invoke(edit.cli, ['--device=cpu', '--resolution=16', '--num_head_channels=8', *args],
                              catch_exceptions=False)


def _read(path):
    return np.asarray(PIL.Image.open(path))


@pytest.mark.parametrize('task', edit.TASKS)
def test_cli_matches_the_library_whatever_the_batch(lsun_path, lsun_net, png_folder, tmp_path, task):
    root, images = png_folder
    result = _run(f'--task={task}', f'--network={lsun_path}', f'--images={root}', f'--outdir={tmp_path}', '--batch=4',
                  '--seed=5', '--ts=0,20,39')
    assert result.exit_code == 0, result.output
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float64) / 127.5 - 1
    if task == 'inpaint':   # The letter mask of the official drawing at 16 px, groups of 7 (images 7, 8 inverted).
        op = editing.Inpainting(editing.batch_masks(editing.mask_from_image(editing.letter_image(16), 16), range(9)))
    else:
        op = editing.Colorization() if task == 'colorize' else editing.SuperResolution(8)
    rnd = samplers.StackedRandomGenerator('cpu', range(5, 14))
    latents = rnd.randn(x.shape)
    with torch.no_grad():
        expected, degraded = editing.iterative_edit(edit.denoiser(lsun_net, None), op, x, latents, ts=(0, 20, 39),
                                                    steps=40, randn_like=rnd.randn_like)
    expected, degraded = samplers.to_uint8(expected).numpy(), samplers.to_uint8(degraded).numpy()
    for i in range(9):
        assert np.abs(_read(tmp_path / 'result' / f'{i:06d}.png').astype(int) - expected[i]).max() <= 1
        np.testing.assert_array_equal(_read(tmp_path / 'degraded' / f'{i:06d}.png'), degraded[i])
    grid = _read(tmp_path / 'grid.png')
    assert grid.shape == (9 * 16, 3 * 16, 3)
    np.testing.assert_array_equal(grid[16:32, :16], images[1])           # row 1: input | degraded | result
    np.testing.assert_array_equal(grid[16:32, 16:32], degraded[1])


def test_cli_user_mask_png(lsun_path, png_folder, tmp_path):
    root, images = png_folder
    mask = np.zeros([16, 16, 3], np.uint8)
    mask[:, :8] = 255                                                       # keep the left half
    PIL.Image.fromarray(mask).save(tmp_path / 'mask.png')
    result = _run('--task=inpaint', f'--network={lsun_path}', f'--images={root}', f'--outdir={tmp_path / "out"}',
                  f'--mask={tmp_path / "mask.png"}', '--batch=9')
    assert result.exit_code == 0, result.output
    for i in (0, 8):   # no inversion for a user mask: the left half is kept, the right half painted black
        degraded = _read(tmp_path / 'out' / 'degraded' / f'{i:06d}.png')
        np.testing.assert_array_equal(degraded[:, :8], images[i][:, :8])
        assert (degraded[:, 8:] == 0).all()


@pytest.mark.parametrize('args, message', [
    (['--task=superres', '--patch=3'], '--patch=3'),
    (['--task=inpaint', '--mask=missing.png'], '--mask=missing.png'),
    (['--task=colorize', '--ts=0,39,12'], '--ts=0,39,12'),
])
def test_cli_refuses_bad_flags_before_work(lsun_path, png_folder, tmp_path, args, message):
    result = _run(*args, f'--network={lsun_path}', f'--images={png_folder[0]}', f'--outdir={tmp_path / "out"}')
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / 'out').exists()


def test_cli_refuses_wrong_image_size_and_edm_form(lsun_path, tmp_path):
    save_png(tmp_path / 'imgs' / 'a.png', np.zeros([8, 8, 3], np.uint8))
    result = _run('--task=colorize', f'--network={lsun_path}', f'--images={tmp_path / "imgs"}', f'--outdir={tmp_path}')
    assert result.exit_code == 2 and 'resolution 16' in result.output
    edm = tmp_path / 'edm_lsun_like.pt'
    edm.write_bytes(lsun_path.read_bytes())
    result = _run('--task=colorize', f'--network={edm}', f'--images={tmp_path / "imgs"}', f'--outdir={tmp_path}')
    assert result.exit_code == 2 and 'EDM-form' in result.output
