"""EMA trackers against closed forms written independently here (float64, scalar parameters)."""

import math

import numpy as np
import pytest
import torch

import dnnlib
from training.loop import ema as ema_lib


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros([], dtype=torch.float64))
        self.register_buffer('step', torch.zeros([], dtype=torch.float64))


def feed(tracker, net, trajectory, batch_size):
    """Set the parameter to trajectory[i] at step i+1 and update, as the training loop does."""
    for i, value in enumerate(trajectory):
        with torch.no_grad():
            net.w.fill_(value)
            net.step.fill_(i + 1)
        tracker.update(cur_nimg=(i + 1) * batch_size, batch_size=batch_size)


def test_sigma_rel_gamma_round_trip():
    for std in [0.005, 0.010, 0.050, 0.100, 0.200]:
        gamma = float(ema_lib.std_to_exp(std))
        assert gamma > -0.382
        assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(std, rel=1e-9)
    # EDM2 paper, Section 3.1: sigma_rel = 0.10 corresponds to gamma ~ 6.94 (and 0.05 to ~ 16.97).
    assert float(ema_lib.std_to_exp(0.10)) == pytest.approx(6.94, abs=0.01)
    with pytest.raises(dnnlib.UserError):
        ema_lib.std_to_exp(0.31)


def test_power_function_ema_matches_closed_form():
    net = Scalar()
    tracker = ema_lib.PowerFunctionEMA(net, stds=[0.050, 0.100])
    rng = np.random.default_rng(0)
    steps = 400
    trajectory = rng.normal(size=steps) + np.linspace(0, 3, steps)
    feed(tracker, net, trajectory, batch_size=32)
    t = np.arange(1, steps + 1, dtype=np.float64)
    for (suffix, ema), std in zip(tracker.get(), [0.050, 0.100]):
        assert suffix == f'-{std:.3f}'
        # gamma solved independently by bisection on sigma_rel(gamma) for gamma above the maximum (-0.382).
        lo, hi = -0.38, 1e4
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if math.sqrt((mid + 1) / ((mid + 2) ** 2 * (mid + 3))) > std else (lo, mid)
        gamma = lo
        # Exact discrete weights of beta_t = (1 - 1/t)^(gamma+1): w_t = (t^(g+1) - (t-1)^(g+1)) / T^(g+1),
        # i.e. the continuous weighting t^gamma integrated over each step.
        w = (t ** (gamma + 1) - (t - 1) ** (gamma + 1)) / steps ** (gamma + 1)
        assert float(ema.w) == pytest.approx(float((w * trajectory).sum()), rel=1e-9, abs=1e-12)
        # And the profile is the power function t^gamma (up to discretisation).
        w_cont = t ** gamma / (t ** gamma).sum()
        assert float(ema.w) == pytest.approx(float((w_cont * trajectory).sum()), abs=2e-2)
        assert float(ema.step) == steps   # buffers follow the network
        assert not ema.training and not any(p.requires_grad for p in ema.parameters())


def test_constant_ema_formula():
    net = Scalar()
    tracker = ema_lib.ConstantEMA(net, beta=0.9)
    trajectory = [1.0, 2.0, 3.0]
    feed(tracker, net, trajectory, batch_size=4)
    expected = 0.0
    for value in trajectory:
        expected = 0.9 * expected + 0.1 * value
    assert float(tracker.get()[0][1].w) == pytest.approx(expected, rel=1e-12)
    assert tracker.get()[0][0] == ''


def test_periodic_ema_is_py_meanflows_update():
    """py-meanflow's EMA (models/ema.py:13-21): nothing between updates; after optimiser step k with k % 16 == 0,
    ema = float32(ema + (1 − β¹⁶)(p − ema)) computed in float64. Written out in numpy on a float32 network."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    tracker = ema_lib.PeriodicEMA(net, beta=0.99, period=16)
    expected = [p.detach().numpy().astype(np.float32) for p in net.parameters()]
    weight = 1 - 0.99 ** 16
    for step in range(1, 41):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape) * 0.1)
        tracker.update(cur_nimg=step * 8, batch_size=8)
        if step % 16 == 0:
            expected = [(e.astype(np.float64) + weight * (p.detach().numpy().astype(np.float64) -
                                                          e.astype(np.float64))).astype(np.float32)
                        for e, p in zip(expected, net.parameters())]
        ema = tracker.get()[0][1]
        assert all(np.array_equal(e, q.numpy()) for e, q in zip(expected, ema.parameters())), step
    assert step // 16 == 2 and not np.array_equal(expected[0], net.weight.detach().numpy())
    with pytest.raises(dnnlib.UserError, match='period'):
        ema_lib.PeriodicEMA(net, period=0)


def test_halflife_ema_formula():
    net = Scalar()
    tracker = ema_lib.HalfLifeEMA(net, halflife_kimg=0.1, rampup_ratio=0.05)
    batch = 10
    trajectory = np.linspace(1, 5, 300)
    feed(tracker, net, trajectory, batch_size=batch)
    expected = 0.0
    for i, value in enumerate(trajectory):
        seen_before = i * batch   # EDM evaluates the ramp-up at the images seen before the step
        halflife = max(min(100.0, seen_before * 0.05), 1e-8)
        beta = 0.5 ** (batch / halflife)
        expected = beta * expected + (1 - beta) * value
    assert float(tracker.get()[0][1].w) == pytest.approx(expected, rel=1e-12)


def test_state_round_trip_and_combined():
    net = Scalar()
    cfg = [dict(class_name='training.loop.ema.PowerFunctionEMA', stds=[0.010, 0.050, 0.100]),
           dict(class_name='training.loop.ema.ConstantEMA', beta=0.9999, suffix='-b0.9999')]
    tracker = ema_lib.CombinedEMA(net, trackers=cfg)
    feed(tracker, net, np.arange(1.0, 21.0), batch_size=8)
    assert [s for s, _ in tracker.get()] == ['-0.010', '-0.050', '-0.100', '-b0.9999']
    values = [float(m.w) for _, m in tracker.get()]
    assert len(set(values)) == 4
    fresh = ema_lib.CombinedEMA(Scalar(), trackers=cfg)
    fresh.load_state_dict(tracker.state_dict())
    assert [float(m.w) for _, m in fresh.get()] == values
    assert all(not m.training for _, m in fresh.get())
    with pytest.raises(dnnlib.UserError):
        ema_lib.PowerFunctionEMA(Scalar(), stds=[0.2]).load_state_dict(tracker.trackers[0].state_dict())
    with pytest.raises(dnnlib.UserError):
        ema_lib.CombinedEMA(net, trackers=[dict(class_name='training.loop.ema.ConstantEMA')] * 2)


def test_multi_tensor_update_equals_per_parameter_lerp():
    """The foreach EMA update gives bit for bit what a lerp_/copy_ per tensor gives (mixed shapes and dtypes)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 2))
    net[2].double()
    net.register_buffer('counter', torch.zeros(3))
    tracker = ema_lib.ConstantEMA(net, beta=0.75)
    reference = [p.detach().clone() for p in net.parameters()]
    for step in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.counter.fill_(step)
        tracker.update(step + 1, 1)
        for ref, p in zip(reference, net.parameters()):
            ref.lerp_(p.detach(), 1 - 0.75)
    ema = tracker.get()[0][1]
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), reference))
    assert torch.equal(ema.counter, net.counter)
