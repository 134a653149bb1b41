"""openai/consistency_models networks: state dicts mapped into DhariwalUNet, KarrasDenoiser's two forms, the
released layouts, and the loader's refusals (fixtures/openai_cm)."""

import json
import shutil

import pytest
import torch

import dnnlib
from conftest import FIXTURES_DIR, load_openai_cm_net
from training.checkpoints import reader
from training.checkpoints import checkpoint
from training.checkpoints import openai_state as checkpoint_cm
from training.networks import karras as networks_cm

NETS = ['imagenet_like', 'lsun_like']
FORMS = dict(edm='edm', cm='consistency')


def _inputs(openai_cm, name):
    x = torch.from_numpy(openai_cm[f'denoise/{name}/x'])
    y = torch.from_numpy(openai_cm[f'denoise/{name}/y']) if name == 'imagenet_like' else None
    return x, torch.from_numpy(openai_cm['denoise/sigma']), y


@pytest.mark.parametrize('name', NETS)
@pytest.mark.parametrize('form', list(FORMS))
def test_denoise_matches_official(openai_cm, name, form):
    net = load_openai_cm_net(name, FORMS[form])
    x, sigma, y = _inputs(openai_cm, name)
    with torch.no_grad():
        model_output, denoised = net.denoise(x, sigma, y)
    ref = lambda key: torch.from_numpy(openai_cm[f'denoise/{name}/{key}'])  # noqa: E731
    assert (model_output - ref('model_output')).abs().max() <= 1e-5
    assert (denoised - ref(f'{form}/denoised')).abs().max() <= 1e-5
    # Integer labels and one-hot labels are the same input (openai's nn.Embedding vs our bias-free linear layer).
    if y is not None:
        with torch.no_grad():
            assert torch.equal(net(x, sigma, torch.nn.functional.one_hot(y, 10).float()), net(x, sigma, y))


@pytest.mark.parametrize('form', list(FORMS))
def test_coefficients_match_official(openai_cm, form):
    net = load_openai_cm_net('lsun_like', FORMS[form])
    sigma = torch.from_numpy(openai_cm['denoise/sigma'])
    c_skip, c_out, c_in, c_noise = net.coefficients(sigma)
    for value, key in ((c_skip, 'c_skip'), (c_out, 'c_out'), (c_in, 'c_in')):
        ref = torch.from_numpy(openai_cm[f'denoise/lsun_like/{form}/{key}']).reshape(-1)
        assert ((value - ref).abs() <= 1e-6 * ref.abs()).all(), key
    ref = torch.from_numpy(openai_cm['denoise/lsun_like/c_noise']).reshape(-1)
    assert ((c_noise - ref).abs() <= 1e-6 * ref.abs()).all()
    # The consistency form is the identity at sigma_min, the EDM form is not (float64 reference).
    assert (c_out[0] == 0) == (form == 'cm') and (c_skip[0] == 1) == (form == 'cm')


def test_fp16_attention_difference_is_documented_size(openai_cm):
    """Official fp16 attention differs from our float32 attention by ~1e-4 (why 1e-5 needs float32)."""
    net = load_openai_cm_net('imagenet_like', 'edm')
    x, sigma, y = _inputs(openai_cm, 'imagenet_like')
    with torch.no_grad():
        out = net.denoise(x, sigma, y)[0]
    diff = (out - torch.from_numpy(openai_cm['denoise/imagenet_like/model_output_fp16attn'])).abs().max()
    assert 1e-6 < diff < 1e-3


@pytest.fixture(scope='module')
def layouts():
    with open(FIXTURES_DIR / 'openai_cm' / 'openai_cm_layouts.json') as f:
        return json.load(f)


