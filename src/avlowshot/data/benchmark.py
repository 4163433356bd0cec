"""Open a dataset root in one of the authors' layouts: class table, class lists, packed feature store, protocol."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avlowshot.data import cache as cache_mod
from avlowshot.data.classes import ClassTable, build_class_table, read_class_list, read_name_map
from avlowshot.data.layouts import (
    CASE_INSENSITIVE,
    ClassFile,
    LayoutSpec,
    check_dataset,
    declared_spec,
    get_layout,
    infer_shots,
    read_class_file,
)
from avlowshot.data.safe_pickle import load_npy_dict
from avlowshot.data.splits import SHOT_CHOICES, ClassLists, Protocol, avdiff_protocol, derive_gfsl, gzsl_protocol
from avlowshot.data.store import FeatureStore
from avlowshot.errors import DataError, disk_full, is_disk_full


@dataclass
class Benchmark:
    spec: LayoutSpec
    dataset: str
    root: Path
    shots: int | None  # avdiff layout: the shot folder read
    store: FeatureStore
    class_lists: dict[str, np.ndarray]  # class ids of each class-split txt

    @property
    def layout(self) -> str:
        return self.spec.name

    @property
    def feature_set(self) -> str:
        return self.spec.feature_set

    @property
    def split_family(self) -> str:
        return self.spec.split_family_name(self.shots)

    @property
    def classes(self) -> ClassTable:
        return self.store.classes

    def protocol(self, shots: int | None = None, seed: int = 0) -> Protocol:
        """GZSL for the GZSL layouts; GFSL for avdiff. ``shots`` on a GZSL layout derives a GFSL benchmark."""
        if self.spec.task == "gfsl":
            if shots not in (None, self.shots):
                raise DataError(
                    f"this avdiff root was opened with {self.shots} shots, not {shots}",
                    key="shots",
                    fix=f"open it with --shots {shots}",
                )
            return avdiff_protocol(self.store, self.class_lists, self.shots)
        gzsl = gzsl_protocol(self.store, self.class_lists)
        return gzsl if shots is None else derive_gfsl(self.store, gzsl, shots, seed)


# ----------------------------------------------------------------------------------------------------------------


def read_class_table(spec: LayoutSpec, root: Path, dataset: str, shots: int | None = None) -> ClassTable:
    all_class = root / "class-split" / "all_class.txt"
    map_file, key_col = spec.name_map_file(root, dataset)
    name_map = read_name_map(map_file, key_col)
    files = spec.text_files(root, dataset, shots)
    dicts = [load_npy_dict(f) for f in files]
    text = dicts[0]
    if len(dicts) > 1:  # ClipClap: CLIP (512) ++ CLAP (1024) per class name
        for f, d in zip(files[1:], dicts[1:], strict=True):
            missing = sorted(set(text) - set(d))
            if missing:
                raise DataError(
                    f"no vector for '{missing[0]}'",
                    path=f,
                    key=missing[0],
                    fix="CLIP and CLAP text files must list the same classes",
                )
        text = {k: np.concatenate([np.asarray(d[k], dtype=np.float32) for d in dicts]) for k in text}
    return build_class_table(
        all_class,
        name_map,
        text,
        case_insensitive=CASE_INSENSITIVE[dataset],
        text_file=files[0],
        expected_dim=spec.text_dim,
    )


def read_class_lists(
    spec: LayoutSpec, root: Path, classes: ClassTable, shots: int | None = None
) -> dict[str, np.ndarray]:
    base = spec.split_root(root, shots)
    if not base.is_dir():
        raise DataError(
            "class-split folder not found",
            path=base,
            fix=f"point --root-dir at the dataset folder holding class-split/{spec.split_family_name(shots)}/",
        )
    files = {name: base / f"{name}.txt" for name in spec.class_lists}
    lists = {name: classes.ids(read_class_list(f), where=f) for name, f in files.items()}
    for a, b in spec.disjoint_lists:
        both = np.intersect1d(lists[a], lists[b])
        if len(both):
            name = classes.names[int(both[0])]
            raise DataError(
                f"class '{name}' is listed in both {a}.txt and {b}.txt, which must not share a class "
                f"({len(both)} shared: {', '.join(classes.names[int(c)] for c in both[:5])})",
                path=files[b],
                key=name,
                fix=f"remove the shared class(es) from {a}.txt or from {b}.txt",
            )
    first = spec.class_lists[0]  # stage_1_train / stage_1_base_train
    if len(lists[first]) < 2:
        raise DataError(
            f"{len(lists[first])} seen training class(es); every method needs at least 2 (a class to tell apart "
            "from another)",
            path=files[first],
            key=first,
            fix="list at least 2 classes with training videos there (seen classes of stage 1)",
        )
    return ClassLists(lists, files, spec.features_root(root, shots))


def _class_files(spec: LayoutSpec, root: Path, modality: str, folder: str, shots: int | None) -> dict[str, Path]:
    d = spec.features_root(root, shots) / modality / folder
    if not d.is_dir():
        raise DataError(
            f"missing split folder for {modality}",
            path=d,
            key=folder,
            fix=f"the layout {spec.name} needs features/{d.relative_to(root / 'features')}/<Class>.{spec.file_format}",
        )
    out = {}
    for p in sorted(d.iterdir()):
        if p.suffix != f".{spec.file_format}":
            continue
        if p.is_symlink() and not p.exists():  # a broken link would otherwise drop the class without a word
            try:
                p.resolve(strict=True)
                problem = "a symlink that cannot be followed"
            except FileNotFoundError:
                problem = f"a dangling symlink (to {os.readlink(p)}, which does not exist)"
            except (RuntimeError, OSError):
                problem = "a symlink loop"
            raise DataError(
                f"class file is {problem}",
                path=p,
                key=p.stem,
                fix="point the link at the real class file or remove it",
            )
        if p.is_file():
            out[p.stem] = p
    return out


def list_inputs(spec: LayoutSpec, root: Path, shots: int | None) -> list[tuple[str, str, Path, Path]]:
    """(folder, class name, audio file, video file) for every class file of every split folder read."""
    out = []
    for folder in spec.folders:
        audio = _class_files(spec, root, "audio", folder, shots)
        video = _class_files(spec, root, "video", folder, shots)
        for only, have, other in (
            (set(audio) - set(video), "audio", "video"),
            (set(video) - set(audio), "video", "audio"),
        ):
            if only:
                name = sorted(only)[0]
                raise DataError(
                    f"class '{name}' has a {have} file but no {other} file",
                    path=spec.class_file(root, other, folder, name, shots),
                    key=name,
                    fix=f"add the missing {other} features of this class or remove the {have} file",
                )
        if not audio:
            raise DataError(
                "split folder holds no class files",
                path=spec.features_root(root, shots) / "audio" / folder,
                key=folder,
                fix=f"expected one <Class>.{spec.file_format} per class",
            )
        out += [(folder, name, audio[name], video[name]) for name in sorted(audio)]
    return out


def _validate(spec: LayoutSpec, modality: str, cf: ClassFile, path: Path) -> list[np.ndarray] | np.ndarray:
    """Check dims, dtypes and values of one class file; return its arrays in the stored dtype of the layout."""
    fs = getattr(spec, modality)
    n = len(cf.video_ids)
    if n == 0:
        raise DataError("class file holds no videos (empty class)", path=path, fix="remove the file or add its videos")
    want = np.dtype(fs.dtype)
    feats = cf.features if isinstance(cf.features, list) else [cf.features]
    for i, f in enumerate(feats):
        expect_ndim = 2 if (spec.temporal or not isinstance(cf.features, list)) else 1
        if f.ndim != expect_ndim or f.shape[-1] != fs.dim or (expect_ndim == 2 and f.shape[0] == 0):
            shape = f"[T, {fs.dim}]" if spec.temporal else (f"({fs.dim},)" if expect_ndim == 1 else f"[N, {fs.dim}]")
            raise DataError(
                f"{modality} features have shape {tuple(f.shape)}, expected {shape}",
                path=path,
                key=f"features[{i}]" if isinstance(cf.features, list) else "data",
                fix=f"this is not a {spec.name} {modality} file (wrong feature set or layout?)",
            )
        ok = (f.dtype == want) if want.kind in "iu" else (f.dtype.kind == "f")
        if not ok:
            raise DataError(
                f"{modality} features have dtype {f.dtype}, expected {want}",
                path=path,
                key=f"features[{i}]" if isinstance(cf.features, list) else "data",
                fix=f"{spec.name} stores {modality} as {want}",
            )
    block = np.concatenate([f.reshape(-1, fs.dim) for f in feats])
    if block.dtype.kind == "f":
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(
                f"{modality} features contain NaN or Inf (row {row})",
                path=path,
                key="features",
                fix="re-extract this class",
            )
        if block.dtype != want:  # finite in the file's dtype, but the store keeps the layout's (e.g. float32)
            with np.errstate(over="ignore"):
                over = ~np.isfinite(block.astype(want)).all(axis=1)
            if over.any():
                row = int(np.argmax(over))
                peak = float(np.abs(block[row]).max())
                raise DataError(
                    f"{modality} features hold {peak:.3g} (row {row}), finite as {block.dtype} but beyond the "
                    f"{want} range (max {float(np.finfo(want).max):.3g})",
                    path=path,
                    key="features",
                    fix=f"re-extract this class; {spec.name} stores {modality} as {want}",
                )
    if len(set(cf.video_ids)) != n:
        dup = next(v for v in cf.video_ids if cf.video_ids.count(v) > 1)
        raise DataError(f"video id '{dup}' occurs twice", path=path, key=dup, fix="each video once per class file")
    if isinstance(cf.features, list):
        return [np.asarray(f, dtype=want) for f in cf.features]
    return np.asarray(cf.features, dtype=want)


def iter_samples(
    spec: LayoutSpec, root: Path, classes: ClassTable, shots: int | None, reordered: list[Path] | None = None
) -> Iterator[tuple[str, int, list[str], object, object]]:
    """Read, validate and pair every class file: yields (folder, class id, video ids, audio, video) with audio and
    video matched by video id (not by file order). Video files that list their videos in another order than the
    audio file are appended to ``reordered`` (for check-data's report)."""
    for folder, name, apath, vpath in list_inputs(spec, root, shots):
        cid = classes.id_of(name, where=apath)
        acf, vcf = read_class_file(spec, apath), read_class_file(spec, vpath)
        audio = _validate(spec, "audio", acf, apath)
        video = _validate(spec, "video", vcf, vpath)
        if set(acf.video_ids) != set(vcf.video_ids):
            only = sorted(set(acf.video_ids) ^ set(vcf.video_ids))[0]
            raise DataError(
                f"audio and video list different videos (e.g. '{only}')",
                path=vpath,
                key=only,
                fix=f"{apath} and {vpath} must hold the same video ids",
            )
        pos = {v: i for i, v in enumerate(vcf.video_ids)}
        order = np.array([pos[v] for v in acf.video_ids])
        if reordered is not None and (order != np.arange(len(order))).any():
            reordered.append(vpath)
        video = [video[i] for i in order] if isinstance(video, list) else video[order]
        yield folder, cid, acf.video_ids, audio, video


def load_benchmark(
    layout: str,
    root_dir: str | Path,
    dataset: str,
    *,
    shots: int | None = None,
    cache_dir: str | Path | None = None,
    rebuild_cache: bool = False,
    verify_cache: bool = False,
) -> Benchmark:
    spec = get_layout(layout)
    dataset = check_dataset(dataset)
    root = Path(root_dir).resolve()
    if not root.is_dir():
        raise DataError("dataset root not found", path=root, fix="--root-dir must be the unpacked dataset folder")
    spec, classes, lists, folder_shots = open_class_split(spec, root, dataset, shots)
    store = open_store(spec, root, dataset, classes, folder_shots, cache_dir, rebuild_cache, verify_cache)
    return Benchmark(spec, dataset, root, folder_shots, store, lists)


def open_class_split(spec: LayoutSpec, root: Path, dataset: str, shots: int | None):
    """The declared layout, class table and class lists of a root (no feature file is read): what ``run`` checks
    before it writes anything. Returns (spec, classes, lists, shot folder or None)."""
    shots = infer_shots(spec, root, shots)
    if spec.task == "gfsl" and shots not in SHOT_CHOICES:
        raise DataError(f"--shots {shots} is not a benchmark setting", key="shots", fix=f"use one of {SHOT_CHOICES}")
    folder_shots = shots if spec.task == "gfsl" else None
    spec = declared_spec(spec, root, dataset, folder_shots)
    classes = read_class_table(spec, root, dataset, folder_shots)
    lists = read_class_lists(spec, root, classes, folder_shots)
    return spec, classes, lists, folder_shots


def preflight(layout: str, root_dir: str | Path, dataset: str, shots: int | None = None) -> None:
    """Every check of a root that needs no feature file (layout, dataset name, shots, class files, text
    embeddings, class lists), so a run fails before it creates its run directory."""
    spec = get_layout(layout)
    dataset = check_dataset(dataset)
    root = Path(root_dir).resolve()
    if not root.is_dir():
        raise DataError("dataset root not found", path=root, fix="--root-dir must be the unpacked dataset folder")
    open_class_split(spec, root, dataset, shots)


def open_store(
    spec: LayoutSpec,
    root: Path,
    dataset: str,
    classes: ClassTable,
    shots: int | None,
    cache_dir: str | Path | None,
    rebuild: bool,
    verify: bool = False,
) -> FeatureStore:
    cache_root = Path(cache_dir).resolve() if cache_dir is not None else cache_mod.default_cache_dir()
    if cache_root == root or root in cache_root.parents:
        raise DataError(
            "the cache folder lies inside the dataset root, which is never written to",
            path=cache_root,
            key="cache-dir",
            fix="choose a --cache-dir outside the dataset root",
        )
    inputs = list_inputs(spec, root, shots)
    files = [p for _, _, a, v in inputs for p in (a, v)]
    small = [root / "class-split" / "all_class.txt"]
    key = cache_mod.inputs_key([spec.name, dataset, str(shots)], files, small)
    prefix = f"{dataset}-{spec.name}{f'-{shots}shot' if shots else ''}-"
    target = cache_root / f"{prefix}{key[:20]}"

    def fill(writer: cache_mod.CacheWriter) -> dict:
        for folder, cid, vids, audio, video in iter_samples(spec, root, classes, shots):
            writer.add("audio", audio)
            writer.add("video", video)
            writer.add_samples(np.full(len(vids), cid), list(spec.folders).index(folder), vids)
        return {"root": str(root), "layout": spec.name, "dataset": dataset, "shots": shots, "key": key}

    try:
        opened = cache_mod.open_or_build(
            target, temporal=spec.temporal, steps=(spec.audio.step_seconds, spec.video.step_seconds), files=files,
            fill=fill, rebuild=rebuild, verify=verify, stale_prefix=prefix, root=str(root),
        )  # fmt: skip
    except OSError as exc:
        if is_disk_full(exc):  # the cache holds about as many bytes as the class files
            raise disk_full(
                cache_root, sum(f.stat().st_size for f in files), f"the feature cache {target.name}"
            ) from None
        raise DataError(f"cannot open or build the feature cache ({exc})", path=target, key="cache-dir") from None
    return FeatureStore(
        audio=opened["audio"],
        video=opened["video"],
        labels=opened["labels"],
        video_ids=opened["video_ids"],
        folder=opened["folder"],
        folders=list(spec.folders),
        classes=classes,
        layout=spec.name,
        dataset=dataset,
    )
