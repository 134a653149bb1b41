"""Experiment trackers as training-loop callbacks (training.loop.callbacks): Weights & Biases (train.py
--wandb=PROJECT[/RUN]) and TensorBoard (--tensorboard).

Both receive, at the end of every tick, the scalars stats.jsonl records (the mean of each statistic: Loss/loss,
Progress/lr, Progress/stage, Timing/*, Resources/*), the sample grids written since the last tick
(grid-*.png) and the metric records added since (metric-*.jsonl, e.g. 1- and 2-step FID). Only rank 0 logs.

W&B is never required: without the `wandb` package --wandb is one clear message; without a login or a network
it logs offline into <run dir>/wandb (upload later with `wandb sync`); WANDB_MODE is respected. The W&B run id is
kept in the training state, so a resumed run (--resume, in a new run directory or in place) continues the same
W&B run. TensorBoard events go to the run directory (`tensorboard --logdir training-runs`).
"""

import glob
import json
import os

import numpy as np
import PIL.Image

import dnnlib
from torch_utils import distributed as dist
from training.loop import run_records
from training.loop.callbacks import Callback

WANDB_INIT_TIMEOUT_SEC = 30     # how long an online W&B start may take before falling back to offline logging
WANDB_ID_KEY = 'wandb_run_id'   # where the W&B run id lives in TrainingState.trackers


class RunFollower:
    """What a run directory gained since the last call: new sample grids and new metric records."""

    def __init__(self,
                 run_dir,   # the run directory to follow
                 ):
        self.run_dir = run_dir
        self.seen_grids = set()
        self.seen_records = {}   # metric name -> number of its records already handed out

    def mark_all_seen(self):
        """Treat everything already in the directory as handed out (a run resumed in place logged it before)."""
        self.new_grids()
        self.new_metric_records()

    def new_grids(self):
        """[(key, kimg, path)] of grid-*.png files not handed out yet; key e.g. 'grid/1step', 'grid/b0.9999-2step'."""
        found = []
        for path in sorted(glob.glob(os.path.join(self.run_dir, 'grid-*.png'))):
            if path in self.seen_grids:
                continue
            self.seen_grids.add(path)
            when, _, rest = os.path.basename(path)[len('grid-'):-len('.png')].partition('-')
            kimg = 0.0 if when == 'initial' else float(when) if when.isdigit() else None
            key = f'grid/{"initial-" if when == "initial" else ""}{rest.lstrip("-")}'
            found.append((key, kimg, path))
        return found

    def new_metric_records(self):
        """Metric records appended since the last call (all metric-*.jsonl files)."""
        found = []
        for name in run_records.metric_names(self.run_dir):
            records = run_records.read_jsonl(os.path.join(self.run_dir, f'metric-{name}.jsonl'))
            found += records[self.seen_records.get(name, 0):]
            self.seen_records[name] = len(records)
        return found


def tick_scalars(stats):
    """{statistic: mean} of one tick's statistics (what a stats.jsonl line holds)."""
    return {name: value['mean'] for name, value in stats.items() if isinstance(value, dict) and 'mean' in value}


def metric_scalars(records):
    """[(key, value, snapshot kimg)] of metric records; key 'metrics/<result>[<snapshot suffix>]' (e.g. the EMA)."""
    out = []
    for record in records:
        name = str(record.get('snapshot_pkl') or '')
        suffix = run_records.snapshot_suffix(name)
        out += [(f'metrics/{key}{suffix}', value, run_records.snapshot_kimg(name))
                for key, value in run_records.record_value(record)]
    return out


def read_png(path):
    return np.asarray(PIL.Image.open(path).convert('RGB'))

# ----------------------------------------------------------------------------------------------------------
# Weights & Biases.


def parse_wandb_target(target):
    """'PROJECT[/RUN]' -> (project, run name or None); UserError naming --wandb when malformed."""
    project, _, name = str(target).partition('/')
    if not project.strip() or '/' in name:
        raise dnnlib.UserError(f'--wandb={target}: expected PROJECT or PROJECT/RUN')
    return project.strip(), name.strip() or None


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise dnnlib.UserError('--wandb: the wandb package is not installed (pip install wandb); it is an optional '
                               'dependency') from None
    return wandb


