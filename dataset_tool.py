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
"""

import collections.abc
import contextlib
import io
import json
import os
import pathlib
import pickle
import re
import shutil
import tarfile
import tempfile
import zipfile

import click
import numpy as np
import PIL.Image

import dnnlib
from torch_utils import progress

TRANSFORMS = ('center-crop', 'center-crop-wide', 'center-crop-dhariwal')
CIFAR10_BATCHES = tuple(f'cifar-10-batches-py/data_batch_{batch}' for batch in range(1, 6))
GREY_MODES = ('L', '1')
RGB_MODES = ('RGB', 'P', 'CMYK', 'YCbCr')
TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
PROCEDURAL_PREFIX = 'procedural:'
PIL_ERRORS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)  # What PIL raises on bad files.

#----------------------------------------------------------------------------
# Small helpers.


def archive_name(idx):
    """EDM's member name for image number `idx`."""
    return f'{idx // 1000:05d}/img{idx:08d}.png'


def is_image_name(name):
    PIL.Image.init()
    return os.path.splitext(str(name))[1].lower() in PIL.Image.EXTENSION


def parse_resolution(text):
    """'WxH' -> (W, H); None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', text)
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise dnnlib.UserError(f'--resolution: expected WxH with positive integers such as 64x64, got "{text}"')
    return int(match.group(1)), int(match.group(2))


def is_power_of_two(n):
    return n >= 1 and (n & (n - 1)) == 0


def mode_channels(mode, name):
    """Channels an image of PIL `mode` decodes to (1 grey, 3 colour); anything else is refused."""
    if mode in GREY_MODES:
        return 1
    if mode in RGB_MODES:
        return 3
    raise dnnlib.UserError(f'{name}: image mode {mode} is not supported (need RGB or grayscale, without alpha)')


def decode_image(data, name, force_rgb):
    """Encoded image bytes -> uint8 array HxW (grey) or HxWx3; unreadable or truncated files raise UserError."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img.load()
            channels = mode_channels(img.mode, name)
            return np.array(img.convert('RGB' if force_rgb or channels == 3 else 'L'))
    except PIL_ERRORS as e:
        raise dnnlib.UserError(f'{name}: cannot read image ({e})') from None


def image_header(data_file, name):
    """(width, height, channels) from an image's header, without decoding its pixels."""
    try:
        with PIL.Image.open(data_file) as img:
            return img.size[0], img.size[1], mode_channels(img.mode, name)
    except PIL_ERRORS as e:
        raise dnnlib.UserError(f'{name}: cannot read image ({e})') from None

#----------------------------------------------------------------------------
# Sources. Each has `names` (one per image, for messages), `labels` (int or None per image),
# `read(i)` -> uint8 HxW or HxWx3 array, and `header(i)` -> (width, height, channels).


def _latin1_encode(text, encoding='latin1'):
    """`_codecs.encode` as protocol-2 pickles use it to store bytes, restricted to text -> bytes."""
    if not isinstance(text, str) or encoding != 'latin1':
        raise pickle.UnpicklingError('unexpected arguments to _codecs.encode')
    return text.encode(encoding)


