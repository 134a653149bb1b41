"""train.py --compile: ECT's passes through a torch.compile'd network (training/methods/loss_compiled.py).

Proves on the CPU, with inductor, on a tiny ECM SongUNet (8x8, one level, attention): with r = t the prediction
and target passes agree bit for bit at dropout 0.5, eager and compiled (shared masks); compiled losses and
gradients match eager (at dropout 0: compiled dropout draws its own masks); no
graph break and no recompilation across curriculum stages or between the two passes (one frame, one graph); a
compiled run saves what an eager one saves and resumes with or without --compile.

Two inductor compiles (dropout 0 and 0.5): tens of seconds each on one CPU core the first time, a few seconds once torch's compile cache
holds it (the training-loop runs reuse the same graph).
"""

import os

import pytest
import torch
from click.testing import CliRunner

import train
from configs import presets
from conftest import write_random_dataset
from training.checkpoints import checkpoint
from training import compile as tc
from training.loop import runtime
from training.loop import training_loop as tl
from training.checkpoints.checkpoint import TrainingState
from training.methods.loss import ECTLoss

TINY_NET = dict(model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[8])
BATCH = 4
TICK_KIMG = 0.008   # two steps of batch 4 per tick
NET_KWARGS = dict(boundary=False)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_random_dataset(tmp_path_factory.mktemp('data'))


def tiny_options(data, **overrides):
    flat = dict(data=data, batch=BATCH, tick_kimg=TICK_KIMG, duration_mimg=TICK_KIMG / 1000, double_ticks=1,
                transfer='none', network_kwargs=TINY_NET, workers=0, snap_ticks=0, dump_ticks=0, sample_ticks=0,
                dropout=0.0)
    flat.update(overrides)
    return presets.resolve('cifar10-ecm', flat)


