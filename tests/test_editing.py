"""Zero-shot editing operators against openai/consistency_models (fixtures `edit/*` of openai_cm.npz)."""

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from training.sampling import editing


@pytest.fixture(scope='module')
def cm(fixtures_dir):
    return np.load(fixtures_dir / 'openai_cm' / 'openai_cm.npz')


def _images(cm, n=4):
    return torch.from_numpy(cm['edit/images'][:n])


def _other(cm, n=14):
    """The fixture's second operand: all 14 images flipped (batch and width) times 1.2, the first n."""
    return torch.from_numpy(cm['edit/images']).flip(0).flip(3)[:n] * 1.2


def _close(actual, expected, atol=1e-5):
    actual = actual.detach().cpu().numpy() if torch.is_tensor(actual) else np.asarray(actual)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


def test_colour_basis_matches_official(cm):
    q = editing.colour_basis()
    _close(q, cm['edit/colorize/Q'], atol=1e-12)
    _close(q.T @ q, np.eye(3), atol=1e-12)
    luma = np.asarray(editing.LUMA)
    _close(q[:, 0], luma / np.linalg.norm(luma), atol=1e-15)


def test_colour_basis_round_trip(cm):
    images = _images(cm)
    basis = editing.to_basis(images, editing.colour_basis().float(), dim=1)
    _close(basis, cm['edit/colorize/basis'])
    _close(editing.from_basis(basis, editing.colour_basis().float(), dim=1), cm['edit/colorize/basis_inverse'])
    _close(editing.from_basis(basis, editing.colour_basis().float(), dim=1), cm['edit/images'][:4])


def test_colour_replacement_and_grayscale(cm):
    images = _images(cm)
    op = editing.Colorization()
    _close(op.replace(images, _other(cm, len(images))), cm['edit/colorize/replace_images_other'])
    grey = op.degrade(images)
    _close(grey, cm['edit/colorize/degraded'])
    luma = torch.tensor(editing.LUMA, dtype=torch.float64).reshape(1, 3, 1, 1)
    # Independent check: the grey image is the luma, projected back along the unit luma vector (equal RGB ratios).
    expected = (images.double() * luma).sum(1, keepdim=True) * luma / (luma ** 2).sum()
    _close(grey.double(), expected.numpy(), atol=1e-6)


def test_patch_basis_and_sampling(cm):
    images = _images(cm)
    _close(editing.patch_basis(8), cm['edit/superres/Q'].astype(np.float64), atol=1e-6)
    _close(editing.patch_means(images, 8), cm['edit/superres/patch_means'])
    _close(editing.average_patches(images, 8), cm['edit/superres/average_patches'])
    ref = torch.nn.functional.avg_pool2d(images, 8)     # Independent: down-sampling is 8x8 average pooling.
    _close(editing.patch_means(images, 8), ref.numpy(), atol=1e-6)
    patches = editing.to_patches(images, 8)
    _close(editing.from_patches(patches, 8), cm['edit/images'][:4], atol=0)


def test_superres_replacement(cm):
    images = _images(cm)
    op = editing.SuperResolution(8)
    mixed = op.replace(images, _other(cm, len(images)))
    _close(mixed, cm['edit/superres/replace_images_other'])
    _close(op.degrade(images), cm['edit/superres/degraded'])
    # Independent form: the generated detail with the known patch means.
    other = _other(cm, len(images))
    _close(mixed, (other - editing.average_patches(other) + editing.average_patches(images)).numpy())


def test_letter_mask_matches_official_drawing(cm):
    _close(editing.letter_image(16), cm['edit/inpaint/letter'], atol=0)
    letter256 = np.unpackbits(cm['edit/inpaint/letter256_white_packed']).reshape(256, 256)
    _close((editing.letter_image(256)[0] > 0.5).astype(np.uint8), letter256, atol=0)


