"""Loss formulas: Easy Consistency Tuning (ECT) and EDM diffusion pretraining (per-sample losses).

`loss_fn(net, images, labels, net_kwargs)` returns per-sample losses of shape [N]; `net_kwargs` are the extra
keyword arguments of every network call (`tuning_kwargs(net)`, decided once by the training method's setup).
The training loop adds the losses up and divides by the GLOBAL batch size (`reduce_loss`), so a batch split
into any number of accumulation rounds, on any number of ranks, gives the same gradient. The methods in
`training/methods/` own these losses together with their schedules (e.g. ECT's curriculum stage).

Mapping functions (t, stage) -> r and regular weightings (t, r) -> w are components built by dotted class
name like every other component, so a new one needs no edit outside its own class.
"""

import contextlib
import inspect
import math

import numpy as np
import torch

import dnnlib
from training.methods import loss_compiled
from training.networks.randomness import sharing_draws


def reduce_loss(per_sample_loss, global_batch_size):
    """Contribution of one accumulation round to the batch loss: sum over its samples / GLOBAL batch size."""
    return per_sample_loss.sum() / global_batch_size

#----------------------------------------------------------------------------
# Mapping functions r = mapping(t, stage): 0 <= r <= t, t - r shrinking as the stage grows.

def _positive(owner, name, value):
    if not (isinstance(value, (int, float)) and value > 0):
        raise dnnlib.UserError(f'{owner}: {name} must be a positive number, got {value!r}')
    return float(value)


def _check_stage(stage):
    if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or stage < 0:
        raise dnnlib.UserError(f'ECT curriculum stage must be a non-negative integer, got {stage!r}')
    return int(stage)


def _clamp_r(r, t):
    return torch.minimum(r.clamp(min=0), t)


class ConstantMapping:
    """Constant mapping, ECT paper §3 / docs/ECT.md §4: r = t·(1 − q^−(stage+1))."""

    def __init__(self,
        q = 2,  # Base of the geometric decay of (t − r)/t per stage.
    ):
        self.q = _positive('ConstantMapping', 'q', q)

    # docs/ECT.md §4, constant mapping.
    def __call__(self, t, stage):
        decay = self.q ** -(_check_stage(stage) + 1)
        return _clamp_r(t * (1 - decay), t)


class SigmoidMapping:
    """Sigmoid mapping (ECT default), ECT paper §3 / docs/ECT.md §4."""

    def __init__(self,
        q = 2,  # Base of the geometric decay of (t − r)/t per stage.
        k = 8,  # Extra gap at small t: factor 1 + k·sigmoid(−b·t).
        b = 1,  # Sharpness of the sigmoid in t.
    ):
        self.q = _positive('SigmoidMapping', 'q', q)
        self.k = float(k)
        self.b = float(b)

    # docs/ECT.md §4, sigmoid mapping: r = t·(1 − q^−(stage+1)·(1 + k·sigmoid(−b·t))), clamped at 0.
    def __call__(self, t, stage):
        decay = self.q ** -(_check_stage(stage) + 1)
        return _clamp_r(t * (1 - decay * (1 + self.k * torch.sigmoid(-self.b * t))), t)

#----------------------------------------------------------------------------
# Regular weightings w = weighting(t, r).

class InverseGapWeighting:
    """CIFAR-10 recipe, docs/ECT.md §3 step 8: w = 1/(t − r)."""

    # docs/ECT.md §3 step 8 (CIFAR-10).
    def __call__(self, t, r):
        return 1 / (t - r)


class InverseSquareWeighting:
    """ImageNet-64 recipe, docs/ECT.md §3 step 8: w = 1/t² + 1/σd²."""

    def __init__(self,
        sigma_data = 0.5,   # Standard deviation of the data; ECTLoss fills in its own when not given.
    ):
        self.sigma_data = _positive('InverseSquareWeighting', 'sigma_data', sigma_data)

    # docs/ECT.md §3 step 8 (ImageNet-64).
    def __call__(self, t, r):
        return 1 / t.square() + 1 / self.sigma_data ** 2


class NoWeighting:
    """w = 1."""

    def __call__(self, t, r):
        return torch.ones_like(t)

#----------------------------------------------------------------------------
# Shared helpers.

def _build_component(owner, name, spec, defaults):
    """A component from dict(class_name=..., **kwargs) (with `defaults` for kwargs its class accepts)."""
    if not isinstance(spec, dict) and callable(spec):
        return spec  # an already built component
    if not isinstance(spec, dict) or 'class_name' not in spec:
        raise dnnlib.UserError(f'{owner}: {name} must be dict(class_name=..., ...) or a callable, got {spec!r}')
    cls = dnnlib.util.get_obj_by_name(spec['class_name'])
    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in defaults.items() if k in params}
    kwargs.update(spec)
    try:
        return dnnlib.util.construct_class_by_name(**kwargs)
    except TypeError as e:
        raise dnnlib.UserError(f'{owner}: cannot build {name} {spec["class_name"]}: {e}') from None


