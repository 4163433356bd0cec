"""``avlowshot download``: fetch the authors' feature archives, unpack them into the layout's folder, check them.

The registry (``profiles/downloads.json``, shipped) lists each archive with the links the authors' READMEs give.
Those links are known to die, so every archive can have more mirrors, tried first, in this order:

1. ``--mirror BASE`` options (``BASE/<archive file name>``);
2. ``AVLOWSHOT_MIRRORS``: whitespace-separated bases, the same way;
3. the mirrors file (``AVLOWSHOT_MIRRORS_FILE``, default ``<config dir>/mirrors.yaml``)::

       mirrors: [https://my.lab/avlowshot-archives]        # bases
       archives:
         ucf-supervised-temporal.zip:                      # full URLs (and a checksum) for one archive
           urls: [https://elsewhere/ucf.zip]
           sha256: 0f3a...

4. the authors' links.

Downloads go through pooch, with a resumable downloader (a ``.part`` file continued with HTTP ``Range`` requests,
retried with back-off, and continued by the next invocation after a failure). The checksum is the registry's or the
mirrors file's sha256 when known; an archive without one has its sha256 recorded in ``<config dir>/
known_hashes.json`` on first use (after it unpacked cleanly) and verified on every later use. A checksum mismatch
moves on to the next mirror; an archive that is corrupt or fails ``check-data`` is never unpacked into place:
everything is unpacked into a staging folder beside the target, checked there, and only then renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

import platformdirs

from avlowshot.data.layouts import DATASETS, LAYOUT_SPECS, check_dataset, get_layout
from avlowshot.errors import DataError

log = logging.getLogger("avlowshot.download")

# --features -> the layout its archive is read with (--layout picks another layout of the same feature set)
FEATURE_LAYOUTS = {"cls": "tcaf-cls", "main": "tcaf-main", "clipclap": "clipclap", "avdiff": "avdiff"}
SKIP_DIRS = ("_features_processed", "_features_preprocessed", "__MACOSX")  # the references' caches, OS junk
CHUNK = 1 << 16  # small: what arrived before a dropped connection is kept (a read that fails loses its chunk)


@dataclass
class Archive:
    file: str
    urls: list[str]
    sha256: str | None
    datasets: list[str]
    layouts: list[str]
    root: str  # folder under --to holding the dataset folders
    source: str = ""
    mirrors: list[str] = field(default_factory=list)  # user mirrors, tried first


def config_dir() -> Path:
    env = os.environ.get("AVLOWSHOT_CONFIG_DIR")
    return Path(env) if env else Path(platformdirs.user_config_dir("avlowshot"))


def registry() -> list[Archive]:
    text = resources.files("avlowshot.data").joinpath("profiles/downloads.json").read_text(encoding="utf-8")
    return [Archive(**a) for a in json.loads(text)["archives"]]


def resolve_layout(features: str, layout: str | None) -> str:
    if features not in FEATURE_LAYOUTS:
        raise DataError(
            f"unknown feature set '{features}'", key="features", fix=f"use one of {', '.join(FEATURE_LAYOUTS)}"
        )
    if layout is None:
        return FEATURE_LAYOUTS[features]
    spec = get_layout(layout)
    want = get_layout(FEATURE_LAYOUTS[features])
    if (spec.feature_set, spec.task) != (want.feature_set, want.task):
        same = [n for n, s in LAYOUT_SPECS.items() if (s.feature_set, s.task) == (want.feature_set, want.task)]
        raise DataError(
            f"--layout {layout} does not hold {features} features", key="layout", fix=f"use one of {', '.join(same)}"
        )
    return layout


def find_archive(dataset: str, layout: str) -> Archive:
    for a in registry():
        if dataset in a.datasets and layout in a.layouts:
            return a
    have = sorted({lay for a in registry() if dataset in a.datasets for lay in a.layouts})
    raise DataError(
        f"the authors publish no {layout} archive of {dataset}",
        key="layout",
        fix=f"layouts with an archive for {dataset}: {', '.join(have)}",
    )


def _mirrors_file() -> Path:
    env = os.environ.get("AVLOWSHOT_MIRRORS_FILE")
    return Path(env) if env else config_dir() / "mirrors.yaml"


def with_mirrors(archive: Archive, cli_mirrors: list[str] = ()) -> Archive:
    """The archive with the user's mirrors (and checksum) from the options, the environment and the mirrors file."""
    from avlowshot.train.config import yaml_load

    bases = list(cli_mirrors) + os.environ.get("AVLOWSHOT_MIRRORS", "").split()
    urls: list[str] = []
    sha = archive.sha256
    path = _mirrors_file()
    if path.is_file():
        try:
            data = yaml_load(path.read_text(encoding="utf-8")) or {}
        except Exception as exc:  # yaml errors of every kind: the file is the user's
            raise DataError(f"not a readable YAML file ({exc})", path=path, fix="see docs/data.md") from None
        if not isinstance(data, dict):
            raise DataError("expected a mapping with 'mirrors' and/or 'archives'", path=path)
        mine = (data.get("archives") or {}).get(archive.file) or {}
        if not isinstance(mine, dict):
            raise DataError("expected {'urls': [...], 'sha256': ...}", path=path, key=f"archives.{archive.file}")
        urls += list(mine.get("urls") or [])
        sha = mine.get("sha256") or sha
        bases += list(data.get("mirrors") or [])
    urls = [f"{b.rstrip('/')}/{archive.file}" for b in bases] + urls
    return Archive(**{**archive.__dict__, "sha256": sha, "mirrors": urls})


