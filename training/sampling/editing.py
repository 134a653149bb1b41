"""Zero-shot image editing with a consistency model (Song et al. 2023, "Consistency Models", Sec. 5 and
Algorithm 4): colorization, super-resolution and inpainting, as openai/consistency_models defines them.

Each task is an operator with two methods: `degrade(images)` (what the user gives: grey images, patch
averages, images with a hole painted -1) and `replace(known, generated)` (keep the part of `known` the task
fixes, take the rest from `generated`). `iterative_edit` alternates the consistency function, the
replacement and re-noising along the multistep schedule `ts` of a `steps`-point Karras grid.
Images are N,C,H,W in [-1, 1]; every operator works for any batch size and resolution it can divide.
"""

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

import dnnlib
from training.sampling import samplers_karras

LUMA = (0.2989, 0.5870, 0.1140)    # The official grey-level weights of R, G, B.
DEFAULT_TS = (0, 12, 24, 39)       # Documented default schedule (4 NFE) on the default 40-point grid.
DEFAULT_STEPS = 40                 # openai's multistep grid size for the distilled models (launch.sh).
LETTER_FONT = 'DejaVuSans.ttf'     # Stands in for the official arial.ttf (not freely redistributable).

# ----------------------------------------------------------------------------------------------------------
# Orthogonal bases: the kept component is always the first basis vector.


# The official editing bases (Song et al. 2023, Sec. 5): an orthogonal matrix whose first column is the unit
# vector along `first_column`, from the QR decomposition of the identity with its first column replaced,
# signed so that the first column sums to a positive number.
def orthogonal_basis(first_column):
    v = np.asarray(first_column, dtype=np.float64)
    matrix = np.eye(v.size)
    matrix[:, 0] = v / np.linalg.norm(v)
    q = np.linalg.qr(matrix)[0]
    return torch.from_numpy(-q if q[:, 0].sum() < 0 else q)


def colour_basis():
    """The 3x3 colour basis (float64) whose first column is the unit luma vector."""
    return orthogonal_basis(LUMA)


def patch_basis(patch_size=8):
    """The (p², p²) patch basis (float64) whose first column is constant (the patch mean direction)."""
    return orthogonal_basis(np.ones(patch_size * patch_size))


def to_basis(x, basis, dim):
    """Coefficients of `x` along dimension `dim` in the columns of `basis`."""
    return torch.tensordot(x.movedim(dim, -1), basis.to(x), dims=1).movedim(-1, dim)


def from_basis(coefficients, basis, dim):
    """The inverse of `to_basis` (the basis is orthogonal)."""
    return torch.tensordot(coefficients.movedim(dim, -1), basis.to(coefficients).T, dims=1).movedim(-1, dim)


# Replacement in an orthogonal basis (Song et al. 2023, Algorithm 4): the first coefficient from `known`,
# every other coefficient from `generated`.
def basis_replacement(known, generated, basis, dim):
    a, b = to_basis(known, basis, dim), to_basis(generated, basis, dim)
    keep = torch.zeros(basis.shape[0], dtype=a.dtype, device=a.device)
    keep[0] = 1
    shape = [1] * a.ndim
    shape[dim] = -1
    keep = keep.reshape(shape)
    return from_basis(a * keep + b * (1 - keep), basis, dim)

# ----------------------------------------------------------------------------------------------------------
# Patches.


def to_patches(x, patch_size):
    """N,C,H,W -> N,C,H/p,W/p,p² (row-major pixels inside each patch)."""
    n, c, h, w = x.shape
    if h % patch_size or w % patch_size:
        raise dnnlib.UserError(f'super-resolution: the image size {h}x{w} is not divisible by the patch size {patch_size}')
    x = x.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // patch_size, w // patch_size, patch_size * patch_size)


def from_patches(x, patch_size):
    """The inverse of `to_patches`."""
    n, c, hp, wp, _ = x.shape
    x = x.reshape(n, c, hp, wp, patch_size, patch_size).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(n, c, hp * patch_size, wp * patch_size)


def patch_means(x, patch_size=8):
    """The low-resolution image: the mean of every patch (down-sampling by averaging), N,C,H/p,W/p."""
    return to_patches(x, patch_size).mean(dim=-1)


def upsample(x, patch_size=8):
    """Nearest-neighbour up-sampling by `patch_size` (every low-resolution pixel becomes a patch)."""
    return x.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def average_patches(x, patch_size=8):
    """Every patch replaced by its mean: down- then up-sampling (the official `average_image_patches`)."""
    return upsample(patch_means(x, patch_size), patch_size)

# ----------------------------------------------------------------------------------------------------------
# Operators.


class Colorization:
    """Keeps the grey level (the luma coordinate of the colour basis); the model fills in the colour."""

    def __init__(self):
        self.basis = colour_basis()     # 3x3, first column = unit luma vector

    def replace(self, known, generated):
        return basis_replacement(known, generated, self.basis, dim=1)

    def degrade(self, images):
        """The grey images, as RGB (the luma coordinate alone, mapped back)."""
        return self.replace(images, torch.zeros_like(images))


