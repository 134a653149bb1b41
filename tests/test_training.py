"""The training loop and train.py: gradient accumulation, DDP, exact resume, pre-emption, CLI validation.

Tiny SongUNet (16 channels, one level, no attention) at 8x8 on tiny synthetic EDM-format datasets.
"""

import copy
import json
import os
import pathlib
import re
import signal
import subprocess

import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from configs import presets
from conftest import write_random_dataset
from multiprocess import free_port, run_ranks
from torch_utils import distributed as dist
from torch_utils import training_stats
from training.checkpoints import checkpoint
from training.loop import runtime
from training.loop import training_loop as tl
from training.loop.callbacks import Callback
from training.checkpoints.checkpoint import TrainingState
from training.methods.ect import ECT
from training.methods.toy import ToyDenoising

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_NET = dict(model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
TICK_KIMG = 0.008   # 8 images: two steps of batch 4 per tick




@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_random_dataset(tmp_path_factory.mktemp('data'))


def tiny_options(data, **overrides):
    flat = dict(data=data, batch=4, tick_kimg=TICK_KIMG, duration_mimg=3 * TICK_KIMG / 1000, double_ticks=1,
                transfer='none', network_kwargs=TINY_NET, workers=0, snap_ticks=0, dump_ticks=0, sample_ticks=0)
    flat.update(overrides)
    return presets.resolve('cifar10-ecm', flat)


class FixedNoiseLoss:
    """A deterministic per-sample loss (a method's `loss` signature): sigma fixed per image from its pixels."""

    def __call__(self, net, images, labels=None):
        sigma = (images.mean(dim=[1, 2, 3], keepdim=True).abs() + 0.5)
        out = net(images + sigma * torch.cos(images * 7), sigma, labels, boundary=False)
        return (out - images).square().flatten(1).sum(1)


class SignallingECT(ECT):
    """ECT whose loss sends this process SIGUSR1 during its `signal_at`-th call (a cluster pre-emption)."""

    def __init__(self, signal_at=3, **kwargs):
        super().__init__(**kwargs)
        self.signal_at = signal_at
        self.calls = 0

    def loss(self, net, images, labels=None):
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().loss(net, images, labels)


class TargetMethod(ToyDenoising):
    """The toy method plus a network of its own: a target EMA of the trained net (mu per step), used as the
    denoiser of a second loss term, saved in training states and exported with every snapshot."""

    def __init__(self, mu=0.5, **kwargs):
        super().__init__(**kwargs)
        self.mu = mu
        self.target = None

    def setup(self, net, device):
        super().setup(net, device)
        self.target = copy.deepcopy(net).eval().requires_grad_(False).to(device)

    def loss(self, net, images, labels=None):
        sigma = torch.full([images.shape[0], 1, 1, 1], 0.5)
        with torch.no_grad():
            target = self.target(images + sigma * torch.randn_like(images), sigma, labels, **self.net_kwargs)
        own = net(images + sigma * torch.randn_like(images), sigma, labels, **self.net_kwargs)
        return super().loss(net, images, labels) + (own - target).square().flatten(1).sum(1)

    def after_step(self, net, progress):
        with torch.no_grad():
            for t, p in zip(self.target.parameters(), net.parameters()):
                t.lerp_(p.detach(), 1 - self.mu)

    def state_dict(self):
        return dict(target=self.target.state_dict())

    def load_state_dict(self, state):
        self.target.load_state_dict(state['target'])

    def snapshot_networks(self):
        return {'-target': self.target}


class ContinuingMethod(ToyDenoising):
    """The toy method continuing an earlier run of `earlier_steps` optimiser steps, as TCM continues stage 1."""

    def __init__(self, earlier_steps=0, **kwargs):
        super().__init__(**kwargs)
        self.earlier_steps = earlier_steps

    def steps_before(self):
        return self.earlier_steps


def test_lr_schedule_and_ema_count_the_steps_a_method_continues(data_dir, tmp_path, monkeypatch):
    """Method.steps_before() = K: the inverse-sqrt learning rate and the power-function EMA of step k are those of
    step K + k (NVlabs/TCM's stage 2), written out independently; the run's own progress still starts at 0."""
    K, decay, batch, gamma = 300, 100, 4, 16.97
    lrs = []
    monkeypatch.setattr(tl, 'training_step', lambda *args: lrs.append(args[7]))   # the loop's lr, no step
    for earlier in (0, K):
        method = dict(class_name='test_training.ContinuingMethod', earlier_steps=earlier)
        options = tiny_options(data_dir, method_kwargs=method, lr_decay_batches=decay,
                               ema=dict(class_name='training.loop.ema.PowerFunctionEMA', stds=[0.05]))
        trainer = tl.Trainer(options, str(tmp_path / str(earlier)))
        ema_net, = [net for _, net in trainer.run_ctx.state.ema.get()]
        with torch.no_grad():
            ema_net.model.enc['8x8_conv'].weight.zero_()   # its only distance from the unchanged trained net
        gammas = trainer.run_ctx.state.ema.gammas
        assert gammas == pytest.approx([gamma], rel=1e-3)
        lrs.clear()
        trainer.step()
        assert trainer.run_ctx.state.progress.cur_nimg == batch
        base = options.optimizer_kwargs['lr']
        assert lrs == [pytest.approx(base / max((earlier + 0) / decay, 1) ** 0.5)]
        beta = (1 - 1 / (earlier + 1)) ** (gammas[0] + 1)    # power-function EMA after step `earlier` + 1
        weight = trainer.run_ctx.state.net.model.enc['8x8_conv'].weight
        torch.testing.assert_close(ema_net.model.enc['8x8_conv'].weight, (1 - beta) * weight)


def build_net(data, seed=0):
    options = tiny_options(data)
    dataset = runtime.build_dataset(options.dataset_kwargs)
    return dataset, runtime.build_network(dict(options.network_kwargs, dropout=0.0), dataset, None, torch.device('cpu'), seed)


def grads_after(net, dataset, batch_size, batch_gpu):
    net.zero_grad(set_to_none=True)
    batch_gpu, rounds = runtime.check_batch(batch_size, batch_gpu, dist.get_world_size())
    iterator = runtime.build_data_iterator(dataset, dict(num_workers=0), batch_gpu, 0, 0, torch.device('cpu'))
    tl.accumulate_gradients(net, FixedNoiseLoss(), iterator, rounds, batch_size, torch.device('cpu'))
    return [p.grad.detach().clone() for p in net.parameters()]


def test_gradient_accumulation_is_invariant(data_dir):
    dataset, net = build_net(data_dir)
    whole = grads_after(net, dataset, 8, None)
    split = grads_after(net, dataset, 8, 2)   # 4 rounds of 2
    assert sum(float(g.abs().sum()) for g in whole) > 0
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # And equals the float64 gradient of mean(per-sample losses) over the batch, computed independently.
    net64 = net.double()
    net64.zero_grad(set_to_none=True)
    images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(len(dataset))]).double() / 127.5 - 1
    order = runtime.InfiniteSampler(len(dataset), seed=0)
    idx = [next(it) for it in [iter(order)] for _ in range(8)]
    FixedNoiseLoss()(net64, images[idx]).mean().backward()
    for a, p in zip(whole, net64.parameters()):
        torch.testing.assert_close(a.double(), p.grad, rtol=1e-3, atol=1e-5)


