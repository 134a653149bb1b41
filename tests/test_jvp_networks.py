"""Forward-mode AD through every architecture (training/networks/jvp.py): each preconditioned network's JVP along
random tangents of (x, sigma) against central finite differences in float64, the float32 JVP of the real network
against the float64 one, channels-last, EDM2's weight normalisation, shared dropout masks, and the refusal of a
network that cannot take a JVP.

The preconditioners compute in float32 whatever their input's dtype (samplers pass float64 images), so the float64
function is assembled here from the inner network run in float64 and the preconditioning written out below
(EDM Table 1; ECT's boundary form; Song et al. 2023 for openai's KarrasDenoiser)."""

import copy
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import dnnlib
from training import networks
from training.networks import edm2, jvp, layers, randomness
from training.networks.karras import KarrasDenoiser
from training.networks.meanflow_unet import MeanFlowPrecond
from training.networks.trigflow import TrigFlowPrecond

SIGMA = [0.4, 3.0]
TINY = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1)
ONE_LEVEL = dict(channel_mult=[1], attn_resolutions=[8])   # a bottleneck only: for the preconditioning forms
NCSNPP = dict(embedding_type='fourier', encoder_type='residual', decoder_type='skip', resample_filter=[1, 3, 3, 1],
              channel_mult_noise=2)
ADM = dict(model_type='DhariwalUNet', channels_per_head=8)

# name: (constructor, its kwargs, preconditioning form, call kwargs, label_dim, augment_dim)
CASES = {
    'edm-ddpmpp-attn-labels-augment': (networks.EDMPrecond, dict(model_type='SongUNet', attn_resolutions=[4],
                                       augment_dim=4), 'edm', {}, 3, 4),
    'vp-ddpmpp-noattn': (networks.VPPrecond, dict(attn_resolutions=[]), 'vp', {}, 0, 0),
    've-ncsnpp-attn-labels': (networks.VEPrecond, dict(attn_resolutions=[4], **NCSNPP), 've', {}, 3, 0),
    'ecm-ddpmpp-boundary': (networks.ECMPrecond, dict(model_type='SongUNet', **ONE_LEVEL), 'ecm', {}, 0, 0),
    'ecm-adm-attn-labels-augment-tuning': (networks.ECMPrecond, dict(attn_resolutions=[4], augment_dim=4, **ADM),
                                           'edm', dict(boundary=False), 3, 4),
    'edm2-attn-labels': (edm2.Precond, dict(attn_resolutions=[4], use_fp16=False), 'edm', {}, 3, 0),
    'edm2-boundary': (edm2.Precond, dict(use_fp16=False, ecm_sigma_min=0.002, **ONE_LEVEL), 'ecm', {}, 0, 0),
    'karras-consistency': (KarrasDenoiser, dict(model_channels=32, channels_per_head=16, **ONE_LEVEL), 'karras', {},
                           3, 0),
}

#----------------------------------------------------------------------------
# Helpers.

def _build(case, dropout=0):
    cls, kwargs, _, _, label_dim, _ = CASES[case]
    kwargs = dict(TINY, **kwargs, label_dim=label_dim)
    if cls is not edm2.Precond and cls is not KarrasDenoiser:
        kwargs.update(dropout=dropout, label_dropout=dropout)
    elif dropout:
        kwargs.update(dropout=dropout)
    torch.manual_seed(0)
    net = cls(**kwargs).eval()
    with torch.no_grad():   # no zero-initialised layer or gain: every path reaches the output
        for p in net.parameters():
            p.add_(torch.randn_like(p) / math.sqrt(p[0].numel() if p.ndim > 1 else 1) * 0.5)
    return net


def _inputs(case, dtype):
    label_dim, augment_dim = CASES[case][4:]
    gen = torch.Generator().manual_seed(1)
    x, tx = torch.randn(2, 3, 8, 8, generator=gen, dtype=dtype), torch.randn(2, 3, 8, 8, generator=gen, dtype=dtype)
    sigma, tsigma = torch.tensor(SIGMA, dtype=dtype), torch.randn(2, generator=gen, dtype=dtype)
    labels = torch.eye(label_dim, dtype=dtype)[[0, 2]] if label_dim else None
    augment = torch.randn(2, augment_dim, generator=gen, dtype=dtype) if augment_dim else None
    return (x, sigma), (tx, tsigma), labels, augment


