"""EDM's non-leaking augmentation pipeline (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Appendix F.2; the transforms of Karras et al. 2020, "Training Generative Adversarial Networks
with Limited Data", Appendix B).

Each enabled transform is applied to a sample with probability p·multiplier; its parameters (zero when it is not
applied) form the sample's augment labels, which condition the denoiser (augment_dim), so the network learns the
augmented distribution as a separate condition and sampling without labels does not produce augmented images.
The class has the constructor arguments of NVlabs/edm training/augment.py AugmentPipe and reproduces its
semantics: the same draws from the global torch RNG in the same order and shapes, the same label layout (the
order of LABEL_WIDTHS), the same padding, 2x sym6 resampling and bilinear warp. docs/AUGMENT.md; compared with
the official class in tests/test_augment.py.
"""

import math

import torch

import dnnlib

# Augment-label columns of each transform, in the order the pipeline applies them (and lays out its labels).
LABEL_WIDTHS = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2,
                    translate_frac=2, brightness=1, contrast=1, lumaflip=1, hue=2, saturation=1)
GEOMETRIC = ('scale', 'rotate_frac', 'aniso', 'translate_frac')
COLOR = ('brightness', 'contrast', 'lumaflip', 'hue', 'saturation')

# Low-pass filter of the 2x resampling around the geometric warp: the symlet-6 wavelet's decomposition low-pass
# filter (12 taps, orthonormal: upsampling then downsampling with it is the identity).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
SYM6_MARGIN = len(SYM6) // 4   # extra border (pixels) around the warped image, cropped after downsampling


