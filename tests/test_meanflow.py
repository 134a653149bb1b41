"""MeanFlow (docs/MEANFLOW.md) against py-meanflow run on the CPU (tests/data/meanflow/README.md): the time samplers'
draws, the U-Net's initialisation and outputs through the state-dict mapping, the JVP target, the per-sample
losses and their gradients (dropout on), and the one-step sampler; plus the method's checks and wiring."""

import argparse
import copy
import json
import pathlib

import numpy as np
import pytest
import torch

import dnnlib
from configs import presets
from training.checkpoints import checkpoint
from training.checkpoints.meanflow_state import load_meanflow_checkpoint, meanflow_to_ours, ours_to_meanflow
from training.methods.meanflow import MeanFlow
from training.methods.meanflow_loss import average_velocity_target, meanflow_loss, sample_times
from training.networks.meanflow_unet import MeanFlowPrecond, MeanFlowUNet
from training.sampling.samplers_meanflow import make_meanflow_steps, meanflow_sampler

DATA = pathlib.Path(__file__).parent / 'data' / 'meanflow' / 'meanflow.npz'
TOL = 1e-5      # relative error of whole float32 tensors


@pytest.fixture(scope='module')
def ref():
    data = np.load(DATA)
    arrays = {k: torch.from_numpy(data[k]) for k in data.files if k != 'meta'}
    return dnnlib.EasyDict(arrays, meta=json.loads(bytes(data['meta']).decode()))


def _rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def _unet_kwargs(ref):
    kwargs = dict(ref.meta['unet'])
    kwargs['img_channels'] = kwargs.pop('in_channels')
    del kwargs['out_channels']
    return kwargs


def _official_weights(ref):
    return {k[2:]: v.float() for k, v in ref.items() if k.startswith('w.')}


@pytest.fixture
def net(ref):
    """Our network holding py-meanflow's fixture weights, through the mapping (train mode)."""
    torch.manual_seed(0)
    net = MeanFlowPrecond(**_unet_kwargs(ref))
    checkpoint.load_state_strict(net, meanflow_to_ours(_official_weights(ref), network=None), 'fixture')
    return net.train()


def _times_kwargs(sampler):
    return {k: v for k, v in sampler.items() if k != 'tr_sampler'}


def _flat_grad(net):
    grads = {f'model.{k}': p.grad if p.grad is not None else torch.zeros_like(p)
             for k, p in net.model.named_parameters()}
    return torch.cat([g.flatten() for g in ours_to_meanflow(grads).values()])

#----------------------------------------------------------------------------
# Time samplers: the same seed gives py-meanflow's (t, r), r = t on exactly the same samples.

@pytest.mark.parametrize('version', ['v0', 'v1'])
def test_time_samplers_match_py_meanflow(ref, version):
    sampler = ref.meta[version]
    torch.manual_seed(ref.meta['seeds']['times'])
    t, r = sample_times(version, ref.meta['num_times'], 'cpu', **_times_kwargs(sampler))
    want_t, want_r = ref[f'times_{version}_t'], ref[f'times_{version}_r']
    assert _rel(t, want_t) < 1e-6 and _rel(r, want_r) < 1e-6
    assert torch.equal(t == r, want_t == want_r)
    assert bool(((0 <= r) & (r <= t) & (t <= 1)).all())

#----------------------------------------------------------------------------
# The U-Net: initial weights drawn as py-meanflow draws them, outputs through the mapping.

def test_initialisation_draws_py_meanflows_weights(ref):
    torch.manual_seed(0)
    ours = ours_to_meanflow(MeanFlowPrecond(**_unet_kwargs(ref)).state_dict())
    params = [v for k, v in ours.items() if not k.endswith('resample_filter')]
    heads = torch.cat([p.flatten()[:8] for p in params])
    assert torch.equal(heads, ref.init_heads)
    assert _rel(torch.stack([p.norm() for p in params]), ref.init_norms) < 1e-6


def test_mapping_gives_py_meanflows_outputs(ref, net):
    with torch.no_grad():
        u = net.eval()(ref.jvp_z, ref.jvp_r, ref.jvp_t, augment_labels=ref.aug)
    assert _rel(u, ref.jvp_u) < TOL
    back, official = ours_to_meanflow(net.state_dict()), _official_weights(ref)
    assert back.keys() == official.keys() and all(torch.equal(back[k], v) for k, v in official.items())


