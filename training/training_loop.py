"""The ECT training loop (EDM-style), in small functions.

`training_loop(**options)` takes the options that `configs.presets.resolve()` builds (every component as
dict(class_name=..., **kwargs)) plus `run_dir` and `resume_state`. It runs single-process or under torchrun
(DDP: NCCL on GPUs, gloo on CPUs), accumulates gradients over `batch_gpu`-sized rounds so the gradient equals
that of the whole batch, recomputes the curriculum stage from progress every step, reports a status line per
tick, writes sample grids, network snapshots and full training states, and stops cleanly on SIGTERM/SIGUSR1
(pre-emption) after writing a state at the next step boundary.

Files in the run directory: log.txt (written by train.py), stats.jsonl, grid-*.png,
network-snapshot-{kimg:06d}{suffix}.pt (+ network-snapshot-latest{suffix}.pt), training-state-{kimg:06d}.pt
(+ training-state-latest.pt), and TensorBoard events when asked for.
"""

import contextlib
import inspect
import json
import os
import signal
import threading
import time
import types

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training import checkpoint
from training import samplers
from training.dataset import InfiniteSampler
from training.generation import save_grid_png
from training.loss import curriculum_stage, reduce_loss

STATE_FORMAT = 'ect-training-state'
STATE_VERSION = 1
AUTOCAST_DTYPES = types.MappingProxyType(dict(fp32=None, tf32=None, bf16=torch.bfloat16, fp16=torch.float16))

# ----------------------------------------------------------------------------------------------------------
# Small components.


# Learning-rate schedule: the inverse square-root decay of EDM2 (Karras et al. 2024, "learning rate decay"),
# lr * 1/sqrt(max(step / decay_batches, 1)), times EDM's linear warm-up over `rampup_kimg` (Karras et al. 2022).
class LearningRateSchedule:
    def __init__(self,
                 decay_batches=0,   # steps before the inverse-sqrt decay starts; 0 = no decay
                 rampup_kimg=0,     # linear warm-up length in thousands of images; 0 = none
                 ):
        if decay_batches < 0 or rampup_kimg < 0:
            raise dnnlib.UserError(f'--lr-decay-batches/--lr-rampup: must be >= 0, got {decay_batches}, {rampup_kimg}')
        self.decay_batches = float(decay_batches)
        self.rampup_kimg = float(rampup_kimg)

    def __call__(self, cur_nimg, batch_size):
        """The factor applied to the base learning rate with `cur_nimg` images seen before the step."""
        factor = 1.0
        if self.decay_batches > 0:
            factor /= np.sqrt(max(cur_nimg / (self.decay_batches * batch_size), 1))
        if self.rampup_kimg > 0:
            factor *= min(cur_nimg / (self.rampup_kimg * 1000), 1)
        return float(factor)   # a python float: numpy scalars in the optimiser state break weights_only loads


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1 (cluster pre-emption) into a flag the loop reads at the next step boundary."""

    def __init__(self,
                 signums=(signal.SIGTERM, signal.SIGUSR1),   # signals that request a state dump and exit
                 ):
        self.signums = tuple(signums)
        self.received = None
        self._previous = {}

    def __call__(self, signum, frame):
        self.received = signum

    @property
    def requested(self):
        return self.received is not None

    @contextlib.contextmanager
    def installed(self):
        """Install the handler for the duration of the block (only possible from the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = {s: signal.signal(s, self) for s in self.signums}
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)


def _agree_any(*flags):
    """The flags OR-ed over all ranks (one tiny all-reduce when distributed), so every rank stops together."""
    local = torch.tensor([float(bool(f)) for f in flags])
    if dist.get_world_size() > 1:
        local = dist.all_reduce_sum(local)
    return [bool(v > 0) for v in local.tolist()]

# ----------------------------------------------------------------------------------------------------------
# Setup.


def setup_runtime(seed, precision):
    """Seed this rank and set the matmul precision switches; returns the device."""
    misc.set_seed(seed, dist.get_rank())
    allow_tf32 = precision == 'tf32'
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cudnn.benchmark = True
    return dist.device()


