"""Train a consistency model with Easy Consistency Tuning (ECT), or pretrain an EDM diffusion model.

    python train.py --preset=cifar10-ecm --data=datasets/cifar10-32x32.zip --outdir=training-runs
    python train.py --preset=quickstart    (minutes on a CPU: procedural data, the shipped checkpoint, a score table)
    torchrun --nproc_per_node=8 train.py --preset=cifar10-ecm --data=... (or: bash run_ecm.sh 8 29500 --data=...)

Options come from the preset (configs/presets.py) and are overridden by the flags given. Everything is
checked before any work starts; a mistake is reported as one line (exit code 2). The resolved options are
printed and saved as training_options.json in the run directory {id:05d}-{desc} (also under --dry-run).

Resuming: --resume=<training-state-*.pt> or --resume=<run dir> (its newest state) continue in a NEW run
directory; --resume=auto continues IN the newest run directory of --outdir with the same description (so
re-running the same command after a pre-emption picks up where it stopped) and starts fresh if there is none.
SIGTERM/SIGUSR1 make the run write a training state at the next step and exit with code 0.

Flag aliases: --mid_t = --mid-t, --P_mean = --p-mean, --P_std = --p-std, --fp16=1 = --precision=fp16,
--tf32=1 = --precision=tf32, --duration is in Mimg, --tick in kimg, --snap/--dump/--sample-every/--eval-every
in ticks.
"""

import json
import os
import sys

import click
import torch.distributed

import dnnlib
from configs import checks, presets
from configs import presets_cm
from torch_utils import distributed as dist
from torch_utils import progress
from training.loop import run_dirs
from training.cli_common import parse_double, parse_float_list, parse_json_dict, parse_metric_list, user_errors


class Tee:
    """Copies everything written to a stream into log.txt as well (append mode; a streaming log)."""

    def __init__(self,
                 stream,   # the original sys.stdout / sys.stderr
                 file,     # the open log file shared by both streams
                 ):
        self.stream = stream
        self.file = file

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        self.file.flush()

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def isatty(self):
        return False


def cli_overrides(kw):
    """Flat option overrides (configs.presets keys) from the parsed flags; None = not given."""
    precision = kw['precision'] or ('fp16' if kw['fp16'] else 'tf32' if kw['tf32'] else None)
    if kw['data_on_device'] and kw['workers']:
        raise dnnlib.UserError('--workers: there are no DataLoader workers with --data-on-device (the batches are '
                               'gathered on the device)')
    mid_t = parse_float_list(kw['mid_t'], '--mid-t')
    metrics = parse_metric_list(kw['metrics'])
    eval_init = parse_metric_list(kw['eval_init'])
    return dict(
        data=kw['data'], cond=kw['cond'], arch=kw['arch'], precond=kw['precond'],
        network_kwargs=parse_json_dict(kw['arch_kwargs'], '--arch-kwargs'), dropout=kw['dropout'],
        duration_mimg=kw['duration'], batch=kw['batch'], batch_gpu=kw['batch_gpu'], tick_kimg=kw['tick'],
        double_ticks=parse_double(kw['double']), snap_ticks=kw['snap'], dump_ticks=kw['dump'],
        sample_ticks=kw['sample_every'], eval_ticks=kw['eval_every'], metrics=metrics, metrics_ref=kw['ref'],
        eval_init_metrics=eval_init, eval_init_background=kw['eval_init_background'],
        metric_samples=kw['metric_samples'],
        detector_files={k: kw[k] for k in ('detector', 'vgg16', 'dinov2') if kw[k]} or None,
        max_hours=kw['max_hours'], seed=kw['seed'], precision=precision, transfer=kw['transfer'], loss=kw['loss'],
        q=kw['q'], k=kw['k'], b=kw['b'], c=kw['c'], mapping=kw['mapping'], weighting=kw['weighting'],
        P_mean=kw['p_mean'], P_std=kw['p_std'], augment_p=kw['augment'], lr=kw['lr'], lr_decay_batches=kw['lr_decay_batches'],
        lr_rampup_kimg=kw['lr_rampup'], grad_clip=kw['grad_clip'], ema_beta=kw['ema_beta'], ema_mimg=kw['ema'], mid_t=mid_t,
        xflip=kw['xflip'], cache=kw['cache'], workers=kw['workers'], data_on_device=kw['data_on_device'],
        tensorboard=kw['tensorboard'] or None, channels_last=kw['channels_last'], compile=kw['compile'] or None,
        wandb=kw['wandb'],
        teacher=kw['teacher'], stage1=kw['stage1'], loss_norm=kw['loss_norm'], lpips_vgg=kw['lpips_vgg'], lpips_lin=kw['lpips_lin'],
    )


