"""Zero-shot image editing with a consistency model: inpainting, colorization, super-resolution.

    python edit.py --task=inpaint  --network=cd_bedroom256_lpips.pt --images=photos/ --outdir=out
    python edit.py --task=colorize --network=ecm.pt --images=faces.zip --outdir=out --ts=0,12,24,39 --steps=40
    python edit.py --task=superres --network=ct_cat256.pt --images=cats/ --outdir=out --mask=...

Each image is degraded (grey; 8x8 patch averages; a hole painted black) and restored by Algorithm 4 of the
Consistency Models paper (training.sampling.editing): `--ts` indices of a `--steps`-point Karras grid, default
0,12,24,39 of 40 (3 network evaluations; openai's repository sets no default). Image i of the input (sorted by
file name) uses seed `--seed` + i, so results do not depend on `--batch`. Written: result/NNNNNN.png,
degraded/NNNNNN.png and grid.png (one row per image: input | degraded | result).
"""

import os

import click
import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import progress
from training.sampling import editing
from training.sampling import samplers
from training.sampling import samplers_karras
from training.cli_common import load_consistency_network, parse_int_list, state_dict_options, user_errors
from training.data.dataset import ImageFolderDataset
from training.sampling.generation import save_png

TASKS = ('inpaint', 'colorize', 'superres')

# ----------------------------------------------------------------------------------------------------------
# Inputs.


def open_images(path, net, class_idx):
    """The images (EDM ImageFolderDataset at the network's resolution) and how labels are chosen."""
    dataset = ImageFolderDataset(path=path, resolution=net.img_resolution)
    if net.label_dim and class_idx is None:
        if not dataset.has_labels:
            raise dnnlib.UserError('--class: the network is class-conditional; give --class or a dataset.json with '
                                   'labels next to the images')
        dataset = ImageFolderDataset(path=path, resolution=net.img_resolution, use_labels=True)
    if class_idx is not None and not 0 <= class_idx < max(net.label_dim, 1):
        raise dnnlib.UserError(f'--class={class_idx}: the network has {net.label_dim} classes')
    return dataset


def load_batch(dataset, indices, net, class_idx, device):
    """(images float64 N,3,H,W in [-1, 1], one-hot labels or None) of `indices`."""
    images, labels = zip(*(dataset[i] for i in indices))
    images = torch.from_numpy(np.stack(images)).to(device, torch.float64) / 127.5 - 1
    images = images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images[:, :3]
    if not net.label_dim:
        return images, None
    if class_idx is not None:
        return images, torch.eye(net.label_dim, device=device)[[class_idx] * len(indices)]
    return images, torch.from_numpy(np.stack(labels)).to(device)


def base_mask(mask, resolution, letter, font):
    """The inpainting mask (float32 3,R,R; 1 = kept) from --mask: 'letter' or a PNG (non-black = kept)."""
    if mask == 'letter':
        return editing.mask_from_image(editing.letter_image(resolution, letter, font), resolution)
    try:
        with PIL.Image.open(mask) as img:
            image = np.asarray(img.convert('RGB')).transpose(2, 0, 1)
    except (OSError, ValueError) as e:
        raise dnnlib.UserError(f'--mask={mask}: cannot read this image ({e})') from None
    return editing.mask_from_image(image, resolution)


def make_operator(task, mask, mask_groups, patch_size, device):
    """operator_for(indices) -> the task's operator for the images of those input indices."""
    if task == 'colorize':
        op = editing.Colorization()
        return lambda indices: op
    if task == 'superres':
        op = editing.SuperResolution(patch_size)
        return lambda indices: op
    return lambda indices: editing.Inpainting(editing.batch_masks(mask, indices, mask_groups).to(device))

# ----------------------------------------------------------------------------------------------------------
# The work.


def denoiser(net, labels):
    """The consistency function f(x, t) of any consistency network (ECM or openai), float64 out."""
    def denoise(x, t):
        sigma = torch.full([x.shape[0]], float(t), dtype=torch.float64, device=x.device)
        return net(x, sigma, labels).to(torch.float64)
    return denoise


def edit_batch(net, dataset, indices, operator_for, first_seed, class_idx, device, **schedule):
    """(input, degraded, result) uint8 N,H,W,C of the images `indices`."""
    images, labels = load_batch(dataset, indices, net, class_idx, device)
    rnd = samplers.StackedRandomGenerator(device, [first_seed + i for i in indices])
    latents = rnd.randn(images.shape)      # float32, as openai's determ-indiv generator
    with torch.no_grad():
        result, degraded = editing.iterative_edit(denoiser(net, labels), operator_for(indices), images, latents,
                                                  randn_like=rnd.randn_like, **schedule)
    return tuple(samplers.to_uint8(x).cpu().numpy() for x in (images, degraded, result))


def write_outputs(outdir, indices, triples, rows):
    for i, degraded, result in zip(indices, triples[1], triples[2]):
        save_png(os.path.join(outdir, 'degraded', f'{i:06d}.png'), degraded)
        save_png(os.path.join(outdir, 'result', f'{i:06d}.png'), result)
    rows.append(np.concatenate(triples, axis=2).reshape(-1, *triples[0].shape[2:]))  # rows of input|degraded|result


