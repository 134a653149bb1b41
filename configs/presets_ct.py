"""Continuous-time consistency recipes as presets of configs/presets.py: sCT and sCD (Lu & Song 2024, TrigFlow), from
NVlabs/FastGen's configs (sCM has no official code; FastGen is its reference implementation), and MeanFlow (Geng et
al. 2025) from the authors' py-meanflow scripts, and TCM stage 2 (Lee et al. 2024) from NVlabs/TCM's README. Every
number names its source (FastGen file:line at commit 34f30e8, py-meanflow at 1f6d72d9, NVlabs/TCM at b132239);
docs/SCM.md, docs/MEANFLOW.md and docs/TCM.md list where this project departs from them.
"""

import math
import os

from training.sampling.samplers import IMAGENET64_MID_T
from training.sampling.samplers_trigflow import TRIG_MID_T

CIFAR10_VP_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl'
EDM_IMAGENET64_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl'
PRECONDS = {
    'trigflow': 'training.networks.trigflow.TrigFlowPrecond',     # sCM's F_θ on EDM's D
    'meanflow': 'training.networks.meanflow_unet.MeanFlowPrecond',  # u(z, r, t) of MeanFlow's two-time U-Net
}
# py-meanflow's CIFAR-10 U-Net (model_configs.py:17-26): NCSN++'s settings with DDPM++'s positional embedding, two
# times; num_blocks 4, attention at 16, channel_mult_emb 4 are SongUNet's defaults (unet.py:277-281), as ours.
ARCHS = {'meanflow': dict(model_type='MeanFlowUNet', embedding_type='positional', encoder_type='standard',
                          decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                          model_channels=128, channel_mult=[2, 2, 2])}

# Three constant EMAs (FastGen callbacks.py:27-31); the first is the one without a suffix.
_SCM_EMAS = dict(class_name='training.loop.ema.CombinedEMA', trackers=[
    dict(class_name='training.loop.ema.ConstantEMA', beta=0.9999),
    dict(class_name='training.loop.ema.ConstantEMA', beta=0.99995, suffix='-b0.99995'),
    dict(class_name='training.loop.ema.ConstantEMA', beta=0.9996, suffix='-b0.9996')])

# The sCM loss of both methods (FastGen config_scm.py / sCM.py defaults): truncated log-normal times, tangent
# warm-up over 10k steps, tangent normalisation g/(‖g‖ + 0.1), prior weight 1/σ, adaptive weighting, autograd JVP.
_SCM_LOSS = dict(sigma_data=0.5, sigma_min=0.002, warmup_steps=10000, tangent_c=0.1, tangent_norm='l2',
                 prior_weighting=True, adaptive_weighting=True, jvp='autograd')

_SCM_CIFAR10 = dict(
    arch='ddpmpp', precond='trigflow', network_kwargs=dict(denoiser='edm', logvar_head=True),   # EDM/network.py:487
    cond=False, transfer=CIFAR10_VP_URL,                      # config_sct_cifar10.py:17, config_scd_cifar10.py:20
    batch=512,                                                # config_sct_cifar10.py:31, config_scd_cifar10.py:29
    optimizer=dict(class_name='torch.optim.RAdam', lr=1e-4, betas=[0.9, 0.99], eps=1e-8, weight_decay=0.0,
                   foreach=True),                             # opt.py:55-62, config_scm.py:110-111
    lr_decay_batches=0, lr_rampup_kimg=0,                     # config_scm.py:113 (constant lr)
    ema=_SCM_EMAS, grid_sampler='trigflow',
    mid_t=[TRIG_MID_T],                                       # arctan(0.821/0.5): config_sct_cifar10.py:14 (σ 0.821)
    precision='fp32',                                         # configs/config.py:167-169, config_scm.py:105
)

# py-meanflow's EDM augmentation (train_loop.py:68; --use_edm_aug, cifar10_v1.sh:20): 6 augment labels.
MEANFLOW_AUGMENT = dict(class_name='training.data.augment.AugmentPipe', p=0.12, xflip=1e8, yflip=0, scale=1,
                        rotate_frac=0, aniso=1, translate_frac=1)
MEANFLOW_EPOCH_KIMG = 49.152    # one py-meanflow epoch: 48 steps (50000/8 per rank // 128, drop_last) × 1024 images