# ----------------------------------------------------------------------------------------------------------------
# Checksums recorded on first use


def _hash_book() -> Path:
    return config_dir() / "known_hashes.json"


def recorded_hash(file: str) -> str | None:
    book = _hash_book()
    if not book.is_file():
        return None
    try:
        return json.loads(book.read_text(encoding="utf-8")).get(file)
    except (OSError, json.JSONDecodeError):
        fix = "delete it (checksums are recorded again)"
        raise DataError("unreadable checksum record", path=book, fix=fix) from None


def record_hash(file: str, sha256: str) -> None:
    from avlowshot.train.checkpoint import atomic_write_json

    book = _hash_book()
    data = json.loads(book.read_text(encoding="utf-8")) if book.is_file() else {}
    data[file] = sha256
    book.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(book, data)


# ----------------------------------------------------------------------------------------------------------------
# Download


class ResumableDownloader:
    """A pooch downloader that keeps what it got in ``part`` and continues it with a ``Range`` request, on the
    next retry and on the next invocation."""

    def __init__(self, part: Path, retries: int = 3, timeout: float = 60.0, on_bytes: Callable | None = None):
        self.part, self.retries, self.timeout, self.on_bytes = part, retries, timeout, on_bytes
        self.requests: list[dict] = []  # (for tests and logs) each request's range start and status

    def __call__(self, url: str, output_file, pooch_obj=None, check_only: bool = False):
        import requests

        if check_only:
            try:
                return requests.head(url, allow_redirects=True, timeout=self.timeout).ok
            except requests.RequestException:
                return False
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(30.0, 0.5 * 2**attempt))
            try:
                if self._fetch(url):
                    break
            except (requests.RequestException, OSError) as exc:
                last = exc
                have = self.part.stat().st_size if self.part.exists() else 0
                log.warning("%s: %s (have %d bytes, attempt %d/%d)", url, exc, have, attempt + 1, self.retries + 1)
        else:
            raise OSError(f"{url}: download failed after {self.retries + 1} attempts ({last})")
        shutil.move(str(self.part), str(output_file))

    def _fetch(self, url: str) -> bool:
        import requests

        have = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout, allow_redirects=True) as r:
            self.requests.append({"start": have, "status": r.status_code})
            if r.status_code == 416 and have:  # the range starts at the end: the part file is complete
                return True
            r.raise_for_status()
            if r.status_code != 206:
                have = 0  # the server ignores Range: start over
            length = r.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            self.part.parent.mkdir(parents=True, exist_ok=True)
            with open(self.part, "ab" if have else "wb") as fh:
                for chunk in r.iter_content(CHUNK):
                    fh.write(chunk)
                    if self.on_bytes:
                        self.on_bytes(fh.tell(), total)
        if total is not None and self.part.stat().st_size < total:
            raise OSError(f"connection closed after {self.part.stat().st_size} of {total} bytes")
        return True