def _coefficients(net, form, sigma):
    """(c_skip, c_out, c_in, c_noise) written out in sigma's dtype: [N, 1, 1, 1] each, c_noise [N]."""
    sigma = sigma.reshape(-1, 1, 1, 1)
    sd = net.sigma_data
    shift = sigma - (getattr(net, 'ecm_sigma_min', None) or net.sigma_min) if form in ('ecm', 'karras') else sigma
    root = (sigma ** 2 + sd ** 2).sqrt()
    c_skip, c_out, c_in, c_noise = sd ** 2 / (shift ** 2 + sd ** 2), shift * sd / root, 1 / root, sigma.log() / 4
    if form == 'vp':    # EDM Table 1, VP: sigma^-1(s) = (sqrt(beta_min^2 + 2 beta_d ln(1 + s^2)) - beta_min) / beta_d
        t = ((net.beta_min ** 2 + 2 * net.beta_d * (1 + sigma ** 2).log()).sqrt() - net.beta_min) / net.beta_d
        c_skip, c_out, c_in, c_noise = 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (net.M - 1) * t
    if form == 've':
        c_skip, c_out, c_in, c_noise = 1, sigma, 1, (sigma / 2).log()
    if form == 'karras':
        c_noise = 250 * (sigma + 1e-44).log()
    return c_skip, c_out, c_in, c_noise.flatten()


def _float64_function(net, case, labels, augment):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) in float64 around the network's own inner U-Net."""
    form = CASES[case][2]
    inner = net.unet if isinstance(net, edm2.Precond) else net.model
    kwargs = dict(augment_labels=augment) if augment is not None else {}

    def fn(x, sigma):
        c_skip, c_out, c_in, c_noise = _coefficients(net, form, sigma)
        return c_skip * x + c_out * inner(c_in * x, c_noise, labels, **kwargs)
    return fn


def _real_function(net, case, labels, augment):
    kwargs = dict(CASES[case][3], **(dict(augment_labels=augment) if augment is not None else {}))
    if isinstance(net, KarrasDenoiser) and labels is not None:
        labels = labels.argmax(dim=1)    # integer labels, as openai's
    return lambda x, sigma: net(x, sigma, labels, **kwargs)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())

#----------------------------------------------------------------------------
# 1. Every architecture in its preconditioner: float64 JVP = finite differences; float32 JVP = float64 JVP.

@pytest.mark.parametrize('case', list(CASES))
def test_jvp_matches_finite_differences_and_float32_matches_float64(case):
    net = _build(case)
    jvp.require_jvp_support(net, 'test')
    primals, tangents, labels, augment = _inputs(case, torch.float64)
    fn = _float64_function(net, case, labels, augment)
    out64, tangent64 = jvp.network_jvp(fn, primals, tangents)
    eps = 1e-6
    plus, minus = (fn(*(p + sign * eps * t for p, t in zip(primals, tangents))) for sign in (1, -1))
    assert tangent64.dtype == torch.float64 and tangent64.norm() > 1
    assert _rel(tangent64, (plus - minus) / (2 * eps)) < 1e-6
    # The network itself (its preconditioner in float32), in float32.
    labels, augment = (t.float() if t is not None else None for t in (labels, augment))
    out, tangent = jvp.network_jvp(_real_function(net, case, labels, augment), [p.float() for p in primals],
                                   [t.float() for t in tangents])
    assert out.dtype == tangent.dtype == torch.float32
    assert _rel(out.double(), out64) < 1e-5     # the same function as the float64 one
    # Float32 rounding of c_noise becomes phase errors: 999 sigma^-1(sigma) in VP's positional embedding, and
    # frequencies up to 2 pi 16 |N(0, 1)| in NCSN++'s Fourier features (VE): 1e-5 to 4e-5 there, 1e-7 to 4e-6 elsewhere.
    assert _rel(tangent.double(), tangent64) < (1e-4 if CASES[case][2] in ('vp', 've') else 2e-5)