def _setting(name, value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise dnnlib.UserError(f'augment_kwargs: {name} must be a finite non-negative number, got {value!r}')
    return number


class AugmentPipe:
    """EDM's augmentation pipeline: (images, augment labels [N, label_dim]) from NCHW images in [-1, 1]."""

    def __init__(self,
        p                   = 1,        # Overall multiplier of every probability (EDM's --augment).
        xflip               = 0,        # Probability multiplier of x-flips.
        yflip               = 0,        # Probability multiplier of y-flips.
        rotate_int          = 0,        # Probability multiplier of rotations by a multiple of 90 degrees.
        translate_int       = 0,        # Probability multiplier of integer translations (mirrored borders).
        translate_int_max   = 0.125,    # Range of integer translations, fraction of the image size.
        scale               = 0,        # Probability multiplier of isotropic scaling.
        rotate_frac         = 0,        # Probability multiplier of arbitrary rotations.
        aniso               = 0,        # Probability multiplier of anisotropic scaling.
        translate_frac      = 0,        # Probability multiplier of fractional translations.
        scale_std           = 0.2,      # Standard deviation of log2 of the isotropic scale.
        rotate_frac_max     = 1,        # Range of arbitrary rotations, 1 = full circle.
        aniso_std           = 0.2,      # Standard deviation of log2 of the anisotropic scale.
        aniso_rotate_prob   = 0.5,      # Probability of scaling along a rotated frame.
        translate_frac_std  = 0.125,    # Standard deviation of fractional translations, fraction of the image size.
        brightness          = 0,        # Probability multiplier of brightness offsets.
        contrast            = 0,        # Probability multiplier of contrast scaling.
        lumaflip            = 0,        # Probability multiplier of luma flips.
        hue                 = 0,        # Probability multiplier of hue rotations.
        saturation          = 0,        # Probability multiplier of saturation scaling.
        brightness_std      = 0.2,      # Standard deviation of the brightness offset.
        contrast_std        = 0.5,      # Standard deviation of log2 of the contrast factor.
        hue_max             = 1,        # Range of hue rotations, 1 = full circle.
        saturation_std      = 1,        # Standard deviation of log2 of the saturation factor.
    ):
        settings = dict(p=p, xflip=xflip, yflip=yflip, rotate_int=rotate_int, translate_int=translate_int,
            translate_int_max=translate_int_max, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
            translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
            aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std,
            brightness=brightness, contrast=contrast, lumaflip=lumaflip, hue=hue, saturation=saturation,
            brightness_std=brightness_std, contrast_std=contrast_std, hue_max=hue_max, saturation_std=saturation_std)
        for name, value in settings.items():
            setattr(self, name, _setting(name, value))

    @property
    def label_dim(self):
        """Width of the augment labels: the network's augment_dim (9 for EDM's CIFAR-10 settings)."""
        return sum(width for name, width in LABEL_WIDTHS.items() if getattr(self, name) > 0)

    def check_image_shape(self, channels, height, width):
        """UserError unless the enabled transforms can handle images of this shape."""
        if any(getattr(self, name) > 0 for name in COLOR) and channels not in (1, 3):
            raise dnnlib.UserError(f'augment_kwargs: the color transforms need 1 or 3 channels, the images have {channels}')
        if self.rotate_int > 0 and height != width:
            raise dnnlib.UserError(f'augment_kwargs: rotate_int needs square images, got {height}x{width}')
        if min(height, width) < 2:
            raise dnnlib.UserError(f'augment_kwargs: images of {height}x{width} pixels are too small to augment')

    def __call__(self, images):
        """(augmented images, augment labels float32 [N, label_dim]); float32 arithmetic even under autocast."""
        if images.ndim != 4:
            raise dnnlib.UserError(f'AugmentPipe: expected NCHW images, got shape {list(images.shape)}')
        self.check_image_shape(*images.shape[1:])
        N = images.shape[0]
        labels = [torch.zeros([N, 0], device=images.device)]
        with torch.autocast(images.device.type, enabled=False):
            images = self._blit(images, labels)
            G_inv = self._geometric_matrices(images, labels)
            if G_inv is not None:
                images = _warp(images, G_inv)
            M = self._color_matrices(images, labels)
            if M is not None:
                images = _recolor(images, M)
        return images, torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)

    def _gate(self, multiplier, values, shape):
        """`values` where a fresh uniform draw of `shape` is below p·multiplier, else 0 (drawn after the values)."""
        keep = torch.rand(shape, device=values.device) < multiplier * self.p
        return torch.where(keep, values, torch.zeros_like(values))

    # Karras et al. 2020 (ADA), Appendix B ("pixel blitting"): flips, quarter turns, integer translations.
    def _blit(self, images, labels):
        N, C, H, W = images.shape
        one = [N, 1, 1, 1]
        for multiplier, dim in ((self.xflip, 3), (self.yflip, 2)):
            if multiplier > 0:
                flip = self._gate(multiplier, torch.randint(2, one, device=images.device), one)
                images = torch.where(flip == 1, images.flip(dim), images)
                labels.append(flip)
        if self.rotate_int > 0:
            turns = self._gate(self.rotate_int, torch.randint(4, one, device=images.device), one)
            for k in (1, 2, 3):
                images = torch.where(turns == k, torch.rot90(images, k, dims=(2, 3)), images)
            labels += [(turns == 1) | (turns == 2), (turns == 2) | (turns == 3)]
        if self.translate_int > 0:
            shift = torch.rand([2, N, 1, 1, 1], device=images.device) * 2 - 1
            shift = self._gate(self.translate_int, shift, [1, N, 1, 1, 1])
            tx = shift[0].mul(W * self.translate_int_max).round().to(torch.int64)
            ty = shift[1].mul(H * self.translate_int_max).round().to(torch.int64)
            images = _shift_mirrored(images, tx, ty)
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]
        return images

    # Karras et al. 2020 (ADA), Appendix B ("general geometric transformations"), as inverse matrices (output pixel ->
    # input pixel, coordinates centred on the image): scale 2^(σ·n), rotation, anisotropic scale, translation.
    def _geometric_matrices(self, images, labels):
        """G_inv [N, 3, 3], or None when no geometric transform is enabled (then none is executed)."""
        if not any(getattr(self, name) > 0 for name in GEOMETRIC):
            return None
        N, _, H, W = images.shape
        dev = images.device
        G_inv = torch.eye(3, device=dev)
        if self.scale > 0:
            w = self._gate(self.scale, torch.randn([N], device=dev), [N])
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ _affine(sx=1 / s, sy=1 / s)
            labels.append(w)
        if self.rotate_frac > 0:
            w = (torch.rand([N], device=dev) * 2 - 1) * (math.pi * self.rotate_frac_max)
            w = self._gate(self.rotate_frac, w, [N])
            G_inv = G_inv @ _rotation(w)
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w, r = torch.randn([N], device=dev), (torch.rand([N], device=dev) * 2 - 1) * math.pi
            w = self._gate(self.aniso, w, [N])
            r = torch.where(torch.rand([N], device=dev) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ _rotation(-r) @ _affine(sx=1 / s, sy=1 / (1 / s)) @ _rotation(r)
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = self._gate(self.translate_frac, torch.randn([2, N], device=dev), [1, N])
            G_inv = G_inv @ _affine(tx=-w[0].mul(W * self.translate_frac_std), ty=-w[1].mul(H * self.translate_frac_std))
            labels += [w[0], w[1]]
        return G_inv

    # Karras et al. 2020 (ADA), Appendix B ("color transformations"), as 4x4 matrices on homogeneous RGB.
    def _color_matrices(self, images, labels):
        """M [N, 4, 4], or None when no color transform is enabled (then none is executed)."""
        if not any(getattr(self, name) > 0 for name in COLOR):
            return None
        N, dev = images.shape[0], images.device
        M = torch.eye(4, device=dev)
        luma = (torch.tensor([1, 1, 1, 0], dtype=torch.float64) / math.sqrt(3)).to(torch.float32).to(dev)  # grey axis
        on_luma = torch.outer(luma, luma)
        if self.brightness > 0:
            w = self._gate(self.brightness, torch.randn([N], device=dev), [N])
            b = w * self.brightness_std
            M = _affine3(offset=b) @ M
            labels.append(w)
        if self.contrast > 0:
            w = self._gate(self.contrast, torch.randn([N], device=dev), [N])
            M = _affine3(gain=w.mul(self.contrast_std).exp2()) @ M
            labels.append(w)
        if self.lumaflip > 0:
            w = self._gate(self.lumaflip, torch.randint(2, [N, 1, 1], device=dev), [N, 1, 1])
            M = (torch.eye(4, device=dev) - 2 * on_luma * w) @ M
            labels.append(w)
        if self.hue > 0:
            w = (torch.rand([N], device=dev) * 2 - 1) * (math.pi * self.hue_max)
            w = self._gate(self.hue, w, [N])
            M = _rotation_about(luma, w) @ M
            labels += [w.cos() - 1, w.sin()]
        if self.saturation > 0:
            w = self._gate(self.saturation, torch.randn([N, 1, 1], device=dev), [N, 1, 1])
            M = (on_luma + (torch.eye(4, device=dev) - on_luma) * w.mul(self.saturation_std).exp2()) @ M
            labels.append(w)
        return M

#----------------------------------------------------------------------------
# Matrices.

def _stack(rows, like):
    """[N, R, C] from rows of [N] tensors and numbers (numbers broadcast to the shape of `like`)."""
    return torch.stack([torch.stack([torch.as_tensor(v, dtype=like.dtype, device=like.device).expand(like.shape)
                                     for v in row], dim=-1) for row in rows], dim=-2)


def _affine(sx=1.0, sy=1.0, tx=0.0, ty=0.0, device=None):
    """Homogeneous 2-D scale-then-translate matrices [N, 3, 3] (or [3, 3] on `device` from numbers)."""
    like = next((v for v in (sx, sy, tx, ty) if isinstance(v, torch.Tensor)), torch.zeros([], device=device))
    return _stack([[sx, 0, tx], [0, sy, ty], [0, 0, 1]], like)


def _rotation(theta):
    """Homogeneous 2-D rotations by `theta` [N] radians (counter-clockwise in x-right, y-up terms)."""
    c, s = theta.cos(), theta.sin()
    return _stack([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def _affine3(offset=None, gain=None):
    """Homogeneous RGB matrices [N, 4, 4]: the same offset added to, or the same gain applied to, R, G and B."""
    like = offset if offset is not None else gain
    o, g = (offset, 1) if offset is not None else (0, gain)
    return _stack([[g, 0, 0, o], [0, g, 0, o], [0, 0, g, o], [0, 0, 0, 1]], like)


# Rodrigues' rotation formula: R = cos θ·I + sin θ·[a]x + (1 − cos θ)·a aᵀ, about the unit axis a.
def _rotation_about(axis, theta):
    """Homogeneous RGB rotations [N, 4, 4] by `theta` [N] about `axis` (4 entries, the last 0)."""
    x, y, z = axis[0], axis[1], axis[2]
    zero = torch.zeros([], device=axis.device)
    cross = torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])])
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    R = c * torch.eye(3, device=axis.device) + s * cross + torch.outer(axis[:3], axis[:3]) * (1 - c)
    out = torch.zeros([len(theta), 4, 4], device=axis.device)
    out[:, :3, :3] = R
    out[:, 3, 3] = 1
    return out

