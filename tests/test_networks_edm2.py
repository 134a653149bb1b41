"""EDM2 U-Net and preconditioner: official forward outputs, the img64-S layout, side-effect-free weight
normalisation, dropout placement, ECT's boundary form, autocast and construction from init_kwargs."""

import copy as copy_module

import numpy as np
import pytest
import torch

import dnnlib
from conftest import load_npz_meta
from training.networks import edm2 as networks_edm2
from training.networks.edm2 import MPConv, Precond, UNet

IMG64_S = dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, channel_mult=[1, 2, 3, 4],
               num_blocks=3, attn_resolutions=[16, 8])


def fixture_kwargs(edm2_forward):
    meta = load_npz_meta(edm2_forward)
    return dict(img_resolution=meta['img_resolution'], img_channels=meta['img_channels'],
                label_dim=meta['label_dim'], sigma_data=meta['sigma_data'], **meta['unet_kwargs'])


def fixture_net(edm2_forward, **overrides):
    """The fixture network with its stored weights, loaded strictly, in eval mode."""
    net = Precond(**{**fixture_kwargs(edm2_forward), **overrides})
    state = {k[len('param/'):]: torch.from_numpy(edm2_forward[k]) for k in edm2_forward.files
             if k.startswith('param/')}
    net.load_state_dict(state, strict=True)
    return net.eval()


def fixture_inputs(edm2_forward):
    return tuple(torch.from_numpy(edm2_forward[f'in/{k}']) for k in ('x', 'sigma', 'class_labels'))


def run(net, inputs, **kwargs):
    with torch.no_grad():
        return net(*inputs, **kwargs)


def test_matches_official_forward(edm2_forward):
    out = run(fixture_net(edm2_forward), fixture_inputs(edm2_forward))
    ref = torch.from_numpy(edm2_forward['out/Precond_eval'])
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-4


def test_img64_s_layout(edm2_forward):
    layout = load_npz_meta(edm2_forward)['layout_edm2_img64_s']
    with torch.device('meta'):
        net = Precond(**IMG64_S)
    names_shapes = [[name, list(t.shape)] for name, t in net.state_dict().items()]
    assert names_shapes == layout['tensors']
    assert sum(p.numel() for p in net.parameters()) == layout['num_params']
    assert all(t.device.type == 'meta' for t in net.state_dict().values())


def test_train_and_eval_modes_agree_at_dropout_zero(edm2_forward):
    net, inputs = fixture_net(edm2_forward), fixture_inputs(edm2_forward)
    out_eval = run(net, inputs)
    out_train = run(net.train(), inputs)
    assert torch.equal(out_eval, out_train)


def test_train_forward_has_no_side_effects(edm2_forward):
    net, inputs = fixture_net(edm2_forward), fixture_inputs(edm2_forward)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = net(*inputs)
    first.square().sum().backward()
    second = run(net, inputs)
    assert torch.equal(first.detach(), second)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() > 0 for g in grads) == len(grads)


def test_normalize_weights_projects_in_place_without_changing_outputs(edm2_forward):
    net, inputs = fixture_net(edm2_forward), fixture_inputs(edm2_forward)
    convs = [m for m in net.modules() if isinstance(m, MPConv)]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # give every output channel its own norm, far from the normalised one
        for conv in convs:
            scale = torch.rand([conv.weight.shape[0]] + [1] * (conv.weight.ndim - 1), generator=gen) * 3 + 0.2
            conv.weight.mul_(scale)
    raw = {id(c): c.weight.detach().to(torch.float64).clone() for c in convs}
    out_before = run(net, inputs)
    net.normalize_weights_()
    out_after = run(net, inputs)
    assert (out_after - out_before).abs().max().item() < 1e-4

    # Row i becomes w_i / (eps + rms_i): norm sqrt(fan_in) · rms_i / (rms_i + eps) with eps = 1e-4.
    for conv in convs:
        w0 = raw[id(conv)].flatten(1)
        fan_in = w0.shape[1]
        rms = w0.norm(dim=1) / np.sqrt(fan_in)
        expected = np.sqrt(fan_in) * rms / (rms + 1e-4)
        got = conv.weight.detach().to(torch.float64).flatten(1).norm(dim=1)
        assert not torch.allclose(w0.norm(dim=1), expected, rtol=1e-2)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(conv.weight.detach().to(torch.float64).flatten(1), w0 / (rms[:, None] + 1e-4),
                                   rtol=1e-5, atol=1e-6)


