"""DDPM++ / NCSN++ U-Net (Song et al. 2021, "Score-Based Generative Modeling through SDEs"), as reimplemented in
EDM (Appendix F.2, Table 7), with EDM's tensor names and initialisation order."""

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence
from training.networks.layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock,
    add_decoder_level, add_encoder_blocks, check_choice, encoder_step, working_layout)
from training.networks.randomness import drop_labels

#----------------------------------------------------------------------------
# Builders of the three parts (mapping, encoder, decoder), called in EDM's order.

def _song_inits(emb_channels, dropout, resample_filter):
    """(init, init_zero, block_kwargs) of DDPM++/NCSN++: Xavier-uniform layers, single-head attention."""
    init = dict(init_mode='xavier_uniform')
    init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
    init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
    block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
        resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero,
        init_attn=init_attn)
    return init, init_zero, block_kwargs


def _add_encoder_aux(enc, res, caux, cout, encoder_type, resample_filter, init):
    """NCSN++'s input pyramid at one downsampled level ('skip' or 'residual'); returns the new aux channels."""
    if encoder_type == 'skip':
        enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True,
            resample_filter=resample_filter)
        enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
    if encoder_type == 'residual':
        enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3, down=True,
            resample_filter=resample_filter, fused_resample=True, **init)
        caux = cout
    return caux


def _song_encoder(levels, in_channels, model_channels, num_blocks, attn_resolutions, encoder_type, resample_filter,
                  init, block_kwargs):
    """(encoder ModuleDict, its output channels); `levels` lists (level, resolution, channels) from the top."""
    enc = torch.nn.ModuleDict()
    cout = caux = in_channels
    for level, res, channels in levels:
        if level == 0:
            enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cout, out_channels=model_channels, kernel=3, **init)
            cout = model_channels
        else:
            enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            caux = _add_encoder_aux(enc, res, caux, cout, encoder_type, resample_filter, init)
        cout = add_encoder_blocks(enc, res, cout, channels, num_blocks, res in attn_resolutions, block_kwargs)
    return enc, cout


def _add_decoder_aux(dec, res, cout, out_channels, aux_up, resample_filter, init_zero):
    """The output head of one decoder level (NCSN++ 'skip' decoder: every level; otherwise the top one only)."""
    if aux_up:
        dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True,
            resample_filter=resample_filter)
    dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
    dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)


def _song_decoder(levels, enc, cout, out_channels, num_blocks, attn_resolutions, decoder_type, resample_filter,
                  init_zero, block_kwargs):
    """The decoder ModuleDict, consuming the skip connections of `enc` (every entry but the aux ones)."""
    dec = torch.nn.ModuleDict()
    skips = [block.out_channels for name, block in enc.items() if 'aux' not in name]
    for level, res, channels in reversed(levels):
        attended = [num_blocks] if res in attn_resolutions else []   # DDPM++: the last block of a level only.
        cout = add_decoder_level(dec, res, cout, channels, skips, num_blocks, level == len(levels) - 1, attended,
            block_kwargs)
        if decoder_type == 'skip' or level == 0:
            aux_up = decoder_type == 'skip' and level < len(levels) - 1
            _add_decoder_aux(dec, res, cout, out_channels, aux_up, resample_filter, init_zero)
    return dec

#----------------------------------------------------------------------------

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    draw_tape = None        # a training.networks.randomness.DrawTape lent for one step (label dropout)
    memory_format = 'contiguous'    # activation layout, 'channels_last' via layers.set_memory_format

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
        check_choice('embedding_type', embedding_type, ['fourier', 'positional'])
        check_choice('encoder_type', encoder_type, ['standard', 'skip', 'residual'])
        check_choice('decoder_type', decoder_type, ['standard', 'skip'])
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init, init_zero, block_kwargs = _song_inits(emb_channels, dropout, resample_filter)
        self._build_mapping(embedding_type, model_channels * channel_mult_noise, emb_channels, label_dim, augment_dim,
            init)
        levels = [(level, img_resolution >> level, model_channels * mult) for level, mult in enumerate(channel_mult)]
        self.enc, cout = _song_encoder(levels, in_channels, model_channels, num_blocks, attn_resolutions,
            encoder_type, resample_filter, init, block_kwargs)
        self.dec = _song_decoder(levels, self.enc, cout, out_channels, num_blocks, attn_resolutions, decoder_type,
            resample_filter, init_zero, block_kwargs)

    def _build_mapping(self, embedding_type, noise_channels, emb_channels, label_dim, augment_dim, init):
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) \
            if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

    def _embed(self, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape) # DDPM++ order: sines first.
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training, self.draw_tape)
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
                x = encoder_step(name, block, x, emb)
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
        x, skips = self._encode(working_layout(x, self.memory_format), emb)
        return self._decode(x, emb, skips).contiguous()
