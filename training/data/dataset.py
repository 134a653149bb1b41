"""Reading EDM-format datasets (docs/ECT.md §8), and the resumable infinite sampler that feeds the training loop."""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib

#----------------------------------------------------------------------------
# EDM's dataset conventions: max_size picks a random subset (seeded), xflip doubles the set with mirrored
# copies in the second half, labels are one-hot float32 vectors (zeros(0) when unlabelled).


class Dataset(torch.utils.data.Dataset):
    """Index bookkeeping shared by dataset readers: subset, x-flips, labels, optional RAM cache."""

    def __init__(self,
        name,                   # Name of the dataset.
        raw_shape,              # Shape of the raw image data, [N, C, H, W].
        max_size    = None,     # Keep a random subset of at most this many images (before xflip); None = all.
        use_labels  = False,    # Return class labels? False = label dimension is zero.
        xflip       = False,    # Double the dataset with horizontally mirrored copies (after max_size).
        random_seed = 0,        # Seed of the max_size subset.
        cache       = False,    # Keep decoded images in RAM.
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = dict()
        self._raw_labels = None
        self._label_shape = None
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _load_raw_image(self, raw_idx):
        raise NotImplementedError

    def _load_raw_labels(self):
        raise NotImplementedError

    def _get_raw_labels(self):
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            self._raw_labels = labels if labels is not None else np.zeros([self._raw_shape[0], 0], dtype=np.float32)
        return self._raw_labels

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    def index_map(self):
        """(raw image index [N] int64, mirrored [N] bool) of every item: item i is raw image raw_idx[i], flipped
        left-right when mirrored[i] (max_size and xflip applied)."""
        return self._raw_idx.copy(), self._xflip.astype(bool)

    def read_raw_image(self, raw_idx):
        """Raw image `raw_idx` as stored (uint8 CHW, never mirrored), without filling the cache."""
        image = self._cached_images.get(int(raw_idx))
        return image if image is not None else self._load_raw_image(int(raw_idx))

    def raw_labels(self):
        """The labels of all raw images: int64 class indices [R], float32 vectors [R, D], or zeros [R, 0]."""
        return self._get_raw_labels()

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self):
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        return self.image_shape[1]

    @property
    def label_shape(self):
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            self._label_shape = [int(np.max(raw_labels)) + 1] if raw_labels.dtype == np.int64 else list(raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self):
        return self.label_shape[0]

    @property
    def has_labels(self):
        return any(x != 0 for x in self.label_shape)

MAX_CLASSES = 100000   # the most classes a dataset.json may imply (ImageNet-21k has 21,841): a larger index is a typo


def label_array(values, where):
    """dataset.json labels (one per image, in order) -> int64 class indices [N] or float32 vectors [N, D]; ragged,
    non-numeric, negative, NaN/infinite labels and class indices of MAX_CLASSES or more are a UserError."""
    try:
        labels = np.array(values)
    except ValueError:
        raise dnnlib.UserError(f'{where}: labels differ in length (each must be one class index, or all vectors '
                               f'of one length)') from None
    if labels.ndim not in (1, 2) or labels.dtype.kind not in 'iuf' or (labels.ndim == 1 and labels.dtype.kind == 'f') \
            or any(isinstance(value, bool) for value in values):
        raise dnnlib.UserError(f'{where}: labels must be class indices or equal-length numeric vectors')
    if labels.ndim == 2:
        with np.errstate(over='ignore'):
            labels = labels.astype(np.float32)
        if not np.all(np.isfinite(labels)):
            raise dnnlib.UserError(f'{where}: label vectors must hold finite numbers (found NaN or infinity, or a '
                                   f'value beyond float32)')
        return labels
    if labels.size and labels.min() < 0:
        raise dnnlib.UserError(f'{where}: negative class label {labels.min()}')
    if labels.size and labels.max() >= MAX_CLASSES:
        raise dnnlib.UserError(f'{where}: class label {labels.max()} implies more than {MAX_CLASSES} classes')
    return labels.astype(np.int64)

#----------------------------------------------------------------------------
# EDM-format folder or zip: PNGs (any PIL image extension) named 00000/img00000000.png and dataset.json.


