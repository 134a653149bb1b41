"""Named training presets (the recipes of docs/ECT.md §6) and their resolution into training options.

A preset is a flat dict of option values, the same keys the command line sets (`train.py --preset=NAME`
fills them, explicit flags override them). Components are named by dotted class name, so a new recipe is
data only: add an entry to PRESETS. `resolve(preset_name, overrides)` turns preset + overrides into the
training.loop.options.TrainingOptions that `training.loop.training_loop.training_loop(options, run_dir)` takes, with
every component as dict(class_name=..., **kwargs). The training method is `method_kwargs`: given as a dict it
is used as is (any method, e.g. dict(class_name='training.methods.toy.ToyMethod', ...), see
docs/ADDING_A_METHOD.md); when None it is ECT or EDM pretraining (`loss`) built from the flat keys below.

Flat keys (all optional in a preset; see DEFAULTS for their defaults):
  data, cond, arch, precond, network_kwargs (extra network constructor kwargs), dropout, dropout_res,
  duration_mimg, batch, batch_gpu, tick_kimg, double_ticks (None or inf: the stage never grows), snap_ticks,
  dump_ticks, sample_ticks, eval_ticks, metrics, metrics_ref, max_hours, seed, precision,
  transfer ('none' disables a preset's initial checkpoint), method_kwargs (dict(class_name, **kwargs) or None),
  loss ('ect' | 'edm', when method_kwargs is None), q, k, b, c,
  mapping ('sigmoid' | 'constant'), weighting ('ict' | 'edm2' | 'none'), P_mean, P_std, sigma_data,
  optimizer (dict(class_name, **kwargs)), lr (overrides optimizer lr), lr_decay_batches, lr_rampup_kimg,
  grad_clip (the global gradient norm is clipped to it before each step; None or 0 = no clipping),
  ema (dict(class_name, **kwargs)), ema_beta (-> ConstantEMA), ema_mimg (-> EDM half-life EMA), mid_t,
  grid_sampler ('edm' | 'consistency' | 'trigflow' | 'meanflow'), xflip, cache, workers, data_on_device (the whole
  dataset on the training device, no DataLoader workers: training.data.device_data), compile (torch.compile the trained network; off
  everywhere, see train.py --compile), find_unused_parameters, channels_last, tensorboard, wandb,
  data_source / data_max_images (when `data` does not exist yet, train.py builds it from this dataset_tool.py
  source, e.g. 'procedural:shapes'), eval_init_metrics (metrics of the initial network, before training),
  eval_init_background (score them in a background process while training starts: metrics.background),
  metric_samples (generated images per metric; None = the metric's published count);
  augment (EDM's non-leaking augmentation, dict(class_name='training.data.augment.AugmentPipe', **kwargs) or None:
  given to the method as augment_kwargs, and the network's augment_dim is the pipe's label width unless
  network_kwargs sets it), augment_p (train.py --augment=P: the pipe's probability p; 0 turns it off);
  Consistency Models (configs/presets_cm.py): teacher, loss_norm, lpips_vgg, lpips_lin, transfer='teacher'.
"""

import copy
import math
import os

import dnnlib
from configs import presets_cm, presets_ct
from configs.checks import check_numbers, check_run_flags, choice as _choice
from training.loop.options import TrainingOptions
from training.sampling.samplers import CIFAR10_MID_T, IMAGENET64_MID_T

CIFAR10_VP_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_DATA = os.path.join(REPO_ROOT, 'datasets', 'quickstart-shapes-16x16.zip')   # built on first use
QUICKSTART_CHECKPOINT = os.path.join(REPO_ROOT, 'checkpoints', 'quickstart-edm-shapes16.pt')
QUICKSTART_MID_T = 1.5   # the quickstart's 2-step intermediate time, searched on its data (see the preset)

# Network architectures (EDM's --arch) -> constructor kwargs of the inner network.
ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
    'edm2': dict(),   # EDM2 UNet: sizes come from network_kwargs (model_channels etc.)
    **presets_cm.ARCHS,   # openai's released ADM U-Nets (KarrasDenoiser, --precond=karras)
    **presets_ct.ARCHS,   # MeanFlow's two-time U-Net (--precond=meanflow)
}

