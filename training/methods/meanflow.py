"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling") as a training method: the
average-velocity loss of training/methods/meanflow_loss.py with py-meanflow's time samplers, adaptive weighting and,
optionally, EDM's augmentation (docs/MEANFLOW.md)."""

import torch

import dnnlib
from torch_utils import distributed as dist
from training.methods import loss_compiled
from training.methods.base import Method
from training.methods.loss import _build_component, network_augment_dim
from training.networks.jvp import require_jvp_support
from training.methods.meanflow_loss import TIME_SAMPLERS, meanflow_loss, sample_times


def _number(name, value, low, high, low_open=False):
    """`value` as a float, a UserError naming the argument unless it is in [low, high] ((low, high] if low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        interval = f'{"(" if low_open else "["}{low}, {high}]'
        raise dnnlib.UserError(f'MeanFlow: {name} must be a number in {interval}, got {value!r}')
    return float(value)


# MeanFlow (Geng et al. 2025), Eqs. 9-10 with the adaptive weighting and time sampling of §4.3, as py-meanflow
# trains CIFAR-10 (docs/MEANFLOW.md §3, §6).
class MeanFlow(Method):
    """MeanFlow training from scratch: per-sample losses of meanflow_loss at times from py-meanflow's samplers."""

    def __init__(self,
        time_sampler    = 'v1',     # py-meanflow --tr_sampler: 'v0' (the paper's) or 'v1' (its improved CIFAR-10 one)
        P_mean_t        = -0.6,     # mean of logit(t) (py-meanflow --P_mean_t)
        P_std_t         = 1.6,      # standard deviation of logit(t) (--P_std_t)
        P_mean_r        = -4.0,     # mean of logit(r) (--P_mean_r)
        P_std_r         = 1.6,      # standard deviation of logit(r) (--P_std_r)
        ratio           = 0.75,     # probability that r is drawn apart from t (--ratio); the others get r = t
        norm_p          = 0.75,     # adaptive-weight power p, w = 1/(‖Δ‖² + c)^p (--norm_p)
        norm_eps        = 1e-3,     # adaptive-weight constant c (--norm_eps)
        augment_kwargs  = None,     # dict(class_name='training.data.augment.AugmentPipe', p=..., ...); None = off
    ):
        if time_sampler not in TIME_SAMPLERS:
            raise dnnlib.UserError(f'MeanFlow: time_sampler must be one of {", ".join(TIME_SAMPLERS)}, '
                                   f'got {time_sampler!r}')
        inf = float('inf')
        self.times_kwargs = dict(P_mean_t=_number('P_mean_t', P_mean_t, -inf, inf),
            P_std_t=_number('P_std_t', P_std_t, 0, inf), P_mean_r=_number('P_mean_r', P_mean_r, -inf, inf),
            P_std_r=_number('P_std_r', P_std_r, 0, inf), ratio=_number('ratio', ratio, 0, 1))
        self.time_sampler = time_sampler
        self.norm_p = _number('norm_p', norm_p, 0, inf)
        self.norm_eps = _number('norm_eps', norm_eps, 0, inf, low_open=True)
        self.augment_pipe = None if augment_kwargs is None else _build_component('MeanFlow', 'augment_kwargs',
                                                                                 augment_kwargs, {})
        self.ready = False          # set by setup

    def setup(self, net, device):
        """Check that `net` is a MeanFlow network that takes the augmentation pipe's labels."""
        del device  # the pipe has no tensors; the draws follow the images' device
        self.check_network(net)
        self.ready = True

    def check_network(self, net):
        """UserError unless `net` is a MeanFlow network that takes a JVP and the augment labels."""
        if not getattr(net, 'is_meanflow', False):
            raise dnnlib.UserError(f'MeanFlow trains a training.networks.meanflow_unet.MeanFlowPrecond '
                                   f'(--precond=meanflow), got {type(net).__name__}')
        require_jvp_support(net, 'MeanFlow')
        augment_dim = network_augment_dim(net)
        if self.augment_pipe is None:
            if augment_dim and dist.get_world_size() > 1:
                raise dnnlib.UserError(f'MeanFlow: the network has augment_dim={augment_dim} but augment_kwargs is '
                                       f'None: its augment layer would get no gradient, which DDP cannot sync; '
                                       f'set --augment=P or augment_dim=0')
            return
        label_dim = getattr(self.augment_pipe, 'label_dim', augment_dim)
        if label_dim != augment_dim:
            raise dnnlib.UserError(f'MeanFlow: augment_kwargs give {label_dim} augment labels but the network has '
                                   f'augment_dim={augment_dim} (--arch-kwargs augment_dim)')
        if hasattr(self.augment_pipe, 'check_image_shape'):
            self.augment_pipe.check_image_shape(net.img_channels, net.img_resolution, net.img_resolution)

    def snapshot_metadata(self):
        """The snapshot's sampler family (training.sampling.samplers.FEW_STEP), read by generate.py and the metrics."""
        return dict(method='meanflow', sampler='meanflow')

    def loss(self, net, images, labels=None):
        """Per-sample losses [N]: augmentation (when on), then ε, then (t, r), as py-meanflow draws them."""
        if loss_compiled.compiled_network(net) is not None:
            raise dnnlib.UserError('MeanFlow: --compile is not supported (its JVP runs the eager network)')
        if not self.ready:
            raise RuntimeError('MeanFlow.loss: call setup(net, device) first')
        kwargs = dict(class_labels=labels)
        if self.augment_pipe is not None:
            images, kwargs['augment_labels'] = self.augment_pipe(images)
        noise = torch.randn_like(images)
        t, r = sample_times(self.time_sampler, images.shape[0], images.device, **self.times_kwargs)
        return meanflow_loss(net, images, noise, r, t, self.norm_p, self.norm_eps, kwargs)
