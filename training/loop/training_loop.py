"""The training loop (EDM-style): `training_loop(options, run_dir, callbacks)`.

`options` is a training.loop.options.TrainingOptions (configs.presets builds it, every component as
dict(class_name=..., **kwargs)). The loop runs single-process or under torchrun (DDP: NCCL on GPUs, gloo on
CPUs), accumulates gradients over `batch_gpu`-sized rounds so the gradient equals that of the whole batch,
calls the training method's hooks (training/methods/base.py) and never asks which method it runs, reports a
status line per tick, writes sample grids, network snapshots and training states (training/loop/run_files.py,
training.checkpoints.checkpoint.TrainingState), calls the callbacks (training/loop/callbacks.py; periodic metric evaluation is
one, wired in by train.py) and stops cleanly on SIGTERM/SIGUSR1 (pre-emption) after writing a state at the
next step boundary.
"""

import contextlib
import time
import types

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training import compile as tc
from training.loop import run_files
from training.loop import runtime
from training.loop import trackers
from training.loop.callbacks import RunContext
from training.checkpoints.checkpoint import TrainingState
from training.methods.loss import reduce_loss
from training.methods.base import Progress
from training.networks.layers import set_memory_format

AUTOCAST_DTYPES = types.MappingProxyType(dict(fp32=None, tf32=None, bf16=torch.bfloat16, fp16=torch.float16))

# ----------------------------------------------------------------------------------------------------------
# The learning rate and the training step.


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


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def accumulate_gradients(ddp, loss_fn, data_iterator, num_rounds, batch_size, device, autocast_dtype=None, scaler=None):
    """Forward and backward of one batch in `num_rounds` micro-batches; gradients synced on the last round only.
    `loss_fn(net=ddp, images=images, labels=labels)` returns per-sample losses (a method's `loss`).

    Each round adds sum(per-sample losses) / batch_size (the GLOBAL batch size, docs/ECT.md §3 step 9), times the
    world size because DDP averages gradients over ranks: the gradient equals the unsplit batch's.
    """
    world_size = dist.get_world_size()
    for round_idx in range(num_rounds):
        with misc.ddp_sync(ddp, round_idx == num_rounds - 1):
            images, labels = next(data_iterator)
            # non_blocking: from the loader's pinned memory the host does not wait for the copy (no-op on the CPU)
            images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
            labels = labels.to(device, non_blocking=True).to(torch.float32)
            with _autocast(device, autocast_dtype):
                loss = loss_fn(net=ddp, images=images, labels=labels)
            loss = loss.to(torch.float32)
            training_stats.report('Loss/loss', loss)
            scaled = reduce_loss(loss, batch_size) * world_size
            (scaler.scale(scaled) if scaler is not None else scaled).backward()


def optimizer_step(net, optimizer, lr, scaler=None, grad_clip_norm=None):
    """Set the learning rate, unscale (fp16), replace non-finite gradient entries (docs/ECT.md §6 'grads'), clip
    the global gradient norm to `grad_clip_norm` (None: no clipping; NVlabs/FastGen's GradClipCallback order), step.

    With a GradScaler, unscale_ runs BEFORE nan_to_num, so the scaler has already seen any overflow and skips
    that step; nan_to_num only protects the fp32/bf16 paths and keeps the unscaled gradients finite.
    """
    for group in optimizer.param_groups:
        group['lr'] = lr
    if scaler is not None:
        scaler.unscale_(optimizer)
    misc.nan_to_num_grads_(net.parameters(), nan=0.0, posinf=1e5, neginf=-1e5)
    if grad_clip_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip_norm, foreach=True)
        training_stats.report0('Progress/grad_norm', norm)   # before clipping
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if hasattr(net, 'normalize_weights_'):   # EDM2 forced weight normalisation, once per optimiser step
        net.normalize_weights_()


def training_step(ddp, net, loss_fn, optimizer, data_iterator, num_rounds, batch_size, lr, device,
                  autocast_dtype=None, scaler=None, grad_clip_norm=None):
    """One optimiser step on one global batch."""
    optimizer.zero_grad(set_to_none=True)
    accumulate_gradients(ddp, loss_fn, data_iterator, num_rounds, batch_size, device, autocast_dtype, scaler)
    optimizer_step(net, optimizer, lr, scaler, grad_clip_norm)

# ----------------------------------------------------------------------------------------------------------
# The run.


