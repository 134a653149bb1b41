"""EDM2 U-Net and preconditioner ("Analyzing and Improving the Training Dynamics of Diffusion Models",
Karras et al. 2024), the network of ECT's ImageNet-64 recipe. Tensor names and shapes match the official
EDM2 checkpoints (`unet.*`), so official weights load strictly.

Weight normalisation, and how it differs from the official code (ECT issue #6):
EDM2 rewrites every MPConv weight in place ("forced weight normalisation") at the start of each forward
pass in train mode. ECT runs two forward passes per step (the prediction with gradients, then the
stop-gradient target), so that in-place rewrite would let the target pass see other weights than the
prediction pass, and it would make outputs depend on `module.training`. Here:
- every forward normalises the weights on the fly, w = normalize(w) / sqrt(fan_in), in train and eval
  mode alike, and never writes to a parameter, so a forward has no side effects;
- the in-place projection is an explicit call, `net.normalize_weights_()`, which the training loop makes
  once per optimiser step, right after the step.
The only train/eval difference left is dropout (as for `torch.nn.Dropout`); at dropout 0 the two modes
give identical outputs.
"""

import numpy as np
import torch

from dnnlib.util import UserError
from torch_utils import persistence
from training.networks.precond import label_input, skip_out_scalings
from training.networks.randomness import dropout


# EDM2 Config D/E (Sec. 2): normalise each slice along `dim` to unit RMS; eps keeps zero slices finite.
def normalize(x, dim=None, eps=1e-4):
    if dim is None:
        dim = list(range(1, x.ndim))
    norm_dtype = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=norm_dtype)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


# EDM2 Config G (Appendix B): magnitude-preserving SiLU, divided by its output RMS for unit-normal input.
def mp_silu(x):
    return torch.nn.functional.silu(x) / 0.596


# EDM2 Config G (Appendix B): magnitude-preserving weighted sum, lerp(a, b, t) / sqrt((1-t)^2 + t^2).
def mp_sum(a, b, t=0.5):
    return a.lerp(b.to(a.dtype), t) / np.sqrt((1 - t) ** 2 + t ** 2)


# EDM2 Config G (Appendix B): magnitude-preserving concatenation with balance t between the two inputs.
def mp_cat(a, b, dim=1, t=0.5):
    num_a = a.shape[dim]
    num_b = b.shape[dim]
    scale = np.sqrt((num_a + num_b) / ((1 - t) ** 2 + t ** 2))
    weight_a = scale / np.sqrt(num_a) * (1 - t)
    weight_b = scale / np.sqrt(num_b) * t
    return torch.cat([weight_a * a, (weight_b * b).to(a.dtype)], dim=dim)


def resample(x, mode='keep'):
    """EDM2's resampling with the [1,1] filter: 2x2 box average ('down'), nearest-neighbour 2x ('up')."""
    if mode == 'keep':
        return x
    if mode == 'down':
        return torch.nn.functional.avg_pool2d(x, kernel_size=2, stride=2)
    if mode == 'up':
        return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')
    raise ValueError(f'resample mode must be keep, down or up, not {mode!r}')


# EDM2 Appendix B: attention over pixels with per-head pixel-normalised q, k, v, as scaled dot products.
def pixel_norm_attention(qkv, num_heads):
    n, _, h, w = qkv.shape
    qkv = normalize(qkv.reshape(n, num_heads, -1, 3, h * w), dim=2)
    q, k, v = (t.transpose(2, 3) for t in qkv.unbind(3))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return y.transpose(2, 3).reshape(n, -1, h, w)


@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """EDM2 Config G: magnitude-preserving Fourier features, sqrt(2)·cos(2π(f·x + φ)), random fixed f, φ."""

    def __init__(self,
        num_channels,               # Number of output features.
        bandwidth=1,                # Standard deviation of the frequencies.
    ):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)    # float32 as the official code; float64 stays
        y = x.to(dtype).ger(self.freqs.to(dtype))
        y = (y + self.phases.to(dtype)).cos() * np.sqrt(2)
        return y.to(x.dtype)


@persistence.persistent_class
class MPConv(torch.nn.Module):
    """EDM2 Config D/E: magnitude-preserving convolution (kernel=[]: fully connected) with weight
    normalisation applied on the fly; `normalize_weights_()` is the explicit forced weight normalisation."""

    def __init__(self,
        in_channels,                # Number of input channels.
        out_channels,               # Number of output channels.
        kernel,                     # Kernel size: [] for a linear layer, [k, k] for a convolution.
    ):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    # EDM2 Config D/E: w = gain · normalize(w) / sqrt(fan_in), never written back to the parameter.
    def normalized_weight(self, gain=1):
        w = normalize(self.weight.to(torch.float32))
        return w * (gain / np.sqrt(w[0].numel()))

    def forward(self, x, gain=1):
        w = self.normalized_weight(gain).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))

    # EDM2 Config E: forced weight normalisation, projecting each output channel onto the unit-RMS sphere.
    @torch.no_grad()
    def normalize_weights_(self):
        self.weight.copy_(normalize(self.weight.to(torch.float32)))


