"""Training methods of the original Consistency Models (Song et al., ICML 2023) on the project's training loop:
consistency distillation (CD), consistency training (CT), progressive distillation (the paper's baseline) and
openai's EDM pretraining (`edm_train.py`). The losses are in `training/methods/loss_cm.py`; what differs from the
public code is listed in docs/CONSISTENCY_MODELS.md.

Each method owns its extra networks: a frozen teacher (eval mode) loaded from any EDM-form network file, and a
target network (train mode, so its dropout masks are the student's) that follows the student with its own EMA
μ(k). The schedule (μ(k), N(k)) is a function of the method's own optimiser-step counter, which is saved with
the target (and a progressive-distillation teacher) in the training state, so a resumed run continues exactly.
"""

import copy
import os

import torch

import dnnlib
from training.checkpoints import openai_state
from training.checkpoints import reader
from training.methods import loss_cm
from training.methods.loss import _unwrap
from training.methods.base import Method


def _require_edm_form(path, form):
    if form != 'edm':
        raise dnnlib.UserError(f'--teacher: {path} is a {form}-form network; the teacher must be a diffusion model '
                               f'in EDM form (e.g. edm_imagenet64_ema.pt)')


def load_teacher(path, net, device, num_head_channels=None):
    """The frozen EDM-form teacher from `path` (eval mode, no gradients); UserError when it cannot teach `net`.

    Any network file: our snapshots, EDM/EDM2 pickles, openai state dicts (edm_*.pt; another name is read as
    the EDM form at the trained network's resolution, with `num_head_channels` per attention head, by default
    the trained network's own, else 64)."""
    if not path:
        raise dnnlib.UserError('--teacher: this method needs a teacher network (an EDM-form checkpoint)')
    base = os.path.basename(str(path)).lower()
    _require_edm_form(path, next((form for prefix, form in openai_state.RELEASED_PARAMETERIZATIONS.items()
                                  if base.startswith(prefix)), 'edm'))   # a released cd_/ct_ name: before reading
    if num_head_channels is None:
        num_head_channels = getattr(net, 'init_kwargs', {}).get('channels_per_head', 64)
    teacher, _ = reader.load_network(path, resolution=getattr(net, 'img_resolution', None),
                                                 parameterization='edm', num_head_channels=num_head_channels)
    _require_edm_form(path, getattr(teacher, 'parameterization', 'edm'))
    for key in ('img_resolution', 'img_channels', 'label_dim'):
        if getattr(teacher, key, None) != getattr(net, key, None):
            raise dnnlib.UserError(f'--teacher: {path} has {key}={getattr(teacher, key, None)}, the trained network '
                                   f'{getattr(net, key, None)}')
    return teacher.eval().requires_grad_(False).to(device)


def frozen_copy(net, train):
    """A copy of `net` without gradients, in train mode (a target network) or eval mode (a teacher)."""
    return copy.deepcopy(net).train(train).requires_grad_(False)


# Consistency Models Alg. 2/3, last line (`update_ema`): θ⁻ ← μ θ⁻ + (1 − μ) θ, parameters only. Two foreach ops
# (multi-tensor kernels on a GPU, not two kernels per tensor), each tensor's arithmetic that of mul_(μ).add_(θ, 1 − μ).
@torch.no_grad()
def update_target(target, net, mu):
    pairs = list(zip(target.parameters(), net.parameters()))
    targets = [p_target for p_target, _ in pairs]
    torch._foreach_mul_(targets, mu)
    torch._foreach_add_(targets, [p_net.to(p_target.dtype) for p_target, p_net in pairs], alpha=1 - mu)