def build_state(options, dataset, device):
    """The TrainingState of a fresh run: network (from --transfer unless resuming), method (set up), optimiser,
    EMA, scaler."""
    transfer = options.transfer if options.resume_state is None else None
    net = runtime.build_network(options.network_kwargs, dataset, transfer, device, options.seed)
    method = dnnlib.util.construct_class_by_name(**options.method_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(),
                                                    **runtime.optimizer_kwargs_for(options.optimizer_kwargs, device))
    ema = dnnlib.util.construct_class_by_name(net, **options.ema_kwargs)
    if options.channels_last:   # the trained network only: EMA copies and snapshots stay NCHW
        set_memory_format(net, 'channels_last')
    scaler = torch.amp.GradScaler(device.type) if options.precision == 'fp16' else None
    method.setup(net, device)
    return TrainingState(net=net, ema=ema, method=method, optimizer=optimizer, scaler=scaler)


def resume(state, path, seed):
    """state.resume(path, seed), keeping this run's optimiser implementation (fused on CUDA, foreach on the CPU)
    whatever the saving run used."""
    implementation = [{key: group.get(key) for key in runtime.IMPLEMENTATION_KEYS}
                      for group in state.optimizer.param_groups]
    state.resume(path, seed)
    runtime.restore_optimizer_implementation(state.optimizer, implementation)


def _due(ticks, cur_tick):
    """True every `ticks` ticks (never when ticks is None or 0)."""
    return bool(ticks) and cur_tick % ticks == 0