def check_batch(batch_size, batch_gpu, world_size):
    """(batch_gpu, rounds): micro-batch size per rank and accumulation rounds; one UserError if inconsistent."""
    if batch_size <= 0 or (batch_gpu is not None and batch_gpu <= 0):
        raise dnnlib.UserError(f'--batch/--batch-gpu: must be positive, got {batch_size}/{batch_gpu}')
    if batch_size % world_size != 0:
        raise dnnlib.UserError(f'--batch: {batch_size} is not divisible by the number of processes {world_size}')
    per_rank = batch_size // world_size
    batch_gpu = per_rank if batch_gpu is None or batch_gpu > per_rank else batch_gpu
    if per_rank % batch_gpu != 0:
        raise dnnlib.UserError(f'--batch/--batch-gpu: batch {batch_size} is not divisible by processes '
                               f'({world_size}) x batch-gpu ({batch_gpu})')
    return batch_gpu, per_rank // batch_gpu


def build_dataset(dataset_kwargs):
    return dnnlib.util.construct_class_by_name(**dataset_kwargs)


def build_data_iterator(dataset, data_loader_kwargs, batch_gpu, seed, start_nimg, device):
    """Endless iterator of (uint8 images, labels) micro-batches continuing at global image `start_nimg`."""
    sampler = InfiniteSampler(len(dataset), rank=dist.get_rank(), num_replicas=dist.get_world_size(), seed=seed,
                              start_index=start_nimg)
    kwargs = dict(data_loader_kwargs)
    if kwargs.get('num_workers', 0) == 0:
        kwargs.pop('prefetch_factor', None)
    kwargs['pin_memory'] = kwargs.get('pin_memory', False) and device.type == 'cuda'
    # A private generator: creating the iterator must not consume the global RNG (exact resume).
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu,
                                         generator=torch.Generator().manual_seed(seed), **kwargs)
    return iter(loader)


def check_transfer_compatible(src_net, dataset, name):
    """UserError when a transferred network does not fit the data (resolution, channels, labels)."""
    want = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    have = {key: getattr(src_net, key, None) for key in want}
    if have != want:
        raise dnnlib.UserError(f'--transfer: {name} is a network for {have} but the data (--data/--cond) gives {want}')


def build_network(network_kwargs, dataset, transfer, device, seed=0):
    """The trained network (train mode), initialised from `transfer` (docs/ECT.md §2) when given.

    The random initialisation uses its own seed, identical on every rank (so the EMA copies made before DDP
    broadcasts rank 0's weights agree too), without touching the per-rank RNG streams.
    """
    interface = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface)
    if transfer is not None:
        src = checkpoint.load_network(transfer)
        check_transfer_compatible(src, dataset, transfer)
        report = checkpoint.transfer_weights(src, net)
        dist.print0(f'Transfer from {transfer}: {report.summary()}')
    if hasattr(net, 'normalize_weights_'):
        # EDM2 forced weight normalisation precedes every training forward in EDM2; once here and then after
        # every optimiser step (optimizer_step) gives each step the same weights EDM2's would see.
        net.normalize_weights_()
    return net.train().requires_grad_(True).to(device)


def build_training_parts(net, loss_kwargs, optimizer_kwargs, lr_kwargs, ema_kwargs, precision, device):
    """(loss_fn, optimizer, base_lr, lr_schedule, ema, scaler) for `net`."""
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    base_lr = optimizer_kwargs['lr']
    lr_schedule = dnnlib.util.construct_class_by_name(**lr_kwargs)
    ema = dnnlib.util.construct_class_by_name(net, **ema_kwargs)
    scaler = torch.amp.GradScaler(device.type) if precision == 'fp16' else None
    return loss_fn, optimizer, base_lr, lr_schedule, ema, scaler


def wrap_ddp(net, device, find_unused_parameters):
    """DDP around `net` when there are several processes (the net itself otherwise)."""
    if dist.get_world_size() == 1:
        return net
    ddp_class = torch.nn.parallel.DistributedDataParallel
    # Buffers (fixed resampling filters) are never trained: no per-forward sync (the option's newer name first).
    no_buffer_sync = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(ddp_class).parameters \
        else 'broadcast_buffers'
    return ddp_class(net, device_ids=[device] if device.type == 'cuda' else None,
                     find_unused_parameters=find_unused_parameters, **{no_buffer_sync: False})

