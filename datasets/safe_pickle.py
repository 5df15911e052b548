"""Reading pickled data files without running code from them.

``pickle.load`` calls whatever function the file names (``os.system``, ``exec``, ...), so a
data file could run code on the machine that opens it. :func:`load_pickle` unpickles through
:class:`RestrictedUnpickler`, which resolves only the globals a pickle of NumPy arrays inside
builtin containers needs (MultiBench's affect files: dicts of dicts of arrays, labels and ids)
and refuses every other global with :class:`UnsafePickleError` naming it. ``trust_pickle=True``
opens a file you trust with the plain ``pickle.load`` (and warns).

Example:
    >>> import io, pickle, numpy as np
    >>> blob = pickle.dumps({"x": np.zeros((2, 3))})
    >>> RestrictedUnpickler(io.BytesIO(blob)).load()["x"].shape
    (2, 3)
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, FrozenSet, Tuple, Union

__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "UnsafePickleError", "load_pickle"]

PathLike = Union[str, Path]

_NUMPY_ARRAY = ("_reconstruct", "scalar")
#: ``(module, name)`` pairs a data pickle may reference: array reconstruction (NumPy 1.x and
#: 2.x module names, protocols 2 to 5), dtypes, NumPy scalars, builtin containers and scalars,
#: and ``_codecs.encode`` (protocol 2 writes bytes through it).
ALLOWED_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset(
    [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")]
    + [(f"numpy.{core}.multiarray", n) for core in ("core", "_core") for n in _NUMPY_ARRAY]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [(mod, n) for mod in ("builtins", "__builtin__") for n in (
        "dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray",
        "bool", "slice", "range")]
    # numpy 2 pickles dtypes of some kinds through their classes (numpy.dtypes.Float64DType, ...)
    + [("numpy.dtypes", n) for n in (
        "BoolDType", "Int8DType", "UInt8DType", "Int16DType", "UInt16DType", "Int32DType", "UInt32DType",
        "Int64DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType", "LongDoubleDType",
        "Complex64DType", "Complex128DType", "StrDType", "BytesDType", "ObjectDType")]
)


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle references a global outside :data:`ALLOWED_GLOBALS` (it could run code).
    Both an ``UnpicklingError`` and a ``ValueError`` (what the CLI reports as bad input)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; anything else raises
    :class:`UnsafePickleError` before it is imported or called."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - documented on the class
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"refused to unpickle the global {module}.{name}: data pickles may hold only NumPy arrays, "
                "dtypes and builtin containers/scalars; if you trust this file, pass trust_pickle=True")
        return super().find_class(module, name)


def load_pickle(path: PathLike, trust_pickle: bool = False, what: str = "data") -> Any:
    """Unpickle the file at ``path``.

    Args:
        path: the pickle file.
        trust_pickle: False (default): only NumPy arrays, dtypes and builtin containers and
            scalars are rebuilt, any other global is refused. True: the plain ``pickle.load``,
            which runs whatever code the file names; only for files you trust (warns).
        what: how the error messages name the file.

    Raises:
        FileNotFoundError: no such file. TypeError: ``trust_pickle`` not a bool.
        UnsafePickleError (a ValueError): the file references a refused global.
        ValueError: not a readable pickle.
    """
    if not isinstance(trust_pickle, bool):
        raise TypeError(f"trust_pickle must be True or False, got {trust_pickle!r}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} pickle not found: {p}")
    if trust_pickle:
        warnings.warn(f"trust_pickle=True: unpickling {p} with pickle.load, which runs any code the file "
                      "names; only do this for files you trust", UserWarning, stacklevel=3)
    with open(p, "rb") as fh:
        try:
            if trust_pickle:
                return pickle.load(fh)
            return RestrictedUnpickler(fh).load()
        except UnsafePickleError as exc:
            raise UnsafePickleError(f"{p}: {exc}") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as exc:
            raise ValueError(f"{p} is not a readable pickle: {type(exc).__name__}: {exc}") from exc
