"""The quickstart: procedural data, the random-network Frechet distance, the presets, and a shortened run of
`python train.py --preset=quickstart` through the same code path: its initial network scored in a background process
(metrics.background) gives the in-loop path's records, grids and log lines, and a resumed run finishes what a
pre-emption cut short."""

import json
import os
import pathlib
import shutil
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

import dnnlib
import train
from configs import presets
from conftest import once_per_session
from metrics import background
from metrics import detectors
from metrics import metric_main
from training.checkpoints import reader
from training.checkpoints import checkpoint
from training.sampling import generation
from training.data.dataset import ImageFolderDataset
from training.data.dataset_convert import convert_dataset


pytestmark = pytest.mark.usefixtures('private_cache')


def _zip_images(path):
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}

# ----------------------------------------------------------------------------------------------------------
# The procedural source.


def test_procedural_shapes_is_deterministic_in_edm_layout(shapes_zip, tmp_path):
    again = str(tmp_path / 'again.zip')
    convert_dataset('procedural:shapes', again, 20, None, None)
    first, second = _zip_images(shapes_zip), _zip_images(again)
    names = sorted(n for n in second if n.endswith('.png'))
    assert names == [f'00000/img{i:08d}.png' for i in range(20)]
    assert all(first[n] == second[n] for n in names)          # image i depends on i only, not on the count
    labels = json.loads(second['dataset.json'])['labels']
    assert [name for name, _ in labels] == names and {label for _, label in labels} <= {0, 1}
    dataset = ImageFolderDataset(shapes_zip)
    assert (len(dataset), dataset.resolution, dataset.num_channels) == (96, 16, 3)
    images = np.stack([dataset[i][0] for i in range(len(dataset))]).astype(np.float64)
    assert images.std(axis=(1, 2, 3)).min() > 5                 # every image has structure, none is flat
    assert np.abs(images[1:] - images[:-1]).mean() > 10          # and the images differ from each other


def test_procedural_shapes_resolution_and_errors(tmp_path):
    dest = str(tmp_path / 'big')
    convert_dataset('procedural:shapes', dest, 3, '32x32', None)
    assert ImageFolderDataset(dest).resolution == 32
    with pytest.raises(dnnlib.UserError, match='unknown procedural source'):
        convert_dataset('procedural:nope', str(tmp_path / 'x.zip'), 3, None, None)
    with pytest.raises(dnnlib.UserError, match='--resolution'):
        convert_dataset('procedural:shapes', str(tmp_path / 'y.zip'), 3, '24x24', None)

# ----------------------------------------------------------------------------------------------------------
# fd_randnet.


