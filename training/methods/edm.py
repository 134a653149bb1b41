"""EDM diffusion pretraining (Karras et al. 2022) as a training method: the EDM loss, no schedule."""

from training.methods.loss import EDMLoss
from training.methods.base import LossMethod


class EDM(LossMethod):
    """Denoising score matching with EDM's noise distribution and weighting (training.methods.loss.EDMLoss)."""

    def __init__(self,
        P_mean      = -1.2,     # mean of ln(σ), σ ~ lognormal
        P_std       = 1.2,      # standard deviation of ln(σ)
        sigma_data  = 0.5,      # standard deviation of the data
    ):
        self.loss_fn = EDMLoss(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
