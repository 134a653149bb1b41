"""training/data/augment.py against NVlabs/edm's AugmentPipe and EDMLoss (tests/data/edm_augment/, made by running the
official classes on the CPU), and its integration into the EDM training method (docs/AUGMENT.md)."""

import json
import pathlib

import numpy as np
import pytest
import torch

import dnnlib
from training.data.augment import AugmentPipe
from training.methods.edm import EDM
from training.methods.loss import network_augment_dim
from training.methods.loss import EDMLoss
from training.networks import EDMPrecond

REFERENCE = pathlib.Path(__file__).parent / 'data' / 'edm_augment' / 'edm_augment.npz'
CIFAR10 = dict(class_name='training.data.augment.AugmentPipe', p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
               aniso=1, translate_frac=1)   # edm train.py:144-145


@pytest.fixture(scope='module')
def reference():
    with np.load(REFERENCE) as npz:
        arrays = {key: npz[key] for key in npz.files}
    return arrays, json.loads(bytes(arrays['meta']).decode())


def _relative_error(got, expected):
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30)


def toy_denoiser(x, sigma, class_labels=None, augment_labels=None):
    """The parameter-free stand-in of make_edm_augment.py: depends on the noisy images, σ and the augment labels."""
    return x / (1 + sigma ** 2) + 0.1 * augment_labels.sum(dim=1).reshape(-1, 1, 1, 1) * torch.tanh(x)


def _tiny_net(augment_dim, seed=0):
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
                     num_blocks=1, attn_resolutions=[], augment_dim=augment_dim)
    with torch.no_grad():   # the output layer starts at zero: randomise every weight so gradients reach map_augment
        for param in net.parameters():
            param.normal_(0, 0.1)
    return net

#----------------------------------------------------------------------------
# The pipeline against EDM's.

CASES = ['cifar10', 'cifar10_p0', 'color', 'every_p1', 'every_p1_custom', 'grey_p1', 'nonsquare_p1', 'meanflow']


@pytest.mark.parametrize('case', CASES)
def test_outputs_labels_and_rng_stream_equal_edms(reference, case):
    arrays, meta = reference
    spec = meta['cases'][case]
    pipe = AugmentPipe(**spec['kwargs'])
    torch.manual_seed(spec['seed'])
    out, labels = pipe(torch.from_numpy(arrays[f'{case}__images']))
    next_draws = torch.rand([meta['next_draws']])
    expected, expected_labels = arrays[f'{case}__out'], arrays[f'{case}__labels']
    assert out.dtype == labels.dtype == torch.float32 and out.shape == expected.shape
    assert labels.shape == expected_labels.shape == (len(expected), pipe.label_dim)
    for got_sample, expected_sample in zip(out.numpy(), expected):   # whole images, one sample at a time
        assert _relative_error(got_sample, expected_sample) < 1e-5
    assert _relative_error(labels.numpy(), expected_labels) < 1e-6
    assert torch.equal(next_draws, torch.from_numpy(arrays[f'{case}__next']))   # the same draws, no more, no fewer


def test_the_reference_cases_exercise_every_transform(reference):
    arrays, meta = reference
    assert all(np.abs(arrays['cifar10__labels'][:, 1:]).max(axis=0) > 0)   # every CIFAR-10 label column, at p = 0.12
    assert _relative_error(arrays['every_p1__out'], arrays['every_p1__images']) > 0.5
    assert meta['cases']['cifar10']['kwargs'] == {k: v for k, v in CIFAR10.items() if k != 'class_name'}


def test_p0_is_the_identity_with_zero_labels():
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    blit_and_color = AugmentPipe(p=0, xflip=1e8, yflip=1, rotate_int=1, translate_int=1, brightness=1, contrast=1,
                                 lumaflip=1, hue=1, saturation=1)
    out, labels = blit_and_color(images)
    assert torch.equal(out, images) and labels.shape == (4, 12) and not labels.any()
    # The geometric warp still runs (as in EDM): the sym6 2x round trip is the identity up to float32 rounding.
    out, labels = AugmentPipe(**{k: v for k, v in CIFAR10.items() if k != 'class_name'} | dict(p=0))(images)
    assert labels.shape == (4, 9) and not labels.any()
    assert 0 < _relative_error(out, images) < 1e-5


