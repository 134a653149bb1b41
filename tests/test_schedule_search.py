"""The schedule search: ternary and golden-section searches on known functions, the recording objective, and
schedule_search.py end to end with a tiny ECM and a stand-in detector."""

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import fid
import schedule_search
from test_fid_cli import _tiny_ecm_snapshot
from test_metrics import TinyDetector, save_torchscript
from metrics import detectors, metric_main, metric_utils
from training.checkpoints import checkpoint, reader
from training.sampling import samplers
from training.sampling import samplers_karras
from training.sampling import ternary_search
from training.data.dataset_convert import convert_dataset


class Counted:
    def __init__(self, f):
        self.f, self.calls = f, []

    def __call__(self, x):
        self.calls.append(x)
        return self.f(x)


@pytest.mark.parametrize('seed', range(40))
def test_ternary_search_finds_the_minimum_of_unimodal_functions(seed):
    rng = np.random.default_rng(seed)
    left = int(rng.integers(0, 20))
    right = left + int(rng.integers(0, 60))
    x0, power = rng.uniform(left - 5, right + 5), rng.choice([1.0, 2.0, 0.5])
    f = Counted(lambda p: abs(p - x0) ** power)
    winner = ternary_search.ternary_search(f, left, right)
    points = np.arange(left, right + 1)
    assert winner == points[np.argmin([abs(p - x0) ** power for p in points])]
    assert all(left <= p <= right for p in f.calls)
    assert len(set(f.calls)) <= schedule_search.ternary_upper_bound(left, right)


def test_ternary_search_probes_as_the_official_script():
    f = Counted(lambda p: (p - 30) ** 2)
    assert ternary_search.ternary_search(f, 0, 39) == 30
    assert f.calls[:2] == [13, 26]    # int(0 + 39/3), int(39 - 39/3)
    assert f.calls[2:4] == [21, 30]   # bracket [13, 39]: int(13 + 26/3), int(39 - 26/3)


def test_ternary_search_refuses_an_empty_range():
    with pytest.raises(dnnlib.UserError, match='empty'):
        ternary_search.ternary_search(lambda p: p, 5, 4)


@pytest.mark.parametrize('x0', [0.13, 0.5, 0.97])
def test_golden_section_search_brackets_the_minimum(x0):
    f = Counted(lambda u: (u - x0) ** 2 + 0.1 * abs(u - x0))
    best = ternary_search.golden_section_search(f, 0.0, 1.0, 20)
    assert len(f.calls) == 20
    assert abs(best - x0) <= ternary_search.GOLDEN ** 18 + 1e-12   # the final bracket's width
    assert f.f(best) == min(f.f(u) for u in f.calls)


def test_objective_memoises_and_records(tmp_path):
    paths = (tmp_path / 'a.csv', tmp_path / 'a.json')
    seen = []
    objective = ternary_search.Objective(Counted(lambda p: (p - 2) ** 2), lambda p: dict(ts=[0, p, 9]), paths,
                                         on_point=seen.append)
    for p in [4, 1, 4, 2]:
        objective(p)
    assert [row['point'] for row in seen] == [4, 1, 2]
    assert objective.score_fn.calls == [4, 1, 2]
    rows = list(csv.DictReader(open(paths[0])))
    assert [(r['point'], r['ts'], float(r['fid'])) for r in rows] == [('4', '0,4,9', 4.0), ('1', '0,1,9', 1.0),
                                                                      ('2', '0,2,9', 0.0)]
    assert json.load(open(paths[1]))['lowest']['point'] == 2


