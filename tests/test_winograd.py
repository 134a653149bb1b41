"""Winograd F(4x4, 3x3) convolutions (training.networks.winograd, train.py --winograd): the transform matrices
against the definition of correlation, the 2-D convolution and its gradients against float64 conv2d, the compiled
transforms against the eager ones, and the training options around it."""

import copy

import pytest
import torch

import dnnlib
from configs import presets
from training import runtime
from training import networks_edm2
from training import training_loop as tl
from training.networks import layers
from training.networks import winograd

from tests.test_layouts import _net, assert_same_function


def _matrix(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_transform_matrices_compute_the_valid_1d_correlation():
    g_ = torch.Generator().manual_seed(0)
    for _ in range(20):
        d, g = torch.randn(6, dtype=torch.float64, generator=g_), torch.randn(3, dtype=torch.float64, generator=g_)
        expected = torch.stack([sum(d[i + k] * g[k] for k in range(3)) for i in range(4)])
        got = _matrix(winograd.A_T) @ ((_matrix(winograd.G) @ g) * (_matrix(winograd.B_T) @ d))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize('shape', [(2, 5, 16, 12), (1, 3, 20, 16)])
def test_conv3x3_is_conv2d_exactly_in_float64(shape):
    """The whole 2-D algorithm (tiling, padding, the three transforms, their adjoints in backward) in float64."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, shape[1], 3, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(shape[0], 7, *shape[2:], dtype=torch.float64)
    got = winograd.conv3x3(x, w, winograd.Transforms(compiled=False))
    grads = torch.autograd.grad(got, (x, w), upstream)
    expected = torch.nn.functional.conv2d(x, w, padding=1)
    expected_grads = torch.autograd.grad(expected, (x, w), upstream)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_conv3x3_float32_rounding_is_within_1e5_of_the_range():
    torch.manual_seed(0)
    x, w = torch.randn(2, 64, 16, 16), torch.randn(32, 64, 3, 3) / 24
    got = winograd.conv3x3(x, w, winograd.Transforms(compiled=False)).double()
    expected = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_compiled_transforms_equal_the_eager_ones_in_any_layout():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    for x in (torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)):
        x.requires_grad_(True)
        upstream = torch.randn(2, 4, 16, 16)
        results = []
        for transforms in (winograd.Transforms(compiled=False), winograd.compiled_transforms()):
            y = winograd.conv3x3(x, w, transforms)
            results.append((y,) + torch.autograd.grad(y, (x, w), upstream))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_inside_a_compiled_network_the_transforms_are_traced_into_its_graph():
    torch.manual_seed(0)
    x, w = torch.randn(1, 2, 8, 8), torch.randn(3, 2, 3, 3)
    outer = torch.compile(lambda x, w: winograd.conv3x3(x, w).square(), dynamic=False, fullgraph=True)  # no break
    eager = winograd.conv3x3(x, w, winograd.Transforms(compiled=False)).square()
    torch.testing.assert_close(outer(x, w), eager, rtol=1e-5, atol=1e-5)


def test_applies_only_to_fp32_3x3_convolutions_of_32_pixels_and_up():
    w = torch.zeros(4, 4, 3, 3)
    assert winograd.applies(torch.zeros(1, 4, 32, 32), w, 1)
    assert winograd.applies(torch.zeros(1, 4, 32, 64), w, 1)
    assert not winograd.applies(torch.zeros(1, 4, 16, 16), w, 1)        # too small to pay
    assert not winograd.applies(torch.zeros(1, 4, 34, 34), w, 1)        # not whole 4x4 tiles
    assert not winograd.applies(torch.zeros(1, 4, 32, 32), w, 0)        # other padding
    assert not winograd.applies(torch.zeros(1, 4, 32, 32), torch.zeros(4, 4, 1, 1), 0)
    assert not winograd.applies(torch.zeros(1, 4, 32, 32, dtype=torch.bfloat16), w.bfloat16(), 1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not winograd.applies(torch.zeros(1, 4, 32, 32), w, 1)


def test_a_network_with_winograd_convolutions_computes_the_same_function_and_gradients(monkeypatch):
    net = _net(dropout=0, resolution=32)
    wino = layers.set_conv_algorithm(copy.deepcopy(net), 'winograd', batch_size=2)
    calls = []
    original = winograd.conv3x3
    eager = winograd.Transforms(compiled=False)   # the compiled ones are compared with these above
    monkeypatch.setattr(winograd, 'conv3x3', lambda x, w: calls.append(1) or original(x, w, eager))
    wino(torch.randn(3, 3, 32, 32), torch.ones(3))
    assert not calls   # another batch size than the one given stays direct
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 5.0])
    out, out_w = net(x, sigma), wino(x, sigma)
    assert calls   # the 32x32 convolutions took the Winograd path
    calls.clear()
    layers.set_conv_algorithm(wino, 'winograd')(torch.randn(3, 3, 32, 32), torch.ones(3))
    assert calls   # without a batch size, every batch size takes it
    assert_same_function(net, wino, out, out_w, rtol=1e-4)


def test_set_conv_algorithm_rejects_an_unknown_name():
    with pytest.raises(dnnlib.UserError, match='"fft" is not one of direct, winograd'):
        layers.set_conv_algorithm(_net(dropout=0), 'fft')


def test_winograd_refuses_a_network_it_would_not_change():
    net = networks_edm2.Precond(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1],
                                num_blocks=1, attn_resolutions=[])
    with pytest.raises(dnnlib.UserError, match='--winograd: Precond has no convolution it applies to'):
        layers.set_conv_algorithm(net, 'winograd')


@pytest.mark.parametrize('overrides, message', [
    (dict(channels_last=True), 'cannot be combined with --channels-last'),
    (dict(precision='bf16'), 'got --precision=bf16'),
])
def test_winograd_flag_conflicts_are_refused_up_front(overrides, message):
    with pytest.raises(dnnlib.UserError, match=message):
        presets.resolve('cifar10-ecm', dict(winograd=True, transfer='none', **overrides))


def test_winograd_is_cpu_fp32_only_at_run_time():
    runtime.check_winograd('fp32', torch.device('cpu'))
    with pytest.raises(dnnlib.UserError, match='fp32 CPU training only'):
        runtime.check_winograd('bf16', torch.device('cpu'))
    with pytest.raises(dnnlib.UserError, match='this run is fp32 on cuda'):
        runtime.check_winograd('fp32', torch.device('cuda'))


def test_only_the_trained_network_computes_by_winograd():
    options = presets.resolve('cifar10-ecm', dict(winograd=True, transfer='none', precision='fp32',
                                                  network_kwargs=dict(model_channels=8, channel_mult=[1], num_blocks=1,
                                                                      attn_resolutions=[])))

    class Data:
        num_channels, label_dim, resolution = 3, 0, 16
    state = tl.build_state(options, Data, torch.device('cpu'))
    convs = lambda net: [m for m in net.modules() if isinstance(m, layers.Conv2d)]
    assert convs(state.net) and all(m.conv_algorithm == 'winograd' for m in convs(state.net))
    assert all(m.winograd_batch == options.batch_size for m in convs(state.net))   # one process: the whole batch
    ema_nets = [net for _, net in state.ema.emas]
    assert ema_nets and all(m.conv_algorithm == 'direct' for net in ema_nets for m in convs(net))


def test_a_compiler_failure_is_one_clear_error(monkeypatch):
    def broken(*args):
        raise RuntimeError('InductorError: CppCompileError: C++ compile error\nlong compiler output')
    monkeypatch.setattr(winograd, 'conv3x3', broken)
    with pytest.raises(dnnlib.UserError, match=r'--winograd: torch.compile cannot build CPU kernels here .*'
                                               r'InductorError: CppCompileError: C\+\+ compile error$'):
        runtime.check_winograd('fp32', torch.device('cpu'))


def test_the_trainer_checks_winograd_before_any_work(monkeypatch, tmp_path):
    def refuse(precision, device):
        raise dnnlib.UserError(f'refused {precision} on {device.type}')
    monkeypatch.setattr(runtime, 'check_winograd', refuse)
    monkeypatch.setattr(runtime, 'build_dataset', lambda *args: pytest.fail('the dataset was built before the check'))
    options = presets.resolve('cifar10-ecm', dict(winograd=True, transfer='none', data=str(tmp_path / 'none.zip')))
    with pytest.raises(dnnlib.UserError, match='refused fp32 on cpu'):   # 'auto' resolved first
        tl.Trainer(options, str(tmp_path))
