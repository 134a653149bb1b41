"""Convert an image dataset into EDM's format (docs/ECT.md §8): a folder or uncompressed zip of PNGs.

    python dataset_tool.py --source=PATH --dest=PATH [--max-images=N] [--resolution=WxH]
                           [--transform=center-crop|center-crop-wide|center-crop-dhariwal]

Sources:
  - the CIFAR-10 python tarball (cifar-10-python.tar.gz, or any .tar/.tar.gz/.tgz holding
    cifar-10-batches-py/data_batch_1..5): the 50,000 training images with their class labels. The batches are
    Python-2 pickles; they are read with an unpickler that only rebuilds dicts, lists, strings, numbers and
    numpy arrays and refuses anything else.
  - a folder of images, searched recursively: every file with an image extension known to PIL, in sorted()
    order of the full paths (compared as pathlib paths, as EDM does).
  - a zip of images: the same rules applied to the member names (sorted as strings).
  - procedural:shapes: a synthetic image set that needs no download (the quickstart's data): image `idx` is a
    smooth two-colour gradient background with one or two anti-aliased coloured discs or squares, drawn from a
    random generator seeded with `idx` alone, so every image is identical on every machine. 50,000 images
    (--max-images keeps the first N), rendered at --resolution (default 16x16; square); label = the kind of the
    first shape (0 disc, 1 square).
  For folders and zips the labels come from `dataset.json` in the source when it is there
  ({"labels": [[relative name, label], ...]}), otherwise from the top-level folder names: each image gets the
  index of its top-level folder in the sorted set of those names ('' for files at the root), provided there is
  more than one such name. ImageNet (ILSVRC) laid out as one folder per synset (n01440764/..., n01443537/...)
  therefore gets label = index of the synset folder in sorted order, which is the usual class index.

Destination: a folder or a .zip (ZIP_STORED). Image number `idx` (its position in the source order, counted
before --max-images truncation and before center-crop-wide skips) is stored as
`{idx//1000:05d}/img{idx:08d}.png`, and `dataset.json` holds {"labels": [[name, label], ...]} or
{"labels": null} when any image lacks a label. The destination must not exist (an empty folder is accepted);
everything is written under a temporary name next to it and renamed at the end, so a failed run leaves
nothing under the destination name.

Transforms (docs/ECT.md §8; EDM's and ADM's conventions, reproduced exactly):
  - none: resize to --resolution with LANCZOS when given;
  - center-crop: centred square of side min(H, W), then LANCZOS to the resolution (grey images become RGB);
  - center-crop-wide: centred band of height round(W_out*H/W), LANCZOS to W_out x H_out, pasted centred on a
    black W_out x W_out canvas; images narrower or flatter than the output are skipped;
  - center-crop-dhariwal: ADM / EDM2 ImageNet preprocessing (BOX halvings, BICUBIC resize, centred crop).

Errors in the input (missing source, existing destination, bad --resolution, a tarball that is not CIFAR-10,
unreadable or truncated images, images of different shapes without --resolution) give one line on stderr
naming the file or flag, and exit code 2.

The sources live in training/data/dataset_sources.py, the transforms and the writer in training/data/dataset_convert.py.
"""

import click

from torch_utils import progress
from training.cli_common import user_errors
from training.data.dataset_convert import TRANSFORMS, convert_dataset


@click.command()
@click.option('--source', help='CIFAR-10 tarball, image folder or zip, or procedural:shapes', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output folder or .zip', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Keep only the first N images', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--resolution', help='Output resolution, e.g. 32x32', metavar='WxH', type=str, default=None)
@click.option('--transform', help='Crop before resizing', type=click.Choice(TRANSFORMS), default=None)
@progress.no_progress_option
def main(source, dest, max_images, resolution, transform, no_progress):
    """Convert an image dataset into EDM's format (see the module docstring)."""
    with user_errors(os_errors=True), progress.disabled_if(no_progress):
        click.echo(convert_dataset(source, dest, max_images, resolution, transform))


if __name__ == '__main__':
    main()