class _CifarUnpickler(pickle.Unpickler):
    """Rebuilds only plain containers and numpy arrays; the CIFAR-10 batches need nothing else."""

    ALLOWED = {  # np.zeros(0).__reduce__()[0] is numpy's _reconstruct, wherever this numpy version keeps it.
        ('numpy', 'ndarray'): np.ndarray,
        ('numpy', 'dtype'): np.dtype,
        ('numpy.core.multiarray', '_reconstruct'): np.zeros(0).__reduce__()[0],
        ('numpy._core.multiarray', '_reconstruct'): np.zeros(0).__reduce__()[0],
        ('_codecs', 'encode'): _latin1_encode,
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
        return self.ALLOWED[(module, name)]


def _plain_keys(batch):
    return {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _load_cifar_batch(tar, member, source):
    where = f'{source}: {member}'
    try:
        with tar.extractfile(tar.getmember(member)) as f:
            batch = _CifarUnpickler(f, encoding='latin1').load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, OSError, tarfile.TarError) as e:
        raise dnnlib.UserError(f'{where}: not a CIFAR-10 batch ({e})') from None
    batch = _plain_keys(batch) if isinstance(batch, dict) else {}
    data, labels = batch.get('data'), batch.get('labels')
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise dnnlib.UserError(f'{where}: not a CIFAR-10 batch (expected "data" uint8 [N, 3072])')
    labels = np.asarray(labels if isinstance(labels, (list, np.ndarray)) else [])
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in 'iu' or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise dnnlib.UserError(f'{where}: not a CIFAR-10 batch (expected "labels", one class 0..9 per image)')
    return data, labels


class CifarSource:
    """The five training batches of the CIFAR-10 python tarball, CHW rows turned into HWC images."""

    def __init__(self, path):
        try:
            with tarfile.open(path, 'r:*') as tar:
                names = set(tar.getnames())
                missing = [m for m in CIFAR10_BATCHES if m not in names]
                if missing:
                    raise dnnlib.UserError(f'{path}: not the CIFAR-10 python tarball (no member {missing[0]})')
                batches = [_load_cifar_batch(tar, member, path) for member in CIFAR10_BATCHES]
        except (tarfile.TarError, OSError, EOFError) as e:
            raise dnnlib.UserError(f'{path}: cannot read tarball ({e})') from None
        self.images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.labels = [int(label) for _, labels in batches for label in labels]
        self.names = [f'{path}[{i}]' for i in range(len(self.labels))]

    def read(self, i):
        return self.images[i]

    def header(self, i):
        return self.images.shape[2], self.images.shape[1], self.images.shape[3]


def _parse_labels_json(data, where):
    """dataset.json contents -> {relative name: label}, or None when it says "labels": null."""
    try:
        labels = json.loads(data)['labels']
        return None if labels is None else {str(name): label for name, label in labels}
    except (ValueError, KeyError, TypeError) as e:
        raise dnnlib.UserError(f'{where}: not a valid dataset.json ({type(e).__name__}: {e})') from None


def _toplevel_labels(rel_names):
    """EDM's rule: index of the top-level folder in the sorted set of them, when there are several."""
    toplevel = {name: name.split('/')[0] if '/' in name else '' for name in rel_names}
    classes = {folder: idx for idx, folder in enumerate(sorted(set(toplevel.values())))}
    if len(classes) <= 1:
        return {}
    return {name: classes[folder] for name, folder in toplevel.items()}


class ImageFilesSource:
    """Images in a folder or a zip: `rel_names` in source order, `open_member(rel)` opens one for reading."""

    def __init__(self, root, rel_names, open_member, labels_json, force_rgb):
        self.root = root                    # The folder or zip, for messages.
        self.rel_names = rel_names          # Image names relative to the root, '/'-separated, in source order.
        self.open_member = open_member      # rel -> binary file object.
        self.force_rgb = force_rgb          # Decode grey images as RGB (the crop transforms want RGB).
        self.names = [os.path.join(root, rel) for rel in rel_names]
        meta_name = os.path.join(root, 'dataset.json')
        labels = _parse_labels_json(labels_json, meta_name) if labels_json is not None else None
        labels = labels or _toplevel_labels(rel_names)
        self.labels = [labels.get(rel) for rel in rel_names]
        unlabelled = [rel for rel, label in zip(rel_names, self.labels) if labels and not isinstance(label, int)]
        if unlabelled:
            raise dnnlib.UserError(f'{meta_name}: no integer label for "{unlabelled[0]}"')

    def _member(self, i):
        try:
            return self.open_member(self.rel_names[i])
        except (OSError, zipfile.BadZipFile) as e:
            raise dnnlib.UserError(f'{self.names[i]}: cannot open ({e})') from None

    def read(self, i):
        with self._member(i) as f:
            try:
                data = f.read()
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise dnnlib.UserError(f'{self.names[i]}: cannot read ({e})') from None
        return decode_image(data, self.names[i], self.force_rgb)

    def header(self, i):
        with self._member(i) as f:
            return image_header(f, self.names[i])


class _LazyList(collections.abc.Sequence):
    """A read-only list whose item i is fn(i), computed when asked for (labels of the images actually written)."""

    def __init__(self, length, fn):
        self.length = length    # Number of items.
        self.fn = fn            # i -> item.

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.fn(i)


class ShapesSource:
    """procedural:shapes -- image `idx` drawn from its own seeded generator (see the module docstring)."""

    num_images = 50000
    supersample = 4     # Sub-pixels per pixel and axis (anti-aliased shape edges).

    def __init__(self, resolution):
        self.resolution = resolution        # Output width = height in pixels.
        self.names = [f'procedural:shapes[{i}]' for i in range(self.num_images)]
        self.labels = _LazyList(self.num_images, lambda i: int(self._kinds(self._rng(i))[0]))

    @staticmethod
    def _rng(idx):
        return np.random.Generator(np.random.PCG64([0x5ec7, idx]))

    @staticmethod
    def _kinds(rng):
        """The kinds (0 disc, 1 square) of the one or two shapes; drawn first so labels are cheap."""
        return rng.integers(0, 2, size=rng.integers(1, 3))

    def read(self, i):
        rng = self._rng(i)
        kinds = self._kinds(rng)
        n = self.resolution * self.supersample
        y, x = (np.mgrid[0:n, 0:n] + 0.5) / n                      # Sub-pixel centres in [0, 1].
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) / np.sqrt(2) + 0.5
        top, bottom = rng.uniform(0.1, 0.9, size=[2, 3])
        img = top + (bottom - top) * ramp[..., np.newaxis]
        for kind in kinds:
            cx, cy = rng.uniform(0.25, 0.75, size=2)
            size = rng.uniform(0.12, 0.25)
            colour = rng.uniform(0, 1, size=3)
            colour[rng.integers(0, 3)] = rng.choice([0.0, 1.0])   # One saturated channel: vivid colours.
            inside = np.hypot(x - cx, y - cy) <= size if kind == 0 else np.maximum(abs(x - cx), abs(y - cy)) <= size
            img[inside] = colour
        img = img.reshape(self.resolution, self.supersample, self.resolution, self.supersample, 3).mean(axis=(1, 3))
        return np.rint(img * 255).clip(0, 255).astype(np.uint8)

    def header(self, i):
        return self.resolution, self.resolution, 3


