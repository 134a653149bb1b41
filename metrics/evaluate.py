"""Score one network snapshot, or every snapshot of a run directory, and record the results.

    python -m metrics.evaluate --resume=training-runs/00000-run --ref=cifar10-32x32.npz
    torchrun --nproc_per_node=8 -m metrics.evaluate --resume=network-snapshot-0200000.pt --metrics=fid50k_full

Results go to <run dir>/metric-<name>.jsonl (the snapshot's folder); snapshot/metric pairs already recorded
there are skipped. A table (snapshot, metric, value) of every record of the requested metrics is printed.
`--repeats=3` computes each metric on three seed sets (EDM's protocol) and records each value, the mean and the
minimum; a pair counts as recorded only with the same number of seed sets.
"""

import glob
import os
import re

import click
import torch

import dnnlib
from metrics import metric_main
from torch_utils import distributed as dist
from torch_utils import progress
from training.cli_common import load_network, parse_float_list, state_dict_options, user_errors
from training.compile import COMPILE_HELP, compile_network

SNAPSHOT_PATTERNS = ('network-snapshot-*.pt', 'network-snapshot-*.pkl')
DINOV2_SKIPPED = 'fd_dinov2: DINOv2 weights not available (URL unreachable and no --dinov2 path): skipped'


def find_snapshots(resume):
    """(run_dir, [snapshot paths]) for a snapshot file, an exported network folder (model.safetensors, scored into
    that folder) or a run directory (sorted by name)."""
    from training.checkpoints import safetensors_io  # Deferred: only needed to recognise exported folders.
    if os.path.isdir(resume) and safetensors_io.is_safetensors_path(resume):
        return resume, [resume]
    if os.path.isfile(resume):
        return os.path.dirname(os.path.abspath(resume)), [resume]
    if not os.path.isdir(resume):
        raise dnnlib.UserError(f'--resume={resume}: no such snapshot file or run directory')
    paths = sorted(p for pattern in SNAPSHOT_PATTERNS for p in glob.glob(os.path.join(resume, pattern)))
    if not paths:
        raise dnnlib.UserError(f'--resume={resume}: no network-snapshot-*.pt or *.pkl in this directory')
    return resume, paths


def parse_metrics(metrics):
    names = [m.strip() for m in metrics.split(',') if m.strip()]
    if not names:
        raise dnnlib.UserError('--metrics: give at least one metric name')
    for name in names:
        metric_main.check_metric(name)
    return names


def pending_work(run_dir, snapshots, metrics, repeats=1):
    """[(snapshot path, [metrics not yet recorded for it with `repeats` seed sets])], snapshots with nothing to
    do left out."""
    work = []
    for path in snapshots:
        todo = [m for m in metrics if not metric_main.is_recorded(run_dir, m, os.path.basename(path), repeats)]
        if todo:
            work.append((path, todo))
    return work


def metric_refs(metrics, ref, ref_dinov2, data):
    """The reference each metric compares with, checked before any work starts."""
    refs = {}
    for metric in metrics:
        kind = metric_main.ref_kind(metric)
        refs[metric] = ref_dinov2 if metric == 'fd_dinov2' else (data or ref) if kind == 'features' else ref
        metric_main.check_ref(metric, refs[metric])
    return refs


def load_detectors(metrics, detector, dinov2, allow_unsafe_pickle, device, vgg16=None):
    """One detector per metric (shared between metrics of the same kind); fd_dinov2 is dropped, with a
    message, when no DINOv2 weights can be had."""
    loaded, by_metric = {}, {}
    for metric in metrics:
        kind = metric_main.detector_kind(metric)
        if kind not in loaded:
            url = metric_main.detector_file(metric, detector, vgg16, dinov2)
            try:
                loaded[kind] = metric_main.load_metric_detector(metric, url, allow_unsafe_pickle, device)
            except dnnlib.UserError:
                if kind != 'dinov2' or dinov2 is not None:
                    raise
                loaded[kind] = None
                dist.print0(DINOV2_SKIPPED)
        if loaded[kind] is not None:
            by_metric[metric] = loaded[kind]
    return by_metric


def value_text(record):
    return ' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in record['results'].items())