def reference_attention(qkv, num_heads):
    """EDM2's attention in float64 written with explicit loops over heads: per head, channels are stored
    as [channel, (q, k, v)], each pixel's q/k/v is RMS-normalised (eps 1e-4) across the head's channels."""
    qkv = qkv.to(torch.float64)
    n, c3, h, w = qkv.shape
    c = c3 // 3 // num_heads
    heads = []
    for head in range(num_heads):
        block = qkv[:, head * 3 * c:(head + 1) * 3 * c].reshape(n, c, 3, h * w)
        q, k, v = (block[:, :, i] / (1e-4 + block[:, :, i].norm(dim=1, keepdim=True) / np.sqrt(c)) for i in range(3))
        weights = torch.softmax(torch.einsum('ncq,nck->nqk', q, k) / np.sqrt(c), dim=2)
        heads.append(torch.einsum('nqk,nck->ncq', weights, v))
    return torch.cat(heads, dim=1).reshape(n, num_heads * c, h, w)


@pytest.mark.parametrize('num_heads', [1, 3])
def test_attention_matches_float64_reference(num_heads):
    qkv = torch.randn([2, 3 * 16 * num_heads, 4, 4], generator=torch.Generator().manual_seed(num_heads)) * 2
    got = networks_edm2.pixel_norm_attention(qkv, num_heads)
    assert (got.to(torch.float64) - reference_attention(qkv, num_heads)).abs().max().item() < 1e-5


def test_magnitude_preserving_primitives():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn([2, 4000, 8, 8], generator=gen).to(torch.float64).unbind(0)
    rms = lambda t: t.square().mean().sqrt().item()
    assert abs(rms(networks_edm2.mp_silu(a)) - 1) < 0.01
    assert abs(rms(networks_edm2.mp_sum(a, b, t=0.3)) - 1) < 0.01
    cat = networks_edm2.mp_cat(a[:1000], b, dim=0, t=0.3)
    assert cat.shape[0] == 5000 and abs(rms(cat) - 1) < 0.01
    # Balance t = 0.3 weights the second input's share of the energy as t^2 : (1-t)^2 (per channel, 1000 vs 4000).
    energy_a, energy_b = cat[:1000].square().sum().item(), cat[1000:].square().sum().item()
    assert abs(energy_b / energy_a - 0.3 ** 2 / 0.7 ** 2) < 0.02
    normed = networks_edm2.normalize(a * 5, dim=1)
    torch.testing.assert_close(normed.square().mean(dim=1), torch.ones_like(normed[:, 0]), rtol=1e-3, atol=0)
    fourier = networks_edm2.MPFourier(4096)
    assert abs(rms(fourier(torch.tensor([0.3, -1.2]))) - 1) < 0.05


def test_dropout_only_at_low_resolutions(edm2_forward):
    kwargs = {**fixture_kwargs(edm2_forward), 'dropout': 0.5, 'dropout_res': 8}
    unet = Precond(**kwargs).unet
    for layers in (unet.enc, unet.dec):
        for name, layer in layers.items():
            if not isinstance(layer, MPConv):
                assert layer.dropout == (0.5 if name.startswith('8x8') else 0), name

    inputs = fixture_inputs(edm2_forward)
    active = fixture_net(edm2_forward, dropout=0.5, dropout_res=8)
    assert not torch.equal(run(active.train(), inputs), run(active.eval(), inputs))
    inactive = fixture_net(edm2_forward, dropout=0.5, dropout_res=4)
    assert torch.equal(run(inactive.train(), inputs), run(inactive.eval(), inputs))


def test_dropout_masks_follow_the_rng_state(edm2_forward):
    net, inputs = fixture_net(edm2_forward, dropout=0.3).train(), fixture_inputs(edm2_forward)
    state = torch.get_rng_state()
    first = run(net, inputs)
    torch.set_rng_state(state)
    second = run(net, inputs)
    third = run(net, inputs)
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_ecm_boundary_form(edm2_forward):
    sigma_min = 0.003
    net = fixture_net(edm2_forward, ecm_sigma_min=sigma_min)
    x, sigma, labels = fixture_inputs(edm2_forward)
    assert net.sigma_min == sigma_min
    plain = torch.from_numpy(edm2_forward['out/Precond_eval'])
    assert (run(net, (x, sigma, labels), boundary=False) - plain).abs().max().item() < 1e-4

    at_min = run(net, (x, torch.full_like(sigma, sigma_min), labels))
    assert torch.equal(at_min, x)

    # Boundary form from the plain one, in float64: F = (D − c_skip·x)/c_out, then the ECM scalings.
    got = run(net, (x, sigma, labels)).to(torch.float64)
    s, sd, x64 = sigma.to(torch.float64).reshape(-1, 1, 1, 1), 0.5, x.to(torch.float64)
    F = (plain.to(torch.float64) - sd ** 2 / (s ** 2 + sd ** 2) * x64) / (s * sd / (s ** 2 + sd ** 2).sqrt())
    ref = sd ** 2 / ((s - sigma_min) ** 2 + sd ** 2) * x64 + (s - sigma_min) * sd / (s ** 2 + sd ** 2).sqrt() * F
    assert (got - ref).abs().max().item() < 1e-4
    assert (got - plain).abs().max().item() > 1e-3