# ----------------------------------------------------------------------------------------------------------
# The training step.


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def accumulate_gradients(ddp, loss_fn, data_iterator, num_rounds, batch_size, device, autocast_dtype=None, scaler=None):
    """Forward and backward of one batch in `num_rounds` micro-batches; gradients synced on the last round only.

    Each round adds sum(per-sample losses) / batch_size (the GLOBAL batch size, docs/ECT.md §3 step 9), times the
    world size because DDP averages gradients over ranks: the gradient equals the unsplit batch's.
    """
    world_size = dist.get_world_size()
    for round_idx in range(num_rounds):
        with misc.ddp_sync(ddp, round_idx == num_rounds - 1):
            images, labels = next(data_iterator)
            images = images.to(device).to(torch.float32) / 127.5 - 1
            labels = labels.to(device).to(torch.float32)
            with _autocast(device, autocast_dtype):
                loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=None)
            loss = loss.to(torch.float32)
            training_stats.report('Loss/loss', loss)
            scaled = reduce_loss(loss, batch_size) * world_size
            (scaler.scale(scaled) if scaler is not None else scaled).backward()


def optimizer_step(net, optimizer, lr, scaler=None):
    """Set the learning rate, unscale (fp16), replace non-finite gradient entries (docs/ECT.md §6 'grads'), step.

    With a GradScaler, unscale_ runs BEFORE nan_to_num, so the scaler has already seen any overflow and skips
    that step; nan_to_num only protects the fp32/bf16 paths and keeps the unscaled gradients finite.
    """
    for group in optimizer.param_groups:
        group['lr'] = lr
    if scaler is not None:
        scaler.unscale_(optimizer)
    for param in net.parameters():
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if hasattr(net, 'normalize_weights_'):   # EDM2 forced weight normalisation, once per optimiser step
        net.normalize_weights_()


def training_step(ddp, net, loss_fn, optimizer, data_iterator, num_rounds, batch_size, lr, device,
                  autocast_dtype=None, scaler=None):
    """One optimiser step on one global batch."""
    optimizer.zero_grad(set_to_none=True)
    accumulate_gradients(ddp, loss_fn, data_iterator, num_rounds, batch_size, device, autocast_dtype, scaler)
    optimizer_step(net, optimizer, lr, scaler)

# ----------------------------------------------------------------------------------------------------------
# Training state (resume).


def _gather_rng_states():
    """The RNG states of every rank, in rank order (a collective)."""
    states = misc.get_rng_states()
    if dist.get_world_size() == 1:
        return [states]
    gathered = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(gathered, states)
    return gathered


def make_state(net, ema, optimizer, scaler, progress, options):
    """Everything needed to continue exactly: weights, EMAs, optimiser, scaler, progress, RNG of every rank.
    The data order is a function of (seed, images seen), so progress.cur_nimg is the sampler position."""
    return dict(format=STATE_FORMAT, version=STATE_VERSION, net=net.state_dict(), ema=ema.state_dict(),
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
                progress=dict(progress), rng=_gather_rng_states(), world_size=dist.get_world_size(),
                sampler_position=progress['cur_nimg'], options=json.loads(json.dumps(options)))


def save_state(run_dir, state):
    """training-state-{kimg:06d}.pt and training-state-latest.pt (rank 0 writes; atomic)."""
    if dist.get_rank() != 0:
        return
    kimg = state['progress']['cur_nimg'] // 1000
    for name in (f'training-state-{kimg:06d}.pt', 'training-state-latest.pt'):
        checkpoint.save_training_state(os.path.join(run_dir, name), state)


def load_state(path):
    """A training state written by save_state; UserError if it is not one."""
    state = checkpoint.load_training_state(path)
    if state.get('format') != STATE_FORMAT or state.get('version') != STATE_VERSION:
        raise dnnlib.UserError(f'{path}: not an ECT training state (format {state.get("format")!r}, '
                               f'version {state.get("version")!r})')
    missing = [k for k in ('net', 'ema', 'optimizer', 'progress', 'rng') if k not in state]
    if missing:
        raise dnnlib.UserError(f'{path}: training state lacks {missing}')
    return state


