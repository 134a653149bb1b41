"""Presets resolve to the recipes of docs/ECT.md §6 (numbers transcribed here from that table, not from the code)."""

import dataclasses
import json
import math

import pytest
import torch

import dnnlib
from configs import presets

# docs/ECT.md §6, CIFAR-10 column (official run_ecm.sh).
SPEC_CIFAR10 = dict(batch=128, total_mimg=25.6, iters=200_000, tick_kimg=12.8, double=250, q=2, k=8, b=1, c=0.0,
                    P_mean=-1.1, P_std=2.0, dropout=0.20, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, ema=0.9999,
                    mid_t=0.821, url='https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl')


def test_cifar10_ecm_matches_spec():
    o = presets.resolve('cifar10-ecm', dict(data='x'))
    assert o.batch_size == SPEC_CIFAR10['batch']
    assert o.total_kimg == pytest.approx(SPEC_CIFAR10['total_mimg'] * 1000)
    assert o.total_kimg * 1000 / o.batch_size == pytest.approx(SPEC_CIFAR10['iters'])
    loss = o.method_kwargs
    assert o.tick_kimg == SPEC_CIFAR10['tick_kimg'] and loss['double_ticks'] == SPEC_CIFAR10['double']
    # 8 stages over the run: 25.6 Mimg / 12.8 kimg = 2000 ticks, / 250 = 8.
    assert o.total_kimg / o.tick_kimg / loss['double_ticks'] == pytest.approx(8)
    assert loss['class_name'] == 'training.methods.ect.ECT'
    assert (loss['P_mean'], loss['P_std'], loss['c'], loss['sigma_data']) == (-1.1, 2.0, 0.0, 0.5)
    assert loss['mapping'] == dict(class_name='training.methods.loss.SigmoidMapping', q=2, k=8, b=1)
    assert loss['weighting'] == dict(class_name='training.methods.loss.InverseGapWeighting')
    net = o.network_kwargs
    assert net['class_name'] == 'training.networks.ECMPrecond' and net['model_type'] == 'SongUNet'
    assert net['embedding_type'] == 'positional' and net['encoder_type'] == 'standard'   # DDPM++
    assert net['model_channels'] == 128 and net['channel_mult'] == [2, 2, 2] and net['dropout'] == 0.2
    assert o.dataset_kwargs['use_labels'] is False and o.dataset_kwargs['xflip'] is False   # uncond, no augmentation
    opt = o.optimizer_kwargs
    assert opt['class_name'] == 'torch.optim.RAdam' and opt['lr'] == 1e-4
    assert tuple(opt['betas']) == (0.9, 0.999) and opt['eps'] == 1e-8
    assert o.lr_kwargs['decay_batches'] == 0 and o.lr_kwargs['rampup_kimg'] == 0
    assert o.ema_kwargs == dict(class_name='training.loop.ema.ConstantEMA', beta=0.9999)
    assert o.mid_t == [0.821] and o.transfer == SPEC_CIFAR10['url']
    json.dumps(o.to_dict())   # training_options.json must be writable
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.batch_size = 64   # options are frozen: one source of truth for the whole run


def test_cifar10_one_gpu_hour_matches_spec():
    o = presets.resolve('cifar10-ecm-1gpu-hour', dict(data='x'))
    assert o.method_kwargs['mapping']['q'] == 256 and o.method_kwargs['double_ticks'] is None   # never doubles
    assert o.ema_kwargs['beta'] == 0.9993 and o.max_hours == 1.0
    assert o.batch_size == 128 and o.method_kwargs['P_mean'] == -1.1 and o.method_kwargs['P_std'] == 2.0
    assert o.network_kwargs['dropout'] == 0.2 and o.optimizer_kwargs['lr'] == 1e-4


def test_edm_pretrain_preset():
    o = presets.resolve('cifar10-edm-pretrain', dict(data='x'))
    # docs/ECT.md §3: diffusion pretraining uses the EDM loss with P_mean -1.2, P_std 1.2.
    # EDM's train.py for CIFAR-10 (typed here from it): --augment=0.12 with xflip 1e8, yflip 1, scale 1, rotate_frac 1,
    # aniso 1, translate_frac 1, and the network's augment_dim 9.
    edm_augment = dict(class_name='training.data.augment.AugmentPipe', p=0.12, xflip=1e8, yflip=1, scale=1,
                       rotate_frac=1, aniso=1, translate_frac=1)
    assert o.method_kwargs == dict(class_name='training.methods.edm.EDM', P_mean=-1.2, P_std=1.2, sigma_data=0.5,
                                   augment_kwargs=edm_augment)
    assert o.network_kwargs['augment_dim'] == 9
    assert o.transfer is None and o.grid_sampler == 'edm'
    assert o.ema_kwargs['class_name'] == 'training.loop.ema.HalfLifeEMA' and o.ema_kwargs['halflife_kimg'] == 500
    # --augment=P sets p; --augment=0 turns the pipe and the network's augment labels off; out of [0, 1] is refused.
    o = presets.resolve('cifar10-edm-pretrain', dict(data='x', augment_p=0.2))
    assert o.method_kwargs['augment_kwargs'] == dict(edm_augment, p=0.2) and o.network_kwargs['augment_dim'] == 9
    o = presets.resolve('cifar10-edm-pretrain', dict(data='x', augment_p=0.0))
    assert o.method_kwargs.get('augment_kwargs') is None and 'augment_dim' not in o.network_kwargs
    with pytest.raises(dnnlib.UserError, match='--augment'):
        presets.resolve('cifar10-edm-pretrain', dict(data='x', augment_p=1.5))
    # ECT's recipes have no augmentation: the ECT method takes none.
    assert 'augment_kwargs' not in presets.resolve('cifar10-ecm', dict(data='x')).method_kwargs