def test_bfloat16_autocast_on_cpu(edm2_forward):
    net, (x, sigma, labels) = fixture_net(edm2_forward), fixture_inputs(edm2_forward)
    ref = run(net, (x, sigma, labels))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(x, sigma, labels)
        inner = net.unet(x, sigma.log() / 4, labels)
    assert inner.dtype == torch.bfloat16
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert (out - ref).abs().max().item() > 0  # it really ran in reduced precision


def test_float16_unet_path(edm2_forward):
    """What use_fp16 does on CUDA (the U-Net fed float16 activations), run on the CPU; Precond keeps
    float32 off CUDA, as EDM2 does."""
    net, (x, sigma, labels) = fixture_net(edm2_forward), fixture_inputs(edm2_forward)
    assert net.use_fp16 and torch.equal(run(net, (x, sigma, labels)), run(net, (x, sigma, labels), force_fp32=True))
    x_in = x / (sigma ** 2 + 0.25).sqrt().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        full = net.unet(x_in, sigma.log() / 4, labels)
        half = net.unet(x_in.half(), sigma.log() / 4, labels)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert 0 < (half.float() - full).abs().max().item() < 0.02 * full.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_float16_on_cuda(edm2_forward):
    net, inputs = fixture_net(edm2_forward, use_fp16=True).cuda(), [t.cuda() for t in fixture_inputs(edm2_forward)]
    half = run(net, inputs)
    full = run(net, inputs, force_fp32=True)
    ref = torch.from_numpy(edm2_forward['out/Precond_eval']).cuda()
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (full - ref).abs().max().item() < 1e-3
    assert 0 < (half - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_rebuild_from_init_kwargs(edm2_forward):
    net, inputs = fixture_net(edm2_forward, dropout_res=8), fixture_inputs(edm2_forward)
    kwargs = net.init_kwargs
    assert kwargs['dropout_res'] == 8 and kwargs['model_channels'] == 32
    copy = dnnlib.util.construct_class_by_name(class_name='training.networks.edm2.Precond', **kwargs)
    copy.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(run(copy.eval(), inputs), run(net, inputs))
    assert isinstance(net.unet, UNet) and net.unet.init_kwargs['label_dim'] == 10
    ema = copy_module.deepcopy(net)
    assert torch.equal(run(ema, inputs), run(net, inputs)) and ema.unet.out_gain is not net.unet.out_gain


def test_logvar_head_is_opt_in(edm2_forward):
    kwargs = fixture_kwargs(edm2_forward)
    names = set(Precond(**kwargs, logvar_channels=128).state_dict()) - set(Precond(**kwargs).state_dict())
    assert names == {'logvar_fourier.freqs', 'logvar_fourier.phases', 'logvar_linear.weight'}
    net = Precond(**kwargs, logvar_channels=128).eval()
    x, sigma, labels = fixture_inputs(edm2_forward)
    _, logvar = run(net, (x, sigma, labels), return_logvar=True)
    assert logvar.shape == (x.shape[0], 1, 1, 1) and torch.isfinite(logvar).all()
    with pytest.raises(dnnlib.util.UserError, match='logvar_channels'):
        run(Precond(**kwargs), (x, sigma, labels), return_logvar=True)


def test_bad_configuration_and_inputs(edm2_forward):
    kwargs = fixture_kwargs(edm2_forward)
    with pytest.raises(dnnlib.util.UserError, match='img_resolution'):
        Precond(**{**kwargs, 'img_resolution': 15})
    with pytest.raises(dnnlib.util.UserError, match='channel_mult'):
        Precond(**{**kwargs, 'channel_mult': []})
    with pytest.raises(dnnlib.util.UserError, match='ecm_sigma_min'):
        Precond(**kwargs, ecm_sigma_min=-1.0)
    x, sigma, labels = fixture_inputs(edm2_forward)
    with pytest.raises(dnnlib.util.UserError, match=r'\[N, 3, 16, 16\]'):
        run(Precond(**kwargs), (x[:, :, :8, :8], sigma, labels))
