"""Hostile pickles for the restricted unpickler tests: each one would forge object pointers from raw file bytes, run
numpy's allocators on a declared size, or mutate a dtype numpy trusts, if the unpickler let it through.

``VARIANTS[name](protocol)`` returns the value stored under ``video_names`` of a feature pickle (or as a class vector
of a text ``.npy``); :func:`dumps` pickles a container holding it. Most use the standard pickler with objects whose
``__reduce__`` names the numpy callables; the ones the pickler cannot emit (a second BUILD on a used dtype, the OBJ
opcode) are assembled by hand in :func:`raw_variant`.
"""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np

try:
    from numpy._core import multiarray as _ma
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1
    from numpy.core import multiarray as _ma
    from numpy.core import numeric as _numeric

N = 4  # elements of each forged array
RAW = struct.pack("<Q", 0x4141414141414141) * N  # what would become object pointers: an unmapped address
O_STATE = (3, "|", None, None, None, -1, -1, 63)  # the state numpy pickles for dtype('O')
O_NOFLAGS = (3, "|", None, None, None, -1, -1, 0)  # ... with the flags that say "holds objects" cleared


class R:
    """Pickles as ``func(*args)`` (then ``BUILD state`` when given)."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _dtype(spec: str, state, copy: bool = True) -> R:
    return R(np.dtype, (spec, False, copy), state)


def _array(dtype, raw, shape=(N,)) -> R:
    """numpy's own array pickle: ``_reconstruct(ndarray, (0,), b'b')`` then ``BUILD (1, shape, dtype, F, raw)``."""
    return R(_ma._reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, raw))


VARIANTS = {
    # the reported attack: ndarray((n,), dtype('O'), buffer=<file bytes>)
    "ndarray-reduce": lambda p: R(np.ndarray, ((N,), np.dtype("O"), RAW)),
    # numpy's array pickle with a dtype('O') whose "holds objects" flags were cleared by BUILD
    "reconstruct-flags": lambda p: _array(_dtype("O8", O_NOFLAGS), RAW),
    # an object array declared with raw bytes instead of a list of elements
    "reconstruct-object-bytes": lambda p: _array(np.dtype("O"), RAW),
    # protocol-5 style _frombuffer with an object dtype, plain and with cleared flags
    "frombuffer-object": lambda p: R(_numeric._frombuffer, (RAW, np.dtype("O"), (N,), "C")),
    "frombuffer-flags": lambda p: R(_numeric._frombuffer, (RAW, _dtype("O8", O_NOFLAGS), (N,), "C")),
    # a numpy scalar of an object dtype read from bytes
    "scalar-flags": lambda p: R(_ma.scalar, (_dtype("O8", O_NOFLAGS), RAW[:8])),
    "scalar-object": lambda p: R(_ma.scalar, (np.dtype("O"), RAW[:8])),
    # BUILD on numpy's own dtype('O') singleton (copy=False): every later object array would trust raw bytes
    "dtype-singleton": lambda p: [_dtype("O8", O_NOFLAGS, copy=False), _array(np.dtype("O"), RAW)],
    # a structured dtype with an object field at offset 0 and cleared flags
    "structured-object-field": lambda p: _array(
        _dtype("V8", (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)), RAW[:8], shape=(1,)
    ),
    # a subarray dtype of objects
    "subarray-object": lambda p: _array(_dtype("V32", (3, "|", (np.dtype("O"), (N,)), None, None, 32, 8, 0)), RAW),
    # allocations sized by the file, not by its bytes: 1 TB arrays and buffers from a few bytes
    "reconstruct-huge": lambda p: R(_ma._reconstruct, (np.ndarray, (10**12,), b"b")),
    "build-shape-mismatch": lambda p: _array(np.dtype("f4"), b"\0" * 16, shape=(10**6, 10**6)),
    "bytearray-huge": lambda p: R(bytearray, (10**12,)),
    # other codecs through the allowed _codecs.encode
    "codecs-other": lambda p: R(__import__("codecs").encode, (b"x" * 64, "zlib_codec")),
}


# ---- a tiny assembler for the streams the pickler never writes (no memo but explicit LONG_BINPUT / LONG_BINGET, so
# that pieces can be concatenated under every protocol)


