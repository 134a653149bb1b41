"""TCM stage 2 (training/methods/tcm.py) against NVlabs/TCM run on the CPU (tests/data/tcm: make_tcm.py, README.md).

The same tiny networks (weights from make_tcm.py's seeded recipe `tiny_weights`) and the same random
inputs go through the project's TCM and the stored official numbers: per-sample losses, the step objective and its
gradient, the time sampler, 1- and 2-step sampling; and every bad input is a one-line UserError.

The consistency loss is a small difference of two network outputs: at the recipe's ratio 0.999, ‖f_t − f_r‖ is
~1/1000 of ‖f_t‖, so the float32 rounding of the two (different) network implementations (~5e-7 of ‖f‖) becomes
~1e-4 of the loss. Hence three checks: the predictions f_t, f_r against the official ones (float32 rounding); the losses
computed from the official predictions (float32 rounding); and the end-to-end losses and gradient, within float32
rounding amplified by κ = max ‖f_t‖ / ‖f_t − f_r‖ of the official predictions.
Reading a snapshot file costs this machine ~7 s of one-time torch imports, so `setup` reads its stage-1 network
through a stand-in for reader.load_network (the reader has its own tests).
"""

import copy
import functools
import importlib.util
import json
import math
import pathlib
import types

import numpy as np
import pytest
import torch

import dnnlib
from training import networks
from training.methods.base import Progress
from training.methods.loss import tuning_kwargs
from training.methods import tcm
from training.methods.tcm import TCM
from training.methods.tcm_loss import LogStudentT, TCMNoise
from training.sampling.samplers import consistency_sampler

DATA = pathlib.Path(__file__).parent / 'data' / 'tcm' / 'tcm.npz'
FLOAT32_REL = 1e-5      # whole-tensor relative error allowed for float32 results (any CPU kernel)
NET_REL = 2e-6          # float32 rounding of a network output assumed by the end-to-end bound (measured ≤ 6e-7)