def _ddp_worker(rank, port, data, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init()
    dataset, net = build_net(data)
    ddp = runtime.wrap_ddp(net, torch.device('cpu'), False)
    batch_gpu, rounds = runtime.check_batch(8, 2, dist.get_world_size())
    iterator = runtime.build_data_iterator(dataset, dict(num_workers=0), batch_gpu, 0, 0, torch.device('cpu'))
    tl.accumulate_gradients(ddp, FixedNoiseLoss(), iterator, rounds, 8, torch.device('cpu'))
    torch.save([p.grad for p in net.parameters()], os.path.join(out_dir, f'grads{rank}.pt'))
    torch.distributed.destroy_process_group()


def test_two_process_ddp_equals_single_process(data_dir, tmp_path):
    run_ranks(_ddp_worker, (free_port(), data_dir, str(tmp_path)))
    dataset, net = build_net(data_dir)
    single = grads_after(net, dataset, 8, None)
    for rank in range(2):
        for a, b in zip(single, torch.load(tmp_path / f'grads{rank}.pt')):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def run_loop(run_dir, data, **kwargs):
    os.makedirs(run_dir, exist_ok=True)
    options = tiny_options(data, dropout=0.2).replace(**kwargs)
    return tl.training_loop(options, str(run_dir))


def final_weights(run_dir):
    state = TrainingState.read(os.path.join(run_dir, 'training-state-latest.pt'))
    return state, {**{f'net.{k}': v for k, v in state['net'].items()},
                   **{f'ema.{k}': v for k, v in state['ema'][''].items()}}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp('run_a')
    assert run_loop(run_dir, data_dir, sample_ticks=3, snapshot_ticks=3) == 'done'
    return run_dir


def assert_same_weights(run_a, run_b):
    state_a, weights_a = final_weights(run_a)
    state_b, weights_b = final_weights(run_b)
    assert state_a['progress']['cur_nimg'] == state_b['progress']['cur_nimg'] == 24
    assert state_a['progress']['cur_tick'] == state_b['progress']['cur_tick'] == 3
    assert state_a['method']['stage'] == state_b['method']['stage'] == 2   # double_ticks=1: one stage per tick
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, rtol=0, atol=1e-6, msg=name)


