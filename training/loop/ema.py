"""Exponential moving averages of the trained network, as components built by dotted class name.

Every tracker holds deep copies of the network that are permanently in eval mode with requires_grad False
(they are only ever sampled from, evaluated and saved). The training loop calls
`update(cur_nimg, batch_size)` right after each optimiser step, with `cur_nimg` counting the images seen
*including* that step, and `get()` returns `[(suffix, module), ...]`: the suffix is appended to snapshot
names (`network-snapshot-001000-0.050.pt`).
"""

import copy

import numpy as np
import torch

import dnnlib


def _frozen_copy(net):
    return copy.deepcopy(net).eval().requires_grad_(False)


@torch.no_grad()
def _lerp_into(ema, net, beta):
    """ema <- beta * ema + (1 - beta) * net for parameters; buffers are copied from the net.

    One multi-tensor (foreach) lerp and copy per update: the same per-element arithmetic as a lerp_ per parameter.
    """
    ema_params = list(ema.parameters())
    if ema_params:
        torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for e, p in zip(ema_params, net.parameters())],
                             1 - beta)
    _copy_buffers(ema, net)


def _copy_buffers(ema, net):
    """The EMA copy's buffers set to the network's (one multi-tensor copy)."""
    ema_buffers = list(ema.buffers())
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, [b.detach() for b in net.buffers()])


def _check_beta(beta, name):
    if not 0 <= beta < 1:
        raise dnnlib.UserError(f'{name}: EMA beta must be in [0, 1), got {beta}')


class _Tracker:
    """Shared bookkeeping: a list of (suffix, frozen copy) and their state dicts."""

    def __init__(self,
                 net,        # the live network being trained (kept by reference; read on every update)
                 suffixes,   # one snapshot-name suffix per average kept
                 ):
        self.net = net
        self.emas = [(suffix, _frozen_copy(net)) for suffix in suffixes]

    def get(self):
        return list(self.emas)

    def state_dict(self):
        return {suffix: ema.state_dict() for suffix, ema in self.emas}

    def load_state_dict(self, state):
        missing = [suffix for suffix, _ in self.emas if suffix not in state]
        if missing:
            raise dnnlib.UserError(f'EMA state has no entry for suffix(es) {missing}; it was saved by a '
                                   f'different EMA configuration (has {sorted(state)})')
        for suffix, ema in self.emas:
            ema.load_state_dict(state[suffix])
            ema.eval().requires_grad_(False)


# Fixed-decay EMA (Song et al. 2023 / Geng et al. 2024, ECT CIFAR-10 recipe: beta = 0.9999).
class ConstantEMA(_Tracker):
    def __init__(self, net,
                 beta=0.9999,   # decay per optimiser step
                 suffix='',     # appended to snapshot names
                 ):
        _check_beta(beta, 'ConstantEMA')
        super().__init__(net, [suffix])
        self.beta = float(beta)

    def update(self, cur_nimg, batch_size):
        _lerp_into(self.emas[0][1], self.net, self.beta)


@torch.no_grad()
def _lerp_into_float64(ema, net, weight):
    """ema <- ema + weight * (net - ema) for parameters, computed in float64 and stored in the EMA's dtype (as
    py-meanflow does, models/ema.py:17-21); buffers are copied from the net."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e64 = e.double()
        e.copy_(e64 + weight * (p.detach().double() - e64))
    _copy_buffers(ema, net)


# Periodic fixed-decay EMA (py-meanflow, models/ema.py:13-21, meanflow.py:25-34): after every `period`-th optimiser
# step, ema <- ema + (1 - beta^period)(net - ema) in float64; the same decay per step as ConstantEMA on average.
class PeriodicEMA(ConstantEMA):
    def __init__(self, net,
                 beta=0.9999,   # decay per optimiser step (applied as beta**period every period steps)
                 period=16,     # optimiser steps between updates (py-meanflow: 16)
                 suffix='',     # appended to snapshot names
                 ):
        super().__init__(net, beta, suffix)
        if not (isinstance(period, int) and period >= 1):
            raise dnnlib.UserError(f'PeriodicEMA: period must be a positive integer, got {period}')
        self.period = period

    def update(self, cur_nimg, batch_size):
        if (cur_nimg // batch_size) % self.period == 0:   # the optimiser steps taken, this one included
            _lerp_into_float64(self.emas[0][1], self.net, 1 - self.beta ** self.period)


def halflife_beta(cur_nimg, batch_size, halflife_kimg, rampup_ratio):
    """EDM (Karras et al. 2022, Appendix F.1): beta = 0.5^(batch / max(min(halflife, cur_nimg * rampup), 1e-8))."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