@persistence.persistent_class
class Block(torch.nn.Module):
    """EDM2 Appendix B: encoder or decoder residual block with optional self-attention."""

    draw_tape = None    # a training.networks.randomness.DrawTape lent for one step (ECT's shared dropout)

    def __init__(self,
        in_channels,                # Number of input channels.
        out_channels,               # Number of output channels.
        emb_channels,               # Number of embedding channels.
        flavor='enc',               # Block flavor: 'enc' (skip conv + pixel norm first) or 'dec'.
        resample_mode='keep',       # Resampling: 'keep', 'down' or 'up'.
        attention=False,            # Add a self-attention layer after the residual branch?
        channels_per_head=64,       # Channels per attention head.
        dropout=0,                  # Dropout probability inside the residual branch (train mode only).
        res_balance=0.3,            # Balance between the main branch (0) and the residual branch (1).
        attn_balance=0.3,           # Balance between the main branch (0) and the attention branch (1).
        clip_act=256,               # Clip output activations to [-clip_act, clip_act]; None = no clipping.
    ):
        super().__init__()
        if flavor not in ('enc', 'dec'):
            raise UserError(f'Block flavor must be "enc" or "dec", not {flavor!r}')
        if resample_mode not in ('keep', 'down', 'up'):
            raise UserError(f'Block resample_mode must be "keep", "down" or "up", not {resample_mode!r}')
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads != 0 else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads != 0 else None

    def residual(self, x, emb):
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        y = dropout(y, self.dropout, self.training, self.draw_tape)
        return self.conv_res1(y)

    def forward(self, x, emb):
        x = resample(x, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.residual(x, emb)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads != 0:
            y = self.attn_proj(pixel_norm_attention(self.attn_qkv(x), self.num_heads))
            x = mp_sum(x, y, t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


def _normalize_all_weights_(module):
    """Forced weight normalisation of every MPConv inside `module` (see the module docstring)."""
    for layer in module.modules():
        if isinstance(layer, MPConv):
            layer.normalize_weights_()


@persistence.persistent_class
class UNet(torch.nn.Module):
    """EDM2 Appendix B: the magnitude-preserving U-Net (Config G)."""

    def __init__(self,
        img_resolution,             # Image resolution.
        img_channels,               # Image channels.
        label_dim,                  # Class label dimensionality. 0 = unconditional.
        model_channels=192,         # Base multiplier for the number of channels.
        channel_mult=[1, 2, 3, 4],  # Per-resolution multipliers for the number of channels.
        channel_mult_noise=None,    # Multiplier for noise embedding dimensionality. None = channel_mult[0].
        channel_mult_emb=None,      # Multiplier for final embedding dimensionality. None = max(channel_mult).
        num_blocks=3,               # Number of residual blocks per resolution.
        attn_resolutions=[16, 8],   # List of resolutions with self-attention.
        label_balance=0.5,          # Balance between noise embedding (0) and class embedding (1).
        concat_balance=0.5,         # Balance between skip connections (0) and main path (1).
        dropout=0,                  # Dropout probability in the residual branches.
        dropout_res=None,           # Apply dropout only in blocks at resolution <= dropout_res; None = all.
        **block_kwargs,             # Arguments for Block.
    ):
        super().__init__()
        _check_unet_config(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks)
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        def block(res, cin, cout, **kwargs):
            p = dropout if dropout_res is None or res <= dropout_res else 0
            return Block(cin, cout, cemb, dropout=p, **block_kwargs, **kwargs)

        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = MPConv(cout, channels, kernel=[3, 3])
                cout = channels
            else:
                self.enc[f'{res}x{res}_down'] = block(res, cout, cout, flavor='enc', resample_mode='down')
            for idx in range(num_blocks):
                self.enc[f'{res}x{res}_block{idx}'] = block(res, cout, channels, flavor='enc',
                                                            attention=(res in attn_resolutions))
                cout = channels

        self.dec = torch.nn.ModuleDict()
        skips = [layer.out_channels for layer in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = block(res, cout, cout, flavor='dec', attention=True)
                self.dec[f'{res}x{res}_in1'] = block(res, cout, cout, flavor='dec')
            else:
                self.dec[f'{res}x{res}_up'] = block(res, cout, cout, flavor='dec', resample_mode='up')
            for idx in range(num_blocks + 1):
                self.dec[f'{res}x{res}_block{idx}'] = block(res, cout + skips.pop(), channels, flavor='dec',
                                                            attention=(res in attn_resolutions))
                cout = channels
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    # EDM2 Appendix B: noise (and class) embedding, encoder with a constant-ones input channel, decoder.
    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = class_labels * np.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(labels), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if 'conv' in name else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if 'block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb)
        return self.out_conv(x, gain=self.out_gain)

    def normalize_weights_(self):
        """Forced weight normalisation of every MPConv; call once per optimiser step, after the step."""
        _normalize_all_weights_(self)


def _check_unet_config(img_resolution, img_channels, label_dim, model_channels, channel_mult, num_blocks):
    """Reject configurations the U-Net cannot be built from, with one message naming the argument."""
    for name, value in [('img_resolution', img_resolution), ('img_channels', img_channels),
                        ('model_channels', model_channels)]:
        if not isinstance(value, int) or value < 1:
            raise UserError(f'EDM2 UNet: {name} must be a positive integer, not {value!r}')
    if not isinstance(label_dim, int) or label_dim < 0:
        raise UserError(f'EDM2 UNet: label_dim must be a non-negative integer, not {label_dim!r}')
    if not isinstance(num_blocks, int) or num_blocks < 0:
        raise UserError(f'EDM2 UNet: num_blocks must be a non-negative integer, not {num_blocks!r}')
    if len(channel_mult) == 0 or any(not isinstance(m, int) or m < 1 for m in channel_mult):
        raise UserError(f'EDM2 UNet: channel_mult must be a non-empty list of positive integers, not {channel_mult!r}')
    if img_resolution % (2 ** (len(channel_mult) - 1)) != 0:
        raise UserError(f'EDM2 UNet: img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1} '
                        f'(one halving per channel_mult level)')


@persistence.persistent_class
class Precond(torch.nn.Module):
    """EDM2 preconditioner: EDM's c_skip, c_out, c_in (EDM Table 1) and c_noise = ln(σ)/4; optionally
    ECT's boundary-condition form (docs/ECT.md §2) and EDM2's uncertainty (log-variance) head."""

    def __init__(self,
        img_resolution,             # Image resolution.
        img_channels,               # Image channels.
        label_dim,                  # Class label dimensionality. 0 = unconditional.
        use_fp16=True,              # Run the U-Net in float16 on CUDA (unless force_fp32)?
        sigma_data=0.5,             # Expected standard deviation of the training data.
        ecm_sigma_min=None,         # σ_min of ECT's boundary-condition form (0: EDM's form, as TCM's consistency
                                    # networks); None = plain EDM2 preconditioning (a diffusion network).
        logvar_channels=None,       # Channels of EDM2's uncertainty head (official: 128); None = no head.
        **unet_kwargs,              # Arguments for UNet.
    ):
        super().__init__()
        if ecm_sigma_min is not None and not ecm_sigma_min >= 0:
            raise UserError(f'EDM2 Precond: ecm_sigma_min must be non-negative or None, not {ecm_sigma_min!r}')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.ecm_sigma_min = ecm_sigma_min
        self.sigma_min = ecm_sigma_min if ecm_sigma_min is not None else 0
        self.sigma_max = float('inf')
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels) if logvar_channels is not None else None
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[]) if logvar_channels is not None else None

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    # EDM Table 1 / docs/ECT.md §2: (c_skip, c_out) of the plain form, or of the boundary form (σmin shifted),
    # which gives D(x, σmin) = x.
    def skip_out_scalings(self, sigma, boundary):
        shift = self.ecm_sigma_min if boundary and self.ecm_sigma_min is not None else 0
        return skip_out_scalings(sigma, self.sigma_data, shift)

    def _check_input(self, x):
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise UserError(f'EDM2 Precond: input images must have shape [N, {", ".join(map(str, expected))}], '
                            f'got {list(x.shape)}')

    def forward(self, x, sigma, class_labels=None, force_fp32=False, boundary=True, return_logvar=False,
                **unet_kwargs):
        """D(x, σ). boundary=True uses the boundary-condition form when ecm_sigma_min is set (the plain form
        otherwise); boundary=False always the plain form (ECT's tuning pass). Never depends on self.training."""
        self._check_input(x)
        if return_logvar and self.logvar_linear is None:
            raise UserError('EDM2 Precond: return_logvar=True needs a network built with logvar_channels set')
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        class_labels = label_input(class_labels, self.label_dim, x)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip, c_out = self.skip_out_scalings(sigma, boundary)
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x

    def normalize_weights_(self):
        """Forced weight normalisation of every MPConv; call once per optimiser step, after the step."""
        _normalize_all_weights_(self)
