"""Packed, memory-mapped cache of a layout's features.

One folder per (dataset root, layout, shots, input fingerprint): ``audio.bin`` / ``video.bin`` (raw rows, dtype as
stored), offsets, labels, split-folder codes, video ids and ``meta.json``. It is built in a temporary folder and
renamed into place only when complete, so a half-built cache can never be opened; its name carries a hash of the
inputs and of the code version, so a stale cache is never loaded. Reopening costs a directory scan, one ``stat``
per input file and a memory map: well under a second, and no feature bytes are read until a batch needs them.

**What "the inputs changed" means** (see ``docs/cache.md``): the key holds, for every feature file, its size, its
modification time, its inode number and its inode change time (``st_ctime``). Tools can put a modification time back
(``touch -d``, ``tar``, ``rsync -t``, ``os.utime``) but not the change time: the kernel sets it on every write,
rename and ``utime``, so an edit of any byte, even with the old size and mtime restored, gives a new key and a
rebuild. Copying or restoring the files (new inodes) also rebuilds. ``--verify-cache`` goes further: it hashes every
byte of every input and compares with the hashes recorded when the cache was built.

**Temporary folders**: a build writes into ``.<name>.tmp-<id>`` and holds an exclusive ``flock`` on it until the
rename; any later open removes the temporary folders whose lock is free (their builder died), so a killed build
leaves nothing behind for good. A rebuild (``--rebuild-cache``) first renames the old folder away, and opening
reads every file through one directory handle and treats a folder that vanishes half-way as "no cache", so a
process that opens the cache while another rebuilds it builds or waits, it never crashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import platformdirs
import torch

from avlowshot import __version__
from avlowshot.data.store import Modality

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux / macOS: temporary folders are removed by age instead
    fcntl = None

log = logging.getLogger("avlowshot.data")

CACHE_FORMAT = 2  # 2: stat key with inode and ctime, content hashes in meta.json
_ORPHAN_AGE = 600.0  # seconds after which an unlocked ".new-" folder (a build killed before it began) is removed
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    env = os.environ.get("AVLOWSHOT_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("avlowshot"))


def stat_fingerprint(path: Path) -> str:
    """Size, mtime, inode and inode change time: what changes on any write, even with the mtime put back."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def content_hash(path: Path) -> str:
    """BLAKE2b of every byte of the file."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _rel(f: Path) -> str:
    return f"{f.parent.parent.name}/{f.parent.name}/{f.name}"


def inputs_key(parts: list[str], files: list[Path], small_files: list[Path]) -> str:
    """The cache key: the layout parts, the bytes of the small files and the stat fingerprint of every feature
    file."""
    h = hashlib.sha256()
    h.update(f"avlowshot {__version__} cache {CACHE_FORMAT}\n".encode())
    for p in parts:
        h.update(p.encode() + b"\n")
    for f in small_files:
        h.update(f"{f.name}={content_hash(f)}\n".encode())
    for f in files:
        h.update(f"{_rel(f)}={stat_fingerprint(f)}\n".encode())
    return h.hexdigest()


def content_hashes(files: list[Path]) -> dict[str, str]:
    return {_rel(f): content_hash(f) for f in files}


def verify_contents(meta: dict, files: list[Path]) -> list[str]:
    """The input files whose bytes differ from those the cache was built from (every byte is hashed)."""
    recorded = meta.get("content") or {}
    return [_rel(f) for f in files if recorded.get(_rel(f)) != content_hash(f)]


class CacheWriter:
    """Appends samples class by class; memory stays at one class file."""

    def __init__(self, final_dir: Path):
        self.final_dir = final_dir
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        uid = uuid.uuid4().hex[:8]
        # locked under a name the cleaner leaves alone, then renamed: a ".tmp-" folder is locked from its first moment
        pending = final_dir.with_name(f".{final_dir.name}.new-{uid}")
        pending.mkdir()
        self._lock = _lock_dir(pending)
        self.tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp-{uid}")
        os.rename(pending, self.tmp_dir)
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
        try:
            os.rename(self.tmp_dir, self.final_dir)
        except OSError:  # another process finished the same cache first: keep theirs
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        finally:
            _unlock(self._lock)

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        _unlock(self._lock)


def _lock_dir(path: Path) -> int | None:
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing releases the flock


def remove_dead_temps(cache_root: Path) -> list[str]:
    """Remove the temporary folders of builds that died (their lock is free) and leftovers of rebuilds; returns
    their names. A folder whose builder is alive is locked and kept."""
    removed = []
    try:
        entries = list(os.scandir(cache_root))
    except FileNotFoundError:
        return removed
    now = time.time()
    for e in entries:
        name = e.name
        if not name.startswith(".") or not e.is_dir(follow_symlinks=False):
            continue
        if ".trash-" in name:
            shutil.rmtree(e.path, ignore_errors=True)
        elif ".new-" in name:
            try:
                old = now - e.stat(follow_symlinks=False).st_mtime > _ORPHAN_AGE
            except FileNotFoundError:
                continue
            if old:
                shutil.rmtree(e.path, ignore_errors=True)
        elif ".tmp-" in name:
            if fcntl is None:
                if now - e.stat(follow_symlinks=False).st_mtime > 86400:
                    shutil.rmtree(e.path, ignore_errors=True)
                continue
            try:
                fd = os.open(e.path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live build
                os.close(fd)
                continue
            try:
                shutil.rmtree(e.path, ignore_errors=True)
            finally:
                os.close(fd)
        else:
            continue
        removed.append(name)
    if removed:
        log.info("removed %d leftover cache folder(s) of interrupted builds: %s", len(removed), ", ".join(removed))
    return removed


def discard(cache_dir: Path) -> None:
    """Remove a cache folder so that processes which have it open (memory maps, open handles) keep working: it is
    renamed away first (atomic), then deleted."""
    trash = cache_dir.with_name(f".{cache_dir.name}.trash-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(cache_dir, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def open_cache(cache_dir: Path, temporal: bool, steps: tuple[float, float]) -> dict | None:
    """Memory-map a complete cache folder; None when there is none (or it vanished or is damaged: rebuild).

    Every file is opened through one handle on the folder, so a concurrent rebuild that renames the folder away
    cannot mix two caches; a file deleted before it was opened makes this None, never an exception."""
    try:
        dfd = os.open(cache_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None

    def at(name: str):
        return open(name, "rb", opener=lambda p, flags: os.open(p, flags, dir_fd=dfd))

    try:
        with at("meta.json") as fh:
            meta = json.load(fh)
        if not meta.get("complete"):
            return None
        mods = {}
        for m, step in zip(("audio", "video"), steps, strict=True):
            with at(f"{m}_offsets.npy") as fh:
                offsets = np.load(fh)
            dtype = np.dtype(meta["dtype"][m])
            with at(f"{m}.bin") as fh:
                # mode "c": copy-on-write, so torch gets a writable view while the file is never modified
                data = np.memmap(fh, dtype=dtype, mode="c", shape=(int(offsets[-1]), meta["dim"][m]))
            mods[m] = Modality(torch.from_numpy(data), torch.from_numpy(offsets) if temporal else None, step)
        arrays = {}
        for name in ("labels", "folder", "video_ids"):
            with at(f"{name}.npy") as fh:
                arrays[name] = np.load(fh)
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as exc:
        log.warning("cache %s is incomplete or vanished (%s): it is rebuilt", cache_dir, exc)
        return None
    finally:
        os.close(dfd)
    return {
        "meta": meta,
        "audio": mods["audio"],
        "video": mods["video"],
        "labels": torch.from_numpy(arrays["labels"]),
        "folder": arrays["folder"],
        "video_ids": arrays["video_ids"],
    }


def open_or_build(
    target: Path,
    *,
    temporal: bool,
    steps: tuple[float, float],
    files: list[Path],
    fill: Callable[[CacheWriter], dict],
    rebuild: bool = False,
    verify: bool = False,
    stale_prefix: str | None = None,
    root: str | None = None,
) -> dict:
    """Open the cache folder ``target``, building it first when it is missing (``fill`` writes the samples into the
    writer and returns the meta fields). ``rebuild``: discard an existing one first. ``verify``: hash every byte of
    ``files`` and rebuild when any differs from the hashes recorded at build time. Older caches of the same root
    (``stale_prefix``) are removed after a build."""
    remove_dead_temps(target.parent)
    if rebuild:
        discard(target)
    built = False
    for attempt in range(10):  # a concurrent --rebuild-cache may take the folder away between build and open
        if attempt:
            time.sleep(0.05 * attempt)  # let the rebuilding process finish
        opened = open_cache(target, temporal, steps)
        if opened is not None and verify and not built:
            changed = verify_contents(opened["meta"], files)
            if changed:
                more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
                log.warning(
                    "--verify-cache: %s changed since the cache was built (same size, mtime and inode change time "
                    "would not have shown it): rebuilding", ", ".join(changed[:3]) + more,
                )  # fmt: skip
                discard(target)
                opened = None
            else:
                log.info("--verify-cache: every byte of %d feature files matches the cache", len(files))
        if opened is not None:
            return opened
        content = content_hashes(files)  # before reading: a file that changes during the build changes the key
        writer = CacheWriter(target)
        try:
            meta = fill(writer)
        except BaseException:
            writer.abort()
            raise
        writer.commit({**meta, "content": content})
        built = True
        if stale_prefix is not None and root is not None:
            remove_stale(target.parent, stale_prefix, target.name, root)
    raise OSError(f"{target}: the cache folder vanished ten times while it was opened (is another process "
                  "rebuilding it in a loop?)")  # fmt: skip


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
                discard(d)
