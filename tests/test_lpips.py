"""LPIPS: piq's replace_pooling variant against the official numbers (stand-in weights), standard LPIPS v0.1
against an independent float64 evaluation of its definition, and the weight loaders."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dnnlib
from training.methods import lpips as lpips_mod


@pytest.fixture(scope='module')
def cm(fixtures_dir):
    return np.load(fixtures_dir / 'openai_cm' / 'openai_cm.npz')


def standin_state(cm):
    return {f'features.{i}.{kind}': torch.from_numpy(cm[f'lpips/vgg/{i}.{kind}'])
            for i in lpips_mod.VGG16_CONVS for kind in ('weight', 'bias')}


def standin_linear(cm):
    return [torch.from_numpy(cm[f'lpips/lin/{k}']) for k in range(5)]


def standin_lpips(cm, variant='piq'):
    convs = lpips_mod.vgg16_conv_weights(standin_state(cm))
    return lpips_mod.LPIPS(convs, lpips_mod.lpips_linear_weights(standin_linear(cm)), variant)


def test_piq_variant_matches_official_values(cm):
    net = standin_lpips(cm)
    x, y = torch.from_numpy(cm['lpips/x']), torch.from_numpy(cm['lpips/y'])
    np.testing.assert_allclose(net(x, y).numpy(), cm['lpips/value'], rtol=1e-5)
    up = lambda a: F.interpolate(a, size=224, mode='bilinear')
    np.testing.assert_allclose(net(up(x), up(y)).numpy(), cm['lpips/value_224'], rtol=1e-5)


def _reference_v01(state, linear, x, y):
    """LPIPS v0.1 written out from its definition in float64: scaling layer on 2x − 1, VGG16 slices with max
    pools, unit-normalised features (eps 1e-10), 1x1 linear layers, spatial average, sum over layers."""
    shift = torch.tensor([-.030, -.088, -.188], dtype=torch.float64).reshape(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450], dtype=torch.float64).reshape(1, 3, 1, 1)
    layers = ['c', 'c', 'p', 'c', 'c', 'p', 'c', 'c', 'c', 'p', 'c', 'c', 'c', 'p', 'c', 'c', 'c']
    taps = {1, 4, 8, 12, 16}    # after the 2nd, 4th, 7th, 10th and 13th conv

    def feats(a):
        a = ((2 * a.double() - 1) - shift) / scale
        out, conv = [], iter(lpips_mod.VGG16_CONVS)
        for j, kind in enumerate(layers):
            if kind == 'p':
                a = F.max_pool2d(a, 2)
                continue
            i = next(conv)
            a = F.relu(F.conv2d(a, state[f'features.{i}.weight'].double(), state[f'features.{i}.bias'].double(),
                                padding=1))
            if j in taps:
                out.append(a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    return sum(F.conv2d((fx - fy) ** 2, w.double()).mean(dim=(2, 3)).flatten()
               for fx, fy, w in zip(feats(x), feats(y), linear))


def test_lpips_v01_variant_matches_float64_definition(cm):
    net = standin_lpips(cm, 'lpips')
    x, y = torch.from_numpy(cm['lpips/x']), torch.from_numpy(cm['lpips/y'])
    ref = _reference_v01(standin_state(cm), standin_linear(cm), x, y)
    np.testing.assert_allclose(net(x, y).double().numpy(), ref.numpy(), rtol=1e-5)
    assert not np.allclose(net(x, y).numpy(), standin_lpips(cm)(x, y).numpy(), rtol=1e-3)   # the variants differ


def test_gradients_reach_the_inputs_only(cm):
    net = standin_lpips(cm)
    x = torch.from_numpy(cm['lpips/x']).requires_grad_(True)
    net(x, torch.from_numpy(cm['lpips/y'])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert list(net.parameters()) == []


def test_load_lpips_from_files_in_both_layouts(cm, tmp_path):
    vgg = tmp_path / 'vgg16.pth'
    torch.save(standin_state(cm), vgg)
    lin_list, lin_dict = tmp_path / 'piq_lin.pt', tmp_path / 'v01_lin.pth'
    torch.save(standin_linear(cm), lin_list)
    torch.save({f'lin{k}.model.1.weight': w for k, w in enumerate(standin_linear(cm))}, lin_dict)
    x, y = torch.from_numpy(cm['lpips/x']), torch.from_numpy(cm['lpips/y'])
    for lin in (lin_list, lin_dict):
        net = lpips_mod.load_lpips('piq', vgg=str(vgg), lin=str(lin))
        np.testing.assert_allclose(net(x, y).numpy(), cm['lpips/value'], rtol=1e-5)


def test_missing_or_wrong_weights_give_one_clear_message(cm, tmp_path):
    with pytest.raises(dnnlib.UserError, match='VGG16 weights are not available'):
        lpips_mod.load_lpips('piq', vgg=str(tmp_path / 'absent.pth'), lin=str(tmp_path / 'absent_lin.pt'))
    bad = tmp_path / 'bad.pth'
    torch.save({'features.0.weight': torch.zeros(4, 3, 3, 3)}, bad)
    lin = tmp_path / 'lin.pt'
    torch.save(standin_linear(cm), lin)
    with pytest.raises(dnnlib.UserError, match='features.0.weight/bias'):
        lpips_mod.load_lpips('piq', vgg=str(bad), lin=str(lin))
    truncated = tmp_path / 'truncated.pth'
    vgg = tmp_path / 'vgg.pth'
    torch.save(standin_state(cm), vgg)
    truncated.write_bytes(vgg.read_bytes()[:100])
    with pytest.raises(dnnlib.UserError, match='truncated or corrupt'):
        lpips_mod.load_lpips('piq', vgg=str(truncated), lin=str(lin))
    with pytest.raises(dnnlib.UserError, match='variant'):
        lpips_mod.load_lpips('alex')
