"""--eval-init-background: the initial network scored in a spawned process while training starts
(metrics.background) gives the records, grids and log lines of the in-loop path, and failures reach the caller."""

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from configs import presets
from metrics import background, metric_main
from training.checkpoints import reader
from training.checkpoints import checkpoint


pytestmark = pytest.mark.usefixtures('private_cache')


def _run(shapes_zip, outdir, *extra):
    args = ['--preset=quickstart', f'--outdir={outdir}', f'--data={shapes_zip}', f'--ref={shapes_zip}',
            '--batch=16', '--tick=0.032', '--double=1', '--duration=0.000064', '--metric-samples=8',
            '--eval-init=fd_randnet_heun,fd_randnet', '--metrics=fd_randnet', '--snap=1', '--dump=2', *extra]
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    run_dir, = [d for d in outdir.iterdir() if d.is_dir()]
    records = {(r['snapshot_pkl'], r['metric']): r['results'] for r in metric_main.all_records(str(run_dir))}
    return run_dir, records, result.output


def _transferred_quickstart_network(run_dir):
    options = json.loads((run_dir / 'training_options.json').read_text())
    ecm = dnnlib.util.construct_class_by_name(**options['network_kwargs'], img_resolution=16, img_channels=3,
                                              label_dim=0)
    checkpoint.transfer_weights(reader.load_network(presets.QUICKSTART_CHECKPOINT)[0], ecm)
    return ecm.eval()


@pytest.fixture(scope='module')
def background_run(shapes_zip, tmp_path_factory):
    """One quickstart run scoring its initial network in the background: (run dir, records, output, threads before,
    threads after); the tests below read it (a copy of it is resumed)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('ECT_CACHE_DIR', str(tmp_path_factory.mktemp('cache')))
        run = _run(shapes_zip, tmp_path_factory.mktemp('runs'), '--eval-init-background=1', '--sample-every=2')
    return (*run, threads, torch.get_num_threads())


def test_background_scores_match_the_in_loop_scores(shapes_zip, background_run):
    run_dir, records, output, threads_before, threads_after = background_run
    assert threads_after == threads_before                      # the threads lent to the child came back
    assert set(records) == {('initial-network.pt', 'fd_randnet_heun'), ('initial-network.pt', 'fd_randnet'),
                            ('network-snapshot-000000.pt', 'fd_randnet')}
    # The same numbers as scoring the transferred network directly (only float sums' thread split may differ).
    net = _transferred_quickstart_network(run_dir)
    for metric in ('fd_randnet_heun', 'fd_randnet'):
        direct = metric_main.calc_metric(metric, net, ref=shapes_zip, num_samples=8, mid_t=[1.5]).results
        for name, value in direct.items():
            assert records[('initial-network.pt', metric)][name] == pytest.approx(value, rel=1e-4), metric
    # The child's report lines reach the training process's output (and so log.txt), before the summary table.
    assert any(line.startswith('fd_randnet_heun: fd_randnet_heun') for line in output.splitlines())
    log = (run_dir / 'log.txt').read_text()
    assert log.index('fd_randnet_heun: ') < log.index('Summary of the metric records')
    assert {'grid-initial-heun.png', 'grid-initial-1step.png', 'grid-initial-2step.png'} <= set(os.listdir(run_dir))
    # initial-network.pt, the name the records carry, holds the transferred diffusion model.
    snap, metadata = checkpoint.load_network_snapshot(str(run_dir / background.SNAPSHOT_NAME))
    assert metadata['mid_t'] == [presets.QUICKSTART_MID_T] and metadata['kimg'] == 0
    expected = net.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in snap.state_dict().items())


def test_a_failing_background_evaluation_is_raised(shapes_zip, tmp_path):
    net = reader.load_network(presets.QUICKSTART_CHECKPOINT)[0]
    job = dict(metrics=['fd_randnet'], metrics_ref=str(tmp_path / 'missing.zip'), mid_t=[1.5], run_dir=str(tmp_path),
               num_samples=8, detector_files={}, grids=False)
    threads = torch.get_num_threads()
    evaluation = background.InitialEvaluation.start(net, str(tmp_path), job, torch.device('cpu'))
    with pytest.raises(RuntimeError, match='missing.zip'):
        evaluation.finish()
    assert torch.get_num_threads() == threads


def test_cancel_stops_the_child(tmp_path):
    net = reader.load_network(presets.QUICKSTART_CHECKPOINT)[0]
    job = dict(metrics=['fd_randnet_heun'], metrics_ref=str(tmp_path), mid_t=[1.5], run_dir=str(tmp_path),
               num_samples=50000, detector_files={}, grids=True)
    threads = torch.get_num_threads()
    evaluation = background.InitialEvaluation.start(net, str(tmp_path), job, torch.device('cpu'))
    evaluation.cancel()
    assert not evaluation.process.is_alive() and torch.get_num_threads() == threads


def test_a_resumed_run_finishes_what_a_preemption_cut_short(shapes_zip, background_run, tmp_path):
    outdir = tmp_path / 'runs'
    run_dir = outdir / background_run[0].name
    shutil.copytree(background_run[0], run_dir)
    heun = run_dir / 'metric-fd_randnet_heun.jsonl'
    first = heun.read_text()
    heun.unlink()                      # as if pre-empted before the child wrote it
    resumed_dir, resumed, output = _run(shapes_zip, outdir, '--eval-init-background=1', '--sample-every=2',
                                        '--resume=auto', '--duration=0.000096')
    assert resumed_dir == run_dir
    initial = [r for r in metric_main.all_records(str(run_dir)) if r['snapshot_pkl'] == 'initial-network.pt']
    assert sorted(r['metric'] for r in initial) == ['fd_randnet', 'fd_randnet_heun']   # each once: only the missing
    assert resumed[('initial-network.pt', 'fd_randnet_heun')] == pytest.approx(
        json.loads(first)['results'], rel=1e-4)
    assert 'fd_randnet_heun: fd_randnet_heun' in output
