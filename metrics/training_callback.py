"""Metric evaluation during training, as a training callback (train.py wires it in; the training package never
imports the metrics package).

MetricsCallback evaluates the initial network before the first step (`eval_init_metrics`, not on resume) with
its sample grids from both samplers (or, with `eval_init_background`, in a background process while training
starts: metrics.background), every EMA network each `eval_ticks` ticks and at the end (`metrics`), and prints a
table of the records at the end (not after a pre-emption). Records go to metric-*.jsonl in the run
directory (metrics.metric_main.report_metric), under the snapshot names the networks have.
"""

import torch

from metrics import background, metric_main
from torch_utils import distributed as dist
from training.loop import run_files
from training.loop.callbacks import Callback


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


def score_initial_network(net, metrics, metrics_ref, mid_t, run_dir, device, num_samples=None, detector_files=None,
                          grids=True, detectors=None):
    """The initial network's grids grid-initial-{heun,1step,...}.png (rank 0, when `grids`) and `metrics`,
    recorded as initial-network.pt; `net` in eval mode. In the loop before the first step, or in the background
    process of metrics.background."""
    device = torch.device(device)
    net = net.to(device)
    if grids and dist.get_rank() == 0:
        runs = run_files.grid_runs('edm', mid_t) + run_files.grid_runs('consistency', mid_t)
        run_files.save_grids(net, run_dir, 'grid-initial', runs, device)
    evaluate_metrics(metrics, [('', net)], metrics_ref, mid_t, run_dir, 'initial-network', device,
                     num_samples, detectors, detector_files)


class MetricsCallback(Callback):
    """Metrics of the initial network, periodic metrics of the EMA networks and the summary table."""

    def __init__(self):
        self.detectors = {}     # feature networks by kind, loaded once per run
        self.background = None  # the running metrics.background.InitialEvaluation (rank 0), if any

    def _report_background(self):
        lines, self.background = self.background.finish(), None
        for line in lines:
            dist.print0(line)

    def _evaluate(self, run, metrics, nets, snapshot_prefix):
        o = run.options
        evaluate_metrics(metrics, nets, o.metrics_ref, o.mid_t, run.run_dir, snapshot_prefix, run.device,
                         o.metric_samples, self.detectors, o.detector_files)

    @torch.no_grad()
    def on_start(self, run):
        """Before training (not on resume): `eval_init_metrics` of the initial network (e.g. the transferred
        diffusion model), recorded as 'initial-network.pt', and its grids grid-initial-{tag}.png with both the EDM
        Heun and the consistency samplers, so 'before' and 'after' come from the same code. With
        `eval_init_background` rank 0 does this in a background process (metrics.background) instead, and a
        resumed run finishes the scores a pre-emption cut short."""
        o, net = run.options, run.state.net
        if not o.eval_init_metrics or (run.state.progress.cur_nimg != 0 and not o.eval_init_background):
            return
        job = dict(metrics=list(o.eval_init_metrics), metrics_ref=o.metrics_ref, mid_t=list(o.mid_t),
                   run_dir=run.run_dir, num_samples=o.metric_samples, detector_files=o.detector_files,
                   grids=bool(o.sample_ticks))
        if o.eval_init_background:
            if dist.get_rank() == 0:
                self.background = background.InitialEvaluation.start_or_resume(
                    net, run.run_dir, job, run.device, resumed=run.state.progress.cur_nimg != 0)
            return
        was_training = net.training
        net.eval()
        try:
            score_initial_network(net, **job, device=run.device, detectors=self.detectors)
        finally:
            net.train(was_training)

    def on_tick(self, run, stopping):
        """Reports a finished background evaluation (waits for it on the last tick, so the tick's trackers see its
        records, and before metrics: both rewrite the metric-*.jsonl files); metrics when due."""
        o, progress = run.options, run.state.progress
        due = o.metrics and (stopping or (o.eval_ticks and progress.cur_tick % o.eval_ticks == 0))
        if self.background is not None and (due or stopping or self.background.done()):
            self._report_background()
        if due:
            self._evaluate(run, o.metrics, run.state.ema.get(), f'network-snapshot-{progress.cur_nimg // 1000:06d}')

    def on_end(self, run, outcome):
        """The metric records of the initial network and of the final snapshots, as a table (rank 0)."""
        o = run.options
        if self.background is not None and outcome == 'preempted':
            self.background.cancel()
        elif self.background is not None:
            self._report_background()
        if outcome == 'preempted' or dist.get_rank() != 0 or not (o.metrics or o.eval_init_metrics):
            return
        kimg = run.state.progress.cur_nimg // 1000
        names = ['initial-network.pt'] + [f'network-snapshot-{kimg:06d}{suffix}.pt' for suffix, _ in run.state.ema.get()]
        table = metric_main.summary_table(run.run_dir, names)
        print('\n'.join(['Summary of the metric records (metric-*.jsonl):'] + table))
