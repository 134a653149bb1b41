"""Post-hoc EMA reconstruction (training/loop/phema.py) against independent float64 references: numerical
integration of the power-function profiles, and power-function EMAs computed directly by weighted averaging."""

import os

import numpy as np
import pytest
import scipy.integrate
import torch
from click.testing import CliRunner

import dnnlib
from training.checkpoints import checkpoint
from training.loop import phema
from training.loop.ema import exp_to_std, std_to_exp

STORED_STDS = (0.05, 0.10)


def _profile(tau, t, gamma):
    """Power-function averaging weights on [0, t], normalised numerically (independent of phema)."""
    return (gamma + 1) * tau ** gamma / t ** (gamma + 1) * (tau <= t)


def _quad(f, t_end, breakpoints=()):
    return scipy.integrate.quad(f, 0, t_end, points=[b for b in breakpoints if 0 < b < t_end] or None,
                                limit=400, epsabs=0, epsrel=1e-11)[0]


# ----------------------------------------------------------------------------------------------------------
# sigma_rel <-> gamma and the profile inner product.

def test_std_exp_round_trip_and_definition():
    stds = np.array([0.005, 0.01, 0.05, 0.075, 0.1, 0.2, 0.29])
    gammas = std_to_exp(stds)
    np.testing.assert_allclose(exp_to_std(gammas), stds, rtol=1e-12)
    assert np.all(np.diff(gammas) < 0)  # wider profile, smaller exponent
    for std, gamma in zip(stds, gammas):
        # sigma_rel is the standard deviation of the profile at t = 1, by numerical integration.
        moments = [_quad(lambda tau, k=k: tau ** k * _profile(tau, 1.0, gamma), 1.0) for k in range(3)]
        assert moments[0] == pytest.approx(1, rel=1e-9)
        assert np.sqrt(moments[2] - moments[1] ** 2) == pytest.approx(std, rel=1e-7)


def test_power_function_response_matches_definition():
    tau = np.linspace(0, 3, 31)
    gamma = float(std_to_exp(0.05))
    np.testing.assert_allclose(phema.power_function_response(tau, 2.0, 0.05), _profile(tau, 2.0, gamma), rtol=1e-12)
    assert _quad(lambda x: float(phema.power_function_response(x, 2.0, 0.05)), 2.0) == pytest.approx(1, rel=1e-9)


@pytest.mark.parametrize('t_a, std_a, t_b, std_b', [
    (1.0, 0.05, 1.0, 0.05), (1.0, 0.05, 1.0, 0.10), (3.0, 0.10, 7.0, 0.05), (7.0, 0.01, 3.0, 0.10),
    (1e6, 0.05, 2.5e6, 0.10), (2.0, 0.2, 1.5, 0.01)])
def test_profile_inner_product_against_integration(t_a, std_a, t_b, std_b):
    g_a, g_b = std_to_exp(std_a), std_to_exp(std_b)
    t_min = min(t_a, t_b)
    expected = _quad(lambda tau: _profile(tau, t_a, g_a) * _profile(tau, t_b, g_b), t_min)
    got = phema.profile_inner_product(t_a, std_a, t_b, std_b)
    assert got == pytest.approx(expected, rel=1e-8)
    assert phema.profile_inner_product(t_b, std_b, t_a, std_a) == pytest.approx(got, rel=1e-14)


def test_inner_product_no_overflow_at_large_times():
    # In images, times reach 1e9 and gamma ~ 100: a naive t^(gamma+1) overflows float64.
    got = phema.profile_inner_product(1.0e9, 0.01, 2.0e9, 0.01)
    g = float(std_to_exp(0.01))
    expected = (g + 1) ** 2 / (2 * g + 1) * 0.5 ** g / 2.0e9
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-12)


