"""Benchmark the training step of one or several presets: sec/step, img/s, peak memory and, with several presets,
the ratio of each step to the first preset's, timed in interleaved rounds.

    python bench/bench_train.py                                         # CUDA if present, cifar10-ecm, batch 128
    python bench/bench_train.py --device=cpu --batch=8 --iters=2        # a quick CPU run
    python bench/bench_train.py --precision=fp32,tf32,bf16 --batch-gpu=64
    python bench/bench_train.py --device=cpu --batch=2 --arch-kwargs='{"model_channels":16}' --json=rows.json
    python bench/bench_train.py --compile                               # each precision eager AND compiled
    python bench/bench_train.py --preset=cifar10-ecm,cifar10-sct,cifar10-meanflow --progress=0.5 \\
        --device=cpu --batch=8 --precision=fp32 --arch-kwargs='{"model_channels":64}'   # sCT, MeanFlow vs ECT
    python bench/bench_train.py --preset=cifar10-ecm,cifar10-scd --teacher=edm-cifar10-vp.pkl   # sCD needs a file

The step is the training loop's own (training.loop.training_loop.training_step: the method's loss, backward,
nan_to_num, optimiser step) plus the method's after_step and the EMA update, on synthetic uint8 images of the preset's resolution already on
the device, as with --data-on-device (the speed does not depend on the data or the weights: --transfer is off,
and a teacher or other file the method reads must be a local file, never a URL: nothing is downloaded). Before
timing, the method's schedule is set at `--progress` of each preset's run (0: its first step; 0.5: mid-run, where
ECT's cifar10-ecm is at curriculum stage 4 and every sample has r > 0, so its target pass covers the whole batch
on the CPU too, and sCT's tangent warm-up is over). Timings are bracketed by torch.cuda.synchronize(). 'auto' is
resolved as the training loop does (bf16 on A100/H100).

Several presets (comma list) run the same `--batch`, `--precision` and `--arch-kwargs` (e.g. the same DDPM++
width for cifar10-ecm and cifar10-sct; cifar10-meanflow's U-Net is DDPM++ with two time embeddings and another
resampling filter: the parameter counts are printed). Their steps alternate within each round, the order rotating
from round to round, so a load that changes during the run (a shared machine) hits every preset alike; the ratio
to the first preset is the median of the per-round ratios, with their range. On the CPU the process CPU time per
step (time.process_time, all threads) and its ratio are printed too: on a machine shared with other jobs it moves
less than the wall time, above all with --threads=1.

Peak memory of a preset's run (its network, EMAs, optimiser state and the step's tensors; other presets' excluded):
on CUDA torch.cuda.max_memory_allocated over its last warm-up step, minus what was allocated before its state was
built; on the CPU the peak RSS increase (VmHWM) of a child process that builds the state and runs `warmup + 1`
steps (glibc keeps freed memory in the process: torch_utils/cpu_memory.py), so one preset's heap cannot hide
another's.
With --compile every precision is timed twice, eager and with the network torch.compile'd as train.py --compile
does; the first step (where the compile happens) is never among the timed ones and is reported on its own:
'compile s' is the first step's time minus the median step.
"""

import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from configs import checks, presets, presets_cm  # noqa: E402
from training import compile as tc  # noqa: E402
from training.loop import runtime  # noqa: E402
from training.loop import training_loop as tl  # noqa: E402
from training.methods.base import Progress  # noqa: E402


class SyntheticData:
    """Fixed shape stand-in for a dataset: the attributes build_network reads."""

    def __init__(self,
                 resolution,   # image side in pixels
                 channels,     # colour channels
                 label_dim,    # 0 = unconditional
                 ):
        self.resolution = resolution
        self.num_channels = channels
        self.label_dim = label_dim


