"""Checkpoint I/O: safe loading of official EDM/EDM2/ECT network pickles, this project's own network
snapshots, weight transfer between networks, and training-state files (docs/ECT.md §2 and §7).

Official pickles rebuild their networks by executing Python source embedded in the file. Here they are
read by a restricted unpickler that never executes or imports that source: every persistent record becomes
a plain (class name, state) record, only class names on an allow-list are accepted, tensors are rebuilt by
allow-listed torch functions, and the networks are then constructed as this project's classes from their
recorded constructor arguments, with their tensors loaded under a strict name and shape check.
"""

import collections
import dataclasses
import hashlib
import importlib
import io
import json
import os
import pickle
import pickletools
import re
import warnings

import numpy as np
import psutil
import torch

import dnnlib
from dnnlib.util import UserError
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence

SNAPSHOT_FORMAT = 'ect-network-snapshot'
SNAPSHOT_VERSION = 2   # 2: with a checksum of the content (version 1 files, without, are still read)

# Network classes that official records and our snapshots may name, by the module defining them here.
_NETWORK_MODULES = {
    'training.networks': ('VPPrecond', 'VEPrecond', 'EDMPrecond', 'ECMPrecond', 'SongUNet', 'DhariwalUNet',
                          'Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding'),
    'training.networks_edm2': ('Precond', 'UNet', 'Block', 'MPConv', 'MPFourier'),
    'training.networks_cm': ('KarrasDenoiser',),
}
_NETWORK_CLASS_MODULE = {name: module for module, names in _NETWORK_MODULES.items() for name in names}
_NETWORK_CLASS_NAMES = frozenset(f'{module}.{name}' for name, module in _NETWORK_CLASS_MODULE.items())

# Non-network objects of official pickles: kept as PersistentRecord(class_name, init_kwargs), never built.
_RECORD_ONLY_CLASSES = frozenset(['EDMLoss', 'VPLoss', 'VELoss', 'ECMLoss', 'ECTLoss', 'EDM2Loss', 'AugmentPipe',
                                  'StandardRGBEncoder'])

_PICKLE_PROTOCOL_BYTE = b'\x80'
_ZIP_MAGIC = b'PK'


@dataclasses.dataclass(frozen=True)
class PersistentRecord:
    """A non-network persistent object of an official pickle (loss, augment pipe, encoder), not rebuilt."""
    class_name: str     # Class name recorded in the pickle, e.g. 'VPLoss'.
    init_kwargs: dict   # Keyword arguments it was constructed with.


class _ModuleRecord:
    """A persistent record read without executing its source: its class name and pickled __dict__."""

    def __init__(self, class_name, state):
        self.class_name = class_name    # Class name from the record, checked against the allow-list.
        self.state = state              # The object's pickled __dict__ (_parameters, _buffers, _modules, ...).


class _ContainerStub:
    """Inert stand-in for torch.nn.ModuleDict / ModuleList / Sequential: keeps the pickled state only."""

    def __setstate__(self, state):
        self.state = state


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickling of official pickles.

class _Refused(pickle.UnpicklingError):
    """Content a safe load refuses (as opposed to a damaged file); the message names what was refused."""


def _safe_load_from_bytes(data):
    """Replacement for torch.storage._load_from_bytes: the bytes are a torch.save archive, read weights-only."""
    if not isinstance(data, bytes):
        raise _Refused('a storage payload that is not bytes')
    try:
        return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _torch_refused_global(e)
        if refused:
            raise _Refused(f'{refused} inside a storage payload') from None
        raise


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Replacement for torch._utils._rebuild_tensor_v2 that accepts only a real storage and no hooks."""
    del requires_grad, backward_hooks, metadata  # Only values matter here; hooks are never attached.
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _Refused('a tensor record without a storage')
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Replacement for torch._utils._rebuild_parameter(_with_state): the tensor only, no hooks or attributes."""
    del requires_grad, backward_hooks, state
    if not isinstance(data, torch.Tensor):
        raise _Refused('a parameter record without a tensor')
    return data


