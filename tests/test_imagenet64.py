"""The ImageNet-64 recipe (docs/ECT.md §6, column 3): the imagenet64-ecm-{s,m,l,xl} presets, --transfer from official
EDM2 img64 pickles, weight-normalisation and dropout consistency of the two ECT passes, EMA networks in eval
mode, power-function EMA snapshots and their post-hoc reconstruction, class-conditional generation.

Networks are tiny EDM2 U-Nets (16 channels, 8x8 images, 3 classes) standing in for the img64 sizes.
"""

import json
import math
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import generate
import train
from configs import presets
from metrics import metric_main
from edm2_files import EDM2Loss, StandardRGBEncoder
from conftest import load_npz_meta, write_random_dataset
from training.checkpoints import checkpoint
from training.loop import phema
from training.sampling import samplers
from training.loop import runtime
from training.loop import training_loop as tl
from training.checkpoints.checkpoint import TrainingState
from training.networks.edm2 import MPConv, Precond, normalize

# docs/ECT.md §6 ImageNet-64 column and §5 / §7, typed here from docs/ECT.md, not read from the code.
SPEC = dict(batch=128, total_mimg=12.8, iters=100_000, tick_kimg=6.4, double=500, stages=4, q=4, k=8, b=1, c=0.06,
            P_mean=-0.8, P_std=1.6, betas=(0.9, 0.99), decay_batches=2000, ema_stds=(0.010, 0.050, 0.100),
            ema_beta=0.9999, mid_t=1.526, sigma_data=0.5, dropout_res=16, label_dim=1000)
# Per size: EDM2 channels, ECT lr and dropout, official EDM2 img64 post-hoc reconstruction, EDM2 parameter count.
SIZES = dict(
    s=dict(channels=192, lr=1e-3, dropout=0.40, pkl='edm2-img64-s-1073741-0.075.pkl', mparams=280),
    m=dict(channels=256, lr=9e-4, dropout=0.50, pkl='edm2-img64-m-2147483-0.060.pkl', mparams=498),
    l=dict(channels=320, lr=8e-4, dropout=0.50, pkl='edm2-img64-l-1073741-0.040.pkl', mparams=777),
    xl=dict(channels=384, lr=7e-4, dropout=0.50, pkl='edm2-img64-xl-0671088-0.040.pkl', mparams=1119),
)
EDM2_CDN = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/'

TINY_ARCH = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
NUM_CLASSES = 3
RES = 8
BATCH = 16
TICK_KIMG = 0.512   # 32 steps of 16 images: the two ticks end in kimg 0 and 1, so snapshot names differ
EMA_SUFFIXES = ['-0.010', '-0.050', '-0.100', '-b0.9999']


# ----------------------------------------------------------------------------------------------------------
# Helpers: a labelled dataset and an official-format EDM2 pickle.

def official_edm2_net(seed=1):
    """A tiny EDM2 Precond as EDM2 saves it: weights not unit-norm, uncertainty head present but logvar_channels
    left to EDM2's default (so not recorded), eval mode, float16 tensors."""
    torch.manual_seed(seed)
    net = Precond(img_resolution=RES, img_channels=3, label_dim=NUM_CLASSES, use_fp16=True, logvar_channels=8,
                  dropout=0.1, **TINY_ARCH)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.7).add_(torch.randn_like(p) * 0.1)   # rows of norm != sqrt(fan_in)
        net.unet.out_gain.fill_(2.0)   # non-zero gains: outputs of image contrast that depend on the class
        for block in [*net.unet.enc.values(), *net.unet.dec.values()]:
            if hasattr(block, 'emb_gain'):
                block.emb_gain.fill_(0.5)
    net._init_kwargs.pop('logvar_channels')   # EDM2's Precond has logvar_channels=128 as a default, not a kwarg
    return net.eval().requires_grad_(False).to(torch.float16)