PROCEDURAL_SOURCES = {'shapes': ShapesSource}


def open_procedural(spec, resolution):
    """`procedural:NAME` at `resolution` ((W, H) or None = 16x16)."""
    name = spec[len(PROCEDURAL_PREFIX):]
    if name not in PROCEDURAL_SOURCES:
        raise dnnlib.UserError(f'--source: unknown procedural source "{spec}" (known: '
                               f'{", ".join(PROCEDURAL_PREFIX + k for k in PROCEDURAL_SOURCES)})')
    width, height = resolution if resolution is not None else (16, 16)
    check_output_shape(width, height, 3, '--resolution')
    return PROCEDURAL_SOURCES[name](width)


def open_folder(path, force_rgb):
    paths = sorted(p for p in pathlib.Path(path).rglob('*') if is_image_name(p) and p.is_file())
    rel_names = [p.relative_to(path).as_posix() for p in paths]
    meta = os.path.join(path, 'dataset.json')
    labels_json = pathlib.Path(meta).read_bytes() if os.path.isfile(meta) else None
    return ImageFilesSource(path, rel_names, lambda rel: open(os.path.join(path, rel), 'rb'), labels_json, force_rgb)


def open_zip(path, stack, force_rgb):
    try:
        zf = stack.enter_context(zipfile.ZipFile(path))
        members = set(zf.namelist())
        labels_json = zf.read('dataset.json') if 'dataset.json' in members else None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise dnnlib.UserError(f'{path}: cannot read zip ({e})') from None
    rel_names = sorted(name for name in members if is_image_name(name))
    return ImageFilesSource(path, rel_names, zf.open, labels_json, force_rgb)


def open_source(path, stack, force_rgb, resolution=None):
    """Pick the reader from what `path` is; zips are closed by `stack`. CIFAR-10 is RGB anyway."""
    if path.startswith(PROCEDURAL_PREFIX):
        return open_procedural(path, resolution)
    if os.path.isdir(path):
        return open_folder(path, force_rgb)
    if not os.path.isfile(path):
        raise dnnlib.UserError(f'--source: no such file or folder: {path}')
    if path.lower().endswith(TAR_SUFFIXES):
        return CifarSource(path)
    if path.lower().endswith('.zip'):
        return open_zip(path, stack, force_rgb)
    raise dnnlib.UserError(f'--source: {path} is not a folder, a .zip or the CIFAR-10 .tar.gz')

