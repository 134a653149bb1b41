"""Layers of EDM's network zoo (EDM Appendix F.2), with EDM's tensor names so official checkpoints load
bit-for-bit, and the pieces both U-Nets (`song_unet`, `dhariwal_unet`) assemble their encoder and decoder from."""

import numpy as np
import torch
from torch.autograd import forward_ad
from torch.nn.functional import silu

import dnnlib
from torch_utils import persistence
from training.networks.randomness import dropout

#----------------------------------------------------------------------------
# Weight initialisation (EDM's four schemes). `fan_in` / `fan_out` as in Glorot & Bengio / He et al.

def weight_init(shape, mode, fan_in, fan_out):
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise dnnlib.UserError(f'init_mode: unknown weight initialisation "{mode}"')


def batch_values(value, x, dtype=None):
    """A noise level or time (python float, 0-d, [1] or [N] tensor) as [N, 1, 1, 1] on x's device, in `dtype`
    (None: its own); a single value is broadcast over the batch of `x`."""
    value = torch.as_tensor(value, dtype=dtype, device=x.device).reshape(-1, 1, 1, 1)
    return value.expand(x.shape[0], 1, 1, 1) if value.shape[0] == 1 else value


def _cast(tensor, dtype):
    return tensor.to(dtype) if tensor is not None else None

#----------------------------------------------------------------------------
# Fully-connected layer.

@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self,
        in_features,                    # Number of input features.
        out_features,                   # Number of output features.
        bias        = True,             # Add a learned bias?
        init_mode   = 'kaiming_normal', # Weight initialisation scheme, see weight_init().
        init_weight = 1,                # Multiplier of the initial weights.
        init_bias   = 0,                # Multiplier of the initial bias.
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        init = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **init) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **init) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x

#----------------------------------------------------------------------------
# 2D convolution with optional 2x up/down-sampling by a separable FIR filter (EDM Appendix F.2;
# the filter is the outer product of `resample_filter` with itself, normalised to unit gain).

@persistence.persistent_class
class Conv2d(torch.nn.Module):
    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        kernel,                         # Kernel size; 0 = resampling only, no weights.
        bias            = True,         # Add a learned bias (only with kernel > 0)?
        up              = False,        # Upsample 2x before the convolution?
        down            = False,        # Downsample 2x (before the convolution unless fused)?
        resample_filter = [1, 1],       # 1D FIR taps of the resampling filter.
        fused_resample  = False,        # Fuse resampling with the convolution (EDM's aux_residual path)?
        init_mode       = 'kaiming_normal', # Weight initialisation scheme, see weight_init().
        init_weight     = 1,            # Multiplier of the initial weights.
        init_bias       = 0,            # Multiplier of the initial bias.
    ):
        if up and down:
            raise dnnlib.UserError('Conv2d: up and down cannot both be set')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        init = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **init) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **init) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer('resample_filter', f if up or down else None)

    def _upsample(self, x, f, padding):
        return torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2, padding=padding)

    def _downsample(self, x, f, padding):
        return torch.nn.functional.conv2d(x, f.tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2, padding=padding)

    def forward(self, x):
        w = _cast(self.weight, x.dtype)
        b = _cast(self.bias, x.dtype)
        f = _cast(self.resample_filter, x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        fused = self.fused_resample and w is not None
        if fused and self.up:
            x = self._upsample(x, f, max(f_pad - w_pad, 0))
            x = torch.nn.functional.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif fused and self.down:
            x = torch.nn.functional.conv2d(x, w, padding=w_pad + f_pad)
            x = self._downsample(x, f, 0)
        else:
            if self.up:
                x = self._upsample(x, f, f_pad)
            if self.down:
                x = self._downsample(x, f, f_pad)
            if w is not None:
                x = torch.nn.functional.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x

#----------------------------------------------------------------------------
# Group normalisation (Wu & He 2018) with EDM's group count min(num_groups, C // min_channels_per_group).

@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    def __init__(self,
        num_channels,               # Number of channels normalised.
        num_groups          = 32,   # Maximum number of groups.
        min_channels_per_group = 4, # Fewer groups when channels are scarce.
        eps                 = 1e-5, # Added to the variance.
    ):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        if carries_tangent(x):
            x = x.contiguous()  # torch's CPU group_norm JVP views a channels-last input flat and fails; CUDA copies too
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)


