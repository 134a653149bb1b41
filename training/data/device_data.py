"""The whole dataset on the training device (`--data-on-device`), for CIFAR-sized data: no DataLoader workers,
no host-to-device copy of images per step.

Every distinct raw image is copied once into one uint8 tensor on the device; each rank then draws its shard of
the training.data.dataset.InfiniteSampler stream (the same sampler, rank and start position as the DataLoader path),
gathers the items on the device and mirrors the x-flipped ones there, so the batches are exactly those of the
DataLoader path: same images, same order, same labels, on any number of ranks and after a resume.
"""

import itertools

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import misc

DEVICE_MEMORY_FRACTION = 0.5   # the dataset may take at most this share of the device's free memory
LOAD_CHUNK = 4096              # images decoded on the host per copy to the device


def device_data_nbytes(dataset):
    """Bytes the device copy of `dataset` takes: distinct raw images (uint8), their labels, the item maps."""
    raw_idx, _ = dataset.index_map()
    labels = dataset.raw_labels()
    num_rows = np.unique(raw_idx).size
    label_bytes = labels.dtype.itemsize * int(np.prod(labels.shape[1:]))
    return num_rows * (int(np.prod(dataset.image_shape)) + label_bytes) + len(dataset) * (8 + 1)


def available_bytes(device):
    """Free memory of `device`: the CUDA allocator's free bytes, or the host's available RAM for the CPU."""
    if device.type == 'cuda':
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def check_device_data(dataset, device):
    """UserError unless `dataset` can be held on `device` (a training.data.dataset.Dataset that fits, estimated
    before anything is loaded)."""
    if not all(hasattr(dataset, name) for name in ('index_map', 'read_raw_image', 'raw_labels')):
        raise dnnlib.UserError(f'--data-on-device: {type(dataset).__name__} cannot be held on the device (it needs '
                               f'the index map of training.data.dataset.Dataset); train without --data-on-device')
    need, free = device_data_nbytes(dataset), available_bytes(device)
    if need > DEVICE_MEMORY_FRACTION * free:
        raise dnnlib.UserError(f'--data-on-device: {dataset.name} takes {need / 2**30:.2f} GiB, more than '
                               f'{DEVICE_MEMORY_FRACTION:.0%} of the {free / 2**30:.2f} GiB free on {device}; '
                               f'train without --data-on-device (DataLoader workers)')


class DeviceDataset:
    """A dataset's raw images and labels on one device; `batch(indices)` gives the items `dataset[i]` would."""

    def __init__(self,
                 dataset,   # a training.data.dataset.Dataset (index_map, read_raw_image, raw_labels)
                 device,    # the training device
                 ):
        check_device_data(dataset, device)
        raw_idx, mirrored = dataset.index_map()
        rows, row_of = np.unique(raw_idx, return_inverse=True)
        self.device = device
        self.images = torch.empty([rows.size] + dataset.image_shape, dtype=torch.uint8, device=device)
        for start in range(0, rows.size, LOAD_CHUNK):
            chunk = np.stack([dataset.read_raw_image(raw) for raw in rows[start:start + LOAD_CHUNK]])
            self.images[start:start + len(chunk)] = torch.from_numpy(chunk).to(device)
        self.row_of = torch.from_numpy(row_of.reshape(-1).astype(np.int64)).to(device)
        self.mirrored = torch.from_numpy(mirrored).to(device)
        labels = dataset.raw_labels()[rows]
        # Class indices become one-hot float32 rows of an identity matrix, as Dataset.get_label makes them.
        self.one_hot = torch.eye(dataset.label_dim, device=device) if labels.dtype == np.int64 else None
        self.labels = torch.from_numpy(np.ascontiguousarray(labels if self.one_hot is not None
                                                            else labels.astype(np.float32))).to(device)

    def __len__(self):
        return self.row_of.numel()

    def batch(self, indices):
        """(uint8 images [B, C, H, W], float32 labels [B, label_dim]) of the items `indices` (int64 numpy), on the
        device, without waiting for it (the indices travel through pinned memory on CUDA)."""
        idx = misc.to_device_async(torch.from_numpy(indices), self.device)
        rows = self.row_of[idx]
        images = self.images[rows]
        images = torch.where(self.mirrored[idx].view(-1, 1, 1, 1), images.flip(-1), images)
        labels = self.labels[rows]
        return images, (self.one_hot[labels] if self.one_hot is not None else labels)


def device_batches(device_dataset, sampler, batch_gpu):
    """Endless (images, labels) micro-batches of `batch_gpu` consecutive sampler indices: the DataLoader's
    batching of the same sampler."""
    indices = iter(sampler)
    while True:
        yield device_dataset.batch(np.fromiter(itertools.islice(indices, batch_gpu), dtype=np.int64, count=batch_gpu))