def check_transfer_file(transfer):
    if transfer is not None and '://' not in transfer and not os.path.isfile(transfer):
        raise dnnlib.UserError(f'--transfer: no such file: {transfer}')


def check_buildable(flat, preset_data):
    """A missing --data is built from the preset's source only at the preset's own path `preset_data`: any other
    missing path is a mistake, not a dataset to make."""
    path = flat.data
    if flat.data_source is None or path is None or os.path.exists(path):
        return
    if os.path.abspath(path) != os.path.abspath(str(preset_data)):
        raise dnnlib.UserError(f'--data: no such file or directory: {path} (only the preset\'s own {preset_data} '
                               f'is built from {flat.data_source})')


def ensure_data(flat, options, dry_run, preset_data):
    """Build --data from the preset's dataset_tool source when it does not exist yet (not under --dry-run);
    True when it did (the images were just written and checked by the conversion: no need to decode them again)."""
    path = flat.data
    if flat.data_source is None or path is None or os.path.exists(path) or dry_run:
        return False
    check_buildable(flat, preset_data)
    check_transfer_file(options.transfer)   # before the build: a typo must not cost the build first
    from training.data.dataset_convert import convert_dataset
    dist.print0(f'Building {path} from {flat.data_source} (first run only)')
    group = dist.host_group()   # the others wait on the host: a large build outlasts NCCL's watchdog
    if dist.get_rank() == 0:
        print(convert_dataset(flat.data_source, path, flat.data_max_images, None, None))
    dist.barrier(group)
    return True


def check_transfer(options, dataset, dry_run=False):
    """--transfer exists and (when the data is there) fits it; a dry run downloads nothing (a URL is checked by
    the real run)."""
    if options.transfer is None:
        return
    from training.loop import runtime
    check_transfer_file(options.transfer)
    if dry_run and '://' in options.transfer:
        dist.print0(f'--transfer: {options.transfer} is not downloaded by a dry run; a real run downloads and checks it')
        return
    src = runtime.load_transfer_source(options.transfer, options.network_kwargs,
                                       dataset.resolution if dataset is not None else None)
    if dataset is not None:
        runtime.check_transfer_compatible(src, dataset, options.transfer)


def check_data(options, data_source=None, check_images=True, dry_run=False):
    """--data / --cond / batch split / --transfer compatibility, checked by building the dataset; returns the
    dataset name. A missing --data that `data_source` would build (a dry run) is reported and not opened."""
    from training.loop import runtime
    path = options.dataset_kwargs['path']
    if path is None:
        raise dnnlib.UserError('--data: required (a dataset folder or zip in EDM format)')
    runtime.check_batch(options.batch_size, options.batch_gpu, dist.get_world_size())
    if not os.path.exists(path) and data_source is not None:
        dist.print0(f'--data: {path} does not exist yet; a real run builds it from {data_source}')
        check_transfer(options, None, dry_run)
        return os.path.splitext(os.path.basename(path))[0]
    if not os.path.exists(path):
        raise dnnlib.UserError(f'--data: no such file or directory: {path}')
    dataset = runtime.build_dataset(options.dataset_kwargs)
    if check_images:
        verify_dataset_images(dataset)
    if options.data_on_device:
        from training.data import device_data
        device_data.check_device_data(dataset, dist.device())
    check_network(options, dataset)
    check_transfer(options, dataset, dry_run)
    return dataset.name


