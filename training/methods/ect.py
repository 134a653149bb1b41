"""Easy Consistency Tuning (Geng et al. 2024) as a training method: the ECT loss under its curriculum."""

import fractions
import math

import dnnlib
from torch_utils import distributed as dist
from training.methods.loss import ECTLoss
from training.methods.base import LossMethod


# Discretisation curriculum, ECT paper §3 / docs/ECT.md §4: stage = floor(tick / double_ticks),
# tick = floor(cur_nimg / (tick_kimg·1000)).
def curriculum_stage(cur_nimg, tick_kimg, double_ticks):
    """The curriculum stage for `cur_nimg` images seen; double_ticks None or inf = the stage never grows."""
    if not tick_kimg > 0:
        raise dnnlib.UserError(f'--tick: must be positive, got {tick_kimg}')
    if double_ticks is None or double_ticks == math.inf:
        return 0
    if not double_ticks > 0:
        raise dnnlib.UserError(f'--double: must be positive (or inf for never), got {double_ticks}')
    tick_nimg = fractions.Fraction(tick_kimg).limit_denominator(10**6) * 1000  # exact for e.g. 12.8 kimg
    tick = math.floor(fractions.Fraction(int(cur_nimg)) / tick_nimg)
    return math.floor(tick / fractions.Fraction(double_ticks).limit_denominator(10**6))


class ECT(LossMethod):
    """ECT: training.methods.loss.ECTLoss whose stage follows `curriculum_stage` of the training progress."""

    def __init__(self,
        double_ticks    = None,     # ticks per curriculum stage; None or inf = the stage stays 0
        P_mean          = -1.1,     # mean of ln(t), t ~ lognormal
        P_std           = 2.0,      # standard deviation of ln(t)
        sigma_data      = 0.5,      # standard deviation of the data
        c               = 0.0,      # pseudo-Huber constant: L = sqrt(d + c²) − c
        mapping         = None,     # dict(class_name=..., **kwargs) of r = mapping(t, stage); None = sigmoid
        weighting       = None,     # dict(class_name=..., **kwargs) of w(t, r); None = 1/(t − r)
    ):
        if double_ticks is not None and not double_ticks > 0:
            raise dnnlib.UserError(f'--double: must be positive (or inf for never), got {double_ticks}')
        self.double_ticks = double_ticks
        self.loss_fn = ECTLoss(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data, c=c, mapping=mapping,
                               weighting=weighting)
        self.logged_stage = None    # the stage last announced in the log

    def schedule(self, progress):
        """The curriculum stage of `progress`, announced in the log whenever it changes."""
        stage = curriculum_stage(progress.cur_nimg, progress.tick_kimg, self.double_ticks)
        if stage != self.logged_stage:
            dist.print0(f'Curriculum stage {stage} at {progress.cur_nimg / 1e3:.1f} kimg')
            self.logged_stage = stage
        self.loss_fn.set_stage(stage)
        return dict(stage=stage)

    def state_dict(self):
        return dict(stage=self.loss_fn.stage)

    def load_state_dict(self, state):
        self.loss_fn.set_stage(state['stage'])

    def snapshot_metadata(self):
        return dict(stage=self.loss_fn.stage)
