"""Checkpoint I/O: safe loading of official-format pickles, snapshots, transfer, training state, atomic writes."""

import io
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

import dnnlib
from conftest import REPO_ROOT, load_npz_meta
from edm2_files import EDM2Loss, StandardRGBEncoder
from torch_utils import persistence
from training.checkpoints import reader
from training import networks
from training.checkpoints import checkpoint
from training.networks import edm2 as networks_edm2
from training.checkpoints import safe_pickle

CASE = 'ddpmpp_cond'


# Non-network persistent classes with the official names, so the test pickles carry their records too.
@persistence.persistent_class
class VPLoss:
    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t


@persistence.persistent_class
class AugmentPipe:
    def __init__(self, p=0.12, xflip=1e8):
        self.p, self.xflip = p, xflip


class _Crafted:
    """Pickles as an arbitrary call `fn(*args)`: how a hostile file would look to the unpickler."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _params(npz, prefix):
    return {k[len(prefix):]: torch.from_numpy(npz[k]) for k in npz.files if k.startswith(prefix)}


@pytest.fixture(scope='module')
def case(edm_forward):
    meta = load_npz_meta(edm_forward)[CASE]
    params = _params(edm_forward, f'{CASE}/param/')
    inputs = {name: torch.from_numpy(edm_forward[f'{CASE}/in/{name}'][:2])
              for name in ('x', 'sigma', 'class_labels', 'augment_labels')}
    return meta, params, inputs


def _vp_net(meta, params, **overrides):
    kwargs = dict(img_resolution=meta['img_resolution'], img_channels=meta['img_channels'],
                  label_dim=meta['label_dim'], **meta['network_kwargs'])
    net = networks.VPPrecond(**{**kwargs, **overrides})
    net.load_state_dict(params)
    return net.eval()


def _ecm_net(meta, **overrides):
    model_kwargs = {k: v for k, v in meta['network_kwargs'].items() if k != 'augment_dim'}
    kwargs = dict(img_resolution=meta['img_resolution'], img_channels=meta['img_channels'], label_dim=meta['label_dim'],
                  sigma_min=meta['ecm_sigma_min'], **model_kwargs)
    return networks.ECMPrecond(**{**kwargs, **overrides})


def _run(net, inputs, **kwargs):
    with torch.no_grad():
        return net(inputs['x'], inputs['sigma'], inputs['class_labels'], **kwargs)


def _official_pickle(net):
    return pickle.dumps(dict(ema=net, loss_fn=VPLoss(beta_d=19.5), augment_pipe=AugmentPipe(p=0.12),
                             dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset',
                                                            path='cifar10.zip', xflip=False)))


def _record_meta(net, module_src):
    """The persistent record of `net` with its embedded source replaced."""
    fn, (meta,) = net.__reduce__()
    assert fn is persistence._reconstruct_persistent_obj
    return dict(meta, module_src=module_src)


def _marker_src(marker):
    return f'open({str(marker)!r}, "w").close()\nclass EvilNet:\n    pass\n'


@pytest.fixture(scope='module')
def vp_pickle(case):
    meta, params, _inputs = case
    net = _vp_net(meta, params)
    return net, _official_pickle(net)


def test_official_pickle_loads_safely(case, vp_pickle, tmp_path):
    _meta, params, inputs = case
    net, data = vp_pickle
    path = tmp_path / 'network-snapshot-000000.pkl'
    path.write_bytes(data)
    loaded = safe_pickle.load_network_pkl(str(path))
    ema = loaded['ema']
    assert type(ema) is networks.VPPrecond and not ema.training
    state = ema.state_dict()
    assert sorted(state) == sorted(params)
    assert all(torch.equal(state[k], params[k]) for k in params)
    assert torch.equal(_run(ema, inputs, augment_labels=inputs['augment_labels']),
                       _run(net, inputs, augment_labels=inputs['augment_labels']))
    assert loaded['loss_fn'] == safe_pickle.PersistentRecord('VPLoss', dict(beta_d=19.5))
    assert loaded['augment_pipe'] == safe_pickle.PersistentRecord('AugmentPipe', dict(p=0.12))
    assert type(loaded['dataset_kwargs']) is dnnlib.EasyDict and loaded['dataset_kwargs'].path == 'cifar10.zip'
    via_load_network = reader.load_network(path)[0]
    assert type(via_load_network) is networks.VPPrecond and not via_load_network.training
    assert torch.equal(_run(via_load_network, inputs), _run(net, inputs))


@pytest.mark.parametrize('case_name, precond', [('ncsnpp_uncond', 'VEPrecond'), ('adm_cond', 'EDMPrecond')])
def test_official_pickle_other_architectures(edm_forward, case_name, precond):
    meta = load_npz_meta(edm_forward)[case_name]
    params = _params(edm_forward, f'{case_name}/param/')
    net = getattr(networks, precond)(img_resolution=meta['img_resolution'], img_channels=meta['img_channels'],
                                     label_dim=meta['label_dim'], **meta['network_kwargs'])
    net.load_state_dict(params)
    loaded = safe_pickle.load_network_pkl(io.BytesIO(_official_pickle(net.eval())))['ema']
    assert type(loaded) is type(net)
    assert all(torch.equal(v, params[k]) for k, v in loaded.state_dict().items())
    x, sigma = (torch.from_numpy(edm_forward[f'{case_name}/in/{k}'][:1]) for k in ('x', 'sigma'))
    labels = torch.eye(meta['label_dim'])[:1] if meta['label_dim'] else None
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


def test_official_edm2_pickle_loads_safely(edm2_forward):
    meta = load_npz_meta(edm2_forward)
    params = _params(edm2_forward, 'param/')
    net = networks_edm2.Precond(img_resolution=meta['img_resolution'], img_channels=meta['img_channels'],
                                label_dim=meta['label_dim'], use_fp16=False, **meta['unet_kwargs'])
    net.load_state_dict(params)
    net.eval()
    data = pickle.dumps(dict(ema=net, loss_fn=EDM2Loss(P_mean=-0.8), encoder=StandardRGBEncoder(),
                             dataset_kwargs=dnnlib.EasyDict(path='img64.zip')))
    loaded = safe_pickle.load_network_pkl(io.BytesIO(data))
    assert type(loaded['ema']) is networks_edm2.Precond and not loaded['ema'].training
    assert loaded['encoder'] == safe_pickle.PersistentRecord('StandardRGBEncoder', {})
    assert loaded['loss_fn'] == safe_pickle.PersistentRecord('EDM2Loss', dict(P_mean=-0.8))
    state = loaded['ema'].state_dict()
    assert sorted(state) == sorted(params) and all(torch.equal(state[k], params[k]) for k in params)
    x, sigma, labels = (torch.from_numpy(edm2_forward[f'in/{k}'][:2]) for k in ('x', 'sigma', 'class_labels'))
    with torch.no_grad():
        assert torch.equal(loaded['ema'](x, sigma, labels), net(x, sigma, labels))


def test_unknown_class_with_malicious_source_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    meta = dict(type='class', version=6, module_src=_marker_src(marker), class_name='EvilNet', state={})
    data = pickle.dumps(dict(ema=_Crafted(persistence._reconstruct_persistent_obj, meta)))
    with pytest.raises(dnnlib.UserError, match='"EvilNet"'):
        safe_pickle.load_network_pkl(io.BytesIO(data))
    assert not marker.exists()
    # The same file through the explicit legacy path does execute the source: the file really is hostile.
    with pytest.warns(UserWarning, match='allow_unsafe_pickle'):
        safe_pickle.load_network_pkl(io.BytesIO(data), allow_unsafe_pickle=True)
    assert marker.exists()


def test_known_class_with_malicious_source_loads_without_running_it(case, vp_pickle, tmp_path):
    _meta, _params, inputs = case
    net, _data = vp_pickle
    marker = tmp_path / 'pwned'
    meta = _record_meta(net, _marker_src(marker))
    path = tmp_path / 'net.pkl'
    path.write_bytes(pickle.dumps(dict(ema=_Crafted(persistence._reconstruct_persistent_obj, meta))))
    loaded = reader.load_network(path)[0]
    assert not marker.exists()
    assert type(loaded) is networks.VPPrecond
    assert torch.equal(_run(loaded, inputs), _run(net, inputs))


@pytest.mark.parametrize('fn, args, global_name', [
    (os.system, ('touch {marker}',), f'{os.system.__module__}.system'),
    (exec, ('open({marker!r}, "w").close()',), 'builtins.exec'),
])
def test_forbidden_global_is_refused(tmp_path, fn, args, global_name):
    marker = str(tmp_path / 'pwned')
    path = tmp_path / 'network.pkl'
    path.write_bytes(pickle.dumps(dict(ema=_Crafted(fn, *(a.format(marker=marker) for a in args)))))
    with pytest.raises(dnnlib.UserError) as info:
        reader.load_network(path)[0]
    message = str(info.value)
    assert f'"{global_name}"' in message and str(path) in message and '\n' not in message
    assert not os.path.exists(marker)


def test_strict_tensor_check_names_missing_and_unexpected(vp_pickle):
    net, _data = vp_pickle
    meta = _record_meta(net, '')
    inner = meta['state']['_modules']['model']
    state = dict(inner.__getstate__())
    state['_modules'] = dict(state['_modules'])
    state['_modules']['extra'] = state['_modules'].pop('map_label')
    meta['state'] = dict(meta['state'], _modules={'model': _Crafted(persistence._reconstruct_persistent_obj,
                                                                     dict(_record_meta(inner, ''), state=state))})
    data = pickle.dumps(dict(ema=_Crafted(persistence._reconstruct_persistent_obj, meta)))
    with pytest.raises(dnnlib.UserError, match=r'missing \[model\.map_label\.weight.*unexpected \[model\.extra'):
        safe_pickle.load_network_pkl(io.BytesIO(data))


def test_legacy_path_warns_and_loads(case, vp_pickle):
    _meta, _params, inputs = case
    net, data = vp_pickle
    with pytest.warns(UserWarning, match='executes Python code'):
        loaded = safe_pickle.load_network_pkl(io.BytesIO(data), allow_unsafe_pickle=True)
    assert type(loaded['ema']).__name__ == 'VPPrecond' and type(loaded['ema']) is not networks.VPPrecond
    assert torch.equal(_run(loaded['ema'].eval(), inputs), _run(net, inputs))


def test_load_network_rejects_other_content(tmp_path):
    path = tmp_path / 'notes.txt'
    path.write_text('hello')
    with pytest.raises(dnnlib.UserError, match='notes.txt: not a network file'):
        reader.load_network(path)[0]
    with pytest.raises(dnnlib.UserError, match='no such file'):
        reader.load_network(tmp_path / 'absent.pkl')[0]


def test_transfer_vp_to_ecm(case):
    meta, params, inputs = case
    src = _vp_net(meta, params)
    dst = _ecm_net(meta).eval()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    assert not all(torch.equal(before[k], params[k]) for k in before)
    report = checkpoint.transfer_weights(src, dst)
    assert report.skipped == ['model.map_augment.weight']
    assert report.untouched == []
    assert sorted(report.copied) == sorted(before)
    assert all(torch.equal(dst.state_dict()[k], params[k]) for k in report.copied)
    assert 'model.map_augment.weight' in str(report)
    noise_labels = inputs['sigma'].log() / 4
    with torch.no_grad():
        expected = src.model(inputs['x'], noise_labels, inputs['class_labels'])
        actual = dst.model(inputs['x'], noise_labels, inputs['class_labels'])
    assert torch.equal(actual, expected)


def test_transfer_shape_mismatch_names_tensor(case):
    meta, params, _inputs = case
    src = _vp_net(meta, params)
    dst = _ecm_net(meta, label_dim=5)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    src_shape, dst_shape = (list(net.state_dict()['model.map_label.weight'].shape) for net in (src, dst))
    with pytest.raises(dnnlib.UserError) as info:
        checkpoint.transfer_weights(src, dst)
    assert '"model.map_label.weight"' in str(info.value)
    assert str(src_shape) in str(info.value) and str(dst_shape) in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # Nothing copied.


def test_snapshot_round_trip(case, tmp_path):
    meta, params, inputs = case
    net = _ecm_net(meta)
    checkpoint.transfer_weights(_vp_net(meta, params), net)
    net.eval()
    path = tmp_path / 'network-snapshot-000100.pt'
    metadata = dict(kimg=100.5, stage=3, ema='ema_0.9999', mid_t=[0.821])
    checkpoint.save_network_snapshot(path, net, **metadata)
    raw = torch.load(path, weights_only=True)
    assert raw['format'] == 'ect-network-snapshot' and raw['version'] == 2 and len(raw['sha256']) == 64
    assert raw['class_name'] == 'training.networks.ECMPrecond' and raw['init_kwargs'] == net.init_kwargs
    loaded, loaded_metadata = checkpoint.load_network_snapshot(path)
    assert loaded_metadata == metadata
    assert type(loaded) is networks.ECMPrecond and not loaded.training
    assert torch.equal(_run(loaded, inputs), _run(net, inputs))
    via_load_network = reader.load_network(str(path))[0]
    assert torch.equal(_run(via_load_network, inputs), _run(net, inputs))


def _write_snapshot(path, **fields):
    data = dict(format='ect-network-snapshot', version=1, class_name='training.networks.ECMPrecond',
                init_kwargs={}, state_dict={}, metadata={})
    torch.save({**data, **fields}, path)


def test_snapshot_with_disallowed_class_is_refused(tmp_path):
    path = tmp_path / 'crafted.pt'
    _write_snapshot(path, class_name='os.system', init_kwargs={'command': 'echo pwned'})
    with pytest.raises(dnnlib.UserError, match='"os.system".*allow-list'):
        checkpoint.load_network_snapshot(path)
    with pytest.raises(dnnlib.UserError, match='"os.system"'):
        reader.load_network(path)[0]


def test_snapshot_with_forbidden_global_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'crafted.pt'
    _write_snapshot(path, metadata={'x': _Crafted(os.system, f'touch {marker}')})
    with pytest.raises(dnnlib.UserError, match=re.escape(str(path))):
        checkpoint.load_network_snapshot(path)
    assert not marker.exists()


@pytest.mark.parametrize('damage, message', [
    ('missing', r'missing \[model\.map_label\.bias\], unexpected \[\]'),
    ('unexpected', r'missing \[\], unexpected \[model\.extra\]'),
    ('shape', r'"model\.map_label\.bias" has shape \[3\], ECMPrecond expects \[16\]'),
])
def test_snapshot_strict_state_check(case, tmp_path, damage, message):
    meta, _params, _inputs = case
    net = _ecm_net(meta)
    state_dict = net.state_dict()
    assert list(state_dict['model.map_label.bias'].shape) == [16]
    if damage == 'missing':
        del state_dict['model.map_label.bias']
    elif damage == 'unexpected':
        state_dict['model.extra'] = torch.zeros(1)
    else:
        state_dict['model.map_label.bias'] = torch.zeros(3)
    path = tmp_path / 'damaged.pt'
    _write_snapshot(path, init_kwargs=net.init_kwargs, state_dict=state_dict)
    with pytest.raises(dnnlib.UserError, match=message):
        checkpoint.load_network_snapshot(path)


def test_training_state_round_trip_and_validation(tmp_path):
    path = tmp_path / 'training-state-000100.pt'
    state = dict(net={'w': torch.arange(4.0)}, progress=dict(kimg=100.5, stage=2, done=False),
                 rng=dict(torch=torch.get_rng_state(), python=(3, (1, 2, 3), None), numpy=['MT19937', [1, 2], 0]))
    checkpoint.save_training_state(path, state)
    loaded = checkpoint.load_training_state(path)
    assert torch.equal(loaded['net']['w'], state['net']['w'])
    assert torch.equal(loaded['rng']['torch'], state['rng']['torch'])
    assert loaded['progress'] == state['progress'] and loaded['rng']['python'] == state['rng']['python']
    assert loaded['rng']['numpy'] == state['rng']['numpy']
    with pytest.raises(TypeError, match=r"\['bad'\]"):
        checkpoint.save_training_state(path, dict(state, bad=object()))
    assert torch.equal(checkpoint.load_training_state(path)['net']['w'], state['net']['w'])


@pytest.mark.parametrize('corrupt', ['truncated', 'garbage', 'empty', 'missing'])
def test_training_state_corrupt_file_is_user_error(tmp_path, corrupt):
    path = tmp_path / 'training-state.pt'
    checkpoint.save_training_state(path, dict(w=torch.randn(1000)))
    content = dict(truncated=path.read_bytes()[:len(path.read_bytes()) // 2], garbage=b'not a torch file',
                   empty=b'', missing=None)[corrupt]
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    with pytest.raises(dnnlib.UserError) as info:
        checkpoint.load_training_state(path)
    assert str(path) in str(info.value) and '\n' not in str(info.value)


def test_atomic_write_exception_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'training-state.pt'
    checkpoint.save_training_state(path, dict(step=1))

    def crashing_save(obj, f):
        f.write(b'partial bytes')
        raise RuntimeError('simulated crash')
    monkeypatch.setattr(torch, 'save', crashing_save)
    with pytest.raises(RuntimeError, match='simulated crash'):
        checkpoint.save_training_state(path, dict(step=2))
    monkeypatch.undo()
    assert checkpoint.load_training_state(path) == dict(step=1)
    assert os.listdir(tmp_path) == [path.name]


def test_atomic_write_killed_process_leaves_no_truncated_file(tmp_path):
    path = tmp_path / 'out.bin'
    path.write_bytes(b'previous')
    code = ('import os, sys, dnnlib\n'
            'with dnnlib.util.atomic_write(sys.argv[1]) as f:\n'
            '    f.write(b"x" * 100000)\n'
            '    f.flush()\n'
            '    os._exit(3)\n')
    result = subprocess.run([sys.executable, '-c', code, str(path)], cwd=REPO_ROOT, capture_output=True, timeout=60)
    assert result.returncode == 3, result.stderr.decode()
    assert path.read_bytes() == b'previous'
    assert any(name != path.name for name in os.listdir(tmp_path))  # The child did write (to its temporary file).