#----------------------------------------------------------------------------
# Transforms (docs/ECT.md §8). Each maps uint8 HxW or HxWx3 to the output image, or None to skip it.


def resize(img, width, height, resample):
    return np.array(PIL.Image.fromarray(img).resize((width, height), resample))


def transform_scale(img, width, height):
    """EDM default: LANCZOS resize to the requested size, when one is given and differs."""
    if width is None or (img.shape[1], img.shape[0]) == (width, height):
        return img
    return resize(img, width, height, PIL.Image.Resampling.LANCZOS)


def as_rgb(img):
    return img if img.ndim == 3 else np.repeat(img[:, :, np.newaxis], 3, axis=2)


def transform_center_crop(img, width, height):
    """EDM center-crop (docs/ECT.md §8): centred min(H, W) square, grey replicated to RGB, LANCZOS resize."""
    s = min(img.shape[:2])
    top, left = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
    return resize(as_rgb(img[top:top + s, left:left + s]), width, height, PIL.Image.Resampling.LANCZOS)


def transform_center_crop_wide(img, width, height):
    """EDM center-crop-wide (docs/ECT.md §8): centred band of height round(W_out*H/W), LANCZOS, on a black square."""
    band = int(np.round(width * img.shape[0] / img.shape[1]))
    if img.shape[1] < width or band < height:
        return None
    top = (img.shape[0] - band) // 2
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2:(width + height) // 2] = resize(as_rgb(img[top:top + band]), width, height, PIL.Image.Resampling.LANCZOS)
    return canvas


def transform_center_crop_dhariwal(img, width, height):
    """ADM / EDM2 ImageNet preprocessing (docs/ECT.md §8): BOX halvings, BICUBIC to short side = res, centred crop."""
    res = width
    pil = PIL.Image.fromarray(as_rgb(img))
    while min(pil.size) >= 2 * res:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=PIL.Image.Resampling.BOX)
    scale = res / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=PIL.Image.Resampling.BICUBIC)
    arr = np.array(pil)
    top, left = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return arr[top:top + res, left:left + res]


TRANSFORM_FNS = {
    None: transform_scale,
    'center-crop': transform_center_crop,
    'center-crop-wide': transform_center_crop_wide,
    'center-crop-dhariwal': transform_center_crop_dhariwal,
}

#----------------------------------------------------------------------------
# Up-front checks.


def check_output_shape(width, height, channels, what, hint=''):
    if width != height:
        raise dnnlib.UserError(f'{what}: images must be square after scale and crop, got {width}x{height}{hint}')
    if not is_power_of_two(width):
        raise dnnlib.UserError(f'{what}: image width/height must be a power of two, got {width}{hint}')
    if channels not in (1, 3):
        raise dnnlib.UserError(f'{what}: images must be RGB or grayscale, got {channels} channels')


def check_transform_args(transform, resolution):
    if transform is None:
        if resolution is not None:
            check_output_shape(*resolution, 3, '--resolution')
        return
    if resolution is None:
        raise dnnlib.UserError(f'--resolution: must be given (WxH) with --transform={transform}')
    width, height = resolution
    if transform == 'center-crop-wide':
        check_output_shape(width, width, 3, '--resolution')
        if height > width:
            raise dnnlib.UserError(f'--resolution: height must not exceed width with --transform={transform}')
    else:
        check_output_shape(width, height, 3, '--resolution')


def check_headers(source, count, resolution):
    """Without a transform, every image must decode to the same channels (and size, without --resolution)."""
    first = None
    for i in range(count):
        width, height, channels = source.header(i)
        current = (channels,) if resolution is not None else (width, height, channels)
        hint = '' if resolution is not None else ' (give --resolution=WxH, and --transform to crop)'
        if first is None:
            first = current
            if resolution is None:
                check_output_shape(width, height, channels, source.names[i], hint)
        elif current != first:
            raise dnnlib.UserError(f'{source.names[i]}: {width}x{height} with {channels} channels differs from the first image{hint}')


def check_dest(dest):
    if not dest.strip():
        raise dnnlib.UserError('--dest: must not be empty')
    if os.path.isdir(dest) and not os.listdir(dest) and not dest.lower().endswith('.zip'):
        return
    if os.path.lexists(dest):
        raise dnnlib.UserError(f'--dest: {dest} already exists; choose a new name or remove it')
    parent = os.path.dirname(os.path.abspath(dest))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise dnnlib.UserError(f'--dest: {parent} is not a folder')

