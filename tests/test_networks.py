"""training/networks/ against the official EDM/ECT layouts and reference outputs (../shared/fixtures)."""

import json
import math

import pytest
import torch

import dnnlib
from conftest import FIXTURES_DIR, load_npz_meta
from training import networks

CASES = ['ddpmpp_cond', 'ncsnpp_uncond', 'adm_cond']
OUTPUTS = ['EDMPrecond', 'VPPrecond', 'VEPrecond', 'ECMPrecond_train', 'ECMPrecond_eval']

#----------------------------------------------------------------------------
# Helpers.

def _build(precond, m, **kwargs):
    """The preconditioner `precond` for the fixture case with meta `m`, on CPU, in eval mode."""
    kwargs = dict(m['network_kwargs'], **kwargs)
    if precond in ('EDMPrecond', 'ECMPrecond'):
        kwargs['sigma_data'] = m['sigma_data']
    if precond == 'ECMPrecond':
        kwargs['sigma_min'] = m['ecm_sigma_min']
    net = getattr(networks, precond)(img_resolution=m['img_resolution'], img_channels=m['img_channels'], label_dim=m['label_dim'], **kwargs)
    return net.eval()


def _fixture_net(edm_forward, case, precond):
    net = _build(precond, load_npz_meta(edm_forward)[case])
    prefix = f'{case}/param/'
    state = {k[len(prefix):]: torch.from_numpy(edm_forward[k]) for k in edm_forward.files if k.startswith(prefix)}
    net.load_state_dict(state, strict=True)
    return net


def _fixture_inputs(edm_forward, case):
    prefix = f'{case}/in/'
    ins = {k[len(prefix):]: torch.from_numpy(edm_forward[k]) for k in edm_forward.files if k.startswith(prefix)}
    model_kwargs = {'augment_labels': ins['augment_labels']} if 'augment_labels' in ins else {}
    return ins['x'], ins['sigma'], ins.get('class_labels'), model_kwargs

#----------------------------------------------------------------------------
# 1. Layouts of every official checkpoint: ordered tensor names, shapes and parameter counts.

def _layout_ids():
    with open(FIXTURES_DIR / 'edm_layouts.json') as f:
        return list(json.load(f))


