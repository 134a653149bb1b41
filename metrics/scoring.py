"""Scoring networks during training: every metric of a list on a set of networks, recorded under their snapshot
names (evaluate_metrics), and the initial network with its sample grids (score_initial_network), shared by
the in-loop callback (metrics.training_callback) and the background process (metrics.background)."""

import torch

from metrics import metric_main
from torch_utils import distributed as dist
from training.loop import run_files
from training.sampling import samplers


def evaluate_metrics(metrics, nets, metrics_ref, mid_t, run_dir, snapshot_prefix, device, num_samples=None,
                     detectors=None, detector_files=None):
    """Every metric on every (suffix, net) with metric_main.calc_metric (all ranks take part; rank 0 records it
    under the snapshot name `{snapshot_prefix}{suffix}.pt`); `num_samples` None = the metric's own.
    `detectors` caches the loaded feature networks by kind across calls (a run evaluates many times);
    `detector_files` (keys detector, vgg16, dinov2, as train.py's flags) replaces the official files."""
    detectors = {} if detectors is None else detectors
    for suffix, net in nets:
        for metric in metrics:
            kind = metric_main.detector_kind(metric)
            if kind not in detectors:
                url = metric_main.detector_file(metric, **(detector_files or {}))
                detectors[kind] = metric_main.load_metric_detector(metric, url, device=device)
            result = metric_main.calc_metric(metric, net, ref=metrics_ref, detector=detectors[kind], device=device,
                                             mid_t=list(mid_t), num_samples=num_samples)
            metric_main.report_metric(result, run_dir, snapshot_name=f'{snapshot_prefix}{suffix}.pt')
            dist.print0(f'{metric}{suffix}: {metric_main.format_result(result)}')


def initial_grid_runs(net, mid_t):
    """The initial network's grids: EDM's Heun sampler (networks in EDM's D(x, σ) form: all but MeanFlow's), then
    1- and 2-step sampling with the network's few-step family (samplers.few_step_family; mid_t in its units)."""
    heun = [] if getattr(net, 'is_meanflow', False) else run_files.grid_runs('edm', mid_t)
    return heun + run_files.grid_runs(samplers.few_step_family(net) or 'consistency', mid_t)


def score_initial_network(net, metrics, metrics_ref, mid_t, run_dir, device, num_samples=None, detector_files=None,
                          grids=True, detectors=None):
    """The initial network's grids grid-initial-{heun,1step,...}.png (rank 0, when `grids`) and `metrics`,
    recorded as initial-network.pt; `net` in eval mode. In the loop before the first step, or in the background
    process of metrics.background."""
    device = torch.device(device)
    net = net.to(device)
    if grids and dist.get_rank() == 0:
        run_files.save_grids(net, run_dir, 'grid-initial', initial_grid_runs(net, mid_t), device)
    evaluate_metrics(metrics, [('', net)], metrics_ref, mid_t, run_dir, 'initial-network', device,
                     num_samples, detectors, detector_files)