def results_table(run_dir, snapshots, metrics):
    """Lines of a (snapshot, metric, value) table of what the records hold for `snapshots`."""
    names = {os.path.basename(p) for p in snapshots}
    rows = [(r.get('snapshot_pkl'), m, value_text(r)) for m in metrics for r in metric_main.read_records(run_dir, m)
            if r.get('snapshot_pkl') in names]
    rows.sort(key=lambda row: (_snapshot_order(row[0]), row[1]))
    header = ('snapshot', 'metric', 'value')
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return [' '.join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def _snapshot_order(name):
    digits = re.findall(r'\d+', name or '')
    return (int(digits[-1]) if digits else -1, name or '')


def evaluate(run_dir, work, refs, detectors_by_metric, num_samples, batch_size, mid_t, allow_unsafe_pickle, device,
             compile_net=False, repeats=1, **state_dict_kwargs):
    """Compute and record every pending (snapshot, metric) pair; a progress bar over the pairs on rank 0.
    `compile_net`: torch.compile each network; `repeats`: seed sets per metric; `state_dict_kwargs` (resolution,
    parameterization, num_head_channels) serve openai state dicts."""
    with progress.bar(total=sum(len(todo) for _, todo in work), desc='snapshot x metric', unit='metric') as pairs_bar:
        for path, todo in work:
            net, metadata = load_network(path, allow_unsafe_pickle, **state_dict_kwargs)
            net = compile_network(net.to(device), compile_net)
            for metric in todo:
                pairs_bar.set_postfix_str(f'{os.path.basename(path)} {metric}')
                if metric in detectors_by_metric:
                    _evaluate_one(run_dir, path, metric, net, metadata, refs, detectors_by_metric, num_samples,
                                  batch_size, mid_t, device, repeats)
                pairs_bar.update(1)
            dist.barrier()


def _evaluate_one(run_dir, path, metric, net, metadata, refs, detectors_by_metric, num_samples, batch_size, mid_t,
                  device, repeats):
    dist.print0(f'{os.path.basename(path)}: computing {metric}...')
    with torch.no_grad():
        result = metric_main.calc_metric(metric, net, run_dir=run_dir, snapshot_name=os.path.basename(path),
                                         ref=refs[metric], detector=detectors_by_metric[metric],
                                         num_samples=num_samples, batch_size=batch_size, device=device,
                                         mid_t=mid_t, metadata=metadata, repeats=repeats)
    dist.print0(f'{os.path.basename(path)}: {metric_main.format_result(result)}')


@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--resume', help='Network snapshot, or run directory of snapshots', metavar='PATH', type=str, required=True)
@click.option('--metrics', help='Comma-separated metric names', metavar='LIST', type=str, default='fid50k_full,two_step_fid50k_full', show_default=True)
@click.option('--ref', help='Inception reference statistics (.npz with mu, sigma)', metavar='NPZ|URL', type=str, default=None)
@click.option('--ref-dinov2', 'ref_dinov2', help='DINOv2 reference statistics for fd_dinov2', metavar='NPZ|URL', type=str, default=None)
@click.option('--data', help='Dataset (or .npz with features) for kid50k_full / pr50k3_full', metavar='PATH', type=str, default=None)
@click.option('--num-images', 'num_samples', help='Generated images per metric  [default: the metric\'s own, 50000]', metavar='INT', type=click.IntRange(min=2), default=None)
@click.option('--repeats', help='Seed sets per metric (EDM\'s protocol: each value, their mean and minimum are recorded)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--batch', 'batch_size', help='Maximum batch size', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--mid_t', '--mid-t', 'mid_t', help='2-step intermediate time  [default: snapshot metadata, else recipe]', metavar='FLOAT', multiple=True)
@click.option('--detector', help='Inception detector: NVIDIA .pkl or state dict  [default: official .pkl]', metavar='PATH|URL', type=str, default=None)
@click.option('--vgg16', help='VGG16 detector for pr50k3_full: NVIDIA .pkl or state dict  [default: official .pkl]', metavar='PATH|URL', type=str, default=None)
@click.option('--dinov2', help='DINOv2 weights (official .pth state dict)  [default: official URL]', metavar='PATH|URL', type=str, default=None)
@click.option('--allow-unsafe-pickle', help='Trust the files: allow pickles that execute embedded code and TorchScript', is_flag=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@click.option('--compile', 'compile_net', help=COMPILE_HELP, is_flag=True)
@state_dict_options
@click.option('--dry-run', help='Check the arguments and list the pending work, then exit', is_flag=True)
@progress.no_progress_option
def cli(resume, metrics, ref, ref_dinov2, data, num_samples, repeats, batch_size, mid_t, detector, vgg16, dinov2,
        allow_unsafe_pickle, device, compile_net, resolution, parameterization, num_head_channels, dry_run,
        no_progress):
    """Score network snapshots with the named metrics (1- and 2-step FID by default)."""
    with user_errors():
        dist.init()
        device = dist.resolve_device(device)
        metrics = parse_metrics(metrics)
        mid_t = parse_float_list(mid_t, '--mid_t')
        run_dir, snapshots = find_snapshots(resume)
        work = pending_work(run_dir, snapshots, metrics, repeats)
        refs = metric_refs(metrics, ref, ref_dinov2, data) if work else {}
        detectors_by_metric = load_detectors(sorted({m for _, todo in work for m in todo}), detector, dinov2,
                                             allow_unsafe_pickle, device, vgg16)
    skipped = len(snapshots) * len(metrics) - sum(len(todo) for _, todo in work)
    dist.print0(f'{len(snapshots)} snapshot(s), {skipped} snapshot/metric pair(s) already recorded: skipped')
    if dry_run:
        for path, todo in work:
            dist.print0(f'to do: {os.path.basename(path)}: {", ".join(todo)}')
        return
    with user_errors(), progress.disabled_if(no_progress):
        evaluate(run_dir, work, refs, detectors_by_metric, num_samples, batch_size, mid_t, allow_unsafe_pickle, device,
                 compile_net=compile_net, repeats=repeats, resolution=resolution, parameterization=parameterization, num_head_channels=num_head_channels)
    for line in results_table(run_dir, snapshots, metrics):
        dist.print0(line)


def main(args=None):
    cli.main(args=args, prog_name='metrics.evaluate')


if __name__ == '__main__':
    main()