def _numpy_dtype(spec, align=False, copy=True):
    """Replacement for numpy.dtype in pickled numpy scalars: numeric and bool types only, always a fresh copy."""
    del copy  # A fresh copy is always made: the pickle's BUILD step then sets the state of that copy only.
    dtype = np.dtype(spec, align=bool(align), copy=True) if isinstance(spec, str) else None
    if dtype is None or dtype.kind not in 'biufc':
        raise _Refused(f'numpy dtype {spec!r} (not a numeric type)')
    return dtype


def _numpy_scalar(dtype, data):
    """Replacement for numpy's scalar(dtype, bytes) as used by pickled numpy scalars (e.g. EDM's skip_scale)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biufc' or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise _Refused('a malformed numpy scalar')
    return np.frombuffer(data, dtype=dtype)[0]


_SAFE_GLOBALS = {
    ('numpy', 'dtype'): _numpy_dtype,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _safe_load_from_bytes,
    ('torch.nn.modules.container', 'ModuleDict'): _ContainerStub,
    ('torch.nn.modules.container', 'ModuleList'): _ContainerStub,
    ('torch.nn.modules.container', 'Sequential'): _ContainerStub,
}
_RECORD_GLOBAL = ('torch_utils.persistence', '_reconstruct_persistent_obj')


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and turns persistent records into _ModuleRecord."""

    def __init__(self, file, name):
        super().__init__(file)
        self.name = name    # File name used in error messages.

    def find_class(self, module, name):
        if (module, name) == _RECORD_GLOBAL:
            return self.make_record
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise UserError(refusal(self.name, f'global "{module}.{name}"'))

    def make_record(self, meta):
        version = persistence.FORMAT_VERSION
        if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != version:
            raise UserError(f'{self.name}: unsupported persistent record (expected type "class", version {version})')
        class_name = meta.get('class_name')
        if class_name in _LATENT_ENCODERS:
            raise _latent_model(self.name, class_name)
        if class_name not in _NETWORK_CLASS_MODULE and class_name not in _RECORD_ONLY_CLASSES:
            raise UserError(refusal(self.name, f'persistent class "{class_name}"'))
        if not isinstance(meta.get('state'), dict):
            raise UserError(f'{self.name}: persistent record of "{class_name}" has no state dict')
        return _ModuleRecord(class_name, meta['state'])


class _LegacyUnpickler(pickle.Unpickler):
    """EDM's own loading: persistent records are rebuilt by executing their embedded source (opt-in only)."""

    def find_class(self, module, name):
        if (module, name) == _RECORD_GLOBAL:
            return persistence.exec_persistent_record
        return super().find_class(module, name)


def refusal(name, what):
    """The one message for content a safe load refuses: what was refused, and that the file may be malicious."""
    return (f'{name}: refused to load: the file refers to {what}, which is not on the allow-list of a safe load '
            f'(loading it could run code; the file may be malicious)')


def _torch_refused_global(error):
    """The global named by torch's weights-only refusal ('GLOBAL os.system ...'), or None for other errors."""
    text = str(error)
    if 'Weights only load failed' not in text:
        return None
    match = re.search(r'GLOBAL ([A-Za-z0-9_.]+)', text)
    return f'global "{match.group(1)}"' if match else 'an object type'


