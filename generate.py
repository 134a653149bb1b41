"""Generate images from a consistency model (ECM) or a diffusion model (EDM / EDM2) checkpoint.

    python generate.py --network=snapshot.pt --outdir=out --seeds=0-63
    torchrun --nproc_per_node=8 generate.py --network=URL --outdir=out --seeds=0-49999 --subdirs

ECM networks default to 2-step consistency sampling (steps [80, mid_t, 0]; mid_t from the snapshot's
metadata, else 0.821 for 32x32 DDPM++/NCSN++/ADM networks and 1.526 for EDM2 networks); sCT/sCD snapshots to
sCM's 2-step TrigFlow sampler and MeanFlow snapshots to MeanFlow's (the sampler their snapshot records, in their own
time variable); diffusion networks default to EDM's Heun sampler with 18 steps (35 NFE). The random inputs of seed `s` are identical
whatever the batch size, device or number of processes (its image up to floating-point rounding): each seed has
its own CPU generator, drawn in the order latent, class index (conditional networks), then the noise each
stochastic step needs.

The reusable parts live in training/: the sampler rules and recipe defaults in training.sampling.samplers, seeds to images
in training.sampling.generation.
"""

import itertools
import os

import click
import numpy as np

import dnnlib
from torch_utils import distributed as dist
from torch_utils import progress
from training.sampling import samplers
from training.sampling import samplers_karras
from training.compile import COMPILE_HELP, compile_network
from training.cli_common import load_network, parse_float_list, parse_int_list, state_dict_options, user_errors
from training.sampling.generation import (BackgroundWriter, check_class_idx, generate_batches, host_batches, make_grid,
                                 save_png)

# ----------------------------------------------------------------------------------------------------------
# Writing PNGs.


def image_path(outdir, seed, subdirs=False):
    """{outdir}/{seed:06d}.png, or {outdir}/{seed - seed % 1000:06d}/{seed:06d}.png with subdirs."""
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')


def check_outdir(outdir):
    dnnlib.util.check_output_dir(outdir, '--outdir')


def write_images(images_iter, outdir, subdirs, keep, num_seeds, world_size=1):
    """Consume (seeds, uint8 images): with `keep`, return them (a list of N,H,W,C arrays, for a grid), else write a
    PNG per seed on background threads; a progress bar (images, img/s) on rank 0, which counts its own images
    times `world_size`, the processes sampling in step."""
    kept = []
    with progress.bar(total=num_seeds, desc='generating', unit='img') as images_bar, BackgroundWriter() as writer:
        for batch_seeds, images in host_batches(images_iter):
            if keep:
                kept.append(images)
            else:
                for seed, image in zip(batch_seeds, images):
                    writer.submit(save_png, image_path(outdir, seed, subdirs), image)
            images_bar.update(min(len(batch_seeds) * world_size, num_seeds - images_bar.n))
    return kept


def in_seed_order(per_rank):
    """One list of batches from every rank's list (rank r sampled batches r, r + W, ...: generation's sharding)."""
    return [batch for batches in itertools.zip_longest(*per_rank) for batch in batches if batch is not None]


def write_single_files(outdir, grid, grid_batches, npz, npz_parts, group):
    """grid.png (`grid`) and/or the `npz` file, from every rank's share gathered on rank 0 (through `group`)."""
    gathered = dist.gather_to_rank0((grid_batches, npz_parts or []), group)
    if gathered is None:
        return
    if grid:
        save_png(os.path.join(outdir, 'grid.png'), make_grid(np.concatenate(in_seed_order([g for g, _ in gathered]))))
    if npz:
        save_npz(npz, in_seed_order([parts for _, parts in gathered]))


def _png_batches(batches, npz_parts=None):
    """(seeds, uint8 images) as EDM writes PNGs; with `npz_parts`, also collect openai's quantisation and labels."""
    for batch_seeds, images, labels in batches:
        if npz_parts is not None:
            npz_parts.append((samplers_karras.to_uint8_openai(images).cpu().numpy(),
                              None if labels is None else labels.cpu().numpy()))
        yield batch_seeds, samplers.to_uint8(images)


def save_npz(path, parts):
    """openai's sample file: arr_0 uint8 N,H,W,C ((x + 1) 127.5, clamped, truncated), arr_1 int64 labels."""
    arrays = [np.concatenate([images for images, _ in parts])]
    if parts[0][1] is not None:
        arrays.append(np.concatenate([labels for _, labels in parts]).astype(np.int64))
    with dnnlib.util.atomic_write(path, 'wb') as f:
        np.savez(f, *arrays)
    dist.print0(f'Wrote {len(arrays[0])} images to "{path}"')

# ----------------------------------------------------------------------------------------------------------
# Command line.


def set_fp16(net, fp16):
    if fp16 and not hasattr(net, 'use_fp16'):
        raise dnnlib.UserError('--fp16: this network has no float16 mode')
    if fp16:
        net.use_fp16 = True


