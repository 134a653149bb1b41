"""Safe reading of detector files: NVIDIA's persistence pickles (inception-2015-12-05.pkl, vgg16.pkl), their
TorchScript twins (inception-2015-12-05.pt, vgg16.pt, read as data), plain state dicts with the same tensor
names, and the code of TorchScript archives (only when the user trusts the file).

A detector pickle is read with a restricted unpickler: persistent records (`torch_utils.persistence.
_reconstruct_persistent_obj`) and standard torch.nn modules (Sequential, MaxPool2d, Linear, ...) become inert
records of their pickled state, tensors are rebuilt by training.checkpoints.safe_pickle's allow-listed functions, any other
global is refused, and the embedded source is never run. A TorchScript archive's data.pkl is read the same
way (its `__torch__` classes kept inert, storages read from the archive), never with `torch.jit.load`, which runs
the archive's TorchScript (its `__setstate__` can write files, e.g. with torch.from_file(..., shared=True)); that
needs the user's opt-in for a file they trust. The tensors are loaded into this project's own graph of the
network (metrics.detector_nets).
"""

import io
import pickle
import warnings
import zipfile

import torch

import dnnlib
from training.checkpoints import checkpoint
from training.checkpoints import safe_pickle

ZIP_MAGIC = b'PK\x03\x04'
PICKLE_PROTO = 0x80

# Standard torch.nn modules of NVIDIA's detector pickles: read as inert records (their tensors only).
_TORCH_MODULES = frozenset([
    ('torch.nn.modules.container', 'Sequential'), ('torch.nn.modules.container', 'ModuleList'),
    ('torch.nn.modules.container', 'ModuleDict'), ('torch.nn.modules.pooling', 'MaxPool2d'),
    ('torch.nn.modules.pooling', 'AvgPool2d'), ('torch.nn.modules.pooling', 'AdaptiveAvgPool2d'),
    ('torch.nn.modules.linear', 'Linear'), ('torch.nn.modules.conv', 'Conv2d'),
    ('torch.nn.modules.activation', 'ReLU'), ('torch.nn.modules.activation', 'Softmax'),
    ('torch.nn.modules.dropout', 'Dropout'), ('torch.nn.modules.flatten', 'Flatten'),
    ('torch.nn.modules.linear', 'Identity'),
])


class _DetectorUnpickler(safe_pickle.RestrictedUnpickler):
    """safe_pickle's restricted unpickler, also reading any persistent record and the torch.nn modules above as
    inert state (never built, never run): only their tensors are used, checked by name against our own graph."""

    def find_class(self, module, name):
        if (module, name) in _TORCH_MODULES:
            return safe_pickle.ContainerStub
        return super().find_class(module, name)

    def make_record(self, meta):
        if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(meta.get('state'), dict):
            raise dnnlib.UserError(safe_pickle.refusal(self.name, 'a malformed persistent record'))
        return safe_pickle.ModuleRecord(str(meta.get('class_name')), meta['state'])


def is_torchscript(data):
    """True for a TorchScript zip archive (it has a code/ folder; torch.save archives do not)."""
    if data[:4] != ZIP_MAGIC:
        return False
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return False
    return any(name.split('/', 1)[-1].startswith('code/') for name in names)


_STORAGE_DTYPES = dict(FloatStorage=torch.float32, DoubleStorage=torch.float64, HalfStorage=torch.float16,
                       BFloat16Storage=torch.bfloat16, LongStorage=torch.int64, IntStorage=torch.int32,
                       ShortStorage=torch.int16, CharStorage=torch.int8, ByteStorage=torch.uint8, BoolStorage=torch.bool)


class _ScriptObject:
    """Inert stand-in for a TorchScript class instance: keeps the state BUILD gives it (never the class's code)."""

    def __setstate__(self, state):
        self.state = state


def _build_list(data):
    """Replacement for torch.jit._pickle's list builders (build_intlist, ...), which return their list as is."""
    if not isinstance(data, list):
        raise safe_pickle.Refused('a TorchScript list record that is not a list')
    return data


# TorchScript's typed-list records (torch.jit._pickle): pure functions returning their argument.
_LIST_BUILDERS = frozenset(['build_intlist', 'build_doublelist', 'build_boollist', 'build_tensorlist'])


