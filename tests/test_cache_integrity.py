"""The feature cache is never served for changed inputs, leaves no temporary folder behind after a killed build, and
survives a rebuild beside a concurrent open."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from avlowshot.data import cache as cache_mod
from avlowshot.data.benchmark import load_benchmark

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def avca_root(synth_root, tmp_path) -> Path:
    root = tmp_path / "UCF"
    shutil.copytree(synth_root("avca-cls"), root)
    return root


def _checksum(bench) -> float:
    s = bench.store
    return float(s.audio.data.double().sum() + s.video.data.double().sum())


def _edit_middle(path: Path) -> None:
    """Overwrite bytes in the middle of the file's feature rows in place, then put the size and mtime back (what
    ``touch -d`` or a tar extraction does): only the inode change time tells."""
    st = path.stat()
    with h5py.File(path, "r") as fh:
        start, size = fh["data"].id.get_offset(), fh["data"].id.get_storage_size()
    at = start + size // 2 - 32
    probe = 16 * 1024  # what the former key read at the head and the tail
    assert probe < at < st.st_size - probe - 64
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(b"\x42" * 64)  # float32 48.56, a valid feature value
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _biggest_feature_file(root: Path) -> Path:
    return max(root.rglob("video/*/*.h5"), key=lambda p: p.stat().st_size)


def test_an_edit_with_restored_mtime_invalidates_the_cache(avca_root, cache_dir):
    before = load_benchmark("avca-cls", avca_root, "UCF", cache_dir=cache_dir)
    old = _checksum(before)
    (first,) = [p.name for p in cache_dir.iterdir()]
    _edit_middle(_biggest_feature_file(avca_root))
    after = load_benchmark("avca-cls", avca_root, "UCF", cache_dir=cache_dir)
    assert _checksum(after) != old  # the new bytes are served
    assert [p.name for p in cache_dir.iterdir()] != [first]  # under a new key; the stale cache was removed
    assert len(list(cache_dir.iterdir())) == 1


def test_verify_cache_hashes_every_byte(avca_root, cache_dir, monkeypatch, caplog):
    """Where the stat key cannot tell (here: patched to ignore everything), --verify-cache still does."""
    monkeypatch.setattr(cache_mod, "stat_fingerprint", lambda path: "blind")
    old = _checksum(load_benchmark("avca-cls", avca_root, "UCF", cache_dir=cache_dir))
    f = _biggest_feature_file(avca_root)
    _edit_middle(f)
    assert _checksum(load_benchmark("avca-cls", avca_root, "UCF", cache_dir=cache_dir)) == old  # served stale
    with caplog.at_level("WARNING", logger="avlowshot.data"):
        new = _checksum(load_benchmark("avca-cls", avca_root, "UCF", cache_dir=cache_dir, verify_cache=True))
    assert new != old
    assert f"video/{f.parent.name}/{f.name} changed since the cache was built" in caplog.text
    with caplog.at_level("INFO", logger="avlowshot.data"):
        again = _checksum(load_benchmark("avca-cls", avca_root, "UCF", cache_dir=cache_dir, verify_cache=True))
    assert again == new and "every byte of" in caplog.text


_KILLED_BUILD = """
import os, signal, sys
from pathlib import Path
import numpy as np
from avlowshot.data.cache import CacheWriter
w = CacheWriter(Path(sys.argv[1]))
w.add("audio", np.zeros((3, 4), np.float32))
print(w.tmp_dir, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _fill(n: int):
    def fill(writer: cache_mod.CacheWriter) -> dict:
        writer.add("audio", np.full((n, 4), 1.0, np.float32))
        writer.add("video", np.full((n, 6), 2.0, np.float32))
        writer.add_samples(np.zeros(n, np.int64), 0, [f"v{i}" for i in range(n)])
        return {"root": "r"}

    return fill


def _open(target: Path, **kw) -> dict:
    return cache_mod.open_or_build(target, temporal=False, steps=(1.0, 1.0), files=[], fill=_fill(5), **kw)


def test_a_killed_build_leaves_no_temporary_folder_for_good(cache_dir):
    target = cache_dir / "X-layout-0123"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_BUILD, str(target)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == -9, proc.stderr
    dead = Path(proc.stdout.strip())
    assert dead.is_dir() and dead.name.startswith(".X-layout-0123.tmp-")
    live = cache_mod.CacheWriter(cache_dir / "Y-layout-4567")  # a build in progress in this process: kept
    opened = _open(target)
    assert not dead.exists() and live.tmp_dir.is_dir()
    assert float(opened["audio"].data.sum()) == 20.0
    live.abort()
    assert sorted(p.name for p in cache_dir.iterdir()) == ["X-layout-0123"]


def test_rebuild_beside_a_concurrent_open_never_fails(cache_dir):
    target = cache_dir / "X-layout-0123"
    _open(target)
    errors: list[BaseException] = []
    done = threading.Event()

    def rebuild():
        try:
            for _ in range(25):
                _open(target, rebuild=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    def reader():
        try:
            n = 0
            while not done.is_set() or n < 5:
                opened = _open(target)
                assert float(opened["video"].data.sum()) == 60.0 and len(opened["video_ids"]) == 5
                n += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=rebuild), threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, repr(errors[0])
    assert sorted(p.name for p in cache_dir.iterdir()) == ["X-layout-0123"]  # no temporary or trash folder left