class WandbCallback(Callback):
    """Logs every tick's scalars, the new sample grids and metric records to a W&B run (rank 0 only)."""

    def __init__(self,
                 target,    # 'PROJECT[/RUN]' (--wandb)
                 ):
        self.project, self.name = parse_wandb_target(target)
        self.wandb = import_wandb()
        self.run = None
        self.follower = None

    def on_start(self, run):
        if dist.get_rank() != 0:
            return
        self.follower = RunFollower(run.run_dir)
        if run.state.progress.cur_nimg > 0:
            self.follower.mark_all_seen()
        run_id = run.state.trackers.get(WANDB_ID_KEY)
        kwargs = dict(project=self.project, name=self.name or os.path.basename(os.path.normpath(run.run_dir)),
                      id=run_id, resume='allow' if run_id else None, dir=run.run_dir, config=_plain_config(run))
        self.run = self._init(kwargs)
        run.state.trackers[WANDB_ID_KEY] = self.run.id
        self.run.define_metric('kimg')
        self.run.define_metric('*', step_metric='kimg')
        dist.print0(f'W&B: run {self.run.id} ({self.run.settings.mode}) in project {self.project}')

    def _init(self, kwargs):
        """wandb.init online when possible (or as WANDB_MODE says), else offline into the run directory."""
        if os.environ.get('WANDB_MODE'):
            return self.wandb.init(**kwargs)
        try:
            return self.wandb.init(**kwargs, settings=self.wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_SEC))
        except Exception as e:   # any failure to go online (no login, no network, server error) -> offline
            dist.print0(f'W&B: cannot log online ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]}); '
                        f'logging offline to {kwargs["dir"]}/wandb (upload later: wandb sync <that folder>)')
            return self.wandb.init(**kwargs, mode='offline')

    def on_stats(self, run, stats):
        if self.run is None:
            return
        kimg = run.state.progress.cur_nimg / 1e3
        for key, value, snapshot_kimg in metric_scalars(self.follower.new_metric_records()):
            self.run.log({'kimg': kimg if snapshot_kimg is None else snapshot_kimg, key: value})
        images = {key: self.wandb.Image(path, caption=os.path.basename(path)) for key, _, path in self.follower.new_grids()}
        self.run.log(dict(tick_scalars(stats), kimg=kimg, **images))

    def on_end(self, run, outcome):
        if self.run is not None:
            self.run.summary['outcome'] = outcome
            self.run.finish()
            self.run = None


def _plain_config(run):
    """The run's options as plain JSON data for the W&B config."""
    return json.loads(json.dumps(run.options.to_dict(), default=str))

# ----------------------------------------------------------------------------------------------------------
# TensorBoard.


def import_tensorboard():
    try:
        import torch.utils.tensorboard as tb
    except ImportError:
        raise dnnlib.UserError('--tensorboard: the tensorboard package is not installed (pip install tensorboard); '
                               'it is an optional dependency') from None
    return tb


class TensorBoardCallback(Callback):
    """TensorBoard events in the run directory: every tick's scalars (step = images seen), the sample grids and
    the metric records (step = images seen by the snapshot they score); rank 0 only."""

    def __init__(self,
                 run_dir,   # where the events go
                 ):
        self.writer = import_tensorboard().SummaryWriter(run_dir) if dist.get_rank() == 0 else None
        self.follower = RunFollower(run_dir)

    def on_start(self, run):
        if run.state.progress.cur_nimg > 0:
            self.follower.mark_all_seen()

    def on_stats(self, run, stats):
        if self.writer is None:
            return
        nimg = int(run.state.progress.cur_nimg)
        for name, value in tick_scalars(stats).items():
            self.writer.add_scalar(name, value, global_step=nimg)
        for key, kimg, path in self.follower.new_grids():
            self.writer.add_image(key, read_png(path), global_step=nimg if kimg is None else int(kimg * 1000),
                                  dataformats='HWC')
        for key, value, kimg in metric_scalars(self.follower.new_metric_records()):
            self.writer.add_scalar(key, value, global_step=nimg if kimg is None else int(kimg * 1000))
        self.writer.flush()

    def on_end(self, run, outcome):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def tracker_callbacks(options, run_dir):
    """The tracker callbacks a run's options ask for (--tensorboard, --wandb), in that order."""
    return ([TensorBoardCallback(run_dir)] if options.tensorboard else []) + \
        ([WandbCallback(options.wandb)] if getattr(options, 'wandb', None) else [])