def write_official_pickle(path, net):
    data = dict(ema=net, loss_fn=EDM2Loss(P_mean=-0.8, P_std=1.6), encoder=StandardRGBEncoder(),
                dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='img64.zip'))
    path.write_bytes(pickle.dumps(data))
    return str(path)


def tiny_imagenet_options(data, transfer, **overrides):
    flat = dict(data=data, transfer=transfer, network_kwargs=TINY_ARCH, batch=BATCH, tick_kimg=TICK_KIMG,
                duration_mimg=2 * TICK_KIMG / 1000, workers=0, snap_ticks=1, dump_ticks=2, sample_ticks=0)
    flat.update(overrides)
    return presets.resolve('imagenet64-ecm-s', flat)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_random_dataset(tmp_path_factory.mktemp('img'), num_images=64, resolution=RES, num_classes=NUM_CLASSES)


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    net = official_edm2_net()
    return net, write_official_pickle(tmp_path_factory.mktemp('pkl') / 'edm2-img64-tiny.pkl', net)


def labels_onehot(idx):
    return torch.eye(NUM_CLASSES)[torch.as_tensor(idx)]

# ----------------------------------------------------------------------------------------------------------
# Presets.


@pytest.mark.parametrize('size', list(SIZES))
def test_preset_matches_spec(size):
    want = SIZES[size]
    o = presets.resolve(f'imagenet64-ecm-{size}', dict(data='img64.zip'))
    assert o.batch_size == SPEC['batch'] and o.total_kimg == pytest.approx(SPEC['total_mimg'] * 1000)
    assert o.total_kimg * 1000 / o.batch_size == pytest.approx(SPEC['iters'])
    loss = o.method_kwargs
    assert o.tick_kimg == SPEC['tick_kimg'] and loss['double_ticks'] == SPEC['double']
    assert o.total_kimg / o.tick_kimg / loss['double_ticks'] == pytest.approx(SPEC['stages'])
    assert loss['class_name'] == 'training.methods.ect.ECT'
    assert (loss['P_mean'], loss['P_std'], loss['c'], loss['sigma_data']) == (SPEC['P_mean'], SPEC['P_std'], SPEC['c'],
                                                                              SPEC['sigma_data'])
    assert loss['mapping'] == dict(class_name='training.methods.loss.SigmoidMapping', q=SPEC['q'], k=SPEC['k'], b=SPEC['b'])
    assert loss['weighting'] == dict(class_name='training.methods.loss.InverseSquareWeighting')
    net = o.network_kwargs
    assert net['class_name'] == 'training.networks.edm2.Precond'
    assert (net['model_channels'], net['channel_mult'], net['num_blocks'], net['attn_resolutions']) == \
        (want['channels'], [1, 2, 3, 4], 3, [16, 8])
    assert net['dropout'] == want['dropout'] and net['dropout_res'] == SPEC['dropout_res']
    assert net['ecm_sigma_min'] == 0.003   # docs/ECT.md §2: ECM's sigma_min
    assert o.dataset_kwargs['use_labels'] is True and o.dataset_kwargs['xflip'] is False
    opt = o.optimizer_kwargs
    assert opt['class_name'] == 'torch.optim.Adam' and opt['lr'] == want['lr'] and tuple(opt['betas']) == SPEC['betas']
    assert o.lr_kwargs['decay_batches'] == SPEC['decay_batches'] and o.lr_kwargs['rampup_kimg'] == 0
    assert o.mid_t == [SPEC['mid_t']] and o.transfer == EDM2_CDN + want['pkl']
    json.dumps(o.to_dict())   # training_options.json must be writable