def restore_state(state, net, ema, optimizer, scaler, name):
    """Load weights, EMAs, optimiser and scaler from `state`; returns the progress dict."""
    try:
        net.load_state_dict(state['net'])
        optimizer.load_state_dict(state['optimizer'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise dnnlib.UserError(f'--resume: {name} does not match this network/optimiser configuration: '
                               f'{str(e).splitlines()[0]}') from None
    ema.load_state_dict(state['ema'])
    if scaler is not None and state.get('scaler') is not None:
        scaler.load_state_dict(state['scaler'])
    return dict(state['progress'])


def restore_rng(state, seed):
    """This rank's RNG states from `state`; with a different number of ranks the run cannot continue
    bit-for-bit, so each rank is reseeded from (seed, images seen) instead and that is said."""
    rng = state['rng']
    if len(rng) == dist.get_world_size():
        misc.set_rng_states(rng[dist.get_rank()])
        return
    dist.print0(f'Resume: the state was written by {len(rng)} processes, this run has {dist.get_world_size()}; '
                f'reseeding RNGs (the continuation is statistically, not bitwise, equivalent)')
    misc.set_seed(seed + state['progress']['cur_nimg'], dist.get_rank())

# ----------------------------------------------------------------------------------------------------------
# Outputs: sample grids, snapshots, stats.


def grid_inputs(net, num_images, device, seed=0):
    """Fixed latents and labels of the sample grids (per-seed generators, so every tick shows the same noise)."""
    rnd = samplers.StackedRandomGenerator(device, range(seed, seed + num_images))
    latents = rnd.randn([num_images, net.img_channels, net.img_resolution, net.img_resolution])
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[num_images], device=device)]
    return latents, labels, rnd


def grid_runs(grid_sampler, mid_t):
    """[(tag, sampler, kwargs)] of the grids: EDM Heun, or 1-step and (1 + len(mid_t))-step consistency sampling."""
    if grid_sampler == 'edm':
        return [('heun', samplers.edm_sampler, {})]
    steps = [samplers.make_consistency_steps(samplers.T_MAX)]
    if mid_t:
        steps.append(samplers.make_consistency_steps(samplers.T_MAX, list(mid_t)))
    return [(f'{len(t_steps) - 1}step', samplers.consistency_sampler, dict(t_steps=t_steps)) for t_steps in steps]


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


def save_snapshots(ema, run_dir, kimg, metadata):
    """network-snapshot-{kimg:06d}{suffix}.pt and network-snapshot-latest{suffix}.pt for every EMA net."""
    for suffix, net in ema.get():
        meta = dict(metadata, kimg=kimg, ema=suffix)
        for name in (f'network-snapshot-{kimg:06d}{suffix}.pt', f'network-snapshot-latest{suffix}.pt'):
            checkpoint.save_network_snapshot(os.path.join(run_dir, name), net, **meta)


class StatsWriter:
    """Appends one JSON line per tick to stats.jsonl (single write on an O_APPEND file) and, optionally,
    TensorBoard scalars (needs the `tensorboard` package, not a core dependency)."""

    def __init__(self,
                 run_dir,            # where stats.jsonl (and TensorBoard events) go
                 tensorboard=False,  # also write TensorBoard events
                 ):
        self.path = os.path.join(run_dir, 'stats.jsonl')
        self.writer = None
        if tensorboard:
            try:
                import torch.utils.tensorboard as tb
            except ImportError:
                raise dnnlib.UserError('--tensorboard: the tensorboard package is not installed '
                                       '(pip install tensorboard); it is not a core dependency') from None
            self.writer = tb.SummaryWriter(run_dir)

    def write(self, stats, cur_nimg, timestamp):
        line = json.dumps(dict(stats, timestamp=timestamp)) + '\n'
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode('utf-8'))
        finally:
            os.close(fd)
        if self.writer is not None:
            for name, value in stats.items():
                self.writer.add_scalar(name, value['mean'], global_step=int(cur_nimg / 1e3))
            self.writer.flush()


def _format_time(seconds):
    s = int(np.rint(seconds))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    return f'{s // 3600}h {(s // 60) % 60:02d}m'