def _unwrap(net):
    """The module behind DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(net, 'module', getattr(net, '_orig_mod', None))
        if not isinstance(inner, torch.nn.Module):
            return net
        net = inner


def network_augment_dim(net):
    """The augment_dim of a (possibly DDP-wrapped or compiled) preconditioned network: 0 when it takes no labels."""
    layer = getattr(getattr(_unwrap(net), 'model', None), 'map_augment', None)
    return 0 if layer is None else int(layer.in_features)


def tuning_kwargs(net):
    """Keyword arguments for every training-pass call of `net` (a method's setup decides them once).

    Preconditioners whose forward() names a `boundary` argument (ECMPrecond, EDM2 Precond with a σmin)
    get boundary=False, the tuning-pass (EDM) form; the choice never depends on `net.training`.
    """
    return dict(boundary=False) if 'boundary' in inspect.signature(_unwrap(net).forward).parameters else {}


class _NoiseLoss:
    """Per-sample losses of a batch on top of loss_from_noise(net, images, rnd_normal, eps, labels, net_kwargs)."""

    def sample_noise(self, images):
        """The random inputs of one step: standard normals n [N,1,...,1] for the noise level, and eps."""
        rnd_normal = torch.randn([images.shape[0]] + [1] * (images.ndim - 1), device=images.device)
        return rnd_normal, torch.randn_like(images)

    def __call__(self, net, images, labels=None, net_kwargs=None):
        """Per-sample losses [N] with freshly drawn noise (n first, then eps)."""
        rnd_normal, eps = self.sample_noise(images)
        return self.loss_from_noise(net, images, rnd_normal, eps, labels, net_kwargs)


def _check_lognormal(owner, P_mean, P_std, sigma_data):
    if not isinstance(P_mean, (int, float)) or not math.isfinite(P_mean):
        raise dnnlib.UserError(f'{owner}: P_mean must be a finite number, got {P_mean!r}')
    return float(P_mean), _positive(owner, 'P_std', P_std), _positive(owner, 'sigma_data', sigma_data)

#----------------------------------------------------------------------------
# ECT loss.

class ECTLoss(_NoiseLoss):
    """Easy Consistency Tuning loss, ECT paper §3 / docs/ECT.md §3 (per sample)."""

    def __init__(self,
        P_mean      = -1.1,     # Mean of ln(t), t ~ lognormal.
        P_std       = 2.0,      # Standard deviation of ln(t).
        sigma_data  = 0.5,      # Standard deviation of the data (passed to weightings that take it).
        c           = 0.0,      # Pseudo-Huber constant: L = sqrt(d + c²) − c.
        mapping     = None,     # dict(class_name=..., **kwargs) of the mapping; None = SigmoidMapping().
        weighting   = None,     # dict(class_name=..., **kwargs) of the weighting; None = InverseGapWeighting().
    ):
        self.P_mean, self.P_std, self.sigma_data = _check_lognormal('ECTLoss', P_mean, P_std, sigma_data)
        if not (isinstance(c, (int, float)) and c >= 0):
            raise dnnlib.UserError(f'ECTLoss: c must be a non-negative number, got {c!r}')
        self.c = float(c)
        mapping = mapping if mapping is not None else dict(class_name='training.methods.loss.SigmoidMapping')
        weighting = weighting if weighting is not None else dict(class_name='training.methods.loss.InverseGapWeighting')
        self.mapping = _build_component('ECTLoss', 'mapping', mapping, {})
        self.weighting = _build_component('ECTLoss', 'weighting', weighting, dict(sigma_data=self.sigma_data))
        self.stage = 0

    def set_stage(self, stage):
        """Set the curriculum stage (training.methods.ect.ECT.schedule does, before every step)."""
        self.stage = _check_stage(stage)

    def times(self, rnd_normal):
        """(t, r): t = exp(P_mean + P_std·n) and r = mapping(t, stage), 0 <= r <= t (docs/ECT.md §3 steps 1-2)."""
        t = (rnd_normal * self.P_std + self.P_mean).exp()
        return t, _clamp_r(self.mapping(t, self.stage), t)

    def prediction_and_target(self, net, x0, t, r, eps, labels=None, net_kwargs=None, shared_dropout=True):
        """(f_t, f_r) of docs/ECT.md §3 steps 3-5: f_t with gradients, f_r without, same dropout masks.

        The prediction pass records its random draws (dropout masks, label dropout) on a DrawTape
        (training/networks/randomness.py) and the target pass replays them: identical masks without drawing twice,
        and the global RNG streams continue exactly as after the prediction pass alone (as the official code's
        RNG-state restore leaves them). shared_dropout=False lets the target draw fresh masks (ablations, tests).
        Samples with r = 0 take x0 as their target. On an accelerator the target pass runs on the whole batch
        (selecting which samples have r > 0 would stall the host every step); on the CPU, where there is no such
        stall, it runs only on the samples with r > 0 (most of them in the first curriculum stages) and not at all
        when there are none.
        """
        kwargs = net_kwargs or {}
        compiled = loss_compiled.compiled_network(net)
        if compiled is not None:   # torch.compile'd (train.py --compile): the same masks by the compiled graph's RNG
            return loss_compiled.prediction_and_target(net, compiled, x0, t, r, eps, labels, kwargs, shared_dropout)
        with sharing_draws(net) as tape:
            with tape.recording():
                f_t = net(x0 + t * eps, t, labels, **kwargs)
            rows = self.target_rows(r)
            with torch.no_grad(), (tape.replaying(rows) if shared_dropout else contextlib.nullcontext()):
                f_r = self._target(net, x0, r, eps, labels, kwargs, rows)
        return f_t, torch.where(r > 0, f_r.to(f_t.dtype).nan_to_num(), x0.to(f_t.dtype))

    @staticmethod
    def target_rows(r):
        """The samples the target pass evaluates: those with r > 0 on the CPU; None (the whole batch) on an
        accelerator, where selecting them would stall the host every step."""
        return (r.flatten() > 0).nonzero().flatten() if r.device.type == 'cpu' else None

    @staticmethod
    def _target(net, x0, r, eps, labels, kwargs, rows):
        """f(x0 + r·eps, r) for every sample (rows None) or for `rows` only (x0 elsewhere)."""
        if rows is None:
            return net(x0 + r * eps, r, labels, **kwargs)
        f_r = x0.clone()
        if len(rows):
            f_r[rows] = net(x0[rows] + r[rows] * eps[rows], r[rows], None if labels is None else labels[rows], **kwargs).to(x0.dtype)
        return f_r

    # docs/ECT.md §3 steps 6-8: L = w(t, r)·(sqrt(‖f_t − f_r‖² + c²) − c).
    def loss_from_noise(self, net, images, rnd_normal, eps, labels=None, net_kwargs=None):
        """Per-sample ECT losses [N] for given noise."""
        t, r = self.times(rnd_normal)
        f_t, f_r = self.prediction_and_target(net, images, t, r, eps, labels, net_kwargs)
        d = (f_t - f_r).square().flatten(1).sum(dim=1)
        adaptive = (d + self.c ** 2).sqrt() - self.c
        return adaptive * self.weighting(t, r).flatten()

#----------------------------------------------------------------------------
# EDM loss (diffusion pretraining).

class EDMLoss(_NoiseLoss):
    """EDM training loss, Karras et al. 2022 eq. 2 and §5 / docs/ECT.md §3 (the r = 0 special case)."""

    def __init__(self,
        P_mean      = -1.2,     # Mean of ln(σ), σ ~ lognormal.
        P_std       = 1.2,      # Standard deviation of ln(σ).
        sigma_data  = 0.5,      # Standard deviation of the data.
        augment_pipe = None,    # images -> (images, augment labels): training.data.augment.AugmentPipe; None = off.
    ):
        self.P_mean, self.P_std, self.sigma_data = _check_lognormal('EDMLoss', P_mean, P_std, sigma_data)
        self.augment_pipe = augment_pipe

    def __call__(self, net, images, labels=None, net_kwargs=None):
        """Per-sample losses [N] with freshly drawn noise. With an augment pipe, EDM's order (edm training/loss.py):
        n, then the augmentation, then eps; the augmented images are the clean images (input and target) and their
        augment labels go to the network as augment_labels."""
        if self.augment_pipe is None:
            return super().__call__(net, images, labels, net_kwargs)
        rnd_normal = torch.randn([images.shape[0]] + [1] * (images.ndim - 1), device=images.device)
        images, augment_labels = self.augment_pipe(images)
        kwargs = dict(net_kwargs or {}, augment_labels=augment_labels)
        return self.loss_from_noise(net, images, rnd_normal, torch.randn_like(images), labels, kwargs)

    # EDM eq. 2 with λ(σ) = (σ² + σd²)/(σ·σd)², σ = exp(P_mean + P_std·n).
    def loss_from_noise(self, net, images, rnd_normal, eps, labels=None, net_kwargs=None):
        """Per-sample EDM losses [N] for given noise."""
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        denoised = net(images + sigma * eps, sigma, labels, **(net_kwargs or {}))
        return (weight * (denoised - images).square()).flatten(1).sum(dim=1)