@pytest.mark.parametrize('size', list(SIZES))
def test_preset_network_is_the_edm2_img64_network(size, edm2_forward):
    o = presets.resolve(f'imagenet64-ecm-{size}', dict(data='img64.zip'))
    kwargs = {k: v for k, v in o.network_kwargs.items() if k != 'class_name'}
    with torch.device('meta'):
        net = Precond(img_resolution=64, img_channels=3, label_dim=SPEC['label_dim'], **kwargs)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6) == SIZES[size]['mparams']   # EDM2 Table 3
    if size == 's':   # the full official tensor layout of edm2-img64-s (fixture)
        layout = load_npz_meta(edm2_forward)['layout_edm2_img64_s']
        assert [[k, list(t.shape)] for k, t in net.state_dict().items()] == layout['tensors']
    # Dropout only in blocks at resolution <= 16.
    for name, module in net.unet.named_modules():
        if hasattr(module, 'res_balance'):
            res = int(name.split('.')[1].split('x')[0])
            assert module.dropout == (SIZES[size]['dropout'] if res <= 16 else 0), name


def test_preset_components_build():
    o = presets.resolve('imagenet64-ecm-s', dict(data='img64.zip'))
    loss = dnnlib.util.construct_class_by_name(**o.method_kwargs).loss_fn
    t = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(loss.weighting(t, t / 2), 1 / t ** 2 + 1 / 0.25)
    schedule = dnnlib.util.construct_class_by_name(**o.lr_kwargs)
    # Inverse square root after 2000 batches: lr / sqrt(step / 2000).
    for step, factor in [(0, 1.0), (1999, 1.0), (2000, 1.0), (8000, 0.5), (100_000, 1 / math.sqrt(50))]:
        assert schedule(step * 128, 128) == pytest.approx(factor)
    torch.manual_seed(0)
    ema = dnnlib.util.construct_class_by_name(torch.nn.Linear(2, 2), **o.ema_kwargs)
    assert [suffix for suffix, _ in ema.get()] == EMA_SUFFIXES
    assert ema.trackers[0].stds == list(SPEC['ema_stds']) and ema.trackers[1].beta == SPEC['ema_beta']


def test_arch_kwargs_override_keeps_the_rest_of_the_preset():
    o = presets.resolve('imagenet64-ecm-m', dict(data='x', network_kwargs=dict(model_channels=64)))
    assert o.network_kwargs['model_channels'] == 64 and o.network_kwargs['ecm_sigma_min'] == 0.003
    assert o.network_kwargs['channel_mult'] == [1, 2, 3, 4] and o.network_kwargs['dropout_res'] == 16

# ----------------------------------------------------------------------------------------------------------
# --transfer from an official EDM2 pickle.


def test_official_edm2_pickle_transfers(data_dir, official, capsys):
    src, path = official
    options = tiny_imagenet_options(data_dir, path)
    dataset = runtime.build_dataset(options.dataset_kwargs)
    net = runtime.build_network(options.network_kwargs, dataset, options.transfer, torch.device('cpu'), seed=5)
    report = capsys.readouterr().out
    assert 'skipped 3 absent from the target' in report and 'logvar_linear.weight' in report
    assert net.training and net.ecm_sigma_min == 0.003 and net.label_dim == NUM_CLASSES
    src32 = {k: v.float() for k, v in src.state_dict().items()}
    mpconv_weights = {f'{name}.weight' for name, m in net.named_modules() if isinstance(m, MPConv)}
    for name, value in net.state_dict().items():
        expected = src32[name]
        if name in mpconv_weights:   # transferred, then projected once onto the unit-RMS sphere
            expected = normalize(expected)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6, msg=name)
    # The ECM net in its tuning form computes the official network's function.
    x = torch.randn(4, 3, RES, RES)
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0])
    labels = labels_onehot([0, 1, 2, 1])
    with torch.no_grad():
        official_out = Precond(**{**src.init_kwargs, 'logvar_channels': 8}).eval()
        official_out.load_state_dict(src32)
        torch.testing.assert_close(net.eval()(x, sigma, labels, boundary=False), official_out(x, sigma, labels),
                                   rtol=1e-3, atol=1e-3)


