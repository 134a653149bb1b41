"""Detectors from files built the way their producers build them, against independent float64 computations.

Inception-v3 / VGG16: NVIDIA persistence pickles (tests/nvidia_detectors.py) read safely into this project's own
graphs. DINOv2: state dicts with the official tensor names in the ViT-S/B/L/g shapes (depth 1).
"""

import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import fid
from metrics import detectors, metric_utils
from tests import nvidia_detectors
from test_fid_cli import write_dataset


@pytest.fixture(scope='module')
def inception(tmp_path_factory):
    net = nvidia_detectors.make_standin('inception', seed=1)
    path = nvidia_detectors.write_pickle(tmp_path_factory.mktemp('det') / 'inception-2015-12-05.pkl', net)
    return path, net.double()


def _images(seed, n=3, size=(40, 56)):
    return torch.randint(0, 256, [n, 3, *size], dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_tf_resize_matches_written_out_formula():
    from metrics.detector_nets import tf_resize_bilinear
    x = torch.rand([2, 3, 13, 21], dtype=torch.float64) * 255
    expected = nvidia_detectors.tf_resize_reference(x.numpy(), 29)
    np.testing.assert_allclose(tf_resize_bilinear(x, 29).numpy(), expected, rtol=0, atol=1e-9)


def test_nvidia_inception_pickle_features_and_probs(inception):
    path, reference = inception
    images = _images(0)
    expected_features, expected_probs = reference.reference(images)
    features = detectors.get_detector('inception', path)(images)
    assert features.dtype == torch.float32 and features.shape == expected_features.shape
    np.testing.assert_allclose(features.numpy(), expected_features.numpy(), rtol=1e-4, atol=1e-5)
    probs = detectors.get_detector('inception_probs', path)(images)
    np.testing.assert_allclose(probs.numpy(), expected_probs.numpy(), rtol=1e-4, atol=1e-6)
    grey = detectors.get_detector('inception', path)(images[:, :1])
    np.testing.assert_allclose(grey.numpy(), reference.reference(images[:, :1].repeat(1, 3, 1, 1))[0].numpy(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')  # 8 images, 64 features: singular covariances
def test_inception_state_dict_gives_the_same_fid_as_the_pickle(inception, tmp_path):
    """The two published forms (pickle, plain state dict with the same names) give the same FID to 1e-4."""
    path, reference = inception
    state = {k: v.to(torch.float32) for k, v in reference.state_dict().items()}
    torch.save(state, tmp_path / 'inception.pth')
    real, fake = _images(1, n=8), _images(2, n=8)
    fids = []
    for source in (path, str(tmp_path / 'inception.pth')):
        det = detectors.get_detector('inception', source)
        a, b = det(real).double().numpy(), det(fake).double().numpy()
        fids.append(metric_utils.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
    assert fids[0] == pytest.approx(fids[1], rel=1e-4)


def test_torchscript_twin_is_read_as_data_and_gives_the_pickle_s_features(inception, tmp_path):
    """stylegan2-ada-pytorch's inception-2015-12-05.pt is the TorchScript form of the same network (same module
    tree and tensor names); a TorchScript file made with torch.jit from the stand-in is read without
    torch.jit.load and gives features identical to the pickle's."""
    path, reference = inception
    net = nvidia_detectors.make_standin('inception', seed=1).requires_grad_(False)
    with torch.no_grad():
        scripted = torch.jit.trace(nvidia_detectors.FeatureTrace(net), torch.rand(1, 3, 299, 299))
    torch.jit.save(scripted, str(tmp_path / 'inception-2015-12-05.pt'))
    images = _images(4)
    from_script = detectors.get_detector('inception', str(tmp_path / 'inception-2015-12-05.pt'))(images)
    torch.testing.assert_close(from_script, detectors.get_detector('inception', path)(images), rtol=0, atol=0)


def test_nvidia_vgg16_pickle_features(tmp_path):
    net = nvidia_detectors.make_standin('vgg16', seed=2)
    path = nvidia_detectors.write_pickle(tmp_path / 'vgg16.pkl', net)
    images = _images(3)
    features = detectors.get_detector('vgg16', path)(images)
    expected = net.double().reference(images)
    np.testing.assert_allclose(features.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)


class _ScriptedVGG16(torch.nn.Module):
    """A VGG16 stand-in's module tree (`layers`, `lpips0` ..) behind a scriptable forward, for torch.jit.script."""

    def __init__(self, net):
        super().__init__()
        self.layers = net.layers
        for i in range(5):
            setattr(self, f'lpips{i}', getattr(net, f'lpips{i}'))
        self.pool_after = [2, 4, 7, 10, 13]   # an int-list attribute: TorchScript stores it with build_intlist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i < 15:   # conv1 .. conv13, fc1, fc2: the features
                x = torch.relu(layer(x.flatten(1) if i == 13 else x))
            if i + 1 in self.pool_after:
                x = torch.nn.functional.max_pool2d(x, 2)
        return x


def test_scripted_torchscript_twin_with_int_lists_is_read_as_data(tmp_path):
    """torch.jit.script (unlike trace) stores list attributes through torch.jit._pickle.build_intlist & co. (e.g.
    Conv2d's padding list): these pure list builders are read as data, the twin gives the pickle's features."""
    net = nvidia_detectors.make_standin('vgg16', seed=2).requires_grad_(False)
    pickled = nvidia_detectors.write_pickle(tmp_path / 'vgg16.pkl', net)
    torch.jit.save(torch.jit.script(_ScriptedVGG16(net)), str(tmp_path / 'vgg16.pt'))
    images = _images(5)
    from_script = detectors.get_detector('vgg16', str(tmp_path / 'vgg16.pt'))(images)
    torch.testing.assert_close(from_script, detectors.get_detector('vgg16', pickled)(images), rtol=0, atol=0)


def test_detector_pickle_with_parameter_free_modules_is_read(tmp_path):
    """Softmax, ReLU, Dropout, Flatten and Identity inside a detector pickle are inert records without tensors."""
    net = nvidia_detectors.make_standin('vgg16', seed=3)
    net.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.ReLU(), torch.nn.Identity(),
                                   torch.nn.Softmax(dim=1))
    path = nvidia_detectors.write_pickle(tmp_path / 'vgg16.pkl', net)
    images = _images(3)
    np.testing.assert_allclose(detectors.get_detector('vgg16', path)(images).numpy(),
                               net.double().reference(images).numpy(), rtol=1e-4, atol=1e-6)


def test_fid_cli_uses_the_nvidia_pickle_safely(inception, tmp_path):
    path, reference = inception
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, [16, 16, 3], dtype=np.uint8) for _ in range(6)]
    data = write_dataset(tmp_path / 'data', images)
    result = CliRunner().invoke(fid.cli, ['ref', f'--data={data}', f'--dest={tmp_path / "ref.npz"}', f'--detector={path}'],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    feats = reference.reference(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))[0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / 'ref.npz')['mu'], feats.mean(0), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# DINOv2: official tensor names, every size (facebookresearch/dinov2 models/vision_transformer.py: vit_small/base/
# large/giant2 have 384/768/1024/1536 channels and 6/12/16/24 heads; ViT-g uses the fused SwiGLU feed-forward).

_DINOV2_SIZES = dict(vits14=(384, 6, False), vitb14=(768, 12, False), vitl14=(1024, 16, False), vitg14=(1536, 24, True))


def _dinov2_state(dim, swiglu, grid=2, patch=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (int(dim * 4 * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    shapes = {'cls_token': [1, 1, dim], 'pos_embed': [1, grid * grid + 1, dim], 'mask_token': [1, dim],
              'patch_embed.proj.weight': [dim, 3, patch, patch], 'patch_embed.proj.bias': [dim],
              'norm.weight': [dim], 'norm.bias': [dim]}
    block = {'norm1.weight': [dim], 'norm1.bias': [dim], 'attn.qkv.weight': [3 * dim, dim], 'attn.qkv.bias': [3 * dim],
             'attn.proj.weight': [dim, dim], 'attn.proj.bias': [dim], 'ls1.gamma': [dim], 'norm2.weight': [dim],
             'norm2.bias': [dim], 'ls2.gamma': [dim]}
    block.update({'mlp.w12.weight': [2 * hidden, dim], 'mlp.w12.bias': [2 * hidden], 'mlp.w3.weight': [dim, hidden],
                  'mlp.w3.bias': [dim]} if swiglu else
                 {'mlp.fc1.weight': [hidden, dim], 'mlp.fc1.bias': [hidden], 'mlp.fc2.weight': [dim, hidden],
                  'mlp.fc2.bias': [dim]})
    shapes.update({f'blocks.0.{k}': v for k, v in block.items()})
    return {k: torch.randn(v, generator=g) / math.sqrt(v[-1]) for k, v in shapes.items()}


def _dinov2_reference(state, x, heads, swiglu, patch=14):
    """Independent float64 ViT forward (one block) on pre-normalised input with the stored position grid."""
    s = {k: v.double() for k, v in state.items()}
    dim = s['cls_token'].shape[-1]
    t = torch.nn.functional.conv2d(x, s['patch_embed.proj.weight'], s['patch_embed.proj.bias'], stride=patch)
    t = torch.cat([s['cls_token'].expand(len(x), 1, dim), t.flatten(2).transpose(1, 2)], dim=1) + s['pos_embed']
    ln = lambda v, name: torch.nn.functional.layer_norm(v, [dim], s[f'{name}.weight'], s[f'{name}.bias'], eps=1e-6)
    h = ln(t, 'blocks.0.norm1')
    q, k, v = (h @ s['blocks.0.attn.qkv.weight'].T + s['blocks.0.attn.qkv.bias']).chunk(3, dim=-1)
    split = lambda u: u.reshape(len(x), -1, heads, dim // heads).transpose(1, 2)
    attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // heads), dim=-1) @ split(v)
    attn = attn.transpose(1, 2).reshape(len(x), -1, dim) @ s['blocks.0.attn.proj.weight'].T + s['blocks.0.attn.proj.bias']
    t = t + s['blocks.0.ls1.gamma'] * attn
    h = ln(t, 'blocks.0.norm2')
    if swiglu:
        a, b = (h @ s['blocks.0.mlp.w12.weight'].T + s['blocks.0.mlp.w12.bias']).chunk(2, dim=-1)
        h = (a * torch.sigmoid(a) * b) @ s['blocks.0.mlp.w3.weight'].T + s['blocks.0.mlp.w3.bias']
    else:
        h = h @ s['blocks.0.mlp.fc1.weight'].T + s['blocks.0.mlp.fc1.bias']
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        h = h @ s['blocks.0.mlp.fc2.weight'].T + s['blocks.0.mlp.fc2.bias']
    t = t + s['blocks.0.ls2.gamma'] * h
    return ln(t, 'norm')[:, 0]


@pytest.mark.parametrize('size', sorted(_DINOV2_SIZES))
def test_dinov2_every_size_matches_independent_vit(size, tmp_path):
    dim, heads, swiglu = _DINOV2_SIZES[size]
    state = _dinov2_state(dim, swiglu)
    torch.save(state, tmp_path / f'dinov2_{size}_pretrain.pth')
    model = detectors.load_dinov2_model(str(tmp_path / f'dinov2_{size}_pretrain.pth'))
    assert model.blocks[0].attn.num_heads == heads
    x = torch.randn([2, 3, 28, 28], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        features = model(x.to(torch.float32)).double()
    np.testing.assert_allclose(features.numpy(), _dinov2_reference(state, x, heads, swiglu).numpy(), rtol=1e-3, atol=2e-4)


def test_dinov2_uses_the_given_head_count(tmp_path):
    """num_heads given by the caller is used even when the width is not 64 per head; a width that does not split
    into that many heads is one line naming the file."""
    state = _dinov2_state(96, False)
    torch.save(state, tmp_path / 'tiny.pth')
    model = detectors.load_dinov2_model(str(tmp_path / 'tiny.pth'), num_heads=4)
    assert model.blocks[0].attn.num_heads == 4
    x = torch.randn([2, 3, 28, 28], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        features = model(x.to(torch.float32)).double()
    np.testing.assert_allclose(features.numpy(), _dinov2_reference(state, x, 4, False).numpy(), rtol=1e-3, atol=2e-4)
    with pytest.raises(dnnlib.UserError) as info:
        detectors.load_dinov2_model(str(tmp_path / 'tiny.pth'), num_heads=5)
    assert str(info.value) == f'{tmp_path / "tiny.pth"}: DINOv2 width 96 is not divisible by num_heads=5'


def test_dinov2_width_not_a_multiple_of_64_is_refused(tmp_path):
    torch.save(_dinov2_state(96, False), tmp_path / 'odd.pth')
    with pytest.raises(dnnlib.UserError, match='not a multiple of 64'):
        detectors.load_dinov2_model(str(tmp_path / 'odd.pth'))
    assert os.path.exists(tmp_path / 'odd.pth')