def synthetic_batches(data, batch_gpu, device='cpu'):
    """Endless (uint8 images, one-hot labels) micro-batches on `device` (the CPU: as the DataLoader yields them)."""
    images = torch.randint(0, 256, [batch_gpu, data.num_channels, data.resolution, data.resolution], dtype=torch.uint8)
    labels = torch.eye(max(data.label_dim, 1))[torch.randint(max(data.label_dim, 1), [batch_gpu])][:, :data.label_dim]
    images, labels = images.to(device), labels.to(device)
    while True:
        yield images, labels


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def schedule_at(method, options, fraction):
    """Set the method's schedule at `fraction` of the run (its first step at 0); returns (that Progress, the
    schedule's scalars)."""
    total_nimg = int(round(options.total_kimg * 1000))
    progress = Progress(cur_nimg=int(fraction * total_nimg) // options.batch_size * options.batch_size,
                        batch_size=options.batch_size, total_nimg=total_nimg, tick_kimg=options.tick_kimg)
    with contextlib.redirect_stdout(io.StringIO()):   # ECT announces its stage; the table says it
        return progress, method.schedule(progress)


class StepRunner:
    """One preset's training state on `device`, stepped the way the loop steps it (precision already resolved and
    set up by setup_runtime)."""

    def __init__(self, options, data, precision, device, compiled=False, progress=0.0):
        self.options, self.device, self.precision = options, device, precision
        batch_gpu, self.rounds = runtime.check_batch(options.batch_size, options.batch_gpu, 1)
        self.state = tl.build_state(options.replace(precision=precision, transfer=None), data, device)
        self.ddp = tc.compile_network(self.state.net, compiled)
        self.iterator = synthetic_batches(data, batch_gpu, device)
        self.progress, self.scalars = schedule_at(self.state.method, options, progress)
        self.num_params = sum(p.numel() for p in self.state.net.parameters())
        self.steps = 0

    def step(self):
        """One optimiser step, the method's after_step and the EMA update (the schedule stays where it was set);
        returns the (wall, process CPU) seconds (synchronized)."""
        s, o = self.state, self.options
        synchronize(self.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        tl.training_step(self.ddp, s.net, s.method.loss, s.optimizer, self.iterator, self.rounds, o.batch_size,
                         o.optimizer_kwargs['lr'], self.device, tl.AUTOCAST_DTYPES[self.precision], s.scaler)
        self.steps += 1
        after = dataclasses.replace(self.progress, cur_nimg=self.progress.cur_nimg + self.steps * o.batch_size)
        s.method.after_step(s.net, after)
        s.ema.update(after.cur_nimg, o.batch_size)
        synchronize(self.device)
        return time.perf_counter() - start, time.process_time() - start_cpu

    def describe(self):
        """'Precond/model_type' of the network, and the method's class name."""
        kwargs = self.options.network_kwargs
        network = kwargs['class_name'].rsplit('.', 1)[-1] + (f'/{kwargs["model_type"]}' if 'model_type' in kwargs
                                                             else '')
        method = self.state.method
        return network, getattr(method, 'name', None) or type(method).__name__

# ----------------------------------------------------------------------------------------------------------
# Peak memory.


def _proc_status_kib(key):
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM); None where there is none (not Linux)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss():
    """Set VmHWM to the current RSS (Linux >= 4.0: /proc/self/clear_refs); False where that is not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _cpu_probe(options, data, precision, progress, steps, threads, queue):
    """Child process: peak RSS increase (GiB) over building the state and running `steps` steps (the last one
    after a reset of the peak when the kernel allows it), on `threads` threads."""
    torch.set_num_threads(threads)
    runtime.setup_runtime(0, precision)
    before = _proc_status_kib('VmRSS')
    runner = StepRunner(options, data, precision, torch.device('cpu'), progress=progress)
    peak = 0
    for i in range(steps):
        if i == steps - 1:
            peak = _proc_status_kib('VmHWM') if not _reset_peak_rss() else 0
        runner.step()
    peak = max(peak, _proc_status_kib('VmHWM') or 0)
    queue.put(None if before is None or not peak else (peak - before) / 2**20)


def cpu_peak_gib(options, data, precision, progress, steps):
    """The CPU peak of one preset's run, in a fresh process ('spawn'): GiB, or None where RSS cannot be read."""
    context = multiprocessing.get_context('spawn')
    queue = context.Queue()
    process = context.Process(target=_cpu_probe, args=(options, data, precision, progress, max(steps, 2),
                                                       torch.get_num_threads(), queue))
    process.start()
    process.join()   # the one small result fits the queue's pipe: no deadlock
    if process.exitcode != 0:
        print(f'memory probe of {options.network_kwargs["class_name"]} failed (exit {process.exitcode})', file=sys.stderr)
        return None
    return queue.get(timeout=10)


