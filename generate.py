"""Generate images from a consistency model (ECM) or a diffusion model (EDM / EDM2) checkpoint.

    python generate.py --network=snapshot.pt --outdir=out --seeds=0-63
    torchrun --nproc_per_node=8 generate.py --network=URL --outdir=out --seeds=0-49999 --subdirs

ECM networks default to 2-step consistency sampling (steps [80, mid_t, 0]; mid_t from the snapshot's
metadata, else 0.821 for 32x32 DDPM++/NCSN++/ADM networks and 1.526 for EDM2 networks); diffusion networks
default to EDM's Heun sampler with 18 steps (35 NFE). Image `i` of seed `s` is identical whatever the batch
size, device or number of processes: each seed has its own CPU generator, drawn in the order latent,
class index (conditional networks), then the noise each stochastic step needs.
"""

import inspect
import math
import os
import re
import zipfile

import click
import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import progress
from training import samplers

CIFAR_MID_T = 0.821     # ECT's CIFAR-10 2-step intermediate time (docs/ECT.md §5).
IMAGENET_MID_T = 1.526  # ECT's ImageNet-64 (EDM2 network) 2-step intermediate time (docs/ECT.md §5).

# ----------------------------------------------------------------------------------------------------------
# Choosing the sampler.


def is_consistency_net(net):
    """True for networks with an ECM evaluation form: EDM2 nets with `ecm_sigma_min` set, or ECMPrecond."""
    if hasattr(net, 'ecm_sigma_min'):
        return net.ecm_sigma_min is not None
    return 'boundary' in inspect.signature(net.forward).parameters


def default_mid_t(net, metadata=None):
    """The 2-step recipe's intermediate time for `net`: snapshot metadata first, else by network family."""
    if metadata and metadata.get('mid_t') is not None:
        mid_t = metadata['mid_t']
        return [float(t) for t in (mid_t if isinstance(mid_t, (list, tuple)) else [mid_t])]
    return [IMAGENET_MID_T if hasattr(net, 'unet') else CIFAR_MID_T]


def consistency_kwargs(net, num_steps=None, mid_t=None, t_max=80.0, metadata=None):
    """Keyword arguments of `consistency_sampler`: 2 steps with the recipe's mid_t unless told otherwise."""
    if mid_t is None:
        if num_steps is not None and num_steps > 2:
            raise dnnlib.UserError(f'--steps={num_steps}: more than 2 consistency steps need --mid_t with '
                                   f'{num_steps - 1} intermediate times')
        mid_t = [] if num_steps == 1 else default_mid_t(net, metadata)
    elif num_steps is not None and num_steps != len(mid_t) + 1:
        raise dnnlib.UserError(f'--steps={num_steps} does not match --mid_t with {len(mid_t)} values '
                               f'({len(mid_t) + 1} steps)')
    return dict(t_steps=samplers.make_consistency_steps(t_max, mid_t))


def resolve_sampler(net, sampler=None, num_steps=None, mid_t=None, t_max=None, metadata=None, **heun_kwargs):
    """(sampler name, sampler kwargs) for `net`: consistency for ECM networks, Heun for diffusion networks.

    Options of the other sampler are refused (a UserError naming the flag) rather than silently ignored.
    """
    sampler = sampler or ('consistency' if is_consistency_net(net) else 'heun')
    if sampler == 'consistency':
        if heun_kwargs:
            raise dnnlib.UserError(f'--{next(iter(heun_kwargs))}: only used by --sampler=heun')
        return sampler, consistency_kwargs(net, num_steps, mid_t, 80.0 if t_max is None else t_max, metadata)
    if mid_t is not None or t_max is not None:
        raise dnnlib.UserError(f'--{"mid_t" if mid_t is not None else "t-max"}: only used by --sampler=consistency')
    if num_steps is not None:
        heun_kwargs['num_steps'] = num_steps
    return 'heun', heun_kwargs


SAMPLERS = dict(consistency=samplers.consistency_sampler, heun=samplers.edm_sampler)

# ----------------------------------------------------------------------------------------------------------
# The reusable core: seeds in, uint8 images out.


def split_batches(seeds, batch_size, world_size=1):
    """Split `seeds` into a multiple of `world_size` batches of at most `batch_size` (EDM's scheme)."""
    num_batches = max(math.ceil(len(seeds) / (batch_size * world_size)), 1) * world_size
    return [[int(s) for s in chunk] for chunk in np.array_split(np.asarray(seeds, dtype=np.int64), num_batches)]


def check_class_idx(net, class_idx):
    """Raise a UserError unless `class_idx` is None or a class of `net`."""
    if class_idx is None:
        return
    if not net.label_dim:
        raise dnnlib.UserError(f'--class={class_idx}: the network is unconditional (label_dim 0)')
    if not 0 <= class_idx < net.label_dim:
        raise dnnlib.UserError(f'--class={class_idx}: must be in [0, {net.label_dim - 1}] for this network')


