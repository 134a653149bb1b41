"""Experiment tracking (training.loop.trackers): W&B offline writes its run files with the scalars, grids and metrics,
and a resumed run keeps its W&B run id (from the training state); TensorBoard events read back with the same
scalars, the sample grids and the metric records; W&B falls back to offline logging when it cannot go online."""

import glob
import os
import types

import pytest
from click.testing import CliRunner

import train
from configs import presets
from training.checkpoints import checkpoint
from training.loop import run_records
from training.loop import trackers


# The trackers are what is tested: a tiny network trained from scratch instead of the quickstart's; the initial network
# is scored only where its records are read (TensorBoard), and in the loop (a background child only adds start-up).
SCORE_INITIAL = ('--eval-init=fd_randnet', '--eval-init-background=0')
TINY_ARCH = '{"model_channels": 16, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []}'


def short_run_args(root, data, *extra):
    return ['--preset=quickstart', f'--outdir={root}', f'--data={data}', f'--ref={data}', '--batch=16',
            '--tick=0.032', '--double=1', '--duration=0.000064', '--metric-samples=16', '--snap=1', '--dump=1',
            '--sample-every=1', '--eval-every=1', '--eval-init=none', '--transfer=none', f'--arch-kwargs={TINY_ARCH}',
            *extra]


def run_train(args, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('ECT_CACHE_DIR', str(tmp_path / 'cache'))
        patch.setenv('WANDB_MODE', 'offline')
        patch.setenv('WANDB_SILENT', 'true')
        result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    return result.output


def only_run_dir(root):
    run_dir, = [d for d in root.iterdir() if d.is_dir()]
    return run_dir


def wandb_files(run_dir):
    """{run id: [.wandb files]} of the offline W&B runs in a run directory."""
    found = {}
    for path in glob.glob(os.path.join(run_dir, 'wandb', 'offline-run-*', 'run-*.wandb')):
        found.setdefault(os.path.basename(path)[len('run-'):-len('.wandb')], []).append(path)
    return found


def test_wandb_offline_run_and_resume_keep_the_id(shapes_zip, tmp_path):
    pytest.importorskip('wandb', reason='the wandb package (an optional extra, installed by CI) is not installed')
    run_train(short_run_args(tmp_path / 'a', shapes_zip, '--wandb=ect-tests/short'), tmp_path)
    run_dir = only_run_dir(tmp_path / 'a')
    (run_id, files), = wandb_files(run_dir).items()
    data = open(files[0], 'rb').read()
    for key in (b'Loss/loss', b'Progress/lr', b'Progress/stage', b'metrics/fd_randnet', b'metrics/fd_randnet',
                b'ect-tests', b'short'):
        assert key in data, key
    images = glob.glob(os.path.join(run_dir, 'wandb', f'offline-run-*-{run_id}', 'files', 'media', 'images', '**',
                                    '*.png'), recursive=True)
    grids = glob.glob(os.path.join(run_dir, 'grid-*.png'))
    assert len(images) == len(grids) > 0
    state = checkpoint.load_training_state(str(run_dir / 'training-state-latest.pt'))
    assert state['trackers'][trackers.WANDB_ID_KEY] == run_id
    run_train(short_run_args(tmp_path / 'b', shapes_zip, '--wandb=ect-tests/short', f'--resume={run_dir}',
                             '--duration=0.000096'), tmp_path)
    resumed_dir = only_run_dir(tmp_path / 'b')
    assert list(wandb_files(resumed_dir)) == [run_id]
    state = checkpoint.load_training_state(str(resumed_dir / 'training-state-latest.pt'))
    assert state['trackers'][trackers.WANDB_ID_KEY] == run_id


def test_tensorboard_events_read_back(shapes_zip, tmp_path):
    pytest.importorskip('tensorboard', reason='the tensorboard package (an optional extra, installed by CI) is not '
                                              'installed')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_train(short_run_args(tmp_path / 'tb', shapes_zip, '--tensorboard', *SCORE_INITIAL), tmp_path)
    run_dir = only_run_dir(tmp_path / 'tb')
    events = EventAccumulator(str(run_dir), size_guidance={'scalars': 0, 'images': 0})
    events.Reload()
    stats = run_records.stats_records(str(run_dir))
    lr = presets.resolve('quickstart', {}).optimizer_kwargs['lr']
    assert [s['Progress/lr']['mean'] for s in stats] == pytest.approx([lr, lr])   # the quickstart's lr, no schedule
    for name in ('Loss/loss', 'Progress/lr', 'Progress/stage'):
        assert [e.value for e in events.Scalars(name)] == pytest.approx([s[name]['mean'] for s in stats])
    status = [line for line in (run_dir / 'log.txt').read_text().splitlines() if line.startswith('tick ')]
    assert len(status) == 2 and 'eta ' in status[0] and status[-1].rstrip().endswith('eta 0s')
    assert [e.step for e in events.Scalars('Loss/loss')] == [32, 64]
    records = [r for r in run_records.metric_records(str(run_dir)) if r['metric'] == 'fd_randnet']
    assert [e.value for e in events.Scalars('metrics/fd_randnet')] == pytest.approx(
        [r['results']['fd_randnet'] for r in records])
    grids = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, 'grid-*.png')))
    tags = events.Tags()['images']
    assert {'grid/1step', 'grid/2step', 'grid/initial-1step'} <= set(tags)
    assert sum(len(events.Images(tag)) for tag in tags) == len(grids)
    image = events.Images('grid/1step')[-1]
    assert image.width > 16 and image.height > 16 and image.encoded_image_string.startswith(b'\x89PNG')


class FakeWandb:
    """Records wandb.init calls; the first (online) one fails as without a login."""

    def __init__(self):
        self.calls = []

    def Settings(self, **kwargs):
        return kwargs

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if kwargs.get('mode') != 'offline':
            raise RuntimeError('No API key configured. Use `wandb login` to log in.')
        return types.SimpleNamespace(id='abc123', settings=types.SimpleNamespace(mode='offline'))


def test_wandb_falls_back_to_offline(monkeypatch, capsys):
    monkeypatch.delenv('WANDB_MODE', raising=False)
    callback = trackers.WandbCallback.__new__(trackers.WandbCallback)
    callback.wandb = FakeWandb()
    run = callback._init(dict(project='p', dir='/runs/x'))
    assert run.id == 'abc123' and [c.get('mode') for c in callback.wandb.calls] == [None, 'offline']
    assert 'logging offline to /runs/x/wandb' in capsys.readouterr().out


@pytest.mark.parametrize('target, expected', [('proj', ('proj', None)), ('proj/run-1', ('proj', 'run-1'))])
def test_wandb_target(target, expected):
    assert trackers.parse_wandb_target(target) == expected


@pytest.mark.parametrize('target', ['', '/run', 'a/b/c'])
def test_bad_wandb_target(target):
    import dnnlib
    with pytest.raises(dnnlib.UserError, match='--wandb'):
        trackers.parse_wandb_target(target)


def test_status_line_ends_with_the_eta():
    from training.loop import run_files
    from training.checkpoints.checkpoint import LoopProgress
    progress = LoopProgress(cur_nimg=100, cur_tick=1, tick_start_nimg=0, elapsed_sec=10.0)
    # 900 images left at (9 s training + 1 s maintenance) per 100 images: 90 s
    assert run_files.eta_sec(progress, 9.0, 100, 1.0, 1000) == pytest.approx(90.0)
    assert run_files.eta_sec(progress, 9.0, 100, 1.0, 50) == 0.0

