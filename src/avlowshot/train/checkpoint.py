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
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from avlowshot.errors import AvlowshotError

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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def _sha256(path: Path) -> str:
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


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    def model_state(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / MODEL_FILE)

    def train_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        f = self.path / STATE_FILE
        if not f.is_file():
            raise AvlowshotError(f"{self.path}: no {STATE_FILE} (a weights-only checkpoint cannot resume training)")
        return torch.load(f, map_location=map_location, weights_only=True)


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Checkpoint:
    """Write a checkpoint folder atomically (replacing an existing one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tensors = state_tensors(model_state)
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": FORMAT})
        files = [MODEL_FILE]
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
            files.append(STATE_FILE)
        for name in files:
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        sidecar = {"format": FORMAT, **meta, "files": {name: _sha256(tmp / name) for name in files}}
        with open(tmp / SIDECAR_FILE, "w", encoding="utf-8") as fh:
            json.dump(sidecar, fh, indent=2, allow_nan=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Checkpoint(path, sidecar)


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    path = Path(path)
    side = path / SIDECAR_FILE
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AvlowshotError(f"{path}: not a checkpoint (no {SIDECAR_FILE})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise AvlowshotError(f"{side}: unreadable checkpoint sidecar ({exc})") from None
    if meta.get("format") != FORMAT:
        raise AvlowshotError(f"{side}: unknown checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")
    if verify:
        for name, digest in meta.get("files", {}).items():
            f = path / name
            if not f.is_file() or _sha256(f) != digest:
                raise AvlowshotError(f"{f}: missing or corrupt (checksum does not match {SIDECAR_FILE})")
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
