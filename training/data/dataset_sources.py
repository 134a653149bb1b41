"""The image sources dataset_tool.py converts into EDM's format (docs/ECT.md §8): the CIFAR-10 python tarball,
folders and zips of images, and the procedural `procedural:shapes` set (see dataset_tool.py for the rules)."""

import collections.abc
import io
import json
import os
import pathlib
import pickle
import tarfile
import zipfile

import numpy as np
import PIL.Image

import dnnlib
from training.checkpoints import safe_pickle
from training.data.dataset import MAX_CLASSES

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


def check_output_shape(width, height, channels, what, hint=''):
    if width != height:
        raise dnnlib.UserError(f'{what}: images must be square after scale and crop, got {width}x{height}{hint}')
    if not is_power_of_two(width):
        raise dnnlib.UserError(f'{what}: image width/height must be a power of two, got {width}{hint}')
    if channels not in (1, 3):
        raise dnnlib.UserError(f'{what}: images must be RGB or grayscale, got {channels} channels')

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
            raise safe_pickle.Refused(f'global "{module}.{name}"')
        return self.ALLOWED[(module, name)]


def _plain_keys(batch):
    return {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _load_cifar_batch(tar, member, source):
    where = f'{source}: {member}'
    try:
        with tar.extractfile(tar.getmember(member)) as f:
            batch = _CifarUnpickler(f, encoding='latin1').load()
    except safe_pickle.Refused as e:
        raise dnnlib.UserError(safe_pickle.refusal(where, str(e))) from None
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


def _is_class_index(label):
    return isinstance(label, int) and not isinstance(label, bool) and 0 <= label < MAX_CLASSES


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
        unlabelled = [rel for rel, label in zip(rel_names, self.labels) if labels and not _is_class_index(label)]
        if unlabelled:
            raise dnnlib.UserError(f'{meta_name}: no class index (an integer in [0, {MAX_CLASSES})) for '
                                   f'"{unlabelled[0]}"')

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