def test_checkpoint_file_loads_the_chosen_ema(ref, tmp_path):
    weights = _official_weights(ref)
    model = {'num_updates': torch.tensor(3), **{f'net.{k}': v * 0 for k, v in weights.items()},
             **{f'net_ema1.{k}': v for k, v in weights.items()}}
    path = tmp_path / 'checkpoint-last.pth'
    torch.save(dict(model=model, epoch=3, args=argparse.Namespace(dropout=0.2)), path)
    net, meta = load_meanflow_checkpoint(path, 'net_ema1', network_kwargs=_unet_kwargs(ref))
    with torch.no_grad():
        assert _rel(net(ref.jvp_z, ref.jvp_r, ref.jvp_t, augment_labels=ref.aug), ref.jvp_u) < TOL
    assert meta['epoch'] == 3 and not net.training
    with pytest.raises(dnnlib.UserError, match='no network "net_ema2"'):
        load_meanflow_checkpoint(path, 'net_ema2', network_kwargs=_unet_kwargs(ref))

#----------------------------------------------------------------------------
# The loss: JVP target, per-sample losses and gradients (dropout 0.2, masks shared by the two passes).

def test_jvp_target_matches_py_meanflow(ref, net):
    target = average_velocity_target(net.eval(), ref.jvp_z, ref.jvp_v, ref.jvp_r, ref.jvp_t,
                                     dict(augment_labels=ref.aug))
    gap = (ref.jvp_t - ref.jvp_r).double().reshape(-1, 1, 1, 1)
    want = ref.jvp_v.double() - gap * ref.jvp_dudt.double()     # MeanFlow Eq. 10 in float64
    assert _rel(target, want) < TOL


def test_loss_and_gradient_v1_with_augment_labels(ref, net):
    torch.manual_seed(ref.meta['seeds']['loss_v1'])
    noise = torch.randn_like(ref.x)
    t, r = sample_times('v1', ref.x.shape[0], 'cpu', **_times_kwargs(ref.meta['v1']))
    w = ref.meta['weighting']
    losses = meanflow_loss(net, ref.x, noise, r, t, w['norm_p'], w['norm_eps'], dict(augment_labels=ref.aug))
    assert losses.shape == (ref.x.shape[0],) and _rel(losses, ref.loss_v1_per_sample) < TOL
    losses.mean().backward()
    assert _rel(_flat_grad(net), ref.loss_v1_grad) < TOL


def test_method_loss_and_gradient_v0(ref, net):
    sampler = ref.meta['v0']
    method = MeanFlow(time_sampler='v0', **_times_kwargs(sampler), **ref.meta['weighting'])
    method.setup(net, 'cpu')
    torch.manual_seed(ref.meta['seeds']['loss_v0'])
    losses = method.loss(net, ref.x)
    assert _rel(losses, ref.loss_v0_per_sample) < TOL
    (losses.sum() / len(losses)).backward()
    assert _rel(_flat_grad(net), ref.loss_v0_grad) < TOL


def test_augmentation_reaches_the_network(ref, net):
    augment = dict(class_name='training.data.augment.AugmentPipe', p=0.12, xflip=1e8, yflip=0, scale=1,
                   rotate_frac=0, aniso=1, translate_frac=1)    # py-meanflow train_loop.py
    method = MeanFlow(augment_kwargs=augment)
    method.setup(net, 'cpu')
    torch.manual_seed(3)
    losses = method.loss(net, ref.x)
    torch.manual_seed(3)
    images, labels = dnnlib.util.construct_class_by_name(**augment)(ref.x)
    noise = torch.randn_like(images)
    t, r = sample_times('v1', images.shape[0], 'cpu', **_times_kwargs(ref.meta['v1']))
    with torch.no_grad():
        want = meanflow_loss(net, images, noise, r, t, 0.75, 1e-3, dict(augment_labels=labels))
    assert labels.shape == (4, 6) and _rel(losses, want) < 1e-6

#----------------------------------------------------------------------------
# Sampling.

def test_one_step_sample_matches_py_meanflow(ref, net):
    x = meanflow_sampler(net.eval(), ref.sample_latents)
    assert x.dtype == torch.float64 and _rel(x, ref.sample_out) < TOL


def test_two_step_sample_is_two_average_velocity_jumps(ref, net):
    net.eval()
    z = ref.sample_latents
    x = meanflow_sampler(net, z, t_steps=make_meanflow_steps(mid_t=[0.4]))

    def unet(x, t, h):   # py-meanflow's call: the U-Net at (t, h = t − r)
        full = lambda v: torch.full([x.shape[0]], v)
        return net.model(x.float(), (full(t), full(h)), None).double()
    with torch.no_grad():
        x_mid = z.double() - 0.6 * unet(z, 1.0, 0.6)
        want = x_mid - 0.4 * unet(x_mid, 0.4, 0.4)
    assert _rel(x, want) < TOL

def test_generation_picks_the_meanflow_sampler(ref, net):
    from training.sampling import samplers
    metadata = MeanFlow().snapshot_metadata()
    assert samplers.resolve_sampler(net, metadata=metadata) == ('meanflow', dict(t_steps=(1.0, 0.5, 0.0)))
    assert samplers.resolve_sampler(net, num_steps=1) == ('meanflow', dict(t_steps=(1.0, 0.0)))