def test_overrides_and_components_build():
    o = presets.resolve('cifar10-ecm', dict(data='x', q=4, c=0.06, weighting='edm2', mapping='constant', lr=2e-4,
                                            ema_beta=0.999, precision='bf16', lr_decay_batches=2000))
    assert o.method_kwargs['mapping'] == dict(class_name='training.methods.loss.ConstantMapping', q=4)
    assert o.method_kwargs['weighting']['class_name'] == 'training.methods.loss.InverseSquareWeighting'
    assert o.optimizer_kwargs['lr'] == 2e-4 and o.ema_kwargs['beta'] == 0.999 and o.precision == 'bf16'
    method = dnnlib.util.construct_class_by_name(**o.method_kwargs)
    assert method.loss_fn.c == 0.06 and method.loss_fn.mapping.q == 4
    schedule = dnnlib.util.construct_class_by_name(**o.lr_kwargs)
    assert schedule(8000 * 128, 128) == pytest.approx(1 / math.sqrt(4))


@pytest.mark.parametrize('overrides, flag', [
    (dict(batch=-1), '--batch'), (dict(dropout=1.5), '--dropout'), (dict(precision='fp8'), '--precision'),
    (dict(weighting='bogus'), '--weighting'), (dict(mid_t=[100.0]), '--mid-t'), (dict(arch='unet'), '--arch'),
    (dict(metrics=['fid50k_full']), '--metrics'), (dict(nonsense=1), 'nonsense'),
])
def test_bad_overrides(overrides, flag):
    with pytest.raises(dnnlib.UserError, match=flag):
        presets.resolve('cifar10-ecm', dict(data='x', **overrides))


def test_unknown_preset():
    with pytest.raises(dnnlib.UserError, match='--preset'):
        presets.resolve('imagenet64-ecm-xxl', {})


def test_method_kwargs_name_any_method():
    toy = dict(class_name='training.methods.edm.EDM', P_mean=-1.0)
    o = presets.resolve('cifar10-ecm', dict(data='x', method_kwargs=toy, q=4))
    assert o.method_kwargs == toy   # used as given: the ECT flags do not apply to another method
    with pytest.raises(dnnlib.UserError, match='method_kwargs'):
        presets.resolve('cifar10-ecm', dict(data='x', method_kwargs=dict(P_mean=-1.0)))


@pytest.mark.parametrize('cls_name,max_ulps', [('Adam', 0), ('RAdam', 4)])
def test_foreach_optimizer_matches_for_loop(cls_name, max_ulps):
    """The presets' foreach=True optimisers against torch's per-parameter loop: Adam bit for bit, RAdam within a
    few float32 ulps (its multi-tensor path orders the rectification arithmetic differently)."""
    cls = getattr(torch.optim, cls_name)
    assert presets.resolve('cifar10-ecm', dict(data='x', transfer='none')).optimizer_kwargs['foreach'] is True
    torch.manual_seed(0)
    start = [torch.randn(shape) for shape in [(8, 4, 3, 3), (8,), (5, 7)]]
    results = []
    for foreach in (False, True):
        params = [p.clone().requires_grad_() for p in start]
        optimizer = cls(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        results.append(params)
    for a, b in zip(*results):
        ulp = torch.finfo(torch.float32).eps * a.detach().abs().clamp(min=1e-3)
        assert ((a - b).abs() <= max_ulps * ulp).all()


def test_tf32_switches_follow_the_precision():
    """TF32 only for --precision=tf32 (the official ImageNet-64 loop's arithmetic; the ECT presets' 'auto' is bf16
    on CUDA and fp32 on the CPU, tests/test_gpu_path.py)."""
    from training.loop import runtime
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for precision, tf32 in [('tf32', True), ('fp32', False), ('bf16', False), ('fp16', False)]:
            runtime.setup_runtime(0, precision)
            assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