def test_uninterrupted_run_outputs(uninterrupted):
    files = os.listdir(uninterrupted)
    assert {'network-snapshot-000000.pt', 'network-snapshot-latest.pt', 'training-state-latest.pt',
            'grid-000000-1step.png', 'grid-000000-2step.png', 'stats.jsonl'} <= set(files)
    net, meta = checkpoint.load_network_snapshot(os.path.join(uninterrupted, 'network-snapshot-latest.pt'))
    assert not net.training and meta['stage'] == 2 and meta['ema'] == '' and meta['mid_t'] == [0.821]
    with PIL.Image.open(os.path.join(uninterrupted, 'grid-000000-1step.png')) as grid:
        assert grid.size == (64, 64)   # 64 images of 8x8 in an 8x8 grid
    lines = pathlib.Path(uninterrupted, 'stats.jsonl').read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)['Loss/loss']['num'] == 8 for line in lines)


def test_resume_at_tick_boundary_is_exact(uninterrupted, data_dir, tmp_path, capsys):
    first = tmp_path / 'first'
    assert run_loop(first, data_dir, total_kimg=TICK_KIMG) == 'done'
    second = tmp_path / 'second'
    capsys.readouterr()
    assert run_loop(second, data_dir, resume_state=str(first / 'training-state-latest.pt')) == 'done'
    assert_same_weights(uninterrupted, second)
    out = capsys.readouterr().out
    # The stage is a function of progress: the resumed run starts in stage 1 and logs the change to 2.
    assert 'Curriculum stage 1 at 0.0 kimg' in out and 'Curriculum stage 2 at 0.0 kimg' in out
    assert 'Curriculum stage 0' not in out
    status = [line for line in out.splitlines() if line.startswith('tick ')]
    assert len(status) == 2 and all(f in status[0] for f in ('kimg', 'loss', 'sec/tick', 'sec/kimg', 'img/s',
                                                              'maintenance', 'cpumem', 'gpumem', 'stage 1'))


def test_preemption_signal_writes_state_and_resume_is_exact(uninterrupted, data_dir, tmp_path):
    first = tmp_path / 'first'
    method = dict(tiny_options(data_dir).method_kwargs, class_name='test_training.SignallingECT', signal_at=3)
    assert run_loop(first, data_dir, method_kwargs=method) == 'preempted'
    state = TrainingState.read(first / 'training-state-latest.pt')
    assert state['progress']['cur_nimg'] == 12 and state['progress']['tick_start_nimg'] == 8   # mid-tick
    assert not isinstance(signal.getsignal(signal.SIGUSR1), runtime.PreemptionHandler)   # handler uninstalled
    second = tmp_path / 'second'
    assert run_loop(second, data_dir, resume_state=str(first / 'training-state-latest.pt')) == 'done'
    assert_same_weights(uninterrupted, second)


