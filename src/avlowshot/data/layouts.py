"""The authors' on-disk feature layouts: where each file lives, its format, dims and dtypes.

One ``LayoutSpec`` per layout; one reader and one writer per file format (h5 for AVCA, pickled dicts for the
others). Paths follow specs/*.md section 1 exactly, so ``--root-dir`` can point at an unpacked download.

=============  ================================================  =====================  ====================
layout         features folder                                   audio                  video
=============  ================================================  =====================  ====================
avca-cls       features/cls_features/{a,v}/<split>/<C>.h5         [N,128] avg VGGish     [N,4096] avg C3D
avca-main      features/main_features/...h5                       [N,512] avg SeLaVi     [N,512] avg SeLaVi
tcaf-cls       features/cls_features_non_averaged/...pkl          [T,128] uint8 0.96 s   [T,4096] f32 0.64 s
tcaf-main      features/main_features_non_averaged/...pkl         [T,512] f32 1 s        [T,512] f32 1 s
clipclap       features/cls_features_non_averaged/...pkl          (1024,) f32 CLAP       (512,) f16 CLIP
avdiff         features/<k>-shot/...pkl (11 split folders)        [T,128] uint8 0.96 s   [T,4096] f32 0.64 s
=============  ================================================  =====================  ====================
"""

from __future__ import annotations

import csv
import json
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from avlowshot.data.safe_pickle import load_pickle
from avlowshot.errors import DataError

DATASETS = ("UCF", "ActivityNet", "VGGSound")
LAYOUTS = ("avca-cls", "avca-main", "tcaf-cls", "tcaf-main", "clipclap", "avdiff")

GZSL_CLASS_LISTS = (
    "stage_1_train",
    "stage_1_val_seen",
    "stage_1_val_unseen",
    "stage_2_train",
    "stage_2_test_seen",
    "stage_2_test_unseen",
)
GZSL_FOLDERS = ("stage_1_train", "stage_1_val_seen", "stage_1_val_unseen", "stage_2_test_seen", "stage_2_test_unseen")
GFSL_CLASS_LISTS = (
    "stage_1_base_train",
    "stage_1_novel_train",
    "stage_1_val_seen",
    "stage_1_val_unseen",
    "stage_2_base_train",
    "stage_2_novel_train",
    "stage_2_test_seen",
    "stage_2_test_unseen",
)
# Class lists that must not share a class: a class seen in training cannot be unseen at validation or test.
GZSL_DISJOINT = (
    ("stage_1_train", "stage_1_val_unseen"),
    ("stage_1_val_seen", "stage_1_val_unseen"),
    ("stage_2_train", "stage_2_test_unseen"),
    ("stage_2_test_seen", "stage_2_test_unseen"),
)
GFSL_DISJOINT = (
    ("stage_1_base_train", "stage_1_novel_train"),
    ("stage_1_base_train", "stage_1_val_unseen"),
    ("stage_1_val_seen", "stage_1_val_unseen"),
    ("stage_2_base_train", "stage_2_novel_train"),
    ("stage_2_base_train", "stage_2_test_unseen"),
    ("stage_2_test_seen", "stage_2_test_unseen"),
)
GFSL_FOLDERS = (
    "stage_1_train_base",
    "stage_1_train_novel",
    "stage_1_val_seen",
    "stage_1_val_novel",
    "stage_2_train_novel",
    "stage_2_train_novel_1",
    "stage_2_train_novel_2",
    "stage_2_test_seen",
    "stage_2_test_novel",
    "stage_2_test_novel_1",
    "stage_2_test_novel_2",
)


class _Tags(dict):
    """Dataset -> tag in file names; a dataset of the user's own (from ``extract``) is tagged by its lower-cased
    name, and its class names are case-sensitive."""

    def __init__(self, known: dict, default):
        super().__init__(known)
        self.default = default

    def __missing__(self, dataset: str):
        return self.default(dataset)


