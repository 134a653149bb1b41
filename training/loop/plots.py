"""Plots of training runs from what they record: stats.jsonl and metric-*.jsonl, several runs overlaid.

    python -m training.loop.plots training-runs/00000-quickstart-... [training-runs/00001-... ...] [--outdir=DIR]

Writes two PNGs (default folder: <RUN_DIR>/plots for one run; --outdir is needed for several):
  training.png  loss, learning rate, curriculum stage and training speed (img/s) against kimg
  metrics.png   every recorded metric (e.g. 1-step and 2-step FID) against the kimg of the snapshot it scored
                (the network before training, initial-network.pt, at kimg 0)
Needs the optional matplotlib package (pip install matplotlib).
"""

import os

import click

import dnnlib
from training.loop import run_records
from training.cli_common import user_errors

# (axis title, stats.jsonl statistic, conversion of its mean to the plotted value)
TRAINING_PANELS = (
    ('loss', 'Loss/loss', float),
    ('learning rate', 'Progress/lr', float),
    ('curriculum stage', 'Progress/stage', float),
    ('img/s', 'Timing/sec_per_kimg', lambda sec_per_kimg: 1000.0 / sec_per_kimg if sec_per_kimg > 0 else None),
)
KIMG_STAT = 'Progress/kimg'


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise dnnlib.UserError('plots need matplotlib (pip install matplotlib); it is an optional dependency') from None
    return Figure, FigureCanvasAgg


def run_labels(run_dirs):
    """A short legend label per run: its folder name (numbered when two runs share a name)."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return [f'{n} ({i})' if names.count(n) > 1 else n for i, n in enumerate(names)]


def training_series(records, stat, convert):
    """([kimg], [value]) of one statistic over the ticks that reported it."""
    xs, ys = [], []
    for record in records:
        kimg, mean = run_records.stat_mean(record, KIMG_STAT), run_records.stat_mean(record, stat)
        value = convert(mean) if kimg is not None and mean is not None else None
        if value is not None:
            xs.append(kimg)
            ys.append(value)
    return xs, ys


def metric_series(records):
    """{(metric result key, EMA suffix): ([kimg], [value])} of metric records, sorted by kimg."""
    series = {}
    for record in records:
        name = str(record.get('snapshot_pkl') or '')
        kimg = run_records.snapshot_kimg(name)
        if kimg is None:
            continue
        suffix = run_records.snapshot_suffix(name)
        for key, value in run_records.record_value(record):
            series.setdefault((key, suffix), []).append((kimg, value))
    return {k: ([x for x, _ in sorted(v)], [y for _, y in sorted(v)]) for k, v in series.items()}


def save_png(fig, path):
    """Write a matplotlib Figure as a PNG, atomically."""
    _Figure, FigureCanvasAgg = _matplotlib()
    FigureCanvasAgg(fig)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=100)
    return path


def training_figure(runs):
    """The Figure of training.png: one axis per TRAINING_PANELS entry, one line per run."""
    Figure, _FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(10, 7), layout='constrained')
    axes = fig.subplots(2, 2).flatten()
    for ax, (title, stat, convert) in zip(axes, TRAINING_PANELS):
        for label, stats, _metrics in runs:
            xs, ys = training_series(stats, stat, convert)
            if xs:
                ax.plot(xs, ys, marker='.' if len(xs) < 30 else None, label=label)
        if not ax.lines:
            ax.text(0.5, 0.5, f'{stat} not recorded', ha='center', va='center', transform=ax.transAxes)
        ax.set(title=title, xlabel='kimg')
        ax.grid(alpha=0.3)
    name_runs(fig, axes[0], runs)
    return fig


def name_runs(fig, ax, runs):
    """One run: its name as the figure title; several: one legend of the runs (the lines of `ax`) below the plots."""
    if len(runs) == 1:
        fig.suptitle(runs[0][0], fontsize='medium')
    else:
        fig.legend(*ax.get_legend_handles_labels(), loc='outside lower center', ncols=min(len(runs), 3),
                   fontsize='small')


def metrics_figure(runs):
    """The Figure of metrics.png: one axis per recorded metric, one line per (run, result, EMA); None when no
    run recorded a metric."""
    names = sorted({r['metric'] for _label, _stats, metrics in runs for r in metrics if 'metric' in r})
    if not names:
        return None
    Figure, _FigureCanvasAgg = _matplotlib()
    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.5 * cols, 3.5 * rows + 0.5), layout='constrained')
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, name in zip(axes, names):
        for label, _stats, metrics in runs:
            for (key, suffix), (xs, ys) in metric_series([r for r in metrics if r.get('metric') == name]).items():
                parts = [key] * (key != name) + [f'EMA{suffix}'] * bool(suffix)
                ax.plot(xs, ys, marker='o', label=' '.join([label] * (len(runs) > 1) + parts) or label)
        ax.set(title=name, xlabel='kimg of the snapshot')
        ax.grid(alpha=0.3)
        if len(ax.lines) > len(runs):   # several results or EMAs per run: name them on the axis
            ax.legend(fontsize='small')
    for ax in axes[len(names):]:
        fig.delaxes(ax)
    name_runs(fig, axes[0], runs)
    return fig


def load_runs(run_dirs):
    """[(label, stats records, metric records)] of run directories; UserError for one that records nothing."""
    runs = []
    for run_dir, label in zip(run_dirs, run_labels(run_dirs)):
        if not os.path.isdir(run_dir):
            raise dnnlib.UserError(f'{run_dir}: no such run directory')
        stats, metrics = run_records.stats_records(run_dir), run_records.metric_records(run_dir)
        if not stats and not metrics:
            raise dnnlib.UserError(f'{run_dir}: neither stats.jsonl nor metric-*.jsonl (not a training run directory?)')
        runs.append((label, stats, metrics))
    return runs


def make_plots(run_dirs, outdir):
    """Write training.png and metrics.png for `run_dirs` into `outdir`; returns {path: number of axes}."""
    _matplotlib()   # the one clear message before reading anything
    runs = load_runs(run_dirs)
    os.makedirs(outdir, exist_ok=True)
    figures = {'training.png': training_figure(runs) if any(stats for _label, stats, _metrics in runs) else None,
               'metrics.png': metrics_figure(runs)}
    return {save_png(fig, os.path.join(outdir, name)): len(fig.axes) for name, fig in figures.items() if fig is not None}


@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.argument('run_dirs', nargs=-1, required=True, metavar='RUN_DIR [RUN_DIR ...]')
@click.option('--outdir', help='Where to write the PNGs  [default: RUN_DIR/plots for one run]', metavar='DIR', default=None)
def main(run_dirs, outdir):
    """Plot loss, learning rate, curriculum stage, img/s and every metric of training runs (overlaid)."""
    with user_errors():
        if outdir is None and len(run_dirs) > 1:
            raise dnnlib.UserError('--outdir: needed when plotting several runs')
        written = make_plots(list(run_dirs), outdir or os.path.join(run_dirs[0], 'plots'))
    for path, num_axes in written.items():
        click.echo(f'Wrote {path} ({num_axes} plots)')


if __name__ == '__main__':
    main()