class _ScriptDataUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl as data: `__torch__` classes become _ScriptObject, storages are read
    from the archive's data/ records, tensors rebuilt by safe_pickle's allow-listed function, nothing else allowed."""

    def __init__(self, archive, prefix, source):
        super().__init__(io.BytesIO(archive.read(f'{prefix}data.pkl')))
        self.archive, self.prefix, self.source = archive, prefix, source  # zip, its root folder, name for messages

    def find_class(self, module, name):
        if module == '__torch__' or module.startswith('__torch__.'):
            return _ScriptObject
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == 'torch.jit._pickle' and name in _LIST_BUILDERS:
            return _build_list
        if (module, name) in (('torch._utils', '_rebuild_tensor_v2'), ('collections', 'OrderedDict')):
            return safe_pickle.SAFE_GLOBALS[(module, name)]
        raise dnnlib.UserError(safe_pickle.refusal(self.source, f'global "{module}.{name}"'))

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and pid[2].isdigit() and isinstance(pid[4], int)):
            raise safe_pickle.Refused('a malformed storage record')
        data = self.archive.read(f'{self.prefix}data/{pid[2]}')
        if len(data) != pid[4] * pid[1].itemsize:
            raise safe_pickle.Refused(f'storage {pid[2]} of the wrong size')
        untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=pid[1], _internal=True)


def _script_tensors(obj, prefix='', out=None):
    """Dotted name -> tensor of the tensor attributes of a TorchScript module tree read as data."""
    out = {} if out is None else out
    state = getattr(obj, 'state', None)
    for key, value in (state.items() if isinstance(state, dict) else ()):
        if isinstance(value, torch.Tensor):
            out[prefix + str(key)] = value
        elif isinstance(value, _ScriptObject):
            _script_tensors(value, f'{prefix}{key}.', out)
    return out


def torchscript_tensors(data, source):
    """Dotted name -> tensor of a TorchScript archive, read without torch.jit.load: no code in it runs."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    pickles = [name for name in archive.namelist() if name.endswith('/data.pkl') and name.count('/') == 1]
    if len(pickles) != 1:
        raise dnnlib.UserError(f'{source}: not a TorchScript archive (expected one data.pkl)')
    root = _guarded_load(lambda: _ScriptDataUnpickler(archive, pickles[0][:-len('data.pkl')], source).load(),
                         source, 'TorchScript archive')
    return _script_tensors(root)


def load_torchscript(data, source, allow_unsafe):
    """The TorchScript module in `data`, only with the user's opt-in (it runs the archive's code)."""
    if not allow_unsafe:
        raise dnnlib.UserError(
            f'{source}: refused to load a TorchScript file: loading runs the code stored in it (which can write '
            f'files), so the file may be malicious; --allow-unsafe-pickle loads it if you trust the file (the '
            f'NVIDIA .pkl detectors and state dicts are loaded safely)')
    warnings.warn(f'{source}: loading TorchScript runs code stored in the file; do this only for files you trust',
                  stacklevel=3)
    try:
        return torch.jit.load(io.BytesIO(data), map_location='cpu').eval()
    except RuntimeError as e:
        raise dnnlib.UserError(safe_pickle.unreadable(source, 'TorchScript file', e)) from None


def _guarded_load(load, source, what):
    """load(); content a safe load refuses, or a file that cannot be read, is one UserError naming `source`."""
    try:
        return load()
    except dnnlib.UserError:
        raise
    except safe_pickle.Refused as e:
        raise dnnlib.UserError(safe_pickle.refusal(source, str(e))) from None
    except Exception as e:
        raise dnnlib.UserError(safe_pickle.unreadable(source, what, e)) from None


def _unpickle_tensors(data, source):
    root = _guarded_load(lambda: _DetectorUnpickler(io.BytesIO(data), source).load(), source, 'detector pickle')
    if not isinstance(root, (safe_pickle.ModuleRecord, safe_pickle.ContainerStub)):
        raise dnnlib.UserError(f'{source}: the pickle holds a {type(root).__name__}, not a detector network')
    return safe_pickle.record_tensors(root, source)


def _state_dict_tensors(data, source):
    state = checkpoint.read_weights_only(io.BytesIO(data), source, 'detector state dict')
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise dnnlib.UserError(f'{source}: not a detector state dict (expected a dict of tensors)')
    return state


def read_detector_tensors(data, source):
    """Dotted name -> tensor of a detector pickle or torch.save state dict, read without running any code."""
    if data[:4] == ZIP_MAGIC:
        return _state_dict_tensors(data, source)
    if data[:1] and data[0] == PICKLE_PROTO:
        return _unpickle_tensors(data, source)
    raise dnnlib.UserError(f'{source}: not a detector file (neither a pickle, a state dict nor a TorchScript archive)')


def load_unsafe_pickle(data, source):
    """A pickled network rebuilt by executing its embedded code (the user's explicit opt-in, with a warning)."""
    warnings.warn(f'{source}: --allow-unsafe-pickle executes Python code embedded in the file; do this only for '
                  f'files you trust', stacklevel=3)
    try:
        obj = safe_pickle.LegacyUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise dnnlib.UserError(safe_pickle.unreadable(source, 'detector pickle', e)) from None
    if not callable(obj):
        raise dnnlib.UserError(f'{source}: the pickle holds a {type(obj).__name__}, not a callable network')
    return obj.eval() if isinstance(obj, torch.nn.Module) else obj


def read_bytes(url_or_path, cache_dir=None):
    with dnnlib.util.open_url(url_or_path, cache_dir=cache_dir) as f:
        return f.read()