@pytest.mark.parametrize('name', _layout_ids())
def test_official_layout(edm_layouts, name):
    entry = edm_layouts[name]
    precond = 'ECMPrecond' if name.startswith('ecm-') else entry['precond'] # The ECT network is an ECMPrecond.
    with torch.device('meta'):
        net = getattr(networks, precond)(img_resolution=entry['img_resolution'], img_channels=3,
            label_dim=entry['label_dim'], **entry['init_kwargs'])
    layout = [[name, list(t.shape)] for name, t in net.state_dict().items()]
    assert layout == entry['tensors']
    assert sum(p.numel() for p in net.parameters()) == entry['num_params']
    # DDPM++/NCSN++ attention is single-head (Song et al. 2021); ADM uses 64 channels per head (Dhariwal & Nichol 2021).
    song = entry['init_kwargs']['model_type'] == 'SongUNet'
    blocks = [m for m in net.modules() if isinstance(m, networks.UNetBlock) and m.num_heads]
    assert blocks and all(m.num_heads == (1 if song else m.out_channels // 64) for m in blocks)
    assert json.loads(json.dumps(net.init_kwargs)) == dict(entry['init_kwargs'], img_resolution=entry['img_resolution'],
        img_channels=3, label_dim=entry['label_dim'])

#----------------------------------------------------------------------------
# 2. Reference outputs of the official preconditioners wrapping the same inner weights.

@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('output', OUTPUTS)
def test_reference_forward(edm_forward, case, output):
    precond, _, form = output.partition('_')
    net = _fixture_net(edm_forward, case, precond)
    x, sigma, class_labels, model_kwargs = _fixture_inputs(edm_forward, case)
    if precond == 'ECMPrecond':
        model_kwargs['boundary'] = (form == 'eval')
    with torch.no_grad():
        out = net(x, sigma, class_labels, **model_kwargs)
    ref = torch.from_numpy(edm_forward[f'{case}/out/{output}'])
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # 1e-4 absolute; VP/VE scale F by |c_out| = sigma (up to 80), which scales F's float32 rounding noise
    # (~2e-6) by the same factor, so their tolerance grows with sigma / 10.
    c_out_abs = sigma if precond in ('VPPrecond', 'VEPrecond') else torch.zeros_like(sigma)
    tol = 1e-4 * torch.clamp(c_out_abs / 10, min=1)
    err = (out - ref).abs().amax(dim=(1, 2, 3))
    assert torch.all(err < tol), f'max abs error per sample {err.tolist()} exceeds {tol.tolist()}'


@pytest.mark.parametrize('case', CASES)
def test_resample_buffers_match_reference(edm_forward, case):
    # Buffers are not learned: a freshly built network must hold EDM's FIR filters exactly.
    net = _build('EDMPrecond', load_npz_meta(edm_forward)[case])
    buffers = dict(net.named_buffers())
    names = [k.split('/param/')[1] for k in edm_forward.files if k.startswith(f'{case}/param/') and k.endswith('resample_filter')]
    assert names
    for name in names:
        torch.testing.assert_close(buffers[name], torch.from_numpy(edm_forward[f'{case}/param/{name}']), rtol=0, atol=1e-7)

#----------------------------------------------------------------------------
# 3. ECM forms, mode independence, mixed precision.

@pytest.fixture(scope='module')
def ecm_ddpmpp(edm_forward):
    return _fixture_net(edm_forward, 'ddpmpp_cond', 'ECMPrecond'), _fixture_inputs(edm_forward, 'ddpmpp_cond')


def test_ecm_boundary_condition_exact(ecm_ddpmpp):
    net, (x, _, class_labels, model_kwargs) = ecm_ddpmpp
    sigma = torch.full([x.shape[0]], net.sigma_min)
    with torch.no_grad():
        assert torch.equal(net(x, sigma, class_labels, **model_kwargs), x)
        assert not torch.allclose(net(x, sigma, class_labels, boundary=False, **model_kwargs), x, atol=1e-3)


def test_ecm_forms_relation_float64(ecm_ddpmpp):
    # Both forms share F; recover F from the tuning form and rebuild the evaluation form with float64 coefficients.
    net, (x, sigma, class_labels, model_kwargs) = ecm_ddpmpp
    with torch.no_grad():
        d_train = net(x, sigma, class_labels, boundary=False, **model_kwargs).double()
        d_eval = net(x, sigma, class_labels, boundary=True, **model_kwargs).double()
    s, sd, smin, x = sigma.double().reshape(-1, 1, 1, 1), net.sigma_data, net.sigma_min, x.double()
    F = (d_train - sd ** 2 / (s ** 2 + sd ** 2) * x) / (s * sd / (s ** 2 + sd ** 2).sqrt())
    expected = sd ** 2 / ((s - smin) ** 2 + sd ** 2) * x + (s - smin) * sd / (s ** 2 + sd ** 2).sqrt() * F
    torch.testing.assert_close(d_eval, expected, rtol=0, atol=1e-3)
    assert (d_eval - d_train).abs().max() > 1e-3


@pytest.mark.parametrize('boundary', [True, False])
def test_ecm_form_independent_of_training_mode(ecm_ddpmpp, boundary):
    net, (x, sigma, class_labels, model_kwargs) = ecm_ddpmpp
    assert all(m.dropout == 0 for m in net.modules() if isinstance(m, networks.UNetBlock))
    with torch.no_grad():
        out_eval = net.eval()(x, sigma, class_labels, boundary=boundary, **model_kwargs)
        out_train = net.train()(x, sigma, class_labels, boundary=boundary, **model_kwargs)
    net.eval()
    assert torch.equal(out_eval, out_train)


@pytest.mark.parametrize('case', ['ddpmpp_cond', 'adm_cond'])
def test_bf16_autocast(edm_forward, case):
    net = _fixture_net(edm_forward, case, 'EDMPrecond')
    x, sigma, class_labels, model_kwargs = _fixture_inputs(edm_forward, case)
    conv_dtypes = set()
    hook = net.model.enc[next(iter(net.model.enc))].register_forward_hook(lambda m, i, o: conv_dtypes.add(o.dtype))
    with torch.no_grad():
        ref = net(x, sigma, class_labels, **model_kwargs)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = net(x, sigma, class_labels, **model_kwargs)
    hook.remove()
    assert conv_dtypes == {torch.float32, torch.bfloat16} # The second pass really ran in bfloat16.
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 5e-2

@pytest.mark.parametrize('case', CASES)
def test_fp16_inner_model(edm_forward, case):
    # use_fp16 runs the inner model on float16 inputs (CUDA only); the layers must follow the input dtype.
    net = _fixture_net(edm_forward, case, 'EDMPrecond')
    torch.manual_seed(0)
    x, noise_labels = torch.randn(2, 3, 32, 32), torch.tensor([0.1, 0.5])
    class_labels = torch.eye(net.label_dim)[:2] if net.label_dim else None
    with torch.no_grad():
        ref = net.model(x, noise_labels, class_labels)
        out = net.model(x.half(), noise_labels, class_labels)
    assert out.dtype == torch.float16
    assert 0 < (out.float() - ref).norm() / ref.norm() < 1e-2


def test_use_fp16_is_fp32_on_cpu(ecm_ddpmpp):
    net, (x, sigma, class_labels, model_kwargs) = ecm_ddpmpp
    with torch.no_grad():
        ref = net(x, sigma, class_labels, **model_kwargs)
        net.use_fp16 = True
        out = net(x, sigma, class_labels, **model_kwargs)
        net.use_fp16 = False
    assert torch.equal(out, ref)


#----------------------------------------------------------------------------
# Layers against independent references.

def test_attention_multihead_matches_float64_reference():
    # EDM's layout: qkv channels grouped as [head, channel, q/k/v]; softmax(q^T k / sqrt(C/heads)) v.
    torch.manual_seed(0)
    n, c, heads, h, w = 2, 12, 3, 4, 5
    qkv = torch.randn(n, 3 * c, h, w)
    q, k, v = qkv.double().reshape(n * heads, c // heads, 3, h * w).unbind(2)
    weights = torch.einsum('ncq,nck->nqk', q, k / math.sqrt(c // heads)).softmax(dim=2)
    expected = torch.einsum('nqk,nck->ncq', weights, v).reshape(n, c, h, w)
    torch.testing.assert_close(networks.attention(qkv, heads).double(), expected, rtol=0, atol=1e-5)
    assert (networks.attention(qkv, 1).double() - expected).abs().max() > 1e-2 # The head split matters.


def test_attention_head_count():
    song = networks.UNetBlock(in_channels=256, out_channels=256, emb_channels=8, attention=True, num_heads=1)
    adm = networks.UNetBlock(in_channels=256, out_channels=256, emb_channels=8, attention=True, channels_per_head=64)
    tiny = networks.UNetBlock(in_channels=32, out_channels=32, emb_channels=8, attention=True, channels_per_head=64)
    assert (song.num_heads, adm.num_heads, tiny.num_heads) == (1, 4, 1)


def test_conv2d_box_resampling_matches_pooling():
    # Filter [1, 1]: downsampling is 2x2 average pooling, upsampling is nearest-neighbour.
    x = torch.randn(2, 3, 8, 8)
    down = networks.Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 1])
    up = networks.Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 1])
    torch.testing.assert_close(down(x), torch.nn.functional.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest'))
    assert networks.Conv2d(3, 3, kernel=3).resample_filter is None


def test_fused_downsample_is_convolution_then_filter():
    # Fused: convolve at full resolution, then filter and subsample. Reference from two unfused layers,
    # equal away from the border (the fused path zero-pads before the convolution, not between the two steps).
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    fused = networks.Conv2d(4, 6, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True, init_bias=1)
    conv = networks.Conv2d(4, 6, kernel=3)
    conv.load_state_dict({k: v for k, v in fused.state_dict().items() if k != 'resample_filter'})
    down = networks.Conv2d(6, 6, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    out, expected = fused(x), down(conv(x))
    assert out.shape == expected.shape == (2, 6, 4, 4)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    assert (out - expected).abs().max() > 1e-3 # The border differs, so the test sees the fused path.


def test_positional_embedding_float64_reference():
    x = torch.tensor([0.0, 0.5, 3.0])
    for endpoint in (False, True):
        emb = networks.PositionalEmbedding(num_channels=8, endpoint=endpoint)(x).double()
        freqs = (1 / 10000) ** (torch.arange(4, dtype=torch.float64) / (4 - int(endpoint)))
        args = torch.outer(x.double(), freqs)
        torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], dim=1), rtol=0, atol=1e-6)


