"""training/compile.py on the sampling path: a compiled tiny ECM network samples what the eager one does (1-step,
2-step consistency and EDM Heun), seed by seed, without recompiling or breaking the graph; --compile of generate.py,
fid.py net and metrics.evaluate.

One inductor compile of a tiny network (8x8, 8 channels) for the whole module: tens of seconds on one CPU core
the first time, seconds once torch's compile cache holds it.
"""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
import generate
from metrics import evaluate
from test_metrics import TinyDetector, save_torchscript
from training import compile as tc, networks
from training.checkpoints import checkpoint
from training.sampling import generation

SEEDS = list(range(8))
BATCH = 4
SAMPLINGS = {
    '1-step': ('consistency', dict(t_steps=(80.0, 0.0))),
    '2-step': ('consistency', dict(t_steps=(80.0, 0.821, 0.0))),
    'heun': ('heun', dict(num_steps=3)),
}


def tiny_ecm_net():
    torch.manual_seed(0)
    return networks.ECMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet',
                               model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[8],
                               dropout=0.0).eval().requires_grad_(False)


@pytest.fixture(scope='module')
def nets():
    """(eager, compiled) sharing weights; the compiled one has run once at BATCH (its one compile)."""
    net = tiny_ecm_net()
    tc.reset_compile_counters()
    compiled = tc.compile_network(net, enabled=True)
    generation.sample_batch(compiled, SEEDS[:BATCH], sampler='consistency', sampler_kwargs=dict(t_steps=(80.0, 0.0)))
    return net, compiled


def float_images(net, sampling, batch_size):
    sampler, kwargs = SAMPLINGS[sampling]
    batches = generation.generate_batches(net, SEEDS, sampler=sampler, sampler_kwargs=kwargs, batch_size=batch_size)
    return [(seeds, images) for seeds, images, _ in batches]


def test_compile_disabled_returns_the_network():
    net = tiny_ecm_net()
    assert tc.compile_network(net, enabled=False) is net and not tc.is_compiled(net)


@pytest.mark.parametrize('sampling', list(SAMPLINGS))
def test_compiled_samples_equal_eager_seed_by_seed(nets, sampling):
    """Compiled at batch 4 against eager at batch 8: the same image for every seed (per-seed generators)."""
    net, compiled = nets
    (_, eager), = float_images(net, sampling, batch_size=8)
    batches = float_images(compiled, sampling, batch_size=BATCH)
    assert [seeds for seeds, _ in batches] == [SEEDS[:BATCH], SEEDS[BATCH:]]
    got = torch.cat([images for _, images in batches])
    assert got.dtype == torch.float64 and got.shape == eager.shape
    assert eager.abs().max() > 0.01  # not a vacuous comparison of zeros
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


def test_no_recompilation_or_graph_break_across_batches(nets):
    """Every sampler at the compiled batch size reuses the one graph: no new frame, no graph break; nor does a
    short last batch (7 seeds at batch 4 split 4 + 3), which is sampled padded to 4 and cut back."""
    net, compiled = nets
    before = tc.compile_counters()
    for sampling in SAMPLINGS:
        float_images(compiled, sampling, batch_size=BATCH)
    odd = list(generation.generate_batches(compiled, SEEDS[:7], sampler='consistency',
                                           sampler_kwargs=dict(t_steps=(80.0, 0.0)), batch_size=BATCH))
    after = tc.compile_counters()
    assert [seeds for seeds, _, _ in odd] == [SEEDS[:4], SEEDS[4:7]] and odd[1][1].shape[0] == 3
    eager = generation.sample_batch(net, SEEDS[:7], sampler='consistency', sampler_kwargs=dict(t_steps=(80.0, 0.0)))
    torch.testing.assert_close(torch.cat([images for _, images, _ in odd]), eager, rtol=0, atol=1e-5)
    assert before['frames'] >= 1 and after['frames'] == before['frames'] and after['graphs'] == before['graphs']
    assert after['graph_breaks'] == 0, after['break_reasons']


def test_generate_cli_compile_writes_the_eager_pngs(nets, tmp_path):
    """generate.py --compile: same files, pixels within one level of the eager run (float rounding at .5)."""
    net, _ = nets
    snapshot = tmp_path / 'net.pt'
    checkpoint.save_network_snapshot(snapshot, net, mid_t=0.821)
    for name, extra in (('eager', []), ('compiled', ['--compile'])):
        with pytest.raises(SystemExit) as e:
            generate.cli.main(args=['--device=cpu', '--no-progress', f'--network={snapshot}', '--seeds=0-7',
                                    f'--batch={BATCH}', f'--outdir={tmp_path / name}', *extra])
        assert e.value.code == 0
    names = sorted(os.listdir(tmp_path / 'eager'))
    assert names == [f'{s:06d}.png' for s in SEEDS] and sorted(os.listdir(tmp_path / 'compiled')) == names
    for name in names:
        eager = np.array(PIL.Image.open(tmp_path / 'eager' / name), dtype=np.int16)
        compiled = np.array(PIL.Image.open(tmp_path / 'compiled' / name), dtype=np.int16)
        assert np.abs(eager - compiled).max() <= 1


def test_fid_net_and_evaluate_compile_score_as_eager(nets, tmp_path):
    """fid.py net --compile prints the eager FID; metrics.evaluate --compile records it."""
    net, _ = nets
    run_dir = tmp_path / 'run'
    snapshot = run_dir / 'network-snapshot-000001.pt'
    run_dir.mkdir()
    checkpoint.save_network_snapshot(snapshot, net, mid_t=0.821, kimg=1)
    features = np.random.default_rng(2).standard_normal([40, 6])
    ref = tmp_path / 'ref.npz'
    np.savez(ref, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    common = [f'--ref={ref}', f'--detector={save_torchscript(tmp_path / "det.pt", TinyDetector())}',
              '--allow-unsafe-pickle', f'--batch={BATCH}', '--device=cpu', '--no-progress']
    values = []
    for extra in ([], ['--compile']):
        result = CliRunner().invoke(fid.cli, ['net', f'--network={snapshot}', '--num=8', '--steps=1', *common, *extra],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        values.append(float(result.output.strip().splitlines()[-1]))
    assert values[1] == pytest.approx(values[0], rel=1e-4)
    result = CliRunner().invoke(evaluate.cli, [f'--resume={run_dir}', '--metrics=fid50k_full', '--num-images=8',
                                               '--compile', *common], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((run_dir / 'metric-fid50k_full.jsonl').read_text())
    assert record['results']['fid50k_full'] == pytest.approx(values[0], rel=1e-4)