def _brief(error):
    """First line of an exception from deep inside pickle/torch (never torch's advice lines), for a message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f'{type(error).__name__}: {lines[0][:200]}' if lines else type(error).__name__


def _is_truncation(error):
    text = str(error).lower()
    return isinstance(error, EOFError) or 'truncated' in text or 'central directory' in text


def unreadable(name, what, error):
    """The one message for a file that cannot be parsed at all (not for content a safe load refuses)."""
    reason = 'truncated or corrupt file' if _is_truncation(error) else 'damaged file, or not such a file'
    return f'{name}: cannot read {what} ({reason}): {_brief(error)}'


_LATENT_ENCODERS = frozenset(['StabilityVAEEncoder'])    # EDM2's encoders of latent-space networks (img512, ...)


def _latent_model(name, encoder):
    return UserError(f'{name}: an EDM2 latent-space network (its encoder is {encoder}, a VAE): latent-space models '
                     f'are not supported; use a pixel-space network (e.g. EDM2\'s img64 models)')


def _latent_model_error(file, name):
    """The refusal of an EDM2 latent-space network pickle, found by its encoder's class name with pickletools
    (which executes nothing), or None."""
    try:
        file.seek(0)
        encoder = next((arg for _op, arg, _pos in pickletools.genops(file) if arg in _LATENT_ENCODERS), None)
    except Exception:  # An unreadable or non-seekable file: the original refusal stands.
        return None
    return None if encoder is None else _latent_model(name, encoder)


def _unpickle(file, name, allow_unsafe_pickle):
    if allow_unsafe_pickle:
        warnings.warn(f'{name}: loading with allow_unsafe_pickle=True executes Python code embedded in the '
                      f'file; do this only for files you trust', stacklevel=4)
        unpickler = _LegacyUnpickler(file)
    else:
        unpickler = _RestrictedUnpickler(file, name)
    try:
        return unpickler.load()
    except (UserError, _Refused) as e:
        latent = None if allow_unsafe_pickle else _latent_model_error(file, name)
        raise latent or (e if isinstance(e, UserError) else UserError(refusal(name, str(e)))) from None
    except Exception as e:
        raise UserError(unreadable(name, 'network pickle', e)) from None


# ----------------------------------------------------------------------------------------------------------
# Building this project's networks from records.

def _network_class(class_name):
    return getattr(importlib.import_module(_NETWORK_CLASS_MODULE[class_name]), class_name)


MAX_RECORDED_INT = 1 << 20   # largest integer a recorded constructor argument may hold (channels, resolution, ...)


def _check_recorded_ints(value, name, cls):
    """Recorded constructor arguments hold no absurd integer (a loop or an allocation of that size)."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_recorded_ints(item, name, cls)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RECORDED_INT:
        raise UserError(f'{name}: refusing to build {cls.__name__}: a recorded constructor argument is {value}, '
                        f'beyond {MAX_RECORDED_INT}')


def _check_memory(cls, init_args, init_kwargs):
    """Build the network on the meta device (no memory) and refuse it if its tensors need more memory than is
    available: absurd recorded sizes are a one-line refusal, not an out-of-memory crash."""
    with torch.device('meta'):
        probe = cls(*init_args, **init_kwargs)
    needed = sum(t.numel() * t.element_size() for t in probe.state_dict().values())
    available = psutil.virtual_memory().available
    if needed > available:
        raise UserError(f'its tensors would need {needed / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB '
                        f'of memory available')