def warm_up(runner, warmup):
    """Untimed steps (at least one); (first step's wall seconds, CUDA peak GiB of the last one or None)."""
    device = runner.device
    first = runner.step()[0]
    for i in range(1, max(warmup, 1)):
        if device.type == 'cuda' and i == max(warmup, 1) - 1:
            torch.cuda.reset_peak_memory_stats(device)
        runner.step()
    # with one warm-up step its peak is the first step's (cudnn.benchmark's trial workspaces included)
    return first, torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None

# ----------------------------------------------------------------------------------------------------------
# Interleaved timing.


def build_runners(option_list, data, precision, device, compiled, progress, warmup):
    """(runners, first-step seconds, peak GiB) of every preset, built and warmed up one after the other (on CUDA
    each one's peak counts only what was allocated after the previous ones were built)."""
    runners, firsts, peaks = [], [], []
    for options in option_list:
        base = torch.cuda.memory_allocated(device) if device.type == 'cuda' else 0
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        runner = StepRunner(options, data, precision, device, compiled, progress)
        first, peak = warm_up(runner, warmup)
        runners.append(runner)
        firsts.append(first)
        peaks.append(None if peak is None else (peak - base) / 2**30)
    return runners, firsts, peaks


def time_interleaved(runners, iters):
    """Per runner, the (wall, CPU) seconds of `iters` rounds; each round steps every runner once, in an order that
    rotates."""
    seconds = [[] for _ in runners]
    for round_idx in range(iters):
        for k in range(len(runners)):
            i = (round_idx + k) % len(runners)
            seconds[i].append(runners[i].step())
    return seconds


def ratio_stats(seconds, base_seconds):
    """(median, min, max) of the per-round ratios seconds / base_seconds."""
    ratios = [a / b for a, b in zip(seconds, base_seconds)]
    return statistics.median(ratios), min(ratios), max(ratios)

# ----------------------------------------------------------------------------------------------------------
# The command.


def parse_precisions(text):
    values = [p for p in text.split(',') if p]
    bad = [p for p in values if p not in checks.PRECISIONS]
    if bad or not values:
        raise click.BadParameter(f'{bad or text} not in {", ".join(checks.PRECISIONS)}', param_hint='--precision')
    return values


def parse_presets(text):
    values = [p for p in text.split(',') if p]
    bad = [p for p in values if p not in presets.PRESETS]
    if bad or not values:
        raise click.BadParameter(f'{bad or text}: unknown; known: {", ".join(sorted(presets.PRESETS))}',
                                 param_hint='--preset')
    return values


def resolve_preset(name, batch, batch_gpu, network_kwargs, channels_last, teacher):
    """The preset's options without any download: transfer off, and every file its method reads local; `teacher`
    goes to the presets whose method takes one."""
    takes_teacher = 'teacher' in (presets.merge(name, {}).method_kwargs or {})
    options = presets.resolve(name, dict(batch=batch, batch_gpu=batch_gpu, transfer='none',
                                         teacher=teacher if takes_teacher else None, network_kwargs=network_kwargs,
                                         channels_last=channels_last))
    for flag, path in presets_cm.method_files(options.method_kwargs).items():
        if '://' in str(path):
            leave_out = '' if flag == '--teacher' else f' or leave out {name}'
            raise dnnlib.UserError(f'{flag}: {name} reads {path}, a URL; the benchmark downloads nothing: pass '
                                   f'{flag}=FILE (a local network file){leave_out}')
    return options