def test_method_with_its_own_network_resumes_exactly_and_exports_it(data_dir, tmp_path):
    method = dict(class_name='test_training.TargetMethod', mu=0.5, sigma_start=10.0, sigma_end=10.0)
    runs = {}
    for name, kwargs in [('whole', {}), ('first', dict(total_kimg=TICK_KIMG))]:
        runs[name] = tmp_path / name
        assert run_loop(runs[name], data_dir, method_kwargs=method, snapshot_ticks=3, **kwargs) == 'done'
    second = tmp_path / 'second'
    assert run_loop(second, data_dir, method_kwargs=method,
                    resume_state=str(runs['first'] / 'training-state-latest.pt')) == 'done'
    whole, resumed = (TrainingState.read(d / 'training-state-latest.pt') for d in (runs['whole'], second))
    first = TrainingState.read(runs['first'] / 'training-state-latest.pt')
    assert whole['progress']['cur_nimg'] == resumed['progress']['cur_nimg'] == 24
    for name, value in whole['method']['target'].items():
        torch.testing.assert_close(resumed['method']['target'][name], value, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(first['method']['target'][k], v) for k, v in whole['method']['target'].items())
    target, meta = checkpoint.load_network_snapshot(runs['whole'] / 'network-snapshot-latest-target.pt')
    assert meta['ema'] == '-target'
    for name, value in target.state_dict().items():
        assert torch.equal(value, whole['method']['target'][name]), name


class RecordingCallback(Callback):
    """Records the hooks the loop calls, with the progress each one sees."""

    def __init__(self):
        self.events = []

    def on_start(self, run):
        self.events.append(('start', run.state.progress.cur_nimg))

    def on_tick(self, run, stopping):
        self.events.append(('tick', run.state.progress.cur_tick, run.state.progress.cur_nimg, stopping))

    def on_stats(self, run, stats):
        self.events.append(('stats', stats['Loss/loss']['num'], stats['Progress/stage']['mean']))

    def on_end(self, run, outcome):
        self.events.append(('end', outcome, os.path.isfile(os.path.join(run.run_dir, 'training-state-latest.pt'))))


def test_callbacks_see_every_tick_in_order(data_dir, tmp_path):
    callback = RecordingCallback()
    options = tiny_options(data_dir)
    assert tl.training_loop(options, str(tmp_path), callbacks=[callback]) == 'done'
    assert callback.events == [('start', 0),
                               ('tick', 1, 8, False), ('stats', 8, 0.0),
                               ('tick', 2, 16, False), ('stats', 8, 1.0),
                               ('tick', 3, 24, True), ('stats', 8, 2.0),
                               ('end', 'done', True)]


def test_corrupt_state_is_a_clear_error(uninterrupted, tmp_path):
    data = (pathlib.Path(uninterrupted) / 'training-state-latest.pt').read_bytes()
    truncated = tmp_path / 'training-state-000001.pt'
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(dnnlib.UserError, match='training-state-000001.pt'):
        TrainingState.read(truncated)
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a state at all')
    with pytest.raises(dnnlib.UserError, match='garbage.pt'):
        TrainingState.read(garbage)


