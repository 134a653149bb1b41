"""Seeds in, images out: the reusable core of generate.py, the metrics and the training loop's sample grids.

The random inputs of seed `s` are identical whatever the batch size, device or number of processes: each seed has
its own CPU generator (docs/ECT.md §5), drawn in the order latent, class index (conditional networks), then the
noise each stochastic step needs. Its image is the same up to floating-point rounding: another batch size or
device can sum in another order and move a pixel by one level (docs/GPU.md).
"""

import collections
import concurrent.futures
import math
import os

import numpy as np
import PIL.Image
import torch

import dnnlib
from training import compile as tc
from training.sampling import samplers
from training.sampling import samplers_karras


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


def batch_labels(net, rnd, batch_seeds, class_idx, device):
    """Class indices (N,) for a batch, or None: EDM's convention draws one from each seed's generator right after
    the latent (also under --class, so later draws do not shift); openai's networks draw none from it
    (samplers_karras.seed_labels), as the official determ-indiv generator."""
    if not net.label_dim:
        return None
    if samplers.is_karras_net(net):
        drawn = None if class_idx is not None else samplers_karras.seed_labels(batch_seeds, net.label_dim, device)
    else:
        drawn = rnd.randint(net.label_dim, size=[len(batch_seeds)])
    return drawn if class_idx is None else torch.full([len(batch_seeds)], class_idx, device=device)


def sample_labeled_batch(net, batch_seeds, class_idx=None, sampler='consistency', sampler_kwargs=None, device=None):
    """(images N,C,H,W in [-1, 1], class indices or None) for `batch_seeds` with per-seed generators; images are
    float64 unclipped from our samplers, float32 clamped from openai's."""
    device = torch.device(device) if device is not None else next(net.parameters()).device
    rnd = samplers.StackedRandomGenerator(device, batch_seeds)
    latents = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution])
    labels = batch_labels(net, rnd, batch_seeds, class_idx, device)
    class_labels = None if labels is None else torch.eye(net.label_dim, device=device)[labels]
    sampler_fn = samplers.SAMPLERS[sampler] if isinstance(sampler, str) else sampler
    with torch.no_grad():
        return sampler_fn(net, latents, class_labels, randn_like=rnd.randn_like, **(sampler_kwargs or {})), labels


def sample_batch(net, batch_seeds, class_idx=None, sampler='consistency', sampler_kwargs=None, device=None):
    """The images of sample_labeled_batch."""
    return sample_labeled_batch(net, batch_seeds, class_idx, sampler, sampler_kwargs, device)[0]


def generate_batches(net, seeds, class_idx=None, sampler=None, sampler_kwargs=None, batch_size=64, device=None,
                     rank=0, world_size=1):
    """An iterator of (batch seeds, float images, class indices or None) for this rank's share of `seeds`;
    arguments as generate_images."""
    check_class_idx(net, class_idx)  # Checked now, not at the first batch.
    if sampler is None or (sampler_kwargs is None and isinstance(sampler, str)):
        sampler, defaults = samplers.resolve_sampler(net, sampler)
        sampler_kwargs = defaults if sampler_kwargs is None else sampler_kwargs
    batches = [b for b in split_batches(seeds, batch_size, world_size)[rank::world_size] if b]
    size = max(len(b) for b in batches) if batches and tc.is_compiled(net) else 0
    return (_sample_padded(net, b, size, class_idx, sampler, sampler_kwargs, device) for b in batches)


def _sample_padded(net, batch_seeds, size, class_idx, sampler, sampler_kwargs, device):
    """(seeds, images, labels) of sample_labeled_batch. A batch shorter than `size` is sampled padded with copies
    of its last seed and cut back: a compiled network (static shapes) then meets one batch size per run, not
    two (split_batches); with per-seed generators the padding changes no image."""
    padded = batch_seeds + batch_seeds[-1:] * (size - len(batch_seeds))
    images, labels = sample_labeled_batch(net, padded, class_idx, sampler, sampler_kwargs, device)
    n = len(batch_seeds)
    return batch_seeds, images[:n], None if labels is None else labels[:n]