class SuperResolution:
    """Keeps the mean of every patch (the low-resolution image); the model fills in the detail."""

    def __init__(self, patch_size=8):
        self.patch_size = patch_size    # down-sampling factor; the official value is 8
        self.basis = patch_basis(patch_size)

    def replace(self, known, generated):
        p = self.patch_size
        return from_patches(basis_replacement(to_patches(known, p), to_patches(generated, p), self.basis, dim=-1), p)

    def degrade(self, images):
        return average_patches(images, self.patch_size)


class Inpainting:
    """Keeps the pixels where `mask` is 1; the model fills in the rest (painted -1 in the degraded image)."""

    def __init__(self, mask):
        self.mask = mask                # N,C,H,W (or broadcastable), 1 = kept, 0 = generated

    def replace(self, known, generated):
        mask = self.mask.to(known)
        return known * mask + generated * (1 - mask)

    def degrade(self, images):
        return self.replace(images, -torch.ones_like(images))

# ----------------------------------------------------------------------------------------------------------
# Inpainting masks.


def _letter_font(size, font_path=None):
    """`font_path`, else DejaVuSans, else Pillow's built-in scalable font (Pillow >= 10.1)."""
    for path in [font_path] if font_path else [LETTER_FONT]:
        try:
            return PIL.ImageFont.truetype(path, size)
        except OSError:
            if font_path:
                raise dnnlib.UserError(f'--font={font_path}: cannot load this TrueType font') from None
    try:
        return PIL.ImageFont.load_default(size)
    except TypeError:
        raise dnnlib.UserError(f'inpainting: the letter mask needs {LETTER_FONT} or Pillow >= 10.1; give --font '
                               f'or a --mask PNG') from None


def letter_image(resolution, letter='S', font_path=None):
    """The official inpainting letter (uint8 3,R,R; white background, black letter), drawn at any resolution.

    The official drawing is for 256 px: the letter at font size 250 at (50, 0). Here it is scaled by R/256.
    Anti-aliasing is used from 256 px up (as the official drawing); below, it is off, since the official
    threshold (any non-black pixel is background) would erase the thin anti-aliased strokes of a small letter.
    """
    scale = resolution / 256
    img = PIL.Image.new('RGB', (resolution, resolution), color='white')
    draw = PIL.ImageDraw.Draw(img)
    if resolution < 256:
        draw.fontmode = '1'
    font = _letter_font(max(int(round(250 * scale)), 1), font_path)
    draw.text((int(round(50 * scale)), 0), letter, font=font, fill=(0, 0, 0))
    return np.asarray(img).transpose(2, 0, 1).copy()


def mask_from_image(image, resolution):
    """A user mask (uint8 C,H,W or H,W,C PIL-readable array) -> float32 3,R,R: non-black = kept (as the official)."""
    image = np.asarray(image)
    image = image[np.newaxis] if image.ndim == 2 else image
    if image.shape[0] not in (1, 3):
        raise dnnlib.UserError(f'inpainting mask: expected a grey or RGB image, got shape {list(image.shape)}')
    if image.shape[1:] != (resolution, resolution):
        raise dnnlib.UserError(f'inpainting mask: it is {image.shape[2]}x{image.shape[1]}, the network makes '
                               f'{resolution}x{resolution} images')
    return torch.from_numpy(np.broadcast_to(image > 0.5, (3, resolution, resolution)).astype(np.float32))


def batch_masks(mask, image_indices, group_size=7):
    """Per-image masks (N,3,H,W): image `i` uses `mask` when (i // group_size) is even, its inverse otherwise
    (the official alternation over groups of 7, for any batch size); `group_size` 0 never inverts."""
    indices = torch.as_tensor(list(image_indices), dtype=torch.int64)
    invert = (indices // group_size) % 2 == 1 if group_size else torch.zeros_like(indices, dtype=torch.bool)
    invert = invert.reshape(-1, 1, 1, 1).to(mask.dtype)
    return mask[None] * (1 - invert) + (1 - mask[None]) * invert

# ----------------------------------------------------------------------------------------------------------
# The iterative procedure.


# Zero-shot editing (Song et al. 2023, Algorithm 4): x = f(x, t_i) clamped to [-1, 1], its known part replaced
# by the degraded images, then re-noised to t_{i+1} (clipped to [t_min, t_max]) with std sqrt(t_{i+1}² − t_min²).
# Returns (result, degraded images). A normal tensor is drawn on every step, in float32 like the official code.
def iterative_edit(denoise, operator, images, latents, ts=DEFAULT_TS, steps=DEFAULT_STEPS, t_min=0.002, t_max=80.0,
                   rho=7.0, randn_like=torch.randn_like):
    times = samplers_karras.multistep_times(samplers_karras.check_ts(ts, steps), steps, t_min, t_max, rho)
    degraded = operator.degrade(images.to(torch.float64))
    x = latents.to(torch.float64) * t_max
    for t, t_next in zip(times[:-1], times[1:]):
        x0 = operator.replace(degraded, denoise(x, t).to(torch.float64).clamp(-1, 1))
        t_next = min(max(t_next, t_min), t_max)
        x = x0 + randn_like(x.to(torch.float32)).to(torch.float64) * math.sqrt(t_next ** 2 - t_min ** 2)
    return x, degraded