def measure(option_list, data, precision, device, compiled, progress, warmup, iters, cpu_memory):
    """One row per preset: dict(sec, cpu_sec (process CPU time), first, peak, ratio and cpu_ratio (median, min,
    max) to the first preset, runner facts)."""
    runtime.setup_runtime(0, precision)
    runners, firsts, peaks = build_runners(option_list, data, precision, device, compiled, progress, warmup)
    times = time_interleaved(runners, iters)
    if device.type == 'cpu' and cpu_memory:
        peaks = [cpu_peak_gib(o, data, precision, progress, warmup + 1) for o in option_list]
    base_wall, base_cpu = zip(*times[0])
    rows = []
    for runner, pairs, first, peak in zip(runners, times, firsts, peaks):
        (network, method), (wall, cpu) = runner.describe(), zip(*pairs)
        rows.append(dict(sec=statistics.median(wall), cpu_sec=statistics.median(cpu), first=first, peak=peak,
                         ratio=ratio_stats(wall, base_wall), cpu_ratio=ratio_stats(cpu, base_cpu), network=network,
                         method=method, params=runner.num_params, schedule=runner.scalars))
    return rows


def _ratio_text(ratio):
    return f'{ratio[0]:.2f} ({ratio[1]:.2f}-{ratio[2]:.2f})'


def print_rows(names, rows, header, cpu_clock):
    """The table; with `cpu_clock` (a CPU run) also the process CPU time per step and its ratio."""
    print(header)
    cpu_head = f'{"cpu s":>8}  {"ratio (CPU time)":<18}' if cpu_clock else ''
    print(f'{"preset":<20}{"method":<10}{"precision":<16}{"mode":>9}{"params M":>10}{"sec/step":>10}{"img/s":>9}'
          f'{"peak GiB":>10}{"compile s":>11}  {"ratio to " + names[0]:<26}{cpu_head}  schedule')
    for name, r in zip(names, rows):
        peak = '-' if r['peak'] is None else f'{r["peak"]:.2f}'
        compile_sec = '-' if r['compile_sec'] is None else f'{r["compile_sec"]:.1f}'
        cpu = f'{r["cpu_sec"]:>8.3f}  {_ratio_text(r["cpu_ratio"]):<18}' if cpu_clock else ''
        schedule = ', '.join(f'{k} {v:g}' for k, v in r['schedule'].items()) or '-'
        print(f'{name:<20}{r["method"]:<10}{r["label"]:<16}{r["mode"]:>9}{r["params"] / 1e6:>10.2f}{r["sec"]:>10.3f}'
              f'{r["img_per_s"]:>9.1f}{peak:>10}{compile_sec:>11}  {_ratio_text(r["ratio"]):<26}{cpu}  {schedule}')


def json_records(names, rows, settings):
    """The rows as the 'train' records of bench/gpu_report.py (preset, precision, sec_per_step, img_per_s, ...)."""
    return [dict(kind='train', preset=name, method=r['method'], network=r['network'], precision=r['label'],
                 mode=r['mode'], sec_per_step=r['sec'], img_per_s=r['img_per_s'], cpu_sec_per_step=r['cpu_sec'],
                 peak_gib=r['peak'], compile_sec=r['compile_sec'], params_m=r['params'] / 1e6, baseline=names[0],
                 ratio_to_baseline=r['ratio'][0], ratio_min=r['ratio'][1], ratio_max=r['ratio'][2],
                 cpu_time_ratio=r['cpu_ratio'][0], schedule=r['schedule'], **settings) for name, r in zip(names, rows)]


