"""EDM's network zoo, with EDM's tensor names so official checkpoints load bit-for-bit: the layers, the DDPM++/NCSN++
U-Net (`SongUNet`), the ADM U-Net (`DhariwalUNet`) and the VP / VE / EDM / ECM preconditioners.

Official EDM pickles and this project's snapshots name these classes as `training.networks.<Class>`, so every
class is re-exported here from the module that defines it. Beside them: EDM2's U-Net and preconditioner (edm2,
named `training.networks_edm2.<Class>` by EDM2's own code and earlier snapshots), openai's Consistency Models U-Net
(karras), the continuous-time forms (trigflow: sCM's F_θ around an EDM network; meanflow_unet: MeanFlow's two-time
U-Net; tcm_precond: TCM's two-network training form), the random draws inside a forward pass (randomness) and
forward-mode AD through any of them (jvp).

May import: torch_utils, dnnlib.
"""

from training.networks.dhariwal_unet import DhariwalUNet
from training.networks.layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock,
    attention, weight_init)
from training.networks.precond import ECMPrecond, EDMPrecond, VEPrecond, VPPrecond, skip_out_scalings
from training.networks.song_unet import SongUNet

__all__ = ['Conv2d', 'DhariwalUNet', 'ECMPrecond', 'EDMPrecond', 'FourierEmbedding', 'GroupNorm', 'Linear',
           'PositionalEmbedding', 'SongUNet', 'UNetBlock', 'VEPrecond', 'VPPrecond', 'attention', 'skip_out_scalings',
           'weight_init']
