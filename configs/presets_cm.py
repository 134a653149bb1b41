"""Consistency Models recipes: the released commands of openai/consistency_models `scripts/launch.sh` (CD with
l2 and LPIPS, CT, EDM pretraining with `edm_train.py`'s settings) on ImageNet-64 and LSUN-256, as presets of
configs/presets.py. Differences from the public code: docs/CONSISTENCY_MODELS.md.

Flat keys these presets add: teacher (the EDM-form network CD and progressive distillation distil, and sCD's
teacher; also the initial weights when transfer='teacher', as the official cm_train.py copies the teacher into the
student), stage1 (TCM's stage-1 network; the initial weights when transfer='stage1', as NVlabs/TCM's README passes
the same file to --transfer), loss_norm, lpips_vgg, lpips_lin (overriding the method's own options).
"""

import dnnlib
from training.methods.loss_cm import level_sigma
from training.networks.karras import RELEASED_UNETS

PRECOND = 'training.networks.karras.KarrasDenoiser'
ARCHS = {'cm-imagenet64': dict(RELEASED_UNETS['imagenet64']), 'cm-lsun256': dict(RELEASED_UNETS['lsun256'])}
METHOD_FLAGS = ('teacher', 'stage1', 'loss_norm', 'lpips_vgg', 'lpips_lin')
NETWORK_FILE_FLAGS = ('teacher', 'stage1')   # flags naming a network file that transfer= may name too
FLAG_DEFAULTS = {key: None for key in METHOD_FLAGS}
METHODS = 'training.methods.consistency_models.'

# launch.sh: dataset -> (arch, class-conditional, EMA rates of the CD/CT commands, batch).
DATASETS = {
    'imagenet64': ('cm-imagenet64', True, (0.999, 0.9999, 0.9999432189950708), 2048),
    'lsun256': ('cm-lsun256', False, (0.9999, 0.99994, 0.9999432189950708), 256),
}
EDM_EMA_RATES = (0.999, 0.9999, 0.9999432189950708)   # edm_train.py commands, both datasets
STEPS_PER_TICK = 100        # official log every 10 steps, save every 10k: a tick of 100 steps, snapshots every 100


def _ema(rates):
    trackers = [dict(class_name='training.loop.ema.ConstantEMA', beta=rate, suffix=f'-{rate}') for rate in rates]
    return dict(class_name='training.loop.ema.CombinedEMA', trackers=trackers)


def _recipe(dataset, method_kwargs, lr, steps, two_step_ts, batch=None, ema_rates=None, **extra):
    arch, cond, rates, default_batch = DATASETS[dataset]
    batch = batch or default_batch
    return dict(
        arch=arch, precond='karras', cond=cond, network_kwargs=dict(parameterization='consistency'), dropout=0.0,
        batch=batch, duration_mimg=steps * batch / 1e6, tick_kimg=STEPS_PER_TICK * batch / 1000, double_ticks=None,
        snap_ticks=100, dump_ticks=100, sample_ticks=100, precision='fp16', transfer='teacher',
        optimizer=dict(class_name='torch.optim.RAdam', lr=lr, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0),
        lr_decay_batches=0, lr_rampup_kimg=0, ema=_ema(ema_rates or rates), grid_sampler='consistency',
        method_kwargs=dict(method_kwargs), **extra, **({} if two_step_ts is None else dict(
            mid_t=[level_sigma(two_step_ts[0], two_step_ts[1] - 1)])))


def _cd(dataset, loss_norm, lr, two_step_ts):
    method = dict(class_name=METHODS + 'ConsistencyDistillation', teacher=None, loss_norm=loss_norm,
                  weighting='uniform', solver='heun', start_ema=0.95, start_scales=40, lpips_vgg=None, lpips_lin=None)
    return _recipe(dataset, method, lr, 600000, two_step_ts)


def _ct(dataset, lr, end_scales, steps, two_step_ts):
    method = dict(class_name=METHODS + 'ConsistencyTraining', loss_norm='lpips', weighting='uniform',
                  start_ema=0.95, start_scales=2, end_scales=end_scales, total_steps=steps, lpips_vgg=None,
                  lpips_lin=None)
    return _recipe(dataset, method, lr, steps, two_step_ts)


def _edm(dataset, batch):
    """edm_train.py: EDM-form network, dropout 0.1, lognormal σ, karras weighting; it gives no training length,
    so EDM's ImageNet-64 length (2500 Mimg, Karras et al. 2022 Table 7) is used."""
    method = dict(class_name=METHODS + 'KarrasEDMPretraining', P_mean=-1.2, P_std=1.2, weighting='karras')
    recipe = _recipe(dataset, method, 1e-4, 2500e6 / batch, None, batch=batch, ema_rates=EDM_EMA_RATES)
    recipe.update(network_kwargs=dict(parameterization='edm'), dropout=0.1, transfer=None, grid_sampler='edm')
    return recipe


PRESETS = {
    'cm-imagenet64-cd-l2': _cd('imagenet64', 'l2', 8e-6, (22, 40)),
    'cm-imagenet64-cd-lpips': _cd('imagenet64', 'lpips', 8e-6, (22, 40)),
    'cm-imagenet64-ct': _ct('imagenet64', 1e-4, 200, 800000, (106, 201)),
    'cm-imagenet64-edm': _edm('imagenet64', 4096),
    'cm-lsun256-cd-l2': _cd('lsun256', 'l2', 1e-5, (18, 40)),
    'cm-lsun256-cd-lpips': _cd('lsun256', 'lpips', 1e-5, (17, 40)),
    'cm-lsun256-ct': _ct('lsun256', 5e-5, 150, 1000000, (67, 151)),
    'cm-lsun256-edm': _edm('lsun256', 256),
}


def apply_method_flags(method_kwargs, o):
    """method_kwargs with the flat keys teacher/loss_norm/lpips_* applied; one UserError for a flag the method
    does not take or a teacher it needs and lacks."""
    for key in METHOD_FLAGS:
        value = o.get(key)
        if value is None or (key in NETWORK_FILE_FLAGS and o.get('transfer') == key and key not in method_kwargs):
            continue
        if key not in method_kwargs:
            raise dnnlib.UserError(f'--{key.replace("_", "-")}: the training method {method_kwargs["class_name"]} '
                                   f'has no such option')
        method_kwargs[key] = value
    if 'teacher' in method_kwargs and not method_kwargs['teacher']:
        raise dnnlib.UserError('--teacher: required by this recipe (the EDM-form network to distil, e.g. '
                               'edm_imagenet64_ema.pt)')
    return method_kwargs


def method_files(method_kwargs):
    """{flag: path} of the files a Consistency Models method reads (teacher, LPIPS weights), for up-front checks."""
    return {f'--{key.replace("_", "-")}': method_kwargs[key]
            for key in ('teacher', 'stage1', 'lpips_vgg', 'lpips_lin') if method_kwargs.get(key)}


def transfer_path(o):
    """The initial weights: --transfer, where 'teacher' / 'stage1' mean the --teacher / --stage1 network (as the
    official codes)."""
    key = o.get('transfer')
    if key not in NETWORK_FILE_FLAGS:
        return key
    if not o.get(key):
        raise dnnlib.UserError(f'--{key}: required: this recipe starts from the {key} network\'s weights (pass '
                               f'--{key}=FILE, or --transfer=none to start from scratch)')
    return o.get(key)