class Trainer:
    """One run of the loop on this rank: built once from the options, then `run()`."""

    def __init__(self,
                 options,       # training.loop.options.TrainingOptions
                 run_dir,       # output directory
                 callbacks=(),  # training.loop.callbacks.Callback objects (besides the stats.jsonl writer)
                 ):
        device = dist.device()
        o = options.replace(precision=runtime.resolve_precision(options.precision, device))
        runtime.setup_runtime(o.seed, o.precision)
        batch_gpu, self.num_rounds = runtime.check_batch(o.batch_size, o.batch_gpu, dist.get_world_size())
        dataset = runtime.build_dataset(o.dataset_kwargs)
        state = build_state(o, dataset, device)
        if o.resume_state is not None:
            resume(state, o.resume_state, o.seed)
            dist.print0(f'Resumed from {o.resume_state} at {state.progress.cur_nimg / 1e3:.1f} kimg, '
                        f'tick {state.progress.cur_tick}')
        self.run_ctx = RunContext(options=o, run_dir=run_dir, device=device, state=state)
        # --compile: DDP around the compiled module (training/methods/loss_compiled.py says why); state.net, the EMAs and
        # everything saved stay the plain module.
        self.ddp = runtime.wrap_ddp(tc.compile_network(state.net, o.compile), device, o.find_unused_parameters)
        self.data_iterator = runtime.build_data_iterator(dataset, o.data_loader_kwargs, batch_gpu, o.seed,
                                                         state.progress.cur_nimg, device, o.data_on_device)
        self.lr_schedule = dnnlib.util.construct_class_by_name(**o.lr_kwargs)
        self.nimg_before = state.method.steps_before() * o.batch_size   # an earlier run's images, for lr and EMA
        self.callbacks = ([run_files.StatsWriter(run_dir)] if dist.get_rank() == 0 else []) \
            + trackers.tracker_callbacks(o, run_dir) + list(callbacks)
        self.scalars = {}   # the method's schedule values of the last step
        # Under NCCL a gloo group: agree_any without a GPU sync per step, and the end-of-tick wait for rank 0's
        # files (snapshots, training state) on the host, out of reach of NCCL's watchdog.
        self.host_group = dist.host_group()

    def progress(self):
        """The method-facing (immutable) view of the progress."""
        o, p = self.run_ctx.options, self.run_ctx.state.progress
        return Progress(cur_nimg=p.cur_nimg, batch_size=o.batch_size, total_nimg=int(round(o.total_kimg * 1000)),
                        tick_kimg=o.tick_kimg)

    def step(self):
        """The method's schedule, the learning rate, one optimiser step, the method's after_step, the EMA update."""
        o, s = self.run_ctx.options, self.run_ctx.state
        self.scalars = s.method.schedule(self.progress())
        lr = o.optimizer_kwargs['lr'] * self.lr_schedule(self.nimg_before + s.progress.cur_nimg, o.batch_size)
        training_stats.report0('Progress/lr', lr)
        training_step(self.ddp, s.net, s.method.loss, s.optimizer, self.data_iterator, self.num_rounds,
                      o.batch_size, lr, self.run_ctx.device, AUTOCAST_DTYPES[o.precision], s.scaler, o.grad_clip_norm)
        s.progress.cur_nimg += o.batch_size
        s.method.after_step(s.net, self.progress())
        s.ema.update(self.nimg_before + s.progress.cur_nimg, o.batch_size)

    def write_state(self):
        self.run_ctx.state.save(self.run_ctx.run_dir, self.run_ctx.options.to_dict())

    def maintenance(self, stopping):
        """After a tick: sample grids, snapshots, callbacks, training state (each when due, all when stopping)."""
        o, s, run_dir = self.run_ctx.options, self.run_ctx.state, self.run_ctx.run_dir
        rank0 = dist.get_rank() == 0
        kimg, tick = s.progress.cur_nimg // 1000, s.progress.cur_tick
        if o.sample_ticks and (stopping or _due(o.sample_ticks, tick)) and rank0:
            run_files.save_sample_grids(s.ema, run_dir, kimg, o.mid_t, o.grid_sampler, self.run_ctx.device)
        if (stopping or _due(o.snapshot_ticks, tick)) and rank0:
            metadata = dict(nimg=s.progress.cur_nimg, mid_t=list(o.mid_t), training_options=o.to_dict(),
                            **s.method.snapshot_metadata())
            nets = list(s.ema.get()) + list(s.method.snapshot_networks().items())
            run_files.save_snapshots(nets, run_dir, kimg, metadata)
        # The callbacks' and statistics' collectives run on the default (NCCL) group: the others wait for rank 0's
        # files on the host first (a large snapshot or state outlasts NCCL's watchdog).
        dist.barrier(self.host_group)
        for callback in self.callbacks:
            callback.on_tick(self.run_ctx, stopping)
        if stopping or _due(o.state_dump_ticks, tick):
            self.write_state()
            dist.barrier(self.host_group)

    def end_tick(self, collector, tick_sec, maintenance_sec, stopping):
        """The status line, maintenance and the tick's statistics."""
        p = self.run_ctx.state.progress
        collector.update()
        dist.print0(run_files.tick_status(collector, p, tick_sec, p.cur_nimg - p.tick_start_nimg, maintenance_sec,
                                          self.run_ctx.device, self.scalars,
                                          int(round(self.run_ctx.options.total_kimg * 1000))))
        p.cur_tick += 1
        p.tick_start_nimg = p.cur_nimg
        self.maintenance(stopping)
        collector.update()
        for callback in self.callbacks:
            callback.on_stats(self.run_ctx, collector.as_dict())
        dist.barrier(self.host_group)

    def run(self, handler):
        """Steps until done, out of time (--max-hours) or pre-empted; returns 'done', 'timeout' or 'preempted'."""
        o, p = self.run_ctx.options, self.run_ctx.state.progress
        total_nimg = int(round(o.total_kimg * 1000))
        start_time, elapsed_before = time.time(), p.elapsed_sec
        for callback in self.callbacks:
            callback.on_start(self.run_ctx)
        if o.sample_ticks and dist.get_rank() == 0:
            run_files.save_sample_grids(self.run_ctx.state.ema, self.run_ctx.run_dir, p.cur_nimg // 1000, o.mid_t,
                                        o.grid_sampler, self.run_ctx.device)
        collector = training_stats.Collector(regex='.*')
        collector.update()   # baseline: statistics reported before this run (same process) are not this run's
        tick_start_time = run_files.tick_clock(self.run_ctx.device, starting=True)
        maintenance_sec = tick_start_time - start_time
        while p.cur_nimg < total_nimg:
            self.step()
            p.elapsed_sec = elapsed_before + time.time() - start_time
            out_of_time = o.max_hours is not None and p.elapsed_sec >= o.max_hours * 3600
            preempted, out_of_time = runtime.agree_any(handler.requested, out_of_time, group=self.host_group)
            if preempted:
                dist.print0(f'Pre-emption signal: writing the training state at {p.cur_nimg / 1e3:.1f} kimg')
                self.write_state()
                return 'preempted'
            stopping = p.cur_nimg >= total_nimg or out_of_time
            if not stopping and p.cur_nimg < p.tick_start_nimg + o.tick_kimg * 1000:
                continue
            tick_end_time = run_files.tick_clock(self.run_ctx.device)
            self.end_tick(collector, tick_end_time - tick_start_time, maintenance_sec, stopping)
            if out_of_time:
                dist.print0(f'Stopping after {p.elapsed_sec / 3600:.2f} hours (--max-hours)')
                return 'timeout'
            tick_start_time = run_files.tick_clock(self.run_ctx.device, starting=True)
            maintenance_sec = tick_start_time - tick_end_time
        return 'done'


def training_loop(options, run_dir='.', callbacks=(), preemption=None):
    """Train; returns 'done', 'preempted' or 'timeout'. `preemption`: a runtime.PreemptionHandler (None = a
    fresh one on SIGTERM/SIGUSR1)."""
    trainer = Trainer(options, run_dir, callbacks)
    with (preemption or runtime.PreemptionHandler()).installed() as handler:
        outcome = trainer.run(handler)
    for callback in trainer.callbacks:
        callback.on_end(trainer.run_ctx, outcome)
    return outcome
