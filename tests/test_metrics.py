"""Metrics: float64 statistics, Fréchet distance, KID, IS, precision/recall, detectors, records, in-memory scoring.

References are independent float64 computations (eigen-decompositions, explicit kernels, brute-force
neighbours); no network is downloaded: the detectors are small TorchScript modules built here.
"""

import json
import os

import numpy as np
import pytest
import scipy.special
import torch

import dnnlib
from metrics import detectors, evaluate, metric_main, metric_utils
from training.sampling import samplers

# ----------------------------------------------------------------------------------------------------------
# Independent references.


def _psd_sqrt(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def reference_frechet(mu1, sigma1, mu2, sigma2):
    """Tr((Σ1Σ2)^½) = Σ √eig(Σ1^½ Σ2 Σ1^½): symmetric eigen-decompositions only, no sqrtm."""
    s1 = _psd_sqrt(sigma1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s1 @ sigma2 @ s1), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def random_stats(rng, n, d, shift=0.0):
    x = rng.standard_normal([n, d]) @ rng.standard_normal([d, d]) + shift
    return x, x.mean(0), np.cov(x, rowvar=False)


class TinyDetector(torch.nn.Module):
    """Fixed random projection of 4×4-pooled pixels; the official calling convention."""

    def __init__(self, dim=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer('proj', torch.randn([48, dim], generator=g))
        self.register_buffer('logits_proj', torch.randn([48, 5], generator=g))

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255, 4).flatten(1)
        if return_features:
            return pooled @ self.proj
        return torch.softmax(pooled @ self.logits_proj, dim=1)


def save_torchscript(path, module):
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


class TinyConsistencyNet(torch.nn.Module):
    """Stand-in ECM network: a fixed smooth map with the preconditioners' calling convention."""

    def __init__(self, resolution=8):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = resolution, 3, 0
        self.sigma_min, self.sigma_max, self.sigma_data = 0.002, 80.0, 0.5
        self.scale = torch.nn.Parameter(torch.tensor(0.7))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, boundary=True):
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return torch.tanh(self.scale * x / (1 + sigma)) + 0.1 * torch.sin(sigma)

# ----------------------------------------------------------------------------------------------------------
# Statistics and distances.


