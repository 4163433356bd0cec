"""Checkpoints: a folder per epoch holding the weights as safetensors, a JSON sidecar, and the optimiser, scheduler
and RNG state needed to resume a run exactly.

::

    epoch-003/
      model.safetensors   every tensor of the state_dict (parameters and buffers)
      model.json          sidecar: format, epoch, metrics, trainer bookkeeping, sha256 of the other files
      state.pt            optimiser + scheduler state_dict, torch CPU (and CUDA) RNG state; torch.save, read back
                          with ``weights_only=True``

A checkpoint is written into a temporary sibling folder, each file flushed to disk, and the folder renamed into
place (``os.replace``), so a run killed at any moment leaves either the previous checkpoint or the new one, never a
partial one. Single files (``history.json``, ``result.json``) go through :func:`atomic_write_text`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from avlowshot.errors import AvlowshotError, CheckpointError, disk_full, is_disk_full

FORMAT = "avlowshot-checkpoint/1"
MODEL_FILE = "model.safetensors"
SIDECAR_FILE = "model.json"
STATE_FILE = "state.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Every byte of ``data`` to ``fd`` (the one place checkpoint, sidecar and result bytes reach the disk)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_file(path: Path, data: bytes, fd: int | None = None) -> None:
    """A new file holding ``data`` (``fd``: already opened for writing), flushed to disk and closed."""
    if fd is None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(path.parent, len(data), path.name) from None
        raise
    try:
        _write_file(Path(tmp), data, fd)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(path.parent, len(data), path.name) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def file_sha256(path: Path) -> str:
    """sha256 of every byte of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies (safetensors refuses tensors that share memory)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:  # another machine: at least the current device continues the same stream
            torch.cuda.set_rng_state(states[0])


def damaged_fix(path: Path) -> str:
    """What to do about a damaged checkpoint folder ``<stage>/checkpoints/epoch-NNN``."""
    stage = path.parent.parent
    return (
        f"delete {path} (and {stage / 'summary.json'} if the stage had finished) and run the same `avlowshot run` "
        "command with --resume: the stage continues from its other checkpoint or starts again"
    )