@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--network', 'network', help='Network: official pickle, snapshot or model.safetensors folder; path, URL or hf://OWNER/REPO[/FILE]', metavar='PATH|URL', type=str, required=True)
@click.option('--outdir', help='Where to save the images', metavar='DIR', type=str, required=True)
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', type=str, default='0-63', show_default=True)
@click.option('--subdirs', help='Create a subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx', help='Class label  [default: random per seed]', metavar='INT', type=int, default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--sampler', help='Sampler  [default: the snapshot\'s few-step sampler (consistency for ECM nets, trigflow for sCM, meanflow for MeanFlow), onestep for openai CMs, heun otherwise]', type=click.Choice([*samplers.FEW_STEP, *samplers_karras.SAMPLERS]), default=None)
@click.option('--steps', 'num_steps', help='Consistency steps, Heun steps N (NFE 2N-1), or openai\'s steps  [default: 2 / 18 / 40]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--ts', help='multistep: levels of the --steps grid, e.g. 0,22,39  [default: 0,22,39]', metavar='INT,INT[,...]', type=str, default=None)
@click.option('--clip_denoised', help='openai samplers: clamp denoised outputs to [-1, 1]  [default: true]', metavar='BOOL', type=bool, default=None)
@click.option('--mid_t', '--mid-t', 'mid_t', help='Intermediate times of a few-step sampler, in its time variable (σ; TrigFlow radians; MeanFlow t) (repeat or comma list)', metavar='FLOAT[,FLOAT]', multiple=True)
@click.option('--t-max', '--t_max', 't_max', help='Initial time of a few-step sampler  [default: 80; TrigFlow arctan(80/σd); MeanFlow 1]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--sigma_min', help='Heun: lowest noise level  [default: 0.002]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--sigma_max', help='Heun: highest noise level  [default: 80]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--rho', help='Heun: time step exponent  [default: 7]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)
@click.option('--S_churn', '--s_churn', 'S_churn', help='Heun: stochasticity strength  [default: 0]', metavar='FLOAT', type=click.FloatRange(min=0), default=None)
@click.option('--S_min', '--s_tmin', 'S_min', help='Heun: stochastic min noise level  [default: 0]', metavar='FLOAT', type=click.FloatRange(min=0), default=None)
@click.option('--S_max', '--s_tmax', 'S_max', help='Heun: stochastic max noise level  [default: inf]', metavar='FLOAT', type=click.FloatRange(min=0), default=None)
@click.option('--S_noise', '--s_noise', 'S_noise', help='Heun: stochastic noise inflation  [default: 1]', metavar='FLOAT', type=float, default=None)
@click.option('--npz', help='Also write the batch as openai\'s evaluator reads it (arr_0 uint8 NHWC, arr_1 labels)', metavar='FILE', type=str, default=None)
@state_dict_options
@click.option('--fp16', help='Run the network in float16 (CUDA only)', is_flag=True)
@click.option('--compile', 'compile_net', help=COMPILE_HELP, is_flag=True)
@click.option('--grid', help='Write one grid image (grid.png) instead of a PNG per seed', is_flag=True)
@click.option('--allow-unsafe-pickle', help='Allow legacy pickles that execute embedded code', is_flag=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@progress.no_progress_option
def cli(network, outdir, seeds, subdirs, class_idx, max_batch_size, sampler, num_steps, mid_t, t_max, ts, clip_denoised,
        npz, resolution, parameterization, num_head_channels, fp16, compile_net, grid, allow_unsafe_pickle, device,
        no_progress, **heun_opts):
    """Generate images with a consistency or diffusion model; one PNG per seed, or one grid."""
    with user_errors(os_errors=True):
        dist.init()
        seeds = parse_int_list(seeds)
        device = dist.resolve_device(device)
        mid_t = parse_float_list(mid_t, '--mid_t')
        ts = parse_int_list(ts, '--ts') if ts is not None else None
        check_outdir(outdir)
        if npz:
            dnnlib.util.check_output_file(npz, '--npz')
        net, metadata = load_network(network, allow_unsafe_pickle, resolution=resolution,
                                     parameterization=parameterization, num_head_channels=num_head_channels)
        check_class_idx(net, class_idx)
        set_fp16(net, fp16)
        heun_kwargs = {k: v for k, v in heun_opts.items() if v is not None}
        sampler, sampler_kwargs = samplers.resolve_sampler(net, sampler, num_steps, mid_t, t_max, metadata, ts,
                                                           clip_denoised, **heun_kwargs)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    group = dist.host_group()   # every rank samples its share; the shares of one file meet on rank 0 in host memory
    dist.print0(f'Generating {len(seeds)} images with the {sampler} sampler {sampler_kwargs} to "{outdir}"...')
    net = compile_network(net.to(device), compile_net)
    batches = generate_batches(net, seeds, class_idx, sampler, sampler_kwargs, max_batch_size, device, rank, world_size)
    npz_parts = [] if npz else None
    with user_errors(os_errors=True), progress.disabled_if(no_progress):
        grid_batches = write_images(_png_batches(batches, npz_parts), outdir, subdirs, grid, len(seeds), world_size)
        if grid or npz:
            write_single_files(outdir, grid, grid_batches, npz, npz_parts, group)
    dist.barrier(group)
    dist.print0('Done.')


def main(args=None):
    """Entry point; click's own usage errors and ours both exit with code 2."""
    cli.main(args=args, prog_name='generate.py')


if __name__ == '__main__':
    main()
