"""Truncated Consistency Models (Lee et al. 2024), stage 2, as a training method (docs/TCM.md).

Stage 1 is an ordinary consistency model (here: an ECT run). Stage 2 starts the trained network from the stage-1
weights (the preset's `transfer`, NVlabs/TCM's --transfer) and trains it only on t ∈ [t′, T]; the consistency
targets below t′, and the boundary targets at t′, come from a frozen copy of the stage-1 network (NVlabs/TCM's
--tcm_teacher_pkl), which this method loads in `setup` from the file named by `stage1`. The curriculum continues
stage 1's: the stage counts the optimiser steps of both runs (NVlabs/TCM resumes its tick counter at stage 1's tick).
Sampling a TCM snapshot needs only the stage-2 network (docs/TCM.md §6).
"""

import copy
import os
import re

import dnnlib
from torch_utils import distributed as dist
from training.checkpoints import checkpoint
from training.checkpoints import reader
from training.methods import loss_compiled
from training.methods.base import Method
from training.methods.loss import _unwrap, tuning_kwargs
from training.methods.tcm_loss import LogStudentT, TCMLoss, TCMMapping, check_number

_REMOTE = re.compile(r'^[a-z][a-z0-9+.-]*://', re.IGNORECASE)   # URLs and hf:// paths: checked when loaded


def _check_stage1_path(stage1):
    if not isinstance(stage1, (str, os.PathLike)) or not os.fspath(stage1):
        raise dnnlib.UserError('TCM: stage1: stage 2 needs the stage-1 network file (method_kwargs stage1=PATH)')
    if not _REMOTE.match(os.fspath(stage1)) and not os.path.exists(stage1):
        raise dnnlib.UserError(f'TCM: stage1: {os.fspath(stage1)} does not exist')
    return os.fspath(stage1)


def _check_steps(name, value, allow_none):
    if (value is None and allow_none) or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    alternative = ' or None' if allow_none else ''
    raise dnnlib.UserError(f'TCM: {name} must be a non-negative integer{alternative}, got {value!r}')


def _stage1_steps_from(metadata, path):
    """Optimiser steps of the run that wrote the stage-1 snapshot: nimg // batch_size of its metadata."""
    nimg, options = metadata.get('nimg'), metadata.get('training_options') or {}
    if isinstance(nimg, int) and isinstance(options.get('batch_size'), int) and options['batch_size'] > 0:
        return nimg // options['batch_size']
    raise dnnlib.UserError(f'TCM: stage1: {path} records no training progress (nimg, batch_size); give stage1_steps= '
                           f'(the optimiser steps of stage 1: NVlabs/TCM\'s --resume_tick × 100)')


def frozen_stage1(net, stage1, path):
    """A copy of the trained network's module with the stage-1 weights: no gradients, train mode (its dropout draws
    the trained network's masks, as NVlabs/TCM's deepcopy of its train-mode network). Every tensor must match."""
    frozen = copy.deepcopy(net).train().requires_grad_(False)
    try:
        report = checkpoint.transfer_weights(stage1, frozen)
    except dnnlib.UserError as e:
        raise dnnlib.UserError(f'TCM: stage1: {path}: {e}') from None
    missing = report.untouched or report.skipped
    if missing:
        raise dnnlib.UserError(f'TCM: stage1: {path} does not fit the trained network (tensor "{missing[0]}" is in '
                               f'only one of them)')
    return frozen