def tick_status(collector, progress, tick_sec, tick_nimg, maintenance_sec, device, stage):
    """The EDM-style status line of a tick (also reports the timing/resource statistics)."""
    gpumem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0.0
    cpumem = psutil.Process(os.getpid()).memory_info().rss / 2**30
    sec_per_kimg = tick_sec / max(tick_nimg, 1) * 1e3
    for name, value in (('Timing/sec_per_tick', tick_sec), ('Timing/sec_per_kimg', sec_per_kimg),
                        ('Timing/maintenance_sec', maintenance_sec), ('Resources/cpu_mem_gb', cpumem),
                        ('Resources/peak_gpu_mem_gb', gpumem), ('Progress/kimg', progress['cur_nimg'] / 1e3),
                        ('Progress/stage', stage)):
        training_stats.report0(name, value)
    return ' '.join([
        f'tick {progress["cur_tick"]:<5d}', f'kimg {progress["cur_nimg"] / 1e3:<9.1f}',
        f'loss {collector.mean("Loss/loss"):<9.4g}', f'time {_format_time(progress["elapsed_sec"]):<9s}',
        f'sec/tick {tick_sec:<7.1f}', f'sec/kimg {sec_per_kimg:<7.2f}', f'img/s {tick_nimg / max(tick_sec, 1e-9):<8.1f}',
        f'maintenance {maintenance_sec:<6.1f}', f'cpumem {cpumem:<6.2f}', f'gpumem {gpumem:<6.2f}', f'stage {stage}'])


def evaluate_metrics(metrics, nets, metrics_ref, mid_t, run_dir, snapshot_prefix, device, num_samples=None,
                     detectors=None, detector_files=None):
    """Every metric on every (suffix, net) with metrics.metric_main.calc_metric (all ranks take part; rank 0
    records it under the snapshot name `{snapshot_prefix}{suffix}.pt`); `num_samples` None = the metric's own.
    `detectors` caches the loaded feature networks by kind across calls (a run evaluates many times);
    `detector_files` (keys detector, vgg16, dinov2, as train.py's flags) replaces the official files."""
    from metrics import metric_main
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


@torch.no_grad()
def evaluate_initial(cfg, parts):
    """Before training (not on resume): `eval_init_metrics` of the initial network (e.g. the transferred diffusion
    model), recorded under the snapshot name 'initial-network.pt', and its grids grid-initial-{tag}.png with both
    the EDM Heun and the consistency samplers, so 'before' and 'after' come from the same code."""
    was_training = parts.net.training
    net = parts.net.eval()
    try:
        if cfg.sample_ticks and dist.get_rank() == 0:
            runs = grid_runs('edm', cfg.mid_t) + grid_runs('consistency', cfg.mid_t)
            save_grids(net, cfg.run_dir, 'grid-initial', runs, parts.device)
        evaluate_metrics(cfg.eval_init_metrics, [('', net)], cfg.metrics_ref, cfg.mid_t, cfg.run_dir,
                         'initial-network', parts.device, cfg.metric_samples, parts.detectors, cfg.detector_files)
    finally:
        net.train(was_training)

# ----------------------------------------------------------------------------------------------------------
# The loop.


def _due(ticks, cur_tick):
    """True every `ticks` ticks (never when ticks is None or 0)."""
    return bool(ticks) and cur_tick % ticks == 0


