"""Metric evaluation during training, as a training callback (train.py wires it in; the training package never
imports the metrics package).

MetricsCallback evaluates the initial network before the first step (`eval_init_metrics`, not on resume) with
its sample grids from both samplers, every EMA network each `eval_ticks` ticks and at the end (`metrics`), and
prints a table of the records at the end (not after a pre-emption). Records go to metric-*.jsonl in the run
directory (metrics.metric_main.report_metric), under the snapshot names the networks have.
"""

import torch

from metrics import metric_main
from torch_utils import distributed as dist
from training import run_files
from training.callbacks import Callback


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


class MetricsCallback(Callback):
    """Metrics of the initial network, periodic metrics of the EMA networks and the summary table."""

    def __init__(self):
        self.detectors = {}   # feature networks by kind, loaded once per run

    def _evaluate(self, run, metrics, nets, snapshot_prefix):
        o = run.options
        evaluate_metrics(metrics, nets, o.metrics_ref, o.mid_t, run.run_dir, snapshot_prefix, run.device,
                         o.metric_samples, self.detectors, o.detector_files)

    @torch.no_grad()
    def on_start(self, run):
        """Before training (not on resume): `eval_init_metrics` of the initial network (e.g. the transferred
        diffusion model), recorded as 'initial-network.pt', and its grids grid-initial-{tag}.png with both the EDM
        Heun and the consistency samplers, so 'before' and 'after' come from the same code."""
        o, net = run.options, run.state.net
        if run.state.progress.cur_nimg != 0 or not o.eval_init_metrics:
            return
        was_training = net.training
        net.eval()
        try:
            if o.sample_ticks and dist.get_rank() == 0:
                runs = run_files.grid_runs('edm', o.mid_t) + run_files.grid_runs('consistency', o.mid_t)
                run_files.save_grids(net, run.run_dir, 'grid-initial', runs, run.device)
            self._evaluate(run, o.eval_init_metrics, [('', net)], 'initial-network')
        finally:
            net.train(was_training)

    def on_tick(self, run, stopping):
        o, progress = run.options, run.state.progress
        if o.metrics and (stopping or (o.eval_ticks and progress.cur_tick % o.eval_ticks == 0)):
            self._evaluate(run, o.metrics, run.state.ema.get(), f'network-snapshot-{progress.cur_nimg // 1000:06d}')

    def on_end(self, run, outcome):
        """The metric records of the initial network and of the final snapshots, as a table (rank 0)."""
        o = run.options
        if outcome == 'preempted' or dist.get_rank() != 0 or not (o.metrics or o.eval_init_metrics):
            return
        kimg = run.state.progress.cur_nimg // 1000
        names = ['initial-network.pt'] + [f'network-snapshot-{kimg:06d}{suffix}.pt' for suffix, _ in run.state.ema.get()]
        table = metric_main.summary_table(run.run_dir, names)
        print('\n'.join(['Summary of the metric records (metric-*.jsonl):'] + table))