def verify_dataset_images(dataset):
    """Every image file of the dataset readable and of the first image's size (`--no-check-data` skips this).
    Each rank checks its share of the files; the first problem found on any rank is one UserError on all ranks."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    indices = range(rank, dataset.num_image_files, world_size)
    problem = dataset.verify_images(progress.bar(indices, desc='Checking the dataset images', unit='img'))
    problems = [problem]
    if world_size > 1:
        problems = [None] * world_size
        torch.distributed.all_gather_object(problems, problem)
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise dnnlib.UserError(f'--data: {first}')


def check_method(options):
    """The training method builds from method_kwargs (hyperparameters only: cheap), before any work starts."""
    try:
        dnnlib.util.construct_class_by_name(**options.method_kwargs)
    except (dnnlib.UserError, TypeError, ValueError) as e:
        raise dnnlib.UserError(f'method_kwargs: cannot build {options.method_kwargs.get("class_name")}: {e}') from None


def check_network(options, dataset):
    """Build the network for `dataset` on the meta device (no memory, no time): unknown or unusable
    --arch-kwargs are refused now, not after the run directory is made, and so is a network the training method
    cannot train (Method.check_network)."""
    network_kwargs = options.network_kwargs
    interface = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    try:
        with torch.device('meta'):
            net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface)
    except (TypeError, ValueError, RuntimeError, AssertionError, dnnlib.UserError) as e:
        raise dnnlib.UserError(f'--arch-kwargs: cannot build {network_kwargs["class_name"]} with '
                               f'{ {k: v for k, v in network_kwargs.items() if k != "class_name"} }: '
                               f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
    dnnlib.util.construct_class_by_name(**options.method_kwargs).check_network(net)


def check_extras(options):
    """Metrics names/reference (a reference that is the not yet built --data is checked once built) and the
    TensorBoard package."""
    metrics = list(options.metrics) + list(options.eval_init_metrics)
    if metrics:
        from metrics import metric_main
        pending = options.metrics_ref == options.dataset_kwargs['path'] and not os.path.exists(options.metrics_ref)
        for metric in options.eval_init_metrics:
            if not metric_main.is_valid_metric(metric):
                raise dnnlib.UserError(f'--eval-init: unknown metric "{metric}" (choose from '
                                       f'{", ".join(metric_main.list_metrics())})')
        for metric in metrics:
            metric_main.check_metric(metric)
            if not pending:
                metric_main.check_ref(metric, options.metrics_ref)
    files = {f'--{flag}': path for flag, path in options.detector_files.items()}
    for flag, path in dict(files, **presets_cm.method_files(options.method_kwargs)).items():
        if not dnnlib.util._is_url(path) and not os.path.isfile(path):
            raise dnnlib.UserError(f'{flag}={path}: no such file')
    check_trackers(options)


def check_trackers(options):
    """--tensorboard / --wandb: the optional packages are there and the W&B target is well formed."""
    from training.loop import trackers  # Deferred: only needed to check the tracker flags.
    if options.tensorboard:
        trackers.import_tensorboard()
    if options.wandb:
        trackers.parse_wandb_target(options.wandb)
        trackers.import_wandb()


def describe(options, dataset_name, user_desc):
    """EDM-style run description: dataset-cond-arch-precond-gpusN-batchB-precision[-desc]."""
    net = options.network_kwargs['class_name'].rsplit('.', 1)[-1].replace('Precond', '').lower() or 'edm2'
    cond = 'cond' if options.dataset_kwargs['use_labels'] else 'uncond'
    desc = f'{dataset_name}-{cond}-{net}-gpus{dist.get_world_size()}-batch{options.batch_size}-{options.precision}'
    return f'{desc}-{user_desc}' if user_desc else desc


def check_resume(state_path):
    """Read the state once up front so a truncated or foreign file is reported before any work."""
    if state_path is not None:
        from training.checkpoints.checkpoint import TrainingState
        TrainingState.read(state_path)


def _broadcast(value):
    """Rank 0's value on every rank (run directory decisions must agree)."""
    if dist.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def prepare(kw):
    """Resolve, validate and record the run; returns (options, run_dir). Raises UserError on bad input."""
    dist.init()
    flat = presets.merge(kw['preset'], cli_overrides(kw))
    options = presets.build_options(flat)
    check_method(options)
    dnnlib.util.check_output_dir(kw['outdir'], '--outdir')
    preset_data = presets.merge(kw['preset'], {}).data
    check_buildable(flat, preset_data)
    check_extras(options)
    built = ensure_data(flat, options, kw['dry_run'], preset_data)
    dataset_name = check_data(options, flat.data_source, check_images=not (kw['no_check_data'] or built),
                              dry_run=kw['dry_run'])
    from training.loop.runtime import resolve_precision   # --precision=auto -> this device's (printed below, recorded)
    options = options.replace(precision=resolve_precision(options.precision, dist.device()))
    desc = describe(options, dataset_name, kw['desc'])
    resume_state, resume_dir = run_dirs.resolve_resume(kw['resume'], kw['outdir'], desc, kw['nosubdir'])
    check_resume(resume_state)
    run_dir = None
    if dist.get_rank() == 0:
        run_dir = resume_dir or run_dirs.make_run_dir(kw['outdir'], desc, kw['nosubdir'], kw['dry_run'], kw['overwrite'])
    run_dir, resume_state = _broadcast((run_dir, resume_state))
    options = options.replace(resume_state=resume_state)
    dist.print0(json.dumps(options.to_dict(), indent=2))
    dist.print0(f'Run directory: {run_dir}' + (f'\nResuming from: {resume_state}' if resume_state else ''))
    if dist.get_rank() == 0:
        run_dirs.save_options(run_dir, options)
        for name in dnnlib.util.remove_stale_partials(run_dir):
            print(f'Removed {name} (a write cut short by an earlier run)')
    return options, run_dir


