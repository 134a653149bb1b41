"""Named metrics computed from a network by sampling in memory, and their records in the run directory.

    result = calc_metric('fid50k_full', net, run_dir, 'network-snapshot-001000.pt', ref='cifar10-32x32.npz')
    # -> result.results.fid50k_full, and a line appended to <run_dir>/metric-fid50k_full.jsonl (rank 0)

Names keep their published meaning (fid50k_full: FID of 50,000 one-step samples against the full training
set statistics); `num_samples` overrides the count for tests and quick checks, and the record says so.
Generated images use seeds 0 .. num_samples − 1, shared out over the ranks by training.sampling.generation.generate_images.
With `repeats=R` (EDM's protocol: a published FID is the minimum over three seed sets) the metric is computed R
times, seed set i being i·num_samples .. (i + 1)·num_samples − 1; the record holds each set's value, their mean
and minimum.
"""

import collections
import hashlib
import json
import os
import time
import types

import numpy as np
import torch

import dnnlib
from metrics import detectors
from metrics import metric_utils
from torch_utils import distributed as dist
from training.loop import run_records
from training.sampling import samplers
from training.sampling.generation import generate_images

# detector: kind for metrics.detectors.get_detector; ref: 'stats' (mu/sigma), 'features' or None;
# num_samples: generated images of the published metric; steps: sampling steps; sampler: 'consistency' (the network's
# few-step sampler: consistency, trigflow or meanflow, samplers.few_step_family) or 'heun' (EDM's Heun sampler,
# NFE = 2 * steps - 1, for diffusion networks).
_MetricSpec = collections.namedtuple('_MetricSpec', ['detector', 'ref', 'num_samples', 'steps', 'sampler'],
                                     defaults=['consistency'])
_METRICS = types.MappingProxyType(dict(
    fid50k_full=_MetricSpec('inception', 'stats', 50000, 1),
    two_step_fid50k_full=_MetricSpec('inception', 'stats', 50000, 2),
    kid50k_full=_MetricSpec('inception', 'features', 50000, 1),
    pr50k3_full=_MetricSpec('vgg16', 'features', 50000, 1),
    is50k=_MetricSpec('inception_probs', None, 50000, 1),
    fd_dinov2=_MetricSpec('dinov2', 'stats', 50000, 1),
    # Frechet distance on features of a fixed seeded random network (metrics.detectors.RandomConvDetector): needs no
    # download; NOT comparable with FID. 1-step and 2-step consistency sampling, and EDM Heun with 18 steps (35 NFE).
    fd_randnet=_MetricSpec('randnet', 'stats', 10000, 1),
    two_step_fd_randnet=_MetricSpec('randnet', 'stats', 10000, 2),
    fd_randnet_heun=_MetricSpec('randnet', 'stats', 10000, 18, 'heun'),
))
KID_MAX_REAL = 1000000          # StyleGAN3's kid50k_full: up to 1M reference images.
PR_MAX_REAL = 200000            # StyleGAN3's pr50k3_full: up to 200k reference images.


def list_metrics():
    return list(_METRICS)


def is_valid_metric(metric):
    return metric in _METRICS


def check_metric(metric):
    if not is_valid_metric(metric):
        raise dnnlib.UserError(f'--metrics: unknown metric "{metric}" (choose from {", ".join(_METRICS)})')
    return _METRICS[metric]


def detector_kind(metric):
    return check_metric(metric).detector


def ref_kind(metric):
    """'stats' (an .npz with mu/sigma), 'features' (a dataset or an .npz with features) or None."""
    return check_metric(metric).ref


def detector_file(metric, detector=None, vgg16=None, dinov2=None):
    """The detector file given for `metric` (--detector for the Inception metrics, --vgg16, --dinov2), or None
    for the official one; the random-network metrics take no file."""
    return dict(vgg16=vgg16, dinov2=dinov2, randnet=None).get(detector_kind(metric), detector)


def load_metric_detector(metric, url_or_path=None, allow_unsafe_pickle=False, device='cpu'):
    """The detector `metric` uses (default URL of its kind unless `url_or_path` is given), on `device`."""
    return detectors.get_detector(detector_kind(metric), url_or_path, allow_unsafe_pickle, device=device)


# ----------------------------------------------------------------------------------------------------------
# Computing one metric.


def _is_dataset(path):
    return os.path.isdir(path) or str(path).lower().endswith('.zip')