# Dataset tag in file names: the w2v files say "activity", ClipClap's CLIP/CLAP files say "activitynet".
W2V_TAG = _Tags({"UCF": "ucf", "ActivityNet": "activity", "VGGSound": "vggsound"}, str.lower)
CSV_TAG = _Tags({"UCF": "ucf", "ActivityNet": "activitynet", "VGGSound": "vggsound"}, str.lower)
CASE_INSENSITIVE = _Tags({"UCF": True, "ActivityNet": True, "VGGSound": False}, lambda _: False)
DATASET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
# Written by `avlowshot extract` / `embed-classes`: a root of one's own declares its feature and text dims.
EXTRACTOR_FILE = "extractor.json"
ENCODER_SUFFIX = ".encoder.json"


@dataclass(frozen=True)
class FeatureSpec:
    dim: int
    dtype: str  # dtype on disk
    step_seconds: float  # seconds per row of a temporal feature


@dataclass(frozen=True)
class TextFile:
    pattern: str  # file name under features/<dir>/text/, "{tag}" = dataset tag
    dim: int
    tag: dict  # dataset -> tag


@dataclass(frozen=True)
class LayoutSpec:
    name: str
    family: str  # avca | tcaf | clipclap | avdiff
    feature_set: str  # cls | main | clipclap
    feature_dir: str  # folder under features/ ("{k}" = shots for avdiff)
    split_family: str  # folder under class-split/ ("{k}" = shots for avdiff)
    file_format: str  # h5 | pkl
    temporal: bool
    audio: FeatureSpec
    video: FeatureSpec
    text: tuple[TextFile, ...]
    task: str = "gzsl"

    def features_root(self, root: Path, shots: int | None = None) -> Path:
        return root / "features" / self.feature_dir.format(k=f"{shots}-shot")

    def split_root(self, root: Path, shots: int | None = None) -> Path:
        return root / "class-split" / self.split_family.format(k=f"{shots}-shot")

    def split_family_name(self, shots: int | None = None) -> str:
        return self.split_family.format(k=f"{shots}-shot")

    @property
    def folders(self) -> tuple[str, ...]:
        return GFSL_FOLDERS if self.task == "gfsl" else GZSL_FOLDERS

    @property
    def class_lists(self) -> tuple[str, ...]:
        return GFSL_CLASS_LISTS if self.task == "gfsl" else GZSL_CLASS_LISTS

    @property
    def disjoint_lists(self) -> tuple[tuple[str, str], ...]:
        return GFSL_DISJOINT if self.task == "gfsl" else GZSL_DISJOINT

    @property
    def text_dim(self) -> int:
        return sum(t.dim for t in self.text)

    def name_map_file(self, root: Path, dataset: str) -> tuple[Path, str]:
        """The csv mapping ``original`` class names to embedding keys, and the key column."""
        if self.family == "clipclap" and dataset == "UCF":
            return root / "class-split" / "ucf_clip_class_names.csv", "clip_class_name"
        return root / "class-split" / f"{CSV_TAG[dataset]}_w2v_class_names.csv", "manual"

    def text_files(self, root: Path, dataset: str, shots: int | None = None) -> list[Path]:
        base = self.features_root(root, shots) / "text"
        return [base / t.pattern.format(tag=t.tag[dataset]) for t in self.text]

    def class_file(self, root: Path, modality: str, folder: str, class_name: str, shots: int | None = None) -> Path:
        return self.features_root(root, shots) / modality / folder / f"{class_name}.{self.file_format}"


W2V = TextFile("word_embeddings_{tag}_normed.npy", 300, W2V_TAG)
VGGISH_T = FeatureSpec(128, "uint8", 0.96)
C3D_T = FeatureSpec(4096, "float32", 0.64)
SELAVI_T = FeatureSpec(512, "float32", 1.0)