def make_callbacks(options):
    """The training callbacks of a run: metric evaluation when metrics are asked for."""
    if not (options.metrics or options.eval_init_metrics):
        return []
    from metrics.training_callback import MetricsCallback
    return [MetricsCallback()]


def launch(options, run_dir):
    """Tee stdout/stderr into log.txt (rank 0) and run the training loop; returns its outcome."""
    from training.loop import training_loop
    callbacks = make_callbacks(options)
    if dist.get_rank() != 0:
        return training_loop.training_loop(options, run_dir, callbacks)
    streams = sys.stdout, sys.stderr
    with open(os.path.join(run_dir, 'log.txt'), 'a', encoding='utf-8') as log:
        sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
        try:
            outcome = training_loop.training_loop(options, run_dir, callbacks)
            print(f'Training {outcome}.')
            return outcome
        finally:
            sys.stdout, sys.stderr = streams


@click.command(help=__doc__.split('\n\n')[0], epilog='\n\n'.join(__doc__.split('\n\n')[3:]))
@click.option('--outdir', help='Where to make run directories', metavar='DIR', type=str, default='training-runs', show_default=True)
@click.option('--data', help='Training data: folder or zip in EDM format', metavar='ZIP|DIR', type=str)
@click.option('--preset', help=f'Named recipe ({", ".join(presets.PRESETS)}); flags override it', metavar='NAME', type=str)
@click.option('--cond', help='Class-conditional (needs dataset.json labels)', metavar='BOOL', type=bool)
@click.option('--arch', help='Network architecture', type=click.Choice(list(presets.ARCHS)))
@click.option('--arch-kwargs', help='Extra network constructor kwargs as JSON, e.g. \'{"model_channels":64}\'', metavar='JSON', type=str)
@click.option('--precond', help='Preconditioning', type=click.Choice(list(presets.PRECONDS)))
@click.option('--loss', help='Training method: ect (consistency tuning) or edm (diffusion pretraining)', type=click.Choice(list(presets.LOSSES)))
@click.option('--duration', help='Training length in Mimg', metavar='MIMG', type=float)
@click.option('--batch', help='Global batch size', metavar='INT', type=int)
@click.option('--batch-gpu', help='Micro-batch per GPU and round (gradient accumulation)', metavar='INT', type=int)
@click.option('--lr', help='Base learning rate', metavar='FLOAT', type=float)
@click.option('--lr-decay-batches', help='Inverse-sqrt lr decay after this many steps (0 = none)', metavar='INT', type=float)
@click.option('--lr-rampup', help='Linear lr warm-up in kimg (0 = none)', metavar='KIMG', type=float)
@click.option('--grad-clip', '--gclip', 'grad_clip', help='Clip the global gradient norm to this before each step (0 = none)', metavar='FLOAT', type=float)
@click.option('--ema', help='EMA half-life in Mimg (EDM meaning; HalfLifeEMA)', metavar='MIMG', type=float)
@click.option('--ema-beta', help='Constant EMA decay per step (ECT: 0.9999)', metavar='FLOAT', type=float)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=float)
@click.option('--precision', help='auto (bf16 on CUDA, else fp32) | fp32 | tf32 | bf16 (autocast) | fp16 (autocast + GradScaler)', type=click.Choice(list(checks.PRECISIONS)))
@click.option('--fp16', help='Alias of --precision=fp16', metavar='BOOL', type=bool)
@click.option('--tf32', help='Alias of --precision=tf32', metavar='BOOL', type=bool)
@click.option('--q', 'q', help='Curriculum base q: t-r shrinks by q per stage', metavar='FLOAT', type=float)
@click.option('--k', 'k', help='Sigmoid mapping k: extra gap 1+k*sigmoid(-b*t)', metavar='FLOAT', type=float)
@click.option('--b', 'b', help='Sigmoid mapping sharpness b', metavar='FLOAT', type=float)
@click.option('--c', 'c', help='Pseudo-Huber c: L = sqrt(d + c^2) - c', metavar='FLOAT', type=float)
@click.option('--double', help='Ticks per curriculum stage ("never" = stage stays 0)', metavar='TICKS', type=str)
@click.option('--mapping', help='r = mapping(t, stage)', type=click.Choice(list(presets.MAPPINGS)))
@click.option('--weighting', help='ict: 1/(t-r) | edm2: 1/t^2+1/sigma_d^2 | none', type=click.Choice(list(presets.WEIGHTINGS)))
@click.option('--p-mean', '--P_mean', 'p_mean', help='P_mean: mean of ln t', metavar='FLOAT', type=float)
@click.option('--p-std', '--P_std', 'p_std', help='P_std: std of ln t', metavar='FLOAT', type=float)
@click.option('--mid-t', '--mid_t', 'mid_t', help='Intermediate t of multi-step sample grids (repeatable or comma list)', metavar='LIST', type=str, multiple=True)
@click.option('--tick', help='Tick length in kimg', metavar='KIMG', type=float)
@click.option('--snap', help='Network snapshot every N ticks', metavar='TICKS', type=int)
@click.option('--dump', help='Training state every N ticks', metavar='TICKS', type=int)
@click.option('--sample-every', help='Sample grids every N ticks (0 = none)', metavar='TICKS', type=int)
@click.option('--metrics', help='Comma list of metrics (e.g. fid50k_full,two_step_fid50k_full; "none" = none)', metavar='LIST', type=str)
@click.option('--ref', help='Reference statistics/dataset for --metrics', metavar='NPZ|DIR', type=str)
@click.option('--eval-every', help='Evaluate --metrics every N ticks', metavar='TICKS', type=int)
@click.option('--eval-init-background', 'eval_init_background', help='Score the initial network in a background process while training starts (on the CPU it takes one of the threads)', metavar='BOOL', type=bool)
@click.option('--eval-init', help='Comma list of metrics of the initial (e.g. transferred) network, before training ("none" = none)', metavar='LIST', type=str)
@click.option('--detector', help='Inception detector for the metrics: NVIDIA .pkl or state dict  [default: official .pkl]', metavar='PATH|URL', type=str)
@click.option('--vgg16', help='VGG16 detector for pr50k3_full: NVIDIA .pkl or state dict  [default: official .pkl]', metavar='PATH|URL', type=str)
@click.option('--dinov2', help='DINOv2 weights for fd_dinov2 (official .pth state dict)  [default: official URL]', metavar='PATH|URL', type=str)
@click.option('--metric-samples', help='Generated images per metric evaluation (default: the metric\'s own count)', metavar='INT', type=int)
@click.option('--max-hours', help='Stop (with a state) after this many hours of training', metavar='HOURS', type=float)
@click.option('--seed', help='Random seed', metavar='INT', type=int)
@click.option('--transfer', help='Initial weights: EDM/ECT pickle, URL or snapshot ("none" = random init)', metavar='PKL|URL', type=str)
@click.option('--teacher', help='CD, progressive distillation, sCD: the diffusion network to distil (edm_*.pt, EDM/EDM2 checkpoint)', metavar='PT|PKL', type=str)
@click.option('--stage1', help='TCM: the stage-1 consistency network (frozen below t\', and the initial weights)', metavar='PT|PKL', type=str)
@click.option('--loss-norm', '--loss_norm', 'loss_norm', help='Consistency Models distance: l2 | l1 | l2-32 | lpips', type=click.Choice(['l2', 'l1', 'l2-32', 'lpips']))
@click.option('--lpips-vgg', help='LPIPS: VGG16 weights file/URL  [default: torchvision\'s]', metavar='PTH|URL', type=str)
@click.option('--lpips-lin', help='LPIPS: linear-layer weights file/URL  [default: piq\'s]', metavar='PT|URL', type=str)
@click.option('--resume', help='Continue: training-state file, run dir, or "auto"', metavar='PT|DIR|auto', type=str)
@click.option('--xflip', help='Add x-flipped copies of the data', metavar='BOOL', type=bool)
@click.option('--augment', help='EDM\'s non-leaking augmentation: probability p (0 = off; the network gets augment labels)', metavar='P', type=float)
@click.option('--cache', help='Cache the dataset in RAM', metavar='BOOL', type=bool)
@click.option('--workers', help='DataLoader worker processes', metavar='INT', type=int)
@click.option('--data-on-device', help='Hold the whole dataset on the training device (CIFAR-sized data; no workers)', metavar='BOOL', type=bool)
@click.option('--channels-last', 'channels_last', help='Train in NHWC memory layout (2-5% faster fp32 steps on the CPU here; on CUDA see bench/gpu_check.sh)', metavar='BOOL', type=bool)
@click.option('--compile', help='torch.compile the trained network (off by default: on this project\'s 2-core CPU, compiling the full DDPM++ CIFAR-10 network took 328 s and the compiled step was no faster than eager, 7.6 s vs 7.3 s at 1 thread; on a GPU it is unmeasured until bench/gpu_check.sh measures it)', is_flag=True)
@click.option('--no-check-data', 'no_check_data', help='Skip reading every image file before training starts', is_flag=True)
@click.option('--tensorboard', help='Also write TensorBoard events: scalars, sample grids, metrics (needs the tensorboard package)', is_flag=True)
@click.option('--wandb', help='Also log scalars, sample grids and metrics to Weights & Biases (offline without a login or network; needs the wandb package)', metavar='PROJECT[/RUN]', type=str, default=None)
@click.option('--desc', help='String to append to the run directory name', metavar='STR', type=str)
@click.option('--nosubdir', help='Use --outdir itself as the run directory', is_flag=True)
@click.option('--overwrite', help='With --nosubdir: replace the run already in --outdir', is_flag=True)
@click.option('--dry-run', help='Resolve, validate and save training_options.json, then exit (downloads nothing)', is_flag=True)
def main(**kw):
    with user_errors(os_errors=True):
        options, run_dir = prepare(kw)
        if kw['dry_run']:
            dist.print0('Dry run; exiting.')
            return
        launch(options, run_dir)


if __name__ == '__main__':
    main()