def test_inpainting_masks_and_replacement(cm):
    images = torch.from_numpy(cm['edit/images'])
    mask = editing.mask_from_image(cm['edit/inpaint/letter'], 16)
    masks = editing.batch_masks(mask, range(14))
    _close(masks, cm['edit/inpaint/mask'], atol=0)
    op = editing.Inpainting(masks)
    degraded = op.degrade(images)
    _close(degraded, cm['edit/inpaint/degraded'])
    _close(op.replace(degraded, _other(cm, len(images)).clamp(-1, 1)), cm['edit/inpaint/replace_degraded_other'])
    # Any batch: images 5..9 cut across the official groups of 7 and get the same masks as in the full batch.
    _close(editing.batch_masks(mask, range(5, 10)), cm['edit/inpaint/mask'][5:10], atol=0)


def test_mask_errors():
    with pytest.raises(dnnlib.UserError, match='16x16'):
        editing.mask_from_image(np.zeros([3, 8, 8], np.uint8), 16)
    with pytest.raises(dnnlib.UserError, match='patch size'):
        editing.SuperResolution(8).degrade(torch.zeros([1, 3, 12, 12]))
    with pytest.raises(dnnlib.UserError, match='--ts'):
        editing.iterative_edit(None, editing.Colorization(), torch.zeros([1, 3, 8, 8]), torch.zeros([1, 3, 8, 8]),
                               ts=(0, 39, 12))


def _reference_edit(denoise, known_fn, degraded, x, ts, steps, draws):
    """Algorithm 4 written out in float64 with the Karras grid from numpy (an independent reference)."""
    grid = (80 ** (1 / 7) + np.arange(steps) / (steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    for i, (cur, nxt) in enumerate(zip(ts[:-1], ts[1:])):
        x0 = known_fn(degraded, denoise(x, grid[cur]).clamp(-1, 1))
        x = x0 + draws[i] * np.sqrt(np.clip(grid[nxt], 0.002, 80) ** 2 - 0.002 ** 2)
    return x


@pytest.mark.parametrize('ts', [(0, 12, 24, 39), (0, 15, 30)])
def test_iterative_edit_follows_algorithm_4(cm, ts):
    images = _images(cm).double()
    latents = torch.randn([4, 3, 16, 16], generator=torch.Generator().manual_seed(1))
    denoise = lambda x, t: torch.tanh(x / (1 + t)) * 1.1   # noqa: E731 -- a smooth stand-in consistency function
    gen = torch.Generator().manual_seed(2)
    result, degraded = editing.iterative_edit(denoise, editing.SuperResolution(8), images, latents, ts=ts, steps=40,
                                              randn_like=lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype))
    assert degraded.dtype == torch.float64
    gen = torch.Generator().manual_seed(2)
    draws = [torch.randn([4, 3, 16, 16], generator=gen).double() for _ in ts[1:]]
    mean_swap = lambda known, gen_: gen_ - editing.average_patches(gen_) + editing.average_patches(known)  # noqa: E731
    expected = _reference_edit(denoise, mean_swap, editing.average_patches(images), latents.double() * 80, ts, 40, draws)
    _close(result, expected.numpy(), atol=1e-10)


@pytest.mark.parametrize('resolution', [32, 64, 512])
def test_letter_scales_to_any_resolution(cm, resolution):
    letter = editing.letter_image(resolution)
    assert letter.shape == (3, resolution, resolution) and letter.dtype == np.uint8
    black = (letter[0] == 0).mean()
    assert 0.05 < black < 0.5                  # the letter is drawn inside the canvas, not clipped away
    reference = PIL.Image.fromarray(np.unpackbits(cm['edit/inpaint/letter256_white_packed']).reshape(256, 256) * 255)
    scaled = np.asarray(reference.resize((resolution, resolution), PIL.Image.NEAREST)) > 0
    assert ((letter[0] > 0) == scaled).mean() > 0.9   # the same shape as the 256-px drawing, scaled


def test_letter_font_falls_back_to_pillows_default(monkeypatch):
    monkeypatch.setattr(editing, 'LETTER_FONT', 'no-such-font.ttf')
    letter = editing.letter_image(64)
    assert 0.02 < (letter[0] == 0).mean() < 0.5
    with pytest.raises(dnnlib.UserError, match='--font=missing.ttf'):
        editing.letter_image(64, font_path='missing.ttf')