@click.command()
@click.option('--preset', 'preset_text', help='Training preset, or a comma list timed in interleaved rounds (the first is the ratios\' baseline)', metavar='LIST', type=str, default='cifar10-ecm', show_default=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@click.option('--batch', help='Global batch (one process)', metavar='INT', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--batch-gpu', help='Micro-batch (accumulation rounds = batch / batch-gpu)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--resolution', help='Image resolution', metavar='INT', type=click.IntRange(min=4), default=32, show_default=True)
@click.option('--label-dim', help='Classes (0 = unconditional)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--precision', 'precision_text', help='Comma list of fp32,tf32,bf16,fp16', metavar='LIST', type=str, default='fp32,tf32,bf16', show_default=True)
@click.option('--iters', help='Timed steps (rounds) per precision', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--warmup', help='Untimed steps first (at least one)', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
@click.option('--progress', help='Where in each preset\'s run the method\'s schedule is set (0 = first step, 0.5 = mid-run)', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0.0, show_default=True)
@click.option('--compile', 'compile_too', help='Also time each precision with the network torch.compile\'d (train.py --compile)', is_flag=True)
@click.option('--arch-kwargs', help='Network kwargs over each preset\'s, as JSON (e.g. a tiny width for a dry run)', metavar='JSON', type=str, default=None)
@click.option('--channels-last', help='Train the network in NHWC layout (train.py --channels-last)', is_flag=True)
@click.option('--teacher', help='Local teacher network file of a distillation preset (cifar10-scd, CD)', metavar='FILE', type=str, default=None)
@click.option('--threads', help='CPU threads (torch.set_num_threads)  [default: torch\'s]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--cpu-memory/--no-cpu-memory', help='On the CPU, measure each preset\'s peak RSS in a child process', default=True, show_default=True)
@click.option('--json', 'json_path', help='Also write the rows to this JSON file', metavar='FILE', type=str, default=None)
def main(preset_text, device, batch, batch_gpu, resolution, label_dim, precision_text, iters, warmup, progress,
         compile_too, arch_kwargs, channels_last, teacher, threads, cpu_memory, json_path):
    """Time the training step of one preset, or of several on the same network and batch."""
    names, precisions = parse_presets(preset_text), parse_precisions(precision_text)
    try:
        device = dist.resolve_device(device)
        network_kwargs = dnnlib.util.json_object(arch_kwargs, '--arch-kwargs') if arch_kwargs else None
        option_list = [resolve_preset(name, batch, batch_gpu, network_kwargs, channels_last, teacher) for name in names]
    except dnnlib.UserError as e:
        raise click.UsageError(str(e)) from None
    if compile_too and len(names) > 1:
        raise click.UsageError('--compile: time one preset at a time (MeanFlow refuses a compiled network)')
    if threads is not None:
        torch.set_num_threads(threads)
    data = SyntheticData(resolution, 3, label_dim)
    settings = dict(batch=batch, batch_gpu=batch_gpu or batch, resolution=resolution, label_dim=label_dim,
                    device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
                    threads=torch.get_num_threads(), iters=iters, warmup=warmup, arch_kwargs=network_kwargs,
                    channels_last=channels_last, progress=progress, peak_kind='cuda_max_allocated'
                    if device.type == 'cuda' else ('cpu_peak_rss_increase' if cpu_memory else None))
    records = []
    for precision in precisions:
        for compiled in (False, True) if compile_too else (False,):
            records += run_precision(names, option_list, data, precision, device, compiled, cpu_memory, settings)
    if json_path:
        with dnnlib.util.atomic_write(json_path, 'w') as f:
            json.dump(records, f, indent=1)


def run_precision(names, option_list, data, precision, device, compiled, cpu_memory, settings):
    """Measure, print and return the records of one precision ('auto' resolved for `device`), eager or compiled."""
    resolved = runtime.resolve_precision(precision, device)
    s = settings
    rows = measure(option_list, data, resolved, device, compiled, s['progress'], s['warmup'], s['iters'], cpu_memory)
    for r in rows:
        r.update(label=(precision if resolved == precision else f'{precision}={resolved}')
                 + (' NHWC' if s['channels_last'] else ''), mode='compiled' if compiled else 'eager',
                 img_per_s=s['batch'] / r['sec'], compile_sec=r['first'] - r['sec'] if compiled else None)
    header = (f'{s["resolution"]}x{s["resolution"]}, batch {s["batch"]} (batch-gpu {s["batch_gpu"]}), {s["device"]}, '
              f'torch {torch.__version__}, {s["threads"]} CPU thread(s), {s["iters"]} timed rounds after '
              f'{max(s["warmup"], 1)} warm-up step(s), schedule at {s["progress"]:g} of each run, '
              f'arch-kwargs {json.dumps(s["arch_kwargs"])}')
    print_rows(names, rows, header, device.type == 'cpu')
    return json_records(names, rows, s)


if __name__ == '__main__':
    main()
