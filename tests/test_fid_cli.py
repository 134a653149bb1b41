"""fid.py and the snapshot evaluator end to end, with a tiny TorchScript detector built here (no downloads; loaded
with the --allow-unsafe-pickle opt-in a trusted TorchScript file needs; the safe default route is in test_detectors).

ref/calc round trips on PNG datasets this test writes (folder and zip), values checked against an
independent float64 computation; user mistakes exit with code 2 and one line on stderr.
"""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
from metrics import evaluate
from conftest import FIXTURES_DIR, zip_folder
from test_metrics import TinyDetector, reference_frechet, save_torchscript
from training import networks
from training.checkpoints import checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_dataset(root, images):
    """EDM layout: 00000/img00000000.png ..."""
    for idx, image in enumerate(images):
        path = root / f'{idx // 1000:05d}' / f'img{idx:08d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(image).save(path)
    return str(root)




def independent_stats(images, det_path):
    module = torch.jit.load(det_path)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    feats = module(x, return_features=True).numpy().astype(np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('fid')
    rng = np.random.default_rng(0)
    images_a = [rng.integers(0, 256, [16, 16, 3], dtype=np.uint8) for _ in range(24)]
    images_b = [np.clip(im.astype(int) // 2 + 60, 0, 255).astype(np.uint8) for im in images_a]
    data_a = write_dataset(root / 'a', images_a)
    return dict(root=root, images_a=images_a, images_b=images_b, data_a=data_a,
                zip_a=zip_folder(data_a, root / 'a.zip'), data_b=write_dataset(root / 'b', images_b),
                det=save_torchscript(root / 'det.pt', TinyDetector()))


def invoke(args):
    result = CliRunner().invoke(fid.cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()


def run_cli(*args):
    """A real process, to see the exit code and stderr exactly as a user would."""
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_ref_calc_round_trip(setup):
    s = setup
    ref = str(s['root'] / 'ref.npz')
    invoke(['ref', f'--data={s["data_a"]}', f'--dest={ref}', f'--detector={s["det"]}', '--allow-unsafe-pickle', '--batch=5'])
    arrays = np.load(ref)
    mu, sigma = independent_stats(s['images_a'], s['det'])
    np.testing.assert_allclose(arrays['mu'], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arrays['sigma'], sigma, rtol=1e-4, atol=1e-6)

    same = float(invoke(['calc', f'--images={s["zip_a"]}', f'--ref={ref}', '--num=24', f'--detector={s["det"]}', '--allow-unsafe-pickle'])[-1])
    assert abs(same) < 1e-4

    other = float(invoke(['calc', f'--images={s["data_b"]}', f'--ref={ref}', '--num=24', f'--detector={s["det"]}', '--allow-unsafe-pickle'])[-1])
    mu_b, sigma_b = independent_stats(s['images_b'], s['det'])
    assert other > 0.01
    assert other == pytest.approx(reference_frechet(mu_b, sigma_b, arrays['mu'], arrays['sigma']), rel=1e-4)


def test_ref_from_zip_equals_ref_from_folder_and_keeps_features(setup):
    s = setup
    dest_dir, dest_zip = str(s['root'] / 'dir.npz'), str(s['root'] / 'zip.npz')
    invoke(['ref', f'--data={s["data_a"]}', f'--dest={dest_dir}', f'--detector={s["det"]}', '--allow-unsafe-pickle'])
    invoke(['ref', f'--data={s["zip_a"]}', f'--dest={dest_zip}', f'--detector={s["det"]}', '--allow-unsafe-pickle', '--features'])
    a, b = np.load(dest_dir), np.load(dest_zip)
    np.testing.assert_allclose(a['mu'], b['mu'], rtol=1e-12)
    np.testing.assert_allclose(a['sigma'], b['sigma'], rtol=1e-10)
    assert 'features' not in a and b['features'].shape == (24, 6)
    assert not [f for f in os.listdir(s['root']) if f.endswith('.tmp')]  # atomic writes leave no temporaries


def _tiny_ecm_snapshot(path):
    net = networks.ECMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet',
                              model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[],
                              dropout=0.0)
    checkpoint.save_network_snapshot(str(path), net, kimg=1, mid_t=0.821)
    return net


def test_net_mode_scores_in_memory_and_evaluator_records(setup, tmp_path):
    s = setup
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    _tiny_ecm_snapshot(run_dir / 'network-snapshot-000001.pt')
    ref = str(tmp_path / 'ref8.npz')
    rng = np.random.default_rng(1)
    feats = rng.standard_normal([40, 6])
    np.savez(ref, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    lines = invoke(['net', f'--network={run_dir / "network-snapshot-000001.pt"}', f'--ref={ref}', '--num=12',
                    '--steps=1', f'--detector={s["det"]}', '--allow-unsafe-pickle', '--batch=6'])
    assert float(lines[-1]) > 0

    args = [f'--resume={run_dir}', f'--ref={ref}', '--num-images=12', f'--detector={s["det"]}', '--allow-unsafe-pickle', '--batch=6']
    first = CliRunner().invoke(evaluate.cli, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    records = {m: json.loads((run_dir / f'metric-{m}.jsonl').read_text()) for m in ('fid50k_full', 'two_step_fid50k_full')}
    assert records['fid50k_full']['results']['fid50k_full'] == pytest.approx(float(lines[-1]), rel=1e-5)  # printed with %g
    assert records['two_step_fid50k_full']['nfe'] == 2
    second = CliRunner().invoke(evaluate.cli, args, catch_exceptions=False)
    assert '2 snapshot/metric pair(s) already recorded: skipped' in second.output
    assert len((run_dir / 'metric-fid50k_full.jsonl').read_text().splitlines()) == 1
    assert 'network-snapshot-000001.pt two_step_fid50k_full' in ' '.join(second.output.split())


def test_repeats_score_consecutive_seed_sets_and_record_mean_and_min(setup, tmp_path):
    """--repeats=2 (EDM's protocol): seed set i is --seed + i·--num; each set's value equals a single run on those
    seeds; fid.py net prints the mean and minimum, the evaluator records them and each value."""
    s = setup
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    _tiny_ecm_snapshot(run_dir / 'network-snapshot-000001.pt')
    ref = str(tmp_path / 'ref8.npz')
    feats = np.random.default_rng(1).standard_normal([40, 6])
    np.savez(ref, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    common = [f'--network={run_dir / "network-snapshot-000001.pt"}', f'--ref={ref}', '--num=6', '--steps=1',
              f'--detector={s["det"]}', '--allow-unsafe-pickle', '--batch=6']
    single = [float(invoke(['net', *common, f'--seed={seed}'])[-1]) for seed in (3, 9)]
    assert single[0] != pytest.approx(single[1])
    lines = invoke(['net', *common, '--seed=3', '--repeats=2'])
    assert [line.split(':')[0] for line in lines[-3:-1]] == ['seeds 3-8', 'seeds 9-14']
    assert [float(line.split(':')[1]) for line in lines[-3:-1]] == pytest.approx(single, rel=1e-5)
    words = lines[-1].split()
    assert float(words[1]) == pytest.approx(np.mean(single), rel=1e-5)
    assert float(words[3]) == pytest.approx(min(single), rel=1e-5)

    args = [f'--resume={run_dir}', f'--ref={ref}', '--num-images=6', f'--detector={s["det"]}', '--allow-unsafe-pickle',
            '--batch=6', '--metrics=fid50k_full']
    for repeats in ('--repeats=1', '--repeats=2'):   # a one-set record does not count for two sets
        result = CliRunner().invoke(evaluate.cli, [*args, repeats], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run_dir / 'metric-fid50k_full.jsonl').read_text().splitlines()]
    assert len(records) == 2 and 'repeats' not in records[0] and records[1]['repeats'] == 2
    first_set = records[0]['results']['fid50k_full']
    second_set = float(invoke(['net', *common, '--seed=6'])[-1])
    per_set = [r['fid50k_full'] for r in records[1]['per_seed_set']]
    assert per_set == pytest.approx([first_set, second_set], rel=1e-5)
    assert records[1]['results'] == pytest.approx(dict(fid50k_full_mean=np.mean(per_set), fid50k_full_min=min(per_set)))


def test_evaluator_takes_the_openai_state_dict_flags(setup, tmp_path):
    """A renamed openai .pt needs --resolution/--parameterization/--num_head_channels (a state dict cannot tell);
    the evaluator takes them like fid.py net and records the same FID."""
    s = setup
    pt = tmp_path / 'my_consistency_model.pt'
    pt.write_bytes((FIXTURES_DIR / 'openai_cm' / 'tiny_lsun_like.pt').read_bytes())
    ref = str(tmp_path / 'ref.npz')
    feats = np.random.default_rng(2).standard_normal([40, 6])
    np.savez(ref, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    common = [f'--ref={ref}', f'--detector={s["det"]}', '--allow-unsafe-pickle', '--batch=6']
    flags = ['--resolution=16', '--parameterization=consistency', '--num_head_channels=8']
    refused = CliRunner().invoke(evaluate.cli, [f'--resume={pt}', '--metrics=fid50k_full', '--num-images=12', *common])
    assert refused.exit_code == 2 and 'pass --resolution' in refused.output
    result = CliRunner().invoke(evaluate.cli, [f'--resume={pt}', '--metrics=fid50k_full', '--num-images=12', *common,
                                               *flags], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / 'metric-fid50k_full.jsonl').read_text())['results']['fid50k_full']
    lines = invoke(['net', f'--network={pt}', '--num=12', '--steps=1', *common, *flags])
    assert recorded == pytest.approx(float(lines[-1]), rel=1e-5)


def _bad_input_case(case, s, tmp_path):
    """(command, args, expected text) for one user mistake."""
    ref = str(tmp_path / 'ref.npz')
    np.savez(ref, mu=np.zeros(6), sigma=np.eye(6))
    calc = ['calc', f'--images={s["data_a"]}', f'--detector={s["det"]}', '--allow-unsafe-pickle']
    if case == 'missing_ref':
        return fid.cli, [*calc, f'--ref={tmp_path / "nope.npz"}', '--num=24'], 'nope.npz'
    if case == 'too_few':
        return fid.cli, [*calc, f'--ref={ref}', '--num=100'], '--num=100'
    if case == 'not_torchscript':
        torch.save({'w': torch.ones(1)}, tmp_path / 'weights.pt')
        return fid.cli, [*calc, f'--ref={ref}', '--num=24', f'--detector={tmp_path / "weights.pt"}'], 'not an NVIDIA InceptionV3 detector'
    if case == 'bad_ref_keys':
        np.savez(ref, mean=np.zeros(6))
        return fid.cli, [*calc, f'--ref={ref}', '--num=24'], 'missing mu, sigma'
    if case == 'ref_width':
        np.savez(ref, mu=np.zeros(3), sigma=np.eye(3))
        return fid.cli, [*calc, f'--ref={ref}', '--num=24'], 'statistics have 3 features but the detector gives 6'
    return evaluate.cli, [f'--resume={tmp_path}', '--metrics=fid10k'], 'unknown metric'


@pytest.mark.parametrize('case', ['missing_ref', 'too_few', 'not_torchscript', 'bad_ref_keys', 'ref_width', 'bad_metric'])
def test_bad_input_exits_2_with_one_line(setup, tmp_path, case):
    command, args, expect = _bad_input_case(case, setup, tmp_path)
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 2, result.output
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and expect in err[0], result.stderr


def test_bad_input_in_a_real_process(setup, tmp_path):
    proc = run_cli('fid.py', 'calc', f'--images={setup["data_a"]}', f'--ref={tmp_path / "nope.npz"}')
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f'Error: --ref={tmp_path / "nope.npz"}: no such file: {tmp_path / "nope.npz"}']


def test_eval_script_usage_line():
    proc = subprocess.run(['bash', os.path.join(REPO_ROOT, 'eval_ecm.sh')], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith('usage:')
    with open(os.path.join(REPO_ROOT, 'eval_ecm.sh'), 'rb') as f:
        text = f.read()
    assert b'\r\n' not in text and b'set -euo pipefail' in text