def _instantiate(cls, init_args, init_kwargs, name):
    if not isinstance(init_args, (tuple, list)) or not isinstance(init_kwargs, dict):
        raise UserError(f'{name}: {cls.__name__} has malformed recorded constructor arguments')
    _check_recorded_ints([init_args, init_kwargs], name, cls)
    try:
        _check_memory(cls, init_args, init_kwargs)
        return cls(*init_args, **init_kwargs)
    except (TypeError, ValueError, dnnlib.UserError) as e:
        raise UserError(f'{name}: cannot build {cls.__name__} from its recorded constructor arguments: {e}') from None
    except (MemoryError, RuntimeError) as e:
        raise UserError(f'{name}: cannot build {cls.__name__} from its recorded constructor arguments '
                        f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None


def _name_list(names, limit=8):
    shown = ', '.join(names[:limit])
    return shown + (f', ... ({len(names)} in all)' if len(names) > limit else '')


def _load_state_strict(net, tensors, name):
    """Load `tensors` into `net`; any missing, unexpected or wrongly shaped tensor is a UserError naming it."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise UserError(f'{name}: tensors do not match {type(net).__name__}: '
                        f'missing [{_name_list(missing)}], unexpected [{_name_list(unexpected)}]')
    for key, value in expected.items():
        if not isinstance(tensors[key], torch.Tensor):
            raise UserError(f'{name}: "{key}" is not a tensor')
        if tensors[key].shape != value.shape:
            raise UserError(f'{name}: tensor "{key}" has shape {list(tensors[key].shape)}, '
                            f'{type(net).__name__} expects {list(value.shape)}')
    net.load_state_dict(tensors, strict=True)


def _state_field(state, key, name, prefix):
    value = state.get(key, {}) if isinstance(state, dict) else None
    if not isinstance(value, dict):
        raise UserError(f'{name}: module "{prefix or "<root>"}" has a malformed state ({key})')
    return value


def _record_tensors(record, name, prefix='', out=None):
    """Dotted name -> tensor for the persistent parameters and buffers of a record and its submodules."""
    out = {} if out is None else out
    state = getattr(record, 'state', None)
    parameters, buffers, modules = (_state_field(state, key, name, prefix)
                                    for key in ('_parameters', '_buffers', '_modules'))
    non_persistent = state.get('_non_persistent_buffers_set', set())
    entries = list(parameters.items()) + [(k, v) for k, v in buffers.items() if k not in non_persistent]
    for key, value in entries:
        if value is not None:
            out[prefix + key] = value
    for key, child in modules.items():
        if child is None:
            continue
        if not isinstance(child, (_ModuleRecord, _ContainerStub)):
            raise UserError(f'{name}: submodule "{prefix + key}" is not a persistent record')
        _record_tensors(child, name, prefix + key + '.', out)
    return out


def _build_from_record(record, name):
    state = record.state
    if record.class_name in _RECORD_ONLY_CLASSES:
        init_kwargs = state.get('_init_kwargs', {})
        if not isinstance(init_kwargs, dict):
            raise UserError(f'{name}: {record.class_name} has malformed recorded constructor arguments')
        return PersistentRecord(record.class_name, dict(init_kwargs))
    tensors = _record_tensors(record, name)
    init_kwargs = _edm2_logvar_kwargs(record.class_name, state.get('_init_kwargs', {}), tensors)
    net = _instantiate(_network_class(record.class_name), state.get('_init_args', ()), init_kwargs, name)
    _load_state_strict(net, tensors, name)
    return net.eval()


def _edm2_logvar_kwargs(class_name, init_kwargs, tensors):
    """EDM2's Precond builds its uncertainty head by default (logvar_channels=128), so official EDM2 pickles hold
    logvar_* tensors without naming logvar_channels; this project's default is no head. Name it from the tensors."""
    head = tensors.get('logvar_linear.weight')
    if class_name != 'Precond' or not isinstance(init_kwargs, dict) or 'logvar_channels' in init_kwargs \
            or not isinstance(head, torch.Tensor) or head.ndim != 2:
        return init_kwargs
    return dict(init_kwargs, logvar_channels=int(head.shape[1]))


def _convert_records(value, name):
    """Replace the records of an unpickled official dict by built networks / PersistentRecord values."""
    if isinstance(value, _ModuleRecord):
        return _build_from_record(value, name)
    if isinstance(value, _ContainerStub):
        raise UserError(f'{name}: a bare module container is not a network')
    if isinstance(value, dict):
        return type(value)((k, _convert_records(v, name)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_convert_records(v, name) for v in value)
    return value


def _file_name(file):
    return os.fspath(file) if isinstance(file, (str, os.PathLike)) else getattr(file, 'name', '<stream>')


def _load_pkl(file, name, allow_unsafe_pickle):
    data = _unpickle(file, name, allow_unsafe_pickle)
    if not isinstance(data, dict):
        raise UserError(f'{name}: not a network pickle (expected a dict with "ema", got {type(data).__name__})')
    return data if allow_unsafe_pickle else _convert_records(data, name)


def load_network_pkl(file, *, allow_unsafe_pickle=False):
    """The dict of an official EDM/EDM2/ECT network pickle (a path, URL or binary file object), with its
    networks rebuilt as this project's classes and other persistent objects as PersistentRecord values.
    allow_unsafe_pickle=True instead rebuilds everything by executing the embedded source (trusted files only).
    """
    name = _file_name(file)
    if isinstance(file, (str, os.PathLike)):
        with dnnlib.util.open_url(file) as f:
            return _load_pkl(f, name, allow_unsafe_pickle)
    return _load_pkl(file, name, allow_unsafe_pickle)


def _pickled_ema(data, name):
    net = data.get('ema')
    if not isinstance(net, torch.nn.Module):
        raise UserError(f'{name}: the pickle holds no "ema" network')
    return net


def load_network_and_metadata(path_or_url, *, allow_unsafe_pickle=False, cache_dir=None):
    """(network, metadata) of an official pickle (its `ema`; metadata {}, pickles have none) or of one of our
    snapshots (its metadata), told apart by content; the network is in eval mode on the CPU. URLs are
    downloaded into the cache once. Exported networks (model.safetensors + config.json, their folder) and
    hf://OWNER/REPO[/FILE] paths are accepted too (training.export, training.hub)."""
    from training import export, hub  # Deferred: they import this module.
    if hub.is_hf_url(path_or_url):
        path_or_url = hub.resolve(path_or_url)
    if export.is_safetensors_path(path_or_url):
        return export.load_safetensors_network(path_or_url)
    name = os.fspath(path_or_url)
    metadata = {}
    with dnnlib.util.open_url(path_or_url, cache_dir=cache_dir) as f:
        head = f.read(2)
        f.seek(0)
        if head.startswith(_ZIP_MAGIC):
            net, metadata = load_network_snapshot(f, name=name)
        elif head.startswith(_PICKLE_PROTOCOL_BYTE):
            net = _pickled_ema(_load_pkl(f, name, allow_unsafe_pickle), name)
            if allow_unsafe_pickle:
                net = net.to('cpu')  # Executed source may have restored CUDA tensors; our rebuilds are on the CPU.
        else:
            raise UserError(f'{name}: not a network checkpoint (neither a network pickle nor a network snapshot)')
    return net.eval(), metadata


def load_network(path_or_url, *, allow_unsafe_pickle=False, cache_dir=None):
    """The network of an official pickle or of one of our snapshots (see load_network_and_metadata)."""
    return load_network_and_metadata(path_or_url, allow_unsafe_pickle=allow_unsafe_pickle, cache_dir=cache_dir)[0]


# ----------------------------------------------------------------------------------------------------------
# Plain-data checks shared by snapshots and training states.

_PRIMITIVES = (type(None), bool, int, float, str)


def _plain(value, where, allow_tensors):
    """A copy of `value` made of dicts, lists, tuples, primitives (and tensors if allowed) — what a
    weights_only torch.load reads back; anything else raises TypeError naming where it is."""
    if isinstance(value, _PRIMITIVES) or (allow_tensors and isinstance(value, torch.Tensor)):
        return value
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, _PRIMITIVES)]
        if bad:
            raise TypeError(f'{where}: dict key {bad[0]!r} is not a str/int/float/bool/None')
        return {k: _plain(v, f'{where}[{k!r}]', allow_tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f'{where}[{i}]', allow_tensors) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f'{where}: {type(value).__module__}.{type(value).__qualname__} cannot be stored '
                    f'(only tensors, python primitives, lists, tuples and dicts)')


