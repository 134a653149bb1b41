"""Hostile files: nothing attacker-controlled runs by default, and every refusal says what was refused and that
the file may be malicious, without advice to disable the protection (issue 12, defects 5 and 7).

A hostile TorchScript file here writes a file of its choosing from its TorchScript `__setstate__`
(`torch.from_file(path, shared=True)`), which `torch.jit.load` runs; hostile pickles call `os.system`.
"""

import io
import os
import pickle
import zipfile
from typing import Tuple

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import fid
from metrics import detectors, evaluate
from conftest import write_random_dataset
from torch_utils import persistence
from training.checkpoints import reader
from training.checkpoints import checkpoint

_UNSAFE_ADVICE = ('weights_only', 'add_safe_globals', 'safe_globals', 'truncated', 'corrupt', '--allow-unsafe')


class HostileScript(torch.nn.Module):
    """A detector-shaped module whose TorchScript __setstate__ writes 16 bytes to `target` on torch.jit.load."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.w = torch.ones(2)

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.target, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        self.training = state[2]
        written = torch.from_file(self.target, True, 16, dtype=torch.uint8)
        written.fill_(65)
        self.w = written[:2].to(torch.float32)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.to(torch.float32).flatten(1)[:, :2] * self.w


class _Call:
    """Pickles as a call of `fn(*args)`: how a hostile pickle runs code."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def assert_refusal(message, *names):
    """One line naming the file and what was refused, saying it may be malicious, without unsafe advice."""
    assert '\n' not in message and 'may be malicious' in message, message
    assert all(name in message for name in names), message
    assert not any(word in message for word in _UNSAFE_ADVICE), message


@pytest.fixture
def hostile_ts(tmp_path):
    target = tmp_path / 'written-by-attacker.pth'
    path = tmp_path / 'inception-2015-12-05.pt'
    torch.jit.save(torch.jit.script(HostileScript(str(target))), str(path))
    return str(path), target


@pytest.mark.parametrize('kind', ['inception', 'inception_probs', 'vgg16'])
def test_torchscript_detector_is_read_as_data_and_writes_nothing(hostile_ts, kind):
    """Inception/VGG16 TorchScript files (NVIDIA's .pt twins) are read for their tensors only: this one has none
    of NVIDIA's, so it is rejected, and its __setstate__ never ran."""
    path, target = hostile_ts
    with pytest.raises(dnnlib.UserError) as info:
        detectors.get_detector(kind, path)
    message = str(info.value)
    assert '\n' not in message and path in message and 'its code is not run' in message
    assert not target.exists()


_TRUST_CLAUSE = '; --allow-unsafe-pickle loads it if you trust the file'


def test_torchscript_dinov2_is_refused_and_writes_nothing(hostile_ts):
    path, target = hostile_ts
    with pytest.raises(dnnlib.UserError) as info:
        detectors.get_detector('dinov2', path)
    assert_refusal(str(info.value).replace(_TRUST_CLAUSE, ''), path, 'TorchScript')
    assert not target.exists()


def test_torchscript_refusal_names_the_trust_flag_without_advising_it(hostile_ts):
    """The user who trusts their own TorchScript file learns the flag that loads it; the message states what it
    does (loading runs the file's code) and does not tell anyone to use it (issue 20)."""
    path, target = hostile_ts
    with pytest.raises(dnnlib.UserError) as info:
        detectors.get_detector('dinov2', path)
    assert str(info.value) == (
        f'{path}: refused to load a TorchScript file: loading runs the code stored in it (which can write files), '
        f'so the file may be malicious{_TRUST_CLAUSE} (the NVIDIA .pkl detectors and state dicts are loaded safely)')
    assert not target.exists()


