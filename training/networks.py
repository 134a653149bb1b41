"""EDM network zoo: layers, the DDPM++/NCSN++ U-Net (SongUNet), the ADM U-Net (DhariwalUNet) and the
VP / VE / EDM / ECM preconditioners, with EDM's tensor names so official checkpoints load bit-for-bit."""

import numpy as np
import torch
from torch.nn.functional import silu

import dnnlib
from torch_utils import persistence

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
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)

#----------------------------------------------------------------------------
# Multi-head self-attention over pixels (Vaswani et al. 2017, Eq. 1) in EDM's layout: the qkv convolution's
# channels are grouped as [head, channel within head, q/k/v]; softmax(q^T k / sqrt(C/heads)) v.

def attention(qkv, num_heads):
    n, c3, h, w = qkv.shape
    c = c3 // 3
    qkv = qkv.reshape(n, num_heads, c // num_heads, 3, h * w)
    q, k, v = (t.transpose(-1, -2).contiguous() for t in qkv.unbind(3))
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return a.transpose(-1, -2).reshape(n, c, h, w)

#----------------------------------------------------------------------------
# Residual U-Net block with optional up/down-sampling and self-attention (EDM Appendix F.2, Fig. 5;
# the DDPM++ and ADM blocks differ only in the keyword arguments).

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
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
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = _num_heads(out_channels, num_heads, channels_per_head) if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
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
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
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
    ):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
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

def _drop_labels(class_labels, label_dropout, training):
    """Classifier-free-guidance label dropout (Ho & Salimans 2022): zero each sample's label with prob. label_dropout."""
    if not (training and label_dropout):
        return class_labels
    keep = torch.rand([class_labels.shape[0], 1], device=class_labels.device) >= label_dropout
    return class_labels * keep.to(class_labels.dtype)


def _check_choice(name, value, choices):
    if value not in choices:
        raise dnnlib.UserError(f'{name}: "{value}" is not one of {", ".join(choices)}')

#----------------------------------------------------------------------------
# DDPM++ / NCSN++ U-Net (Song et al. 2021, "Score-Based Generative Modeling through SDEs"), as
# reimplemented in EDM (Appendix F.2, Table 7).

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        in_channels,                        # Input image channels.
        out_channels,                       # Output image channels.
        label_dim           = 0,            # Class-label dimensionality; 0 = unconditional.
        augment_dim         = 0,            # Augmentation-label dimensionality; 0 = none.
        model_channels      = 128,          # Base channel count.
        channel_mult        = [1, 2, 2, 2], # Channel multiplier per resolution.
        channel_mult_emb    = 4,            # Embedding channels = model_channels * this.
        num_blocks          = 4,            # Residual blocks per resolution.
        attn_resolutions    = [16],         # Resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of the residual blocks.
        label_dropout       = 0,            # Label dropout probability (classifier-free guidance).
        embedding_type      = 'positional', # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise  = 1,            # Noise-embedding channels = model_channels * this.
        encoder_type        = 'standard',   # 'standard', 'skip' or 'residual' (NCSN++).
        decoder_type        = 'standard',   # 'standard' or 'skip'.
        resample_filter     = [1, 1],       # FIR taps: [1, 1] (DDPM++) or [1, 3, 3, 1] (NCSN++).
    ):
        _check_choice('embedding_type', embedding_type, ['fourier', 'positional'])
        _check_choice('encoder_type', encoder_type, ['standard', 'skip', 'residual'])
        _check_choice('decoder_type', decoder_type, ['standard', 'skip'])
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cout, out_channels=model_channels, kernel=3, **init)
                cout = model_channels
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3, down=True,
                        resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def _embed(self, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape) # DDPM++ order: sines first.
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        return silu(self.map_layer1(emb))

    def _encode(self, x, emb):
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        return x, skips

    def _decode(self, x, emb, skips):
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embed(noise_labels, class_labels, augment_labels)
        x, skips = self._encode(x, emb)
        return self._decode(x, emb, skips)