def test_transfer_to_wrong_label_count_is_refused(data_dir, tmp_path):
    torch.manual_seed(0)
    wrong = Precond(img_resolution=RES, img_channels=3, label_dim=10, **TINY_ARCH).eval()
    path = write_official_pickle(tmp_path / 'ten.pkl', wrong)
    result = CliRunner().invoke(train.main, [f'--data={data_dir}', '--preset=imagenet64-ecm-s', f'--transfer={path}',
                                             f'--outdir={tmp_path / "out"}', '--dry-run'])
    assert result.exit_code == 2 and "'label_dim': 10" in result.output and '--transfer' in result.output
    assert not (tmp_path / 'out').exists()

# ----------------------------------------------------------------------------------------------------------
# The two ECT passes: same weights, same dropout masks; forced normalisation once per optimiser step.


def _record_weights_per_pass(net):
    """Forward hooks recording, per top-level call, the normalised weights every MPConv used."""
    calls = []

    def on_precond(module, args):
        calls.append([])

    def on_conv(module, args):
        calls[-1].append(module.normalized_weight().detach().clone())
    handles = [net.register_forward_pre_hook(on_precond)]
    handles += [m.register_forward_pre_hook(on_conv) for m in net.modules() if isinstance(m, MPConv)]
    return calls, handles


def test_prediction_and_target_passes_see_the_same_weights_and_masks(data_dir, official):
    options = tiny_imagenet_options(data_dir, official[1])
    dataset = runtime.build_dataset(options.dataset_kwargs)
    net = runtime.build_network(options.network_kwargs, dataset, options.transfer, torch.device('cpu'))
    method = dnnlib.util.construct_class_by_name(**options.method_kwargs)
    method.setup(net, torch.device('cpu'))   # the training passes' form (boundary=False), as in training
    loss_fn, net_kwargs = method.loss_fn, method.net_kwargs
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls, handles = _record_weights_per_pass(net)
    x0 = torch.rand(6, 3, RES, RES) * 2 - 1
    labels = labels_onehot([0, 1, 2, 0, 1, 2])
    eps = torch.randn_like(x0)
    t = torch.full([6, 1, 1, 1], 0.7)
    torch.manual_seed(3)
    f_t, f_r = loss_fn.prediction_and_target(net, x0, t, t.clone(), eps, labels, net_kwargs)   # r = t: same inputs
    for handle in handles:
        handle.remove()
    assert len(calls) == 2 and len(calls[0]) == len(calls[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*calls))   # the target pass used the prediction pass's weights
    assert torch.equal(f_t.detach(), f_r)                   # ... and its dropout masks (dropout 0.4 everywhere)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())   # forwards wrote nothing
    torch.manual_seed(3)
    f_t2, f_r2 = loss_fn.prediction_and_target(net, x0, t, t.clone(), eps, labels, net_kwargs, shared_dropout=False)
    assert (f_t2 - f_r2).abs().max() > 1e-3   # dropout is active: fresh masks would differ


def test_forced_weight_normalisation_once_per_optimiser_step(data_dir, official):
    options = tiny_imagenet_options(data_dir, official[1])
    dataset = runtime.build_dataset(options.dataset_kwargs)
    state = tl.build_state(options, dataset, torch.device('cpu'))
    net, optimizer, base_lr = state.net, state.optimizer, options.optimizer_kwargs['lr']
    calls = []
    real_normalize = net.normalize_weights_

    def spy():
        calls.append(sum(len(s) for s in optimizer.state.values()))   # optimiser state exists: after the step
        real_normalize()
    net.normalize_weights_ = spy
    batch_gpu, rounds = runtime.check_batch(16, 8, 1)   # two accumulation rounds per step
    iterator = runtime.build_data_iterator(dataset, dict(num_workers=0), batch_gpu, 0, 0, torch.device('cpu'))
    for step in range(3):
        weights_before = [p.detach().clone() for p in net.parameters()]
        tl.training_step(net, net, state.method.loss, optimizer, iterator, rounds, 16, base_lr, torch.device('cpu'))
        assert len(calls) == step + 1 and calls[-1] > 0
        assert any(not torch.equal(a, b) for a, b in zip(weights_before, net.parameters()))
        for module in net.modules():
            if isinstance(module, MPConv):   # every weight row back on the unit-RMS sphere after the step
                rms = module.weight.square().flatten(1).mean(1).sqrt()
                torch.testing.assert_close(rms, torch.ones_like(rms), rtol=2e-4, atol=2e-4)

