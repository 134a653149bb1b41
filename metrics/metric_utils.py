"""Feature statistics in float64, the distances built on them, and feature extraction from images or networks.

Statistics are accumulated as running sums (count, Σx, Σxxᵀ) in float64, so partial statistics of several
ranks (or of two halves of a data set) merge exactly by adding the sums. Features kept whole (for KID,
precision/recall, IS) are gathered across ranks.
"""

import zipfile

import numpy as np
import scipy.linalg
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import numpy_pickle
from torch_utils import progress

# ----------------------------------------------------------------------------------------------------------
# Running statistics.


class FeatureStats:
    """Float64 running mean/covariance of features, optionally keeping every feature vector."""

    def __init__(self, capture_all=False, capture_mean_cov=True):
        self.capture_all = capture_all                             # keep all features (KID, PR, IS)
        self.capture_mean_cov = capture_mean_cov                   # accumulate Σx and Σxxᵀ (FID, FD)
        self.num_items = 0
        self.num_features = None
        self.raw_sum = None
        self.raw_outer = None
        self.all_features = []
        self._tensor_sums = None        # [Σx, Σxxᵀ] of torch features, float64 on their device, until _flush

    def _set_num_features(self, num_features):
        if self.num_features is None:
            self.num_features = num_features
            if self.capture_mean_cov:
                self.raw_sum = np.zeros([num_features], dtype=np.float64)
                self.raw_outer = np.zeros([num_features, num_features], dtype=np.float64)
        elif self.num_features != num_features:
            raise ValueError(f'feature width changed from {self.num_features} to {num_features}')

    def append(self, features):
        """Add features [N, D] (numpy or torch). Torch features are summed in float64 on their own device, so a GPU
        is not made to wait for a copy to the host after every batch."""
        if isinstance(features, torch.Tensor):
            self._append_tensor(features.detach())
            return
        x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        self._set_num_features(x.shape[1])
        self.num_items += x.shape[0]
        if self.capture_mean_cov:
            self.raw_sum += x.sum(axis=0)
            self.raw_outer += x.T @ x
        if self.capture_all:
            self.all_features.append(x)

    def _append_tensor(self, features):
        x = features.to(torch.float64).reshape(len(features), -1)
        self._set_num_features(x.shape[1])
        self.num_items += x.shape[0]
        if self.capture_mean_cov and self._tensor_sums is None:
            self._tensor_sums = [x.sum(dim=0), x.T @ x]
        elif self.capture_mean_cov:
            self._tensor_sums[0] += x.sum(dim=0)
            self._tensor_sums[1].addmm_(x.T, x)
        if self.capture_all:
            self.all_features.append(features.reshape(len(features), -1).clone())  # on its device until get_all

    def _flush(self):
        """Fold the sums kept on a device into the float64 numpy sums (the one copy to the host)."""
        if self._tensor_sums is not None:
            self.raw_sum += self._tensor_sums[0].cpu().numpy()
            self.raw_outer += self._tensor_sums[1].cpu().numpy()
            self._tensor_sums = None

    def merge(self, other):
        """Add the statistics of `other` (e.g. another shard) to these."""
        self._flush()
        other._flush()
        if other.num_items == 0:
            return self
        self._set_num_features(other.num_features)
        self.num_items += other.num_items
        if self.capture_mean_cov:
            self.raw_sum += other.raw_sum
            self.raw_outer += other.raw_outer
        if self.capture_all:
            self.all_features.extend(other.all_features)
        return self

    def all_reduce(self):
        """Combine the statistics of all ranks (no-op for a single process); every rank gets the total."""
        self._flush()
        if not dist.is_distributed():
            return self
        width = torch.tensor([self.num_features or 0], dtype=torch.int64, device=dist.collective_device())
        torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)  # ranks with no items have 0
        self._set_num_features(int(width.item()))
        if self.capture_mean_cov:
            self.raw_sum = dist.all_reduce_sum(torch.from_numpy(self.raw_sum)).numpy()
            self.raw_outer = dist.all_reduce_sum(torch.from_numpy(self.raw_outer)).numpy()
        if self.capture_all:
            self.all_features = [_all_gather_rows(self.get_all(), self.num_features)]
        self.num_items = int(dist.all_reduce_sum(torch.tensor([self.num_items], dtype=torch.int64)).item())
        return self

    def get_all(self):
        if not self.capture_all:
            raise ValueError('FeatureStats: features were not captured (capture_all=False)')
        if not self.all_features:
            return np.zeros([0, self.num_features or 0], dtype=np.float64)
        self.all_features = [f.to('cpu', torch.float64).numpy() if torch.is_tensor(f) else f for f in self.all_features]
        return np.concatenate(self.all_features, axis=0)

    def get_mean_cov(self):
        """Mean and unbiased covariance (divisor N − 1, as numpy.cov and EDM's fid.py)."""
        if not self.capture_mean_cov:
            raise ValueError('FeatureStats: mean/covariance were not captured')
        self._flush()
        if self.num_items < 2:
            raise dnnlib.UserError(f'need at least 2 images for a covariance, got {self.num_items}')
        mu = self.raw_sum / self.num_items
        sigma = (self.raw_outer - np.outer(mu, mu) * self.num_items) / (self.num_items - 1)
        return mu, sigma


