"""Benchmark openai's Consistency Models ImageNet-64 network: one-step and multistep (ts 0,22,39: 2 NFE) sampling
img/s, ours (KarrasDenoiser on DhariwalUNet, attention through scaled_dot_product_attention in the network's
precision) against the official network's arithmetic (guided-diffusion's UNetModel of a consistency_models
checkout, `QKVAttentionLegacy` with its float16 attention, the same weights), on the same machine.

    python bench/bench_cm.py                                       # CUDA if present, batch 64
    python bench/bench_cm.py --device=cpu --batch=2 --iters=2      # a quick CPU run
    python bench/bench_cm.py --official=../consistency_models      # + the official network (needs einops)
    python bench/bench_cm.py --tiny --device=cpu --iters=1         # a seconds-long check that the script works

Both sides run the same sampler code (training.sampling.samplers_karras, float32, as openai's karras_sample): only the
network differs. The network is randomly initialised (speed does not depend on the weights); the official one gets
ours's weights through the state-dict mapping, so both compute the same function. On CUDA every timing is
bracketed by torch.cuda.synchronize().
"""

import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from training.checkpoints import openai_state as checkpoint_cm
from training.networks import karras as networks_cm
from training.sampling import samplers_karras  # noqa: E402

TINY = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], adaptive_scale=True,
            channels_per_head=16)
CASES = dict(onestep=dict(sampler='onestep'), multistep=dict(sampler='multistep', ts=[0, 22, 39], steps=40))


def build_ours(tiny, device):
    """The ImageNet-64 KarrasDenoiser (consistency form, 1000 classes), or a tiny 16 px one with --tiny."""
    arch = TINY if tiny else networks_cm.RELEASED_UNETS['imagenet64']
    torch.manual_seed(0)
    net = networks_cm.KarrasDenoiser(img_resolution=16 if tiny else 64, label_dim=1000, **arch)
    with torch.no_grad():
        for param in net.parameters():  # No zero-initialised layer, so the agreement check means something.
            param.add_(torch.randn_like(param) * 0.02)
    return net.eval().requires_grad_(False).to(device)


class OfficialUNet(torch.nn.Module):
    """guided-diffusion's UNetModel (imported from a consistency_models checkout) behind DhariwalUNet's call."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet    # cm.unet.UNetModel, legacy attention

    def forward(self, x, noise_labels, class_labels):
        return self.unet(x, noise_labels, y=class_labels.argmax(dim=1))


def build_official(ours, official_root, device):
    """A copy of `ours` whose U-Net is the official UNetModel holding the same weights."""
    sys.path.insert(0, official_root)
    from cm import unet as cm_unet  # Optional: only with --official (needs einops).
    # UNetModel always builds flash_attn's CUDA attention; use the official legacy attention (same state dict).
    cm_unet.QKVFlashAttention = lambda channels, num_heads: cm_unet.QKVAttentionLegacy(num_heads)
    kw = ours.model.init_kwargs
    res = ours.img_resolution
    unet = cm_unet.UNetModel(image_size=res, in_channels=3, model_channels=kw['model_channels'], out_channels=3,
                     num_res_blocks=kw['num_blocks'], attention_resolutions=[res // r for r in kw['attn_resolutions']],
                     channel_mult=tuple(kw['channel_mult']), num_classes=ours.label_dim,
                     num_head_channels=kw['channels_per_head'], use_scale_shift_norm=kw['adaptive_scale'],
                     resblock_updown=True)
    mapping = checkpoint_cm.tensor_map(ours)
    ours_sd = ours.state_dict()
    theirs = {name: _to_openai(ours_sd[mine], kind, heads) for name, mine, kind, heads in mapping}
    unet.load_state_dict(theirs, strict=True)
    twin = build_ours(ours.img_resolution == 16, 'cpu')
    twin.model = OfficialUNet(unet)  # The twin's own U-Net weights are dropped; the official one holds ours.
    return twin.eval().requires_grad_(False).to(device)


def _to_openai(tensor, kind, heads):
    """Inverse of checkpoint_cm's mapping: EDM's (heads, head_dim, 3) qkv channels back to (3, heads, head_dim)."""
    if kind == 'transpose':
        return tensor.t().contiguous()
    if kind == 'qkv':
        rest = tensor.shape[1:]
        return tensor.reshape(heads, -1, 3, *rest).movedim(2, 0).reshape(-1, *rest).contiguous()
    return tensor


def time_case(net, batch, case, iters, warmup, device):
    """Seconds per karras_sample call (one value per timed call)."""
    latents = torch.randn([batch, 3, net.img_resolution, net.img_resolution], device=device)
    labels = torch.eye(1000, device=device)[torch.randint(1000, [batch], device=device)]
    seconds = []
    for i in range(warmup + iters):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            samplers_karras.karras_sample(net, latents, labels, **CASES[case])
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def agreement(nets, batch, device):
    """Max abs difference of the denoised outputs of ours and the official network at sigma = 1."""
    x = torch.randn([batch, 3, nets['ours'].img_resolution, nets['ours'].img_resolution], device=device)
    labels = torch.eye(1000, device=device)[torch.arange(batch, device=device) % 1000]
    with torch.no_grad():
        a, b = (net(x, torch.ones([batch], device=device), labels) for net in (nets['ours'], nets['official']))
    return (a - b).abs().max().item()


@click.command()
@click.option('--device', help='Device  [default: cuda if available]', type=str, default=None)
@click.option('--batch', help='Batch size  [default: 64 on CUDA, 2 on CPU]', type=click.IntRange(min=1), default=None)
@click.option('--iters', help='Timed calls', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--warmup', help='Untimed calls first', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--official', help='A consistency_models checkout to compare with', metavar='DIR', default=None)
@click.option('--tiny', help='A tiny 16 px network (checks the script, measures nothing useful)', is_flag=True)
def main(device, batch, iters, warmup, official, tiny):
    """One-step and multistep img/s of the openai ImageNet-64 network, ours vs the official arithmetic."""
    try:
        device = dist.resolve_device(device)
    except dnnlib.UserError as e:
        raise click.ClickException(str(e)) from None
    batch = batch or (64 if device.type == 'cuda' else 2)
    ours = build_ours(tiny, device)
    nets = dict(ours=ours)
    if official:
        nets['official'] = build_official(ours.cpu(), official, device)
        ours.to(device)
    print(f'{"tiny" if tiny else "ImageNet-64"} network, batch {batch}, {device}, torch {torch.__version__}')
    if official:
        print(f'max |ours - official| of one denoiser call: {agreement(nets, batch, device):.2e} (fp16 attention)')
    for case in CASES:
        for name, net in nets.items():
            seconds = time_case(net, batch, case, iters, warmup, device)
            median = statistics.median(seconds)
            print(f'{case:9s} {name:8s}  {batch / median:9.2f} img/s  ({median * 1000:.1f} ms per batch, '
                  f'{samplers_karras.karras_nfe(**CASES[case])} NFE)')


if __name__ == '__main__':
    main()
