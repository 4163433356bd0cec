"""A restricted unpickler for the authors' formats (pickles and pickled dicts inside .npy files).

Only plain containers, strings, numbers and numpy arrays / scalars / dtypes are admitted. Any other global in the
stream (``os.system``, ``builtins.eval``, arbitrary classes, ...) is refused before it can be called, so a crafted
file never runs code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from avlowshot.errors import DataError

# (module, name) pairs a pickle of numpy arrays / scalars legitimately references. numpy 2 renamed numpy.core to
# numpy._core; files written by either version must load.
_ALLOWED_GLOBALS = {
    (mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")
} | {
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy", "bytes_"),
    ("numpy", "str_"),
    ("_codecs", "encode"),  # protocol-2 pickles encode bytes through _codecs.encode(str, 'latin1')
    ("builtins", "bytearray"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("collections", "OrderedDict"),
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            if module == "_codecs":
                import codecs

                return codecs.encode
            if module == "builtins":
                return {"bytearray": bytearray, "set": set, "frozenset": frozenset}[name]
            if module == "collections":
                import collections

                return collections.OrderedDict
            return getattr(np, name) if module == "numpy" else _numpy_internal(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _numpy_internal(module: str, name: str) -> Any:
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        # numpy 1 <-> 2 rename: try the other spelling
        other = (
            module.replace("numpy._core", "numpy.core")
            if "_core" in module
            else module.replace("numpy.core", "numpy._core")
        )
        return getattr(importlib.import_module(other), name)


def safe_loads(data: bytes, *, path: str | Path = "<bytes>") -> Any:
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        if "is not allowed" in str(exc):
            raise DataError(
                f"refused to unpickle: {exc}; only plain containers and numpy arrays are admitted",
                path=path,
                fix="this file is not a feature file of the authors' format (or was tampered with); re-download it",
            ) from None
        raise DataError(
            f"truncated or corrupt pickle ({exc})", path=path, fix="re-download or re-extract this file"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, UnicodeError) as exc:
        raise DataError(
            f"truncated or corrupt pickle ({type(exc).__name__}: {exc})",
            path=path,
            fix="re-download or re-extract this file",
        ) from None


def load_pickle(path: str | Path) -> Any:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    return safe_loads(data, path=path)


def load_npy_dict(path: str | Path) -> dict:
    """Read a ``np.save``d Python dict (a 0-d object array) without numpy's unrestricted unpickler."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            payload = fh.read()
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except (ValueError, OSError) as exc:
        raise DataError(f"not a valid .npy file ({exc})", path=path, fix="re-download this file") from None
    if dtype != np.dtype(object) or shape != ():
        raise DataError(
            f"expected a pickled dict (0-d object array), found dtype {dtype} shape {shape}",
            path=path,
            fix="class embeddings must be saved with np.save(path, {class_name: vector})",
        )
    obj = safe_loads(payload, path=path)
    if isinstance(obj, np.ndarray) and obj.shape == ():  # np.save pickles the whole 0-d object array
        obj = obj.item()
    if not isinstance(obj, dict):
        raise DataError(f"expected a dict of class name -> vector, found {type(obj).__name__}", path=path)
    return obj


def save_npy_dict(path: str | Path, obj: dict) -> None:
    """Write a dict the way the authors' ``np.save(path, dict)`` does (readable by numpy and by ``load_npy_dict``)."""
    arr = np.empty((), dtype=object)
    arr[()] = obj
    with open(path, "wb") as fh:
        np.lib.format.write_array(fh, arr, allow_pickle=True)