#----------------------------------------------------------------------------
# Executing the transforms.

def _mirror(index, size):
    """`index` folded into [0, size) by whole-sample mirroring at both borders (period 2·size − 2)."""
    folded = index % (2 * size - 2)
    return torch.where(folded < size, folded, 2 * size - 2 - folded)


def _shift_mirrored(images, tx, ty):
    """Images moved by (tx, −ty) whole pixels [N, 1, 1, 1] each, mirrored at the borders."""
    N, C, H, W = images.shape
    dev = images.device
    rows = _mirror(torch.arange(H, device=dev).view(1, 1, H, 1) + ty, H)
    cols = _mirror(torch.arange(W, device=dev).view(1, 1, 1, W) - tx, W)
    return images[torch.arange(N, device=dev).view(N, 1, 1, 1), torch.arange(C, device=dev).view(1, C, 1, 1), rows, cols]


def _filter(images, vertical):
    """The sym6 low-pass filter as a depthwise conv weight [C, 1, 12, 1] (vertical) or [C, 1, 1, 12]."""
    taps = torch.tensor(SYM6, dtype=images.dtype, device=images.device)
    shape = [1, 1, len(SYM6), 1] if vertical else [1, 1, 1, len(SYM6)]
    return taps.reshape(shape).repeat(images.shape[1], 1, 1, 1)