class TCM(Method):
    """TCM stage 2: TCMLoss under the curriculum that continues stage 1's (docs/TCM.md §4)."""

    def __init__(self,
        stage1          = None,     # stage-1 network file (path, URL or hf://): frozen below t′ (required)
        stage1_steps    = None,     # optimiser steps of stage 1; None = from the file's metadata (nimg // batch_size)
        transition_t    = 1.0,      # t′: the trained network covers [t′, t_max] (--tcm_transition_t)
        t_min           = None,     # smallest t drawn; None = t′ (--t_lower; must be >= t′)
        t_max           = 80.0,     # largest t drawn (--t_upper)
        P_mean          = 0.0,      # location of ln t (--mean)
        P_std           = 0.2,      # scale of ln t (--std)
        df              = 0.01,     # Student-t degrees of freedom of ln t (--tdist=t --df)
        boundary_prob   = 0.25,     # share of each micro-batch at t′ (--boundary_prob)
        w_boundary      = 0.1,      # weight of the boundary loss (--w_boundary)
        q               = 2.0,      # curriculum base: ratio 1 − q^−(stage+1) (-q)
        ratio_limit     = 0.999,    # largest ratio (--ratio_limit)
        double_steps    = 25000,    # optimiser steps per curriculum stage (--double × 100 iterations per tick)
        c               = 1e-8,     # pseudo-Huber constant; 0 = l2 distance (-c)
        sigma_data      = 0.5,      # standard deviation of the data
        weighting       = None,     # dict(class_name=...) of w(t, r); None = 1/(t − r) (--weighting default)
    ):
        self.stage1_path = _check_stage1_path(stage1)
        self.stage1_steps = _check_steps('stage1_steps', stage1_steps, allow_none=True)
        self.double_steps = _check_steps('double_steps', double_steps, allow_none=False)
        if self.double_steps == 0:
            raise dnnlib.UserError('TCM: double_steps must be positive, got 0')
        transition_t = check_number('TCM', 'transition_t', transition_t, low=0)
        t_min = transition_t if t_min is None else check_number('TCM', 't_min', t_min, low=transition_t, low_open=False)
        times = LogStudentT(P_mean=P_mean, P_std=P_std, df=df, t_min=t_min, t_max=t_max)
        weighting = weighting or dict(class_name='training.methods.loss.InverseGapWeighting')
        self.loss_fn = TCMLoss(times, TCMMapping(q=q, ratio_limit=ratio_limit), transition_t,
                               boundary_prob=check_number('TCM', 'boundary_prob', boundary_prob, 0, 1, low_open=False),
                               w_boundary=check_number('TCM', 'w_boundary', w_boundary, low=0, low_open=False),
                               c=check_number('TCM', 'c', c, low=0, low_open=False), weighting=weighting,
                               sigma_data=check_number('TCM', 'sigma_data', sigma_data, low=0))
        self.stage1, self.net_kwargs, self.logged_stage = None, None, None

    def setup(self, net, device):
        """Load the stage-1 network into a frozen copy of the trained one; read stage 1's length when not given."""
        source, metadata = reader.load_network(self.stage1_path)
        for key in ('img_resolution', 'img_channels', 'label_dim'):
            if getattr(source, key, None) != getattr(_unwrap(net), key, None):
                raise dnnlib.UserError(f'TCM: stage1: {self.stage1_path} has {key}={getattr(source, key, None)}, '
                                       f'the trained network {getattr(_unwrap(net), key, None)}')
        self.stage1 = frozen_stage1(_unwrap(net), source, self.stage1_path).to(device)
        if self.stage1_steps is None:
            self.stage1_steps = _stage1_steps_from(metadata, self.stage1_path)
        self.net_kwargs = tuning_kwargs(net)

    def stage_of(self, progress):
        """docs/TCM.md eq. (T5): the curriculum stage after stage 1's and this run's optimiser steps."""
        return (self.stage1_steps + progress.step) // self.double_steps

    def schedule(self, progress):
        stage = self.stage_of(progress)
        if stage != self.logged_stage:
            dist.print0(f'TCM curriculum stage {stage} (ratio {self.loss_fn.mapping.ratio(stage):.6g}) at '
                        f'{progress.cur_nimg / 1e3:.1f} kimg')
            self.logged_stage = stage
        self.loss_fn.stage = stage
        return dict(stage=stage, ratio=self.loss_fn.mapping.ratio(stage))

    def loss(self, net, images, labels=None):
        if self.stage1 is None:
            raise RuntimeError('TCM.loss: call setup(net, device) first')
        if loss_compiled.compiled_network(net) is not None:
            raise dnnlib.UserError('--compile: TCM does not support compiled networks')
        return self.loss_fn(net, self.stage1, images, labels, self.net_kwargs)

    def steps_before(self):
        """NVlabs/TCM's stage 2 continues stage 1's iteration count in its learning rate and power-function EMA
        (ct_training_loop.py:352,427,440-445)."""
        return self.stage1_steps

    def state_dict(self):
        return dict(stage1_steps=self.stage1_steps)

    def load_state_dict(self, state):
        self.stage1_steps = int(state['stage1_steps'])

    def snapshot_metadata(self):
        stage = self.loss_fn.stage
        return dict(method='TCM', stage=stage, ratio=self.loss_fn.mapping.ratio(stage),
                    transition_t=self.loss_fn.transition_t, stage1=self.stage1_path, stage1_steps=self.stage1_steps)
