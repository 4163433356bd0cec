"""Safe readers for the files of a reference run folder: the ``torch.save`` checkpoints and the pickled arguments.

The reference checkpoints are ``torch.save`` pickles of a dict (``epoch``, ``model``, ``optimizer``, ``metric``).
They are read with ``torch.load(weights_only=True)`` and an explicit allow-list of the few non-tensor types such a
file may hold besides plain containers (an ``argparse.Namespace`` or paths from a saved config, numpy scalars);
every other global, the ones a crafted file would use to run code, is refused before anything is called.
``args.pkl`` is a plain pickle of an ``argparse.Namespace`` and goes through a restricted unpickler that admits
exactly ``argparse.Namespace`` and ``pathlib.PosixPath`` (paths come back as strings). ``args.yaml`` is read with
``yaml.safe_load``.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from avlowshot.errors import AvlowshotError


class ReferenceImportError(AvlowshotError):
    """A reference run folder that cannot be imported: the message names the file and what was expected."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        text = f"{self.path}: {message}" if self.path else message
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    return scalar


def checkpoint_globals() -> list:
    """The allow-list of ``torch.load(weights_only=True)`` for reference checkpoints: the saved-arguments types and
    numpy scalars (under numpy 1 and numpy 2 module names). Tensors, storages, OrderedDict and the builtin
    containers are torch's own weights-only set."""
    scalar = _numpy_scalar()
    allowed: list[Any] = [
        argparse.Namespace,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        np.dtype,
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            allowed.append(cls)
    return allowed


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a checkpoint references that torch's weights-only loader does not admit by itself (read from
    the pickle opcodes; nothing is executed)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - only used to word the error
        return []


def _reason(exc: Exception) -> str:
    """The cause of a failed ``torch.load`` in one line (torch's weights-only message is a page of advice)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    cause = next((ln for ln in lines if ln.startswith(("_pickle.UnpicklingError", "UnpicklingError"))), None)
    if cause is None:
        cause = next((ln for ln in reversed(lines) if "documentation" not in ln), lines[0] if lines else "")
    return f"{type(exc).__name__}: {cause[:200]}"


def load_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """A reference checkpoint dict, read with ``weights_only=True`` and :func:`checkpoint_globals`. A file that
    references any other global (a crafted pickle) is refused: :class:`ReferenceImportError` naming the file and the
    globals."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceImportError("checkpoint not found", path=path)
    allowed = checkpoint_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        admitted = {getattr(a, "__module__", "") + "." + getattr(a, "__name__", "") for a in allowed if callable(a)}
        admitted |= {a[1] for a in allowed if isinstance(a, tuple)}
        bad = [g for g in _unsafe_globals(path) if g not in admitted]
        if not bad:  # no foreign global: a broken file (torch words every unpickling failure the same way)
            raise ReferenceImportError(
                f"not a readable torch checkpoint ({_reason(exc)})",
                path=path,
                fix="re-download the run folder; the file is truncated or is not a torch.save file",
            ) from None
        raise ReferenceImportError(
            f"refused to load this checkpoint: it references {', '.join(repr(g) for g in bad)}, which is not a type "
            "a reference checkpoint holds (tensors, containers, numbers, strings, argparse.Namespace, paths, numpy "
            "scalars); a file like this can run code when it is unpickled. Nothing was loaded",
            path=path,
            fix="use the checkpoint as the reference code saved it (re-download it from the authors' link)",
        ) from None
    except Exception as exc:  # not a torch file, truncated zip, ...
        raise ReferenceImportError(
            f"not a readable torch checkpoint ({_reason(exc)})",
            path=path,
            fix="re-download the run folder; the file is truncated or is not a torch.save file",
        ) from None
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise ReferenceImportError(
            f"expected the reference checkpoint dict {{'epoch', 'model', 'optimizer', 'metric'}} with a state dict "
            f"under 'model', found {keys}",
            path=path,
        )
    state = obj["model"]
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ReferenceImportError(f"'model' must map names to tensors; bad entries: {bad[:5]}", path=path)
    epoch = obj.get("epoch")
    if isinstance(epoch, np.integer):
        epoch = int(epoch)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise ReferenceImportError(f"'epoch' must be the stored epoch (an int >= 1), found {epoch!r}", path=path)
    return {**obj, "epoch": epoch}


# ----------------------------------------------------------------------------------------------------------------
# Saved arguments


def _path_str(*parts: str) -> str:
    return str(pathlib.PurePosixPath(*parts))


class _ArgsUnpickler(pickle.Unpickler):
    """Admits exactly ``argparse.Namespace`` and ``pathlib.PosixPath`` (rebuilt as a ``str``; no filesystem
    access)."""

    PATHS = {("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if (module, name) in self.PATHS:
            return _path_str
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_args_pickle(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReferenceImportError(f"cannot read ({exc})", path=path) from None
    try:
        obj = _ArgsUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        if "is not allowed" in str(exc):
            raise ReferenceImportError(
                f"refused to unpickle the saved arguments: {exc}; args.pkl holds an argparse.Namespace of plain "
                "values and paths, nothing else (a file like this can run code when it is unpickled)",
                path=path,
                fix="use args.pkl as the reference code saved it (or delete it: args.yaml is read instead)",
            ) from None
        raise ReferenceImportError(f"truncated or corrupt pickle ({exc})", path=path) from None
    except Exception as exc:  # noqa: BLE001 - EOF, bad opcodes, ...
        raise ReferenceImportError(f"truncated or corrupt pickle ({type(exc).__name__}: {exc})", path=path) from None
    if not isinstance(obj, argparse.Namespace):
        raise ReferenceImportError(f"expected an argparse.Namespace, found {type(obj).__name__}", path=path)
    return dict(vars(obj))


def load_args_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ReferenceImportError(f"cannot read the saved arguments ({exc})", path=path) from None
    if not isinstance(obj, dict):
        raise ReferenceImportError(
            f"expected a mapping of argument names to values, found {type(obj).__name__}", path=path
        )
    return obj


ARGS_FILES = ("args.pkl", "args.yaml")


def read_run_args(run_dir: Path) -> tuple[dict[str, Any], Path]:
    """The saved arguments of a reference run folder (``args.pkl``, which the reference's evaluation reads, else
    ``args.yaml``) and the file they came from."""
    pkl, yml = (run_dir / name for name in ARGS_FILES)
    if pkl.is_file():
        return load_args_pickle(pkl), pkl
    if yml.is_file():
        return load_args_yaml(yml), yml
    raise ReferenceImportError(
        "not a reference run folder: no saved arguments (args.pkl or args.yaml)",
        path=run_dir,
        fix="pass the folder the reference training wrote (it holds args.pkl and the checkpoints)",
    )