class _KarrasMethod(Method):
    """Shared parts: the Karras grid, the distance and weighting, LPIPS, the (μ(k), N(k)) schedule by step."""

    def __init__(self,
        loss_norm       = 'l2',         # l2 | l1 | l2-32 | lpips (the official cm_train.py ignores it: always lpips)
        weighting       = 'uniform',    # snr | snr+1 | karras | truncated-snr | uniform
        target_ema_mode = 'fixed',      # fixed | adaptive (μ(k) = exp(s0 ln μ0 / M(k)))
        start_ema       = 0.95,         # μ0 of the target network
        scale_mode      = 'fixed',      # fixed | progressive (N(k) from start_scales to end_scales + 1) | progdist
        start_scales    = 40,           # N at step 0 (s0 for progressive)
        end_scales      = 40,           # s1 of the progressive schedule
        total_steps     = None,         # K of the progressive schedule; None = the run's length in steps
        distill_steps   = 50000,        # steps per halving of N (progressive distillation)
        sigma_min       = 0.002,        # smallest noise level of the grid
        sigma_max       = 80.0,         # largest noise level of the grid
        rho             = 7.0,          # Karras grid exponent
        sigma_data      = 0.5,          # data standard deviation (karras weighting)
        lpips_variant   = 'piq',        # piq (the official training's) | lpips (v0.1)
        lpips_vgg       = None,         # VGG16 weights file/URL; None = torchvision's
        lpips_lin       = None,         # LPIPS linear weights file/URL; None = the variant's own
    ):
        self.loss_norm = loss_cm.check_choice('--loss-norm', loss_norm, loss_cm.LOSS_NORMS)
        self.weighting = loss_cm.check_choice('--weighting', weighting, loss_cm.WEIGHT_SCHEDULES)
        self.schedule_kwargs = dict(target_ema_mode=target_ema_mode, start_ema=float(start_ema), scale_mode=scale_mode,
                                    start_scales=int(start_scales), end_scales=int(end_scales), total_steps=total_steps,
                                    distill_steps=int(distill_steps))
        loss_cm.ema_and_scales(0, **dict(self.schedule_kwargs, total_steps=1))   # validates the combination
        self.grid = dict(sigma_min=float(sigma_min), sigma_max=float(sigma_max), rho=float(rho),
                         sigma_data=float(sigma_data))
        self.lpips_kwargs = dict(variant=lpips_variant, vgg=lpips_vgg, lin=lpips_lin)
        self.lpips = None
        self.step = 0                   # optimiser steps taken by this method (the official global_step)
        self.target_ema, self.num_scales = None, None

    def setup(self, net, device):
        if self.loss_norm == 'lpips':
            from training.methods.lpips import load_lpips
            self.lpips = load_lpips(**self.lpips_kwargs).to(device)

    def schedule(self, progress):
        kwargs = dict(self.schedule_kwargs)
        if kwargs['total_steps'] is None:
            kwargs['total_steps'] = max(progress.total_steps, 1)
        self.target_ema, self.num_scales = loss_cm.ema_and_scales(self.step, **kwargs)
        return dict(num_scales=self.num_scales, target_ema=self.target_ema)

    def after_step(self, net, progress):
        self.step += 1

    def state_dict(self):
        return dict(step=self.step)

    def load_state_dict(self, state):
        self.step = int(state['step'])

    def snapshot_metadata(self):
        return dict(method=type(self).__name__, step=self.step, num_scales=self.num_scales,
                    target_ema=self.target_ema)

    def draw(self, images, high):
        """The random inputs in the official order: noise randn_like(images), then indices randint(0, high)."""
        noise = torch.randn_like(images)
        indices = torch.randint(0, high, (images.shape[0],), device=images.device)
        return noise, indices


class ConsistencyTraining(_KarrasMethod):
    """Consistency training, Consistency Models Alg. 3 (no teacher): the target's input is one Euler step toward
    the clean image; N(k) and μ(k) follow the progressive/adaptive schedule by default."""

    def __init__(self,
        shared_dropout  = True,         # the target reuses the student's dropout masks (CPU and CUDA)
        **kwargs,                       # _KarrasMethod options
    ):
        kwargs = dict(dict(target_ema_mode='adaptive', scale_mode='progressive', start_scales=2, end_scales=200),
                      **kwargs)
        super().__init__(**kwargs)
        self.shared_dropout = bool(shared_dropout)
        self.solver = 'euler'           # toward the clean image: both levels share one noise
        self.target = None

    def setup(self, net, device):
        super().setup(net, device)
        self.target = frozen_copy(_unwrap(net), train=True).to(device)

    def teacher_for(self, images):
        return None

    def loss(self, net, images, labels=None):
        noise, indices = self.draw(images, self.num_scales - 1)
        return loss_cm.consistency_loss(
            net, self.target, images, noise, indices, self.num_scales, labels, teacher=self.teacher_for(images),
            solver=self.solver, loss_norm=self.loss_norm, weight_schedule=self.weighting,
            lpips=self.lpips, shared_dropout=self.shared_dropout, **self.grid)

    def after_step(self, net, progress):
        update_target(self.target, _unwrap(net), self.target_ema)
        super().after_step(net, progress)

    def state_dict(self):
        return dict(super().state_dict(), target=self.target.state_dict())

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.target.load_state_dict(state['target'])