def test_torchscript_through_clis_writes_nothing(hostile_ts, tmp_path):
    path, target = hostile_ts
    images = write_random_dataset(tmp_path / 'imgs', num_images=4)
    np.savez(tmp_path / 'r.npz', mu=np.zeros(2), sigma=np.eye(2))
    for args in (['calc', f'--images={images}', f'--ref={tmp_path / "r.npz"}', '--num=4'],
                 ['ref', f'--data={images}', f'--dest={tmp_path / "out.npz"}']):
        result = CliRunner().invoke(fid.cli, args + [f'--detector={path}'])
        assert result.exit_code == 2 and 'its code is not run' in result.stderr
    assert not target.exists() and not (tmp_path / 'out.npz').exists()
    with pytest.raises(dnnlib.UserError):
        evaluate.load_detectors(['fid50k_full'], path, None, False, 'cpu')
    with pytest.raises(dnnlib.UserError):
        evaluate.load_detectors(['fd_dinov2'], None, path, False, 'cpu')
    assert not target.exists()


def test_hostile_torchscript_really_writes_when_trusted(hostile_ts):
    """The control: with the explicit opt-in the same file does write, so the refusals above are what protect."""
    path, target = hostile_ts
    with pytest.warns(UserWarning, match='only for files you trust'):
        detectors.get_detector('inception', path, allow_unsafe_pickle=True)
    assert target.read_bytes() == b'A' * 16


def test_pickle_carrying_torchscript_bytes_is_not_run(hostile_ts, tmp_path):
    path, target = hostile_ts
    with open(path, 'rb') as f:
        blob = f.read()
    meta = dict(type='class', version=6, module_src='', class_name='InceptionV3', state=dict(blob=blob))
    wrapped = tmp_path / 'wrapped.pkl'
    wrapped.write_bytes(pickle.dumps(_Call(persistence._reconstruct_persistent_obj, meta)))
    with pytest.raises(dnnlib.UserError, match='not an NVIDIA InceptionV3 detector'):
        detectors.get_detector('inception', str(wrapped))
    assert not target.exists()


@pytest.mark.parametrize('loader', ['detector', 'torchscript_data', 'network_pkl', 'snapshot', 'training_state'])
def test_code_calling_files_are_refused_with_a_clear_message(tmp_path, loader):
    marker = tmp_path / 'pwned'
    payload = _Call(os.system, f'touch {marker}')
    path = str(tmp_path / 'hostile.bin')
    if loader in ('snapshot', 'training_state'):
        torch.save({'format': 'x', 'evil': payload}, path)
    elif loader == 'torchscript_data':   # a TorchScript-shaped archive whose data.pkl calls os.system
        with zipfile.ZipFile(path, 'w') as archive:
            archive.writestr('archive/data.pkl', pickle.dumps(payload))
            archive.writestr('archive/code/__torch__.py', 'pass')
    else:
        with open(path, 'wb') as f:
            pickle.dump(dict(ema=payload) if loader == 'network_pkl' else payload, f)
    load = dict(detector=lambda: detectors.get_detector('inception', path),
                torchscript_data=lambda: detectors.get_detector('vgg16', path),
                network_pkl=lambda: reader.load_network(path)[0],
                snapshot=lambda: checkpoint.load_network_snapshot(path),
                training_state=lambda: checkpoint.load_training_state(path))[loader]
    with pytest.raises(dnnlib.UserError) as info:
        load()
    assert_refusal(str(info.value), path, f'{os.system.__module__}.system')
    assert not marker.exists()


def test_disallowed_persistent_class_is_refused_with_a_clear_message(tmp_path):
    meta = dict(type='class', version=6, module_src='import os; os.system("true")', class_name='EvilNet', state={})
    path = tmp_path / 'net.pkl'
    path.write_bytes(pickle.dumps(dict(ema=_Call(persistence._reconstruct_persistent_obj, meta))))
    with pytest.raises(dnnlib.UserError) as info:
        reader.load_network(str(path))[0]
    assert_refusal(str(info.value), str(path), '"EvilNet"')


def test_tensor_record_without_storage_is_a_refusal_not_corruption(tmp_path):
    path = tmp_path / 'net.pkl'
    path.write_bytes(pickle.dumps(dict(ema=_Call(torch._utils._rebuild_tensor_v2, 'not a storage', 0, (1,), (1,)))))
    with pytest.raises(dnnlib.UserError) as info:
        reader.load_network(str(path))[0]
    assert_refusal(str(info.value), str(path), 'without a storage')


