"""Callbacks: what the training loop does besides training, plugged in by the caller (train.py).

The loop calls every hook on every rank, in the order the callbacks were given; a hook that only one rank
should act on checks `torch_utils.distributed.get_rank()`. Collectives (metric evaluation) are allowed: every
rank reaches the same hooks at the same time. Hooks:

    on_start(run)             once, before the first step of this process (fresh or resumed:
                              run.state.progress.cur_nimg == 0 means fresh)
    on_tick(run, stopping)    at the end of every tick, after the status line, sample grids and network
                              snapshots, before the training state is written; `stopping` is True on the
                              last tick of this process (end of training or --max-hours)
    on_stats(run, stats)      after on_tick: the tick's statistics {name: dict(num, mean, std)}
                              (training_stats: Loss/loss, Timing/*, Resources/*, Progress/*)
    on_end(run, outcome)      after the last tick or the pre-emption state: 'done', 'timeout' or 'preempted'

`run` is a RunContext (below). Examples: training.loop.run_files.StatsWriter (stats.jsonl, TensorBoard) and
metrics.training_callback.MetricsCallback (periodic metric evaluation, wired in by train.py, so the training
package never imports the metrics package).
"""

import dataclasses

import torch

from training.checkpoints.checkpoint import TrainingState
from training.loop.options import TrainingOptions


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What callbacks may read (the state is live: it changes as training goes on; do not modify it)."""
    options: TrainingOptions    # the run's options
    run_dir: str                # the run directory
    device: torch.device        # this rank's device
    state: TrainingState        # net, ema, method, optimizer, scaler, progress


class Callback:
    """Base class of callbacks; every hook is a no-op here."""

    def on_start(self, run):
        """Before the first step of this process."""

    def on_tick(self, run, stopping):
        """At the end of every tick (after grids and snapshots, before the training state)."""

    def on_stats(self, run, stats):
        """The statistics of the tick that just ended."""

    def on_end(self, run, outcome):
        """After the last tick: outcome 'done', 'timeout' or 'preempted'."""