def _numpy_randnet_features(images_uint8, seed=0, widths=(32, 64, 128)):
    """Independent float64 numpy implementation of the random network's features (same weight draws)."""
    generator = torch.Generator().manual_seed(seed)
    x = images_uint8.astype(np.float64) / 127.5 - 1
    feats, cin = [], 3
    for width in widths:
        w = (torch.randn([width, cin, 3, 3], generator=generator, dtype=torch.float64) * np.sqrt(2 / (cin * 9)))
        w = w.to(torch.float32).to(torch.float64).numpy()
        padded = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))   # N,C,H,W,3,3
        n, _, h, wd = x.shape
        cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * wd, cin * 9)
        x = (cols @ w.reshape(width, cin * 9).T).reshape(n, h, wd, width).transpose(0, 3, 1, 2)
        x = np.where(x > 0, x, 0.2 * x)
        feats.append(x.mean(axis=(2, 3)))
        n, c, h, wd = x.shape
        x = x.reshape(n, c, h // 2, 2, wd // 2, 2).mean(axis=(3, 5))
        cin = width
    return np.concatenate(feats, axis=1)


def _frechet(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_randnet_detector_matches_numpy_reference():
    images = np.random.default_rng(1).integers(0, 256, size=[5, 3, 16, 16], dtype=np.uint8)
    ours = detectors.get_detector('randnet')(torch.from_numpy(images)).numpy()
    assert ours.shape == (5, 32 + 64 + 128)
    np.testing.assert_allclose(ours, _numpy_randnet_features(images), rtol=1e-4, atol=1e-5)
    with pytest.raises(dnnlib.UserError, match='take no file'):
        detectors.get_detector('randnet', 'some.pkl')


@pytest.fixture(scope='module')
def tiny_diffusion_net():
    torch.manual_seed(0)
    return presets_net('training.networks.EDMPrecond').eval()


def presets_net(class_name):
    kwargs = dict(presets.ARCHS['ddpmpp'], model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[])
    return dnnlib.util.construct_class_by_name(class_name=class_name, img_resolution=16, img_channels=3, label_dim=0,
                                               **kwargs)


def test_fd_randnet_against_independent_computation(shapes_zip, tiny_diffusion_net, tmp_path):
    net = tiny_diffusion_net
    result = metric_main.calc_metric('two_step_fd_randnet', net, run_dir=str(tmp_path), snapshot_name='a.pt',
                                     ref=shapes_zip, num_samples=40, batch_size=16, mid_t=[0.821])
    images = np.concatenate([img.numpy() for _, img in generation.generate_images(
        net, list(range(40)), sampler='consistency', sampler_kwargs=dict(t_steps=(80.0, 0.821, 0.0)))])
    dataset = ImageFolderDataset(shapes_zip)
    real = np.stack([dataset[i][0] for i in range(len(dataset))])
    expected = _frechet(_numpy_randnet_features(images.transpose(0, 3, 1, 2)), _numpy_randnet_features(real))
    assert result.results.two_step_fd_randnet == pytest.approx(expected, rel=1e-3)
    cached = os.listdir(tmp_path / 'cache' / 'dataset-stats')   # the reference statistics were cached once
    assert len(cached) == 1 and cached[0].startswith('shapes-')
    again = metric_main.calc_metric('two_step_fd_randnet', net, ref=shapes_zip, num_samples=40, mid_t=[0.821])
    assert again.results.two_step_fd_randnet == pytest.approx(expected, rel=1e-3)
    record = metric_main.read_records(str(tmp_path), 'two_step_fd_randnet')[0]
    assert (record['sampler'], record['nfe'], record['num_samples']) == ('consistency', 2, 40)
    real_vs_real = _frechet(_numpy_randnet_features(real[:48]), _numpy_randnet_features(real[48:]))
    assert expected > 3 * real_vs_real                           # an untrained net is far from the data


def test_fd_randnet_heun_samples_with_edm_heun(shapes_zip, tiny_diffusion_net):
    sampling = metric_main.sampling_for('fd_randnet_heun', tiny_diffusion_net)
    assert (sampling['sampler'], sampling['nfe'], sampling['sampler_kwargs']) == ('heun', 35, dict(num_steps=18))
    assert metric_main.sampling_for('fd_randnet', tiny_diffusion_net)['nfe'] == 1
    with pytest.raises(dnnlib.UserError, match='--ref'):
        metric_main.check_ref('fd_randnet', os.path.join(os.path.dirname(shapes_zip), 'missing.zip'))

# ----------------------------------------------------------------------------------------------------------
# Presets and the run.


def test_quickstart_preset_resolves_as_claimed(tmp_path):
    result = CliRunner().invoke(train.main, ['--preset=quickstart', f'--outdir={tmp_path / "runs"}', '--dry-run'])
    assert result.exit_code == 0, result.output
    run_dir, = [d for d in (tmp_path / 'runs').iterdir() if d.is_dir()]
    with open(run_dir / 'training_options.json') as f:
        options = json.load(f)
    assert options['transfer'] == presets.QUICKSTART_CHECKPOINT
    assert options['dataset_kwargs']['path'] == presets.QUICKSTART_DATA == options['metrics_ref']
    method = options['method_kwargs']
    assert method['class_name'] == 'training.methods.ect.ECT'
    assert method['mapping'] == dict(class_name='training.methods.loss.SigmoidMapping', q=2.0, k=8.0, b=1.0)
    assert method['weighting']['class_name'] == 'training.methods.loss.InverseGapWeighting'
    assert options['optimizer_kwargs']['class_name'] == 'torch.optim.RAdam'
    assert options['ema_kwargs']['class_name'] == 'training.loop.ema.ConstantEMA'
    assert options['network_kwargs']['class_name'] == 'training.networks.ECMPrecond'
    assert options['metrics'] == ['fd_randnet', 'two_step_fd_randnet']
    assert options['eval_init_metrics'] == ['fd_randnet_heun', 'fd_randnet', 'two_step_fd_randnet']
    assert options['total_kimg'] / options['tick_kimg'] / method['double_ticks'] >= 2   # the curriculum advances
    # The sizes the README and the preset's comment state: 16 kimg at batch 16 (1000 steps), a stage every 2 ticks,
    # lr 5e-4, EMA 0.995, the 2-step mid_t searched on this data (1.5), not CIFAR-10's 0.821, and the initial
    # network scored in the background.
    assert (options['total_kimg'], options['batch_size'], options['tick_kimg'], method['double_ticks']) == (16, 16, 2, 2)
    assert options['ema_kwargs']['beta'] == 0.995 and options['optimizer_kwargs']['lr'] == 5e-4
    assert options['mid_t'] == [1.5] and options['eval_init_background'] is True
    net = reader.load_network(presets.QUICKSTART_CHECKPOINT)[0]                          # safe snapshot loader
    assert type(net).__name__ == 'EDMPrecond' and (net.img_resolution, net.img_channels) == (16, 3)
    ecm = dnnlib.util.construct_class_by_name(**options['network_kwargs'], img_resolution=16, img_channels=3,
                                              label_dim=0)
    assert not checkpoint.transfer_weights(net, ecm).untouched                             # every weight transfers
    pretrain = presets.resolve('quickstart-pretrain', {})
    assert pretrain.method_kwargs['class_name'] == 'training.methods.edm.EDM'
    assert {k: v for k, v in pretrain.network_kwargs.items() if k != 'class_name'} == \
        {k: v for k, v in options['network_kwargs'].items() if k != 'class_name'}


def test_missing_preset_data_is_built(tmp_path):
    flat = presets.merge('quickstart', dict(data=str(tmp_path / 'built.zip')))
    flat.data_max_images = 7
    assert train.ensure_data(flat, presets.build_options(flat), dry_run=False, preset_data=flat.data)
    assert len(ImageFolderDataset(flat.data)) == 7
    assert not train.ensure_data(flat, presets.build_options(flat), dry_run=False, preset_data=flat.data)  # there
    flat.update(data=str(tmp_path / 'never.zip'), transfer=str(tmp_path / 'missing.pt'))
    with pytest.raises(dnnlib.UserError, match='--transfer: no such file'):
        train.ensure_data(flat, presets.build_options(flat), dry_run=False, preset_data=flat.data)
    assert not os.path.exists(flat.data)                        # refused before any work


def test_mistyped_data_is_not_fabricated(tmp_path):
    # Only the preset's own dataset path is built from its procedural source; a typo is refused, nothing made.
    typo = tmp_path / 'datsets' / 'quickstart-shapes-16x16.zip'
    result = CliRunner().invoke(train.main, ['--preset=quickstart', f'--data={typo}', f'--outdir={tmp_path / "runs"}'])
    assert result.exit_code == 2 and 'Traceback' not in result.output
    assert result.stderr.strip().splitlines() == [
        f'Error: --data: no such file or directory: {typo} (only the preset\'s own {presets.QUICKSTART_DATA} is '
        f'built from procedural:shapes)']
    assert sorted(os.listdir(tmp_path)) == []


def _run(shapes_zip, outdir, *extra):
    """A shortened quickstart (3 ticks of 32 images, 8 metric samples): (run dir, {(snapshot, metric): results},
    output). As the preset says, it scores its initial network in a background process while training starts."""
    args = ['--preset=quickstart', f'--outdir={outdir}', f'--data={shapes_zip}', f'--ref={shapes_zip}',
            '--batch=16', '--tick=0.032', '--double=1', '--duration=0.000096', '--metric-samples=8', '--snap=1',
            '--dump=2', '--sample-every=3', *extra]
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    run_dir, = [d for d in outdir.iterdir() if d.is_dir()]
    records = {(r['snapshot_pkl'], r['metric']): r['results'] for r in metric_main.all_records(str(run_dir))}
    return run_dir, records, result.output


@pytest.fixture(scope='module')
def short_run(shapes_zip, tmp_path_factory):
    """One shortened quickstart run shared by the tests below, once per session (a copy of it is resumed):
    (run dir, records, output, intra-op threads before and after it in the process that ran it)."""
    def produce(folder):
        threads = torch.get_num_threads()
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv('ECT_CACHE_DIR', str(folder / 'cache'))
            run_dir, _, output = _run(shapes_zip, folder / 'runs')
        return dict(run_dir=str(run_dir), output=output, threads=[threads, torch.get_num_threads()])
    _, run = once_per_session(tmp_path_factory, 'quickstart-short-run', produce)
    run_dir = pathlib.Path(run['run_dir'])
    records = {(r['snapshot_pkl'], r['metric']): r['results'] for r in metric_main.all_records(str(run_dir))}
    return (run_dir, records, run['output'], *run['threads'])


def test_short_quickstart_run(short_run):
    run_dir, _, output, _, _ = short_run
    files = set(os.listdir(run_dir))
    assert {'grid-initial-heun.png', 'grid-initial-1step.png', 'grid-initial-2step.png', 'grid-000000-1step.png',
            'grid-000000-2step.png', 'log.txt', 'stats.jsonl', 'network-snapshot-000000.pt',
            'training-state-latest.pt', 'metric-fd_randnet.jsonl', 'metric-two_step_fd_randnet.jsonl',
            'metric-fd_randnet_heun.jsonl'} <= files
    records = metric_main.all_records(str(run_dir))
    found = {(r['snapshot_pkl'], r['metric'], r['sampler'], r['nfe']) for r in records}
    assert found == {('initial-network.pt', 'fd_randnet_heun', 'heun', 35),
                     ('initial-network.pt', 'fd_randnet', 'consistency', 1),
                     ('initial-network.pt', 'two_step_fd_randnet', 'consistency', 2),
                     ('network-snapshot-000000.pt', 'fd_randnet', 'consistency', 1),
                     ('network-snapshot-000000.pt', 'two_step_fd_randnet', 'consistency', 2)}
    assert all(r['num_samples'] == 8 and np.isfinite(list(r['results'].values())).all() for r in records)
    assert 'Curriculum stage 2' in output                        # 3 ticks, doubling every tick
    log = (run_dir / 'log.txt').read_text()
    table = log[log.index('Summary of the metric records'):]
    assert len([line for line in table.splitlines() if 'fd_randnet' in line]) == 5
    net, metadata = checkpoint.load_network_snapshot(str(run_dir / 'network-snapshot-000000.pt'))
    assert net.sigma_min == pytest.approx(0.003)
    assert metadata['mid_t'] == [presets.QUICKSTART_MID_T]        # 2-step grids and metrics at the preset's mid_t


def _transferred_quickstart_network(run_dir):
    options = json.loads((run_dir / 'training_options.json').read_text())
    ecm = dnnlib.util.construct_class_by_name(**options['network_kwargs'], img_resolution=16, img_channels=3,
                                              label_dim=0)
    checkpoint.transfer_weights(reader.load_network(presets.QUICKSTART_CHECKPOINT)[0], ecm)
    return ecm.eval()


def test_background_scores_match_the_in_loop_scores(shapes_zip, short_run):
    run_dir, records, output, threads_before, threads_after = short_run
    assert threads_after == threads_before                      # the threads lent to the child came back
    # The same numbers as scoring the transferred network directly (only float sums' thread split may differ).
    net = _transferred_quickstart_network(run_dir)
    for metric in ('fd_randnet_heun', 'fd_randnet', 'two_step_fd_randnet'):
        direct = metric_main.calc_metric(metric, net, ref=shapes_zip, num_samples=8, mid_t=[1.5]).results
        for name, value in direct.items():
            assert records[('initial-network.pt', metric)][name] == pytest.approx(value, rel=1e-4), metric
    # The child's report lines reach the training process's output (and so log.txt), before the summary table.
    assert any(line.startswith('fd_randnet_heun: fd_randnet_heun') for line in output.splitlines())
    log = (run_dir / 'log.txt').read_text()
    assert log.index('fd_randnet_heun: ') < log.index('Summary of the metric records')
    # initial-network.pt, the name the records carry, holds the transferred diffusion model.
    snap, metadata = checkpoint.load_network_snapshot(str(run_dir / background.SNAPSHOT_NAME))
    assert metadata['mid_t'] == [presets.QUICKSTART_MID_T] and metadata['kimg'] == 0
    expected = net.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in snap.state_dict().items())


def test_a_resumed_run_finishes_what_a_preemption_cut_short(shapes_zip, short_run, tmp_path):
    outdir = tmp_path / 'runs'
    run_dir = outdir / short_run[0].name
    shutil.copytree(short_run[0], run_dir)
    heun = run_dir / 'metric-fd_randnet_heun.jsonl'
    first = heun.read_text()
    heun.unlink()                      # as if pre-empted before the background child wrote it
    resumed_dir, resumed, output = _run(shapes_zip, outdir, '--resume=auto', '--duration=0.000128')
    assert resumed_dir == run_dir
    initial = [r for r in metric_main.all_records(str(run_dir)) if r['snapshot_pkl'] == 'initial-network.pt']
    assert sorted(r['metric'] for r in initial) == ['fd_randnet', 'fd_randnet_heun', 'two_step_fd_randnet']
    assert resumed[('initial-network.pt', 'fd_randnet_heun')] == pytest.approx(
        json.loads(first)['results'], rel=1e-4)
    assert 'fd_randnet_heun: fd_randnet_heun' in output


@pytest.mark.parametrize('flag, message', [('--eval-init=bogus', '--eval-init: unknown metric "bogus"'),
                                           ('--metric-samples=1', '--metric-samples: must be at least 2')])
def test_quickstart_flag_errors_are_one_line(tmp_path, flag, message):
    result = CliRunner().invoke(train.main, ['--preset=quickstart', f'--outdir={tmp_path}', '--dry-run', flag])
    assert result.exit_code == 2 and message in result.output and 'Traceback' not in result.output


@pytest.mark.parametrize('flag', ['none', '', 'NONE'])
def test_empty_metric_flags_disable_the_presets_metrics(tmp_path, flag):
    # --metrics= / --eval-init= given empty (or "none") turn the preset's lists off instead of keeping them.
    result = CliRunner().invoke(train.main, ['--preset=quickstart', f'--outdir={tmp_path}', '--dry-run',
                                             f'--metrics={flag}', f'--eval-init={flag}'])
    assert result.exit_code == 0, result.output
    with open(next(d for d in tmp_path.iterdir() if d.is_dir()) / 'training_options.json') as f:
        options = json.load(f)
    assert options['metrics'] == [] and options['eval_init_metrics'] == []
    only = CliRunner().invoke(train.main, ['--preset=quickstart', f'--outdir={tmp_path / "b"}', '--dry-run',
                                           '--metrics= fd_randnet ,'])
    with open(next(d for d in (tmp_path / 'b').iterdir() if d.is_dir()) / 'training_options.json') as f:
        assert only.exit_code == 0 and json.load(f)['metrics'] == ['fd_randnet']
