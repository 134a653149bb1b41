"""Jacobian-vector products of a network, d/dε f(x + ε·ẋ, t + ε·ṫ) at ε = 0 (forward-mode AD), as the
continuous-time consistency methods (sCT/sCD, MeanFlow) need them; docs/ARCHITECTURE.md "Forward-mode AD (JVPs)".

Forward-mode AD runs through every layer of this project's networks. Two torch kernels fail under it and are
avoided only where a tangent flows, so ordinary forwards keep their kernels and their bits:
- the fused attention kernels (flash / memory-efficient / the CPU flash kernel) have no JVP: `network_jvp` selects
  scaled_dot_product_attention's math path (same function, composite ops) for the duration of the call;
- the CPU group_norm JVP fails on a channels-last input: `layers.GroupNorm` gives it a contiguous copy.
Dropout masks drawn inside a JVP are plain tensors (training/networks/randomness.py), so a DrawTape shares them
with ordinary passes either way. EDM2's weight normalisation never writes to a parameter inside a forward
(training/networks/edm2.py), so a JVP pass sees the same weights as any other pass.

Which networks can take a JVP is an allow-list of module types (`JVP_MODULE_TYPES`), each of them taken through
torch.func.jvp against finite differences by tests/test_jvp_networks.py; `require_jvp_support` refuses any other.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import dnnlib
from training.networks import edm2, layers
from training.networks.dhariwal_unet import DhariwalUNet
from training.networks.karras import KarrasDenoiser
from training.networks.meanflow_unet import MeanFlowPrecond, MeanFlowUNet
from training.networks.precond import ECMPrecond, EDMPrecond, VEPrecond, VPPrecond
from training.networks.song_unet import SongUNet
from training.networks.trigflow import TrigFlowPrecond

# The exact module types known to take a JVP (subclasses may override forward, so they are not included).
JVP_MODULE_TYPES = (
    EDMPrecond, ECMPrecond, VPPrecond, VEPrecond, KarrasDenoiser, SongUNet, DhariwalUNet,
    layers.UNetBlock, layers.Conv2d, layers.Linear, layers.GroupNorm, layers.PositionalEmbedding,
    layers.FourierEmbedding, edm2.Precond, edm2.UNet, edm2.Block, edm2.MPConv, edm2.MPFourier,
    torch.nn.ModuleDict, TrigFlowPrecond, MeanFlowPrecond, MeanFlowUNet,
)


def network_jvp(fn, primals, tangents):
    """(fn(*primals), its JVP along `tangents`), with the math attention path: torch.func.jvp semantics."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(fn, tuple(primals), tuple(tangents))


def unsupported_module(net):
    """(name, module) of the first module of `net` (unwrapped: no DDP or torch.compile wrapper) whose type is not
    in JVP_MODULE_TYPES; None if all are."""
    for name, module in net.named_modules():
        if type(module) not in JVP_MODULE_TYPES:
            return name, module
    return None


def require_jvp_support(net, what):
    """Raise a one-line dnnlib.UserError naming `what` (e.g. the method's class name) unless `net` can take a JVP.
    Call it in setup, before any work."""
    found = unsupported_module(net)
    if found is not None:
        name, module = found
        kind = f'{type(module).__module__}.{type(module).__qualname__}'
        raise dnnlib.UserError(f'{what}: the network cannot take a JVP: its module "{name or "(top level)"}" is a '
                               f'{kind}, not a module type known to support forward-mode AD '
                               f'(training.networks.jvp.JVP_MODULE_TYPES)')
