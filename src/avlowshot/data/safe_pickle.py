"""A restricted unpickler for the authors' formats (pickles and pickled dicts inside .npy files).

Only plain containers, strings, numbers and numpy arrays / scalars / dtypes are admitted. Any other global in the
stream (``os.system``, ``builtins.eval``, arbitrary classes, ...) is refused before it can be called, so a crafted
file never runs code.

Admitting numpy's callables is not enough on its own: ``numpy.ndarray(shape, dtype('O'), buffer)``, a dtype whose
"holds objects" flags a ``BUILD`` cleared, a structured dtype with an object field or a dtype rebuilt after an array
used it would turn bytes of the file into object pointers (a segfault or worse) or read past a buffer. So the
unpickler is the pure-Python one with every numpy entry point replaced by a checked one:

* ``numpy.ndarray`` is only the subtype argument of ``_reconstruct(ndarray, (0,), b'b')`` (what numpy writes), never
  a callable; NEWOBJ / OBJ / INST are refused outright;
* ``numpy.dtype`` builds a fresh descriptor of a plain type (bool, int, uint, float, complex, bytes, str, object; no
  structured, subarray or datetime types); its one ``BUILD`` may set the byte order and the size of a bytes / str
  type, never the flags, and only before any array used it;
* an array's ``BUILD`` must give exactly the bytes its shape needs; an object array is rebuilt from the pickled
  elements (a list), never from raw bytes, and ``_frombuffer`` / ``scalar`` refuse object dtypes;
* ``bytes``, ``bytearray``, ``set``, ``frozenset``, ``OrderedDict`` and ``_codecs.encode`` accept only what their
  pickles hold (no declared sizes: ``bytearray(10**12)`` is refused), and ``BUILD`` / item assignment reach nothing
  else.

Every declared size is checked against the bytes that are really there, so memory stays within a small multiple of
the file size.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from avlowshot.errors import DataError

_KINDS = {"b": "bool", "i": "int", "u": "uint", "f": "float", "c": "complex", "S": "bytes", "U": "str", "O": "object"}
# what numpy writes as the first argument of numpy.dtype(...): 'f4', '<U5', 'S3', 'O8', 'b1', ...
_DTYPE_SPEC = re.compile(r"^[<>|=]?(?:b1|[iu][1248]|f(?:2|4|8|12|16)|c(?:8|16|24|32)|[SU][0-9]{0,10}|O[48]?)$")
_MAX_DIM = 1 << 48


class Refused(pickle.UnpicklingError):
    """A stream that does something the authors' formats never do."""


def _short(value: Any) -> str:
    """A bounded repr of a value taken from the file (error messages must not echo megabytes)."""
    try:
        text = repr(value)
    except Exception:  # e.g. ints too long to print
        text = f"<{type(value).__name__}>"
    return _clip(text)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _NdarrayType:
    """What the global ``numpy.ndarray`` resolves to: a marker for ``_reconstruct``, not a callable."""

    def __call__(self, *args, **kwargs):
        raise Refused("numpy.ndarray(...) is not allowed: arrays come only from numpy's own _reconstruct")

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayType()


class RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (each opcode is ours to check) restricted to the authors' formats."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes) -> None:
        self._size = len(data)
        self._raw = io.BytesIO(data)
        super().__init__(self._raw)
        # dtypes made by numpy.dtype in this stream (id -> object, kept alive) and those that may still get their one
        # BUILD; arrays from _reconstruct still waiting for theirs
        self._dtypes: dict[int, np.dtype] = {}
        self._dtype_open: set[int] = set()
        self._arrays_open: dict[int, np.ndarray] = {}
        self._allowed = self._globals()

    # ---- globals -----------------------------------------------------------------------------------------------

    def _globals(self) -> dict[tuple[str, str], Any]:
        table: dict[tuple[str, str], Any] = {
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): self._dtype,
            ("numpy", "bytes_"): _one_of(np.bytes_, (bytes,)),
            ("numpy", "str_"): _one_of(np.str_, (str,)),
            ("_codecs", "encode"): _latin1_encode,
            ("builtins", "bytes"): _empty_bytes,
            ("builtins", "bytearray"): _bytearray,
            ("builtins", "set"): _from_items(set),
            ("builtins", "frozenset"): _from_items(frozenset),
            ("collections", "OrderedDict"): _from_items(collections.OrderedDict),
        }
        for core in ("numpy.core", "numpy._core"):  # numpy 2 renamed numpy.core; files of either must load
            table[(f"{core}.multiarray", "_reconstruct")] = self._reconstruct
            table[(f"{core}.multiarray", "scalar")] = self._scalar
            table[(f"{core}.numeric", "_frombuffer")] = self._frombuffer
        return table

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol-2 pickles name the builtins the Python 2 way
            module = "builtins"
        found = self._allowed.get((module, name))
        if found is None:
            raise Refused(f"global '{module}.{name}' is not allowed")
        return found

    def persistent_load(self, pid):
        raise Refused("persistent ids are not allowed")

    # ---- numpy entry points -------------------------------------------------------------------------------------

    def _dtype(self, spec=None, align=False, copy=True, *rest):
        if rest or not isinstance(spec, str) or not _DTYPE_SPEC.match(spec) or not isinstance(align, bool):
            raise Refused(f"numpy.dtype({_short(spec)}) is not allowed (plain numeric, bytes, str and object types)")
        dt = np.dtype(spec, align=align, copy=True)  # never numpy's shared singleton: BUILD below may modify it
        if dt.kind not in _KINDS or dt.fields is not None or dt.subdtype is not None:
            raise Refused(f"numpy.dtype({_short(spec)}) is not allowed")
        self._dtypes[id(dt)] = dt
        self._dtype_open.add(id(dt))
        return dt

    def _use_dtype(self, dt, what: str) -> np.dtype:
        """A dtype argument: one this stream made; no BUILD may change it once an array or scalar uses it."""
        if not isinstance(dt, np.dtype) or self._dtypes.get(id(dt)) is not dt:
            raise Refused(f"{what}: the dtype argument is {_short(dt)}, not a numpy.dtype of this file")
        self._dtype_open.discard(id(dt))
        return dt

    def _reconstruct(self, subtype=None, shape=None, typecode=None, *rest):
        if rest or subtype is not _NDARRAY or shape != (0,) or typecode != b"b":
            raise Refused(
                f"_reconstruct({_short(subtype)}, {_short(shape)}, {_short(typecode)}) is not allowed "
                "(numpy writes _reconstruct(numpy.ndarray, (0,), b'b'))"
            )
        arr = np.empty((0,), dtype=np.int8)
        self._arrays_open[id(arr)] = arr
        return arr

    def _scalar(self, dtype=None, data=None, *rest):
        dt = self._use_dtype(dtype, "numpy scalar")
        if rest or dt.kind == "O":
            raise Refused("a numpy scalar of dtype object is not allowed")
        if not isinstance(data, bytes) or len(data) != dt.itemsize:
            raise Refused(f"a numpy scalar of {dt} needs {dt.itemsize} bytes, the file gives {_short(data)}")
        return np.frombuffer(data, dtype=dt)[0].copy()

    def _frombuffer(self, buf=None, dtype=None, shape=None, order="C", *rest):
        dt = self._use_dtype(dtype, "_frombuffer")
        if rest or dt.kind == "O":
            raise Refused("an array of dtype object from a raw buffer is not allowed")
        count = _check_shape(shape)
        if order not in ("C", "F") or not isinstance(buf, bytes | bytearray):
            raise Refused(f"_frombuffer: order {_short(order)}, buffer {type(buf).__name__}")
        if len(buf) != count * dt.itemsize:
            raise Refused(f"_frombuffer: shape {shape} of {dt} needs {count * dt.itemsize} bytes, got {len(buf)}")
        return np.frombuffer(buf, dtype=dt).reshape(shape, order=order)

    # ---- opcodes ------------------------------------------------------------------------------------------------

    def _load_build(self) -> None:
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        key = id(inst)
        if isinstance(inst, np.dtype) and key in self._dtype_open and self._dtypes.get(key) is inst:
            self._dtype_open.discard(key)
            _build_dtype(inst, state)
        elif isinstance(inst, np.ndarray) and self._arrays_open.get(key) is inst:
            del self._arrays_open[key]
            self._build_array(inst, state)
        else:
            raise Refused(f"BUILD on {type(inst).__name__} is not allowed")

    def _build_array(self, arr: np.ndarray, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise Refused(f"array state {_short(state)}")
        version, shape, dtype, fortran, raw = state if len(state) == 5 else (0, *state)
        dt = self._use_dtype(dtype, "array")
        count = _check_shape(shape)
        if version not in (0, 1) or not isinstance(fortran, bool):
            raise Refused(f"array state version {_short(version)}, fortran {_short(fortran)}")
        if dt.kind == "O":
            # object arrays hold their elements as a pickled list, never as bytes (pointers)
            if type(raw) is not list or len(raw) != count:
                raise Refused(
                    f"an object array of shape {shape} must be rebuilt from {count} pickled elements, "
                    f"the file gives {type(raw).__name__}"
                )
        elif not isinstance(raw, bytes) or len(raw) != count * dt.itemsize:
            got = len(raw) if isinstance(raw, bytes) else type(raw).__name__
            raise Refused(f"array of shape {shape} and dtype {dt} needs {count * dt.itemsize} bytes, got {got}")
        arr.__setstate__((version, shape, dt, fortran, raw) if len(state) == 5 else (shape, dt, fortran, raw))

    def _refuse_op(name: str):  # noqa: N805 - builds a dispatch entry
        def op(self):
            raise Refused(f"the {name} opcode is not allowed (it calls a class)")

        return op

    def _load_setitems_checked(self) -> None:
        if not isinstance(self._mark_target(), dict):
            raise Refused("SETITEMS on a non-dict")
        pickle._Unpickler.dispatch[pickle.SETITEMS[0]](self)

    def _mark_target(self):
        """The object a MARK-ed opcode (SETITEMS, APPENDS, ADDITEMS) adds to: the one below the mark."""
        return self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None

    def _load_setitem_checked(self) -> None:
        if len(self.stack) < 3 or not isinstance(self.stack[-3], dict):
            raise Refused("SETITEM on a non-dict")
        pickle._Unpickler.dispatch[pickle.SETITEM[0]](self)

    def _load_appends_checked(self) -> None:
        if not isinstance(self._mark_target(), list):
            raise Refused("APPENDS on a non-list")
        pickle._Unpickler.dispatch[pickle.APPENDS[0]](self)

    def _load_append_checked(self) -> None:
        if len(self.stack) < 2 or not isinstance(self.stack[-2], list):
            raise Refused("APPEND on a non-list")
        pickle._Unpickler.dispatch[pickle.APPEND[0]](self)

    def _load_additems_checked(self) -> None:
        if not isinstance(self._mark_target(), set):
            raise Refused("ADDITEMS on a non-set")
        pickle._Unpickler.dispatch[pickle.ADDITEMS[0]](self)

    def _load_bytearray8(self) -> None:
        """Protocol 5's in-band buffers: read straight into the bytearray (the stock loader copies twice, and every
        copy of fresh memory costs page faults) and never allocate more than the file still holds."""
        (n,) = struct.unpack("<Q", self.read(8))
        frame = self._unframer.current_frame
        left = self._size - self._raw.tell() + (len(frame.getbuffer()) - frame.tell() if frame is not None else 0)
        if n > left:
            raise pickle.UnpicklingError(f"pickle data was truncated (a buffer of {n} bytes, {left} left)")
        buf = bytearray(n)
        got = frame.readinto(buf) if frame is not None else 0
        if got < n:
            if got:
                raise pickle.UnpicklingError("pickle exhausted before end of frame")
            self._unframer.current_frame = None
            got = self._raw.readinto(buf)
        if got != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(buf)

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    dispatch[pickle.SETITEM[0]] = _load_setitem_checked
    dispatch[pickle.SETITEMS[0]] = _load_setitems_checked
    dispatch[pickle.APPEND[0]] = _load_append_checked
    dispatch[pickle.APPENDS[0]] = _load_appends_checked
    dispatch[pickle.ADDITEMS[0]] = _load_additems_checked
    for _op in ("NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "EXT1", "EXT2", "EXT4"):
        dispatch[getattr(pickle, _op)[0]] = _refuse_op(_op)
    del _op, _refuse_op


def _check_shape(shape) -> int:
    if type(shape) is not tuple or len(shape) > 32 or not all(type(n) is int and 0 <= n <= _MAX_DIM for n in shape):
        raise Refused(f"array shape {_short(shape)}")
    return math.prod(shape)


def _build_dtype(dt: np.dtype, state) -> None:
    """The one BUILD of a dtype: byte order, and the size of a bytes / str type; flags stay numpy's own."""
    if not isinstance(state, tuple) or len(state) != 8 or state[0] != 3:
        raise Refused(f"dtype state {_short(state)}")
    _, endian, subarray, names, fields, elsize, alignment, _flags = state
    kind, flags = dt.kind, dt.flags
    if subarray is not None or names is not None or fields is not None:
        raise Refused("structured and subarray dtypes are not allowed")
    if endian not in (("|",) if kind == "O" else ("<", ">", "|", "=")):
        raise Refused(f"byte order {_short(endian)} for a dtype of kind {kind}")
    if type(elsize) is not int or type(alignment) is not int:
        raise Refused(f"dtype size {_short(elsize)}")
    if kind in "SU":
        if not 0 <= elsize < 1 << 31 or (kind == "U" and elsize % 4) or alignment not in (-1, 1, 4):
            raise Refused(f"dtype {kind} of {elsize} bytes")
    elif elsize not in (-1, dt.itemsize) or alignment not in (-1, dt.alignment):
        raise Refused(f"dtype {dt} of {elsize} bytes")
    dt.__setstate__((3, endian, None, None, None, elsize, alignment, flags))
    if dt.kind != kind or dt.flags != flags or dt.fields is not None or dt.subdtype is not None:
        raise Refused(f"dtype state changed the dtype to {dt}")


def _one_of(cls, types: tuple[type, ...]):
    def make(*args):
        if len(args) != 1 or not isinstance(args[0], types):
            raise Refused(f"{cls.__name__}{_short(args)} is not allowed")
        return cls(args[0])

    return make


def _latin1_encode(text=None, encoding=None, *rest):
    """``_codecs.encode(str, 'latin1')``: how protocol 2 writes bytes; no other codec."""
    if rest or not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused(f"_codecs.encode(..., {_short(encoding)}) is not allowed")
    return text.encode("latin1")


def _empty_bytes(*args):
    """Protocol 2 writes ``b''`` as ``bytes()``; a size (``bytes(10**12)``) is refused."""
    if args:
        raise Refused(f"bytes{_short(args)} is not allowed")
    return b""


def _bytearray(*args):
    """``bytearray(bytes)`` or protocol 2's ``bytearray(str, 'latin-1')``; never a size."""
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], bytes):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], "latin1")
    raise Refused(f"bytearray{_short(args)} is not allowed")


def _from_items(cls):
    def make(*args):
        if not args:
            return cls()
        if len(args) == 1 and type(args[0]) in (list, tuple):
            return cls(args[0])
        raise Refused(f"{cls.__name__}{_short(args)} is not allowed")

    return make


def safe_loads(data: bytes, *, path: str | Path = "<bytes>") -> Any:
    try:
        return RestrictedUnpickler(data).load()
    except Refused as exc:
        raise DataError(
            f"refused to unpickle: {exc}; only plain containers and numpy arrays are admitted",
            path=path,
            fix="this file is not a feature file of the authors' format (or was tampered with); re-download it",
        ) from None
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"truncated or corrupt pickle ({_clip(str(exc))})", path=path, fix="re-download or re-extract this file"
        ) from None
    except (
        EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, UnicodeError,
        OverflowError, struct.error, RecursionError,
    ) as exc:  # fmt: skip
        raise DataError(
            f"truncated or corrupt pickle ({type(exc).__name__}: {_clip(str(exc))})",
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
