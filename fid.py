"""Fréchet Inception Distance: reference statistics, FID of a folder of images, FID of a network.

    python fid.py ref  --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    python fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz --num=50000
    python fid.py net  --network=network-snapshot.pt --ref=fid-refs/cifar10-32x32.npz --steps=2
    torchrun --nproc_per_node=8 fid.py net --network=... --num-images=50000 --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

`--kind=dinov2` computes FD_DINOv2 statistics instead (EDM2's protocol); `--detector` replaces the default
network of the kind by another file (URL or path): an NVIDIA detector .pkl or a state dict with the same tensor
names (loaded without running code), or DINOv2 weights; TorchScript needs --allow-unsafe-pickle. Under torchrun,
write `--num-images` for `--num`: torchrun's argument parser takes `--num` for its own `--numa-binding`.
"""

import click
import numpy as np
import torch

import dnnlib
from metrics import detectors
from metrics import metric_main
from metrics import metric_utils
from torch_utils import distributed as dist
from torch_utils import progress
from training.sampling import samplers
from training.sampling import samplers_karras
from training.cli_common import load_network, parse_float_list, parse_int_list, state_dict_options, user_errors
from training.compile import COMPILE_HELP, compile_network
from training.sampling.generation import generate_images

_KINDS = list(detectors.FEATURE_KINDS)

# ----------------------------------------------------------------------------------------------------------
# The work, without the command line.


def open_dataset(path, num=None, seed=0, flag='--data'):
    """EDM's ImageFolderDataset on `path`; with `num`, a seeded subset of exactly `num` images."""
    from training.data.dataset import ImageFolderDataset  # Deferred: keeps `fid.py --help` light.
    dataset = ImageFolderDataset(path=path, max_size=num, random_seed=seed)
    if num is not None and len(dataset) < num:
        raise dnnlib.UserError(f'{flag}={path}: found {len(dataset)} images, but --num={num} were requested')
    if len(dataset) < 2:
        raise dnnlib.UserError(f'{flag}={path}: need at least 2 images, found {len(dataset)}')
    return dataset


def dataset_stats(dataset, detector, batch_size, device, capture_all=False):
    """Float64 feature statistics of every image of `dataset`, shared over the ranks."""
    stats = metric_utils.FeatureStats(capture_all=capture_all)
    return metric_utils.compute_dataset_stats(dataset, detector, stats, batch_size, device,
                                              dist.get_rank(), dist.get_world_size())


def network_stats(net, detector, seeds, sampler, sampler_kwargs, batch_size, device):
    """Float64 feature statistics of the images `net` generates for `seeds`, in memory, over the ranks."""
    batches = generate_images(net, seeds, None, sampler, sampler_kwargs, batch_size, device, dist.get_rank(),
                              dist.get_world_size())
    return metric_utils.compute_generator_stats(batches, detector, metric_utils.FeatureStats(), device,
                                                num_images=len(seeds))


def fid_from_stats(stats, ref):
    mu, sigma = stats.get_mean_cov()
    return metric_utils.frechet_distance(mu, sigma, ref['mu'], ref['sigma'])


def check_dest(dest):
    if not dest.lower().endswith('.npz'):
        raise dnnlib.UserError(f'--dest={dest}: reference statistics are written as .npz')
    dnnlib.util.check_output_file(dest, '--dest')

# ----------------------------------------------------------------------------------------------------------
# Command line.