def test_fp16_scaler_skips_step_with_inf_gradients():
    net = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    scaler.scale(net(torch.ones(1, 3)).sum()).backward()
    net.weight.grad[0, 0] = float('inf')
    tl.optimizer_step(net, optimizer, 0.1, scaler)
    for a, b in zip(before, net.parameters()):
        assert torch.equal(a, b)                     # step skipped, not applied with a zeroed entry
    assert scaler.get_scale() == 512.0               # and the scale backed off
    # Without a scaler a non-finite entry is replaced (nan -> 0, inf -> 1e5) and the step is taken.
    optimizer.zero_grad()
    net(torch.ones(1, 3)).sum().backward()
    net.weight.grad[0, 0] = float('nan')
    net.weight.grad[0, 1] = float('inf')
    tl.optimizer_step(net, optimizer, 0.1)
    net.requires_grad_(False)
    assert torch.all(torch.isfinite(net.weight))
    assert float(net.weight[0, 0]) == pytest.approx(float(before[0][0, 0]))
    assert float(net.weight[0, 1]) == pytest.approx(float(before[0][0, 1]) - 0.1 * 1e5)


@pytest.mark.parametrize('max_norm', [None, 1e6, 0.5])
def test_gradient_clipping_scales_the_whole_gradient(max_norm):
    """--grad-clip: the update is lr·g·min(1, c/(‖g‖ + 1e-6)) with ‖g‖ the norm of every gradient together (torch's
    clip_grad_norm_, as NVlabs/FastGen clips), written out in float64; no clipping without a norm or below it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(5, 3)).square().sum().backward()
    before = [p.detach().double().clone() for p in net.parameters()]
    grads = [p.grad.detach().double().clone() for p in net.parameters()]
    norm = sum(float(g.square().sum()) for g in grads) ** 0.5
    assert norm > 0.5                                                # the 0.5 case clips
    collector = training_stats.Collector(regex='Progress/grad_norm', keep_previous=False)
    collector.update()                                               # what earlier tests reported is not counted
    tl.optimizer_step(net, optimizer, 0.1, grad_clip_norm=max_norm)
    scale = 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))
    for b, g, p in zip(before, grads, net.parameters()):
        torch.testing.assert_close(p.detach().double(), b - 0.1 * scale * g, rtol=0, atol=1e-7)
    collector.update()
    reported = collector.as_dict().get('Progress/grad_norm', dict(num=0))   # known from an earlier test: num 0
    assert reported['num'] == (0 if max_norm is None else 1)
    if max_norm is not None:
        assert reported['mean'] == pytest.approx(norm, rel=1e-6)


def test_learning_rate_schedule():
    schedule = tl.LearningRateSchedule(decay_batches=2000, rampup_kimg=0)
    assert schedule(0, 128) == 1.0
    assert schedule(2000 * 128, 128) == 1.0
    assert schedule(8000 * 128, 128) == pytest.approx(0.5)          # 1/sqrt(8000/2000)
    rampup = tl.LearningRateSchedule(decay_batches=0, rampup_kimg=10)
    assert rampup(5000, 128) == pytest.approx(0.5) and rampup(20000, 128) == 1.0


# ----------------------------------------------------------------------------------------------------------
# train.py


def invoke(args):
    result = CliRunner().invoke(train.main, args)
    return result.exit_code, result.output


def base_args(data, outdir):
    return ['--preset=cifar10-ecm', f'--data={data}', f'--outdir={outdir}', '--transfer=none', '--dry-run']


def test_dry_run_writes_options(data_dir, tmp_path):
    code, output = invoke(base_args(data_dir, tmp_path) + ['--mid_t=1.0,0.5', '--P_mean=-1.0', '--double=never'])
    assert code == 0, output
    (run_dir,) = list(tmp_path.iterdir())
    assert re.fullmatch(r'00000-data\d*-uncond-ecm-gpus1-batch128-fp32', run_dir.name)
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['network_kwargs']['class_name'] == 'training.networks.ECMPrecond'
    assert options['method_kwargs']['class_name'] == 'training.methods.ect.ECT'
    assert options['method_kwargs']['mapping']['class_name'] == 'training.methods.loss.SigmoidMapping'
    assert options['optimizer_kwargs']['class_name'] == 'torch.optim.RAdam'
    assert options['ema_kwargs'] == dict(class_name='training.loop.ema.ConstantEMA', beta=0.9999)
    assert options['mid_t'] == [1.0, 0.5] and options['method_kwargs']['P_mean'] == -1.0
    assert options['method_kwargs']['double_ticks'] is None
    assert options['detector_files'] == {}   # the official detectors


def test_dry_run_downloads_nothing(data_dir, tmp_path, monkeypatch):
    """cifar10-ecm transfers from EDM's checkpoint URL: a dry run resolves, prints and saves the options offline."""
    def offline(*args, **kwargs):
        raise AssertionError(f'a dry run opened {args[0] if args else kwargs}')
    monkeypatch.setattr(dnnlib.util, 'open_url', offline)
    code, output = invoke(['--preset=cifar10-ecm', f'--data={data_dir}', f'--outdir={tmp_path}', '--dry-run'])
    assert code == 0, output
    assert f'--transfer: {presets.CIFAR10_VP_URL} is not downloaded by a dry run' in output
    (run_dir,) = list(tmp_path.iterdir())
    assert json.loads((run_dir / 'training_options.json').read_text())['transfer'] == presets.CIFAR10_VP_URL
    assert f'"transfer": "{presets.CIFAR10_VP_URL}"' in output