def test_fit_error_against_integration():
    in_t, in_s = np.repeat([2.0, 4.0, 6.0], 2), np.tile(STORED_STDS, 3)
    coefs = phema.solve_posthoc_coefficients(in_t, in_s, 6.0, [0.075, 0.15])
    errors = phema.posthoc_fit_error(in_t, in_s, 6.0, [0.075, 0.15], coefs)
    in_g, out_g = std_to_exp(in_s), std_to_exp([0.075, 0.15])
    for j in range(2):
        residual = lambda tau: (sum(c * _profile(tau, t, g) for c, t, g in zip(coefs[:, j], in_t, in_g))
                                - _profile(tau, 6.0, out_g[j])) ** 2
        norm = _quad(lambda tau: _profile(tau, 6.0, out_g[j]) ** 2, 6.0)
        assert errors[j] == pytest.approx(np.sqrt(_quad(residual, 6.0, (2.0, 4.0)) / norm), rel=1e-5, abs=1e-9)
    assert 0 < errors[0] < errors[1] < 1


def test_stored_profile_is_reproduced_exactly():
    in_t, in_s = np.repeat([1.0, 2.0, 3.0], 2), np.tile(STORED_STDS, 3)
    coefs = phema.solve_posthoc_coefficients(in_t, in_s, 3.0, 0.10)
    assert coefs.shape == (6, 1) and coefs.dtype == np.float64
    expected = np.zeros(6)
    expected[5] = 1
    np.testing.assert_allclose(coefs[:, 0], expected, atol=1e-6)
    assert phema.posthoc_fit_error(in_t, in_s, 3.0, 0.10, coefs)[0] < 1e-6


def test_coefficients_do_not_depend_on_time_unit():
    in_t, in_s = np.repeat([1.0, 2.0, 4.0, 5.0], 2), np.tile(STORED_STDS, 4)
    a = phema.solve_posthoc_coefficients(in_t, in_s, 5.0, [0.03, 0.075])
    b = phema.solve_posthoc_coefficients(in_t * 12800, in_s, 5.0 * 12800, [0.03, 0.075])
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------
# Equal to EDM2's post-hoc EMA (Karras et al. 2024): the reference below is written from the paper's formulas
# (Eq. 126 by the cubic's largest real root, Eq. 151 / Algorithm 3 for the inner products, a direct solve, and
# columns normalised to sum to 1 as EDM2's reconstruct_phema does), independently of training/loop/phema.py.

def _edm2_exponent(std):
    return np.array([np.roots([1.0, 7.0, 16.0 - s ** -2, 12.0 - s ** -2]).real.max() for s in np.ravel(std)])


def _edm2_inner_products(a_t, a_std, b_t, b_std):
    a_g, b_g = _edm2_exponent(a_std)[:, None], _edm2_exponent(b_std)[None, :]
    a_t, b_t = np.asarray(a_t, np.float64)[:, None], np.asarray(b_t, np.float64)[None, :]
    ratio_exp = np.where(a_t < b_t, b_g, -a_g)
    return (a_g + 1) * (b_g + 1) * (a_t / b_t) ** ratio_exp / ((a_g + b_g + 1) * np.maximum(a_t, b_t))


def _edm2_coefficients(in_t, in_std, out_t, out_std):
    out_t, out_std = np.broadcast_arrays(np.float64(out_t), np.float64(out_std))
    x = np.linalg.solve(_edm2_inner_products(in_t, in_std, in_t, in_std),
                        _edm2_inner_products(in_t, in_std, out_t.ravel(), out_std.ravel()))
    return x / x.sum(axis=0)


# EDM2: a snapshot every 8 Mi images, sigma_rel 0.05 and 0.10, times in images as reconstruct_phema's
# kimg_to_nimg gives them; ImageNet-64 recipe (configs/presets.py): a snapshot every 50 ticks of 6.4 kimg,
# sigma_rel 0.010/0.050/0.100, over 12.8 Mimg.
@pytest.mark.parametrize('snapshot_nimg, num_snapshots, stds', [
    (8 << 20, 128, (0.05, 0.10)), (8 << 20, 6, (0.05, 0.10)), (320000, 40, (0.01, 0.05, 0.10)),
    (320000, 3, (0.01, 0.05, 0.10))])