@pytest.fixture(scope='module')
def ref():
    data = np.load(DATA)
    return data, json.loads(bytes(data['meta']).decode())


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _fixture_script():
    """tests/data/tcm/make_tcm.py as a module (its seeded weight recipe `tiny_weights` made the fixture)."""
    path = pathlib.Path(__file__).parent / 'data' / 'tcm' / 'make_tcm.py'
    spec = importlib.util.spec_from_file_location('make_tcm', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_weights = _fixture_script().tiny_weights


@functools.lru_cache(maxsize=None)
def _tiny_net(kwargs_json, label_dim, seed):
    net = networks.ECMPrecond(img_resolution=8, img_channels=3, label_dim=label_dim, **json.loads(kwargs_json))
    return tiny_weights(net, seed)


def tiny_net(meta, case, seed, **overrides):
    """A fresh copy of the tiny network of `case` (SongUNet or DhariwalUNet) with the weights of `seed`."""
    kwargs = dict(meta['song'] if case['net']['model_type'] == 'SongUNet' else meta['dhariwal'], **overrides)
    return copy.deepcopy(_tiny_net(json.dumps(kwargs, sort_keys=True), case['label_dim'], seed))


@pytest.fixture
def stage1_files(monkeypatch, tmp_path):
    """{path: (network, metadata)} that TCM.setup reads through a stand-in for reader.load_network; add(name, net,
    **metadata) creates an (empty) file and returns its path."""
    files = {}

    def add(name, net, **metadata):
        path = tmp_path / name
        path.write_bytes(b'')
        files[str(path)] = (net.eval(), metadata)
        return str(path)
    monkeypatch.setattr(tcm.reader, 'load_network', lambda path: files[str(path)])
    return add


def method_for(stage1_files, meta, case, **overrides):
    """The project's TCM for an official loss case, its stage 1 the case's frozen network (weights seed 1)."""
    loss = case['loss']
    weighting = dict(default='InverseGapWeighting', cout_sq='InverseSquareWeighting')[loss['weighting']]
    kwargs = dict(stage1=stage1_files('stage1.pt', tiny_net(meta, case, seed=1)), stage1_steps=0,
                  transition_t=meta['transition_t'], t_max=loss['t_upper'], P_mean=loss['P_mean'], P_std=loss['P_std'],
                  df=loss['df'], boundary_prob=loss['boundary_prob'], w_boundary=case['w_boundary'], q=loss['q'],
                  ratio_limit=loss['ratio_limit'], c=loss['c'],
                  weighting=dict(class_name=f'training.methods.loss.{weighting}'))
    return TCM(**dict(kwargs, **overrides))


def flat_grad(net):
    params = dict(net.named_parameters())
    return torch.cat([params[k].grad.flatten().double() for k in sorted(params)])


def case_inputs(data, meta, name):
    """(images, labels, noise) of an official case: its uniforms; perm and eps from its torch seed, in the official
    order, which leaves the generator where the official dropout masks were drawn."""
    case = meta['cases'][name]
    images = torch.from_numpy(data[f'{name}/images'])
    labels = torch.from_numpy(data[f'{name}/labels']) if f'{name}/labels' in data else None
    torch.manual_seed(case['seeds'][0])
    perm = torch.randperm(case['batch'])
    eps = torch.randn_like(images)
    assert torch.equal(perm, torch.from_numpy(data[f'{name}/perm']))
    assert torch.equal(eps, torch.from_numpy(data[f'{name}/eps']))
    return images, labels, TCMNoise(torch.from_numpy(data[f'{name}/uniforms']), perm, eps)


def run_case(data, meta, name, folder):
    """One step of the project's TCM on an official case (setup's frozen copy made directly: `setup` itself is tested
    below): its per-sample losses, their gradient (sum / N), and the predictions the step made."""
    case = meta['cases'][name]
    stage1 = folder / 'stage1.pt'
    stage1.write_bytes(b'')
    method = method_for(lambda *args, **kwargs: str(stage1), meta, case)
    student = tiny_net(meta, case, seed=0).train().requires_grad_(True)
    method.stage1 = tcm.frozen_stage1(student, tiny_net(meta, case, seed=1), 'stage1')
    method.net_kwargs = tuning_kwargs(student)
    method.schedule(Progress(case['stage'] * method.double_steps, 1, 10**9, 1.0))
    predictions, original = [], method.loss_fn.predictions
    method.loss_fn.predictions = lambda *args: predictions.extend(original(*args)) or predictions
    images, labels, noise = case_inputs(data, meta, name)
    losses = method.loss_fn.loss_from_noise(student, method.stage1, images, noise, labels, method.net_kwargs)
    (losses.sum() / case['batch']).backward()
    return types.SimpleNamespace(method=method, student=student, losses=losses.detach().double(),
                                 f_t=predictions[0].detach(), f_r=predictions[1], times=method.loss_fn.times_of(noise))


@pytest.fixture(scope='module')
def case_run(ref, tmp_path_factory):
    """run_case of each official case, once per module."""
    data, meta = ref
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = run_case(data, meta, name, tmp_path_factory.mktemp(name))
        return runs[name]
    return get


def official_losses(data, meta, name):
    """The official per-sample losses as our [N] convention writes them: each scaled so that sum / N is the
    official objective mean(consistency) + w_boundary·mean(boundary) (docs/TCM.md eq. (T7))."""
    case = meta['cases'][name]
    boundary = data[f'{name}/boundary']
    n, n_b = case['batch'], int(boundary.sum())
    out = np.zeros(n)
    out[~boundary] = data[f'{name}/loss'] * n / (n - n_b)
    if n_b:
        out[boundary] = data[f'{name}/loss_boundary'] * case['w_boundary'] * n / n_b
    return out


CASES = ['cifar', 'imagenet', 'no_boundary']


@pytest.mark.parametrize('name', CASES)
def test_predictions_match_official(ref, case_run, name):
    """f(x_t, t) (trained network, recorded dropout masks) and f(x_r, r) (stage 1 below t′, the trained network above,
    both replaying those masks) equal TCMPrecond's outputs in NVlabs/TCM's loss."""
    data, meta = ref
    run = case_run(name)
    _, r, _ = run.times
    assert name == 'no_boundary' or ((r < meta['transition_t']).any() and (r >= meta['transition_t']).any())
    assert rel_err(run.f_t, data[f'{name}/f_t']) < FLOAT32_REL
    assert rel_err(run.f_r, data[f'{name}/f_r']) < FLOAT32_REL


@pytest.mark.parametrize('name', CASES)
def test_losses_of_official_predictions_match_official(ref, case_run, name):
    data, meta = ref
    case, run = meta['cases'][name], case_run(name)
    t, r, boundary = run.times
    assert int(boundary.sum()) == int(case['batch'] * case['loss']['boundary_prob'])
    assert run.method.loss_fn.mapping.ratio(case['stage']) == float(data[f'{name}/ratio'])
    losses = run.method.loss_fn.losses(torch.from_numpy(data[f'{name}/f_t']), torch.from_numpy(data[f'{name}/f_r']),
                                       t, r, boundary)
    assert losses.dtype == torch.float32 and losses.shape == (case['batch'],)
    assert rel_err(losses, official_losses(data, meta, name)) < FLOAT32_REL


@pytest.mark.parametrize('name', CASES)
def test_losses_and_gradient_match_official(ref, case_run, name):
    """End to end (our networks, our draws replayed): losses, objective sum / N and its gradient, within float32
    rounding amplified by κ (module docstring)."""
    data, meta = ref
    case, run = meta['cases'][name], case_run(name)
    f_t, f_r = data[f'{name}/f_t'].reshape(case['batch'], -1), data[f'{name}/f_r'].reshape(case['batch'], -1)
    kappa = max(1.0, float(np.max(np.linalg.norm(f_t, axis=1) / np.linalg.norm(f_t - f_r, axis=1))))
    tolerance = max(FLOAT32_REL, NET_REL * kappa)
    assert rel_err(run.losses, official_losses(data, meta, name)) < tolerance
    assert rel_err(run.losses.sum() / case['batch'], data[f'{name}/objective']) < tolerance
    grad = flat_grad(run.student)
    i = np.arange(grad.numel(), dtype=np.float64)
    projections = [np.cos(0.61803 * (k + 1) * i + k) @ grad.numpy() for k in range(meta['projections'])]
    assert rel_err(projections, data[f'{name}/grad_projections']) < tolerance
    assert rel_err(grad.norm(), data[f'{name}/grad_norm']) < tolerance
    params = dict(run.student.named_parameters())
    for key in meta['grad_keys']:
        assert rel_err(params[key].grad, data[f'{name}/grad:{key}']) < tolerance


@pytest.mark.parametrize('arch, name', [('song', 'cifar'), ('dhariwal', 'imagenet')])
def test_parameter_names_are_the_officials(ref, arch, name):
    data, meta = ref
    net = tiny_net(meta, meta['cases'][name], seed=0)
    assert sorted(n for n, _ in net.named_parameters()) == meta['param_names'][arch]


@pytest.mark.parametrize('name', CASES)
def test_times_match_official(stage1_files, ref, name):
    """From the official uniforms: t equals exp(truncated_t's ln t), boundary samples sit at t′ + 1e-8, and r
    follows the official mapping (recomputed in float64 from its formula, ratio capped)."""
    data, meta = ref
    case = meta['cases'][name]
    method = method_for(stage1_files, meta, case)
    method.loss_fn.stage = case['stage']
    noise = TCMNoise(torch.from_numpy(data[f'{name}/uniforms']), torch.from_numpy(data[f'{name}/perm']), None)
    t, r, boundary = method.loss_fn.times_of(noise)
    expected = np.exp(data[f'{name}/log_t'])
    expected[data[f'{name}/boundary']] = meta['transition_t'] + 1e-8
    assert np.array_equal(boundary.numpy(), data[f'{name}/boundary'])
    assert rel_err(t, expected) < 1e-13
    ratio = min(1 - case['loss']['q'] ** -(case['stage'] + 1), case['loss']['ratio_limit'])
    gap = expected * (1 - ratio) * (1 + 8 / (1 + np.exp(expected)))
    assert rel_err(r, np.maximum(expected - gap, 1e-6)) < 1e-13


@pytest.mark.parametrize('name', ['recipe', 'wide'])
def test_time_sampler_matches_truncated_t(ref, name):
    data, meta = ref
    case = meta['sampler_cases'][name]
    times = LogStudentT(P_mean=case['mu'], P_std=case['sigma'], df=case['df'], t_min=case['lower'], t_max=case['upper'])
    t = times.from_uniform(torch.from_numpy(data[f'sampler_{name}/uniforms']))
    assert rel_err(t.log(), data[f'sampler_{name}/log_t']) < 1e-12
    assert float(t.min()) >= case['lower'] and float(t.max()) <= case['upper']


def test_draw_order(stage1_files, ref):
    """sample_noise draws the t uniforms (float64, CPU generator), then randperm (CPU), then eps."""
    data, meta = ref
    method = method_for(stage1_files, meta, meta['cases']['cifar'])
    images = torch.zeros(5, 3, 8, 8)
    torch.manual_seed(3)
    noise = method.loss_fn.sample_noise(images)
    torch.manual_seed(3)
    u = torch.rand(5, dtype=torch.float64)
    perm = torch.randperm(5)
    assert torch.equal(noise.u, u) and torch.equal(noise.perm, perm) and torch.equal(noise.eps, torch.randn(5, 3, 8, 8))


def test_sampling_matches_generator_fn(ref):
    """The stage-2 network alone, in the EDM form (ECMPrecond sigma_min=0: NVlabs/TCM's ECMPrecond has no boundary
    form), sampled by the consistency sampler equals ct_eval.generator_fn at 1 step and at 2 steps (mid_t 1.0, 0.821);
    ECT's sigma_min 0.003 (its boundary form) shifts the 2-step samples by more than float32 rounding."""
    data, meta = ref
    latents, noise = torch.from_numpy(data['generate/latents']), torch.from_numpy(data['generate/noise'])
    net = tiny_net(meta, meta['cases']['cifar'], seed=0, sigma_min=0.0).eval().requires_grad_(False)
    for key, mid_t in (('1step', []), ('2step_1.0', [1.0]), ('2step_0.821', [0.821])):
        expected = data[f'generate/{key}']
        for sigma_min in (0.0, 0.003):
            net.sigma_min = sigma_min
            with torch.no_grad():
                x = consistency_sampler(net, latents, t_steps=(80.0, *mid_t, 0.0), randn_like=lambda x: noise)
            if sigma_min == 0:
                assert rel_err(x, expected) < FLOAT32_REL, key
            elif mid_t:
                assert rel_err(x, expected) > 1e-4, key


def test_schedule_continues_stage1_and_caps_ratio(stage1_files, ref):
    data, meta = ref
    method = method_for(stage1_files, meta, meta['cases']['cifar'], stage1_steps=200000, double_steps=25000)
    assert [method.schedule(Progress(k * 1024, 1024, 10**9, 102.4))['stage'] for k in (0, 24999, 25000)] == [8, 8, 9]
    assert method.schedule(Progress(0, 1024, 10**9, 102.4))['ratio'] == 1 - 2 ** -9
    assert method.schedule(Progress(25000 * 1024, 1024, 10**9, 102.4))['ratio'] == 0.999
    assert method.snapshot_metadata()['stage'] == 9 and method.state_dict() == dict(stage1_steps=200000)


def test_setup_freezes_stage1_and_reads_its_length(stage1_files, ref):
    """The frozen copy: the trained network's module with the stage-1 weights, train mode (dropout), no gradients;
    stage 1's optimiser steps from the snapshot metadata (nimg // batch_size) when not given, which the loop's
    learning rate and EMA continue from (steps_before)."""
    data, meta = ref
    case = meta['cases']['cifar']
    source = tiny_net(meta, case, seed=1)
    method = TCM(stage1=stage1_files('stage1-meta.pt', source, nimg=128 * 1000 + 5,
                                     training_options=dict(batch_size=128)))
    student = tiny_net(meta, case, seed=0).train()
    method.setup(student, torch.device('cpu'))
    assert method.stage1_steps == method.steps_before() == 1000 and method.stage1 is not student
    assert not any(p.requires_grad for p in method.stage1.parameters()) and method.stage1.training
    frozen, wanted = method.stage1.state_dict(), source.state_dict()
    assert frozen.keys() == wanted.keys() and all(torch.equal(frozen[k], wanted[k]) for k in wanted)
    method.load_state_dict(dict(stage1_steps=7))
    assert method.state_dict() == dict(stage1_steps=7) and method.steps_before() == 7


def assert_one_line_refusal(fn, *words):
    with pytest.raises(dnnlib.UserError) as info:
        fn()
    message = str(info.value)
    assert '\n' not in message and all(word in message for word in words), message


@pytest.mark.parametrize('kwargs, words', [
    (dict(stage1=None), ['stage1']),
    (dict(stage1=''), ['stage1']),
    (dict(stage1='/nonexistent/stage1.pt'), ['stage1', 'does not exist']),
    (dict(transition_t=0), ['transition_t']),
    (dict(transition_t=math.nan), ['transition_t']),
    (dict(t_min=0.5), ['t_min']),
    (dict(t_max=0.9), ['t_max']),
    (dict(boundary_prob=1.0), ['boundary_prob']),
    (dict(w_boundary=-1), ['w_boundary']),
    (dict(q=1), ['q']),
    (dict(ratio_limit=1.0), ['ratio_limit']),
    (dict(double_steps=0), ['double_steps']),
    (dict(stage1_steps=-1), ['stage1_steps']),
    (dict(df=0), ['df']),
    (dict(P_std=0), ['P_std']),
    (dict(c=-1), ['c']),
    (dict(weighting=dict(name='x')), ['weighting']),
])
def test_bad_arguments_are_one_line_refusals(tmp_path, kwargs, words):
    stage1 = tmp_path / 'stage1.pt'
    stage1.write_bytes(b'')
    assert_one_line_refusal(lambda: TCM(**dict(dict(stage1=str(stage1)), **kwargs)), *words)
    assert_one_line_refusal(TCM, 'stage1')


def test_bad_stage1_files_are_one_line_refusals(stage1_files, ref):
    data, meta = ref
    case = meta['cases']['cifar']
    student = tiny_net(meta, case, seed=0)
    other = stage1_files('other.pt', tiny_net(meta, case, seed=1, model_channels=8))
    assert_one_line_refusal(lambda: TCM(stage1=other, stage1_steps=0).setup(student, torch.device('cpu')),
                            'stage1', 'other.pt')
    labelled = stage1_files('labelled.pt', tiny_net(meta, dict(case, label_dim=4), seed=1, model_channels=8))
    assert_one_line_refusal(lambda: TCM(stage1=labelled, stage1_steps=0).setup(student, torch.device('cpu')),
                            'stage1', 'label_dim')
    plain = stage1_files('plain.pt', tiny_net(meta, case, seed=1))
    assert_one_line_refusal(lambda: TCM(stage1=plain).setup(student, torch.device('cpu')), 'stage1_steps')