def _s(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _b(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data  # BINBYTES


def _i(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def _tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _put(n: int) -> bytes:
    return b"r" + struct.pack("<I", n)


def _get(n: int) -> bytes:
    return b"j" + struct.pack("<I", n)


def _glob(protocol: int, module: str, name: str) -> bytes:
    if protocol >= 4:
        return _s(module) + _s(name) + b"\x93"  # STACK_GLOBAL
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _dtype_ops(p: int, spec: str, state: bytes, memo: int | None = None) -> bytes:
    put = b"" if memo is None else _put(memo)
    return _glob(p, "numpy", "dtype") + _tup(_s(spec), b"\x89", b"\x88") + b"R" + put + state + b"b"


def _dtype_state(endian: str, elsize: int, alignment: int, flags: int) -> bytes:
    return _tup(_i(3), _s(endian), b"N", b"N", b"N", _i(elsize), _i(alignment), _i(flags))


def _array_ops(p: int, dtype: bytes, shape: tuple[int, ...], raw: bytes) -> bytes:
    new = _glob(p, _ma.__name__, "_reconstruct") + _tup(_glob(p, "numpy", "ndarray"), _tup(_i(0)), _b(b"b")) + b"R"
    return new + _tup(_i(1), _tup(*(_i(n) for n in shape)), dtype, b"\x89", _b(raw)) + b"b"


def raw_value(name: str, p: int) -> bytes:
    """The opcodes that push one crafted value."""
    if name == "dtype-rebuild":
        # dtype('U1') built once, used by a one-element array, then BUILD again to 1000 characters: the array would
        # read 4000 bytes from its 4-byte buffer
        dt = _dtype_ops(p, "U1", _dtype_state("<", 4, 4, 8), memo=900)
        arr = _array_ops(p, _get(900), (1,), b"a\0\0\0")
        grow = _get(900) + _dtype_state("<", 4000, 4, 8) + b"b"
        return b"(" + dt + arr + grow + b"t"
    if name == "ndarray-obj":
        # MARK, numpy.ndarray, shape, dtype('O'), buffer, OBJ: calls the class with the arguments
        dt = _dtype_ops(p, "O8", _dtype_state("|", -1, -1, 63))
        return b"(" + _glob(p, "numpy", "ndarray") + _tup(_i(N)) + dt + _b(RAW) + b"o"
    if name == "ndarray-newobj":
        # numpy.ndarray.__new__(numpy.ndarray, shape, dtype('O'), buffer): the NEWOBJ opcode
        dt = _dtype_ops(p, "O8", _dtype_state("|", -1, -1, 63))
        return _glob(p, "numpy", "ndarray") + _tup(_tup(_i(N)), dt, _b(RAW)) + b"\x81"
    raise KeyError(name)


RAW_VARIANTS = ("ndarray-newobj", "ndarray-obj", "dtype-rebuild")


def _raw_container(name: str, p: int, keys: tuple[str, ...]) -> bytes:
    """A dict of ``keys`` (features: legit arrays, video_names: the crafted value, fps: ints) assembled by hand."""
    f4 = _dtype_ops(p, "f4", _dtype_state("<", -1, -1, 0))
    items = b""
    for key in keys:
        if key == "features":
            val = b"(" + b"".join(_array_ops(p, f4, (2, 3), bytes(24)) for _ in range(N)) + b"l"  # LIST
        elif key == "fps":
            val = b"(" + _i(25) * N + b"l"
        else:
            val = raw_value(name, p)
        items += _s(key) + val
    return b"\x80" + bytes([p]) + b"}(" + items + b"u."  # EMPTY_DICT, MARK, items, SETITEMS, STOP


def feature_pickle(name: str, protocol: int) -> bytes:
    """A feature pickle of the authors' format whose ``video_names`` is the crafted value."""
    if name in RAW_VARIANTS:
        return _raw_container(name, protocol, ("features", "video_names", "fps"))
    feats = [np.zeros((2, 3), np.float32) for _ in range(N)]
    obj = {"features": feats, "video_names": VARIANTS[name](protocol), "fps": [25] * N}
    return pickle.dumps(obj, protocol=protocol)


def text_npy(name: str, protocol: int) -> bytes:
    """A ``.npy`` of class embeddings (a pickled dict of class name -> vector) whose vector is crafted."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    if name in RAW_VARIANTS:
        buf.write(_raw_container(name, protocol, ("classA",)))
    else:
        buf.write(pickle.dumps({"classA": VARIANTS[name](protocol)}, protocol=protocol))
    return buf.getvalue()


ALL = (*VARIANTS, *RAW_VARIANTS)