def fetch(archive: Archive, folder: Path, *, mirrors_only: bool = False, retries: int = 3, on_bytes=None) -> Path:
    """The archive file in ``folder``, downloaded (or continued) from the first mirror that gives it with the right
    checksum. Returns its path; its checksum is verified when known."""
    import pooch

    pooch.get_logger().setLevel(logging.WARNING)
    urls = archive.mirrors + ([] if mirrors_only else archive.urls)
    if not urls:
        raise DataError(
            f"no URL to fetch {archive.file} from",
            key="mirror",
            fix="pass --mirror BASE (without --mirrors-only the authors' links are tried too)",
        )
    sha = archive.sha256 or recorded_hash(archive.file)
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        downloader = ResumableDownloader(folder / f"{archive.file}.part", retries=retries, on_bytes=on_bytes)
        try:
            path = pooch.retrieve(
                url,
                known_hash=f"sha256:{sha}" if sha else None,
                fname=archive.file,
                path=folder,
                downloader=downloader,
                progressbar=False,
            )
            return Path(path)
        except ValueError as exc:  # pooch: checksum mismatch (the corrupt download is deleted)
            errors.append(f"{url}: {str(exc).splitlines()[0]}")
            log.warning("%s: checksum mismatch, trying the next mirror", url)
        except OSError as exc:
            errors.append(f"{url}: {exc}")
    part = folder / f"{archive.file}.part"
    kept = f"; {part.stat().st_size} bytes kept in {part}, the same command continues them" if part.exists() else ""
    raise DataError(
        f"could not fetch {archive.file}{kept}:\n    " + "\n    ".join(errors),
        key="download",
        fix="run the command again, or add a mirror (--mirror BASE, AVLOWSHOT_MIRRORS or the mirrors file, "
        "docs/data.md)",
    )


# ----------------------------------------------------------------------------------------------------------------
# Unpack


def _members(archive_path: Path) -> list[str]:
    try:
        if zipfile.is_zipfile(archive_path):
            with zipfile.ZipFile(archive_path) as zf:
                return zf.namelist()
        with tarfile.open(archive_path) as tf:
            return [m.name for m in tf.getmembers()]
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        with open(archive_path, "rb") as fh:
            html = fh.read(512).lstrip().lower().startswith((b"<!doctype html", b"<html"))
        what = "an HTML page (a dead link, or a sign-in / confirmation page)" if html else f"no zip or tar ({exc})"
        raise DataError(
            f"the server sent {what}, not the archive",
            path=archive_path,
            key="archive",
            fix=f"fetch the archive in a browser, put it at {archive_path} and run the same command again",
        ) from None


def dataset_prefix(names: list[str], dataset: str, where: Path) -> str:
    """The folder inside the archive that is ``dataset``'s root: the one holding ``class-split/``, named after the
    dataset when the archive holds several."""
    roots = set()
    for n in names:
        parts = PurePosixPath(n).parts
        for i, p in enumerate(parts):
            if p in ("class-split", "class_split") and not any(s in parts[:i] for s in SKIP_DIRS):
                roots.add("/".join(parts[:i]))
                break
    named = [r for r in roots if PurePosixPath(r).name.lower() == dataset.lower()]
    if len(named) == 1:
        return named[0]
    if len(roots) == 1 and not named:
        return roots.pop()
    raise DataError(
        f"cannot tell which folder of the archive is the {dataset} root (folders with a class-split/: "
        f"{', '.join(sorted(roots)) or 'none'})",
        path=where,
        fix="unpack it by hand and pass that folder as --root-dir",
    )