LAYOUT_SPECS: dict[str, LayoutSpec] = {
    "avca-cls": LayoutSpec(
        "avca-cls", "avca", "cls", "cls_features", "cls_split", "h5", False,
        FeatureSpec(128, "float32", 0.96), FeatureSpec(4096, "float32", 0.64), (W2V,),
    ),
    "avca-main": LayoutSpec(
        "avca-main", "avca", "main", "main_features", "main_split", "h5", False,
        FeatureSpec(512, "float32", 1.0), FeatureSpec(512, "float32", 1.0), (W2V,),
    ),
    "tcaf-cls": LayoutSpec(
        "tcaf-cls", "tcaf", "cls", "cls_features_non_averaged", "cls_split", "pkl", True, VGGISH_T, C3D_T, (W2V,)
    ),
    "tcaf-main": LayoutSpec(
        "tcaf-main", "tcaf", "main", "main_features_non_averaged", "main_split", "pkl", True, SELAVI_T, SELAVI_T, (W2V,)
    ),
    "clipclap": LayoutSpec(
        "clipclap", "clipclap", "clipclap", "cls_features_non_averaged", "cls_split", "pkl", False,
        FeatureSpec(1024, "float32", 10.0), FeatureSpec(512, "float16", 10.0),
        (TextFile("word_embeddings_{tag}_normed.npy", 512, CSV_TAG),
         TextFile("wavcaps_word_embeddings_{tag}_normed.npy", 1024, CSV_TAG)),
    ),
    "avdiff": LayoutSpec(
        "avdiff", "avdiff", "cls", "{k}", "{k}", "pkl", True, VGGISH_T, C3D_T, (W2V,), task="gfsl"
    ),
}  # fmt: skip


def get_layout(name: str) -> LayoutSpec:
    try:
        return LAYOUT_SPECS[name]
    except KeyError:
        raise DataError(f"unknown layout '{name}'", key="layout", fix=f"use one of {', '.join(LAYOUTS)}") from None


def check_dataset(name: str, *, known_only: bool = False) -> str:
    """One of the three benchmarks, or (unless ``known_only``) the name of a dataset of one's own."""
    if name in DATASETS:
        return name
    like = [d for d in DATASETS if d.lower() == name.lower()]
    if like:  # `ucf` would silently become a dataset of one's own with UCF's file names but other class rules
        raise DataError(
            f"dataset '{name}' differs from the benchmark {like[0]} only in case",
            key="dataset",
            fix=f"use --dataset {like[0]} (benchmark names are case-sensitive)",
        )
    if not known_only and DATASET_NAME.match(name):
        return name
    fix = f"use one of {', '.join(DATASETS)}"
    if not known_only:
        fix += " or a name of your own (letters, digits, _ and -)"
    raise DataError(f"unknown dataset '{name}'", key="dataset", fix=fix)


def infer_shots(spec: LayoutSpec, root: Path, shots: int | None) -> int | None:
    """``shots`` as given; for the avdiff layout without ``--shots``, the one k of a root holding a single
    ``features/<k>-shot`` folder (a root with several needs ``--shots``)."""
    if spec.task != "gfsl" or shots is not None:
        return shots
    found = sorted(
        int(m.group(1))
        for p in (Path(root) / "features").glob("*-shot")
        if p.is_dir() and (m := re.fullmatch(r"(\d+)-shot", p.name))
    )
    if len(found) == 1:
        return found[0]
    have = f"this root holds {', '.join(f'{k}-shot' for k in found)}" if found else "no features/<k>-shot folder found"
    raise DataError(
        f"the avdiff layout needs --shots ({have})",
        path=Path(root) / "features",
        key="shots",
        fix=f"pass --shots, one of {found or [1, 5, 10, 20]}",
    )


def declared_text_dim(layout: str, root: str | Path, dataset: str, shots: int | None = None) -> int | None:
    """The class-text dim a root declares (``<text>.encoder.json`` sidecars), or None when it declares none or
    cannot be read yet (the readers report that with the file and key later)."""
    try:
        spec = get_layout(layout)
        root = Path(root)
        shots = infer_shots(spec, root, shots)
        files = spec.text_files(root, dataset, shots if spec.task == "gfsl" else None)
        if not any(f.with_name(f.name + ENCODER_SUFFIX).is_file() for f in files):
            return None
        return declared_spec(spec, root, dataset, shots if spec.task == "gfsl" else None).text_dim
    except DataError:
        return None


