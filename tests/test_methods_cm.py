"""Consistency Models training methods (CD, CT, progressive distillation, openai EDM pretraining) on tiny
networks: the loss each method computes, the target network's EMA, the schedules by step, the teacher's mode,
state_dict round trips and the checks made before any work."""

import copy

import numpy as np
import pytest
import torch

import dnnlib
from training.checkpoints import reader
from training.checkpoints import checkpoint
from training.methods import loss_cm
from training import networks
from training.methods import consistency_models as cmm
from training.methods.base import Progress

TINY = dict(img_resolution=8, img_channels=3, label_dim=0, model_type='DhariwalUNet', model_channels=16,
            channel_mult=[1], num_blocks=1, attn_resolutions=[])


def tiny_ecm(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return networks.ECMPrecond(sigma_min=0.002, dropout=dropout, **TINY).train()


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    torch.manual_seed(1)
    teacher = networks.EDMPrecond(dropout=0.1, **TINY)
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pt'
    checkpoint.save_network_snapshot(str(path), teacher)
    return str(path)


def progress(step, batch_size=4, total_steps=100):
    return Progress(cur_nimg=step * batch_size, batch_size=batch_size, total_nimg=total_steps * batch_size,
                    tick_kimg=1.0)


def images(seed=0):
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_cd_loss_is_the_official_draw_order_with_a_frozen_eval_teacher(teacher_file):
    net = tiny_ecm()
    method = cmm.ConsistencyDistillation(teacher=teacher_file, loss_norm='l2')
    method.setup(net, torch.device('cpu'))
    assert not method.teacher.training and not any(p.requires_grad for p in method.teacher.parameters())
    assert method.target.training and not any(p.requires_grad for p in method.target.parameters())
    assert method.schedule(progress(0)) == dict(num_scales=40, target_ema=0.95)
    x0 = images()
    torch.manual_seed(5)
    got = method.loss(net, x0)
    torch.manual_seed(5)
    noise = torch.randn_like(x0)
    indices = torch.randint(0, 39, (4,))
    ref = loss_cm.consistency_loss(net, method.target, x0, noise, indices, 40, teacher=method.teacher)
    np.testing.assert_array_equal(got.detach().numpy(), ref.detach().numpy())


def test_target_follows_the_student_with_the_official_ema():
    net = tiny_ecm()
    method = cmm.ConsistencyTraining(loss_norm='l2', total_steps=100)
    method.setup(net, torch.device('cpu'))
    before = copy.deepcopy(method.target.state_dict())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    scalars = method.schedule(progress(0))
    mu = scalars['target_ema']
    assert (scalars['num_scales'], mu) == (2, pytest.approx(0.95 ** 2, rel=1e-15))
    method.after_step(net, progress(1))
    for name, p in net.named_parameters():
        expected = before[name] * mu + p.detach() * (1 - mu)
        torch.testing.assert_close(method.target.state_dict()[name], expected, rtol=0, atol=1e-7)
    assert method.step == 1


def test_schedule_follows_the_methods_own_step_counter():
    method = cmm.ConsistencyTraining(loss_norm='l2', total_steps=800000)
    method.setup(tiny_ecm(), torch.device('cpu'))
    method.load_state_dict(dict(step=100000, target=method.target.state_dict()))
    # A resumed run with another batch size: the loop's image count would give another step.
    scalars = method.schedule(progress(7, batch_size=64))
    assert (scalars['target_ema'], scalars['num_scales']) == loss_cm.ema_and_scales(
        100000, 'adaptive', 0.95, 'progressive', 2, 200, 800000)


def test_state_dict_round_trip_restores_target_and_step(teacher_file):
    net = tiny_ecm(dropout=0.1)
    method = cmm.ConsistencyDistillation(teacher=teacher_file, loss_norm='l1')
    method.setup(net, torch.device('cpu'))
    for step in range(2):
        method.schedule(progress(step))
        method.loss(net, images(step)).sum().backward()
        with torch.no_grad():
            for p in net.parameters():
                p.sub_(1e-2 * p.grad)
                p.grad = None
        method.after_step(net, progress(step + 1))
    state = method.state_dict()
    fresh = cmm.ConsistencyDistillation(teacher=teacher_file, loss_norm='l1')
    fresh.setup(tiny_ecm(dropout=0.1, seed=3), torch.device('cpu'))
    fresh.load_state_dict(state)
    assert fresh.step == 2
    for key, value in method.target.state_dict().items():
        torch.testing.assert_close(fresh.target.state_dict()[key], value, rtol=0, atol=0)


def test_progressive_distillation_hands_the_student_to_the_next_stage(teacher_file):
    net = tiny_ecm()
    method = cmm.ProgressiveDistillation(teacher=teacher_file, start_scales=8, distill_steps=2, loss_norm='l2')
    method.setup(net, torch.device('cpu'))
    first_teacher = method.teacher
    scales = []
    for step in range(5):
        scales.append(method.schedule(progress(step))['num_scales'])
        loss = method.loss(net, images(step))
        assert loss.shape == (4,) and torch.isfinite(loss).all()
        method.after_step(net, progress(step + 1))
    assert scales == [8, 8, 4, 4, 2]
    assert method.stage == 2 and method.teacher is not first_teacher and not method.teacher.training
    for key, value in net.state_dict().items():
        torch.testing.assert_close(method.teacher.state_dict()[key], value)
    fresh = cmm.ProgressiveDistillation(teacher=teacher_file, start_scales=8, distill_steps=2, loss_norm='l2')
    fresh.setup(tiny_ecm(seed=4), torch.device('cpu'))
    fresh.load_state_dict(method.state_dict())
    assert (fresh.step, fresh.stage) == (5, 2)
    for key, value in method.teacher.state_dict().items():
        torch.testing.assert_close(fresh.teacher.state_dict()[key], value, rtol=0, atol=0)


def test_karras_edm_pretraining_draws_sigma_then_noise():
    torch.manual_seed(0)
    net = networks.EDMPrecond(dropout=0.0, **TINY).train()
    method = cmm.KarrasEDMPretraining()
    x0 = images()
    torch.manual_seed(9)
    got = method.loss(net, x0)
    torch.manual_seed(9)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(4))
    ref = loss_cm.denoising_loss(net, x0, torch.randn_like(x0), sigma, None, 'karras')
    np.testing.assert_array_equal(got.detach().numpy(), ref.detach().numpy())