def _ref_features(ref, detector, batch_size, device, rank, num_gpus, max_items):
    """All reference features: computed from a dataset folder/zip, or read from an .npz's `features`."""
    if _is_dataset(ref):
        from training.data.dataset import ImageFolderDataset  # Deferred: only needed when a dataset is given.
        dataset = ImageFolderDataset(path=ref, use_labels=False, max_size=None)
        stats = metric_utils.FeatureStats(capture_all=True, capture_mean_cov=False)
        metric_utils.compute_dataset_stats(dataset, detector, stats, batch_size, device, rank, num_gpus, max_items)
        return stats.get_all()
    return metric_utils.load_ref(ref, need_features=True)['features'][:max_items]


def seed_set(num_samples, index=0, first_seed=0):
    """The seeds of seed set `index`: first_seed + index·num_samples, ... (num_samples consecutive seeds)."""
    start = first_seed + index * num_samples
    return list(range(start, start + num_samples))


def _generated_stats(net, detector, num_samples, capture_all, sampling, batch_size, device, rank, num_gpus,
                     seed_index=0):
    seeds = seed_set(num_samples, seed_index)
    batches = generate_images(net, seeds, class_idx=None, sampler=sampling['sampler'],
                              sampler_kwargs=sampling['sampler_kwargs'], batch_size=batch_size, device=device,
                              rank=rank, world_size=num_gpus)
    stats = metric_utils.FeatureStats(capture_all=capture_all, capture_mean_cov=not capture_all)
    return metric_utils.compute_generator_stats(batches, detector, stats, device, num_images=num_samples)


def sampling_for(metric, net, sampler=None, sampler_kwargs=None, mid_t=None, metadata=None):
    """dict(sampler, sampler_kwargs, nfe) for `metric`: the metric's own sampling unless a sampler is given."""
    steps = check_metric(metric).steps
    if sampler is None and check_metric(metric).sampler == 'heun':
        if getattr(net, 'is_meanflow', False):
            raise dnnlib.UserError(f'{metric}: EDM\'s Heun sampler needs a denoiser D(x, σ); a MeanFlow network '
                                   f'samples with its own few-step sampler (use fd_randnet / two_step_fd_randnet)')
        sampler, sampler_kwargs = 'heun', dict(num_steps=steps)
    if sampler is None:
        if mid_t is not None and steps == 2:
            mid_t = [float(t) for t in (mid_t if isinstance(mid_t, (list, tuple)) else [mid_t])]
        sampler = samplers.few_step_family(net, metadata) or 'consistency'
        sampler_kwargs = samplers.few_step_kwargs(net, num_steps=steps, mid_t=mid_t if steps == 2 else None,
                                                  metadata=metadata, family=sampler)
    sampler_kwargs = dict(sampler_kwargs or {})
    return dict(sampler=sampler, sampler_kwargs=sampler_kwargs, nfe=samplers.sampler_nfe(sampler, sampler_kwargs))


def _compute(metric, net, ref, detector, num_samples, sampling, batch_size, device, rank, num_gpus, seed_index=0):
    kind = ref_kind(metric)
    args = (batch_size, device, rank, num_gpus)
    if kind == 'stats':
        mu_ref, sigma_ref = _load_stats(ref, detector, detector_kind(metric), *args)
        mu, sigma = _generated_stats(net, detector, num_samples, False, sampling, *args, seed_index).get_mean_cov()
        return {metric: metric_utils.frechet_distance(mu, sigma, mu_ref, sigma_ref)}
    gen = _generated_stats(net, detector, num_samples, True, sampling, *args, seed_index).get_all()
    if metric == 'is50k':
        mean, std = metric_utils.inception_score(gen, num_splits=10)
        return dict(is50k_mean=mean, is50k_std=std)
    if metric == 'kid50k_full':
        real = _ref_features(ref, detector, batch_size, device, rank, num_gpus, KID_MAX_REAL)
        return {metric: metric_utils.kernel_distance(real, gen, num_subsets=100, max_subset_size=1000)}
    real = _ref_features(ref, detector, batch_size, device, rank, num_gpus, PR_MAX_REAL)
    precision, recall = metric_utils.precision_recall(real, gen, nhood_size=3, device=device)
    return dict(pr50k3_full_precision=precision, pr50k3_full_recall=recall)


def _stats_cache_path(ref, detector):
    """Where the statistics of dataset zip `ref` under `detector` are cached (keyed by path, size, mtime and the
    detector's name, as StyleGAN's metrics cache dataset statistics), or None: folders and unnamed detectors are
    not cached."""
    name = getattr(detector, 'name', None)
    if name is None or not os.path.isfile(ref):
        return None
    key = json.dumps([os.path.abspath(ref), os.path.getsize(ref), os.stat(ref).st_mtime_ns, name])
    base = os.path.splitext(os.path.basename(ref))[0]
    return dnnlib.util.make_cache_dir_path('dataset-stats', f'{base}-{hashlib.md5(key.encode()).hexdigest()}.npz')