def sample_batch(net, batch_seeds, class_idx=None, sampler='consistency', sampler_kwargs=None, device=None):
    """Float64 images (N,C,H,W, in [-1, 1] unclipped) for `batch_seeds` with per-seed generators."""
    device = torch.device(device) if device is not None else next(net.parameters()).device
    rnd = samplers.StackedRandomGenerator(device, batch_seeds)
    latents = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution])
    class_labels = None
    if net.label_dim:
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(batch_seeds)])]
        if class_idx is not None:
            class_labels = torch.zeros_like(class_labels)
            class_labels[:, class_idx] = 1
    sampler_fn = SAMPLERS[sampler] if isinstance(sampler, str) else sampler
    with torch.no_grad():
        return sampler_fn(net, latents, class_labels, randn_like=rnd.randn_like, **(sampler_kwargs or {}))


def generate_images(net, seeds, class_idx=None, sampler=None, sampler_kwargs=None, batch_size=64, device=None,
                    rank=0, world_size=1):
    """An iterator of (batch seeds, uint8 images N,H,W,C on `device`) for this rank's share of `seeds`.

    `net` must already be in eval() on `device` (default: the device of its parameters). `sampler` is
    'consistency', 'heun' or a callable with the samplers' signature (None: chosen from the network, see
    resolve_sampler); `sampler_kwargs` None means the recipe's defaults for that sampler. The images of a seed do not depend on
    `batch_size`, `rank` or `world_size`; rank r takes batches r, r + world_size, ... (EDM's sharding).
    """
    check_class_idx(net, class_idx)  # Checked now, not at the first batch.
    if sampler is None or (sampler_kwargs is None and isinstance(sampler, str)):
        sampler, defaults = resolve_sampler(net, sampler)
        sampler_kwargs = defaults if sampler_kwargs is None else sampler_kwargs
    batches = [b for b in split_batches(seeds, batch_size, world_size)[rank::world_size] if b]
    return ((b, samplers.to_uint8(sample_batch(net, b, class_idx, sampler, sampler_kwargs, device))) for b in batches)

# ----------------------------------------------------------------------------------------------------------
# Writing PNGs.


def _pil_image(image):
    """A PIL image from one H,W,C uint8 numpy array (L for one channel, else RGB as EDM)."""
    return PIL.Image.fromarray(image[:, :, 0], 'L') if image.shape[2] == 1 else PIL.Image.fromarray(image, 'RGB')


def save_png(path, image):
    """Write one H,W,C uint8 image as a PNG, atomically."""
    with dnnlib.util.atomic_write(path, 'wb') as f:
        _pil_image(image).save(f, format='PNG')


def image_path(outdir, seed, subdirs=False):
    """{outdir}/{seed:06d}.png, or {outdir}/{seed - seed % 1000:06d}/{seed:06d}.png with subdirs."""
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')


