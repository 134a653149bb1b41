"""python -m training.loop.plots: PNGs of loss, learning rate, curriculum stage, img/s and every metric from the files a
real (shortened quickstart) run records, several runs overlaid; matplotlib missing is one clear message."""

import json
import os
import pathlib
import shutil
import sys

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import train
from conftest import once_per_session
from training.loop import plots
from training.loop import run_records

pytest.importorskip('matplotlib', reason='the matplotlib package (an optional extra, installed by CI) is not installed')


@pytest.fixture(scope='module')
def recorded_run(tmp_path_factory, shapes_zip):
    """The run directory of a shortened quickstart, made once per session: 3 ticks, a snapshot and metrics every
    tick (the initial network's in the loop)."""
    def produce(root):
        args = ['--preset=quickstart', f'--outdir={root / "runs"}', f'--data={shapes_zip}', f'--ref={shapes_zip}',
                '--batch=16', '--tick=0.032', '--double=1', '--duration=0.000096', '--metric-samples=16', '--snap=1',
                '--dump=3', '--sample-every=0', '--eval-every=1', '--eval-init=fd_randnet', '--eval-init-background=0']
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv('ECT_CACHE_DIR', str(root / 'cache'))   # dataset statistics: this run's own cache
            result = CliRunner().invoke(train.main, args)
        assert result.exit_code == 0, result.output
        run_dir, = [d for d in (root / 'runs').iterdir() if d.is_dir()]
        return str(run_dir)
    return pathlib.Path(once_per_session(tmp_path_factory, 'plots-run', produce)[1])


def assert_png(path):
    image = np.asarray(PIL.Image.open(path).convert('L'))
    assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 5   # a real drawing, not a blank


def test_series_follow_the_records(recorded_run):
    stats = run_records.stats_records(str(recorded_run))
    assert len(stats) == 3
    xs, losses = plots.training_series(stats, 'Loss/loss', float)
    assert xs == pytest.approx([0.032, 0.064, 0.096]) and losses == [s['Loss/loss']['mean'] for s in stats]
    xs, stages = plots.training_series(stats, 'Progress/stage', float)
    assert stages == sorted(stages) and stages[-1] >= 1
    xs, speeds = plots.training_series(stats, 'Timing/sec_per_kimg', plots.TRAINING_PANELS[3][2])
    assert speeds == pytest.approx([1000 / s['Timing/sec_per_kimg']['mean'] for s in stats])
    records = [r for r in run_records.metric_records(str(recorded_run)) if r['metric'] == 'fd_randnet']
    assert len(records) == 4   # the initial network and the snapshot of every tick
    xs, values = plots.metric_series(records)[('fd_randnet', '')]
    expected = sorted((run_records.snapshot_kimg(r['snapshot_pkl']), r['results']['fd_randnet']) for r in records)
    assert list(zip(xs, values)) == expected


def test_plots_of_one_run(recorded_run, tmp_path):
    run = tmp_path / recorded_run.name   # a copy: the recorded run is shared by every worker, read only
    shutil.copytree(recorded_run, run)
    result = CliRunner().invoke(plots.main, [str(run)])
    assert result.exit_code == 0, result.output
    out = run / 'plots'
    assert sorted(os.listdir(out)) == ['metrics.png', 'training.png']
    for name in ('training.png', 'metrics.png'):
        assert_png(out / name)
    runs = plots.load_runs([str(run)])
    training = plots.training_figure(runs)
    assert len(training.axes) == 4
    assert [ax.get_title() for ax in training.axes] == ['loss', 'learning rate', 'curriculum stage', 'img/s']
    metric_names = sorted({r['metric'] for r in run_records.metric_records(str(run))})
    assert metric_names == ['fd_randnet', 'two_step_fd_randnet']
    metrics = plots.metrics_figure(runs)
    assert [ax.get_title() for ax in metrics.axes] == metric_names


def test_runs_are_overlaid(recorded_run, tmp_path):
    other = tmp_path / 'other-run'
    shutil.copytree(recorded_run, other)
    with open(other / 'stats.jsonl', 'a') as f:   # a longer second run
        last = run_records.stats_records(str(other))[-1]
        f.write(json.dumps(dict(last, **{'Progress/kimg': dict(num=1, mean=0.128, std=0.0)})) + '\n')
    written = plots.make_plots([str(recorded_run), str(other)], str(tmp_path / 'out'))
    assert written == {str(tmp_path / 'out' / 'training.png'): 4, str(tmp_path / 'out' / 'metrics.png'): 2}
    runs = plots.load_runs([str(recorded_run), str(other)])
    figure = plots.training_figure(runs)
    assert [len(line.get_xdata()) for line in figure.axes[0].lines] == [3, 4]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [recorded_run.name, 'other-run']


def test_clear_messages(tmp_path, monkeypatch):
    result = CliRunner().invoke(plots.main, [str(tmp_path)])
    assert result.exit_code == 2 and 'neither stats.jsonl nor metric-*.jsonl' in result.output
    result = CliRunner().invoke(plots.main, [str(tmp_path), str(tmp_path)])
    assert result.exit_code == 2 and '--outdir: needed' in result.output
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)
    result = CliRunner().invoke(plots.main, [str(tmp_path)])
    assert result.exit_code == 2 and 'pip install matplotlib' in result.output