def run(net, dataset, operator_for, outdir, batch_size, first_seed, class_idx, device, **schedule):
    rows = []
    chunks = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    with progress.bar(total=len(dataset), desc='editing', unit='img') as bar:
        for indices in chunks:
            triples = edit_batch(net, dataset, indices, operator_for, first_seed, class_idx, device, **schedule)
            write_outputs(outdir, indices, triples, rows)
            bar.update(len(indices))
    h = net.img_resolution
    grid = np.concatenate(rows).reshape(len(dataset) * h, 3 * h, -1)
    save_png(os.path.join(outdir, 'grid.png'), grid)

# ----------------------------------------------------------------------------------------------------------
# Command line.


@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--task', help='Editing task', type=click.Choice(TASKS), required=True)
@click.option('--network', help='Consistency network: snapshot, pickle or openai cd_*/ct_*.pt', metavar='PATH|URL', required=True)
@click.option('--images', 'images_path', help="Images at the network's resolution (folder or zip, sorted by name)", metavar='DIR|ZIP', required=True)
@click.option('--outdir', help='Where to write result/, degraded/ and grid.png', metavar='DIR', required=True)
@click.option('--ts', help='Grid indices of the steps', metavar='LIST', default=','.join(map(str, editing.DEFAULT_TS)), show_default=True)
@click.option('--steps', help='Size of the Karras grid of --ts', metavar='INT', type=click.IntRange(min=2), default=editing.DEFAULT_STEPS, show_default=True)
@click.option('--sigma_min', 't_min', help='Lowest time of the grid', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True)
@click.option('--sigma_max', 't_max', help='Highest time of the grid', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=80.0, show_default=True)
@click.option('--rho', help='Grid exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7.0, show_default=True)
@click.option('--mask', help="inpaint: 'letter' (openai's letter mask) or a PNG, non-black = kept", metavar='letter|PNG', default='letter', show_default=True)
@click.option('--letter', help='inpaint: the letter of the letter mask', metavar='STR', default='S', show_default=True)
@click.option('--font', help='inpaint: TrueType font of the letter  [default: DejaVuSans, else Pillow\'s]', metavar='TTF', default=None)
@click.option('--mask-groups', 'mask_groups', help='inpaint: invert the mask for odd groups of N images (openai: 7); 0 = never  [default: 7 for the letter, 0 for a PNG]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--patch', 'patch_size', help='superres: down-sampling factor', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--seed', 'first_seed', help='Seed of the first image (image i uses seed + i)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--class', 'class_idx', help='Class label of every image  [default: dataset.json labels]', metavar='INT', type=int, default=None)
@click.option('--batch', 'batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@state_dict_options
@click.option('--allow-unsafe-pickle', help='Trust the network file (legacy pickles)', is_flag=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', default=None)
@progress.no_progress_option
def cli(task, network, images_path, outdir, ts, steps, t_min, t_max, rho, mask, letter, font, mask_groups, patch_size,
        first_seed, class_idx, batch_size, resolution, parameterization, num_head_channels, allow_unsafe_pickle, device,
        no_progress):
    """Inpaint, colorize or super-resolve images with a consistency model, zero-shot."""
    with user_errors():
        device = dist.resolve_device(device)
        if os.path.exists(outdir) and not os.path.isdir(outdir):
            raise dnnlib.UserError(f'--outdir={outdir}: exists and is not a directory')
        ts = parse_int_list(ts, '--ts')
        net, family = load_consistency_network(network, allow_unsafe_pickle, resolution=resolution,
                                               parameterization=parameterization, num_head_channels=num_head_channels)
        if family != 'consistency':
            raise dnnlib.UserError(f'--network={network}: a {family} network; zero-shot editing (Song et al. 2023, '
                                   f'Algorithm 4) runs on noise-level (σ) consistency models: ECM, CD/CT, TCM')
        dataset = open_images(images_path, net, class_idx)
        if task == 'superres' and net.img_resolution % patch_size:
            raise dnnlib.UserError(f'--patch={patch_size}: does not divide the resolution {net.img_resolution}')
        if mask_groups is None:
            mask_groups = 7 if mask == 'letter' else 0
        base = base_mask(mask, net.img_resolution, letter, font) if task == 'inpaint' else None
        schedule = dict(ts=ts, steps=steps, t_min=t_min, t_max=t_max, rho=rho)
        samplers_karras.check_ts(ts, steps)  # Before any work.
    dist.print0(f'Editing {len(dataset)} images ({task}, ts {ts} of {steps}) to "{outdir}"...')
    with progress.disabled_if(no_progress):
        operator_for = make_operator(task, base, mask_groups, patch_size, device)
        run(net.to(device), dataset, operator_for, outdir, batch_size, first_seed, class_idx, device, **schedule)
    dist.print0('Done.')


def main(args=None):
    cli.main(args=args, prog_name='edit.py')


if __name__ == '__main__':
    main()