@pytest.mark.parametrize('flag, expected', [([], None), (['--grad-clip=10'], 10.0), (['--grad-clip=0'], None),
                                            (['--gclip=5'], 5.0)])   # NVlabs/TCM's spelling (ct_train.py:136)
def test_grad_clip_flag_reaches_the_options(data_dir, tmp_path, flag, expected):
    code, output = invoke(base_args(data_dir, tmp_path / 'out') + flag)
    assert code == 0, output
    (run_dir,) = list((tmp_path / 'out').iterdir())
    assert json.loads((run_dir / 'training_options.json').read_text())['grad_clip_norm'] == expected


def test_dry_run_records_detector_files(data_dir, tmp_path):
    det = tmp_path / 'inception.pkl'
    det.write_bytes(b'\x80')
    code, output = invoke(base_args(data_dir, tmp_path / 'out') + [f'--detector={det}', '--dinov2=https://x.org/d.pth'])
    assert code == 0, output
    (run_dir,) = list((tmp_path / 'out').iterdir())
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['detector_files'] == dict(detector=str(det), dinov2='https://x.org/d.pth')


@pytest.mark.parametrize('extra, message', [
    (['--batch=-4'], '--batch'),
    (['--batch=10', '--batch-gpu=4'], '--batch'),
    (['--preset=nope'], '--preset'),
    (['--data=/definitely/not/here'], '--data'),
    (['--cond=1'], '--cond'),
    (['--transfer=/definitely/not/here.pkl'], '--transfer'),
    (['--double=often'], '--double'),
    (['--metrics=nope', '--eval-every=1'], '--metrics'),
    (['--resume=/definitely/not/here.pt'], '--resume'),
    (['--arch-kwargs=[1]'], '--arch-kwargs'),
    (['--detector=/definitely/not/here.pkl'], '--detector'),
    (['--grad-clip=-1'], '--grad-clip'),
    (['--loss=edm', '--arch-kwargs={"model_channels": 16}', '--P_mean=nan'], 'method_kwargs'),
])
def test_bad_values_give_one_line_errors(data_dir, tmp_path, extra, message):
    code, output = invoke(base_args(data_dir, tmp_path) + extra)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: ') and message in lines[0], output
    assert not any(tmp_path.iterdir())   # nothing written before validation passed


def test_transfer_resolution_mismatch(data_dir, tmp_path):
    src = runtime.build_network(dict(tiny_options(data_dir).network_kwargs), type('D', (), dict(
        resolution=16, num_channels=3, label_dim=0))(), None, torch.device('cpu'))
    path = tmp_path / 'net16.pt'
    checkpoint.save_network_snapshot(path, src)
    code, output = invoke(base_args(data_dir, tmp_path / 'out')[:-2] + [f'--transfer={path}', '--dry-run'])
    assert code == 2 and '--transfer' in output and "'img_resolution': 16" in output, output