#----------------------------------------------------------------------------
# Checks and plumbing.

@pytest.mark.parametrize('kwargs, match', [
    (dict(time_sampler='v2'), 'time_sampler'), (dict(ratio=1.5), 'ratio'), (dict(norm_eps=0), 'norm_eps'),
    (dict(P_std_t=-1), 'P_std_t'), (dict(augment_kwargs=dict(p=0.12)), 'augment_kwargs')])
def test_bad_method_arguments(kwargs, match):
    with pytest.raises(dnnlib.UserError, match=match):
        MeanFlow(**kwargs)


def test_bad_networks_and_steps(ref, net):
    with pytest.raises(dnnlib.UserError, match='MeanFlowPrecond'):
        MeanFlow().setup(net.model, 'cpu')
    with pytest.raises(dnnlib.UserError, match='unconditional'):
        MeanFlowUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=10)
    with pytest.raises(dnnlib.UserError, match='augment_dim=6'):
        MeanFlow(augment_kwargs=dict(class_name='training.data.augment.AugmentPipe', xflip=1)).setup(net, 'cpu')
    for steps in [(1.0, 0.5), (80.0, 0.0), (1.0, 0.2, 0.5, 0.0)]:
        with pytest.raises(dnnlib.UserError, match='MeanFlow steps'):
            meanflow_sampler(net, ref.sample_latents, t_steps=steps)


def test_network_rebuilds_from_its_constructor_arguments(ref, net):
    rebuilt = MeanFlowPrecond(**net.init_kwargs)
    rebuilt.load_state_dict(net.state_dict())
    ema = copy.deepcopy(net)
    with torch.no_grad():
        outputs = [m.eval()(ref.jvp_z, 0.2, 0.7) for m in (net, rebuilt, ema)]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_snapshot_round_trip(ref, net, tmp_path):
    path = tmp_path / 'network-snapshot.pt'
    checkpoint.save_network_snapshot(path, net, kimg=1, ema='', mid_t=[0.5])
    loaded, meta = checkpoint.load_network_snapshot(path)
    with torch.no_grad():
        assert torch.equal(loaded(ref.jvp_z, 0.2, 0.7), net.eval()(ref.jvp_z, 0.2, 0.7))
    assert meta['mid_t'] == [0.5]


def test_training_grids_and_metrics_use_the_meanflow_sampler(net):
    """The initial network's grids and metrics of a MeanFlow run: its own sampler in flow time, no Heun grid (it is
    not a denoiser D(x, σ)), and a Heun metric refused in one line."""
    from metrics import metric_main, scoring
    runs = scoring.initial_grid_runs(net, [0.5])
    assert [(tag, fn, kwargs['t_steps']) for tag, fn, kwargs in runs] == [
        ('1step', meanflow_sampler, (1.0, 0.0)), ('2step', meanflow_sampler, (1.0, 0.5, 0.0))]
    sampling = metric_main.sampling_for('two_step_fd_randnet', net, mid_t=[0.25])
    assert sampling == dict(sampler='meanflow', sampler_kwargs=dict(t_steps=(1.0, 0.25, 0.0)), nfe=2)
    with pytest.raises(dnnlib.UserError, match="fd_randnet_heun: EDM's Heun sampler needs a denoiser"):
        metric_main.sampling_for('fd_randnet_heun', net)


def test_unused_augment_layer_is_refused_under_ddp(net, monkeypatch):
    """augment_dim > 0 without augmentation: harmless on one process (py-meanflow's own v0 case above), refused when
    distributed, where DDP would never reduce the unused layer's bucket."""
    from torch_utils import distributed as dist
    assert net.model.map_augment is not None
    monkeypatch.setattr(dist, 'get_world_size', lambda: 2)
    with pytest.raises(dnnlib.UserError, match='augment_dim=6 but augment_kwargs is None'):
        MeanFlow().setup(net, 'cpu')


@pytest.mark.parametrize('preset', ['cifar10-meanflow', 'cifar10-meanflow-v0'])
def test_presets_keep_py_meanflows_three_emas(preset):
    """py-meanflow keeps EMAs of decay 0.9999, 0.99995 and 0.9996 (train_arg_parser.py:24-25), each updated every
    16 steps with the 16th power (models/ema.py:13-21)."""
    ema = presets.resolve(preset, dict(data='unused')).ema_kwargs
    assert ema['class_name'] == 'training.loop.ema.CombinedEMA'
    assert [(t['class_name'], t['beta'], t['period']) for t in ema['trackers']] == [
        ('training.loop.ema.PeriodicEMA', beta, 16) for beta in (0.9999, 0.99995, 0.9996)]