def _all_gather_rows(rows, width):
    """Concatenate the row blocks of every rank (blocks may differ in length), rank order."""
    device = dist.collective_device()
    counts = [torch.zeros([1], dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(counts, torch.tensor([len(rows)], dtype=torch.int64, device=device))
    max_count = max(int(c.item()) for c in counts)
    padded = torch.zeros([max_count, width], dtype=torch.float64, device=device)
    padded[:len(rows)] = torch.from_numpy(rows).to(device)
    blocks = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(blocks, padded)
    return np.concatenate([b[:int(c.item())].cpu().numpy() for b, c in zip(blocks, counts)], axis=0)


# ----------------------------------------------------------------------------------------------------------
# Distances.


# Fréchet distance between Gaussians (Heusel et al. 2017, Eq. 6; docs/ECT.md §9):
# ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), the imaginary part of the matrix square root discarded.
def frechet_distance(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise dnnlib.UserError(f'feature statistics of different widths: {mu1.shape} vs {mu2.shape} '
                               f'(were they computed with the same detector?)')
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))


# Kernel Inception Distance (Bińkowski et al. 2018, Eq. 2, unbiased MMD² with k(x,y) = (xᵀy/d + 1)³),
# averaged over random subsets as StyleGAN3's kernel_inception_distance.py does.
def kernel_distance(real_features, gen_features, num_subsets=100, max_subset_size=1000, seed=0):
    real_features, gen_features = np.asarray(real_features, np.float64), np.asarray(gen_features, np.float64)
    n = real_features.shape[1]
    m = min(min(real_features.shape[0], gen_features.shape[0]), max_subset_size)
    if m < 2:
        raise dnnlib.UserError(f'KID needs at least 2 real and 2 generated images, got {m}')
    rnd = np.random.RandomState(seed)
    t = 0.0
    for _ in range(num_subsets):
        x = gen_features[rnd.choice(gen_features.shape[0], m, replace=False)]
        y = real_features[rnd.choice(real_features.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


def _kth_neighbour_radii(manifold, nhood_size, row_batch_size):
    """Distance of every manifold point to its k-th nearest other manifold point (itself excluded)."""
    radii = [torch.cdist(rows, manifold).kthvalue(nhood_size + 1, dim=1).values
             for rows in manifold.split(row_batch_size)]
    return torch.cat(radii)


def _fraction_inside(manifold, radii, probes, row_batch_size):
    """Fraction of probes within the k-NN ball of at least one manifold point."""
    inside = [(torch.cdist(rows, manifold) <= radii.unsqueeze(0)).any(dim=1) for rows in probes.split(row_batch_size)]
    return float(torch.cat(inside).to(torch.float64).mean())


# Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1–2): k-NN balls around each sample of one
# set; precision = share of generated samples inside the real manifold, recall = the converse. Distances are
# taken `row_batch_size` rows at a time (1000 × 200k float32 distances = 0.8 GB) on `device`.
def precision_recall(real_features, gen_features, nhood_size=3, row_batch_size=1000, device='cpu', dtype=torch.float32):
    real = torch.as_tensor(np.asarray(real_features), dtype=dtype, device=device)
    gen = torch.as_tensor(np.asarray(gen_features), dtype=dtype, device=device)
    if min(len(real), len(gen)) <= nhood_size:
        raise dnnlib.UserError(f'precision/recall with k={nhood_size} needs more than {nhood_size} real and '
                               f'generated images, got {len(real)} and {len(gen)}')
    precision = _fraction_inside(real, _kth_neighbour_radii(real, nhood_size, row_batch_size), gen, row_batch_size)
    recall = _fraction_inside(gen, _kth_neighbour_radii(gen, nhood_size, row_batch_size), real, row_batch_size)
    return precision, recall


# Inception Score (Salimans et al. 2016, Sec. 4): exp(E_x KL(p(y|x) ‖ p(y))) per split, mean and std over
# `num_splits` contiguous splits, as StyleGAN3's inception_score.py.
def inception_score(probs, num_splits=10):
    probs = np.asarray(probs, np.float64)
    num = probs.shape[0]
    if num < num_splits:
        raise dnnlib.UserError(f'Inception Score with {num_splits} splits needs at least {num_splits} images, got {num}')
    scores = []
    for i in range(num_splits):
        part = probs[i * num // num_splits: (i + 1) * num // num_splits]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------------
# Feature extraction.


def compute_dataset_stats(dataset, detector, stats, batch_size=64, device='cpu', rank=0, num_gpus=1, max_items=None):
    """Features of the first `max_items` dataset items (this rank's share: rank, rank + num_gpus, ...) into
    `stats`, then merged across ranks; the next batches are read and decoded on a background thread while the
    detector runs (misc.prefetch). A progress bar on rank 0 (torch_utils.progress)."""
    num_items = len(dataset) if max_items is None else min(len(dataset), max_items)
    indices = list(range(rank, num_items, num_gpus))
    chunks = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    decoded = misc.prefetch(lambda chunk: np.stack([dataset[i][0] for i in chunk]), chunks)
    with progress.bar(total=num_items, desc='dataset features', unit='img', leave=False) as images_bar:
        for batch in decoded:
            stats.append(detector(misc.to_device_async(torch.from_numpy(batch), device)))
            _advance(images_bar, len(batch) * num_gpus)
    return stats.all_reduce()


def _advance(images_bar, count):
    """Move a bar on by `count` (rank 0's images times the ranks working in step with it), never past its total."""
    images_bar.update(min(count, images_bar.total - images_bar.n) if images_bar.total is not None else count)


def compute_generator_stats(image_batches, detector, stats, device='cpu', num_images=None):
    """Features of generated uint8 N,H,W,C batches (an iterator of (seeds, images)), merged across ranks; a
    progress bar of `num_images` (all ranks together) on rank 0 while sampling and extracting."""
    with progress.bar(total=num_images, desc='sampling + features', unit='img', leave=False) as images_bar:
        for _seeds, images in image_batches:
            images = torch.as_tensor(images).permute(0, 3, 1, 2)
            stats.append(detector(images.to(device)))
            _advance(images_bar, len(images) * dist.get_world_size())
    return stats.all_reduce()


# ----------------------------------------------------------------------------------------------------------
# Reference statistics files: EDM's fid-refs format (an .npz with `mu` and `sigma`, optionally `features`), or
# EDM2's (calculate_metrics.py: a pickle of dict(num_images, fid=dict(mu, sigma), fd_dinov2=dict(mu, sigma))).

EDM2_REF_KEYS = {'inception': 'fid', 'dinov2': 'fd_dinov2'}    # detector kind -> entry of an EDM2 reference .pkl


def _edm2_ref_arrays(f, kind):
    """mu and sigma of detector `kind` from an EDM2 reference pickle, read by the plain-array unpickler."""
    data = numpy_pickle.load(f, 'EDM2 reference .pkl')
    entries = [key for key in EDM2_REF_KEYS.values() if isinstance(data, dict) and isinstance(data.get(key), dict)]
    if not entries:
        raise dnnlib.UserError('not an EDM2 reference .pkl (no "fid" or "fd_dinov2" entry)')
    key = EDM2_REF_KEYS.get(kind)
    if key not in entries:
        raise dnnlib.UserError(f'EDM2 reference .pkl with statistics for {", ".join(entries)} only, not for the '
                               f'{kind} detector')
    return {k: v for k, v in data[key].items() if isinstance(v, np.ndarray)}


# openai/ADM reference batches (e.g. VIRTUAL_imagenet64_labeled.npz) hold their images and labels next to mu and
# sigma (pool_3 of the same TF Inception graph as NVIDIA's detector); statistics never need those two.
_IMAGE_BATCH_KEYS = ('arr_0', 'arr_1')


def _npz_ref_arrays(f):
    """The arrays of a reference .npz, leaving out the images and labels of openai's reference batches unread."""
    with np.load(f, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files if key not in _IMAGE_BATCH_KEYS}


def load_ref(url_or_path, need_features=False, kind='inception'):
    """The arrays of a reference .npz, or of EDM2's reference .pkl (its statistics of detector `kind`), a path or
    URL, checked for the keys a metric needs."""
    try:
        with dnnlib.util.open_url(url_or_path) as f:
            is_pickle = f.read(1) == b'\x80'
            f.seek(0)
            ref = _edm2_ref_arrays(f, kind) if is_pickle else _npz_ref_arrays(f)
    except dnnlib.UserError as e:
        raise dnnlib.UserError(f'--ref={url_or_path}: {e}') from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise dnnlib.UserError(f'--ref={url_or_path}: not a reference .npz of plain arrays') from None
    needed = ['features'] if need_features else ['mu', 'sigma']
    missing = [key for key in needed if key not in ref]
    if missing:
        raise dnnlib.UserError(f'--ref={url_or_path}: missing {", ".join(missing)} (has {", ".join(sorted(ref)) or "nothing"})')
    if not need_features and (ref['mu'].ndim != 1 or ref['sigma'].shape != (len(ref['mu']),) * 2):
        raise dnnlib.UserError(f'--ref={url_or_path}: mu {ref["mu"].shape} and sigma {ref["sigma"].shape} do not match')
    return ref


def save_ref(path, stats, **extra):
    """Write reference statistics (mu, sigma, and all features when captured) atomically as .npz."""
    arrays = {}
    if stats.capture_mean_cov:
        arrays['mu'], arrays['sigma'] = stats.get_mean_cov()
    if stats.capture_all:
        arrays['features'] = stats.get_all().astype(np.float32)
    arrays.update(extra)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        np.savez(f, **arrays)