def test_frechet_matches_eigen_reference():
    rng = np.random.default_rng(0)
    _, mu1, s1 = random_stats(rng, 200, 12)
    _, mu2, s2 = random_stats(rng, 150, 12, shift=0.3)
    got = metric_utils.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(reference_frechet(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
    assert got > 1.0


def test_frechet_identical_stats_is_zero():
    rng = np.random.default_rng(1)
    _, mu, sigma = random_stats(rng, 300, 16)
    assert abs(metric_utils.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_width_mismatch_is_user_error():
    with pytest.raises(dnnlib.UserError, match='same detector'):
        metric_utils.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_match_numpy_and_merge_halves():
    rng = np.random.default_rng(2)
    x = rng.standard_normal([101, 7]) * 3 + 5
    whole = metric_utils.FeatureStats(capture_all=True)
    whole.append(torch.from_numpy(x))  # torch input, float64
    first, second = metric_utils.FeatureStats(capture_all=True), metric_utils.FeatureStats(capture_all=True)
    first.append(x[:40])
    second.append(x[40:])
    merged = first.merge(second)
    for stats in (whole, merged):
        mu, sigma = stats.get_mean_cov()
        assert stats.num_items == 101
        np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(stats.get_all(), x)


def test_feature_stats_are_float64():
    x = np.array([[1e8 + 1.0], [1e8 + 3.0], [1e8 + 5.0]])  # float32 sums would lose the spread entirely
    stats = metric_utils.FeatureStats()
    stats.append(x)
    mu, sigma = stats.get_mean_cov()
    assert mu[0] == pytest.approx(1e8 + 3.0, abs=1e-6)
    assert sigma[0, 0] == pytest.approx(4.0, abs=1e-3)


def reference_kid(real, gen):
    """Unbiased MMD² with k(x, y) = (x·y/d + 1)³, summed element by element over distinct pairs."""
    d = real.shape[1]
    k = lambda a, b: (np.einsum('id,jd->ij', a, b) / d + 1) ** 3
    m = len(real)
    off = ~np.eye(m, dtype=bool)
    return k(gen, gen)[off].mean() + k(real, real)[off].mean() - 2 * k(gen, real).mean()


def test_kid_matches_unbiased_mmd():
    rng = np.random.default_rng(3)
    real = rng.standard_normal([60, 10])
    gen = rng.standard_normal([60, 10]) * 1.3 + 0.2
    # One subset of all 60 samples: KID is then the full-set MMD², whatever the subset order.
    got = metric_utils.kernel_distance(real, gen, num_subsets=1, max_subset_size=1000)
    assert got == pytest.approx(reference_kid(real, gen), rel=1e-9)
    assert got > 0
    same = metric_utils.kernel_distance(real, real, num_subsets=1, max_subset_size=1000)
    assert same == pytest.approx(reference_kid(real, real), rel=1e-9) and same < got


def reference_is(probs, num_splits):
    scores = []
    for part in np.array_split(probs, num_splits):
        marginal = part.mean(0)
        scores.append(np.exp(np.mean([scipy.special.rel_entr(p, marginal).sum() for p in part])))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_reference():
    rng = np.random.default_rng(4)
    probs = scipy.special.softmax(rng.standard_normal([100, 8]) * 2, axis=1)
    mean, std = metric_utils.inception_score(probs, num_splits=10)
    ref_mean, ref_std = reference_is(probs, 10)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8)


def test_inception_score_of_confident_uniform_classes_is_class_count():
    probs = np.full([40, 4], 1e-12)
    probs[np.arange(40), np.arange(40) % 4] = 1.0
    mean, std = metric_utils.inception_score(probs / probs.sum(1, keepdims=True), num_splits=2)
    assert mean == pytest.approx(4.0, rel=1e-6)
    assert std == pytest.approx(0.0, abs=1e-6)


def reference_precision_recall(real, gen, k):
    def radii(points):
        d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    def inside(manifold, r, probes):
        d = np.sqrt(((probes[:, None] - manifold[None]) ** 2).sum(-1))
        return np.mean([(row <= r).any() for row in d])
    return inside(real, radii(real), gen), inside(gen, radii(gen), real)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(5)
    real = rng.standard_normal([70, 5])
    gen = rng.standard_normal([50, 5]) * 0.5 + 1.5
    precision, recall = metric_utils.precision_recall(real, gen, nhood_size=3, row_batch_size=16, dtype=torch.float64)
    ref_p, ref_r = reference_precision_recall(real, gen, 3)
    assert precision == pytest.approx(ref_p)
    assert recall == pytest.approx(ref_r)
    assert 0 < precision < 1 and 0 < recall < 1

# ----------------------------------------------------------------------------------------------------------
# Detectors.


def test_trusted_torchscript_detector_follows_convention(tmp_path):
    path = save_torchscript(tmp_path / 'det.pt', TinyDetector())
    with pytest.warns(UserWarning, match='runs code stored in the file'):
        det = detectors.get_detector('inception', path, allow_unsafe_pickle=True)
    images = torch.randint(0, 256, [3, 3, 8, 8], dtype=torch.uint8)
    expected = TinyDetector()(images, return_features=True)
    torch.testing.assert_close(det(images), expected)
    with pytest.warns(UserWarning):
        probs = detectors.get_detector('inception_probs', path, allow_unsafe_pickle=True)(images)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    grey = images[:, :1]
    torch.testing.assert_close(det(grey), TinyDetector()(grey.repeat(1, 3, 1, 1), return_features=True))


def test_state_dict_with_other_names_is_rejected(tmp_path):
    path = tmp_path / 'state.pt'
    torch.save({'w': torch.ones(2)}, path)
    with pytest.raises(dnnlib.UserError, match='not an NVIDIA InceptionV3 detector.*layers.conv.weight'):
        detectors.get_detector('inception', str(path))


def _tiny_dinov2_state(dim=64, depth=2, patch=14, grid=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = detectors.DinoViT(embed_dim=dim, depth=depth, num_heads=dim // 64, patch_size=patch, pretrain_size=grid * patch)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.state_dict().items()}
    state['mask_token'] = torch.zeros(1, dim)  # present in the official file, unused at inference
    return state


def test_dinov2_attention_matches_torch_multihead():
    attn = detectors._Attention(16, 4)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)


def test_dinov2_loads_official_names_and_gives_cls_features(tmp_path):
    state = _tiny_dinov2_state()
    torch.save(state, tmp_path / 'dinov2.pth')
    model = detectors.load_dinov2_model(str(tmp_path / 'dinov2.pth'))
    assert len(model.blocks) == 2 and model.pos_embed.shape == (1, 10, 64)
    # Same grid as pretraining: position embeddings are used as stored.
    assert model.interpolate_pos_embed(3, 3) is model.pos_embed
    # 224 input = 16×16 patches: bicubic resize of the 3×3 grid (DINOv2's scale factor (16 + 0.1) / 3).
    resized = model.interpolate_pos_embed(16, 16)
    grid = model.pos_embed[:, 1:].reshape(1, 3, 3, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, scale_factor=(16.1 / 3, 16.1 / 3), mode='bicubic')
    torch.testing.assert_close(resized[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 64))
    det = detectors.get_detector('dinov2', str(tmp_path / 'dinov2.pth'))
    features = det(torch.randint(0, 256, [2, 3, 32, 32], dtype=torch.uint8))
    assert features.shape == (2, 64) and torch.isfinite(features).all()

    bad = {k: v for k, v in state.items() if not k.startswith('blocks.1.mlp')}
    torch.save(bad, tmp_path / 'bad.pth')
    with pytest.raises(dnnlib.UserError, match='does not match'):
        detectors.load_dinov2_model(str(tmp_path / 'bad.pth'))

# ----------------------------------------------------------------------------------------------------------
# In-memory scoring of a network, and records.


def _independent_generated_features(net, num, t_steps, det):
    feats = []
    for seed in range(num):
        rnd = samplers.StackedRandomGenerator('cpu', [seed])
        latents = rnd.randn([1, 3, net.img_resolution, net.img_resolution])
        with torch.no_grad():
            x = samplers.consistency_sampler(net, latents, None, t_steps=t_steps, randn_like=rnd.randn_like)
        feats.append(det(samplers.to_uint8(x).permute(0, 3, 1, 2)).numpy())
    return np.concatenate(feats).astype(np.float64)


@pytest.fixture
def tiny_setup(tmp_path):
    det_path = save_torchscript(tmp_path / 'det.pt', TinyDetector())  # trusted TorchScript: needs the opt-in
    rng = np.random.default_rng(6)
    ref_x, mu, sigma = random_stats(rng, 50, 6)
    ref_path = tmp_path / 'ref.npz'
    np.savez(ref_path, mu=mu, sigma=sigma, features=ref_x)
    return dnnlib.EasyDict(net=TinyConsistencyNet().eval(), det=detectors.get_detector('inception', det_path, allow_unsafe_pickle=True),
                           det_path=det_path, ref=str(ref_path), mu=mu, sigma=sigma, ref_x=ref_x)


def test_calc_metric_fid_one_and_two_step(tiny_setup):
    s = tiny_setup
    for metric, t_steps in [('fid50k_full', (80.0, 0.0)), ('two_step_fid50k_full', (80.0, 0.821, 0.0))]:
        result = metric_main.calc_metric(metric, s.net, ref=s.ref, detector=s.det, num_samples=24, batch_size=7)
        feats = _independent_generated_features(s.net, 24, t_steps, s.det)
        expected = reference_frechet(feats.mean(0), np.cov(feats, rowvar=False), s.mu, s.sigma)
        assert result.results[metric] == pytest.approx(expected, rel=1e-6)
        assert result.nfe == len(t_steps) - 1 and result.sampler == 'consistency' and result.num_samples == 24


def test_calc_metric_kid_and_is(tiny_setup):
    s = tiny_setup
    result = metric_main.calc_metric('kid50k_full', s.net, ref=s.ref, detector=s.det, num_samples=30)
    feats = _independent_generated_features(s.net, 30, (80.0, 0.0), s.det)
    assert result.results.kid50k_full == pytest.approx(
        metric_utils.kernel_distance(s.ref_x, feats, num_subsets=100, max_subset_size=1000), rel=1e-6)
    probs_det = detectors.get_detector('inception_probs', s.det_path, allow_unsafe_pickle=True)
    result = metric_main.calc_metric('is50k', s.net, detector=probs_det, num_samples=30)
    probs = _independent_generated_features(s.net, 30, (80.0, 0.0), probs_det)
    assert result.results.is50k_mean == pytest.approx(reference_is(probs, 10)[0], rel=1e-6)


def test_generated_features_shard_over_ranks(tiny_setup):
    s = tiny_setup
    sampling = metric_main.sampling_for('fid50k_full', s.net)
    whole = metric_main._generated_stats(s.net, s.det, 11, True, sampling, 4, 'cpu', 0, 1)
    shards = [metric_main._generated_stats(s.net, s.det, 11, True, sampling, 4, 'cpu', r, 2) for r in range(2)]
    assert sorted(shard.num_items for shard in shards) == [5, 6]  # EDM's split: batches of 3,3,3,2 dealt out
    merged = shards[0].merge(shards[1])
    assert merged.num_items == 11
    np.testing.assert_allclose(np.sort(merged.get_all(), axis=0), np.sort(whole.get_all(), axis=0), rtol=1e-5, atol=1e-6)


def test_calc_metric_rejects_bad_input_before_work(tiny_setup):
    s = tiny_setup
    with pytest.raises(dnnlib.UserError, match='unknown metric'):
        metric_main.calc_metric('fid10k', s.net, ref=s.ref, detector=s.det)
    with pytest.raises(dnnlib.UserError, match='--ref'):
        metric_main.calc_metric('fid50k_full', s.net, ref=None, detector=s.det)
    np.savez(s.ref + '.bad.npz', mu=np.zeros(3))
    with pytest.raises(dnnlib.UserError, match='missing sigma'):
        metric_main.calc_metric('fid50k_full', s.net, ref=s.ref + '.bad.npz', detector=s.det)


def test_records_are_appended_and_parseable(tiny_setup, tmp_path):
    s = tiny_setup
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    result = metric_main.calc_metric('fid50k_full', s.net, str(run_dir), 'network-snapshot-000001.pt', ref=s.ref,
                                     detector=s.det, num_samples=12)
    metric_main.report_metric(result, str(run_dir), 'network-snapshot-000002.pt')
    lines = (run_dir / 'metric-fid50k_full.jsonl').read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [r['snapshot_pkl'] for r in records] == ['network-snapshot-000001.pt', 'network-snapshot-000002.pt']
    for r in records:
        assert r['metric'] == 'fid50k_full' and r['nfe'] == 1 and r['sampler'] == 'consistency'
        assert r['results']['fid50k_full'] == pytest.approx(result.results.fid50k_full)
        assert {'total_time', 'num_gpus', 'timestamp'} <= set(r)
    assert metric_main.is_recorded(str(run_dir), 'fid50k_full', 'network-snapshot-000002.pt')
    assert not metric_main.is_recorded(str(run_dir), 'fid50k_full', 'network-snapshot-000003.pt')
    assert not metric_main.is_recorded(str(run_dir), 'two_step_fid50k_full', 'network-snapshot-000001.pt')


def test_evaluation_skips_recorded_snapshots(tmp_path):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    for kimg in (100, 200, 300):
        (run_dir / f'network-snapshot-{kimg:06d}.pt').write_bytes(b'')
    (run_dir / 'training-state-000300.pt').write_bytes(b'')
    record = dict(results={'fid50k_full': 3.0}, metric='fid50k_full', snapshot_pkl='network-snapshot-000100.pt')
    (run_dir / 'metric-fid50k_full.jsonl').write_text(json.dumps(record) + '\n')
    found_dir, snapshots = evaluate.find_snapshots(str(run_dir))
    assert [os.path.basename(p) for p in snapshots] == [f'network-snapshot-{k:06d}.pt' for k in (100, 200, 300)]
    work = evaluate.pending_work(found_dir, snapshots, ['fid50k_full', 'two_step_fid50k_full'])
    todo = {os.path.basename(p): metrics for p, metrics in work}
    assert todo['network-snapshot-000100.pt'] == ['two_step_fid50k_full']
    assert todo['network-snapshot-000200.pt'] == ['fid50k_full', 'two_step_fid50k_full']
    table = evaluate.results_table(found_dir, snapshots, ['fid50k_full'])
    assert table[0].split() == ['snapshot', 'metric', 'value']
    assert table[1].split() == ['network-snapshot-000100.pt', 'fid50k_full', 'fid50k_full=3.0000']


def test_dinov2_unreachable_is_skipped_with_message(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise dnnlib.UserError('cannot download https://example.invalid: offline')
    monkeypatch.setattr(detectors, 'load_dinov2_model', offline)
    det_path = save_torchscript(tmp_path / 'det.pt', TinyDetector())
    loaded = evaluate.load_detectors(['fd_dinov2', 'fid50k_full'], det_path, None, True, 'cpu')
    assert set(loaded) == {'fid50k_full'}
    assert evaluate.DINOV2_SKIPPED in capsys.readouterr().out
    with pytest.raises(dnnlib.UserError, match='offline'):
        evaluate.load_detectors(['fd_dinov2'], det_path, str(tmp_path / 'given.pth'), True, 'cpu')


def test_generate_core_is_used_with_recipe_mid_t(tiny_setup):
    sampling = metric_main.sampling_for('two_step_fid50k_full', tiny_setup.net, mid_t=1.5)
    assert sampling['sampler_kwargs']['t_steps'] == (80.0, 1.5, 0.0) and sampling['nfe'] == 2
    sampling = metric_main.sampling_for('two_step_fid50k_full', tiny_setup.net, metadata=dict(mid_t=0.5))
    assert sampling['sampler_kwargs']['t_steps'] == (80.0, 0.5, 0.0)
    assert samplers.is_consistency_net(tiny_setup.net)


def _all_reduce_worker(rank, init_file, x, out_dir):
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        stats = metric_utils.FeatureStats(capture_all=True)
        stats.append(x[:30] if rank == 0 else x[30:])  # unequal shards
        stats.all_reduce()
        empty = metric_utils.FeatureStats(capture_all=True)
        if rank == 1:
            empty.append(x)  # rank 0 has no items at all
        empty.all_reduce()
        assert empty.num_items == 47 and empty.get_all().shape == x.shape
        mu, sigma = stats.get_mean_cov()
        np.savez(os.path.join(out_dir, f'rank{rank}.npz'), mu=mu, sigma=sigma, all=stats.get_all(), n=stats.num_items)
    finally:
        torch.distributed.destroy_process_group()


def test_feature_stats_all_reduce_across_two_processes(tmp_path):
    x = np.random.default_rng(7).standard_normal([47, 5])
    torch.multiprocessing.start_processes(_all_reduce_worker, args=(str(tmp_path / 'init'), x, str(tmp_path)), nprocs=2,
                                         start_method='fork')  # fork: no re-import of torch per process
    for rank in range(2):
        got = np.load(tmp_path / f'rank{rank}.npz')
        assert int(got['n']) == 47
        np.testing.assert_allclose(got['mu'], x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(got['sigma'], np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(got['all'], x)  # rank 0's rows, then rank 1's