def carries_tangent(x):
    """Whether `x` is a dual tensor of forward-mode AD (inside torch.func.jvp or a forward_ad.dual_level)."""
    return forward_ad.unpack_dual(x).tangent is not None

#----------------------------------------------------------------------------
# Multi-head self-attention over pixels (Vaswani et al. 2017, Eq. 1) in EDM's layout: the qkv convolution's
# channels are grouped as [head, channel within head, q/k/v]; softmax(q^T k / sqrt(C/heads)) v.

def attention(qkv, num_heads):
    """The attention output, in qkv's memory layout (a channels-last qkv gives a channels-last output)."""
    n, c3, h, w = qkv.shape
    c = c3 // 3
    channels_last = is_channels_last(qkv)
    qkv = qkv.reshape(n, num_heads, c // num_heads, 3, h * w)
    q, k, v = (t.transpose(-1, -2).contiguous() for t in qkv.unbind(3))
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v)   # [n, heads, h*w, c/heads]
    if channels_last:
        return a.transpose(1, 2).reshape(n, h, w, c).permute(0, 3, 1, 2)
    return a.transpose(-1, -2).reshape(n, c, h, w)

#----------------------------------------------------------------------------
# Memory layout of a U-Net's activations and weights: NCHW ('contiguous', the default) or NHWC ('channels_last',
# `--channels-last` in train.py). On this project's 2-core CPU NHWC saved 2-5% of an fp32 ECT step (DDPM++ at
# CIFAR-10 width; the convolutions run the same oneDNN kernels either way), and it makes convolution results depend
# on the batch size at the rounding level, which would break seed-for-seed sampling at any batch size: so it is
# opt-in, for the trained network only. On CUDA it is measured by bench/gpu_check.sh.

MEMORY_FORMATS = {'channels_last': torch.channels_last, 'contiguous': torch.contiguous_format}


def is_channels_last(x):
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def working_layout(x, memory_format):
    """x in a U-Net's activation layout ('contiguous' or 'channels_last')."""
    return x.contiguous(memory_format=MEMORY_FORMATS[memory_format])


def set_memory_format(net, memory_format):
    """Run every U-Net inside `net` in `memory_format`, its 4-D weights stored the same way (no per-call weight
    reorders; values unchanged). Returns `net`."""
    if memory_format not in MEMORY_FORMATS:
        raise dnnlib.UserError(f'memory_format: "{memory_format}" is not one of {", ".join(MEMORY_FORMATS)}')
    for module in net.modules():
        if hasattr(type(module), 'memory_format'):
            module.memory_format = memory_format
            module.to(memory_format=MEMORY_FORMATS[memory_format])
    return net

#----------------------------------------------------------------------------
# Residual U-Net block with optional up/down-sampling and self-attention (EDM Appendix F.2, Fig. 5;
# the DDPM++ and ADM blocks differ only in the keyword arguments).

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    draw_tape = None    # a training.networks.randomness.DrawTape lent for one step (ECT's shared dropout)

    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        emb_channels,                   # Number of embedding (noise/label) channels.
        up                  = False,    # Upsample 2x?
        down                = False,    # Downsample 2x?
        attention           = False,    # Append a self-attention layer?
        num_heads           = None,     # Attention heads; None = out_channels // channels_per_head (at least 1).
        channels_per_head   = 64,       # Channels per head when num_heads is None.
        dropout             = 0,        # Dropout probability before the second convolution.
        skip_scale          = 1,        # Scale of the residual sums.
        eps                 = 1e-5,     # GroupNorm epsilon.
        resample_filter     = [1, 1],   # FIR taps for up/down-sampling.
        resample_proj       = False,    # 1x1 projection on a resampling skip connection even if channels match?
        adaptive_scale      = True,     # Embedding gives scale and shift (True) or a shift only (False)?
        init                = dict(),   # Initialisation of most layers.
        init_zero           = dict(init_weight=0), # Initialisation of the last layer of each branch.
        init_attn           = None,     # Initialisation of the qkv layer; None = init.
        min_channels_per_group = 4,     # GroupNorm: fewer than 32 groups when channels are scarce (1: always 32).
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = _num_heads(out_channels, num_heads, channels_per_head) if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        norm = dict(eps=eps, min_channels_per_group=min_channels_per_group)
        self.norm0 = GroupNorm(num_channels=in_channels, **norm)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, **norm)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, **norm)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))
        x = self.conv1(dropout(x, self.dropout, self.training, self.draw_tape))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale
        if self.num_heads:
            x = self.proj(attention(self.qkv(self.norm2(x)), self.num_heads)).add_(x)
            x = x * self.skip_scale
        return x