def test_transfer_copies_weights(data_dir, tmp_path):
    dataset, src = build_net(data_dir, seed=1)
    path = tmp_path / 'net8.pt'
    checkpoint.save_network_snapshot(path, src)
    net = runtime.build_network(dict(tiny_options(data_dir).network_kwargs), dataset, str(path), torch.device('cpu'), seed=2)
    fresh = runtime.build_network(dict(tiny_options(data_dir).network_kwargs), dataset, None, torch.device('cpu'), seed=2)
    assert net.training
    for (name, a), b, c in zip(net.state_dict().items(), src.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(b, c) for b, c in zip(src.state_dict().values(), fresh.state_dict().values()))


def test_resume_from_corrupt_state_cli(data_dir, tmp_path):
    bad = tmp_path / 'training-state-000000.pt'
    bad.write_bytes(b'PK\x03\x04 truncated')
    code, output = invoke(base_args(data_dir, tmp_path / 'out')[:-1] + [f'--resume={bad}', '--duration=0.000004',
                                                                         '--batch=4', '--arch-kwargs=' + json.dumps(TINY_NET)])
    assert code == 2 and 'training-state-000000.pt' in output and len(output.strip().splitlines()) == 1, output


def test_resume_auto_continues_same_run_dir(data_dir, tmp_path):
    args = base_args(data_dir, tmp_path)[:-1] + ['--batch=4', '--tick=0.004', '--duration=0.000004', '--workers=0',
                                                  '--sample-every=0', '--arch-kwargs=' + json.dumps(TINY_NET)]
    code, output = invoke(args + ['--resume=auto'])
    assert code == 0, output
    (run_dir,) = list(tmp_path.iterdir())
    assert (run_dir / 'training-state-latest.pt').is_file() and 'Training done.' in (run_dir / 'log.txt').read_text()
    code, output = invoke(args + ['--resume=auto', '--duration=0.000008'])
    assert code == 0, output
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.name]   # continued in place, no new directory
    state = TrainingState.read(run_dir / 'training-state-latest.pt')
    assert state['progress']['cur_nimg'] == 8
    assert 'Resumed from' in (run_dir / 'log.txt').read_text()


def test_tensorboard_flag(data_dir, tmp_path):
    code, output = invoke(base_args(data_dir, tmp_path) + ['--tensorboard'])
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert code == 2 and 'pip install tensorboard' in output and len(output.strip().splitlines()) == 1, output
    else:
        assert code == 0, output


def test_run_ecm_usage():
    result = subprocess.run(['bash', str(REPO_ROOT / 'run_ecm.sh')], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith('usage: bash run_ecm.sh <NGPUs> <PORT>')
    assert b'\r' not in (REPO_ROOT / 'run_ecm.sh').read_bytes()


def test_metric_detectors_are_loaded_once_per_run(monkeypatch, tmp_path):
    from metrics import metric_main
    from metrics.scoring import evaluate_metrics
    loads, used = [], []
    monkeypatch.setattr(metric_main, 'load_metric_detector',
                        lambda metric, url=None, device='cpu': loads.append((metric, url)) or object())
    monkeypatch.setattr(metric_main, 'calc_metric', lambda metric, net, detector=None, **kw: used.append(detector) or kw)
    monkeypatch.setattr(metric_main, 'report_metric', lambda *args, **kw: None)
    monkeypatch.setattr(metric_main, 'format_result', lambda result: '')
    cache = {}
    nets = [('', torch.nn.Identity()), ('-b0.99', torch.nn.Identity())]
    for kimg in (8, 16):   # two evaluations of two EMA nets with two metrics sharing the Inception detector
        evaluate_metrics(['fid50k_full', 'two_step_fid50k_full'], nets, 'ref.npz', [0.821], str(tmp_path),
                         f'network-snapshot-{kimg:06d}', 'cpu', detectors=cache,
                         detector_files=dict(detector='inception.pkl', dinov2='dinov2.pth'))
    assert loads == [('fid50k_full', 'inception.pkl')] and len(used) == 8 and all(d is used[0] for d in used)