# ----------------------------------------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('search')
    net = _tiny_ecm_snapshot(root / 'net.pt').eval()
    det_path = save_torchscript(root / 'det.pt', TinyDetector())
    feats = np.random.default_rng(3).standard_normal([40, 6]) * 0.2
    ref_path = root / 'ref.npz'
    np.savez(ref_path, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    return dict(root=root, net=net, det=det_path, ref=str(ref_path))


def _run(setup, outdir, *args, network=None):
    network = network or setup['root'] / 'net.pt'
    return CliRunner().invoke(schedule_search.cli, [f'--network={network}', f'--ref={setup["ref"]}', f'--outdir={outdir}',
                                                    f'--detector={setup["det"]}', '--allow-unsafe-pickle', '--num=6',
                                                    '--batch=6', '--device=cpu', *args], catch_exceptions=False)


def _fid(setup, sampler, kwargs, net=None):
    detector = detectors.get_detector('inception', setup['det'], allow_unsafe_pickle=True)
    stats = fid.network_stats(net or setup['net'], detector, list(range(6)), sampler, kwargs, 6, 'cpu')
    return fid.fid_from_stats(stats, metric_utils.load_ref(setup['ref']))


def test_grid_search_end_to_end(setup, tmp_path):
    result = _run(setup, tmp_path, '--steps=10', '--begin=0', '--end=9')
    assert result.exit_code == 0, result.output
    record = json.load(open(tmp_path / 'schedule-search.json'))
    scores = {row['point']: row['fid'] for row in record['points']}
    assert len(list(csv.DictReader(open(tmp_path / 'schedule-search.csv')))) == len(scores) >= 4
    # Each point's score is the FID of the schedule it names: t(ts) on the 10-point Karras grid, then 0.
    for row in record['points'][:3]:
        expected_t = [(80 ** (1 / 7) + i / 9 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in row['ts'][:-1]] + [0.0]
        np.testing.assert_allclose(row['t_steps'], expected_t, rtol=1e-12)
        assert row['fid'] == pytest.approx(_fid(setup, 'consistency', dict(t_steps=tuple(row['t_steps']))), rel=1e-6)
    # The winner is what the ternary search decides on the recorded scores, and the printed flags give its times.
    assert record['winner']['point'] == ternary_search.ternary_search(scores.__getitem__, 0, 9)
    t_steps = record['winner']['t_steps']
    flags = f'--t-max={t_steps[0]:.6g} ' + (f'--mid_t={",".join(f"{t:.6g}" for t in t_steps[1:-1])}'
                                           if len(t_steps) > 2 else '--steps=1')
    assert record['generate_flags'] == flags
    assert result.output.strip().splitlines()[-1].endswith(flags)


def test_continuous_search_end_to_end(setup, tmp_path):
    result = _run(setup, tmp_path, '--mid_t-range=0.2,5', '--evals=4')
    assert result.exit_code == 0, result.output
    record = json.load(open(tmp_path / 'schedule-search.json'))
    assert len(record['points']) == 4
    assert all(0.2 <= row['mid_t'] <= 5 for row in record['points'])
    best = min(record['points'], key=lambda row: row['fid'])
    assert record['winner'] == best
    t_steps = samplers.make_consistency_steps(80.0, [best['mid_t']])
    assert best['fid'] == pytest.approx(_fid(setup, 'consistency', dict(t_steps=t_steps)), rel=1e-6)
    assert f'--mid_t={best["mid_t"]:.6g}' in result.output


def test_openai_network_searches_multistep_ts(setup, fixtures_dir, tmp_path):
    path = tmp_path / 'cd_lsun_like.pt'   # A cd_* name: the consistency form.
    path.write_bytes((fixtures_dir / 'openai_cm' / 'tiny_lsun_like.pt').read_bytes())
    result = _run(setup, tmp_path, '--steps=8', '--resolution=16', '--num_head_channels=8', network=path)
    assert result.exit_code == 0, result.output
    record = json.load(open(tmp_path / 'schedule-search.json'))
    net, _ = reader.load_network(str(path), resolution=16, num_head_channels=8)
    row = record['points'][0]
    kwargs = dict(sampler='multistep', ts=row['ts'], steps=8)
    assert row['fid'] == pytest.approx(_fid(setup, samplers_karras.karras_sample, kwargs, net=net), rel=1e-6)
    winner_ts = ','.join(map(str, record['winner']['ts']))
    assert result.output.strip().splitlines()[-1].endswith(f'--sampler=multistep --ts={winner_ts} --steps=8')
    result = _run(setup, tmp_path, '--mid_t-range=0.5,2', '--resolution=16', '--num_head_channels=8', network=path)
    assert result.exit_code == 2 and '--begin/--end' in result.output


@pytest.mark.parametrize('args, message', [
    (['--begin=0', '--end=5', '--steps=10'], '--end: the last index must be steps - 1'),
    (['--begin=x'], '--begin=x'),
    (['--mid_t-range=5,1'], '--mid_t-range=5.0,1.0'),
])
def test_bad_flags_fail_before_sampling(setup, tmp_path, args, message):
    result = _run(setup, tmp_path, *args)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / 'schedule-search.json').exists()


def test_randnet_search_reproduces_the_metric_of_the_training_callback(tmp_path):
    """The quickstart's mid_t search from the command line: fid.py ref --kind=randnet, then schedule_search.py
    --kind=randnet; the winner's score is two_step_fd_randnet of metric_main at that mid_t (the in-run metric)."""
    data = str(tmp_path / 'shapes8.zip')
    convert_dataset('procedural:shapes', data, 40, '8x8', None)
    net = _tiny_ecm_snapshot(tmp_path / 'net.pt').eval()
    ref = str(tmp_path / 'ref.npz')
    made = CliRunner().invoke(fid.cli, ['ref', f'--data={data}', f'--dest={ref}', '--kind=randnet', '--batch=20',
                                        '--device=cpu'], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(schedule_search.cli, [f'--network={tmp_path / "net.pt"}', f'--ref={ref}',
                                                      f'--outdir={tmp_path}', '--kind=randnet', '--num=8', '--batch=8',
                                                      '--device=cpu', '--mid_t-range=0.5,3', '--evals=3'],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    winner = json.load(open(tmp_path / 'schedule-search.json'))['winner']
    direct = metric_main.calc_metric('two_step_fd_randnet', net, ref=data, num_samples=8, mid_t=[winner['mid_t']])
    assert winner['fid'] == pytest.approx(direct.results['two_step_fd_randnet'], rel=1e-6)


def test_meanflow_snapshot_searches_its_mid_t_in_flow_time(setup, tmp_path):
    """A MeanFlow snapshot's 2-step mid_t is searched in flow time (0, 1) with its own sampler; the grid search is
    refused in one line (it is a σ grid)."""
    from training.networks.meanflow_unet import MeanFlowPrecond
    from training.sampling import samplers_meanflow
    torch.manual_seed(0)
    net = MeanFlowPrecond(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
                          attn_resolutions=[]).eval()
    path = tmp_path / 'meanflow.pt'
    checkpoint.save_network_snapshot(path, net, kimg=1, mid_t=[0.5], sampler='meanflow')
    result = _run(setup, tmp_path, '--mid_t-range=0.2,0.8', '--evals=3', network=path)
    assert result.exit_code == 0, result.output
    record = json.load(open(tmp_path / 'schedule-search.json'))
    assert len(record['points']) == 3 and all(0.2 <= row['mid_t'] <= 0.8 for row in record['points'])
    best = record['winner']
    kwargs = dict(t_steps=samplers_meanflow.make_meanflow_steps(1.0, [best['mid_t']]))
    assert best['fid'] == pytest.approx(_fid(setup, 'meanflow', kwargs, net=net), rel=1e-6)
    refused = _run(setup, tmp_path / 'grid', network=path)
    assert refused.exit_code == 2 and 'search its 2-step mid_t with --mid_t-range' in refused.output
