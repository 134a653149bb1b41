"""Safe reading of official EDM/EDM2/ECT network pickles (docs/ECT.md §7).

Official pickles rebuild their networks by executing Python source embedded in the file. Here they are
read by a restricted unpickler that never executes or imports that source: every persistent record becomes
a plain (class name, state) record, only class names on an allow-list are accepted, tensors are rebuilt by
allow-listed torch functions, and the networks are then constructed as this project's classes from their
recorded constructor arguments, with their tensors loaded under a strict name and shape check.
"""

import collections
import dataclasses
import importlib
import io
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
from torch_utils import persistence
from training.checkpoints.network_classes import NETWORK_CLASS_MODULE

# Non-network objects of official pickles: kept as PersistentRecord(class_name, init_kwargs), never built.
_RECORD_ONLY_CLASSES = frozenset(['EDMLoss', 'VPLoss', 'VELoss', 'ECMLoss', 'ECTLoss', 'EDM2Loss', 'AugmentPipe',
                                  'StandardRGBEncoder'])


@dataclasses.dataclass(frozen=True)
class PersistentRecord:
    """A non-network persistent object of an official pickle (loss, augment pipe, encoder), not rebuilt."""
    class_name: str     # Class name recorded in the pickle, e.g. 'VPLoss'.
    init_kwargs: dict   # Keyword arguments it was constructed with.


class ModuleRecord:
    """A persistent record read without executing its source: its class name and pickled __dict__."""

    def __init__(self, class_name, state):
        self.class_name = class_name    # Class name from the record, checked against the allow-list.
        self.state = state              # The object's pickled __dict__ (_parameters, _buffers, _modules, ...).


class ContainerStub:
    """Inert stand-in for torch.nn.ModuleDict / ModuleList / Sequential: keeps the pickled state only."""

    def __setstate__(self, state):
        self.state = state


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickling of official pickles.

class Refused(pickle.UnpicklingError):
    """Content a safe load refuses (as opposed to a damaged file); the message names what was refused."""


def _safe_load_from_bytes(data):
    """Replacement for torch.storage._load_from_bytes: the bytes are a torch.save archive, read weights-only."""
    if not isinstance(data, bytes):
        raise Refused('a storage payload that is not bytes')
    try:
        return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = torch_refused_global(e)
        if refused:
            raise Refused(f'{refused} inside a storage payload') from None
        raise


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Replacement for torch._utils._rebuild_tensor_v2 that accepts only a real storage and no hooks."""
    del requires_grad, backward_hooks, metadata  # Only values matter here; hooks are never attached.
    if not isinstance(storage, torch.storage.TypedStorage):
        raise Refused('a tensor record without a storage')
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Replacement for torch._utils._rebuild_parameter(_with_state): the tensor only, no hooks or attributes."""
    del requires_grad, backward_hooks, state
    if not isinstance(data, torch.Tensor):
        raise Refused('a parameter record without a tensor')
    return data


def _numpy_dtype(spec, align=False, copy=True):
    """Replacement for numpy.dtype in pickled numpy scalars: numeric and bool types only, always a fresh copy."""
    del copy  # A fresh copy is always made: the pickle's BUILD step then sets the state of that copy only.
    dtype = np.dtype(spec, align=bool(align), copy=True) if isinstance(spec, str) else None
    if dtype is None or dtype.kind not in 'biufc':
        raise Refused(f'numpy dtype {spec!r} (not a numeric type)')
    return dtype


def _numpy_scalar(dtype, data):
    """Replacement for numpy's scalar(dtype, bytes) as used by pickled numpy scalars (e.g. EDM's skip_scale)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biufc' or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise Refused('a malformed numpy scalar')
    return np.frombuffer(data, dtype=dtype)[0]


SAFE_GLOBALS = {
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
    ('torch.nn.modules.container', 'ModuleDict'): ContainerStub,
    ('torch.nn.modules.container', 'ModuleList'): ContainerStub,
    ('torch.nn.modules.container', 'Sequential'): ContainerStub,
}
_RECORD_GLOBAL = ('torch_utils.persistence', '_reconstruct_persistent_obj')


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and turns persistent records into ModuleRecord."""

    def __init__(self, file, name):
        super().__init__(file)
        self.name = name    # File name used in error messages.

    def find_class(self, module, name):
        if (module, name) == _RECORD_GLOBAL:
            return self.make_record
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        raise UserError(refusal(self.name, f'global "{module}.{name}"'))

    def make_record(self, meta):
        version = persistence.FORMAT_VERSION
        if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != version:
            raise UserError(f'{self.name}: unsupported persistent record (expected type "class", version {version})')
        class_name = meta.get('class_name')
        if class_name in _LATENT_ENCODERS:
            raise _latent_model(self.name, class_name)
        if class_name not in NETWORK_CLASS_MODULE and class_name not in _RECORD_ONLY_CLASSES:
            raise UserError(refusal(self.name, f'persistent class "{class_name}"'))
        if not isinstance(meta.get('state'), dict):
            raise UserError(f'{self.name}: persistent record of "{class_name}" has no state dict')
        return ModuleRecord(class_name, meta['state'])