def read_weights_only(file, name, what, mmap=False):
    """torch.load(weights_only=True) on the CPU; a missing, truncated or corrupt file is a one-line UserError,
    content a weights-only load refuses is a refusal naming it (the file may be malicious)."""
    try:
        if isinstance(file, (str, os.PathLike)):
            if mmap:
                return torch.load(file, map_location='cpu', weights_only=True, mmap=True)
            with open(file, 'rb') as f:
                return torch.load(f, map_location='cpu', weights_only=True)
        return torch.load(file, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f'{name}: no such {what} file') from None
    except Exception as e:
        refused = _torch_refused_global(e)
        raise UserError(refusal(name, refused) if refused else unreadable(name, f'{what} file', e)) from None


def _feed_digest(h, value):
    """Hash a plain structure: the kind, keys and length of each container, the dtype, shape and bytes of each
    tensor, the repr of each primitive."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f'T{t.dtype}{list(t.shape)};'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f'D{len(value)};'.encode())
        for key, item in value.items():
            h.update(f'{key!r}:'.encode())
            _feed_digest(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(f'{type(value).__name__[0]}{len(value)};'.encode())
        for item in value:
            _feed_digest(h, item)
    else:
        h.update(f'{value!r};'.encode())


def content_sha256(value):
    """SHA-256 of a plain structure (what save_network_snapshot and save_training_state store), independent of
    how torch.save lays it out: a flipped byte in any tensor or field changes it."""
    h = hashlib.sha256()
    _feed_digest(h, value)
    return h.hexdigest()


def _with_checksum(data):
    return dict(data, sha256=content_sha256(data))


def _verify_checksum(data, name, what):
    """The dict without its 'sha256' field, after checking the field against the content."""
    stored = data.get('sha256')
    content = {k: v for k, v in data.items() if k != 'sha256'}
    if not isinstance(stored, str) or content_sha256(content) != stored:
        raise UserError(f'{name}: the {what} is damaged: its content does not match its checksum'
                        f'{"" if isinstance(stored, str) else " (no checksum stored)"}')
    return content


def _save_torch(path, data):
    with dnnlib.util.atomic_write(path, 'wb') as f:
        torch.save(data, f)


# ----------------------------------------------------------------------------------------------------------
# Our own network snapshots.

def _constructor_kwargs(net):
    """The keyword arguments that rebuild `net` (networks of this project are built by keyword only)."""
    if not persistence.is_persistent(net):
        raise TypeError(f'{type(net).__qualname__} is not a @persistent_class network; it cannot be snapshotted')
    if net.init_args:
        raise TypeError(f'{type(net).__qualname__} was built with positional arguments; build it by keyword '
                        f'so a snapshot can record its configuration')
    return net.init_kwargs


def _public_class_name(cls):
    """The dotted name snapshots record for `cls`: the module that exports it (e.g. 'training.networks.ECMPrecond',
    although the class is defined in training.networks.precond)."""
    module = _NETWORK_CLASS_MODULE.get(cls.__qualname__)
    if module is None or _network_class(cls.__qualname__) is not cls:
        raise TypeError(f'{cls.__module__}.{cls.__qualname__} is not one of the network classes a snapshot may hold')
    return f'{module}.{cls.__qualname__}'


def save_network_snapshot(path, net, **metadata):
    """Write `net` to `path` in this project's safe snapshot format (a weights_only-loadable torch.save file).
    `metadata` (e.g. kimg, stage, ema, mid_t) must be JSON-serialisable; it is stored as its JSON round trip."""
    class_name = _public_class_name(type(net))
    try:
        metadata = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise TypeError(f'save_network_snapshot: metadata is not JSON-serialisable: {e}') from None
    data = dict(format=SNAPSHOT_FORMAT, version=SNAPSHOT_VERSION, class_name=class_name,
                init_kwargs=_plain(_constructor_kwargs(net), 'init_kwargs', allow_tensors=False),
                state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()}, metadata=metadata)
    _save_torch(path, _with_checksum(data))


def _check_snapshot(data, name):
    """The snapshot's dict, checked (version 2 and later: against its checksum)."""
    if not isinstance(data, dict) or data.get('format') != SNAPSHOT_FORMAT:
        raise UserError(f'{name}: not an {SNAPSHOT_FORMAT} file')
    if data.get('version') not in (1, SNAPSHOT_VERSION):
        raise UserError(f'{name}: unsupported snapshot version {data.get("version")!r} (expected {SNAPSHOT_VERSION})')
    if data['version'] >= 2:
        data = _verify_checksum(data, name, 'network snapshot')
    if data.get('class_name') not in _NETWORK_CLASS_NAMES:
        raise UserError(refusal(name, f'class "{data.get("class_name")}"'))
    for key in ('init_kwargs', 'state_dict', 'metadata'):
        if not isinstance(data.get(key), dict):
            raise UserError(f'{name}: snapshot field "{key}" is missing or not a dict')
    return data


