"""ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs"), as reimplemented in EDM (Appendix F.2), with
EDM's tensor names and initialisation order."""

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence
from training.networks.layers import (Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, add_decoder_level,
    add_encoder_blocks, encoder_step, working_layout)
from training.networks.randomness import drop_labels

#----------------------------------------------------------------------------
# Builders of the encoder and decoder, called in EDM's order.

def _adm_encoder(levels, in_channels, num_blocks, attn_resolutions, init, block_kwargs):
    """(encoder ModuleDict, its output channels); `levels` lists (level, resolution, channels) from the top."""
    enc = torch.nn.ModuleDict()
    cout = in_channels
    for level, res, channels in levels:
        if level == 0:
            enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cout, out_channels=channels, kernel=3, **init)
            cout = channels
        else:
            enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
        cout = add_encoder_blocks(enc, res, cout, channels, num_blocks, res in attn_resolutions, block_kwargs)
    return enc, cout


def _adm_decoder(levels, enc, cout, num_blocks, attn_resolutions, block_kwargs):
    """(decoder ModuleDict, its output channels), consuming the skip connections of every encoder entry."""
    dec = torch.nn.ModuleDict()
    skips = [block.out_channels for block in enc.values()]
    for level, res, channels in reversed(levels):
        attended = range(num_blocks + 1) if res in attn_resolutions else []   # ADM: every block of the level.
        cout = add_decoder_level(dec, res, cout, channels, skips, num_blocks, level == len(levels) - 1, attended,
            block_kwargs)
    return dec, cout

#----------------------------------------------------------------------------

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    draw_tape = None        # a training.networks.randomness.DrawTape lent for one step (label dropout)
    memory_format = 'contiguous'    # activation layout, 'channels_last' via layers.set_memory_format

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
        channels_per_head   = 64,           # Attention head width (openai's num_head_channels).
        adaptive_scale      = True,         # Scale-shift norm (True) or an added embedding (False) in the blocks.
        min_channels_per_group = 4,         # GroupNorm group count min(32, C // this); 1 = always 32 (openai's).
        exp_freqs           = False,        # Noise embedding frequencies rounded as guided-diffusion (openai's).
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, dropout=dropout, init=init,
            init_zero=init_zero, adaptive_scale=adaptive_scale, min_channels_per_group=min_channels_per_group)
        self._build_mapping(model_channels, emb_channels, label_dim, augment_dim, init, exp_freqs)
        levels = [(level, img_resolution >> level, model_channels * mult) for level, mult in enumerate(channel_mult)]
        self.enc, cout = _adm_encoder(levels, in_channels, num_blocks, attn_resolutions, init, block_kwargs)
        self.dec, cout = _adm_decoder(levels, self.enc, cout, num_blocks, attn_resolutions, block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout, min_channels_per_group=min_channels_per_group)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def _build_mapping(self, model_channels, emb_channels, label_dim, augment_dim, init, exp_freqs):
        self.map_noise = PositionalEmbedding(num_channels=model_channels, exp_freqs=exp_freqs)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False,
            init_mode='kaiming_normal', init_weight=np.sqrt(augment_dim)) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False,
            init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

    def _embed(self, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(drop_labels(class_labels, self.label_dropout, self.training, self.draw_tape))
        return silu(emb)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embed(noise_labels, class_labels, augment_labels)
        x = working_layout(x, self.memory_format)
        skips = []
        for name, block in self.enc.items():
            x = encoder_step(name, block, x, emb)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x))).contiguous()