def test_float32_arithmetic_under_autocast():
    pipe = AugmentPipe(p=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1, brightness=1, hue=1, saturation=1)
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    torch.manual_seed(1)
    plain = pipe(images)
    torch.manual_seed(1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        autocast = pipe(images)
    assert all(torch.equal(a, b) for a, b in zip(plain, autocast)) and autocast[0].dtype == torch.float32


@pytest.mark.parametrize('kwargs, shape, match', [
    (dict(p=-0.1), None, 'p must be'), (dict(xflip='often'), None, 'xflip must be'),
    (dict(scale_std=float('nan')), None, 'scale_std must be'),
    (dict(hue=1), [2, 2, 8, 8], 'color transforms need 1 or 3 channels'),
    (dict(rotate_int=1), [2, 3, 8, 12], 'rotate_int needs square images'),
])
def test_bad_settings_and_shapes_are_user_errors(kwargs, shape, match):
    with pytest.raises(dnnlib.UserError, match=match):
        AugmentPipe(**kwargs)(torch.zeros(shape or [2, 3, 8, 8]))

#----------------------------------------------------------------------------
# The EDM loss and training method.

def test_edm_loss_with_augmentation_equals_edms(reference):
    arrays, meta = reference
    spec = meta['loss']
    loss_fn = EDMLoss(P_mean=spec['P_mean'], P_std=spec['P_std'], sigma_data=spec['sigma_data'],
                      augment_pipe=AugmentPipe(**spec['kwargs']))
    torch.manual_seed(spec['seed'])
    got = loss_fn(toy_denoiser, torch.from_numpy(arrays['loss__images']))
    next_draws = torch.rand([meta['next_draws']])
    expected = arrays['loss__elementwise'].astype(np.float64).reshape(len(got), -1).sum(axis=1)   # EDM: per element
    assert got.shape == (len(expected),) and _relative_error(got.numpy(), expected) < 1e-5
    assert torch.equal(next_draws, torch.from_numpy(arrays['loss__next']))


def test_edm_method_augments_and_conditions_the_network():
    net = _tiny_net(augment_dim=9)
    method = EDM(augment_kwargs=CIFAR10 | dict(p=1.0))
    method.setup(net, torch.device('cpu'))
    seen = []
    net.model.map_augment.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    torch.manual_seed(3)
    loss = method.loss(net, images)
    torch.manual_seed(3)
    torch.randn([4, 1, 1, 1])   # EDM's order: the noise levels, then the augmentation
    _, expected_labels = AugmentPipe(**{k: v for k, v in CIFAR10.items() if k != 'class_name'} | dict(p=1.0))(images)
    assert len(seen) == 1 and torch.equal(seen[0], expected_labels) and expected_labels[:, 1:].abs().sum() > 0
    loss.sum().backward()
    assert loss.shape == (4,) and net.model.map_augment.weight.grad.abs().sum() > 0
    wrapped = torch.nn.Module()
    wrapped.module = net   # as DDP holds it
    assert network_augment_dim(wrapped) == 9 and network_augment_dim(_tiny_net(0)) == 0


def test_without_augment_kwargs_the_edm_loss_is_unchanged():
    net = _tiny_net(augment_dim=0)
    method = EDM()
    method.setup(net, torch.device('cpu'))
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.manual_seed(4)
    got = method.loss(net, images)
    torch.manual_seed(4)
    rnd_normal, eps = torch.randn([2, 1, 1, 1]), torch.randn([2, 3, 8, 8])
    assert method.loss_fn.augment_pipe is None
    assert torch.equal(got, EDMLoss().loss_from_noise(net, images, rnd_normal, eps))


@pytest.mark.parametrize('augment_dim, augment_kwargs, match', [
    (0, CIFAR10, 'gives 9 augment labels but the network has augment_dim=0'),
    (6, CIFAR10, 'set augment_dim=9 in the preset'),
    (9, None, 'has no augment_kwargs'),
])
def test_augment_dim_mismatch_is_a_user_error_in_setup(augment_dim, augment_kwargs, match):
    method = EDM(augment_kwargs=augment_kwargs)
    with pytest.raises(dnnlib.UserError, match=match):
        method.setup(_tiny_net(augment_dim), torch.device('cpu'))


def test_bad_augment_kwargs_are_user_errors():
    with pytest.raises(dnnlib.UserError, match='augment_kwargs'):
        EDM(augment_kwargs='xflip')
    with pytest.raises(dnnlib.UserError, match='p must be'):
        EDM(augment_kwargs=dict(CIFAR10, p=-1))