def load_network_snapshot(path, *, name=None):
    """(net, metadata) from a file written by save_network_snapshot (a path or binary file object);
    the network is in eval mode on the CPU."""
    name = name if name is not None else _file_name(path)
    return network_from_snapshot(read_weights_only(path, name, 'network snapshot'), name)


def network_from_snapshot(data, name):
    """(net, metadata) from the dict of a snapshot file already read by read_weights_only."""
    data = _check_snapshot(data, name)
    return build_network(data['class_name'], data['init_kwargs'], data['state_dict'], name), data['metadata']


def build_network(class_name, init_kwargs, tensors, name):
    """The network `class_name` (a dotted name on the allow-list of network classes) built from keyword
    arguments and loaded with `tensors` under the strict name and shape check; eval mode, CPU. Shared by every
    safe format (snapshots, model.safetensors)."""
    if class_name not in _NETWORK_CLASS_NAMES:
        raise UserError(refusal(name, f'class "{class_name}"'))
    if not isinstance(init_kwargs, dict):
        raise UserError(f'{name}: the constructor arguments of {class_name} are not a dict')
    module_name, _, short_name = class_name.rpartition('.')
    net = _instantiate(getattr(importlib.import_module(module_name), short_name), (), init_kwargs, name)
    _load_state_strict(net, tensors, name)
    return net.eval()