def build_net(data, dropout):
    """The training loop's network (as train.py builds it) with `dropout`, in train mode, every weight perturbed
    (the output layer starts at zero, where dropout would not show)."""
    options = tiny_options(data, dropout=dropout)
    net = runtime.build_network(options.network_kwargs, runtime.build_dataset(options.dataset_kwargs), None,
                                torch.device('cpu'), seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return net


def inputs():
    """(x0, n, eps, labels) of one micro-batch, as the training loop passes them (labels [N, 0] unconditional)."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand([BATCH, 3, 8, 8], generator=gen) * 2 - 1
    return x0, torch.randn([BATCH, 1, 1, 1], generator=gen), torch.randn(x0.shape, generator=gen), torch.zeros([BATCH, 0])


def loss_and_grads(net, stage):
    """Per-sample ECT losses at `stage` and the gradients of their sum (fixed noise, fixed RNG)."""
    loss_fn = ECTLoss()
    loss_fn.set_stage(stage)
    x0, n, eps, labels = inputs()
    net.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    losses = loss_fn.loss_from_noise(net, x0, n, eps, labels, NET_KWARGS)
    losses.sum().backward()
    return losses.detach(), {name.removeprefix('_orig_mod.'): p.grad.clone() for name, p in net.named_parameters()}


def compiled_warm(net):
    """(`net` compiled, the compiler counters of its first ECT step: its compile)."""
    tc.reset_compile_counters()
    compiled = tc.compile_network(net)
    loss_and_grads(compiled, stage=0)
    return compiled, tc.compile_counters()


@pytest.fixture(scope='module')
def plain_nets(data_dir):
    """(eager, compiled, first-step counters) at dropout 0."""
    net = build_net(data_dir, dropout=0.0)
    return net, *compiled_warm(net)


def test_passes_agree_bitwise_when_r_equals_t(data_dir):
    """r = t: f_t == f_r bit for bit and the global RNG continues as after the prediction pass alone, at dropout
    0.5 (fresh masks, shared_dropout=False, differ: the masks matter), eager and compiled (the target pass runs the
    prediction's graph: a no_grad graph could round differently)."""
    net = build_net(data_dir, dropout=0.5)
    assert_passes_agree(net, fresh_masks_differ=True)
    assert_passes_agree(tc.compile_network(net), fresh_masks_differ=True)


def assert_passes_agree(net, fresh_masks_differ):
    x0, n, eps, labels = inputs()
    t = (n * 0.5).exp()
    torch.manual_seed(3)
    f_t, f_r = ECTLoss().prediction_and_target(net, x0, t, t, eps, labels, NET_KWARGS)
    after_both = torch.get_rng_state()
    assert f_t.requires_grad and not f_r.requires_grad
    f_t.sum().backward()   # as a training step does (torch caches a compiled graph only once its backward is compiled)
    assert torch.equal(f_t.detach(), f_r)
    torch.manual_seed(3)
    alone = net(x0 + t * eps, t, labels, **NET_KWARGS)
    assert torch.equal(torch.get_rng_state(), after_both) and torch.equal(alone, f_t)
    f_t, f_r = ECTLoss().prediction_and_target(net, x0, t, t, eps, labels, NET_KWARGS, shared_dropout=False)
    assert ((f_t.detach() - f_r).abs().max() > 1e-3) == fresh_masks_differ


def test_compiled_loss_and_gradients_match_eager(plain_nets):
    """Dropout 0 (the compiled graph draws other masks than eager): losses and every gradient within float32
    rounding of a U-Net (rtol 1e-4, atol 1e-5 relative to the largest gradient)."""
    net, compiled, _ = plain_nets
    for stage in (0, 3):
        eager_losses, eager_grads = loss_and_grads(net, stage)
        losses, grads = loss_and_grads(compiled, stage)
        torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-5)
        scale = max(g.abs().max() for g in eager_grads.values())
        assert scale > 0 and eager_grads.keys() == grads.keys()
        for name, grad in eager_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_no_break_no_recompile_across_stages(plain_nets):
    """Later steps at other stages (other r) compile nothing new and break no graph."""
    _, compiled, _ = plain_nets
    tc.reset_compile_counters()
    first = loss_and_grads(compiled, stage=0)[0]
    for stage in (3, 7):
        assert not torch.equal(loss_and_grads(compiled, stage)[0], first)   # r (and the loss) changed
    counters = tc.compile_counters()
    assert counters['frames'] == 0 and counters['graphs'] == 0, counters
    assert counters['graph_breaks'] == 0, counters['break_reasons']


def test_first_step_compiles_one_frame_and_one_graph(plain_nets):
    """The first ECT step (prediction, target, backward) compiled exactly one frame and one graph: the target
    pass reused the prediction's graph."""
    counters = plain_nets[2]
    assert counters['frames'] == 1 and counters['graphs'] == 1 and counters['graph_breaks'] == 0, counters


def run_loop(run_dir, data, **kwargs):
    os.makedirs(run_dir, exist_ok=True)
    options = tiny_options(data).replace(**kwargs)
    assert tl.training_loop(options, str(run_dir)) == 'done'
    return TrainingState.read(os.path.join(run_dir, 'training-state-latest.pt'))


def assert_same_state(state, reference, atol):
    """Same keys everywhere; network and EMA weights within `atol`."""
    assert state.keys() == reference.keys() and state['net'].keys() == reference['net'].keys()
    assert state['ema'].keys() == reference['ema'].keys() and state['optimizer'].keys() == reference['optimizer'].keys()
    for name, value in reference['net'].items():
        torch.testing.assert_close(state['net'][name], value, rtol=0, atol=atol, msg=name)
    for name, value in reference['ema'][''].items():
        torch.testing.assert_close(state['ema'][''][name], value, rtol=0, atol=atol, msg=name)


def test_compiled_run_saves_plain_networks_and_resumes_either_way(data_dir, tmp_path):
    """A --compile run: the eager run's state and snapshot (same keys, plain ECMPrecond, weights within float
    rounding), compile=True in its options; resumed without --compile (and an eager run resumed with it)."""
    eager = run_loop(tmp_path / 'eager', data_dir)
    compiled = run_loop(tmp_path / 'compiled', data_dir, compile=True)
    assert compiled['options']['compile'] is True and eager['options']['compile'] is False
    assert_same_state(compiled, eager, atol=1e-5)
    snaps = [checkpoint.load_network_snapshot(os.path.join(tmp_path, run, 'network-snapshot-latest.pt'))
             for run in ('eager', 'compiled')]
    (eager_net, _), (compiled_net, meta) = snaps
    assert type(compiled_net) is type(eager_net) and compiled_net.init_kwargs == eager_net.init_kwargs
    assert compiled_net.state_dict().keys() == eager_net.state_dict().keys() and meta['training_options']['compile']
    resumed = {}
    for name, source, flag in (('to_eager', 'compiled', False), ('to_compiled', 'eager', True)):
        resumed[name] = run_loop(tmp_path / name, data_dir, compile=flag, total_kimg=2 * TICK_KIMG,
                                 resume_state=str(tmp_path / source / 'training-state-latest.pt'))
        assert resumed[name]['progress']['cur_nimg'] == 2 * BATCH * 2
    assert_same_state(resumed['to_eager'], resumed['to_compiled'], atol=1e-5)


def test_compile_flag_reaches_the_options(data_dir, tmp_path):
    args = ['--preset=cifar10-ecm', f'--data={data_dir}', f'--outdir={tmp_path}', '--transfer=none', '--dry-run']
    result = CliRunner().invoke(train.main, args + ['--compile'])
    assert result.exit_code == 0, result.output
    assert '"compile": true' in result.output