# MeanFlow on CIFAR-10, py-meanflow's improved recipe (scripts/cifar10_v1.sh); 1-step FID ~2.9 in its README.
_MEANFLOW_CIFAR10 = dict(
    arch='meanflow', precond='meanflow', cond=False, transfer=None,
    dropout=0.2,                                              # cifar10_v1.sh:19
    augment=MEANFLOW_AUGMENT,                                 # cifar10_v1.sh:20 (augment_dim 6 follows)
    batch=1024,                                               # cifar10_v1.sh:1,5 (8 GPUs × 128)
    duration_mimg=16000 * MEANFLOW_EPOCH_KIMG / 1000,         # 16000 epochs (cifar10_v1.sh:8): 786.432 Mimg
    tick_kimg=MEANFLOW_EPOCH_KIMG, snap_ticks=50, dump_ticks=50, sample_ticks=50,   # every 50 epochs (cifar10_v1.sh:7)
    optimizer=dict(class_name='torch.optim.Adam', lr=6e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0,
                   foreach=True),                             # train.py:157-161, cifar10_v1.sh:6, train_arg_parser.py:20
    lr_decay_batches=0, lr_rampup_kimg=200 * MEANFLOW_EPOCH_KIMG,   # 200 warm-up epochs (cifar10_v1.sh:16), then constant
    ema=dict(class_name='training.loop.ema.CombinedEMA', trackers=[     # train_arg_parser.py:24-25
        dict(class_name='training.loop.ema.PeriodicEMA', beta=0.9999, period=16, suffix='-0.9999'),   # ema.py:13
        dict(class_name='training.loop.ema.PeriodicEMA', beta=0.99995, period=16, suffix='-0.99995'),  # net_ema1
        dict(class_name='training.loop.ema.PeriodicEMA', beta=0.9996, period=16, suffix='-0.9996')]),
    xflip=True,                                               # data_transform.py:19 RandomHorizontalFlip
    precision='tf32',                                         # train.py:34 (the JVP always runs in float32)
    grid_sampler='meanflow', mid_t=[0.5],                     # FastGen config_mf_cifar10.py:17 (2 steps: t 0.5)
)

# TCM stage 2 (NVlabs/TCM README.md:55-80 CIFAR-10, :108-132 ImageNet-64): the trained network starts from the
# stage-1 ECT network (--stage1, also the transfer) and covers t >= t′ = 1; a frozen copy gives the targets below t′.
# The networks are in EDM's form (sigma_min 0; TCM networks.py:1043-1060), sampled by the consistency sampler.
_TCM_LOSS = dict(class_name='training.methods.tcm.TCM', stage1=None, stage1_steps=None,   # README:76-77
                 transition_t=1.0, P_mean=0.0, P_std=0.2, df=0.01, boundary_prob=0.25, w_boundary=0.1)  # README:76,79
_TCM_TICKS = dict(tick_kimg=102.4, snap_ticks=100, dump_ticks=100, sample_ticks=10,   # ct_train.py:178: 100 it/tick
                  double_ticks=None, transfer='stage1', batch=1024, grid_sampler='consistency', xflip=False,
                  precision='auto')    # README:58,111 batch 1024; the official fp32 (CIFAR) / fp16 (ImageNet)

# The quickstart's data, checkpoint and network (the same values as QUICKSTART_DATA, QUICKSTART_CHECKPOINT,
# _QUICKSTART_DATA and _QUICKSTART_NET of configs/presets.py, which imports this module and so cannot be imported here).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_QUICKSTART_ZIP = os.path.join(_REPO_ROOT, 'datasets', 'quickstart-shapes-16x16.zip')   # built on first use
_QUICKSTART_PT = os.path.join(_REPO_ROOT, 'checkpoints', 'quickstart-edm-shapes16.pt')
_QUICKSTART = dict(data=_QUICKSTART_ZIP, data_source='procedural:shapes', data_max_images=10000, cond=False, workers=0,
                   dropout=0.0, precision='fp32', tick_kimg=2.0, snap_ticks=10, dump_ticks=10, sample_ticks=10,
                   metrics=['fd_randnet', 'two_step_fd_randnet'], metrics_ref=_QUICKSTART_ZIP, eval_ticks=1000,
                   metric_samples=500, eval_init_background=True)
_QUICKSTART_NET = dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8])
_QUICKSTART_MID_SIGMA = 1.5   # the quickstart's 2-step σ (configs/presets.py QUICKSTART_MID_T, docs/TUNING_STUDY.md)
_QUICKSTART_INIT = ['fd_randnet', 'two_step_fd_randnet']   # the starting network's 1- and 2-step scores