class ImageFolderDataset(Dataset):
    """A folder or zip of same-size square images, read lazily (the zip is opened once per process)."""

    def __init__(self,
        path,                   # Folder or .zip in EDM's format.
        resolution  = None,     # Required resolution; None = whatever the images have.
        **super_kwargs,         # max_size, use_labels, xflip, random_seed, cache (see Dataset).
    ):
        self._path = os.fspath(path)
        self._zipfile = None
        self._zip_pid = None
        self._all_fnames = self._list_files()
        PIL.Image.init()
        self._image_fnames = sorted(f for f in self._all_fnames if os.path.splitext(f)[1].lower() in PIL.Image.EXTENSION)
        if not self._image_fnames:
            raise dnnlib.UserError(f'{self._path}: no image files found')
        first = self._read_image(self._image_fnames[0])
        if first.shape[1] != first.shape[2]:
            raise dnnlib.UserError(f'{self._path}: images must be square, {self._image_fnames[0]} is {first.shape[2]}x{first.shape[1]}')
        if resolution is not None and first.shape[1] != resolution:
            raise dnnlib.UserError(f'{self._path}: images are {first.shape[1]}x{first.shape[2]}, not the requested resolution {resolution}')
        name = os.path.splitext(os.path.basename(self._path.rstrip('/\\')))[0]
        super().__init__(name=name, raw_shape=[len(self._image_fnames)] + list(first.shape), **super_kwargs)
        if self._use_labels and not self.has_labels:
            raise dnnlib.UserError(f'dataset {self._path} has no labels (dataset.json) but --cond was given')

    def _list_files(self):
        self._is_dir = os.path.isdir(self._path)
        if self._is_dir:
            return {os.path.relpath(os.path.join(root, f), start=self._path).replace('\\', '/')
                    for root, _dirs, files in os.walk(self._path) for f in files}
        if not os.path.isfile(self._path):
            raise dnnlib.UserError(f'{self._path}: no such dataset folder or zip')
        if not self._path.lower().endswith('.zip'):
            raise dnnlib.UserError(f'{self._path}: a dataset must be a folder or a .zip')
        try:
            return set(self._get_zipfile().namelist())
        except zipfile.BadZipFile as e:
            raise dnnlib.UserError(f'{self._path}: cannot read zip ({e})') from None

    def _get_zipfile(self):
        if self._zipfile is None or self._zip_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zip_pid = os.getpid()
        return self._zipfile

    def _read_file(self, fname):
        if self._is_dir:
            with open(os.path.join(self._path, fname), 'rb') as f:
                return f.read()
        return self._get_zipfile().read(fname)

    def _read_image(self, fname, expected_hw=None):
        """One image file -> uint8 CHW array, as stored (PIL decode, no conversion); with `expected_hw`, an image
        of another size is refused from its header, before it is decoded (decompression bombs)."""
        try:
            with PIL.Image.open(io.BytesIO(self._read_file(fname))) as img:
                if expected_hw is not None and (img.height, img.width) != tuple(expected_hw):
                    raise dnnlib.UserError(f'{self._path}: {fname} is {img.width}x{img.height}, the first image is '
                                           f'{expected_hw[1]}x{expected_hw[0]}')
                image = np.array(img)
        except (OSError, SyntaxError, ValueError, zipfile.BadZipFile, PIL.Image.DecompressionBombError) as e:
            raise dnnlib.UserError(f'{self._path}: cannot read {fname} ({e})') from None
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise dnnlib.UserError(f'{self._path}: {fname} is not an 8-bit grey or colour image')
        image = image[:, :, np.newaxis] if image.ndim == 2 else image
        return image.transpose(2, 0, 1)

    @property
    def num_image_files(self):
        """Image files in the folder or zip (before max_size and xflip)."""
        return len(self._image_fnames)

    def verify_images(self, raw_indices):
        """The first problem among the image files `raw_indices` as a one-line message, or None. Each file's
        header (size) and, for PNG, every chunk's checksum are read without decoding the pixels, so a corrupt,
        truncated, other-size or decompression-bomb image is found before training starts."""
        expected_hw = tuple(self.image_shape[1:])
        for raw_idx in raw_indices:
            fname = self._image_fnames[raw_idx]
            try:
                with PIL.Image.open(io.BytesIO(self._read_file(fname))) as img:
                    if (img.height, img.width) != expected_hw:
                        return (f'{self._path}: {fname} is {img.width}x{img.height}, the first image is '
                                f'{expected_hw[1]}x{expected_hw[0]}')
                    img.verify()
            except (OSError, SyntaxError, ValueError, zipfile.BadZipFile, PIL.Image.DecompressionBombError) as e:
                return f'{self._path}: cannot read {fname} ({e})'
        return None

    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        image = self._read_image(fname, expected_hw=self.image_shape[1:])
        if list(image.shape) != self.image_shape:
            raise dnnlib.UserError(f'{self._path}: {fname} has shape {list(image.shape)}, the first image has {self.image_shape}')
        return image

    def _load_raw_labels(self):
        where = f'{self._path}: dataset.json'
        if 'dataset.json' not in self._all_fnames:
            return None
        try:
            labels = json.loads(self._read_file('dataset.json'))['labels']
            labels = None if labels is None else dict(labels)
        except (ValueError, KeyError, TypeError) as e:
            raise dnnlib.UserError(f'{where}: not a valid dataset.json ({type(e).__name__}: {e})') from None
        if labels is None:
            return None
        missing = [fname for fname in self._image_fnames if fname not in labels]
        if missing:
            raise dnnlib.UserError(f'{where}: no label for {missing[0]}')
        return label_array([labels[fname] for fname in self._image_fnames], where)

    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None, _zip_pid=None)

    def close(self):
        if self._zipfile is not None:
            self._zipfile.close()
        self._zipfile = None