def training_loop(
    run_dir                 = '.',      # output directory
    dataset_kwargs          = {},       # dataset component
    data_loader_kwargs      = {},       # torch DataLoader options (num_workers, pin_memory, prefetch_factor)
    network_kwargs          = {},       # network component (img_resolution/img_channels/label_dim from the data)
    loss_kwargs             = {},       # loss component (ECTLoss / EDMLoss)
    optimizer_kwargs        = {},       # optimiser component (torch.optim.*), with lr
    lr_kwargs               = {},       # learning-rate schedule component
    ema_kwargs              = {},       # EMA component (training.ema.*)
    total_kimg              = 25600,    # training length in thousands of images
    batch_size              = 128,      # global batch size
    batch_gpu               = None,     # micro-batch per process per round; None = no accumulation
    tick_kimg               = 12.8,     # images per tick, thousands
    double_ticks            = None,     # ticks per curriculum stage; None = never doubles
    snapshot_ticks          = 50,       # ticks between network snapshots; None/0 = only at the end
    state_dump_ticks        = 100,      # ticks between training states; None/0 = only at the end
    sample_ticks            = 50,       # ticks between sample grids; None/0 = none
    eval_ticks              = None,     # ticks between metric evaluations
    metrics                 = (),       # metric names (metrics.metric_main)
    metrics_ref             = None,     # reference statistics/dataset of the metrics
    eval_init_metrics       = (),       # metrics of the initial network, before the first step (not on resume)
    metric_samples          = None,     # generated images per metric evaluation; None = the metric's own count
    detector_files          = {},       # metric detector files (detector, vgg16, dinov2); missing = official
    max_hours               = None,     # stop (with a state) after this much training time
    seed                    = 0,        # global seed
    precision               = 'fp32',   # fp32 | tf32 | bf16 | fp16
    transfer                = None,     # initial weights: official pickle, URL or our snapshot
    mid_t                   = (samplers.CIFAR10_MID_T,), # intermediate times of multi-step sample grids
    grid_sampler            = 'consistency',  # consistency | edm
    find_unused_parameters  = False,    # DDP option for networks with parameters the loss never uses
    tensorboard             = False,    # also write TensorBoard events
    resume_state            = None,     # training-state file to continue from
    preemption              = None,     # PreemptionHandler; None = a fresh one on SIGTERM/SIGUSR1
):
    """Train; returns 'done', 'preempted' or 'timeout'."""
    cfg = dnnlib.EasyDict({k: v for k, v in locals().items() if k != 'preemption'})
    device = setup_runtime(seed, precision)
    batch_gpu, num_rounds = check_batch(batch_size, batch_gpu, dist.get_world_size())
    dataset = build_dataset(dataset_kwargs)
    net = build_network(network_kwargs, dataset, transfer if resume_state is None else None, device, seed)
    loss_fn, optimizer, base_lr, lr_schedule, ema, scaler = build_training_parts(
        net, loss_kwargs, optimizer_kwargs, lr_kwargs, ema_kwargs, precision, device)
    progress = dict(cur_nimg=0, cur_tick=0, tick_start_nimg=0, elapsed_sec=0.0, stage=0)
    state = load_state(resume_state) if resume_state is not None else None
    if state is not None:
        progress = restore_state(state, net, ema, optimizer, scaler, resume_state)
        dist.print0(f'Resumed from {resume_state} at {progress["cur_nimg"] / 1e3:.1f} kimg, tick {progress["cur_tick"]}')
    parts = dnnlib.EasyDict(
        device=device, num_rounds=num_rounds, net=net, ddp=wrap_ddp(net, device, find_unused_parameters),
        loss_fn=loss_fn, optimizer=optimizer, base_lr=base_lr, lr_schedule=lr_schedule, ema=ema, scaler=scaler,
        data_iterator=build_data_iterator(dataset, data_loader_kwargs, batch_gpu, seed, progress['cur_nimg'], device),
        stats=StatsWriter(run_dir, tensorboard) if dist.get_rank() == 0 else None, current_stage=None, detectors={})
    if state is not None:
        restore_rng(state, seed)
    with (preemption or PreemptionHandler()).installed() as handler:
        return _train(cfg, parts, progress, handler)


def _write_state(cfg, parts, progress):
    save_state(cfg.run_dir, make_state(parts.net, parts.ema, parts.optimizer, parts.scaler, progress, cfg))


def _step(cfg, parts, progress):
    """Curriculum stage from progress (logged when it changes), learning rate, one step, EMA update."""
    stage = curriculum_stage(progress['cur_nimg'], cfg.tick_kimg, cfg.double_ticks)
    if hasattr(parts.loss_fn, 'set_stage'):   # EDMLoss (diffusion pretraining) has no curriculum
        if stage != parts.current_stage:
            dist.print0(f'Curriculum stage {stage} at {progress["cur_nimg"] / 1e3:.1f} kimg')
        parts.loss_fn.set_stage(stage)
    parts.current_stage = progress['stage'] = stage
    lr = parts.base_lr * parts.lr_schedule(progress['cur_nimg'], cfg.batch_size)
    training_step(parts.ddp, parts.net, parts.loss_fn, parts.optimizer, parts.data_iterator, parts.num_rounds,
                  cfg.batch_size, lr, parts.device, AUTOCAST_DTYPES[cfg.precision], parts.scaler)
    progress['cur_nimg'] += cfg.batch_size
    parts.ema.update(progress['cur_nimg'], cfg.batch_size)


