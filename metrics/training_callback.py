"""Metric evaluation during training, as a training callback (train.py wires it in; the training package never
imports the metrics package).

MetricsCallback evaluates the initial network before the first step (`eval_init_metrics`, not on resume) with
its sample grids from both samplers (or, with `eval_init_background`, in a background process while training
starts: metrics.background), every EMA network each `eval_ticks` ticks and at the end (`metrics`), and prints a
table of the records at the end (not after a pre-emption). Records go to metric-*.jsonl in the run
directory (metrics.metric_main.report_metric), under the snapshot names the networks have.
"""

import torch

from metrics import background, metric_main, scoring
from torch_utils import distributed as dist
from training.loop.callbacks import Callback


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
        scoring.evaluate_metrics(metrics, nets, o.metrics_ref, o.mid_t, run.run_dir, snapshot_prefix, run.device,
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
            scoring.score_initial_network(net, **job, device=run.device, detectors=self.detectors)
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