def _num_heads(channels, num_heads, channels_per_head):
    heads = num_heads if num_heads is not None else max(channels // channels_per_head, 1)
    if heads < 1 or channels % heads != 0:
        raise dnnlib.UserError(f'UNetBlock: {channels} channels cannot be split into {heads} attention heads')
    return heads

#----------------------------------------------------------------------------
# Sinusoidal timestep embedding (Vaswani et al. 2017, Sec. 3.5; DDPM): [cos(x f_i), sin(x f_i)] with
# f_i = (1/max_positions)^(i / (C/2 - endpoint)).

@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    def __init__(self,
        num_channels,               # Output channels (half cosines, half sines).
        max_positions   = 10000,    # Longest period.
        endpoint        = False,    # Include the frequency 1/max_positions itself?
        exp_freqs       = False,    # Frequencies as exp(-ln(max_positions) i / half), rounded as guided-diffusion's ADM?
    ):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint
        self.exp_freqs = exp_freqs

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        denom = half - (1 if self.endpoint else 0)
        if self.exp_freqs:
            freqs = (-float(np.log(self.max_positions)) * freqs / denom).exp()
        else:
            freqs = (1 / self.max_positions) ** (freqs / denom)
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# Random Fourier feature embedding (Tancik et al. 2020; NCSN++, Song et al. 2021): [cos(2 pi x f), sin(2 pi x f)].

@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    def __init__(self,
        num_channels,   # Output channels (half cosines, half sines).
        scale = 16,     # Standard deviation of the random frequencies.
    ):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# Shared mapping helpers.

def check_choice(name, value, choices):
    if value not in choices:
        raise dnnlib.UserError(f'{name}: "{value}" is not one of {", ".join(choices)}')

#----------------------------------------------------------------------------
# U-Net assembly shared by SongUNet and DhariwalUNet: blocks are added to ModuleDicts under EDM's names
# ('{res}x{res}_block{idx}', '_in0', '_in1', '_up'), in EDM's order, so initialisation draws match too.

def add_encoder_blocks(enc, res, cin, cout, num_blocks, attention, block_kwargs):
    """`num_blocks` residual blocks at resolution `res`, the first from `cin` channels to `cout`; returns `cout`."""
    for idx in range(num_blocks):
        enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attention, **block_kwargs)
        cin = cout
    return cout


def encoder_step(name, block, x, emb):
    """Apply one encoder entry: the input convolution ('..._conv') takes no embedding, the blocks do. Decided by
    name, not by isinstance, so networks rebuilt from EDM pickles (one module per record) run too."""
    return block(x) if name.endswith('_conv') else block(x, emb)


def add_decoder_level(dec, res, cin, cout, skips, num_blocks, bottom, attended, block_kwargs):
    """One decoder level: two bottleneck blocks (lowest resolution) or an upsampling block, then `num_blocks + 1`
    blocks each concatenating one encoder skip (popped from `skips`); `attended` lists the block indices with
    self-attention.
    Returns the output channel count `cout`."""
    if bottom:
        dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cin, out_channels=cin, attention=True, **block_kwargs)
        dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cin, out_channels=cin, **block_kwargs)
    else:
        dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cin, out_channels=cin, up=True, **block_kwargs)
    for idx in range(num_blocks + 1):
        dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin + skips.pop(), out_channels=cout,
            attention=(idx in attended), **block_kwargs)
        cin = cout
    return cout