#----------------------------------------------------------------------------
# Infinite sampler. EDM's sampler shuffles a window sequentially, so resuming means replaying every step.
# Here epoch e of the index stream is a permutation drawn from a generator seeded with (seed, e): stream
# position g is permutation(g // N)[g % N], so jumping to any position costs one permutation, O(N).


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices; rank r yields the global positions p >= start_index with p % num_replicas == r.

    `start_index` counts positions of the global stream already consumed by all ranks together (the number
    of images the training loop has seen); a sampler created with start_index=s continues exactly where one
    created with start_index=0 stands after s positions. Every epoch visits each index exactly once.
    `window_size` is accepted for EDM call compatibility; the per-epoch reshuffle is EDM's window_size=1.
    """

    def __init__(self,
        dataset_size,           # Number of items, or a dataset (its len() is used).
        rank        = 0,        # This process's rank.
        num_replicas = 1,       # Number of processes sharing the stream.
        seed        = 0,        # Seed of the per-epoch permutations.
        shuffle     = True,     # False = indices in order, epoch after epoch.
        window_size = 0.5,      # Accepted for EDM compatibility (see above).
        start_index = 0,        # Global stream positions already consumed (resume).
    ):
        size = len(dataset_size) if hasattr(dataset_size, '__len__') else int(dataset_size)
        if size <= 0:
            raise dnnlib.UserError('InfiniteSampler: the dataset is empty')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'InfiniteSampler: rank {rank} outside [0, {num_replicas})')
        if start_index < 0 or seed < 0 or not 0 <= window_size <= 1:
            raise ValueError('InfiniteSampler: start_index and seed must be >= 0, window_size in [0, 1]')
        self.dataset_size = size
        self.rank = rank
        self.num_replicas = num_replicas
        self.seed = seed
        self.shuffle = shuffle
        self.window_size = window_size
        self.start_index = start_index

    def epoch_order(self, epoch):
        if not self.shuffle:
            return np.arange(self.dataset_size, dtype=np.int64)
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.dataset_size)

    def __iter__(self):
        position = self.start_index + (self.rank - self.start_index) % self.num_replicas
        epoch, order = None, None
        while True:
            if position // self.dataset_size != epoch:
                epoch = position // self.dataset_size
                order = self.epoch_order(epoch)
            yield int(order[position % self.dataset_size])
            position += self.num_replicas