def declared_spec(spec: LayoutSpec, root: Path, dataset: str, shots: int | None = None) -> LayoutSpec:
    """The layout as this root stores it. The authors' downloads have the published dims; a root written by
    ``avlowshot extract`` (other backbones, e.g. a 512-d CLAP) declares its feature dims in ``extractor.json``, and
    ``embed-classes`` declares each text file's dim in ``<file>.encoder.json``. Anything else must match exactly."""
    meta_file = spec.features_root(root, shots) / EXTRACTOR_FILE
    if meta_file.is_file():
        meta = _read_json(meta_file)
        for m in ("audio", "video"):
            try:
                dims = {m: replace(getattr(spec, m), dim=int(meta[m]["dim"]), dtype=str(meta[m]["dtype"]))}
            except (KeyError, TypeError, ValueError):
                raise DataError(
                    f"expected {{'{m}': {{'dim': int, 'dtype': str}}}}",
                    path=meta_file,
                    key=m,
                    fix="re-run avlowshot extract, which writes this file",
                ) from None
            spec = replace(spec, **dims)
    texts = []
    for t, path in zip(spec.text, spec.text_files(root, dataset, shots), strict=True):
        sidecar = path.with_name(path.name + ENCODER_SUFFIX)
        if sidecar.is_file():
            meta = _read_json(sidecar)
            if not isinstance(meta.get("dim"), int):
                raise DataError("expected an integer 'dim'", path=sidecar, key="dim", fix="re-run embed-classes")
            t = replace(t, dim=meta["dim"])
        texts.append(t)
    return replace(spec, text=tuple(texts))


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fix = "re-run the command that wrote it"
        raise DataError(f"not a readable JSON file ({exc})", path=path, fix=fix) from None
    if not isinstance(obj, dict):
        raise DataError("expected a JSON object", path=path)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Class files: read


@dataclass
class ClassFile:
    """The videos of one class in one split folder of one modality, as stored."""

    features: list[np.ndarray] | np.ndarray  # per-video arrays (pkl) or one [N, D] array (h5)
    video_ids: list[str]


def _decode_ids(values, path: Path, key: str) -> list[str]:
    """Video ids as text: each a str or UTF-8 bytes (anything else is refused, not ``str()``-ed into an id)."""
    if isinstance(values, str | bytes) or not isinstance(values, list | tuple | np.ndarray):
        raise DataError(
            f"'{key}' is a {type(values).__name__}, expected a list of video ids (strings or bytes)",
            path=path,
            key=key,
            fix="re-extract this class file",
        )
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bytes | np.bytes_):
            try:
                out.append(bytes(value).decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(
                    f"video id {bytes(value)!r} is not UTF-8 text",
                    path=path,
                    key=f"{key}[{i}]",
                    fix="video ids must be UTF-8; rename the video and re-extract this class file",
                ) from None
        elif isinstance(value, str):
            out.append(str(value))
        else:
            raise DataError(
                f"video id is a {type(value).__name__} ({value!r}), expected a string or bytes",
                path=path,
                key=f"{key}[{i}]",
                fix="re-extract this class file",
            )
    return out


# Feature files never declare more than this many bytes per byte stored (compressed float features reach ~10x); an
# uncompressed dataset must store all of its declared bytes. Beyond that the header lies (truncated or never written).
H5_MAX_COMPRESSION = 1000


def _check_h5_extent(dset, path: Path) -> None:
    """Refuse a dataset whose declared size the file cannot hold, from the header, before allocating anything."""
    if dset.dtype.kind not in "fiu":
        raise DataError(f"'data' has dtype {dset.dtype}, expected numbers", path=path, key="data")
    if len(dset.shape) != 2:
        raise DataError(f"'data' has shape {dset.shape}, expected [n_videos, dim]", path=path, key="data")
    declared = int(np.prod(dset.shape, dtype=object)) * dset.dtype.itemsize
    stored = int(dset.id.get_storage_size())
    filtered = dset.id.get_create_plist().get_nfilters() > 0
    room = stored * H5_MAX_COMPRESSION if filtered else min(stored, path.stat().st_size)
    if declared > room:
        raise DataError(
            f"'data' declares shape {dset.shape} {dset.dtype} ({_size(declared)}) but the file stores only "
            f"{_size(stored)} of it; not read",
            path=path,
            key="data",
            fix="the file is truncated or was never fully written; re-download or re-extract it",
        )


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def read_class_file(spec: LayoutSpec, path: Path) -> ClassFile:
    if spec.file_format == "h5":
        return _read_h5(path)
    return _read_pkl(path)


def _read_h5(path: Path) -> ClassFile:
    try:
        with h5py.File(path, "r") as fh:
            for key in ("data", "video_urls"):
                if key not in fh:
                    raise DataError(
                        f"missing dataset '{key}' (found: {sorted(fh.keys())})",
                        path=path,
                        key=key,
                        fix="AVCA feature files hold 'data' [N, D] and 'video_urls' [N]",
                    )
            _check_h5_extent(fh["data"], path)
            data = fh["data"][()]
            urls = fh["video_urls"][()]
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError, MemoryError) as exc:
        raise DataError(f"truncated or corrupt HDF5 file ({exc})", path=path, fix="re-download this file") from None
    if getattr(urls, "ndim", 1) != 1:
        raise DataError(f"'video_urls' has shape {urls.shape}, expected [n_videos]", path=path, key="video_urls")
    urls = _decode_ids(urls, path, "video_urls")
    if len(urls) != len(data):
        raise DataError(f"{len(data)} rows of 'data' but {len(urls)} 'video_urls'", path=path, key="video_urls")
    return ClassFile(data, urls)