# Preconditioners (EDM's --precond) -> class names. --arch=edm2 always uses the EDM2 preconditioner.
PRECONDS = {
    'vp': 'training.networks.VPPrecond',
    've': 'training.networks.VEPrecond',
    'edm': 'training.networks.EDMPrecond',
    'ecm': 'training.networks.ECMPrecond',
    'karras': presets_cm.PRECOND,   # openai's KarrasDenoiser; network_kwargs.parameterization = edm | consistency
    **presets_ct.PRECONDS,          # sCM's TrigFlow form around EDM's (or, with --arch=edm2, EDM2's) preconditioner
}
EDM2_PRECOND = 'training.networks.edm2.Precond'

MAPPINGS = {'sigmoid': 'training.methods.loss.SigmoidMapping', 'constant': 'training.methods.loss.ConstantMapping'}
WEIGHTINGS = {'ict': 'training.methods.loss.InverseGapWeighting', 'edm2': 'training.methods.loss.InverseSquareWeighting',
              'none': 'training.methods.loss.NoWeighting'}
LOSSES = {'ect': 'training.methods.ect.ECT', 'edm': 'training.methods.edm.EDM'}   # --loss -> training method

# Values used when neither the preset nor the command line gives one.
DEFAULTS = dict(
    data=None, cond=False, arch='ddpmpp', precond='ecm', network_kwargs={}, dropout=0.0, dropout_res=None,
    duration_mimg=25.6, batch=128, batch_gpu=None, tick_kimg=12.8, double_ticks=None,
    snap_ticks=50, dump_ticks=100, sample_ticks=50, eval_ticks=None, metrics=[], max_hours=None,
    seed=0, precision='fp32', transfer=None, method_kwargs=None, loss='ect', q=2, k=8, b=1, c=0.0, mapping='sigmoid',
    weighting='ict', P_mean=-1.1, P_std=2.0, sigma_data=0.5,
    optimizer=dict(class_name='torch.optim.RAdam', lr=1e-4, betas=[0.9, 0.999], eps=1e-8, foreach=True),
    lr=None, lr_decay_batches=0, lr_rampup_kimg=0, grad_clip=None,
    ema=dict(class_name='training.loop.ema.ConstantEMA', beta=0.9999), ema_beta=None, ema_mimg=None,
    mid_t=[CIFAR10_MID_T], grid_sampler='consistency', xflip=False, cache=True, workers=2,
    data_on_device=False, compile=False,
    find_unused_parameters=False, channels_last=False, metrics_ref=None, tensorboard=False, wandb=None, data_source=None,
    data_max_images=None,
    eval_init_metrics=[], eval_init_background=False, metric_samples=None, detector_files={}, augment=None,
    augment_p=None,
    **presets_cm.FLAG_DEFAULTS,
)

# ECT CIFAR-10 recipe (docs/ECT.md §6, official run_ecm.sh): 200k iterations at batch 128.
_CIFAR10_ECM = dict(
    arch='ddpmpp', precond='ecm', cond=False, dropout=0.2, transfer=CIFAR10_VP_URL,
    duration_mimg=25.6, batch=128, tick_kimg=12.8, double_ticks=250,
    loss='ect', q=2, k=8, b=1, c=0.0, mapping='sigmoid', weighting='ict', P_mean=-1.1, P_std=2.0,
    optimizer=dict(class_name='torch.optim.RAdam', lr=1e-4, betas=[0.9, 0.999], eps=1e-8, foreach=True),
    lr_decay_batches=0, lr_rampup_kimg=0, ema=dict(class_name='training.loop.ema.ConstantEMA', beta=0.9999),
    mid_t=[CIFAR10_MID_T], grid_sampler='consistency',
    precision='auto',   # bf16 autocast on CUDA (A100/H100), fp32 on the CPU; --precision=fp32 is the official recipe
)