def test_truncated_file_is_called_truncated_not_malicious(tmp_path):
    path = tmp_path / 'net.pkl'
    buffer = io.BytesIO()
    pickle.dump(dict(ema=torch.ones(3)), buffer)
    path.write_bytes(buffer.getvalue()[:-20])
    with pytest.raises(dnnlib.UserError) as info:
        reader.load_network(str(path))[0]
    message = str(info.value)
    assert 'truncated' in message and 'malicious' not in message and str(path) in message


# ----------------------------------------------------------------------------------------------------------
# Downloads (defect 6): a fake `requests.get` serves the bytes; no network.


class _FakeServer:
    """Serves `files[url]`; `redirect[url]` makes the final URL another one (as requests reports it)."""

    def __init__(self, files, redirect=None):
        self.files, self.redirect, self.hits = dict(files), dict(redirect or {}), []

    def get(self, url, stream=True, timeout=None):
        self.hits.append(url)
        return _FakeResponse(self.files[url], self.redirect.get(url, url))


class _FakeResponse:
    def __init__(self, body, final_url):
        self.body, self.url, self.headers = body, final_url, {'Content-Length': str(len(body))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass

    def iter_content(self, chunk_size):
        yield self.body


@pytest.fixture
def fake_server(monkeypatch):
    import requests
    server = _FakeServer({'https://example.org/det.pkl': b'detector bytes v1'})
    monkeypatch.setattr(requests, 'get', server.get)
    return server


def _fetch(url, cache_dir, **kwargs):
    with dnnlib.util.open_url(url, cache_dir=str(cache_dir), **kwargs) as f:
        return f.read()


def test_first_download_records_and_prints_its_hash_then_every_use_is_checked(fake_server, tmp_path, capsys):
    import hashlib
    url = 'https://example.org/det.pkl'
    assert _fetch(url, tmp_path) == b'detector bytes v1'
    digest = hashlib.sha256(b'detector bytes v1').hexdigest()
    assert digest in capsys.readouterr().err
    cached = dnnlib.util.open_url(url, cache_dir=str(tmp_path), return_filename=True)
    assert open(cached + '.sha256').read().strip() == digest
    with open(cached, 'r+b') as f:   # A damaged cached copy is noticed and fetched again.
        f.write(b'XX')
    assert _fetch(url, tmp_path) == b'detector bytes v1' and len(fake_server.hits) == 2
    fake_server.files[url] = b'detector bytes v2 (replaced)'
    with open(cached, 'r+b') as f:
        f.write(b'YY')
    with pytest.raises(dnnlib.UserError) as info:
        _fetch(url, tmp_path)
    message = str(info.value)
    assert '\n' not in message and url in message and 'recorded at its first download' in message
    assert not os.path.exists(cached)   # Nothing unverified is left to be served later.


def test_pinned_hash_mismatch_is_one_error_naming_the_url(fake_server, tmp_path):
    url = 'https://example.org/det.pkl'
    with pytest.raises(dnnlib.UserError) as info:
        _fetch(url, tmp_path, sha256='0' * 64)
    assert '\n' not in str(info.value) and url in str(info.value) and 'pinned' in str(info.value)
    assert [name for name in os.listdir(tmp_path) if not name.startswith('.')] == []


def test_plain_http_warns_and_https_downgrade_is_refused(monkeypatch, tmp_path):
    import requests
    server = _FakeServer({'http://example.org/a.pkl': b'a', 'https://example.org/b.pkl': b'b'},
                         redirect={'https://example.org/b.pkl': 'http://mirror.example.org/b.pkl'})
    monkeypatch.setattr(requests, 'get', server.get)
    with pytest.warns(UserWarning, match='plain http'):
        assert _fetch('http://example.org/a.pkl', tmp_path) == b'a'
    with pytest.raises(dnnlib.UserError, match='redirect from https to http://mirror'):
        _fetch('https://example.org/b.pkl', tmp_path, num_attempts=1)
