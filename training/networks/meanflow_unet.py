"""The U-Net of MeanFlow ("Mean Flows for One-step Generative Modeling", Geng et al. 2025) as its PyTorch code
(Gsunshine/py-meanflow, meanflow/models/unet.py) builds it for CIFAR-10: EDM's DDPM++ U-Net (`SongUNet`) that
takes two times, t and h = t − r, and the network u(z, r, t) around it (docs/MEANFLOW.md §2).

What differs from `SongUNet`, and nothing else:
- the embedding: each time gets the positional (or Fourier) embedding of its own, sines first, and the two are
  concatenated, so the augmentation-label layer and the first mapping layer are twice as wide;
- the attention's qkv convolution: py-meanflow splits its output channels as [q | k | v][head][channel], EDM as
  [head][channel][q, k, v]. The function is EDM's attention (training/networks/layers.py) with the rows of the
  qkv weight and bias permuted, so here the weights are kept in EDM's order: a freshly built network permutes
  the rows it drew (`qkv_to_edm_order`) and therefore computes, from the same seed, the very function
  py-meanflow's does; training/checkpoints/meanflow_state.py permutes py-meanflow's tensors the same way.
Time convention (py-meanflow's): z_t = (1 − t)·x + t·ε, data at t = 0 and noise at t = 1; the times enter the
embedding as they are (no noise-label scaling) and the network's output is the average velocity u itself.
"""

import torch
from torch.nn.functional import silu

import dnnlib
from torch_utils import persistence
from training.networks.layers import FourierEmbedding, Linear, PositionalEmbedding, UNetBlock, batch_values
from training.networks.song_unet import SongUNet

#----------------------------------------------------------------------------
# The qkv channel orders: py-meanflow's [3][heads][C/heads], EDM's [heads][C/heads][3] (dimension 0 of a tensor).

def qkv_to_edm_order(tensor, num_heads):
    """Rows of a qkv weight or bias in py-meanflow's order, rearranged into EDM's."""
    rows = tensor.shape[0]
    return tensor.reshape(3, num_heads, rows // (3 * num_heads), *tensor.shape[1:]).movedim(0, 2).reshape(tensor.shape)


def qkv_to_meanflow_order(tensor, num_heads):
    """Rows of a qkv weight or bias in EDM's order, rearranged into py-meanflow's (inverse of qkv_to_edm_order)."""
    rows = tensor.shape[0]
    return tensor.reshape(num_heads, rows // (3 * num_heads), 3, *tensor.shape[1:]).movedim(2, 0).reshape(tensor.shape)


def attention_blocks(net):
    """(name, block) of every U-Net block of `net` with self-attention."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, UNetBlock) and m.num_heads]

#----------------------------------------------------------------------------
# MeanFlow's network u_θ(z, r, t) conditioned on (t, t − r) (Geng et al. 2025, §4.3 and Appendix, the CIFAR-10 U-Net;
# py-meanflow models/unet.py SongUNet).

@persistence.persistent_class
class MeanFlowUNet(SongUNet):
    def __init__(self,
        img_resolution,                     # Image resolution.
        in_channels,                        # Input image channels.
        out_channels,                       # Output image channels.
        label_dim           = 0,            # Must be 0: py-meanflow's U-Net is unconditional.
        augment_dim         = 0,            # Augmentation-label dimensionality; 0 = none (py-meanflow: 6 with EDM aug).
        **song_kwargs,                      # SongUNet's other arguments (model_channels, channel_mult, dropout, ...).
    ):
        if label_dim:
            raise dnnlib.UserError(f'MeanFlowUNet: label_dim={label_dim}, but py-meanflow\'s U-Net is unconditional '
                                   f'(its class-label path raises NotImplementedError); train on unlabelled data')
        super().__init__(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
            label_dim=0, augment_dim=augment_dim, **song_kwargs)
        with torch.no_grad():
            for _, block in attention_blocks(self):
                block.qkv.weight.copy_(qkv_to_edm_order(block.qkv.weight, block.num_heads))
                block.qkv.bias.copy_(qkv_to_edm_order(block.qkv.bias, block.num_heads))

    def _build_mapping(self, embedding_type, noise_channels, emb_channels, label_dim, augment_dim, init):
        """SongUNet's mapping layers in its order (so the same seed draws the same weights), for the two
        concatenated time embeddings; no class-label layer."""
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = None
        self.map_augment = Linear(in_features=augment_dim, out_features=2 * noise_channels, bias=False, **init) \
            if augment_dim else None
        self.map_layer0 = Linear(in_features=2 * noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

    def _embed_time(self, time):
        emb = self.map_noise(time)
        return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)    # DDPM++ order: sines first.

    # py-meanflow unet.py SongUNet.forward: emb = [embed(t), embed(t − r)] (+ augment labels), then two SiLU layers.
    def _embed(self, noise_labels, class_labels, augment_labels):
        t, h = noise_labels
        emb = torch.cat([self._embed_time(t), self._embed_time(h)], dim=1)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        return silu(self.map_layer1(emb))

#----------------------------------------------------------------------------

@persistence.persistent_class
class MeanFlowPrecond(torch.nn.Module):
    """The average velocity u(z, r, t) (MeanFlow Eq. 3) of py-meanflow: its U-Net called with (t, t − r)."""

    is_meanflow = True      # samplers and methods recognise the MeanFlow form, net(x, r, t, ...), by this

    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Must be 0 (py-meanflow's U-Net is unconditional).
        use_fp16        = False,        # Must be False: mixed precision is autocast's (--precision); JVPs run fp32.
        model_type      = 'MeanFlowUNet', # Class name of the inner network (the only one).
        **model_kwargs,                 # Keyword arguments of the inner network.
    ):
        if use_fp16:
            raise dnnlib.UserError('MeanFlowPrecond: use_fp16=True is not supported; choose --precision instead')
        if model_type != 'MeanFlowUNet':
            raise dnnlib.UserError(f'MeanFlowPrecond: model_type "{model_type}" is not MeanFlowUNet')
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.model = MeanFlowUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
            label_dim=label_dim, **model_kwargs)

    def forward(self, x, r, t, class_labels=None, augment_labels=None):
        """u(x, r, t) in float32; r <= t are times in [0, 1] (floats or [N] tensors), t = 1 is noise."""
        x = x.to(torch.float32)
        t, r = batch_values(t, x, torch.float32).flatten(), batch_values(r, x, torch.float32).flatten()
        return self.model(x, (t, t - r), class_labels, augment_labels)