def snapshot_class_name(net):
    """The dotted class name a snapshot or an export records for `net`; TypeError for a class not on the list."""
    return _public_class_name(type(net))


def snapshot_init_kwargs(net):
    """The constructor keyword arguments of `net` as plain data (what a snapshot records to rebuild it)."""
    return _plain(_constructor_kwargs(net), 'init_kwargs', allow_tensors=False)


# ----------------------------------------------------------------------------------------------------------
# Weight transfer (docs/ECT.md §2: the inner U-Net of an EDM VP checkpoint into the ECM preconditioner).

@dataclasses.dataclass
class TransferReport:
    """What transfer_weights did, by dotted tensor name."""
    copied: list        # In both networks; copied from source to target.
    skipped: list       # In the source only (e.g. model.map_augment.weight when augmentation is off).
    untouched: list     # In the target only; left as initialised.

    @property
    def skipped_missing_in_target(self):
        return self.skipped

    @property
    def not_in_source(self):
        return self.untouched

    def summary(self):
        return (f'transferred {len(self.copied)} tensors; skipped {len(self.skipped)} absent from the target '
                f'[{_name_list(self.skipped)}]; left {len(self.untouched)} target tensors as initialised '
                f'[{_name_list(self.untouched)}]')

    def __str__(self):
        return self.summary()


def transfer_weights(src_net, dst_net):
    """Copy every parameter and buffer that `src_net` and `dst_net` share by name; a shape mismatch is a
    UserError naming the tensor (checked before anything is copied)."""
    src, dst = src_net.state_dict(), dst_net.state_dict()
    copied = [k for k in dst if k in src]
    for key in copied:
        if src[key].shape != dst[key].shape:
            raise UserError(f'transfer_weights: tensor "{key}" has shape {list(src[key].shape)} in the source '
                            f'network but {list(dst[key].shape)} in the target')
    with torch.no_grad():
        for key in copied:
            dst[key].copy_(src[key])
    return TransferReport(copied=copied, skipped=[k for k in src if k not in dst],
                          untouched=[k for k in dst if k not in src])


# ----------------------------------------------------------------------------------------------------------
# Training state files: low-level save/load of plain data.

def save_training_state(path, state):
    """Atomically write the training state (tensors, python primitives, lists, tuples and dicts only) with a
    checksum of its content."""
    if not isinstance(state, dict):
        raise TypeError('save_training_state: state must be a dict')
    _save_torch(path, _with_checksum(_plain(state, 'training state', allow_tensors=True)))


def load_training_state(path):
    """The dict written by save_training_state (weights_only, on the CPU), checked against its checksum (files
    written before states carried one are read unchecked); a missing, truncated, corrupt or damaged file is a
    UserError naming it."""
    name = _file_name(path)
    state = read_weights_only(path, name, 'training state')
    if not isinstance(state, dict):
        raise UserError(f'{name}: not a training state file')
    return _verify_checksum(state, name, 'training state') if 'sha256' in state else state

# ----------------------------------------------------------------------------------------------------------
# The training state of a run: one dataclass, one save/read/resume path.


@dataclasses.dataclass
class LoopProgress:
    """The loop's counters (saved in every training state; the sampler position is cur_nimg)."""
    cur_nimg: int = 0           # images seen, all ranks together
    cur_tick: int = 0           # ticks completed
    tick_start_nimg: int = 0    # cur_nimg at the start of the current tick
    elapsed_sec: float = 0.0    # training time before now, over all resumes