# ECT ImageNet-64 recipe (docs/ECT.md §6, column 3; ECT paper §4.2): class-conditional EDM2 img64 networks tuned for
# 100k iterations at batch 128. Per size: EDM2 model_channels, base lr, dropout, and the official EDM2 post-hoc
# reconstruction used as init (the FID-optimal sigma_rel of EDM2's generate_images.py presets).
EDM2_IMG64_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img64-{}.pkl'
IMAGENET64_SIZES = {
    's': dict(model_channels=192, lr=1e-3, dropout=0.40, init='s-1073741-0.075'),
    'm': dict(model_channels=256, lr=9e-4, dropout=0.50, init='m-2147483-0.060'),
    'l': dict(model_channels=320, lr=8e-4, dropout=0.50, init='l-1073741-0.040'),
    'xl': dict(model_channels=384, lr=7e-4, dropout=0.50, init='xl-0671088-0.040'),
}
EDM_CIFAR10_AUGMENT = dict(class_name='training.data.augment.AugmentPipe', p=0.12, xflip=1e8, yflip=1, scale=1,
                           rotate_frac=1, aniso=1, translate_frac=1)   # edm train.py's augment_kwargs, --augment=0.12
ECM_SIGMA_MIN = 0.003   # docs/ECT.md §2: ECM's sigma_min (the official ECMPrecond default)


def _imagenet64_ecm(size):
    """The ImageNet-64 preset of one EDM2 size (S/M/L/XL): docs/ECT.md §6, data only."""
    cfg = IMAGENET64_SIZES[size]
    return dict(
        arch='edm2', cond=True, dropout=cfg['dropout'], dropout_res=16, transfer=EDM2_IMG64_URL.format(cfg['init']),
        network_kwargs=dict(model_channels=cfg['model_channels'], channel_mult=[1, 2, 3, 4], num_blocks=3,
                            attn_resolutions=[16, 8], ecm_sigma_min=ECM_SIGMA_MIN),
        duration_mimg=12.8, batch=128, tick_kimg=6.4, double_ticks=500,
        loss='ect', q=4, k=8, b=1, c=0.06, mapping='sigmoid', weighting='edm2', P_mean=-0.8, P_std=1.6,
        optimizer=dict(class_name='torch.optim.Adam', lr=cfg['lr'], betas=[0.9, 0.99], eps=1e-8, foreach=True),
        lr_decay_batches=2000, lr_rampup_kimg=0,
        ema=dict(class_name='training.loop.ema.CombinedEMA', trackers=[
            dict(class_name='training.loop.ema.PowerFunctionEMA', stds=[0.010, 0.050, 0.100]),
            dict(class_name='training.loop.ema.ConstantEMA', beta=0.9999, suffix='-b0.9999')]),
        mid_t=[IMAGENET64_MID_T], grid_sampler='consistency', xflip=False,
        # bf16 autocast on CUDA (A100/H100), fp32 on the CPU; --precision=tf32 is the official loop's arithmetic
        # (it always enables TF32 matmuls and convolutions)
        precision='auto',
    )


# The quickstart's data and network: procedural 16x16 shapes (dataset_tool.py --source=procedural:shapes) and a
# DDPM++ U-Net small enough to train on a laptop CPU (1.3M parameters).
_QUICKSTART_DATA = dict(data=QUICKSTART_DATA, data_source='procedural:shapes', data_max_images=10000, cond=False,
                        workers=0)
_QUICKSTART_NET = dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8])