def _maintenance(cfg, parts, progress, stop):
    """After a tick: sample grids, snapshots, metrics, training state (each when due, all when stopping)."""
    rank0 = dist.get_rank() == 0
    kimg, tick = progress['cur_nimg'] // 1000, progress['cur_tick']
    if cfg.sample_ticks and (stop or _due(cfg.sample_ticks, tick)) and rank0:
        save_sample_grids(parts.ema, cfg.run_dir, kimg, cfg.mid_t, cfg.grid_sampler, parts.device)
    if (stop or _due(cfg.snapshot_ticks, tick)) and rank0:
        metadata = dict(nimg=progress['cur_nimg'], stage=progress['stage'], mid_t=list(cfg.mid_t), training_options=cfg)
        save_snapshots(parts.ema, cfg.run_dir, kimg, metadata)
    if cfg.metrics and (stop or _due(cfg.eval_ticks, tick)):
        evaluate_metrics(cfg.metrics, parts.ema.get(), cfg.metrics_ref, cfg.mid_t, cfg.run_dir,
                         f'network-snapshot-{kimg:06d}', parts.device, cfg.metric_samples, parts.detectors,
                         cfg.detector_files)
    if stop or _due(cfg.state_dump_ticks, tick):
        _write_state(cfg, parts, progress)


def print_summary(cfg, parts, progress):
    """The metric records of the initial network and of the final snapshots, as a table (rank 0)."""
    if dist.get_rank() != 0 or not (cfg.metrics or cfg.eval_init_metrics):
        return
    from metrics import metric_main
    kimg = progress['cur_nimg'] // 1000
    names = ['initial-network.pt'] + [f'network-snapshot-{kimg:06d}{suffix}.pt' for suffix, _ in parts.ema.get()]
    table = metric_main.summary_table(cfg.run_dir, names)
    print('\n'.join(['Summary of the metric records (metric-*.jsonl):'] + table))


def _train(cfg, parts, progress, handler):
    """The loop: steps, and at the end of every tick a status line, maintenance and stats."""
    total_nimg = int(round(cfg.total_kimg * 1000))
    start_time = time.time()
    elapsed_before = progress['elapsed_sec']
    if progress['cur_nimg'] == 0 and cfg.eval_init_metrics:
        evaluate_initial(cfg, parts)
    if cfg.sample_ticks and dist.get_rank() == 0:
        save_sample_grids(parts.ema, cfg.run_dir, progress['cur_nimg'] // 1000, cfg.mid_t, cfg.grid_sampler, parts.device)
    collector = training_stats.Collector(regex='.*')
    collector.update()   # baseline: statistics reported before this run (same process) are not this run's
    tick_start_time = time.time()
    maintenance_sec = tick_start_time - start_time
    while progress['cur_nimg'] < total_nimg:
        _step(cfg, parts, progress)
        progress['elapsed_sec'] = elapsed_before + time.time() - start_time
        out_of_time = cfg.max_hours is not None and progress['elapsed_sec'] >= cfg.max_hours * 3600
        preempted, out_of_time = _agree_any(handler.requested, out_of_time)
        if preempted:
            dist.print0(f'Pre-emption signal: writing the training state at {progress["cur_nimg"] / 1e3:.1f} kimg')
            _write_state(cfg, parts, progress)
            return 'preempted'
        stop = progress['cur_nimg'] >= total_nimg or out_of_time
        if not stop and progress['cur_nimg'] < progress['tick_start_nimg'] + cfg.tick_kimg * 1000:
            continue
        tick_end_time = time.time()
        collector.update()
        dist.print0(tick_status(collector, progress, tick_end_time - tick_start_time,
                                progress['cur_nimg'] - progress['tick_start_nimg'], maintenance_sec, parts.device,
                                progress['stage']))
        progress['cur_tick'] += 1
        progress['tick_start_nimg'] = progress['cur_nimg']
        _maintenance(cfg, parts, progress, stop)
        collector.update()
        if parts.stats is not None:
            parts.stats.write(collector.as_dict(), progress['cur_nimg'], time.time())
        dist.barrier()
        if out_of_time:
            dist.print0(f'Stopping after {progress["elapsed_sec"] / 3600:.2f} hours (--max-hours)')
            print_summary(cfg, parts, progress)
            return 'timeout'
        tick_start_time = time.time()
        maintenance_sec = tick_start_time - tick_end_time
    print_summary(cfg, parts, progress)
    return 'done'