# Half-life EMA with ramp-up (Karras et al. 2022, EDM, Appendix F.1).
class HalfLifeEMA(_Tracker):
    def __init__(self, net,
                 halflife_kimg=500,   # half-life of the average, in thousands of images
                 rampup_ratio=0.05,   # half-life at most this fraction of the images seen; None disables
                 suffix='',           # appended to snapshot names
                 ):
        super().__init__(net, [suffix])
        self.halflife_kimg = float(halflife_kimg)
        self.rampup_ratio = rampup_ratio

    def update(self, cur_nimg, batch_size):
        # EDM evaluates the half-life at the images seen *before* the step.
        beta = halflife_beta(cur_nimg - batch_size, batch_size, self.halflife_kimg, self.rampup_ratio)
        _lerp_into(self.emas[0][1], self.net, beta)


MAX_STD = 0.3002831   # the largest sigma_rel any exponent gamma > -1 reaches (at gamma ~ -0.382)


def exp_to_std(gamma):
    """Karras et al. 2024 (EDM2), Eq. 3 / docs/ECT.md §6: sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3)))."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_exp(std):
    """EDM2 Eq. 3 inverted: the real root gamma of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0."""
    std = np.asarray(std, dtype=np.float64)
    if np.any(~(std > 0)) or np.any(std >= MAX_STD):
        raise dnnlib.UserError(f'PowerFunctionEMA: every sigma_rel must be in (0, {MAX_STD:.4f}), got {std.tolist()}')
    gammas = []
    for a in std.ravel() ** -2:
        roots = np.roots([1.0, 7.0, 16.0 - a, 12.0 - a])
        gammas.append(roots[np.abs(roots.imag) <= 1e-7 * np.abs(roots).max()].real.max())
    return np.array(gammas).reshape(std.shape)


def power_function_beta(gamma, t):
    """EDM2 Section 3.1: beta_t = (1 - 1/t)^(gamma + 1), with t = optimiser steps taken (cur_nimg / batch_size)."""
    return (1 - 1 / t) ** (gamma + 1)


# Power-function EMA, one average per relative width sigma_rel (Karras et al. 2024, EDM2, Section 3.1).
class PowerFunctionEMA(_Tracker):
    def __init__(self, net,
                 stds=(0.010, 0.050, 0.100),   # relative standard deviations sigma_rel of the averages
                 ):
        self.stds = [float(s) for s in stds]
        self.gammas = [float(g) for g in std_to_exp(self.stds)]
        super().__init__(net, [f'-{s:.3f}' for s in self.stds])

    def update(self, cur_nimg, batch_size):
        t = cur_nimg / batch_size
        for (_, ema), gamma in zip(self.emas, self.gammas):
            _lerp_into(ema, self.net, power_function_beta(gamma, t))


# Several EMA trackers side by side (ECT ImageNet-64 recipe: power-function sigma_rel 0.010/0.050/0.100 plus beta 0.9999).
class CombinedEMA:
    def __init__(self, net,
                 trackers=(),   # list of {class_name, **kwargs} of other EMA trackers
                 ):
        if not trackers:
            raise dnnlib.UserError('CombinedEMA: trackers must list at least one EMA configuration')
        self.trackers = [dnnlib.util.construct_class_by_name(net, **dict(cfg)) for cfg in trackers]
        suffixes = [suffix for suffix, _ in self.get()]
        if len(set(suffixes)) != len(suffixes):
            raise dnnlib.UserError(f'CombinedEMA: trackers produce duplicate snapshot suffixes {suffixes}; '
                                   f'give them distinct suffix= values')

    def update(self, cur_nimg, batch_size):
        for tracker in self.trackers:
            tracker.update(cur_nimg, batch_size)

    def get(self):
        return [item for tracker in self.trackers for item in tracker.get()]

    def state_dict(self):
        return {str(i): tracker.state_dict() for i, tracker in enumerate(self.trackers)}

    def load_state_dict(self, state):
        if len(state) != len(self.trackers):
            raise dnnlib.UserError(f'EMA state holds {len(state)} trackers, this configuration {len(self.trackers)}')
        for i, tracker in enumerate(self.trackers):
            tracker.load_state_dict(state[str(i)])
