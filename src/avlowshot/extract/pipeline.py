"""``avlowshot extract``: videos -> per-video features -> the authors' layouts.

Work is kept per video, so it is resumable and can be split over machines:

    <out>/extracted/<features>/extractor.json    what produced the features (backbone, compat, weight checksums)
    <out>/extracted/<features>/videos/<id>.npz   audio, video, class_name, source   (written atomically)
    <out>/extracted/<features>/failed-<i>of<N>.jsonl   the videos that failed in the last run of that shard

A re-run skips every video whose ``.npz`` exists; ``--shard i/N`` takes every N-th video of the sorted list, so N
machines can run the same command with their own ``i``. Without ``--shard`` the command then assembles the layouts
(``assemble.py``), which needs every listed video to be done or failed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import re
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avlowshot.errors import DataError, WeightsError
from avlowshot.extract.media import VIDEO_SUFFIXES, decode_job
from avlowshot.train.checkpoint import atomic_write_bytes

FEATURE_SETS = ("cls", "clipclap")
# The files each feature set loads from --weights (checksummed into extractor.json, so features made with other
# weights are never mixed into one root).
WEIGHT_FILES = {
    "cls": ("c3d.pickle", "pytorch_vggish.pth", "vggish_pca_params.npz"),
    "clipclap": ("clip", "clap"),
}


@dataclass(frozen=True)
class VideoItem:
    path: Path
    class_name: str
    video_id: str


@dataclass
class ExtractReport:
    total: int  # videos in this shard
    done: int  # extracted in this run
    skipped: int  # already extracted before
    failed: list[tuple[str, str]]  # (video id, error)
    seconds: float
    failed_log: Path

    @property
    def videos_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def list_videos(source: str | Path) -> list[VideoItem]:
    """``source`` is a folder ``<class>/<video file>`` (the UCF / ActivityNet layout) or a list file: a csv with
    columns ``path,class`` (paths relative to the list file). Sorted by (class, video id); ids must be unique."""
    source = Path(source)
    if source.is_dir():
        items = [
            VideoItem(p, p.parent.name, p.stem)
            for p in sorted(source.rglob("*"))
            if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and p.parent != source
        ]
        where = source
    elif source.is_file():
        items = _read_list(source)
        where = source
    else:
        raise DataError("video folder or list not found", path=source, fix="--videos takes a folder or a csv list")
    if not items:
        raise DataError(
            "no videos found",
            path=where,
            fix=f"put videos in <class>/<file> folders ({', '.join(VIDEO_SUFFIXES)}) or list them in a csv",
        )
    seen: dict[str, Path] = {}
    for it in items:
        if it.video_id in seen:
            raise DataError(
                f"video id '{it.video_id}' appears twice ({seen[it.video_id]} and {it.path})",
                path=where,
                key=it.video_id,
                fix="the layouts key videos by file name without extension: rename one of them",
            )
        seen[it.video_id] = it.path
    return sorted(items, key=lambda it: (it.class_name, it.video_id))


def _read_list(path: Path) -> list[VideoItem]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read the video list ({exc})", path=path) from None
    if not rows or not {"path", "class"} <= set(rows[0]):
        raise DataError("expected a csv with columns 'path' and 'class'", path=path, key="path,class")
    items = []
    for n, row in enumerate(rows, 2):
        p, c = (row.get("path") or "").strip(), (row.get("class") or "").strip()
        if not p or not c:
            raise DataError(f"line {n}: empty path or class", path=path, key=f"line {n}")
        full = Path(p) if Path(p).is_absolute() else path.parent / p
        items.append(VideoItem(full, c, full.stem))
    return items


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/N"`` (0 <= i < N) -> (i, N); None -> (0, 1)."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise DataError(f"--shard {text!r} is not i/N with 0 <= i < N", key="shard", fix="e.g. --shard 0/4 ... 3/4")
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------------------------------------------
# Extractors


def build_extractor(features: str, weights: str | Path, device: str = "cpu", compat: str = "fixed"):
    """The backbone pair of a feature set, loaded from local weight files (nothing is downloaded)."""
    weights = Path(weights)
    if not weights.is_dir():
        raise WeightsError(
            "weights folder not found",
            path=weights,
            fix=f"--weights is a folder with {', '.join(WEIGHT_FILES.get(features, ()))} (see the README)",
        )
    if features == "cls":
        from avlowshot.extract.cls_features import ClsExtractor

        return ClsExtractor.from_weights(weights, device=device, compat=compat)
    if features == "clipclap":
        from avlowshot.extract.clipclap_features import ClipClapExtractor

        return ClipClapExtractor.from_weights(weights, device=device, compat=compat)
    raise DataError(f"unknown feature set '{features}'", key="features", fix=f"use one of {', '.join(FEATURE_SETS)}")


def weights_digest(features: str, weights: Path) -> dict[str, str]:
    """sha256 of every weight file a feature set loads (a folder: of its files, in sorted order)."""
    out = {}
    for name in WEIGHT_FILES[features]:
        p = weights / name
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        h = hashlib.sha256()
        for f in files:
            if not f.is_file():
                raise WeightsError("weight file not found", path=f, fix="see the README for the files --weights holds")
            h.update(f.relative_to(weights).as_posix().encode())
            with open(f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    h.update(block)
        out[name] = h.hexdigest()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Extraction


def work_dir(out: Path, features: str) -> Path:
    return Path(out) / "extracted" / features


def feature_file(work: Path, video_id: str) -> Path:
    return work / "videos" / f"{video_id}.npz"


def claim_work_dir(work: Path, identity: dict[str, Any]) -> None:
    """Record what produces the features of ``work``; refuse to mix in features of another backbone or compat."""
    meta = work / "extractor.json"
    if meta.is_file():
        try:
            before = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"unreadable ({exc})", path=meta, fix="delete it only together with videos/") from None
        if before != identity:
            diff = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
            raise DataError(
                f"these features were extracted with other settings ({', '.join(diff)} differ)",
                path=meta,
                key=diff[0],
                fix="use the same --weights and --compat, or another --out folder",
            )
        return
    (work / "videos").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(meta, json.dumps(identity, indent=2, sort_keys=True).encode())


def save_video_features(path: Path, item: VideoItem, audio: np.ndarray, video: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, audio=audio, video=video, class_name=np.str_(item.class_name), source=np.str_(str(item.path)))
    atomic_write_bytes(path, buf.getvalue())


def load_video_features(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(audio, video, class name) of one extracted video (numeric arrays only: no pickles are read)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["audio"], z["video"], str(z["class_name"])
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(
            f"not an extracted feature file ({exc})", path=path, fix="delete it and re-run extract"
        ) from None


def _decoded(todo: list[VideoItem], kw: dict, workers: int) -> Iterator[tuple[int, Any]]:
    jobs = [(i, it.path, kw) for i, it in enumerate(todo)]
    if workers <= 0:
        yield from map(decode_job, jobs)
        return
    # decoding (PyAV, numpy) runs in worker processes while this one runs the backbones; the job lives in
    # media.py so a worker imports only PyAV and numpy, not torch
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(decode_job, jobs, chunksize=1)


def extract_videos(
    items: list[VideoItem],
    extractor,
    work: Path,
    *,
    shard: tuple[int, int] = (0, 1),
    workers: int = 0,
    on_video: Callable[[int, int], None] | None = None,
) -> ExtractReport:
    """Extract the videos of ``shard`` that have no feature file yet. A failing video is logged and skipped."""
    i, n = shard
    mine = items[i::n]
    todo = [it for it in mine if not feature_file(work, it.video_id).is_file()]
    kw = {
        "fps": extractor.video_fps,
        "audio_rate": extractor.audio_rate,
        "frame_size": extractor.frame_size,
        "frame_pick": extractor.frame_pick,
    }
    failed: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    done = 0
    for k, decoded in _decoded(todo, kw, workers):
        item = todo[k]
        if isinstance(decoded, str):
            failed.append((item.video_id, decoded))
        else:
            try:
                audio, video = extractor(decoded.frames, decoded.audio)
                for name, arr in (("audio", audio), ("video", video)):
                    if arr.ndim == 2 and len(arr) == 0:  # e.g. under 0.96 s of sound: no VGGish example
                        raise DataError(f"no {name} feature row ({decoded.duration:.2f} s)", path=item.path)
                save_video_features(feature_file(work, item.video_id), item, audio, video)
                done += 1
            except DataError as exc:
                failed.append((item.video_id, str(exc)))
            except RuntimeError as exc:  # e.g. a clip too short for a backbone; the run goes on
                failed.append((item.video_id, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))
        if on_video:
            on_video(done + len(failed), len(todo))
    log = work / f"failed-{i}of{n}.jsonl"
    lines = "".join(json.dumps({"video_id": v, "error": e}) + "\n" for v, e in failed)
    atomic_write_bytes(log, lines.encode())
    return ExtractReport(len(mine), done, len(mine) - len(todo), failed, time.perf_counter() - t0, log)


def finished(items: list[VideoItem], work: Path) -> tuple[list[VideoItem], list[VideoItem]]:
    """(extracted, not extracted) videos of the list."""
    have = [it for it in items if feature_file(work, it.video_id).is_file()]
    names = {it.video_id for it in have}
    return have, [it for it in items if it.video_id not in names]