def _read_pkl(path: Path) -> ClassFile:
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"expected a dict with 'features' and 'video_names', found {type(obj).__name__}", path=path)
    for key in ("features", "video_names"):
        if key not in obj:
            raise DataError(
                f"missing key '{key}' (found: {sorted(map(str, obj))})",
                path=path,
                key=key,
                fix="feature pickles hold {'features': [...], 'video_names': [...], 'fps': [...]}",
            )
    feats = obj["features"]
    if not isinstance(feats, list | tuple | np.ndarray) or (isinstance(feats, np.ndarray) and feats.ndim == 0):
        raise DataError(
            f"'features' is a {type(feats).__name__}, expected a list of numpy arrays (one per video)",
            path=path,
            key="features",
            fix="re-extract this class file",
        )
    names = _decode_ids(obj["video_names"], path, "video_names")
    if len(feats) != len(names):
        raise DataError(f"{len(feats)} 'features' but {len(names)} 'video_names'", path=path, key="video_names")
    for i, f in enumerate(feats):
        if not isinstance(f, np.ndarray):
            raise DataError(
                f"features[{i}] is a {type(f).__name__}, not a numpy array", path=path, key=f"features[{i}]"
            )
    return ClassFile(list(feats), names)


# ----------------------------------------------------------------------------------------------------------------
# Class files: write (synthetic benchmarks, feature extraction)


def write_class_file(
    spec: LayoutSpec, path: Path, features: list[np.ndarray] | np.ndarray, video_ids: list[str]
) -> None:
    """Write one class file in the authors' format, atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if spec.file_format == "h5":
        data = np.asarray(features)
        with h5py.File(tmp, "w", track_order=False) as fh:
            fh.create_dataset("data", data=data, track_times=False)
            fh.create_dataset(
                "video_urls",
                data=np.array([v.encode() for v in video_ids], dtype=h5py.string_dtype("ascii")),
                track_times=False,
            )
    else:
        obj = {
            "features": list(features),
            "video_names": [np.bytes_(v.encode()) for v in video_ids],
            "fps": [25] * len(video_ids),
        }
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=4)
    tmp.replace(path)


def write_lines(path: Path, lines: list[str]) -> None:
    """A class list: one name per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """A class-name map (``original,manual[,...]``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