def test_channels_last_jvp_matches_contiguous():
    case = 'ecm-adm-attn-labels-augment-tuning'
    net = _build(case)
    nhwc = layers.set_memory_format(copy.deepcopy(net), 'channels_last')
    primals, tangents, labels, augment = _inputs(case, torch.float32)
    out, tangent = jvp.network_jvp(_real_function(net, case, labels, augment), primals, tangents)
    out_cl, tangent_cl = jvp.network_jvp(_real_function(nhwc, case, labels, augment), primals, tangents)
    assert _rel(out_cl, out) < 1e-5 and _rel(tangent_cl, tangent) < 1e-5

#----------------------------------------------------------------------------
# 2. EDM2's weight normalisation inside a JVP: on the fly, never written back; normalize in forward mode.

def test_edm2_jvp_never_writes_weights():
    net = _build('edm2-boundary').train()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3)   # far from unit norm: an in-place normalisation would rewrite them
    before = {name: p.clone() for name, p in net.named_parameters()}
    primals, tangents, labels, _ = _inputs('edm2-boundary', torch.float32)
    jvp.network_jvp(lambda x, sigma: net(x, sigma, labels), primals, tangents)
    assert all(torch.equal(p, before[name]) for name, p in net.named_parameters())


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_edm2_normalize_in_forward_mode(dtype):
    x, tx = torch.randn(2, 8, 3, 3, dtype=torch.float64), torch.randn(2, 8, 3, 3, dtype=torch.float64)
    norm = lambda v: edm2.normalize(v, dim=1)
    _, t64 = torch.func.jvp(norm, (x,), (tx,))
    assert _rel(t64, (norm(x + 1e-6 * tx) - norm(x - 1e-6 * tx)) / 2e-6) < 1e-8
    _, t_low = torch.func.jvp(norm, (x.to(dtype),), (tx.to(dtype),))   # the norm in float32, the rest in dtype
    assert t_low.dtype == dtype and _rel(t_low.double(), t64) < 2e-2

#----------------------------------------------------------------------------
# 3. Dropout and label dropout: the JVP pass and an ordinary pass share masks through a DrawTape, either way round.

def _ordinary_pass(fn, primals):
    with sdpa_kernel(SDPBackend.MATH):  # the kernels of the JVP pass, so equal masks give equal bits
        return fn(*primals)


@pytest.mark.parametrize('case', ['ecm-adm-attn-labels-augment-tuning', 'edm2-attn-labels'])
def test_jvp_and_ordinary_passes_share_masks_either_way_round(case):
    net = _build(case, dropout=0.5).train()
    primals, tangents, labels, augment = _inputs(case, torch.float32)
    fn = _real_function(net, case, labels, augment)
    with randomness.sharing_draws(net) as tape:
        with tape.recording():
            recorded = _ordinary_pass(fn, primals)
        with tape.replaying():
            replayed, _ = jvp.network_jvp(fn, primals, tangents)
        with tape.recording():
            recorded_in_jvp, _ = jvp.network_jvp(fn, primals, tangents)
        assert tape.draws and not any(torch._C._functorch.is_functorch_wrapped_tensor(m) for m in tape.draws)
        with tape.replaying():
            replayed_in_ordinary = _ordinary_pass(fn, primals)
    assert torch.equal(replayed, recorded) and torch.equal(replayed_in_ordinary, recorded_in_jvp)
    assert _rel(recorded_in_jvp, recorded) > 0.1 and _rel(_ordinary_pass(fn, primals), recorded) > 0.1  # fresh masks


#----------------------------------------------------------------------------
# 4. The continuous-time forms: sCM's TrigFlow F_θ(x̂/σd, t̂) around an EDM network, and MeanFlow's u(z, r, t).

def _perturbed(net):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) / math.sqrt(p[0].numel() if p.ndim > 1 else 1) * 0.5)
    return net.eval()


def _trigflow_net():
    return _perturbed(TrigFlowPrecond(**TINY, denoiser='edm', model_type='SongUNet', attn_resolutions=[4]))