def _on_every_rank(path):
    """True when every rank sees the file `path` (one tiny all-reduce): with a node-local or lagging cache, ranks
    that disagreed would pair the collectives of computing the statistics with nothing, or with the wrong ones."""
    missing = torch.tensor([0.0 if os.path.isfile(path) else 1.0])
    return dist.all_reduce_sum(missing).item() == 0


def _load_stats(ref, detector, kind, batch_size, device, rank, num_gpus):
    """(mu, sigma) of the reference: from an .npz, or computed from every image of a dataset folder/zip (zips:
    once, then from the cache)."""
    if _is_dataset(ref):
        cache = _stats_cache_path(ref, detector)
        if cache is not None and _on_every_rank(cache):
            ref = cache
        else:
            from training.data.dataset import ImageFolderDataset  # Deferred: only needed when a dataset is given.
            stats = metric_utils.FeatureStats(capture_all=False, capture_mean_cov=True)
            dataset = ImageFolderDataset(path=ref, use_labels=False, max_size=None)
            metric_utils.compute_dataset_stats(dataset, detector, stats, batch_size, device, rank, num_gpus)
            if cache is not None and rank == 0:
                os.makedirs(os.path.dirname(cache), exist_ok=True)
                metric_utils.save_ref(cache, stats)
            return stats.get_mean_cov()
    arrays = metric_utils.load_ref(ref, kind=kind)
    return arrays['mu'], arrays['sigma']


def check_ref(metric, ref):
    """Raise a UserError before any work if `metric` needs a reference and `ref` is missing or unusable."""
    kind = ref_kind(metric)
    if kind is None:
        return
    if ref is None:
        need = 'a reference .npz with mu/sigma' if kind == 'stats' else 'an .npz with features'
        raise dnnlib.UserError(f'--ref: metric {metric} needs {need} or a dataset folder/zip')
    if _is_dataset(ref):
        if not os.path.exists(ref):
            raise dnnlib.UserError(f'--ref={ref}: no such dataset folder or zip')
        return
    metric_utils.load_ref(ref, need_features=(kind == 'features'), kind=detector_kind(metric))


def check_ref_width(ref_arrays, detector, image_shape, device):
    """Refuse, before any work, reference statistics of another feature width than the detector gives."""
    width = detectors.feature_dim(detector, image_shape, device)
    if len(ref_arrays['mu']) != width:
        raise dnnlib.UserError(f'--ref: statistics have {len(ref_arrays["mu"])} features but the detector gives '
                               f'{width} (computed with another --kind/--detector?)')


def calc_metric(metric, net, run_dir=None, snapshot_name=None, ref=None, detector=None, num_samples=None,
                batch_size=64, device='cpu', rank=None, num_gpus=None, sampler=None, sampler_kwargs=None, mid_t=None,
                metadata=None, allow_unsafe_pickle=False, repeats=1):
    """Compute `metric` for `net` (in eval mode on `device`); every rank must call it. Returns an EasyDict
    with results, metric, total_time, num_gpus, sampler, nfe, num_samples; with `run_dir`, rank 0 also
    appends it to <run_dir>/metric-<metric>.jsonl under `snapshot_name`.

    `ref`: reference for the metric (see ref_kind); `detector`: a loaded detector, a URL/path, or None for
    the default of the metric's kind; `mid_t`/`metadata` choose the 2-step intermediate time; `rank` and
    `num_gpus` default to torch_utils.distributed's; `repeats`: seed sets (see the module docstring).
    """
    check_metric(metric)
    check_ref(metric, ref)
    check_repeats(repeats)
    rank = dist.get_rank() if rank is None else rank
    num_gpus = dist.get_world_size() if num_gpus is None else num_gpus
    num_samples = check_metric(metric).num_samples if num_samples is None else int(num_samples)
    if not callable(detector):
        detector = load_metric_detector(metric, detector, allow_unsafe_pickle, device)
    if ref_kind(metric) == 'stats' and not _is_dataset(ref):
        image_shape = [net.img_channels, net.img_resolution, net.img_resolution]
        check_ref_width(metric_utils.load_ref(ref, kind=detector_kind(metric)), detector, image_shape, device)
    sampling = sampling_for(metric, net, sampler, sampler_kwargs, mid_t, metadata)
    start = time.time()
    per_set = [_compute(metric, net, ref, detector, num_samples, sampling, batch_size, device, rank, num_gpus, i)
               for i in range(repeats)]
    result = dnnlib.EasyDict(results=dnnlib.EasyDict(summarise_repeats(per_set)), metric=metric,
                             total_time=time.time() - start, num_gpus=num_gpus, sampler=sampling['sampler'],
                             nfe=sampling['nfe'], num_samples=num_samples, repeats=repeats)
    if repeats > 1:
        result.per_seed_set = [{k: _json_value(v) for k, v in r.items()} for r in per_set]
    if run_dir is not None:
        report_metric(result, run_dir, snapshot_name)
    return result