def test_vp_schedule_roundtrip_and_limits():
    net = networks.VPPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    beta_d, beta_min = 19.9, 0.1
    # EDM evaluates sigma(epsilon_t) in float32, where exp(1e-6) - 1 keeps only a few bits (2^-10 instead of 1.0005e-3).
    assert math.isclose(net.sigma_min, math.sqrt(math.expm1(0.5 * beta_d * 1e-10 + beta_min * 1e-5)), rel_tol=0.03)
    assert math.isclose(net.sigma_max, math.sqrt(math.exp(0.5 * beta_d + beta_min) - 1), rel_tol=1e-6)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t)

#----------------------------------------------------------------------------
# Construction: user errors, persistence, scalar sigma.

@pytest.mark.parametrize('kwargs, flag', [
    (dict(model_type='UNet'), 'model_type'),
    (dict(model_type='SongUNet', embedding_type='sinusoidal'), 'embedding_type'),
    (dict(model_type='SongUNet', encoder_type='fancy'), 'encoder_type'),
    (dict(model_type='SongUNet', decoder_type='residual'), 'decoder_type'),
])
def test_bad_config_raises_user_error(kwargs, flag):
    with pytest.raises(dnnlib.UserError, match=flag):
        networks.EDMPrecond(img_resolution=8, img_channels=3, **kwargs)