def _meanflow_net():
    return _perturbed(MeanFlowPrecond(**TINY, attn_resolutions=[4], augment_dim=0))


def _check_jvp(fn64, fn32, primals, tangents):
    """float64 JVP = central finite difference; the real network's float32 JVP = the float64 one."""
    _, tangent64 = jvp.network_jvp(fn64, primals, tangents)
    eps = 1e-6
    plus, minus = (fn64(*(p + sign * eps * t for p, t in zip(primals, tangents))) for sign in (1, -1))
    assert tangent64.norm() > 1 and _rel(tangent64, (plus - minus) / (2 * eps)) < 1e-6
    _, tangent = jvp.network_jvp(fn32, [p.float() for p in primals], [t.float() for t in tangents])
    assert tangent.dtype == torch.float32 and _rel(tangent.double(), tangent64) < 2e-5


def test_trigflow_form_takes_a_jvp():
    """F(x̂, t̂) = (cos t̂·x̂ − D(x̂/cos t̂, σd tan t̂)) / (σd sin t̂) (sCM §2), D written out in float64."""
    net = _trigflow_net()
    sd = net.sigma_data

    def fn64(x_hat, t_hat):
        t = t_hat.reshape(-1, 1, 1, 1)
        sigma = sd * t.tan()
        c_skip, c_out, c_in, c_noise = _coefficients(net, 'edm', sigma)
        x = x_hat / t.cos()
        denoised = c_skip * x + c_out * net.model(c_in * x, c_noise, None)
        return (t.cos() * x_hat - denoised) / (sd * t.sin())
    gen = torch.Generator().manual_seed(2)
    x_hat, tx = (torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    primals, tangents = (x_hat, torch.tensor([0.3, 1.2], dtype=torch.float64)), (tx, torch.ones(2, dtype=torch.float64))
    _check_jvp(fn64, lambda x, t: net(x, t, trigflow=True), primals, tangents)


def test_meanflow_form_takes_a_jvp():
    """u(z, r, t) = U-Net(z, (t, t − r)) (py-meanflow), along MeanFlow's tangent (v, 0, 1) and a random one."""
    net = _meanflow_net()

    def fn64(z, r, t):
        return net.model(z, (t, t - r), None, None)
    gen = torch.Generator().manual_seed(3)
    z, v = (torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    primals = (z, torch.tensor([0.1, 0.4], dtype=torch.float64), torch.tensor([0.5, 0.9], dtype=torch.float64))
    for tangents in [(v, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)),
                     (v, torch.randn(2, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen,
                                                                                        dtype=torch.float64))]:
        _check_jvp(fn64, lambda z, r, t: net(z, r, t), primals, tangents)

#----------------------------------------------------------------------------
# 5. Which networks can take a JVP: the allow-list, exactly the module types taken through a JVP above.

def test_allow_list_is_exactly_the_tested_module_types():
    tested = {type(m) for case in CASES for m in _build(case).modules()}
    tested |= {type(m) for net in (_trigflow_net(), _meanflow_net()) for m in net.modules()}
    assert tested == set(jvp.JVP_MODULE_TYPES)


def test_network_that_cannot_take_a_jvp_is_refused_in_one_line():
    class Custom(networks.EDMPrecond):  # a subclass may override forward with anything
        pass
    net = Custom(**TINY, attn_resolutions=[])
    with pytest.raises(dnnlib.UserError) as info:
        jvp.require_jvp_support(net, 'training.methods.scm.SCT')
    message = str(info.value)
    assert '\n' not in message and message.startswith('training.methods.scm.SCT: the network cannot take a JVP')
    assert 'Custom' in message and '(top level)' in message
    net = networks.EDMPrecond(**TINY, attn_resolutions=[])
    net.model.enc['8x8_conv'] = torch.nn.Conv2d(3, 16, 3, padding=1)
    with pytest.raises(dnnlib.UserError, match='"model.enc.8x8_conv" is a torch.nn.modules.conv.Conv2d'):
        jvp.require_jvp_support(net, 'training.methods.scm.SCT')