PRESETS = {
    'cifar10-ecm': _CIFAR10_ECM,
    # ECT CIFAR-10 in one A100-hour (docs/ECT.md §6): q = 256, the stage never doubles, EMA 0.9993, stop after an hour.
    'cifar10-ecm-1gpu-hour': dict(_CIFAR10_ECM, q=256, double_ticks=None, max_hours=1.0,
                                  ema=dict(class_name='training.loop.ema.ConstantEMA', beta=0.9993)),
    # EDM diffusion pretraining of DDPM++ (EDM's CIFAR-10 recipe, Karras et al. 2022 Table 7), for users without
    # a checkpoint, with EDM's non-leaking augmentation at p = 0.12 (edm train.py: --augment default 0.12, and the
    # transforms of its augment_kwargs; augment_dim 9 follows from them).
    'cifar10-edm-pretrain': dict(
        arch='ddpmpp', precond='edm', cond=False, dropout=0.13, transfer=None, augment=EDM_CIFAR10_AUGMENT,
        duration_mimg=200.0, batch=512, tick_kimg=50.0, double_ticks=None,
        loss='edm', P_mean=-1.2, P_std=1.2,
        optimizer=dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8, foreach=True),
        lr_decay_batches=0, lr_rampup_kimg=10000, ema=None, ema_mimg=0.5, grid_sampler='edm',
    ),
    **{f'imagenet64-ecm-{size}': _imagenet64_ecm(size) for size in IMAGENET64_SIZES},
    # The toy method of docs/ADDING_A_METHOD.md: any training method is one module plus a preset like this one.
    'toy-denoising': dict(
        precond='edm', transfer=None, grid_sampler='edm', ema_beta=0.999,
        method_kwargs=dict(class_name='training.methods.toy.ToyDenoising', sigma_start=1.0, sigma_end=80.0),
    ),
    # EDM diffusion pretraining of the quickstart's checkpoint: checkpoints/quickstart-edm-shapes16.pt is the final
    # network-snapshot of `python train.py --preset=quickstart-pretrain` (made as `--duration=1 --max-hours=0.6`, which
    # stopped after 36 minutes on 2 shared CPU cores at 283,136 images = 4,424 steps: the duration below).
    'quickstart-pretrain': dict(
        _QUICKSTART_DATA, arch='ddpmpp', precond='edm', network_kwargs=_QUICKSTART_NET, dropout=0.0, transfer=None,
        duration_mimg=0.283136, batch=64, tick_kimg=10.0, double_ticks=None, snap_ticks=1, dump_ticks=5,
        sample_ticks=10, loss='edm', P_mean=-1.2, P_std=1.2,
        optimizer=dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8, foreach=True),
        lr_decay_batches=0, lr_rampup_kimg=10, ema=None, ema_mimg=0.04, grid_sampler='edm',
    ),
    # The quickstart (`python train.py --preset=quickstart`, sized for 3 minutes on 2 idle CPU cores): the CIFAR-10 ECT
    # recipe (loss, sigmoid curriculum, RAdam, constant EMA, snapshots, states, grids) sized for 1000 steps on the
    # shipped checkpoint: batch 16, lr 5e-4, EMA 0.995 and a stage every 2 ticks of 2 kimg (4 stages). The transferred
    # diffusion model is scored (EDM Heun 35 NFE, 1 and 2 NFE) in a background process while tuning starts, the
    # tuned model at the end (1 and 2 NFE), with fd_randnet against the dataset. Chosen by runs on one CPU core
    # (fd_randnet of the final EMA, 500 samples, mean of 3 seed sets; docs/TUNING_STUDY.md): progress follows steps,
    # not images, so a short run takes small batches (batch 8 at 1250 steps: 1.10); at 1000 steps lr 1e-3 / 7e-4 /
    # 5e-4 / 3e-4 with EMA 0.995 gave 0.33 / 0.26 / 0.23 / 0.26 (1 step) and 0.31 / 0.26 / 0.21 / 0.22 (2 steps);
    # EMA 0.98 / 0.99 / 0.995 / 0.997 at lr 1e-3 gave 0.45 / 0.37 / 0.31 / 0.35 (2 steps). mid_t is this data's, not
    # CIFAR-10's 0.821: 2-step 0.242 (0.821), 0.210 (1.2), 0.205 (1.5), 0.214 (2.0) on the chosen recipe's snapshot.
    'quickstart': dict(
        _CIFAR10_ECM, **_QUICKSTART_DATA, network_kwargs=_QUICKSTART_NET, dropout=0.0, transfer=QUICKSTART_CHECKPOINT,
        duration_mimg=0.016, batch=16, tick_kimg=2.0, double_ticks=2, snap_ticks=10, dump_ticks=10, sample_ticks=10,
        precision='fp32',   # the numbers quoted above, on any device
        optimizer=dict(_CIFAR10_ECM['optimizer'], lr=5e-4), ema=dict(class_name='training.loop.ema.ConstantEMA', beta=0.995),
        mid_t=[QUICKSTART_MID_T], metrics=['fd_randnet', 'two_step_fd_randnet'],
        eval_init_metrics=['fd_randnet_heun', 'fd_randnet', 'two_step_fd_randnet'], eval_init_background=True,
        metrics_ref=QUICKSTART_DATA, eval_ticks=1000, metric_samples=500,
    ),
    **presets_cm.PRESETS,   # Consistency Models (openai's launch.sh): CD, CT, EDM pretraining
    **presets_ct.PRESETS,   # continuous-time consistency models: sCT, sCD (FastGen's configs), MeanFlow (py-meanflow)
}