def check_repeats(repeats):
    if not isinstance(repeats, int) or repeats < 1:
        raise dnnlib.UserError(f'--repeats: the number of seed sets must be a positive integer, got {repeats!r}')


# EDM's evaluation protocol (Karras et al. 2022, Sec. 5 / Appendix F: the minimum of three FIDs with different seeds):
# one seed set gives its values; several give <name>_mean and <name>_min of each value over the sets.
def summarise_repeats(per_set):
    if len(per_set) == 1:
        return per_set[0]
    summary = {}
    for key in per_set[0]:
        values = [float(r[key]) for r in per_set]
        summary[f'{key}_mean'] = float(np.mean(values))
        summary[f'{key}_min'] = min(values)
    return summary


# ----------------------------------------------------------------------------------------------------------
# Records: one JSON object per line in <run_dir>/metric-<name>.jsonl.


def record_path(run_dir, metric):
    return os.path.join(run_dir, f'metric-{metric}.jsonl')


def _json_value(value):
    return float(value) if isinstance(value, (np.floating, np.integer)) else value


def read_records(run_dir, metric):
    """The records of `metric` in `run_dir` (an empty list when there are none yet)."""
    return run_records.read_jsonl(record_path(run_dir, metric))


def is_recorded(run_dir, metric, snapshot_name, repeats=1):
    """Whether `run_dir` records `metric` for `snapshot_name` with `repeats` seed sets."""
    return any(r.get('snapshot_pkl') == snapshot_name and r.get('repeats', 1) == repeats
               for r in read_records(run_dir, metric))


# Appending rewrites the file through atomic_write (read, add a line, rename into place): only rank 0
# writes, records are small, and a crash never leaves a half-written line that later reads would choke on.
def report_metric(result, run_dir, snapshot_name=None):
    """Append `result` (from calc_metric) to <run_dir>/metric-<name>.jsonl on rank 0; returns the line."""
    record = dict(results={k: _json_value(v) for k, v in result.results.items()}, metric=result.metric,
                  total_time=result.total_time, num_gpus=result.num_gpus, snapshot_pkl=snapshot_name,
                  sampler=result.sampler, nfe=result.nfe, num_samples=result.num_samples, timestamp=time.time())
    if result.get('repeats', 1) > 1:
        record.update(repeats=result.repeats, per_seed_set=result.per_seed_set)
    line = json.dumps(record)
    if run_dir is not None and dist.get_rank() == 0:
        path = record_path(run_dir, result.metric)
        previous = ''
        if os.path.isfile(path):
            with open(path, 'r', encoding='utf-8') as f:
                previous = f.read()
            if previous and not previous.endswith('\n'):
                previous += '\n'
        with dnnlib.util.atomic_write(path, 'w') as f:
            f.write(previous + line + '\n')
    return line


def format_result(result):
    """One human-readable line, e.g. 'fid50k_full 3.8512 (50000 samples, nfe 1, 612.3 s)'."""
    values = ' '.join(f'{k} {v:.4f}' for k, v in result.results.items())
    sets = f' x {result.repeats} seed sets' if result.get('repeats', 1) > 1 else ''
    return f'{values} ({result.num_samples} samples{sets}, nfe {result.nfe}, {result.total_time:.1f} s)'


def all_records(run_dir):
    """Every metric record in `run_dir` (all metric-*.jsonl files), in file-name then line order."""
    return run_records.metric_records(run_dir)


def summary_table(run_dir, snapshot_names=None):
    """Lines of a table (network, metric, sampler, NFE, samples, value) of the records of `snapshot_names`
    (every record when None), in the order given."""
    records = all_records(run_dir)
    order = {name: i for i, name in enumerate(snapshot_names or [])}
    if snapshot_names is not None:
        records = [r for r in records if r.get('snapshot_pkl') in order]
    records.sort(key=lambda r: (order.get(r.get('snapshot_pkl'), 0), r.get('nfe', 0), r['metric']))
    rows = [(str(r.get('snapshot_pkl')), r['metric'], str(r.get('sampler')), str(r.get('nfe')),
             str(r.get('num_samples')), ' '.join(f'{v:.4f}' for v in r['results'].values())) for r in records]
    header = ('network', 'metric', 'sampler', 'NFE', 'samples', 'value')
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return [' | '.join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