class LegacyUnpickler(pickle.Unpickler):
    """EDM's own loading: persistent records are rebuilt by executing their embedded source (opt-in only)."""

    def find_class(self, module, name):
        if (module, name) == _RECORD_GLOBAL:
            return persistence.exec_persistent_record
        return super().find_class(module, name)


def refusal(name, what):
    """The one message for content a safe load refuses: what was refused, and that the file may be malicious."""
    return (f'{name}: refused to load: the file refers to {what}, which is not on the allow-list of a safe load '
            f'(loading it could run code; the file may be malicious)')


def torch_refused_global(error):
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
        unpickler = LegacyUnpickler(file)
    else:
        unpickler = RestrictedUnpickler(file, name)
    try:
        return unpickler.load()
    except (UserError, Refused) as e:
        latent = None if allow_unsafe_pickle else _latent_model_error(file, name)
        raise latent or (e if isinstance(e, UserError) else UserError(refusal(name, str(e)))) from None
    except Exception as e:
        raise UserError(unreadable(name, 'network pickle', e)) from None


# ----------------------------------------------------------------------------------------------------------
# Building this project's networks from records.

def network_class(class_name):
    return getattr(importlib.import_module(NETWORK_CLASS_MODULE[class_name]), class_name)


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


def instantiate(cls, init_args, init_kwargs, name):
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


def name_list(names, limit=8):
    shown = ', '.join(names[:limit])
    return shown + (f', ... ({len(names)} in all)' if len(names) > limit else '')


def load_state_strict(net, tensors, name):
    """Load `tensors` into `net`; any missing, unexpected or wrongly shaped tensor is a UserError naming it."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise UserError(f'{name}: tensors do not match {type(net).__name__}: '
                        f'missing [{name_list(missing)}], unexpected [{name_list(unexpected)}]')
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


def record_tensors(record, name, prefix='', out=None):
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
        if not isinstance(child, (ModuleRecord, ContainerStub)):
            raise UserError(f'{name}: submodule "{prefix + key}" is not a persistent record')
        record_tensors(child, name, prefix + key + '.', out)
    return out


def _build_from_record(record, name):
    state = record.state
    if record.class_name in _RECORD_ONLY_CLASSES:
        init_kwargs = state.get('_init_kwargs', {})
        if not isinstance(init_kwargs, dict):
            raise UserError(f'{name}: {record.class_name} has malformed recorded constructor arguments')
        return PersistentRecord(record.class_name, dict(init_kwargs))
    tensors = record_tensors(record, name)
    init_kwargs = _edm2_logvar_kwargs(record.class_name, state.get('_init_kwargs', {}), tensors)
    net = instantiate(network_class(record.class_name), state.get('_init_args', ()), init_kwargs, name)
    load_state_strict(net, tensors, name)
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
    if isinstance(value, ModuleRecord):
        return _build_from_record(value, name)
    if isinstance(value, ContainerStub):
        raise UserError(f'{name}: a bare module container is not a network')
    if isinstance(value, dict):
        return type(value)((k, _convert_records(v, name)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_convert_records(v, name) for v in value)
    return value


def file_name(file):
    return os.fspath(file) if isinstance(file, (str, os.PathLike)) else getattr(file, 'name', '<stream>')


def load_pkl(file, name, allow_unsafe_pickle):
    data = _unpickle(file, name, allow_unsafe_pickle)
    if not isinstance(data, dict):
        raise UserError(f'{name}: not a network pickle (expected a dict with "ema", got {type(data).__name__})')
    return data if allow_unsafe_pickle else _convert_records(data, name)


def load_network_pkl(file, *, allow_unsafe_pickle=False):
    """The dict of an official EDM/EDM2/ECT network pickle (a path, URL or binary file object), with its
    networks rebuilt as this project's classes and other persistent objects as PersistentRecord values.
    allow_unsafe_pickle=True instead rebuilds everything by executing the embedded source (trusted files only).
    """
    name = file_name(file)
    if isinstance(file, (str, os.PathLike)):
        with dnnlib.util.open_url(file) as f:
            return load_pkl(f, name, allow_unsafe_pickle)
    return load_pkl(file, name, allow_unsafe_pickle)


def pickled_ema(data, name):
    net = data.get('ema')
    if not isinstance(net, torch.nn.Module):
        raise UserError(f'{name}: the pickle holds no "ema" network')
    return net