# ----------------------------------------------------------------------------------------------------------
# A tiny end-to-end run through train.py: transfer, class labels, power-EMA snapshots, eval-mode sampling.


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, data_dir, official):
    out = tmp_path_factory.mktemp('run')
    sampled = []
    real_sampler = samplers.consistency_sampler

    def spy(net, latents, class_labels=None, **kwargs):
        sampled.append((all(not m.training for m in net.modules()), class_labels))
        return real_sampler(net, latents, class_labels, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(samplers.FEW_STEP, 'consistency', samplers.FEW_STEP['consistency']._replace(sampler=spy))
        args = ['--preset=cifar10-ecm', '--preset=imagenet64-ecm-s',   # run_ecm.sh passes the CIFAR preset first
                f'--data={data_dir}', f'--outdir={out}', '--nosubdir', f'--transfer={official[1]}',
                '--arch-kwargs=' + json.dumps(TINY_ARCH), f'--batch={BATCH}', f'--tick={TICK_KIMG}',
                f'--duration={2 * TICK_KIMG / 1000}', '--snap=1', '--dump=2', '--sample-every=2', '--workers=0']
        result = CliRunner().invoke(train.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, sampled


def test_run_trains_with_class_labels_from_the_transfer(run_dir, official):
    out, _ = run_dir
    options = json.loads((out / 'training_options.json').read_text())
    assert options['network_kwargs']['ecm_sigma_min'] == 0.003 and options['method_kwargs']['c'] == 0.06
    assert options['dataset_kwargs']['use_labels'] is True
    log = (out / 'log.txt').read_text()
    assert 'Transfer from' in log and 'Training done.' in log
    state = TrainingState.read(out / 'training-state-latest.pt')
    assert state['progress']['cur_nimg'] == 2 * 32 * BATCH
    net_weight = state['net']['unet.emb_label.weight']
    assert net_weight.shape == (TINY_ARCH['model_channels'] * 2, NUM_CLASSES)
    transferred = normalize(official[0].state_dict()['unet.emb_label.weight'].float())
    assert 0 < (net_weight - transferred).abs().max() < 0.5   # started from the transfer, then trained
    losses = [json.loads(line)['Loss/loss']['mean'] for line in (out / 'stats.jsonl').read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_run_samples_ema_nets_in_eval_mode_with_labels(run_dir):
    _, sampled = run_dir
    # Grids at the start and at the end, for 4 EMA nets, 1-step and 2-step.
    assert len(sampled) == 2 * 4 * 2
    assert all(eval_mode for eval_mode, _ in sampled)
    assert all(labels is not None and labels.shape[1] == NUM_CLASSES for _, labels in sampled)


def test_run_writes_power_ema_snapshots(run_dir):
    out, _ = run_dir
    for tick in (1, 2):
        for suffix in EMA_SUFFIXES:
            net, meta = checkpoint.load_network_snapshot(out / f'network-snapshot-{tick - 1:06d}{suffix}.pt')
            assert not net.training and meta['ema'] == suffix and meta['mid_t'] == [SPEC['mid_t']]
            assert meta['nimg'] == tick * 32 * BATCH and net.ecm_sigma_min == 0.003


def test_phema_cli_reconstructs_stored_profile(run_dir, tmp_path):
    out, _ = run_dir
    result = CliRunner().invoke(phema.main, [f'--indir={out}', f'--outdir={tmp_path}', '--std=0.05,0.075'])
    assert result.exit_code == 0, result.output
    # A stored profile (sigma_rel 0.050 at the latest snapshot) is in the span: its reconstruction is that snapshot.
    rec, meta = checkpoint.load_network_snapshot(tmp_path / 'phema-000001-0.050.pt')
    stored, _ = checkpoint.load_network_snapshot(out / 'network-snapshot-000001-0.050.pt')
    for (name, a), b in zip(rec.state_dict().items(), stored.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert meta['phema']['fit_error'] < 1e-4 and meta['ema_std'] == 0.05
    # The new profile combines the 6 power-EMA snapshots (the -b0.9999 ones are not power-function EMAs).
    _, meta75 = checkpoint.load_network_snapshot(tmp_path / 'phema-000001-0.075.pt')
    assert len(meta75['phema']['sources']) == 6 and not any('b0.9999' in s for s in meta75['phema']['sources'])
    assert sum(meta75['phema']['coefficients']) == pytest.approx(1, abs=0.05)   # profiles integrate to one

# ----------------------------------------------------------------------------------------------------------
# Class-conditional generation and metrics on the trained EDM2 ECM.


def _reference_images(net, seeds, class_idx, mid_t):
    """2-step consistency sampling (docs/ECT.md §5) written out: per-seed generator draws latent, class, then noise."""
    images = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn([1, 3, RES, RES], generator=gen)
        drawn = int(torch.randint(NUM_CLASSES, size=[], generator=gen))
        label = labels_onehot([drawn if class_idx is None else class_idx])
        with torch.no_grad():
            x = net(z.double() * 80, torch.tensor([80.0]), label).double()
            x = x + mid_t * torch.randn([1, 3, RES, RES], dtype=torch.float64, generator=gen)
            x = net(x, torch.tensor([mid_t]), label).double()
        images.append(x[0])
    return images


def _uint8(x):
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(1, 2, 0).numpy().astype(int)


@pytest.mark.parametrize('class_idx', [None, 2])
def test_generate_class_conditional(run_dir, tmp_path, class_idx):
    out, _ = run_dir
    snapshot = out / 'network-snapshot-latest-0.050.pt'
    net, meta = checkpoint.load_network_snapshot(snapshot)
    assert samplers.resolve_sampler(net, metadata=meta)[1]['t_steps'] == (80.0, SPEC['mid_t'], 0.0)
    args = [f'--network={snapshot}', f'--outdir={tmp_path}', '--seeds=0-3', '--batch=3', '--device=cpu']
    result = CliRunner().invoke(generate.cli, args + ([f'--class={class_idx}'] if class_idx is not None else []))
    assert result.exit_code == 0, result.output
    expected = _reference_images(net, range(4), class_idx, SPEC['mid_t'])
    for seed, ref in enumerate(expected):
        got = np.asarray(PIL.Image.open(tmp_path / f'{seed:06d}.png')).astype(int)
        assert np.abs(got - _uint8(ref)).max() <= 1, seed
        assert got.max() - got.min() > 20   # images with contrast, not a flat grey
    other = _reference_images(net, range(4), 0 if class_idx == 2 else 2, SPEC['mid_t'])
    assert any(np.abs(_uint8(a) - _uint8(b)).max() > 5 for a, b in zip(expected, other))   # the label matters


def test_generate_refuses_class_beyond_label_dim(run_dir, tmp_path):
    out, _ = run_dir
    result = CliRunner().invoke(generate.cli, [f'--network={out / "network-snapshot-latest-0.050.pt"}',
                                               f'--outdir={tmp_path}', '--seeds=0', f'--class={NUM_CLASSES}'])
    assert result.exit_code == 2 and '--class' in result.output


def test_two_step_metric_sampling_uses_imagenet_mid_t(run_dir):
    out, _ = run_dir
    net, meta = checkpoint.load_network_snapshot(out / 'network-snapshot-latest-0.100.pt')
    assert metric_main.sampling_for('two_step_fid50k_full', net)['sampler_kwargs']['t_steps'] == (80.0, 1.526, 0.0)
    assert metric_main.sampling_for('fid50k_full', net)['nfe'] == 1
    assert metric_main.sampling_for('fd_dinov2', net, metadata=meta)['nfe'] == 1