def test_scalar_sigma_broadcasts(ecm_ddpmpp):
    net, (x, _, class_labels, model_kwargs) = ecm_ddpmpp
    with torch.no_grad():
        by_scalar = net(x[:2], 2.0, class_labels[:2], **{k: v[:2] for k, v in model_kwargs.items()})
        by_vector = net(x[:2], torch.tensor([2.0, 2.0]), class_labels[:2], **{k: v[:2] for k, v in model_kwargs.items()})
    torch.testing.assert_close(by_scalar, by_vector, rtol=0, atol=1e-6)


def test_preconditioner_attributes_and_init_kwargs():
    net = networks.ECMPrecond(img_resolution=8, img_channels=3, label_dim=2, model_type='SongUNet', model_channels=8,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.2)
    assert (net.img_resolution, net.img_channels, net.label_dim, net.sigma_min, net.sigma_data, net.use_fp16) == (8, 3, 2, 0.003, 0.5, False)
    assert net.init_kwargs['model_type'] == 'SongUNet' and net.init_kwargs['dropout'] == 0.2
    rebuilt = networks.ECMPrecond(**json.loads(json.dumps(net.init_kwargs)))
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == [(k, v.shape) for k, v in net.state_dict().items()]
    assert isinstance(net.round_sigma(0.5), torch.Tensor) and float(net.round_sigma(0.5)) == 0.5

#----------------------------------------------------------------------------

@pytest.mark.parametrize('precond', ['VPPrecond', 'VEPrecond', 'EDMPrecond', 'ECMPrecond'])
def test_module_conversions_work(precond):
    # Module.to()/.double()/.half() go through nn.Module._apply; a preconditioner must not shadow it.
    net = getattr(networks, precond)(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8,
                                     channel_mult=[1], num_blocks=1, attn_resolutions=[])
    assert net.to('cpu') is net
    assert all(p.dtype == torch.float64 for p in net.double().parameters())
    assert all(p.dtype == torch.float16 for p in net.half().parameters())