#----------------------------------------------------------------------------
# ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs"), as reimplemented in EDM (Appendix F.2).

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        in_channels,                        # Input image channels.
        out_channels,                       # Output image channels.
        label_dim           = 0,            # Class-label dimensionality; 0 = unconditional.
        augment_dim         = 0,            # Augmentation-label dimensionality; 0 = none.
        model_channels      = 192,          # Base channel count.
        channel_mult        = [1, 2, 3, 4], # Channel multiplier per resolution.
        channel_mult_emb    = 4,            # Embedding channels = model_channels * this.
        num_blocks          = 3,            # Residual blocks per resolution.
        attn_resolutions    = [32, 16, 8],  # Resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of the residual blocks.
        label_dropout       = 0,            # Label dropout probability (classifier-free guidance).
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False,
            init_mode='kaiming_normal', init_weight=np.sqrt(augment_dim)) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False,
            init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def _embed(self, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        return silu(emb)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embed(noise_labels, class_labels, augment_labels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# Preconditioning common to all variants: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM Eq. 7).

def _sqrt(x):
    """IEEE-rounded float32 square root: float64 sqrt rounded once (exact, as 53 >= 2*24 + 2 bits). Some CPU builds of
    torch round float32 sqrt to 1 ulp only; the VP noise label amplifies such ulps, so coefficients use this."""
    return x.double().sqrt().to(x.dtype)


def _build_model(model_type, **model_kwargs):
    classes = dict(SongUNet=SongUNet, DhariwalUNet=DhariwalUNet)
    _check_choice('model_type', model_type, list(classes))
    return classes[model_type](**model_kwargs)


class _Precond(torch.nn.Module):
    """Shared constructor and forward pass; subclasses define coefficients(sigma) -> c_skip, c_out, c_in, c_noise."""

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model_type, model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _build_model(model_type, img_resolution=img_resolution, in_channels=img_channels,
            out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def _labels(self, class_labels, x):
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=x.device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def _prepare(self, x, sigma):
        """Inputs in float32; sigma shaped [N, 1, 1, 1] (a scalar sigma is broadcast over the batch)."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        return x, (sigma.expand(x.shape[0], 1, 1, 1) if sigma.shape[0] == 1 else sigma)

    def _precondition(self, x, coefficients, class_labels, force_fp32, model_kwargs):
        c_skip, c_out, c_in, c_noise = coefficients
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=self._labels(class_labels, x), **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma = self._prepare(x, sigma)
        return self._precondition(x, self.coefficients(sigma), class_labels, force_fp32, model_kwargs)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------
# Variance-preserving preconditioning (EDM Table 1, "VP"; Song et al. 2021).

@persistence.persistent_class
class VPPrecond(_Precond):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the inner model in FP16 on CUDA?
        beta_d          = 19.9,         # Extent of the noise level schedule.
        beta_min        = 0.1,          # Initial slope of the noise level schedule.
        M               = 1000,         # Original number of timesteps in the DDPM formulation.
        epsilon_t       = 1e-5,         # Minimum t-value used during training.
        sigma_data      = 0.5,          # Data standard deviation (used by losses; not by the VP formulas).
        model_type      = 'SongUNet',   # Class name of the inner network.
        **model_kwargs,                 # Keyword arguments of the inner network.
    ):
        sigma_min = float(_vp_sigma(epsilon_t, beta_d, beta_min))
        sigma_max = float(_vp_sigma(1, beta_d, beta_min))
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model_type, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t

    def sigma(self, t):
        return _vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        return _vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    # VP coefficients (docs/ECT.md §2): c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise (M-1) sigma^-1(sigma).
    def coefficients(self, sigma):
        return 1, -sigma, 1 / _sqrt(sigma ** 2 + 1), (self.M - 1) * self.sigma_inv(sigma)


def _as_cpu_tensor(value):
    return value if torch.is_tensor(value) else torch.as_tensor(value, device='cpu')


# VP noise schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1; docs/ECT.md §2).
def _vp_sigma(t, beta_d, beta_min):
    t = _as_cpu_tensor(t)
    return _sqrt((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1)


# Inverse VP schedule sigma^-1(s) = (sqrt(beta_min^2 + 2 beta_d ln(1 + s^2)) - beta_min) / beta_d (EDM Table 1).
def _vp_sigma_inv(sigma, beta_d, beta_min):
    sigma = _as_cpu_tensor(sigma)
    return (_sqrt(beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()) - beta_min) / beta_d

#----------------------------------------------------------------------------
# Variance-exploding preconditioning (EDM Table 1, "VE"; Song et al. 2021).

@persistence.persistent_class
class VEPrecond(_Precond):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the inner model in FP16 on CUDA?
        sigma_min       = 0.02,         # Minimum supported noise level.
        sigma_max       = 100,          # Maximum supported noise level.
        sigma_data      = 0.5,          # Data standard deviation (used by losses; not by the VE formulas).
        model_type      = 'SongUNet',   # Class name of the inner network.
        **model_kwargs,                 # Keyword arguments of the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model_type, model_kwargs)

    # VE coefficients (docs/ECT.md §2): c_skip 1, c_out sigma, c_in 1, c_noise ln(sigma / 2).
    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()

#----------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1 / Eq. 7).

@persistence.persistent_class
class EDMPrecond(_Precond):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the inner model in FP16 on CUDA?
        sigma_min       = 0,            # Minimum supported noise level.
        sigma_max       = float('inf'), # Maximum supported noise level.
        sigma_data      = 0.5,          # Expected standard deviation of the training data.
        model_type      = 'DhariwalUNet', # Class name of the inner network.
        **model_kwargs,                 # Keyword arguments of the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model_type, model_kwargs)

    def coefficients(self, sigma):
        return _edm_coefficients(sigma, self.sigma_data)


# EDM coefficients (EDM Table 1; docs/ECT.md §2): c_skip sd^2/(s^2+sd^2), c_out s sd/sqrt(s^2+sd^2),
# c_in 1/sqrt(s^2+sd^2), c_noise ln(s)/4.
def _edm_coefficients(sigma, sigma_data):
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / _sqrt(sigma ** 2 + sigma_data ** 2)
    c_in = 1 / _sqrt(sigma_data ** 2 + sigma ** 2)
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise

#----------------------------------------------------------------------------
# ECM preconditioning (Geng et al. 2024, "Consistency Models Made Easy"; docs/ECT.md §2). boundary=True is the
# evaluation form with f(x, sigma_min) = x (c_skip sd^2/((s-s_min)^2+sd^2), c_out (s-s_min) sd/sqrt(s^2+sd^2));
# boundary=False is the tuning-pass form, identical to EDM's. The form is chosen by the caller, never by
# module.training.

@persistence.persistent_class
class ECMPrecond(_Precond):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the inner model in FP16 on CUDA?
        sigma_min       = 0.003,        # Noise level of the boundary condition f(x, sigma_min) = x.
        sigma_max       = 80.0,         # Maximum supported noise level.
        sigma_data      = 0.5,          # Expected standard deviation of the training data.
        model_type      = 'DhariwalUNet', # Class name of the inner network.
        **model_kwargs,                 # Keyword arguments of the inner network.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model_type, model_kwargs)

    def coefficients(self, sigma, boundary=True):
        c_skip, c_out, c_in, c_noise = _edm_coefficients(sigma, self.sigma_data)
        if boundary:
            shifted = sigma - self.sigma_min
            c_skip = self.sigma_data ** 2 / (shifted ** 2 + self.sigma_data ** 2)
            c_out = shifted * self.sigma_data / _sqrt(sigma ** 2 + self.sigma_data ** 2)
        return c_skip, c_out, c_in, c_noise

    def forward(self, x, sigma, class_labels=None, force_fp32=False, boundary=True, **model_kwargs):
        x, sigma = self._prepare(x, sigma)
        return self._precondition(x, self.coefficients(sigma, boundary=boundary), class_labels, force_fp32, model_kwargs)

#----------------------------------------------------------------------------
