"""Persistent classes: modules that remember their constructor arguments and pickle in EDM's format.

A class decorated with `persistent_class` records the positional and keyword arguments it was built with
(`obj.init_args`, `obj.init_kwargs`); this project's safe snapshots store those next to the tensors.
Pickling such an object writes EDM's persistent-object record (docs/ECT.md §7): a call of
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with `meta = {type: 'class', version: 6,
module_src, class_name, state}`, so official tools can read what we export.

Loading is the dangerous direction: EDM rebuilds these records by executing `module_src`. Here the plain
`_reconstruct_persistent_obj` refuses to do that; `training.checkpoints.checkpoint` reads records without executing
anything, and only its explicit legacy opt-in routes the record to `exec_persistent_record`.
"""

import copy
import functools
import hashlib
import inspect
import sys
import types

FORMAT_VERSION = 6


def persistent_class(cls):
    """Class decorator: record constructor arguments and pickle instances as EDM persistent objects."""
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        # Set after the constructor so the outermost decorated class in a hierarchy wins.
        object.__setattr__(self, '_init_args', copy.deepcopy(args))
        object.__setattr__(self, '_init_kwargs', copy.deepcopy(kwargs))

    def __reduce__(self):
        meta = dict(type='class', version=FORMAT_VERSION, module_src=_module_source(type(self)),
                    class_name=type(self).__name__, state=self.__getstate__())
        return (_reconstruct_persistent_obj, (meta,))

    def __deepcopy__(self, memo):
        # copy.deepcopy (EMA copies, ...) copies the state directly instead of going through the pickle record.
        result = type(self).__new__(type(self))
        memo[id(self)] = result
        result.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return result

    cls.__init__ = __init__
    cls.__reduce__ = __reduce__
    cls.__deepcopy__ = __deepcopy__
    cls.init_args = property(lambda self: copy.deepcopy(self._init_args))
    cls.init_kwargs = property(lambda self: copy.deepcopy(self._init_kwargs))
    cls._is_persistent_class = True
    return cls


def is_persistent(obj):
    """True for instances (or classes) decorated with `persistent_class`."""
    return getattr(obj, '_is_persistent_class', False)


@functools.lru_cache(maxsize=None)
def _module_source_cached(module_name):
    return inspect.getsource(sys.modules[module_name])


def _module_source(cls):
    return _module_source_cached(cls.__module__)


def _reconstruct_persistent_obj(meta):
    """Target of EDM persistent records. Refuses by default: rebuilding would execute embedded source code."""
    raise RuntimeError(
        f'refusing to rebuild persistent object "{meta.get("class_name") if isinstance(meta, dict) else meta}" '
        f'by executing the source code embedded in the pickle; load it with training.checkpoints.reader.load_network() '
        f'(safe), or pass allow_unsafe_pickle=True / --allow-unsafe-pickle if you trust the file')


def exec_persistent_record(meta):
    """Legacy, code-executing rebuild of an EDM persistent record. Only for files the user trusts."""
    if meta.get('type') != 'class' or meta.get('version') != FORMAT_VERSION:
        raise ValueError(f'unsupported persistent record type={meta.get("type")} version={meta.get("version")}')
    src = meta['module_src']
    module_name = '_persistent_' + hashlib.sha1(src.encode('utf-8')).hexdigest()
    module = sys.modules.get(module_name)
    if module is None:
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        exec(compile(src, f'<persistent {module_name}>', 'exec'), module.__dict__)  # noqa: S102 (explicit opt-in)
    cls = getattr(module, meta['class_name'])
    obj = cls.__new__(cls)
    if hasattr(obj, '__setstate__'):
        obj.__setstate__(meta['state'])
    else:
        obj.__dict__.update(meta['state'])
    return obj