TRAINER_FIELDS = ("best_epoch", "best_hm", "beta_best", "beta_last", "lr_drops", "history")


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    def _error(self, name: str, message: str) -> CheckpointError:
        return CheckpointError(message, path=self.path / name, fix=damaged_fix(self.path))

    def model_state(self) -> dict[str, torch.Tensor]:
        try:
            return load_file(self.path / MODEL_FILE)
        except (SafetensorError, OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise self._error(MODEL_FILE, f"not a readable safetensors file: corrupt or truncated ({reason})") from None

    def load_model(self, module: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        """The weights into ``module``; a missing or extra tensor, or one of another shape, is a clear error."""
        state = self.model_state()
        own = module.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or extra or shapes:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
            if extra:
                parts.append(f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else ""))
            for k in shapes[:3]:
                parts.append(f"'{k}' is {tuple(state[k].shape)}, the model has {tuple(own[k].shape)}")
            raise self._error(
                MODEL_FILE,
                f"the weights do not fit the run's model ({'; '.join(parts)}): another method or config wrote them, "
                "or the file was edited",
            )
        module.load_state_dict({k: v.to(device) for k, v in state.items()})

    def train_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        f = self.path / STATE_FILE
        if not f.is_file():
            raise AvlowshotError(f"{self.path}: no {STATE_FILE} (a weights-only checkpoint cannot resume training)")
        try:
            state = torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            # the restricted loader's own message lists its internals (allowed globals, docs links): not for users
            raise self._error(
                STATE_FILE,
                "refused: it holds objects other than tensors and plain containers, which the restricted loader "
                "(torch weights_only) does not admit; nothing in it was run",
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise self._error(STATE_FILE, f"not a readable torch file: corrupt or truncated ({reason})") from None
        if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict) or "rng" not in state:
            found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise self._error(
                STATE_FILE,
                f"not a training state: expected a dict with 'optimizer', 'scheduler', 'rng' (found {found})",
            )
        return state

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Optimiser state saved for these very parameters (group sizes and every moment's shape), else an error."""
        groups = state.get("param_groups") if isinstance(state, dict) else None
        per_param = state.get("state") if isinstance(state, dict) else None
        if not isinstance(groups, list) or not isinstance(per_param, dict):
            raise self._error(STATE_FILE, "'optimizer' is not an optimiser state_dict (no 'state' / 'param_groups')")
        own = [len(g["params"]) for g in optimizer.param_groups]
        saved = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in groups]
        problem = None
        if own != saved:
            problem = f"parameter groups of {saved} parameters, the run's optimiser has {own}"
        else:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            ids = [i for g in groups for i in g["params"]]
            by_id = dict(zip(ids, params, strict=True))
            for i, st in per_param.items():
                param = by_id.get(i)
                if param is None or not isinstance(st, dict):
                    problem = f"state for parameter {i!r}, which the run's optimiser does not have"
                    break
                for name, value in st.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                        problem = (
                            f"'{name}' of parameter {i} is {tuple(value.shape)}, the parameter is {tuple(param.shape)}"
                        )
                        break
                if problem:
                    break
        if problem:
            raise self._error(STATE_FILE, f"the optimiser state belongs to other parameters ({problem})")
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise self._error(STATE_FILE, f"the optimiser state does not load ({exc})") from None

    def trainer_book(self) -> dict[str, Any]:
        book = self.meta.get("trainer")
        missing = [k for k in TRAINER_FIELDS if not isinstance(book, dict) or k not in book]
        if missing:
            raise self._error(SIDECAR_FILE, f"the sidecar lacks the trainer fields {', '.join(missing)}")
        return book

    def restore_training(self, optimizer, scheduler, map_location: str | torch.device = "cpu") -> None:
        """Optimiser, scheduler and RNG state of a resumed run."""
        state = self.train_state(map_location)
        self.load_optimizer(optimizer, state["optimizer"])
        try:
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
            raise self._error(STATE_FILE, f"the scheduler or RNG state does not load ({exc})") from None


def _serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Checkpoint:
    """Write a checkpoint folder atomically (replacing an existing one). Every byte is produced in memory first, so
    a full disk fails with the size that was needed and leaves no partial folder."""
    path = Path(path)
    blobs = {MODEL_FILE: save(state_tensors(model_state), metadata={"format": FORMAT})}
    if train_state is not None:
        blobs[STATE_FILE] = _serialize(train_state)
    sidecar = {
        "format": FORMAT,
        **meta,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()},
    }
    blobs[SIDECAR_FILE] = (json.dumps(sidecar, indent=2, allow_nan=True) + "\n").encode("utf-8")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        for name, data in blobs.items():
            _write_file(tmp / name, data)
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full(path.parent, sum(len(b) for b in blobs.values()), f"checkpoint {path.name}") from None
        raise
    return Checkpoint(path, sidecar)


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    path = Path(path)
    side = path / SIDECAR_FILE
    fix = damaged_fix(path)
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"not a checkpoint (no {SIDECAR_FILE})", path=path, fix=fix) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable checkpoint sidecar ({exc})", path=side, fix=fix) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"expected a JSON object, found {type(meta).__name__}", path=side, fix=fix)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"unknown checkpoint format {meta.get('format')!r}, expected {FORMAT!r}", path=side)
    files = meta.get("files")
    missing = [k for k in ("epoch", "files") if k not in meta]
    if (
        missing
        or not isinstance(meta["epoch"], int)
        or not isinstance(files, dict)
        or not isinstance(files.get(MODEL_FILE), str)
        or not all(isinstance(v, str) for v in files.values())
    ):
        what = f"lacks {', '.join(repr(k) for k in missing)}" if missing else "has a malformed 'epoch' or 'files'"
        raise CheckpointError(
            f"the sidecar {what}: expected 'epoch' (int) and 'files' ({{name: sha256}}, with {MODEL_FILE})",
            path=side,
            fix=fix,
        )
    if verify:
        for name, digest in files.items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"missing (listed in {SIDECAR_FILE})", path=f, fix=fix)
            if file_sha256(f) != digest:
                raise CheckpointError(
                    f"the file was changed after it was written (its sha256 no longer matches {SIDECAR_FILE})",
                    path=f,
                    fix=fix,
                )
    return Checkpoint(path, meta)


def epoch_dir(checkpoints: Path, epoch: int) -> Path:
    """Folder of the checkpoint taken after 0-based epoch ``epoch``."""
    return checkpoints / f"epoch-{epoch:03d}"


def list_checkpoints(checkpoints: str | Path) -> list[int]:
    """0-based epochs of the complete checkpoints in a folder, ascending (temporary folders are ignored)."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    out = []
    for p in checkpoints.iterdir():
        if p.is_dir() and p.name.startswith("epoch-") and (p / SIDECAR_FILE).is_file():
            try:
                out.append(int(p.name[len("epoch-") :]))
            except ValueError:
                continue
    return sorted(out)


def prune_checkpoints(checkpoints: str | Path, keep: set[int]) -> None:
    """Remove epoch folders not in ``keep`` and leftovers of interrupted writes."""
    checkpoints = Path(checkpoints)
    for e in list_checkpoints(checkpoints):
        if e not in keep:
            shutil.rmtree(epoch_dir(checkpoints, e), ignore_errors=True)
    for p in checkpoints.glob(".*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    for p in checkpoints.glob(".*.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Clean up after writes a kill interrupted anywhere below ``folder`` (a run directory): temporary files and
    checkpoint folders (``.result.json.*.tmp``, ``.epoch-003.*.tmp``) are removed; a checkpoint moved aside for its
    replacement (``.epoch-003.old-<pid>``) is put back when the replacement never arrived, else removed. Only for a
    folder no other process writes to (a run being resumed or re-evaluated). Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.rglob(".*"), key=lambda q: len(q.parts), reverse=True):
        if not p.exists() and not p.is_symlink():
            continue  # inside a folder removed above
        if ".old-" in p.name and p.is_dir():
            target = p.with_name(p.name[1:].split(".old-")[0])
            if not target.exists() and (p / SIDECAR_FILE).is_file():
                os.replace(p, target)
                continue
        elif not p.name.endswith(".tmp"):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