class ConsistencyDistillation(ConsistencyTraining):
    """Consistency distillation, Consistency Models Alg. 2: one Heun (or Euler) step of a frozen EDM-form teacher
    from level n to n + 1; N = 40 and μ = 0.95 fixed by default."""

    def __init__(self,
        teacher         = None,         # EDM-form network file/URL (openai edm_*.pt, EDM/EDM2 checkpoints)
        solver          = 'heun',       # heun (the official) | euler
        teacher_head_channels = None,   # head width of an openai teacher (not in its state dict); None = the student's
        **kwargs,                       # _KarrasMethod options
    ):
        kwargs = dict(dict(target_ema_mode='fixed', scale_mode='fixed', start_scales=40, end_scales=40), **kwargs)
        super().__init__(**kwargs)
        self.teacher_path, self.teacher_head_channels = teacher, teacher_head_channels
        self.solver = loss_cm.check_choice('--solver', solver, loss_cm.SOLVERS)
        self.teacher = None

    def setup(self, net, device):
        self.teacher = load_teacher(self.teacher_path, _unwrap(net), device, self.teacher_head_channels)
        super().setup(net, device)

    def teacher_for(self, images):
        return self.teacher


class ProgressiveDistillation(_KarrasMethod):
    """Progressive distillation (Salimans & Ho 2022), the Consistency Models baseline: an EDM-form student learns
    two Euler half-steps of its teacher in one; when N halves, the teacher becomes a frozen copy of the student."""

    def __init__(self,
        teacher         = None,         # EDM-form network file/URL of the first stage's teacher
        teacher_head_channels = None,   # head width of an openai teacher (not in its state dict); None = the student's
        **kwargs,                       # _KarrasMethod options
    ):
        kwargs = dict(dict(target_ema_mode='fixed', start_ema=0.0, scale_mode='progdist', start_scales=4096,
                           end_scales=4096), **kwargs)
        super().__init__(**kwargs)
        self.teacher_path, self.teacher_head_channels = teacher, teacher_head_channels
        self.teacher, self.net, self.stage_scales, self.stage = None, None, None, 0

    def setup(self, net, device):
        self.net = _unwrap(net)
        self.teacher = load_teacher(self.teacher_path, self.net, device, self.teacher_head_channels)
        super().setup(net, device)

    def schedule(self, progress):
        scalars = super().schedule(progress)
        if self.stage_scales is not None and self.num_scales != self.stage_scales:
            self.teacher = frozen_copy(self.net, train=False)   # the last stage's student teaches the next
            self.stage += 1
        self.stage_scales = self.num_scales
        return dict(scalars, stage=self.stage)

    def loss(self, net, images, labels=None):
        noise, indices = self.draw(images, self.num_scales)
        return loss_cm.progdist_loss(net, self.teacher, images, noise, indices, self.num_scales, labels,
                                     loss_norm=self.loss_norm, weight_schedule=self.weighting, lpips=self.lpips,
                                     **self.grid)

    def state_dict(self):
        teacher = self.teacher.state_dict() if self.stage > 0 else None   # stage 0: the teacher file's
        return dict(super().state_dict(), teacher=teacher, stage_scales=self.stage_scales, stage=self.stage)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.stage_scales, self.stage = state['stage_scales'], int(state['stage'])
        if self.stage > 0:
            self.teacher = frozen_copy(self.net, train=False)
            self.teacher.load_state_dict(state['teacher'])


class KarrasEDMPretraining(Method):
    """openai's EDM pretraining (`edm_train.py`, `training_losses`): σ = exp(P_mean + P_std·n), per-sample mean
    over pixels of λ(σ)·(D(x + σz, σ) − x)² with the karras weighting λ = 1/σ² + 1/σd² (Karras et al. 2022 eq. 2)."""

    def __init__(self,
        P_mean      = -1.2,         # mean of ln σ (the lognormal schedule sampler)
        P_std       = 1.2,          # standard deviation of ln σ
        weighting   = 'karras',     # snr | snr+1 | karras | truncated-snr | uniform
        sigma_data  = 0.5,          # data standard deviation
    ):
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)
        self.weighting = loss_cm.check_choice('--weighting', weighting, loss_cm.WEIGHT_SCHEDULES)

    def loss(self, net, images, labels=None):
        sigma = torch.exp(self.P_mean + self.P_std * torch.randn(images.shape[0], device=images.device))
        noise = torch.randn_like(images)
        return loss_cm.denoising_loss(net, images, noise, sigma, labels, self.weighting, self.sigma_data)