def test_coefficients_equal_edm2(snapshot_nimg, num_snapshots, stds):
    in_t = np.repeat(np.arange(1, num_snapshots + 1) * snapshot_nimg, len(stds))
    in_s = np.tile(stds, num_snapshots)
    out_stds = [0.02, 0.05, 0.075, 0.12, 0.15]
    for out_t in (in_t[-1], in_t[len(in_t) // 2 - 1]):
        usable = in_t <= out_t
        got = phema.solve_posthoc_coefficients(in_t[usable], in_s[usable], out_t, out_stds)
        expected = _edm2_coefficients(in_t[usable], in_s[usable], out_t, out_stds)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)
        np.testing.assert_allclose(got.sum(axis=0), 1, rtol=0, atol=1e-12)


def test_reconstruction_keeps_weight_scale():
    # Few snapshots: the unnormalised least-squares coefficients sum to far from 1 (0.79 here), which would scale
    # every weight of the reconstructed network; a constant trajectory must come back unchanged.
    in_t, in_s = np.repeat([1000.0, 2000.0, 3000.0], 2), np.tile(STORED_STDS, 3)
    coefs = phema.solve_posthoc_coefficients(in_t, in_s, 3000.0, [0.02, 0.15])
    np.testing.assert_allclose(coefs.T @ np.full(6, 2.5), 2.5, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Recovering a known EMA of a simulated trajectory.

def _trajectory(tau):
    """A smooth vector-valued parameter trajectory theta(tau), tau in [0, 1]."""
    tau = np.asarray(tau, dtype=np.float64)[..., None]
    return np.concatenate([np.sin(7 * tau), np.exp(-3 * tau), tau ** 2, np.cos(11 * tau) * tau], axis=-1)


def _continuous_ema(t, std):
    """int_0^t p(tau) theta(tau) dtau by direct numerical integration."""
    gamma = float(std_to_exp(std))
    return np.array([_quad(lambda tau: _profile(tau, t, gamma) * _trajectory(tau)[k], t) for k in range(4)])


def test_reconstruction_recovers_known_continuous_ema():
    times = np.linspace(0.05, 1.0, 20)
    snaps = [(t, s, _continuous_ema(t, s)) for t in times for s in STORED_STDS]
    coefs = phema.solve_posthoc_coefficients([t for t, _, _ in snaps], [s for _, s, _ in snaps], 1.0, 0.075)
    recovered = sum(c * theta for c, (_, _, theta) in zip(coefs[:, 0], snaps))
    target = _continuous_ema(1.0, 0.075)
    spread = np.abs(_continuous_ema(1.0, 0.05) - _continuous_ema(1.0, 0.10)).max()
    error = np.abs(recovered - target).max()
    assert error < 1e-3 * spread


def _discrete_power_emas(thetas, stds, snapshot_steps):
    """Discrete power-function EMA of per-step parameters thetas[1..T] (EDM2: weights ~ tau^gamma over the
    steps 1..t), returned at the snapshot steps, by direct weighted summation."""
    out = {}
    for std in stds:
        gamma = float(std_to_exp(std))
        for t in snapshot_steps:
            weights = np.arange(1, t + 1, dtype=np.float64) ** gamma
            out[(t, std)] = (weights[:, None] * thetas[:t]).sum(0) / weights.sum()
    return out


def test_reconstruction_recovers_known_discrete_ema():
    num_steps, snapshot_steps = 2000, list(range(100, 2001, 100))
    thetas = _trajectory(np.arange(1, num_steps + 1) / num_steps)
    stored = _discrete_power_emas(thetas, STORED_STDS, snapshot_steps)
    reference = _discrete_power_emas(thetas, [0.075, 0.05, 0.10], [num_steps])
    keys = sorted(stored)
    coefs = phema.solve_posthoc_coefficients([t for t, _ in keys], [s for _, s in keys], num_steps, 0.075)
    recovered = sum(c * stored[key] for c, key in zip(coefs[:, 0], keys))
    spread = np.abs(reference[(num_steps, 0.05)] - reference[(num_steps, 0.10)]).max()
    assert np.abs(recovered - reference[(num_steps, 0.075)]).max() < 1e-3 * spread


# ----------------------------------------------------------------------------------------------------------
# End to end on a tiny EDM2 network.

def _tiny_net(**overrides):
    from training.networks import edm2 as networks_edm2
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_channels=16,
                  channel_mult=[1], num_blocks=1, attn_resolutions=[])
    return networks_edm2.Precond(**{**kwargs, **overrides}).eval()


def _write_run(run_dir, stds=STORED_STDS, kimgs=tuple(range(100, 2001, 100))):
    """Snapshots named as the training loop names them (plus a -latest- and a constant-EMA file) whose
    parameters are base + scale * EMA(theta) of the scalar trajectory theta(tau) = sin(7 tau), tau = kimg / 2000,
    and whose buffers are shifted by kimg."""
    net = _tiny_net()
    torch.manual_seed(0)
    base = {n: torch.randn_like(p, dtype=torch.float64) for n, p in net.named_parameters()}
    scale = {n: torch.randn_like(p, dtype=torch.float64) for n, p in net.named_parameters()}
    thetas = _trajectory(np.arange(1, 2001) / 2000)[:, 0:1]
    emas = _discrete_power_emas(thetas, stds, list(kimgs))
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    os.makedirs(run_dir, exist_ok=True)
    for (kimg, std), value in emas.items():
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(base[n] + scale[n] * float(value[0]))
            for n, b in net.named_buffers():
                b.copy_(buffers[n] + kimg)  # buffers are copied, not averaged: they must come from the latest
        meta = dict(kimg=kimg, ema=f'-{std:.3f}', stage=3, mid_t=[1.526])
        path = os.path.join(run_dir, f'network-snapshot-{kimg:06d}-{std:.3f}.pt')
        checkpoint.save_network_snapshot(path, net, **meta)
    for name, suffix in ((f'network-snapshot-latest-{stds[0]:.3f}.pt', f'-{stds[0]:.3f}'),
                         (f'network-snapshot-{kimgs[-1]:06d}-b0.9999.pt', '-b0.9999')):
        checkpoint.save_network_snapshot(os.path.join(run_dir, name), net, kimg=kimgs[-1], ema=suffix)
    return base, scale, thetas


def test_cli_end_to_end(tmp_path):
    run_dir, out_dir = str(tmp_path / 'run'), str(tmp_path / 'out')
    base, scale, thetas = _write_run(run_dir)
    result = CliRunner().invoke(phema.main, [f'--indir={run_dir}', f'--outdir={out_dir}', '--std=0.075,0.05'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out_dir)) == ['phema-002000-0.050.pt', 'phema-002000-0.075.pt']
    reference = _discrete_power_emas(thetas, [0.075, 0.05, 0.10], [2000])
    spread = abs(float(reference[(2000, 0.05)][0] - reference[(2000, 0.10)][0]))
    sources_nets = {name: checkpoint.load_network_snapshot(os.path.join(run_dir, name))[0]
                    for name in os.listdir(run_dir)}
    sources_params = {name: {n: p.double() for n, p in net.named_parameters()} for name, net in sources_nets.items()}
    for std in (0.075, 0.05):
        net, meta = checkpoint.load_network_snapshot(os.path.join(out_dir, f'phema-002000-{std:.3f}.pt'))
        assert meta['ema_std'] == std and meta['kimg'] == 2000 and meta['nimg'] == 2000000
        assert meta['mid_t'] == [1.526] and meta['stage'] == 3
        sources = meta['phema']['sources']
        assert len(sources) == 40 and all('latest' not in s and 'b0.9999' not in s for s in sources)
        times = [int(s.split('-')[2]) for s in sources]
        stds = [float(s.split('-')[3][:-3]) for s in sources]
        coefs = phema.solve_posthoc_coefficients(times, stds, 2000, std)[:, 0]
        np.testing.assert_allclose(meta['phema']['coefficients'], coefs, rtol=1e-9, atol=1e-12)
        combined = {n: sum(c * sources_params[s][n] for c, s in zip(coefs, sources)) for n in base}
        expected_theta = float(reference[(2000, std)][0])
        for n, p in net.named_parameters():
            assert (p.double() - combined[n]).abs().max() < 1e-5, n
            err = (p.double() - (base[n] + scale[n] * expected_theta)).abs() / (base[n].abs() + scale[n].abs())
            assert err.max() < 1e-3 * spread, n
        latest_buffers = dict(sources_nets['network-snapshot-002000-0.050.pt'].named_buffers())
        earlier_buffers = dict(sources_nets['network-snapshot-001900-0.050.pt'].named_buffers())
        for n, b in net.named_buffers():
            assert torch.equal(b, latest_buffers[n]) and not torch.equal(b, earlier_buffers[n])


def test_reconstruct_at_earlier_time_uses_only_earlier_snapshots(tmp_path):
    run_dir = str(tmp_path / 'run')
    _write_run(run_dir, kimgs=(100, 200, 300, 400, 500, 600))
    paths = phema.reconstruct(run_dir, [0.075], str(tmp_path / 'out'), out_time_kimg=400, log=lambda _: None)
    _, meta = checkpoint.load_network_snapshot(paths[0])
    assert os.path.basename(paths[0]) == 'phema-000400-0.075.pt' and meta['kimg'] == 400
    assert sorted({int(s.split('-')[2]) for s in meta['phema']['sources']}) == [100, 200, 300, 400]


def _cli_error(args):
    result = CliRunner().invoke(phema.main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and 'Traceback' not in result.output
    return lines[0]


def test_cli_bad_input(tmp_path):
    run_dir, out = str(tmp_path / 'run'), f'--outdir={tmp_path / "out"}'
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert 'no power-function EMA snapshots' in _cli_error([f'--indir={empty}', out, '--std=0.05'])
    assert 'no such directory' in _cli_error([f'--indir={tmp_path / "nope"}', out, '--std=0.05'])
    _write_run(run_dir, kimgs=(100, 200, 300))
    for std in ('0', '-0.1', '0.31', '0.5'):
        assert '--std' in _cli_error([f'--indir={run_dir}', out, f'--std={std}'])
    assert '--std' in _cli_error([f'--indir={run_dir}', out, '--std=0.05,abc'])
    # Wider than three snapshot times can reproduce: refused rather than written badly.
    message = _cli_error([f'--indir={run_dir}', out, '--std=0.25'])
    assert '--std' in message and 'cannot reproduce' in message
    assert '--time-kimg' in _cli_error([f'--indir={run_dir}', out, '--std=0.05', '--time-kimg=301'])
    assert '--time-kimg' in _cli_error([f'--indir={run_dir}', out, '--std=0.05', '--time-kimg=0'])
    assert not (tmp_path / 'out').exists()


def test_mismatched_configs_and_corrupt_files(tmp_path):
    run_dir, out = str(tmp_path / 'run'), f'--outdir={tmp_path / "out"}'
    _write_run(run_dir, kimgs=(100, 200))
    other = _tiny_net(model_channels=8)
    checkpoint.save_network_snapshot(os.path.join(run_dir, 'network-snapshot-000300-0.050.pt'), other,
                                     kimg=300, ema='-0.050')
    message = _cli_error([f'--indir={run_dir}', out, '--std=0.05'])
    assert 'network-snapshot-000300-0.050.pt' in message and 'configuration differs' in message
    with open(os.path.join(run_dir, 'network-snapshot-000300-0.050.pt'), 'wb') as f:
        f.write(b'PK\x03\x04 truncated')
    assert 'cannot read network snapshot' in _cli_error([f'--indir={run_dir}', out, '--std=0.05'])
    with pytest.raises(dnnlib.UserError, match='not a power-function EMA snapshot'):
        phema.read_snapshot_infos([os.path.join(run_dir, 'network-snapshot-latest-0.050.pt'),
                                   os.path.join(run_dir, 'network-snapshot-000200-b0.9999.pt')])


# ----------------------------------------------------------------------------------------------------------
# EDM2's own raw snapshots (tests/edm2_files.py builds them as EDM2's training loop writes them).

def test_cli_reads_edm2_snapshot_pickles(tmp_path):
    from edm2_files import write_edm2_snapshot
    run_dir, out_dir = tmp_path / 'run', tmp_path / 'out'
    run_dir.mkdir()
    torch.manual_seed(1)
    net, weights = _tiny_net(), {}
    nimgs = [k * (8 << 20) for k in range(1, 7)]   # EDM2's snapshot cadence, 8 Mi images
    for nimg in nimgs:
        for std in STORED_STDS:
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.randn_like(p))
            path = write_edm2_snapshot(str(run_dir), nimg, std, net)
            weights[path] = {n: p.detach().to(torch.float16).double() for n, p in net.named_parameters()}
    result = CliRunner().invoke(phema.main, [f'--indir={run_dir}', f'--outdir={out_dir}', '--std=0.075'])
    assert result.exit_code == 0, result.output
    out_net, meta = checkpoint.load_network_snapshot(str(out_dir / f'phema-{nimgs[-1] // 1000:06d}-0.075.pt'))
    paths = [str(run_dir / s) for s in meta['phema']['sources']]
    assert sorted(paths) == sorted(weights) and meta['nimg'] == nimgs[-1]
    in_t = [nimg for nimg in nimgs for _std in STORED_STDS]
    in_s = [std for _nimg in nimgs for std in STORED_STDS]
    order = [paths.index(str(run_dir / f'network-snapshot-{t // 1000:07d}-{s:.3f}.pkl')) for t, s in zip(in_t, in_s)]
    coefs = np.asarray(meta['phema']['coefficients'])[order]
    np.testing.assert_allclose(coefs, _edm2_coefficients(in_t, in_s, nimgs[-1], 0.075)[:, 0], rtol=0, atol=1e-8)
    for n, p in out_net.named_parameters():
        expected = sum(c * weights[paths[i]][n] for i, c in enumerate(meta['phema']['coefficients']))
        assert (p.double() - expected).abs().max() < 1e-5, n


def test_edm2_snapshot_of_another_network_is_refused(tmp_path):
    from edm2_files import write_edm2_snapshot
    write_edm2_snapshot(str(tmp_path), 8 << 20, 0.05, _tiny_net())
    other = write_edm2_snapshot(str(tmp_path), 16 << 20, 0.05, _tiny_net(model_channels=8))
    message = _cli_error([f'--indir={tmp_path}', f'--outdir={tmp_path / "out"}', '--std=0.05'])
    assert os.path.basename(other) in message and 'configuration differs' in message
    (tmp_path / os.path.basename(other)).write_bytes(b'not a pickle')
    message = _cli_error([f'--indir={tmp_path}', f'--outdir={tmp_path / "out"}', '--std=0.05'])
    assert os.path.basename(other) in message and 'not a network pickle' in message
    assert not (tmp_path / 'out').exists()


def test_output_errors_are_one_line(tmp_path, monkeypatch):
    import errno
    run_dir = str(tmp_path / 'run')
    _write_run(run_dir, kimgs=(100, 200))
    (tmp_path / 'file').write_text('')
    assert '--outdir' in _cli_error([f'--indir={run_dir}', f'--outdir={tmp_path / "file"}', '--std=0.05'])
    assert 'not a folder' in _cli_error([f'--indir={run_dir}', f'--outdir={tmp_path / "file" / "x"}', '--std=0.05'])

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / 'out' / 'x'))
    monkeypatch.setattr(torch, 'save', disk_full)
    result = CliRunner().invoke(phema.main, [f'--indir={run_dir}', f'--outdir={tmp_path / "out"}', '--std=0.05'])
    assert result.exit_code == 2 and 'Traceback' not in result.output
    lines = result.stderr.strip().splitlines()   # the file being written, named by the snapshot writer
    assert len(lines) == 1 and lines[0].startswith(f'Error: {tmp_path / "out" / "phema-"}')
    assert lines[0].endswith(': No space left on device (not written; a previous file of that name is unchanged)')
    assert not [name for name in os.listdir(tmp_path / 'out') if name.endswith('.tmp')]