def _upsample2x(images):
    """2x upsampling (zero insertion and the sym6 filter, one axis after the other): [N, C, 2H, 2W]."""
    pad = len(SYM6) // 2 - 1
    C = images.shape[1]
    images = torch.nn.functional.conv_transpose2d(images, _filter(images, False), stride=(1, 2), padding=(0, pad), groups=C)
    return torch.nn.functional.conv_transpose2d(images, _filter(images, True), stride=(2, 1), padding=(pad, 0), groups=C)


def _downsample2x(images):
    """The sym6 filter and 2x decimation, one axis after the other, keeping the phase of the upsampling and
    dropping SYM6_MARGIN output pixels at every border: [N, C, H/2 − 2·margin, W/2 − 2·margin]."""
    skip = 2 * SYM6_MARGIN - (len(SYM6) // 2 - 1)   # input pixels before the first output pixel's window
    C = images.shape[1]
    images = torch.nn.functional.conv2d(images[:, :, :, skip:], _filter(images, False), stride=(1, 2), groups=C)
    return torch.nn.functional.conv2d(images[:, :, skip:, :], _filter(images, True), stride=(2, 1), groups=C)


def _padding(G_inv, H, W):
    """Mirror padding (left, right, top, bottom) that covers every sample's warped corners and the filter margin."""
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], device=G_inv.device)
    xy = (G_inv @ corners)[:, :2, :]
    reach = torch.cat([-xy, xy], dim=1).amax(dim=(0, 2))   # max −x, max −y, max x, max y over the batch
    reach = reach + torch.tensor([2 * SYM6_MARGIN - cx, 2 * SYM6_MARGIN - cy] * 2, device=G_inv.device)
    limit = torch.tensor([W - 1, H - 1] * 2, dtype=reach.dtype, device=G_inv.device)
    left, top, right, bottom = reach.clamp(min=0).minimum(limit).ceil().to(torch.int64).tolist()
    return left, right, top, bottom


def _warp(images, G_inv):
    """Images resampled through G_inv [N, 3, 3]: mirror padding, 2x upsampling, bilinear sampling, 2x downsampling."""
    N, C, H, W = images.shape
    left, right, top, bottom = _padding(G_inv, H, W)
    images = torch.nn.functional.pad(images, [left, right, top, bottom], mode='reflect')
    dev = images.device
    G_inv = _affine(tx=(left - right) / 2, ty=(top - bottom) / 2, device=dev) @ G_inv
    images = _upsample2x(images)
    G_inv = _affine(sx=2.0, sy=2.0, device=dev) @ G_inv @ _affine(sx=1 / 2, sy=1 / 2, device=dev)   # upsampled pixels
    G_inv = _affine(tx=-0.5, ty=-0.5, device=dev) @ G_inv @ _affine(tx=0.5, ty=0.5, device=dev)
    out_h, out_w = (H + SYM6_MARGIN * 2) * 2, (W + SYM6_MARGIN * 2) * 2
    in_h, in_w = images.shape[2], images.shape[3]
    G_inv = _affine(sx=2 / in_w, sy=2 / in_h, device=dev) @ G_inv @ _affine(sx=out_w / 2, sy=out_h / 2, device=dev)
    grid = torch.nn.functional.affine_grid(G_inv[:, :2, :].to(images.dtype), [N, C, out_h, out_w], align_corners=False)
    images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    return _downsample2x(images)


def _recolor(images, M):
    """Images through the homogeneous RGB matrices M [N, 4, 4]; one channel takes the mean of the RGB rows."""
    N, C, H, W = images.shape
    flat = images.reshape(N, C, H * W)
    M = M.to(images.dtype)
    if C == 3:
        return (M[:, :3, :3] @ flat + M[:, :3, 3:]).reshape(N, C, H, W)
    grey = M[:, :3, :].mean(dim=1, keepdim=True)
    return (flat * grey[:, :, :3].sum(dim=2, keepdim=True) + grey[:, :, 3:]).reshape(N, C, H, W)