def test_bad_options_and_teachers_are_refused_before_work(teacher_file, tmp_path):
    with pytest.raises(dnnlib.UserError, match='--loss-norm'):
        cmm.ConsistencyTraining(loss_norm='l3')
    with pytest.raises(dnnlib.UserError, match='--solver'):
        cmm.ConsistencyDistillation(teacher=teacher_file, solver='rk4')
    with pytest.raises(dnnlib.UserError, match='not a schedule'):
        cmm.ConsistencyTraining(target_ema_mode='adaptive', scale_mode='fixed')
    with pytest.raises(dnnlib.UserError, match='--teacher'):
        cmm.ConsistencyDistillation().setup(tiny_ecm(), torch.device('cpu'))
    other = networks.ECMPrecond(**dict(TINY, img_resolution=16))
    with pytest.raises(dnnlib.UserError, match='img_resolution'):
        cmm.ConsistencyDistillation(teacher=teacher_file).setup(other, torch.device('cpu'))
    with pytest.raises(dnnlib.UserError, match='LPIPS'):
        cmm.ConsistencyTraining(loss_norm='lpips', lpips_vgg=str(tmp_path / 'absent.pth')).setup(
            tiny_ecm(), torch.device('cpu'))


def test_openai_teachers_load_and_consistency_forms_are_refused(fixtures_dir, tmp_path):
    import shutil
    source = fixtures_dir / 'openai_cm' / 'tiny_imagenet_like.pt'
    student, _ = reader.load_network(str(source), resolution=16, parameterization='consistency',
                                                 num_head_channels=16)
    teacher = cmm.load_teacher(str(source), student, torch.device('cpu'), num_head_channels=16)
    assert teacher.parameterization == 'edm' and not teacher.training
    released_name = tmp_path / 'cd_imagenet64_l2.pt'
    shutil.copy(source, released_name)
    with pytest.raises(dnnlib.UserError, match='consistency-form network'):
        cmm.load_teacher(str(released_name), student, torch.device('cpu'), num_head_channels=16)
    snapshot = tmp_path / 'student.pt'
    checkpoint.save_network_snapshot(str(snapshot), student)
    with pytest.raises(dnnlib.UserError, match='consistency-form network'):
        cmm.load_teacher(str(snapshot), student, torch.device('cpu'))