def generate_images(net, seeds, class_idx=None, sampler=None, sampler_kwargs=None, batch_size=64, device=None,
                    rank=0, world_size=1):
    """An iterator of (batch seeds, uint8 images N,H,W,C on `device`) for this rank's share of `seeds`.

    `net` must already be in eval() on `device` (default: the device of its parameters). `sampler` is
    'consistency', 'heun', a name of samplers_karras.SAMPLERS, 'karras' (kwargs naming the sampler) or a callable
    with the samplers' signature (None: chosen from the network, see samplers.resolve_sampler); `sampler_kwargs` None means the recipe's defaults for that sampler. The random inputs
    of a seed do not depend on `batch_size`, `rank` or `world_size` (its image only up to rounding); rank r takes batches r, r + world_size, ...
    (EDM's sharding).
    """
    batches = generate_batches(net, seeds, class_idx, sampler, sampler_kwargs, batch_size, device, rank, world_size)
    return ((b, samplers.to_uint8(images)) for b, images, _ in batches)


def host_batches(image_batches):
    """(seeds, images as numpy) of an iterator of (seeds, images on any device). From a CUDA device each batch is
    copied into pinned memory without blocking, and batch k is handed out only once batch k + 1 has been queued,
    so the device samples the next batch while the host writes this one."""
    waiting = collections.deque()
    for batch_seeds, images in image_batches:
        if images.device.type != 'cuda':
            yield batch_seeds, images.cpu().numpy()
            continue
        host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
        host.copy_(images, non_blocking=True)   # queued on the current stream of the images' device
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(images.device))   # that stream: not the current device's
        waiting.append((batch_seeds, host, copied))
        if len(waiting) > 1:
            yield _when_copied(*waiting.popleft())
    while waiting:
        yield _when_copied(*waiting.popleft())


def _when_copied(batch_seeds, host, copied):
    copied.synchronize()
    return batch_seeds, host.numpy()

# ----------------------------------------------------------------------------------------------------------
# Grids and PNGs.


def make_grid(images):
    """Tile N,H,W,C uint8 images row by row into a near-square grid (black where the last row is short)."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros([rows * cols, h, w, c], dtype=np.uint8)
    grid[:n] = images
    return grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_png(path, image):
    """Write one H,W,C uint8 image as a PNG (L for one channel, else RGB, as EDM), atomically."""
    pil = PIL.Image.fromarray(image[:, :, 0], 'L') if image.shape[2] == 1 else PIL.Image.fromarray(image, 'RGB')
    with dnnlib.util.atomic_write(path, 'wb') as f:
        pil.save(f, format='PNG')


def save_grid_png(path, images):
    """Tile N,H,W,C uint8 images (numpy or torch, any device) into a near-square grid and write it as a PNG."""
    images = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    save_png(path, make_grid(images))


class BackgroundWriter:
    """Runs writes (e.g. save_png) on a few background threads, off the sampling loop; PNG encoding and fsync
    release the GIL. At most `max_pending` writes wait at a time (bounded memory: `submit` blocks on the oldest);
    the first failure is raised in the caller, at the next `submit` or at the end of the `with` block."""

    def __init__(self, num_threads=None, max_pending=1024):
        self.num_threads = num_threads or min(8, max(4, os.cpu_count() or 1))   # writer threads (fsync waits)
        self.max_pending = max_pending                                  # queued writes before submit blocks
        self._pool = None
        self._pending = collections.deque()

    def __enter__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix='writer')
        return self

    def submit(self, fn, *args):
        """Queue fn(*args); raises the error of any earlier write that failed."""
        while self._pending and (len(self._pending) >= self.max_pending or self._pending[0].done()):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                for future in self._pending:
                    future.cancel()
            while self._pending:
                future = self._pending.popleft()
                if exc_type is None:
                    future.result()
        finally:
            self._pool.shutdown(wait=True)
        return False