def merge(preset_name, overrides):
    """The flat options: DEFAULTS, then the preset, then the non-None overrides (command line).
    A network_kwargs override is merged into the preset's (--arch-kwargs changes only the keys it names)."""
    if preset_name is not None and preset_name not in PRESETS:
        raise dnnlib.UserError(f'--preset: unknown preset "{preset_name}"; known: {", ".join(sorted(PRESETS))}')
    flat = copy.deepcopy(DEFAULTS)
    flat.update(copy.deepcopy(PRESETS.get(preset_name, {})))
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise dnnlib.UserError(f'unknown option(s) {unknown}; known: {sorted(DEFAULTS)}')
    given = {key: copy.deepcopy(value) for key, value in overrides.items() if value is not None}
    if isinstance(given.get('network_kwargs'), dict):
        given['network_kwargs'] = dict(flat['network_kwargs'], **given['network_kwargs'])
    flat.update(given)
    return dnnlib.EasyDict(flat)


def _network_kwargs(o):
    arch = _choice('--arch', o.arch, ARCHS)
    precond = _choice('--precond', o.precond, PRECONDS)
    class_name = EDM2_PRECOND if arch == 'edm2' and precond != 'trigflow' else PRECONDS[precond]
    kwargs = dict(class_name=class_name, **copy.deepcopy(ARCHS[arch]))
    kwargs.update(dropout=float(o.dropout))
    if o.dropout_res is not None:
        kwargs.update(dropout_res=int(o.dropout_res))
    kwargs.update(use_fp16=False)   # mixed precision is autocast's job (--precision); network_kwargs may override
    augment = _augment_kwargs(o)
    if augment is not None:
        kwargs.update(augment_dim=augment_label_dim(augment))
    kwargs.update(copy.deepcopy(o.network_kwargs))
    if precond == 'trigflow' and arch == 'edm2':
        kwargs.update(denoiser='edm2')   # the TrigFlow form of EDM2's preconditioner
    return kwargs


def _augment_kwargs(o):
    """The augmentation pipe (dict(class_name, **kwargs)) after --augment=P, or None: off."""
    if o.augment_p is None:
        return copy.deepcopy(o.augment)
    if not 0 <= o.augment_p <= 1:
        raise dnnlib.UserError(f'--augment: the augmentation probability must be in [0, 1], got {o.augment_p}')
    if o.augment_p == 0:
        return None
    return dict(copy.deepcopy(o.augment or EDM_CIFAR10_AUGMENT), p=float(o.augment_p))


def augment_label_dim(augment):
    """The width of the augment labels of pipe `augment` (the network's augment_dim), from the built pipe."""
    try:
        return int(dnnlib.util.construct_class_by_name(**augment).label_dim)
    except (TypeError, ValueError, AttributeError) as e:
        raise dnnlib.UserError(f'augment: cannot build {augment.get("class_name")}: {e}') from None


def _method_kwargs(o):
    """The training method, with the Consistency Models flags (--teacher, --loss-norm, --lpips-*) and the
    augmentation pipe (augment_kwargs) applied."""
    kwargs = presets_cm.apply_method_flags(_named_method_kwargs(o), o)
    augment = _augment_kwargs(o)
    if augment is not None:
        kwargs['augment_kwargs'] = augment
    elif 'augment_kwargs' in kwargs and o.augment_p == 0:
        kwargs['augment_kwargs'] = None
    return kwargs