def make_grid(images):
    """Tile N,H,W,C uint8 images row by row into a near-square grid (black where the last row is short)."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros([rows * cols, h, w, c], dtype=np.uint8)
    grid[:n] = images
    return grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)

# ----------------------------------------------------------------------------------------------------------
# Command line.


def parse_int_list(s):
    """'1,3-5,8' -> [1, 3, 4, 5, 8] (EDM's seed syntax); UserError naming --seeds if malformed."""
    values = []
    for part in s.split(','):
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if not m:
            raise dnnlib.UserError(f'--seeds="{s}": expected non-negative integers and ranges such as 0-63,100')
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise dnnlib.UserError(f'--seeds="{s}": range {lo}-{hi} is empty')
        values.extend(range(lo, hi + 1))
    return values


def parse_float_list(values, flag):
    """Repeated and/or comma-separated floats -> list, or None when the flag was not given."""
    if not values:
        return None
    try:
        return [float(v) for value in values for v in value.split(',')]
    except ValueError:
        raise dnnlib.UserError(f'{flag}={",".join(values)}: expected numbers such as 0.821 or 1.5,0.4') from None


def load_network(network, allow_unsafe_pickle):
    """The network (eval mode, CPU) and its snapshot metadata (empty for official pickles, which have none)."""
    from training import checkpoint, export, hub  # Deferred: keeps `generate_images` importable without the loaders.
    if hub.is_hf_url(network):
        network = hub.resolve(network)  # Downloaded through the Hub's cache once.
    if export.is_safetensors_path(network):
        return export.load_safetensors_network(network)
    path = dnnlib.util.open_url(network, return_filename=True)  # URLs are downloaded to the cache once.
    if zipfile.is_zipfile(path):  # Our snapshots are torch.save zip archives; official pickles are not.
        net, metadata = checkpoint.load_network_snapshot(path)
        return net.eval().to('cpu'), metadata
    return checkpoint.load_network(path, allow_unsafe_pickle=allow_unsafe_pickle), {}


def check_outdir(outdir):
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise dnnlib.UserError(f'--outdir={outdir}: exists and is not a directory')


def write_images(images_iter, outdir, subdirs, grid, num_seeds, world_size=1):
    """Consume (seeds, uint8 images); write per-seed PNGs or one grid; a progress bar (images, img/s) on rank 0,
    which counts its own images times `world_size`, the processes sampling in step with it."""
    collected = []
    with progress.bar(total=num_seeds, desc='generating', unit='img') as images_bar:
        for batch_seeds, images in images_iter:
            images = images.cpu().numpy()
            if grid:
                collected.append(images)
            else:
                for seed, image in zip(batch_seeds, images):
                    save_png(image_path(outdir, seed, subdirs), image)
            images_bar.update(min(len(batch_seeds) * world_size, num_seeds - images_bar.n))
    if grid and collected:
        save_png(os.path.join(outdir, 'grid.png'), make_grid(np.concatenate(collected)))


class CommandError(click.ClickException):
    """A user mistake, shown as one line; exit code 2 like click's usage errors."""
    exit_code = 2


@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--network', 'network', help='Network: official pickle, snapshot or model.safetensors folder; path, URL or hf://OWNER/REPO[/FILE]', metavar='PATH|URL', type=str, required=True)
@click.option('--outdir', help='Where to save the images', metavar='DIR', type=str, required=True)
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', type=str, default='0-63', show_default=True)
@click.option('--subdirs', help='Create a subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label  [default: random per seed]', metavar='INT', type=int, default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--sampler', help='Sampler  [default: consistency for ECM nets, heun otherwise]', type=click.Choice(['consistency', 'heun']), default=None)
@click.option('--steps', 'num_steps', help='Consistency steps, or Heun steps N (NFE 2N-1)  [default: 2 / 18]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--mid_t', '--mid-t', 'mid_t', help='Intermediate consistency times (repeat or comma list)', metavar='FLOAT[,FLOAT]', multiple=True)
@click.option('--t-max', '--t_max', 't_max', help='Initial consistency time  [default: 80]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--sigma_min', help='Heun: lowest noise level  [default: 0.002]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--sigma_max', help='Heun: highest noise level  [default: 80]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--rho', help='Heun: time step exponent  [default: 7]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--S_churn', 'S_churn', help='Heun: stochasticity strength  [default: 0]', metavar='FLOAT', type=click.FloatRange(min=0), default=None)
@click.option('--S_min', 'S_min', help='Heun: stochastic min noise level  [default: 0]', metavar='FLOAT', type=click.FloatRange(min=0), default=None)
@click.option('--S_max', 'S_max', help='Heun: stochastic max noise level  [default: inf]', metavar='FLOAT', type=click.FloatRange(min=0), default=None)
@click.option('--S_noise', 'S_noise', help='Heun: stochastic noise inflation  [default: 1]', metavar='FLOAT', type=float, default=None)
@click.option('--grid', help='Write one grid image (grid.png) instead of a PNG per seed', is_flag=True)
@click.option('--allow-unsafe-pickle', help='Allow legacy pickles that execute embedded code', is_flag=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@progress.no_progress_option
def cli(network, outdir, seeds, subdirs, class_idx, max_batch_size, sampler, num_steps, mid_t, t_max, grid,
        allow_unsafe_pickle, device, no_progress, **heun_opts):
    """Generate images with a consistency or diffusion model; one PNG per seed, or one grid."""
    try:
        dist.init()
        seeds = parse_int_list(seeds)
        device = dist.resolve_device(device)
        mid_t = parse_float_list(mid_t, '--mid_t')
        check_outdir(outdir)
        net, metadata = load_network(network, allow_unsafe_pickle)
        check_class_idx(net, class_idx)
        heun_kwargs = {k: v for k, v in heun_opts.items() if v is not None}
        sampler, sampler_kwargs = resolve_sampler(net, sampler, num_steps, mid_t, t_max, metadata, **heun_kwargs)
    except dnnlib.UserError as e:
        raise CommandError(str(e)) from None
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if grid:  # One image needs every seed in one process: rank 0 samples them all.
        seeds, rank, world_size = (seeds if rank == 0 else []), 0, 1
    dist.print0(f'Generating {len(seeds)} images with the {sampler} sampler {sampler_kwargs} to "{outdir}"...')
    net = net.to(device)
    images = generate_images(net, seeds, class_idx, sampler, sampler_kwargs, max_batch_size, device, rank, world_size)
    with progress.disabled_if(no_progress):
        write_images(images, outdir, subdirs, grid, len(seeds), world_size)
    dist.barrier()
    dist.print0('Done.')


def main(args=None):
    """Entry point; click's own usage errors and ours both exit with code 2."""
    cli.main(args=args, prog_name='generate.py')


if __name__ == '__main__':
    main()