@dataclasses.dataclass
class TrainingState:
    """Everything a run needs to continue exactly: the trained network, its EMAs, the method's state, the
    optimiser, the fp16 GradScaler and the loop's progress; the RNG states of every rank are gathered when it is
    saved. The data order is a function of (seed, images seen), so progress.cur_nimg is the sampler position."""
    FORMAT = 'ect-training-state'
    VERSION = 2

    net: torch.nn.Module                # the trained network (not DDP-wrapped)
    ema: object                         # EMA tracker(s) of net (training.ema.*: state_dict/load_state_dict/get)
    method: object                      # the training method (training.methods.base.Method)
    optimizer: torch.optim.Optimizer    # optimiser of net's parameters
    scaler: object = None               # torch.amp.GradScaler under fp16, else None
    progress: LoopProgress = dataclasses.field(default_factory=LoopProgress)
    trackers: dict = dataclasses.field(default_factory=dict)   # experiment-tracker ids (e.g. the W&B run id)

    def to_dict(self, options=None):
        """The plain-data record of the state (a collective when distributed: every rank's RNG is gathered)."""
        return dict(format=self.FORMAT, version=self.VERSION, net=self.net.state_dict(), ema=self.ema.state_dict(),
                    method=self.method.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler is not None else None,
                    progress=dataclasses.asdict(self.progress), rng=_gather_rng_states(),
                    world_size=dist.get_world_size(), sampler_position=self.progress.cur_nimg,
                    trackers=json.loads(json.dumps(self.trackers)),
                    options=json.loads(json.dumps(options)))

    def save(self, run_dir, options=None):
        """training-state-{kimg:06d}.pt and training-state-latest.pt (every rank calls; rank 0 writes, atomically)."""
        data = self.to_dict(options)
        if dist.get_rank() != 0:
            return
        for name in (f'training-state-{self.progress.cur_nimg // 1000:06d}.pt', 'training-state-latest.pt'):
            save_training_state(os.path.join(run_dir, name), data)

    @classmethod
    def read(cls, path):
        """The record of a training-state file, checked; a file that is not one is a UserError naming it."""
        data = load_training_state(path)
        if data.get('format') != cls.FORMAT or data.get('version') != cls.VERSION:
            raise UserError(f'{path}: not an ECT training state of version {cls.VERSION} (format '
                            f'{data.get("format")!r}, version {data.get("version")!r})')
        missing = [k for k in ('net', 'ema', 'method', 'optimizer', 'progress', 'rng') if k not in data]
        if missing:
            raise UserError(f'{path}: training state lacks {missing}')
        return data

    def resume(self, path, seed):
        """Load everything from the file at `path` into this state, the RNG states of this rank last."""
        data = self.read(path)
        try:
            self.net.load_state_dict(data['net'])
            self.optimizer.load_state_dict(data['optimizer'])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f'--resume: {path} does not match this network/optimiser configuration: '
                            f'{str(e).splitlines()[0]}') from None
        self.ema.load_state_dict(data['ema'])
        self.method.load_state_dict(data['method'])
        if self.scaler is not None and data.get('scaler') is not None:
            self.scaler.load_state_dict(data['scaler'])
        self.progress = LoopProgress(**data['progress'])
        self.trackers = dict(data.get('trackers') or {})
        _restore_rng(data['rng'], seed, self.progress.cur_nimg)


def _gather_rng_states():
    """The RNG states of every rank, in rank order (a collective)."""
    states = misc.get_rng_states()
    if dist.get_world_size() == 1:
        return [states]
    gathered = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(gathered, states)
    return gathered


def _restore_rng(rng, seed, cur_nimg):
    """This rank's RNG states from `rng` (one per rank); with a different number of ranks the run cannot continue
    bit-for-bit, so each rank is reseeded from (seed, images seen) instead and that is said."""
    if len(rng) == dist.get_world_size():
        misc.set_rng_states(rng[dist.get_rank()])
        return
    dist.print0(f'Resume: the state was written by {len(rng)} processes, this run has {dist.get_world_size()}; '
                f'reseeding RNGs (the continuation is statistically, not bitwise, equivalent)')
    misc.set_seed(seed + cur_nimg, dist.get_rank())