def _named_method_kwargs(o):
    """The training method: o.method_kwargs as given, else ECT or EDM pretraining (--loss) from the flat keys."""
    if o.method_kwargs is not None:
        if not isinstance(o.method_kwargs, dict) or 'class_name' not in o.method_kwargs:
            raise dnnlib.UserError(f'method_kwargs: expected dict(class_name=..., **kwargs), got {o.method_kwargs!r}')
        return copy.deepcopy(o.method_kwargs)
    loss = _choice('--loss', o.loss, LOSSES)
    common = dict(class_name=LOSSES[loss], P_mean=float(o.P_mean), P_std=float(o.P_std), sigma_data=float(o.sigma_data))
    if loss == 'edm':
        return common
    mapping = dict(class_name=MAPPINGS[_choice('--mapping', o.mapping, MAPPINGS)], q=float(o.q))
    if o.mapping == 'sigmoid':
        mapping.update(k=float(o.k), b=float(o.b))
    weighting = dict(class_name=WEIGHTINGS[_choice('--weighting', o.weighting, WEIGHTINGS)])
    return dict(common, double_ticks=_double_ticks(o.double_ticks), c=float(o.c), mapping=mapping, weighting=weighting)


def _ema_kwargs(o):
    if o.ema_beta is not None:
        return dict(class_name='training.loop.ema.ConstantEMA', beta=float(o.ema_beta))
    if o.ema_mimg is not None:
        return dict(class_name='training.loop.ema.HalfLifeEMA', halflife_kimg=float(o.ema_mimg) * 1000, rampup_ratio=0.05)
    if not o.ema:
        raise dnnlib.UserError('--ema/--ema-beta: the configuration has no EMA; give one')
    return copy.deepcopy(o.ema)


def _optimizer_kwargs(o):
    kwargs = copy.deepcopy(o.optimizer)
    if o.lr is not None:
        kwargs['lr'] = float(o.lr)
    return kwargs


def _double_ticks(value):
    """Ticks per curriculum stage; None (also for inf) = the stage never grows."""
    return None if value is None or math.isinf(value) else float(value)


def _transfer(o):
    """--transfer (None for 'none'), where 'teacher' means the --teacher network."""
    transfer = presets_cm.transfer_path(o)
    return None if str(transfer).lower() in ('none', '') else transfer


def build_options(o):
    """The training.loop.options.TrainingOptions of flat options `o`."""
    check_numbers(o)
    check_run_flags(o)
    return TrainingOptions(
        dataset_kwargs=dict(class_name='training.data.dataset.ImageFolderDataset', path=o.data, use_labels=bool(o.cond),
                            xflip=bool(o.xflip), cache=bool(o.cache)),
        data_loader_kwargs=dict(num_workers=int(o.workers), pin_memory=True, prefetch_factor=2),
        data_on_device=bool(o.data_on_device),
        network_kwargs=_network_kwargs(o),
        method_kwargs=_method_kwargs(o),
        optimizer_kwargs=_optimizer_kwargs(o),
        lr_kwargs=dict(class_name='training.loop.training_loop.LearningRateSchedule',
                       decay_batches=float(o.lr_decay_batches), rampup_kimg=float(o.lr_rampup_kimg)),
        ema_kwargs=_ema_kwargs(o), grad_clip_norm=float(o.grad_clip) if o.grad_clip else None,
        total_kimg=float(o.duration_mimg) * 1000, batch_size=int(o.batch),
        batch_gpu=None if o.batch_gpu is None else int(o.batch_gpu), tick_kimg=float(o.tick_kimg),
        snapshot_ticks=o.snap_ticks, state_dump_ticks=o.dump_ticks, sample_ticks=o.sample_ticks,
        eval_ticks=o.eval_ticks, metrics=list(o.metrics), eval_init_metrics=list(o.eval_init_metrics),
        eval_init_background=bool(o.eval_init_background),
        metric_samples=None if o.metric_samples is None else int(o.metric_samples), max_hours=o.max_hours,
        seed=int(o.seed), precision=o.precision, compile=bool(o.compile), transfer=_transfer(o),
        mid_t=[float(t) for t in o.mid_t], grid_sampler=o.grid_sampler,
        find_unused_parameters=bool(o.find_unused_parameters), channels_last=bool(o.channels_last),
        metrics_ref=o.metrics_ref,
        tensorboard=bool(o.tensorboard), wandb=o.wandb or None, detector_files=dict(o.detector_files),
    )


def resolve(preset_name, overrides):
    """Final training options: DEFAULTS <- PRESETS[preset_name] <- overrides (flat keys), then built."""
    return build_options(merge(preset_name, overrides))