def _common_options(fn):
    options = [
        click.option('--kind', help='Feature network', type=click.Choice(_KINDS), default='inception', show_default=True),
        click.option('--detector', help='Feature network: NVIDIA .pkl, state dict or DINOv2 .pth  [default: official]', metavar='PATH|URL', type=str, default=None),
        click.option('--batch', 'batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True),
        click.option('--allow-unsafe-pickle', help='Trust the detector file: allow pickles that execute embedded code and TorchScript', is_flag=True),
        click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None),
        progress.no_progress_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _setup(kind, detector, allow_unsafe_pickle, device):
    dist.init()
    device = dist.resolve_device(device)
    return detectors.get_detector(kind, detector, allow_unsafe_pickle, device=device), device


@click.group(context_settings=dict(help_option_names=['-h', '--help']))
def cli():
    """Calculate Fréchet distances (FID, FD_DINOv2) and their reference statistics."""


@cli.command()
@click.option('--data', 'data_path', help='Dataset folder or zip', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Where to write the statistics (.npz)', metavar='NPZ', type=str, required=True)
@click.option('--features', 'save_features', help='Also store every feature vector (for KID, precision/recall)', is_flag=True)
@_common_options
def ref(data_path, dest, save_features, kind, detector, batch_size, allow_unsafe_pickle, device, no_progress):
    """Reference statistics (mu, sigma) of a dataset."""
    with user_errors():
        check_dest(dest)
        dataset = open_dataset(data_path)
        detector, device = _setup(kind, detector, allow_unsafe_pickle, device)
    dist.print0(f'Computing {kind} statistics of {len(dataset)} images of "{data_path}"...')
    with user_errors(os_errors=True), progress.disabled_if(no_progress):
        stats = dataset_stats(dataset, detector, batch_size, device, capture_all=save_features)
        if dist.get_rank() == 0:
            metric_utils.save_ref(dest, stats, detector=np.array(kind))
    dist.barrier()
    dist.print0(f'Saved "{dest}".')


@cli.command()
@click.option('--images', 'image_path', help='Folder or zip of generated images', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (.npz with mu, sigma)', metavar='NPZ|URL', type=str, required=True)
@click.option('--num', '--num-images', 'num_expected', help='Number of images to use', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed for choosing the images', metavar='INT', type=int, default=0, show_default=True)
@_common_options
def calc(image_path, ref_path, num_expected, seed, kind, detector, batch_size, allow_unsafe_pickle, device,
         no_progress):
    """FID (or FD) of a folder/zip of images against reference statistics."""
    with user_errors():
        ref_arrays = metric_utils.load_ref(ref_path, kind=kind)
        dataset = open_dataset(image_path, num_expected, seed, flag='--images')
        detector, device = _setup(kind, detector, allow_unsafe_pickle, device)
        metric_main.check_ref_width(ref_arrays, detector, dataset.image_shape, device)
    dist.print0(f'Computing {kind} statistics of {len(dataset)} images of "{image_path}"...')
    with user_errors(os_errors=True), progress.disabled_if(no_progress):
        stats = dataset_stats(dataset, detector, batch_size, device)
    dist.print0(f"{_distance(stats, ref_arrays):g}")


@cli.command()
@click.option('--network', 'network', help='Network: official pickle, snapshot or model.safetensors folder; path, URL or hf://OWNER/REPO[/FILE]', metavar='PATH|URL', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (.npz with mu, sigma; openai/ADM reference batches too)', metavar='NPZ|URL', type=str, required=True)
@click.option('--num', '--num-images', 'num_samples', help='Number of images to generate', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', 'first_seed', help='First seed (seeds seed .. seed+num-1)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--repeats', help='Seed sets: --seed + i·--num, i < INT (EDM\'s protocol: each FID, their mean and minimum)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--sampler', help='Sampler  [default: the snapshot\'s few-step sampler (consistency for ECM nets, trigflow for sCM, meanflow for MeanFlow), onestep for openai CMs, heun otherwise]', type=click.Choice([*samplers.FEW_STEP, *samplers_karras.SAMPLERS]), default=None)
@click.option('--steps', 'num_steps', help='Consistency steps (1, 2, ...), Heun steps, or openai\'s steps', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--mid_t', '--mid-t', 'mid_t', help='Intermediate times of a few-step sampler, in its time variable (σ; TrigFlow radians; MeanFlow t) (repeat or comma list)', metavar='FLOAT[,FLOAT]', multiple=True)
@click.option('--ts', help='multistep: levels of the --steps grid, e.g. 0,22,39', metavar='INT,INT[,...]', type=str, default=None)
@click.option('--compile', 'compile_net', help=COMPILE_HELP, is_flag=True)
@state_dict_options
@_common_options
def net(network, ref_path, num_samples, first_seed, repeats, sampler, num_steps, mid_t, ts, compile_net, resolution,
        parameterization, num_head_channels, kind, detector, batch_size, allow_unsafe_pickle, device, no_progress):
    """FID (or FD) of a network, sampling in memory (no PNGs written)."""
    with user_errors():
        ref_arrays = metric_utils.load_ref(ref_path, kind=kind)
        mid_t = parse_float_list(mid_t, '--mid_t')
        ts = parse_int_list(ts, '--ts') if ts is not None else None
        model, metadata = load_network(network, allow_unsafe_pickle, resolution=resolution,
                                       parameterization=parameterization, num_head_channels=num_head_channels)
        sampler, sampler_kwargs = samplers.resolve_sampler(model, sampler, num_steps, mid_t, None, metadata, ts)
        detector, device = _setup(kind, detector, allow_unsafe_pickle, device)
        metric_main.check_ref_width(ref_arrays, detector, [model.img_channels, model.img_resolution, model.img_resolution], device)
    dist.print0(f'Generating {num_samples} images per seed set with the {sampler} sampler {sampler_kwargs}...')
    values = []
    with torch.no_grad(), progress.disabled_if(no_progress):
        model = compile_network(model.to(device), compile_net)
        for index in range(repeats):
            seeds = metric_main.seed_set(num_samples, index, first_seed)
            stats = network_stats(model, detector, seeds, sampler, sampler_kwargs, batch_size, device)
            values.append(_distance(stats, ref_arrays))
            dist.print0(f'seeds {seeds[0]}-{seeds[-1]}: {values[-1]:g}' if repeats > 1 else f'{values[-1]:g}')
    if repeats > 1:
        summary = metric_main.summarise_repeats([dict(fid=v) for v in values])
        dist.print0(f'mean {summary["fid_mean"]:g} min {summary["fid_min"]:g} over {repeats} seed sets')


def _distance(stats, ref_arrays):
    with user_errors():
        return fid_from_stats(stats, ref_arrays)


def main(args=None):
    """Entry point; usage errors and user mistakes both exit with code 2."""
    cli.main(args=args, prog_name='fid.py')


if __name__ == '__main__':
    main()