def _safe_target(base: Path, rel: str) -> Path | None:
    parts = [p for p in PurePosixPath(rel).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or PurePosixPath(rel).is_absolute():
        return None
    if any(p in SKIP_DIRS for p in parts):
        return None
    if parts[0] == "class_split":  # the AVCA README's spelling; every reader reads class-split/
        parts[0] = "class-split"
    return base.joinpath(*parts)


def unpack_dataset(archive_path: Path, dataset: str, dest: Path) -> None:
    """Extract the ``dataset`` folder of the archive into ``dest`` (which must not exist)."""
    names = _members(archive_path)
    prefix = dataset_prefix(names, dataset, archive_path)
    cut = len(PurePosixPath(prefix).parts)
    dest.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive_path):
            with zipfile.ZipFile(archive_path) as zf:
                for info in zf.infolist():
                    parts = PurePosixPath(info.filename).parts
                    if info.is_dir() or tuple(parts[:cut]) != tuple(PurePosixPath(prefix).parts):
                        continue
                    target = _safe_target(dest, "/".join(parts[cut:]))
                    if target is None:
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as out:  # CRC-checked while read
                        shutil.copyfileobj(src, out, CHUNK)
        else:
            with tarfile.open(archive_path) as tf:
                for m in tf:
                    parts = PurePosixPath(m.name).parts
                    if not m.isfile() or tuple(parts[:cut]) != tuple(PurePosixPath(prefix).parts):
                        continue
                    target = _safe_target(dest, "/".join(parts[cut:]))
                    if target is None:
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(m)
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        zlib.error,
        EOFError,
        OSError,
        ValueError,
        NotImplementedError,
    ) as exc:
        raise DataError(
            f"the archive is corrupt ({type(exc).__name__}: {exc})", path=archive_path, key="archive"
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# The command


@dataclass
class Installed:
    root: Path
    layout: str
    dataset: str
    archive: Path
    sha256: str
    recorded: bool  # the checksum was recorded now (first use)
    checked: list  # check reports
    skipped: bool = False  # the features were there already


def check_staged(layout: str, root: Path, dataset: str) -> list:
    from avlowshot.data.check import check_root

    spec = get_layout(layout)
    if spec.task != "gfsl":
        return [check_root(layout, root, dataset)]
    shots = sorted(int(p.name.split("-")[0]) for p in (root / "features").glob("*-shot") if p.is_dir())
    if not shots:
        raise DataError("no features/<k>-shot folder in the archive", path=root / "features", key="avdiff")
    return [check_root(layout, root, dataset, k) for k in shots]


def download(
    dataset: str,
    features: str,
    to: str | Path,
    *,
    layout: str | None = None,
    mirrors: list[str] = (),
    mirrors_only: bool = False,
    retries: int = 3,
    on_bytes=None,
) -> Installed:
    dataset = check_dataset(dataset, known_only=True)
    if dataset not in DATASETS:  # pragma: no cover - check_dataset(known_only) refuses it
        raise DataError(f"unknown dataset '{dataset}'", key="dataset")
    layout = resolve_layout(features, layout)
    spec = get_layout(layout)
    archive = with_mirrors(find_archive(dataset, layout), list(mirrors))
    to = Path(to).resolve()
    root = to / archive.root / dataset
    feature_dir = root / "features" / spec.feature_dir.split("/")[0]
    if spec.task != "gfsl" and feature_dir.is_dir():
        log.info("%s is there already: checking it", feature_dir)
        return Installed(root, layout, dataset, Path(), "", False, check_staged(layout, root, dataset), skipped=True)
    path = fetch(archive, to / ".downloads", mirrors_only=mirrors_only, retries=retries, on_bytes=on_bytes)
    import pooch

    sha = pooch.file_hash(str(path))
    known = archive.sha256 or recorded_hash(archive.file)
    staging = to / archive.root / f".staging-{dataset}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            unpack_dataset(path, dataset, staging)
        except DataError:
            if not known:  # never recorded: a corrupt first download is removed, the next run fetches it again
                path.unlink(missing_ok=True)
            raise
        reports = check_staged(layout, staging, dataset)
        recorded = False
        if not known:
            record_hash(archive.file, sha)
            recorded = True
        _move_into_place(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Installed(root, layout, dataset, path, sha, recorded, reports)


def _move_into_place(staging: Path, root: Path) -> None:
    """A new root: one rename. An existing root (another feature set of the same dataset): each new features/
    folder is renamed into it, and class-split files it lacks are added (existing ones are kept)."""
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, root)
        return
    for src in sorted((staging / "features").iterdir()):
        dst = root / "features" / src.name
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    for src in sorted(p for p in (staging / "class-split").rglob("*") if p.is_file()):
        dst = root / src.relative_to(staging)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        elif dst.read_bytes() != src.read_bytes():
            log.warning("%s differs from the archive's copy; the existing file is kept", dst)
