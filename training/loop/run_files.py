"""The files of a run directory besides training states: sample grids, network snapshots, stats.jsonl, and the
status line of a tick.

Files: grid-{kimg:06d}{suffix}-{tag}.png (tag: 1step/2step for consistency sampling, heun for EDM's sampler),
network-snapshot-{kimg:06d}{suffix}.pt (+ network-snapshot-latest{suffix}.pt), stats.jsonl (one JSON line per
tick) and, when asked for, TensorBoard events. `suffix` names the EMA ('' or e.g. '-b0.9999') or a network a
method exports (training.methods.base.Method.snapshot_networks).
"""

import json
import os
import time

import numpy as np
import psutil
import torch

from torch_utils import training_stats
from training.checkpoints import checkpoint
from training.sampling import samplers
from training.loop.callbacks import Callback
from training.sampling.generation import save_grid_png

def grid_inputs(net, num_images, device, seed=0):
    """Fixed latents and labels of the sample grids (per-seed generators, so every tick shows the same noise)."""
    rnd = samplers.StackedRandomGenerator(device, range(seed, seed + num_images))
    latents = rnd.randn([num_images, net.img_channels, net.img_resolution, net.img_resolution])
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[num_images], device=device)]
    return latents, labels, rnd


def grid_runs(grid_sampler, mid_t):
    """[(tag, sampler, kwargs)] of the grids: EDM Heun ('edm'), or 1-step and (1 + len(mid_t))-step sampling with
    a few-step sampler (samplers.FEW_STEP: consistency, trigflow, meanflow; mid_t in its time variable)."""
    if grid_sampler == 'edm':
        return [('heun', samplers.edm_sampler, {})]
    spec = samplers.FEW_STEP[grid_sampler]
    steps = [spec.make_steps(spec.t_max, [])]
    if mid_t:
        steps.append(spec.make_steps(spec.t_max, list(mid_t)))
    return [(f'{len(t_steps) - 1}step', spec.sampler, dict(t_steps=t_steps)) for t_steps in steps]


def save_grids(net, run_dir, prefix, runs, device, num_images=64):
    """{prefix}-{tag}.png for every (tag, sampler, kwargs) of `runs`, from fixed per-seed latents."""
    paths = []
    for tag, sampler, kwargs in runs:
        latents, labels, rnd = grid_inputs(net, num_images, device)
        x = sampler(net, latents, labels, randn_like=rnd.randn_like, **kwargs)
        paths.append(os.path.join(run_dir, f'{prefix}-{tag}.png'))
        save_grid_png(paths[-1], samplers.to_uint8(x))
    return paths


@torch.no_grad()
def save_sample_grids(ema, run_dir, kimg, mid_t, grid_sampler, device, num_images=64):
    """grid-{kimg:06d}{suffix}-{tag}.png for every EMA net (always in eval mode), from fixed per-seed latents."""
    runs = grid_runs(grid_sampler, mid_t)
    return [path for suffix, net in ema.get()
            for path in save_grids(net, run_dir, f'grid-{kimg:06d}{suffix}', runs, device, num_images)]


def save_snapshots(nets, run_dir, kimg, metadata):
    """network-snapshot-{kimg:06d}{suffix}.pt and network-snapshot-latest{suffix}.pt for every (suffix, net)."""
    for suffix, net in nets:
        meta = dict(metadata, kimg=kimg, ema=suffix)
        for name in (f'network-snapshot-{kimg:06d}{suffix}.pt', f'network-snapshot-latest{suffix}.pt'):
            checkpoint.save_network_snapshot(os.path.join(run_dir, name), net, **meta)


class StatsWriter(Callback):
    """Appends one JSON line per tick to stats.jsonl (single write on an O_APPEND file). Experiment trackers
    (TensorBoard, W&B) are callbacks of their own: training.loop.trackers."""

    def __init__(self,
                 run_dir,            # where stats.jsonl goes
                 ):
        self.path = os.path.join(run_dir, 'stats.jsonl')

    def on_stats(self, run, stats):
        self.write(stats, time.time())

    def write(self, stats, timestamp):
        line = json.dumps(dict(stats, timestamp=timestamp)) + '\n'
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode('utf-8'))
        finally:
            os.close(fd)


def _format_time(seconds):
    s = int(np.rint(seconds))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    return f'{s // 3600}h {(s // 60) % 60:02d}m'


def eta_sec(progress, tick_sec, tick_nimg, maintenance_sec, total_nimg):
    """Estimated seconds to `total_nimg`: the images still to train at this tick's pace, maintenance included."""
    remaining = max(total_nimg - progress.cur_nimg, 0)
    return remaining * (tick_sec + maintenance_sec) / max(tick_nimg, 1)


def tick_clock(device, starting=False):
    """time.time() once `device` has done the work queued so far (CUDA runs ahead of the host: unsynchronised, a
    tick's time would leave its last steps out and bill them to the next); at a tick's start (`starting`) the peak
    memory counter that tick_status reports (gpumem) is also reset, so each status line shows its own tick's peak.
    On the CPU only time.time()."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        if starting:
            torch.cuda.reset_peak_memory_stats(device)
    return time.time()


def tick_status(collector, progress, tick_sec, tick_nimg, maintenance_sec, device, scalars, total_nimg=None):
    """The EDM-style status line of a tick (also reports the timing/resource statistics); `scalars` are the
    method's schedule values (e.g. the curriculum stage), reported as Progress/<name>; with `total_nimg`, the
    line ends with the estimated time left (eta)."""
    gpumem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0.0
    cpumem = psutil.Process(os.getpid()).memory_info().rss / 2**30
    sec_per_kimg = tick_sec / max(tick_nimg, 1) * 1e3
    reports = [('Timing/sec_per_tick', tick_sec), ('Timing/sec_per_kimg', sec_per_kimg),
               ('Timing/maintenance_sec', maintenance_sec), ('Resources/cpu_mem_gb', cpumem),
               ('Resources/peak_gpu_mem_gb', gpumem), ('Progress/kimg', progress.cur_nimg / 1e3)]
    for name, value in reports + [(f'Progress/{name}', value) for name, value in scalars.items()]:
        training_stats.report0(name, value)
    return ' '.join([
        f'tick {progress.cur_tick:<5d}', f'kimg {progress.cur_nimg / 1e3:<9.1f}',
        f'loss {collector.mean("Loss/loss"):<9.4g}', f'time {_format_time(progress.elapsed_sec):<9s}',
        f'sec/tick {tick_sec:<7.1f}', f'sec/kimg {sec_per_kimg:<7.2f}', f'img/s {tick_nimg / max(tick_sec, 1e-9):<8.1f}',
        f'maintenance {maintenance_sec:<6.1f}', f'cpumem {cpumem:<6.2f}', f'gpumem {gpumem:<6.2f}',
        *[f'{name} {value:.6g}' for name, value in scalars.items()],
        *([f'eta {_format_time(eta_sec(progress, tick_sec, tick_nimg, maintenance_sec, total_nimg))}']
          if total_nimg is not None else [])])