@pytest.mark.parametrize('key, resolution, label_dim', [('imagenet64', 64, 1000), ('lsun256', 256, 0)])
def test_released_layouts_rebuild_on_meta_device(layouts, key, resolution, label_dim):
    spec = layouts[key]
    expected = [(name, list(shape)) for name, shape in spec['tensors']]
    shapes = dict(expected)
    inferred = checkpoint_cm.build_karras_denoiser(shapes, resolution, 'consistency', name=key, device='meta')
    with torch.device('meta'):
        declared = networks_cm.KarrasDenoiser(img_resolution=resolution, label_dim=label_dim,
                                              **networks_cm.RELEASED_UNETS[key])
    for net in (inferred, declared):
        assert checkpoint_cm.openai_layout(net) == expected
        assert sum(p.numel() for p in net.parameters()) == spec['num_params']
    assert inferred.model.init_kwargs['attn_resolutions'] == [resolution // ds for ds in spec['attention_ds']]


def test_file_names_give_resolution_and_parameterization():
    assert checkpoint_cm.resolution_from_name('/x/cd_imagenet64_l2.pt') == 64
    assert checkpoint_cm.resolution_from_name('ct_bedroom256.pt') == 256
    assert checkpoint_cm.resolution_from_name('edm_cat256_ema.pt') == 256
    assert checkpoint_cm.resolution_from_name('mine.pt', 32) == 32
    assert checkpoint_cm.parameterization_from_name('edm_cat256_ema.pt') == 'edm'
    assert checkpoint_cm.parameterization_from_name('cd_bedroom256_lpips.pt') == 'consistency'
    assert checkpoint_cm.parameterization_from_name('ct_imagenet64.pt') == 'consistency'
    with pytest.raises(dnnlib.UserError, match='--parameterization'):
        checkpoint_cm.parameterization_from_name('model.pt')
    with pytest.raises(dnnlib.UserError, match='--resolution'):
        checkpoint_cm.resolution_from_name('model.pt')


def test_released_name_needs_no_options(tmp_path, openai_cm):
    path = tmp_path / 'cd_cat256_l2.pt'  # The released name tells resolution and form; the tiny net is 16 px anyway.
    shutil.copy(FIXTURES_DIR / 'openai_cm' / 'tiny_lsun_like.pt', path)
    net, metadata = reader.load_network(str(path), resolution=16, num_head_channels=8)
    assert net.is_consistency and net.img_resolution == 16 and metadata == {}
    with pytest.raises(dnnlib.UserError, match='--parameterization'):
        reader.load_network(str(FIXTURES_DIR / 'openai_cm' / 'tiny_lsun_like.pt'), resolution=16)


def test_truncated_or_wrong_file_is_one_clear_message(tmp_path):
    data = (FIXTURES_DIR / 'openai_cm' / 'tiny_lsun_like.pt').read_bytes()
    truncated = tmp_path / 'cd_bedroom256_l2.pt'
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(dnnlib.UserError, match='cd_bedroom256_l2.pt.*(truncated|damaged|not a network)'):
        reader.load_network(str(truncated))
    wrong = tmp_path / 'ct_bedroom256.pt'
    torch.save({'model': [1, 2, 3]}, wrong)
    with pytest.raises(dnnlib.UserError, match='ct_bedroom256.pt'):
        reader.load_network(str(wrong))


def _state_dict(name):
    return torch.load(FIXTURES_DIR / 'openai_cm' / f'tiny_{name}.pt', weights_only=True)


@pytest.mark.parametrize('edit, tensor', [
    ('drop', 'middle_block.1.qkv.bias'),
    ('reshape', 'output_blocks.1.0.skip_connection.weight'),
    ('extra', 'input_blocks.2.0.op.weight'),
])
def test_other_architecture_is_refused_naming_the_tensor(edit, tensor):
    sd = _state_dict('lsun_like')
    if edit == 'drop':
        del sd[tensor]
    elif edit == 'reshape':
        sd[tensor] = torch.zeros(list(sd[tensor].shape[:1]) + [7, 1, 1])
    else:
        sd[tensor] = torch.zeros(32, 32, 3, 3)
    with pytest.raises(dnnlib.UserError, match=f'"{tensor}"'):
        checkpoint_cm.karras_denoiser_from_state_dict(sd, 'x.pt', 16, 'edm', 8)


def test_head_width_must_divide_channels():
    with pytest.raises(dnnlib.UserError, match='--num_head_channels=12'):
        checkpoint_cm.karras_denoiser_from_state_dict(_state_dict('lsun_like'), 'x.pt', 16, 'edm', 12)


def test_snapshot_round_trip(tmp_path, openai_cm):
    net = load_openai_cm_net('imagenet_like', 'consistency')
    checkpoint.save_network_snapshot(tmp_path / 'snap.pt', net, kimg=0)
    loaded, metadata = reader.load_network(str(tmp_path / 'snap.pt'))
    x, sigma, y = _inputs(openai_cm, 'imagenet_like')
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, y), net(x, sigma, y))
    assert type(loaded) is networks_cm.KarrasDenoiser and loaded.is_consistency and metadata == {'kimg': 0}


def test_unknown_parameterization_is_refused():
    with pytest.raises(dnnlib.UserError, match='--parameterization=vp'):
        networks_cm.KarrasDenoiser(img_resolution=16, parameterization='vp', model_channels=32, channel_mult=[1],
                                   num_blocks=1, attn_resolutions=[])
