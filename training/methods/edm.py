"""EDM diffusion pretraining (Karras et al. 2022) as a training method: the EDM loss, no schedule, optionally with
EDM's non-leaking augmentation (training/data/augment.py, docs/AUGMENT.md)."""

import dnnlib
from training.methods.loss import EDMLoss, _build_component, _unwrap, network_augment_dim
from training.methods.base import LossMethod


class EDM(LossMethod):
    """Denoising score matching with EDM's noise distribution and weighting (training.methods.loss.EDMLoss)."""

    def __init__(self,
        P_mean          = -1.2,     # mean of ln(σ), σ ~ lognormal
        P_std           = 1.2,      # standard deviation of ln(σ)
        sigma_data      = 0.5,      # standard deviation of the data
        augment_kwargs  = None,     # dict(class_name='training.data.augment.AugmentPipe', p=..., ...); None = off
    ):
        pipe = None if augment_kwargs is None else _build_component('EDM', 'augment_kwargs', augment_kwargs, {})
        self.loss_fn = EDMLoss(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data, augment_pipe=pipe)

    def setup(self, net, device):
        super().setup(net, device)
        self.check_network(net)

    def check_network(self, net):
        """UserError unless the network's augment_dim is the width of the augment labels (0 without augmentation)."""
        pipe, augment_dim = self.loss_fn.augment_pipe, network_augment_dim(net)
        if pipe is None:
            if augment_dim:
                raise dnnlib.UserError(f'EDM: the network has augment_dim={augment_dim} (network_kwargs, --arch-kwargs) '
                                       f'but method_kwargs has no augment_kwargs, so its augmentation input would never '
                                       f'be trained: set augment_kwargs, or augment_dim=0')
            return
        width = getattr(pipe, 'label_dim', None)   # None: a plain callable, whose width is unknown here
        if augment_dim == 0 or augment_dim != (width or augment_dim):
            need = width or 'N'
            raise dnnlib.UserError(f'EDM: method_kwargs.augment_kwargs gives {need} augment labels but the network has '
                                   f'augment_dim={augment_dim}: set augment_dim={need} in the preset\'s network_kwargs '
                                   f'(--arch-kwargs=\'{{"augment_dim": {need}}}\')')
        inner = _unwrap(net)
        if hasattr(pipe, 'check_image_shape') and hasattr(inner, 'img_channels'):
            pipe.check_image_shape(inner.img_channels, inner.img_resolution, inner.img_resolution)