#----------------------------------------------------------------------------
# Output.


@contextlib.contextmanager
def open_dest(dest):
    """Yield write(name, bytes) into a temporary zip/folder next to `dest`; renamed to `dest` only on success."""
    if dest.lower().endswith('.zip'):
        with dnnlib.util.atomic_write(dest, 'wb') as f, zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as zf:
            yield zf.writestr
        os.chmod(dest, 0o666 & ~current_umask())
        return
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix='.' + os.path.basename(os.path.abspath(dest)) + '.', suffix='.tmp')
    try:
        yield lambda name, data: _write_member(tmp, name, data)
        os.chmod(tmp, 0o777 & ~current_umask())
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask():
    """The process umask (temporary files are created private; finished outputs get the usual permissions)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_member(root, name, data):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data.encode('utf-8') if isinstance(data, str) else data)


def encode_png(img):
    """EDM's PNG: PIL, RGB or L, compress_level 0."""
    buf = io.BytesIO()
    PIL.Image.fromarray(img, 'L' if img.ndim == 2 else 'RGB').save(buf, format='png', compress_level=0, optimize=False)
    return buf.getvalue()


def convert(source, dest, count, transform, resolution):
    """Transform and write the first `count` images; returns (written, width, channels, num_classes)."""
    width, height = resolution if resolution is not None else (None, None)
    transform_fn = TRANSFORM_FNS[transform]
    labels, shape = [], None
    with progress.bar(total=count, desc='images', unit='img') as images_bar, open_dest(dest) as write:
        for idx in range(count):
            img = transform_fn(source.read(idx), width, height)
            images_bar.update(1)
            if img is None:
                continue
            if shape is None:
                shape = img.shape
                check_output_shape(img.shape[1], img.shape[0], 1 if img.ndim == 2 else img.shape[2], source.names[idx])
            elif img.shape != shape:
                raise dnnlib.UserError(f'{source.names[idx]}: gives a {img.shape} image, the first gave {shape}')
            write(archive_name(idx), encode_png(img))
            labels.append(None if source.labels[idx] is None else [archive_name(idx), source.labels[idx]])
        if shape is None:
            raise dnnlib.UserError(f'--source: no image is large enough for --transform={transform} at {width}x{height}')
        labelled = all(label is not None for label in labels)
        write('dataset.json', json.dumps({'labels': labels if labelled else None}))
    num_classes = max(label for _, label in labels) + 1 if labelled else 0
    return len(labels), shape[1], 1 if len(shape) == 2 else shape[2], num_classes


def run(source_path, dest, max_images, resolution_text, transform):
    """Validate everything that can be checked up front, then convert."""
    resolution = parse_resolution(resolution_text)
    check_transform_args(transform, resolution)
    check_dest(dest)
    with contextlib.ExitStack() as stack:
        source = open_source(source_path, stack, force_rgb=transform is not None, resolution=resolution)
        count = len(source.names) if max_images is None else min(max_images, len(source.names))
        if count == 0:
            raise dnnlib.UserError(f'--source: no images found in {source_path}')
        if transform is None:
            check_headers(source, count, resolution)
        written, res, channels, num_classes = convert(source, dest, count, transform, resolution)
    classes = f'{num_classes} classes' if num_classes else 'no labels'
    click.echo(f'{dest}: {written} images, {res}x{res}, {channels} channel{"s" * (channels > 1)}, {classes}')


class CliError(click.ClickException):
    """A user mistake: one line on stderr, exit code 2."""
    exit_code = 2


@click.command()
@click.option('--source', help='CIFAR-10 tarball, image folder or zip, or procedural:shapes', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output folder or .zip', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Keep only the first N images', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--resolution', help='Output resolution, e.g. 32x32', metavar='WxH', type=str, default=None)
@click.option('--transform', help='Crop before resizing', type=click.Choice(TRANSFORMS), default=None)
@progress.no_progress_option
def main(source, dest, max_images, resolution, transform, no_progress):
    """Convert an image dataset into EDM's format (see the module docstring)."""
    try:
        with progress.disabled_if(no_progress):
            run(source, dest, max_images, resolution, transform)
    except dnnlib.UserError as e:
        raise CliError(str(e)) from None


if __name__ == '__main__':
    main()