PRESETS = {
    'cifar10-sct': dict(
        _SCM_CIFAR10, dropout=0.2,                            # config_scm.py:109
        duration_mimg=179.2,                                  # 350k iterations (config_sct_cifar10.py:30) × 512
        method_kwargs=dict(class_name='training.methods.scm.SCT', P_mean=-1.0, P_std=1.4, sigma_max=800.0,
                           **_SCM_LOSS)),                     # config_sct_cifar10.py:22-27
    'cifar10-scd': dict(
        _SCM_CIFAR10, dropout=0.0,                            # config_scd_cifar10.py:17
        duration_mimg=256.0,                                  # 500k iterations (config_scd_cifar10.py:28) × 512
        method_kwargs=dict(class_name='training.methods.scm.SCD', teacher=CIFAR10_VP_URL, guidance=None,
                           P_mean=-1.0, P_std=1.4, sigma_max=80.0, **_SCM_LOSS)),
    'imagenet64-scd': dict(
        arch='adm', precond='trigflow', network_kwargs=dict(denoiser='edm', logvar_head=True),   # net.py:51-68
        cond=True, dropout=0.0, transfer=EDM_IMAGENET64_URL,  # config_scd_in64.py:38-40
        batch=1024, duration_mimg=614.4,                      # config_scd_in64.py:66-67: 600k iterations × 1024
        optimizer=dict(class_name='torch.optim.Adam', lr=7e-5, betas=[0.9, 0.99], eps=1e-11, weight_decay=0.0,
                       foreach=True),                         # config_scd_in64.py:27-31
        lr_decay_batches=35000, lr_rampup_kimg=0,             # config_scd_in64.py:32-35 (inverse square root)
        grad_clip=10.0,                                       # config_scd_in64.py:19 (CIFAR-10's 1e6: none)
        ema=_SCM_EMAS, grid_sampler='trigflow',               # config_scd_in64.py:44-48
        mid_t=[math.atan(1.1 / 0.5)],                         # 1.1442 rad: config_scd_in64.py:58 (2-step σ 1.1)
        precision='bf16',                                     # config_scd_in64.py:22 (the JVP runs in float32)
        method_kwargs=dict(class_name='training.methods.scm.SCD', teacher=EDM_IMAGENET64_URL, guidance=None,
                           P_mean=-1.0, P_std=1.6, sigma_max=80.0, **_SCM_LOSS)),   # config_scd_in64.py:50-51
    'cifar10-meanflow': dict(
        _MEANFLOW_CIFAR10,
        method_kwargs=dict(class_name='training.methods.meanflow.MeanFlow', time_sampler='v1',
                           P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6,    # cifar10_v1.sh:11-15
                           ratio=0.75, norm_p=0.75, norm_eps=1e-3)),                  # cifar10_v1.sh:17-18, arg_parser:65
    'cifar10-tcm': dict(
        _TCM_TICKS, arch='ddpmpp', precond='ecm', cond=False, dropout=0.2,  # README:73,75,78
        network_kwargs=dict(sigma_min=0.0),                   # EDM's form (TCM networks.py:1043-1060)
        duration_mimg=307.2,                                  # 300k iterations × 1024 (FastGen config_tcm_cifar10.py)
        optimizer=dict(class_name='torch.optim.RAdam', lr=5e-5, betas=[0.9, 0.999], eps=1e-8, foreach=True),  # README:78
        lr_decay_batches=0, lr_rampup_kimg=0,                 # ct_train.py:104-105
        ema=dict(class_name='training.loop.ema.ConstantEMA', beta=0.9999),   # ct_train.py:108-109
        mid_t=[1.0],                                          # FastGen config_tcm_cifar10.py:14 (2 steps: σ 1.0)
        method_kwargs=dict(_TCM_LOSS, q=2.0, ratio_limit=0.999, double_steps=25000, c=1e-8,   # README:59,75
                           weighting=dict(class_name='training.methods.loss.InverseGapWeighting'))),
    'imagenet64-tcm-s': dict(
        _TCM_TICKS, arch='edm2', cond=True, dropout=0.4, dropout_res=16,   # README:125,127
        network_kwargs=dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8],
                            ecm_sigma_min=0.0),               # ct_train.py:218 (S: 192); TCM networks.py:928-933
        duration_mimg=409.6,                                  # 400k iterations × 1024 (FastGen EDM2/config_tcm_s.py)
        optimizer=dict(class_name='torch.optim.Adam', lr=5e-4, betas=[0.9, 0.99], eps=1e-8, foreach=True),  # README:130
        lr_decay_batches=8000, lr_rampup_kimg=0,              # README:130 --decay_iter=8000 --rampup_iter=0
        ema=dict(class_name='training.loop.ema.PowerFunctionEMA', stds=[0.050]),   # README:130 --ema_gamma=16.97
        mid_t=[IMAGENET64_MID_T],                             # 1.526 (FastGen EDM2/config_tcm_s.py)
        method_kwargs=dict(_TCM_LOSS, q=4.0, ratio_limit=0.9961, double_steps=10000, c=0.06,   # README:112,127,130
                           weighting=dict(class_name='training.methods.loss.InverseSquareWeighting'))),   # README:127
    # The paper's time sampler (scripts/cifar10_v0.sh:11-15), otherwise the same recipe.
    'cifar10-meanflow-v0': dict(
        _MEANFLOW_CIFAR10,
        method_kwargs=dict(class_name='training.methods.meanflow.MeanFlow', time_sampler='v0',
                           P_mean_t=-2.0, P_std_t=2.0, P_mean_r=-2.0, P_std_r=2.0, ratio=0.75, norm_p=0.75,
                           norm_eps=1e-3)),
    # The quickstart's continuous-time runs on a CPU (docs/QUICKSTART.md "Continuous-time methods on the CPU"): the
    # quickstart's data, network and batch 16 with fp32 and a 500-sample fd_randnet before and after, sized for minutes.
    # sCD distils the quickstart's diffusion checkpoint into itself (teacher = initial weights), in TrigFlow time.
    # Learning rates, EMAs, warm-up and lengths are set for runs of minutes, not tuned (one run each).
    'quickstart-scd': dict(
        _QUICKSTART, arch='ddpmpp', precond='trigflow', transfer=_QUICKSTART_PT,
        network_kwargs=dict(_QUICKSTART_NET, denoiser='edm', logvar_head=True),
        duration_mimg=0.008, batch=16,                        # 500 steps
        optimizer=dict(class_name='torch.optim.RAdam', lr=5e-4, betas=[0.9, 0.99], eps=1e-8, weight_decay=0.0,
                       foreach=True), lr_decay_batches=0, lr_rampup_kimg=0,   # the quickstart's lr (2e-4: slower)
        ema=dict(class_name='training.loop.ema.ConstantEMA', beta=0.995), grid_sampler='trigflow',
        mid_t=[math.atan(_QUICKSTART_MID_SIGMA / 0.5)],       # the quickstart's σ 1.5 in radians: 1.2490
        eval_init_metrics=_QUICKSTART_INIT,
        method_kwargs=dict(class_name='training.methods.scm.SCD', teacher=_QUICKSTART_PT, guidance=None,
                           P_mean=-1.0, P_std=1.4, sigma_max=80.0, **dict(_SCM_LOSS, warmup_steps=100))),
    # TCM stage 2 from the quickstart's ECT network (--stage1=<quickstart run>/network-snapshot-000016.pt): EDM's
    # form, in which ECT tunes (its boundary form is only for sampling); its curriculum continues the quickstart's
    # (a stage every 250 steps: 2 ticks of 2 kimg at batch 16).
    'quickstart-tcm': dict(
        _QUICKSTART, arch='ddpmpp', precond='ecm', network_kwargs=dict(_QUICKSTART_NET, sigma_min=0.0),
        transfer='stage1', duration_mimg=0.008, batch=16, grid_sampler='consistency',
        optimizer=dict(class_name='torch.optim.RAdam', lr=1e-4, betas=[0.9, 0.999], eps=1e-8, foreach=True),
        lr_decay_batches=0, lr_rampup_kimg=0, ema=dict(class_name='training.loop.ema.ConstantEMA', beta=0.995),
        mid_t=[_QUICKSTART_MID_SIGMA], eval_init_metrics=_QUICKSTART_INIT,
        method_kwargs=dict(_TCM_LOSS, q=2.0, ratio_limit=0.999, double_steps=250, c=0.0,
                           weighting=dict(class_name='training.methods.loss.InverseGapWeighting'))),
    # MeanFlow from scratch on the quickstart's data: a quickstart-sized MeanFlow U-Net, py-meanflow's v1 times.
    'quickstart-meanflow': dict(
        _QUICKSTART, arch='meanflow', precond='meanflow', network_kwargs=_QUICKSTART_NET, transfer=None,
        duration_mimg=0.032, batch=32,                        # 1000 steps
        optimizer=dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0,
                       foreach=True), lr_decay_batches=0, lr_rampup_kimg=4,
        ema=dict(class_name='training.loop.ema.ConstantEMA', beta=0.999), grid_sampler='meanflow', mid_t=[0.5],
        tick_kimg=4.0, eval_init_metrics=_QUICKSTART_INIT,
        method_kwargs=dict(class_name='training.methods.meanflow.MeanFlow', time_sampler='v1',
                           P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6, ratio=0.75, norm_p=0.75,
                           norm_eps=1e-3)),
}
