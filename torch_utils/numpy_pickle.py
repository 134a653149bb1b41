"""Reading plain pickles of numbers and numpy arrays (EDM2's reference statistics) without executing anything.

A pickle names the functions that rebuild its objects; this reader resolves only the few numpy names that
rebuild numeric arrays, dtypes and scalars, each replaced by a checking stand-in, and refuses every other name.
Arrays are assembled from their raw bytes after the whole file is read, so no numpy constructor ever sees
an unchecked argument.
"""

import pickle

import numpy as np

import dnnlib

_NUMPY_CORE = ('numpy.core', 'numpy._core')   # numpy 1.x and 2.x module names


class _ArrayRecord:
    """An ndarray as pickled by numpy (_reconstruct, then BUILD with (version, shape, dtype, fortran, bytes))."""

    def __setstate__(self, state):
        self.state = state


class _NdarrayName:
    """Stands for the class numpy.ndarray, the first argument of _reconstruct."""


def _dtype(spec, align=False, copy=True):
    """numpy.dtype for numeric and bool types only, always a fresh object."""
    del copy
    if not isinstance(spec, str) or np.dtype(spec).kind not in 'biufc':
        raise pickle.UnpicklingError(f'numpy dtype {spec!r} is not a numeric type')
    return np.dtype(spec, align=bool(align))


def _checked_dtype(dtype):
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biufc' or dtype.fields is not None:
        raise pickle.UnpicklingError('array of a non-numeric dtype')
    return np.dtype(dtype.str)


def _reconstruct(cls, shape, typecode):
    if cls is not _NdarrayName:
        raise pickle.UnpicklingError('_reconstruct of something other than numpy.ndarray')
    return _ArrayRecord()


def _scalar(dtype, data):
    dtype = _checked_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError('malformed numpy scalar')
    return np.frombuffer(data, dtype=dtype)[0]


def _array(data, dtype, shape, fortran):
    """A fresh array from raw bytes, after checking that they are exactly what dtype and shape call for."""
    dtype = _checked_dtype(dtype)
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise pickle.UnpicklingError('malformed array shape')
    if not isinstance(data, (bytes, bytearray)) or len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise pickle.UnpicklingError('array data does not match its shape and dtype')
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order='F' if fortran else 'C').copy()


def _frombuffer(buffer, dtype, shape, order):
    """numpy's protocol-5 form: the array's bytes in a (here in-band) buffer."""
    return _array(buffer, dtype, shape, order == 'F')


_GLOBALS = {('numpy', 'dtype'): _dtype, ('numpy', 'ndarray'): _NdarrayName}
for _core in _NUMPY_CORE:
    _GLOBALS.update({(f'{_core}.multiarray', '_reconstruct'): _reconstruct, (f'{_core}.multiarray', 'scalar'): _scalar,
                     (f'{_core}.numeric', '_frombuffer'): _frombuffer})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _GLOBALS:
            raise pickle.UnpicklingError(f'refusing global "{module}.{name}"')
        return _GLOBALS[(module, name)]


def _finish(value):
    """Replace array records by arrays, in dicts, lists and tuples."""
    if isinstance(value, _ArrayRecord):
        state = value.state if isinstance(value.state, tuple) else ()
        if len(state) == 5:
            state = state[1:]  # Drop the version number.
        if len(state) != 4:
            raise pickle.UnpicklingError('malformed array record')
        shape, dtype, fortran, data = state
        return _array(data, dtype, shape, bool(fortran))
    if isinstance(value, dict):
        return {k: _finish(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_finish(v) for v in value)
    return value


def load(file, name):
    """The object pickled in binary file `file` (named `name` in messages): dicts, lists, tuples, python
    primitives, numeric numpy arrays and scalars. Anything else, or a damaged file, is a UserError."""
    try:
        return _finish(_Unpickler(file).load())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as e:
        raise dnnlib.UserError(f'{name}: not a pickle of plain numbers and arrays, refused ({e}); '
                               f'a file that needs more may be malicious') from None
