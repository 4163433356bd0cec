"""Packed, memory-mapped cache of a layout's features.

One folder per (dataset root, layout, shots, input fingerprint): ``audio.bin`` / ``video.bin`` (raw rows, dtype as
stored), offsets, labels, split-folder codes, video ids and ``meta.json``. It is built in a temporary folder and
renamed into place only when complete, so a half-built cache can never be opened; its name carries a hash of the
inputs and of the code version, so a stale cache is never loaded. Reopening costs a directory scan, a few small
reads per input file and a memory map: well under a second, and no feature bytes are read until a batch needs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

import numpy as np
import platformdirs
import torch

from avlowshot import __version__
from avlowshot.data.store import Modality

CACHE_FORMAT = 1
_PROBE = 16 * 1024  # bytes hashed at the head and at the tail of every input file


def default_cache_dir() -> Path:
    env = os.environ.get("AVLOWSHOT_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("avlowshot"))


def file_fingerprint(path: Path, full: bool = False) -> str:
    """Content hash of a file: all of it when ``full`` (small files), else size + mtime + head and tail bytes."""
    h = hashlib.blake2b(digest_size=16)
    st = path.stat()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as fh:
        if full or st.st_size <= 2 * _PROBE:
            h.update(fh.read())
        else:
            h.update(fh.read(_PROBE))
            fh.seek(-_PROBE, os.SEEK_END)
            h.update(fh.read(_PROBE))
    return h.hexdigest()


def inputs_key(parts: list[str], files: list[Path], small_files: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"avlowshot {__version__} cache {CACHE_FORMAT}\n".encode())
    for p in parts:
        h.update(p.encode() + b"\n")
    for f in small_files:
        h.update(f"{f.name}={file_fingerprint(f, full=True)}\n".encode())
    for f in files:
        h.update(f"{f.parent.parent.name}/{f.parent.name}/{f.name}={file_fingerprint(f)}\n".encode())
    return h.hexdigest()


OWNER_FILE = "owner.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_abandoned(final_dir: Path) -> None:
    """Delete half-built copies of this cache left by a killed process of this machine (they are never opened, but
    hold up to the whole cache's size)."""
    for d in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):
        try:
            owner = json.loads((d / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        pid = owner.get("pid") if isinstance(owner, dict) else None
        if isinstance(pid, int) and pid > 0 and owner.get("host") == socket.gethostname() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)


class CacheWriter:
    """Appends samples class by class; memory stays at one class file."""

    def __init__(self, final_dir: Path):
        self.final_dir = final_dir
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(final_dir)
        self.tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp_dir.mkdir()
        (self.tmp_dir / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        self._files = {m: open(self.tmp_dir / f"{m}.bin", "wb") for m in ("audio", "video")}
        self._rows = {"audio": [0], "video": [0]}
        self._dtype: dict[str, str] = {}
        self._dim: dict[str, int] = {}
        self.labels: list[np.ndarray] = []
        self.folder: list[np.ndarray] = []
        self.video_ids: list[str] = []

    def add(self, modality: str, arrays: list[np.ndarray] | np.ndarray) -> None:
        """``arrays``: per-sample ``[T_i, D]`` (temporal) or ``[N, D]`` / per-sample ``(D,)`` (averaged)."""
        if isinstance(arrays, np.ndarray) or arrays[0].ndim == 1:
            block = np.ascontiguousarray(np.stack(arrays) if isinstance(arrays, list) else arrays)
            lengths = np.ones(len(block), dtype=np.int64)
        else:
            block = np.ascontiguousarray(np.concatenate(arrays, axis=0))
            lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        self._dtype.setdefault(modality, block.dtype.str)
        self._dim.setdefault(modality, int(block.shape[1]))
        self._files[modality].write(block.tobytes())
        rows = self._rows[modality]
        for n in np.cumsum(lengths) + rows[-1]:
            rows.append(int(n))

    def add_samples(self, labels: np.ndarray, folder: int, video_ids: list[str]) -> None:
        self.labels.append(np.asarray(labels, dtype=np.int64))
        self.folder.append(np.full(len(labels), folder, dtype=np.int16))
        self.video_ids.extend(video_ids)

    def commit(self, meta: dict) -> None:
        for f in self._files.values():
            f.close()
        for m in ("audio", "video"):
            np.save(self.tmp_dir / f"{m}_offsets.npy", np.asarray(self._rows[m], dtype=np.int64))
        np.save(self.tmp_dir / "labels.npy", np.concatenate(self.labels))
        np.save(self.tmp_dir / "folder.npy", np.concatenate(self.folder))
        np.save(self.tmp_dir / "video_ids.npy", np.asarray(self.video_ids, dtype=str))
        meta = {**meta, "dtype": self._dtype, "dim": self._dim, "n": len(self.video_ids), "complete": True}
        (self.tmp_dir / "meta.json").write_text(json.dumps(meta, indent=1))
        (self.tmp_dir / OWNER_FILE).unlink()
        try:
            os.rename(self.tmp_dir, self.final_dir)
        except OSError:  # another process finished the same cache first: keep theirs
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def open_cache(cache_dir: Path, temporal: bool, steps: tuple[float, float]) -> dict | None:
    """Memory-map a complete cache folder; None when there is none."""
    meta_file = cache_dir / "meta.json"
    if not meta_file.exists():
        return None
    meta = json.loads(meta_file.read_text())
    if not meta.get("complete"):
        return None
    mods = {}
    for m, step in zip(("audio", "video"), steps, strict=True):
        offsets = np.load(cache_dir / f"{m}_offsets.npy")
        dtype = np.dtype(meta["dtype"][m])
        # mode "c": copy-on-write, so torch gets a writable view while the file is never modified
        data = np.memmap(cache_dir / f"{m}.bin", dtype=dtype, mode="c", shape=(int(offsets[-1]), meta["dim"][m]))
        mods[m] = Modality(torch.from_numpy(data), torch.from_numpy(offsets) if temporal else None, step)
    return {
        "meta": meta,
        "audio": mods["audio"],
        "video": mods["video"],
        "labels": torch.from_numpy(np.load(cache_dir / "labels.npy")),
        "folder": np.load(cache_dir / "folder.npy"),
        "video_ids": np.load(cache_dir / "video_ids.npy"),
    }


def remove_stale(cache_dir: Path, prefix: str, keep: str, root: str) -> None:
    """Delete older caches of the same dataset root and layout (their inputs have changed)."""
    if not cache_dir.exists():
        return
    for d in cache_dir.iterdir():
        if d.is_dir() and d.name.startswith(prefix) and d.name != keep and not d.name.startswith("."):
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("root") == root:
                shutil.rmtree(d, ignore_errors=True)
