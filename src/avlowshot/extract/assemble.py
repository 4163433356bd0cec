"""Extracted per-video features -> the authors' layouts, ready for ``check-data`` and ``run``.

``cls`` features give two layouts in one root: ``tcaf-cls`` (temporal, ``features/cls_features_non_averaged``) and
``avca-cls`` (averaged over time, ``features/cls_features``); ``run --shots k`` derives the few-shot benchmark from
either. ``clipclap`` features give the ``clipclap`` layout (its own root: it uses the same folder name as tcaf-cls).

Class split (``class-split/cls_split/*.txt``): the user's, when the root already has one (the authors' files for
UCF / ActivityNet / VGGSound, say), otherwise a seeded one: 20 % of the classes unseen at test, 20 % unseen at
validation, the rest seen. Videos of a seen class: 10 % to ``stage_1_val_seen``, 10 % to ``stage_2_test_seen``, the
rest to ``stage_1_train``; of a validation-unseen class: 10 % to ``stage_2_test_seen`` (it is seen in stage 2), the
rest to ``stage_1_val_unseen``. Everything is written to a staging folder first and moved into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from avlowshot.data.classes import read_class_list, read_name_map
from avlowshot.data.layouts import (
    CSV_TAG,
    EXTRACTOR_FILE,
    GZSL_CLASS_LISTS,
    W2V_TAG,
    get_layout,
    write_class_file,
    write_csv,
    write_lines,
)
from avlowshot.errors import DataError
from avlowshot.extract.pipeline import VideoItem, feature_file, load_video_features
from avlowshot.extract.text import save_embeddings

LAYOUTS_OF = {"cls": ("tcaf-cls", "avca-cls"), "clipclap": ("clipclap",)}
SPLIT_FAMILY = "cls_split"
UNSEEN_TEST_SHARE, UNSEEN_VAL_SHARE, HELD_OUT_SHARE = 0.2, 0.2, 0.1


def readable_name(folder_name: str) -> str:
    """``ApplyEyeMakeup`` -> ``Apply Eye Makeup``, ``playing_guitar`` -> ``playing guitar`` (the text encoders
    embed this "manual" name, as the references do)."""
    spaced = re.sub(r"[_\-]+", " ", folder_name)
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", spaced)
    return re.sub(r"\s+", " ", spaced).strip()


def _rng(seed: int, *words: str) -> np.random.Generator:
    digest = hashlib.sha256("\0".join(words).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def class_split(classes: list[str], split_root: Path, seed: int) -> dict[str, list[str]]:
    """The six class lists: read from ``split_root`` when it has them, else drawn with ``seed``."""
    if (split_root / "stage_1_train.txt").is_file():
        lists = {n: read_class_list(split_root / f"{n}.txt") for n in GZSL_CLASS_LISTS}
        listed = set().union(*map(set, lists.values()))
        extra = sorted(set(classes) - listed)
        if extra:  # silently dropping them would lose the user's videos
            raise DataError(
                f"{len(extra)} class(es) of the videos are in no list of the stored class split: "
                + ", ".join(f"'{c}'" for c in extra[:5]),
                path=split_root,
                key=extra[0],
                fix="add them to the split's txt files (e.g. stage_2_test_unseen.txt for new unseen classes), "
                "or extract into a new --out folder to draw a new split",
            )
        known = set(classes)
        for n, names in lists.items():
            missing = [c for c in names if c not in known]
            if missing:
                raise DataError(
                    f"class '{missing[0]}' has no extracted video",
                    path=split_root / f"{n}.txt",
                    key=missing[0],
                    fix="extract its videos, or remove it from the class split",
                )
        return lists
    if len(classes) < 3:
        raise DataError(
            f"{len(classes)} classes found; a GZSL split needs at least 3 (seen, validation-unseen, test-unseen)",
            key="classes",
            fix="add videos of more classes",
        )
    order = [classes[i] for i in _rng(seed, "classes").permutation(len(classes))]
    n_test = max(1, round(UNSEEN_TEST_SHARE * len(classes)))
    n_val = max(1, round(UNSEEN_VAL_SHARE * len(classes)))
    test_unseen, val_unseen, seen = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return {
        "stage_1_train": sorted(seen),
        "stage_1_val_seen": sorted(seen),
        "stage_1_val_unseen": sorted(val_unseen),
        "stage_2_train": sorted(seen + val_unseen),
        "stage_2_test_seen": sorted(seen + val_unseen),
        "stage_2_test_unseen": sorted(test_unseen),
    }


def video_folders(lists: dict[str, list[str]], videos: dict[str, list[str]], seed: int) -> dict[str, dict[str, list]]:
    """folder -> class -> video ids, following the module docstring."""
    out: dict[str, dict[str, list]] = {f: {} for f in GZSL_CLASS_LISTS if f != "stage_2_train"}
    seen1, val_unseen = set(lists["stage_1_train"]), set(lists["stage_1_val_unseen"])
    for c in sorted(set().union(*lists.values())):
        ids = sorted(videos[c])
        ids = [ids[i] for i in _rng(seed, "videos", c).permutation(len(ids))]
        held = max(1, round(HELD_OUT_SHARE * len(ids)))
        if c in seen1:
            if len(ids) < 3:
                raise DataError(
                    f"seen class '{c}' has {len(ids)} videos; it needs 3 (train, validation, test)",
                    key=c,
                    fix="add videos of this class or make it unseen",
                )
            parts = {"stage_2_test_seen": ids[:held], "stage_1_val_seen": ids[held : 2 * held]}
            parts["stage_1_train"] = ids[2 * held :]
        elif c in val_unseen:
            if len(ids) < 2:
                raise DataError(f"class '{c}' has 1 video; it needs 2 (validation, test)", key=c)
            parts = {"stage_2_test_seen": ids[:held], "stage_1_val_unseen": ids[held:]}
        else:
            parts = {"stage_2_test_unseen": ids}
        for folder, vids in parts.items():
            if vids:
                out[folder][c] = sorted(vids)
    return out


def assemble(
    out: Path,
    features: str,
    dataset: str,
    items: list[VideoItem],
    work: Path,
    embed: Callable[[list[str]], list[tuple[str, np.ndarray, dict]]],
    *,
    seed: int = 0,
    extractor_meta: dict | None = None,
) -> list[str]:
    """Write the layouts of ``features`` under ``out`` from the extracted videos of ``items``; return the layout names.
    ``embed(manual_names)`` returns ``[(file name pattern, vectors [n, d], encoder spec)]``, one per text file
    of the layout (``{tag}`` in the pattern is the dataset tag)."""
    out = Path(out)
    videos_of: dict[str, list[str]] = {}
    for it in items:
        videos_of.setdefault(it.class_name, []).append(it.video_id)
    split_root = out / "class-split" / SPLIT_FAMILY
    lists = class_split(sorted(videos_of), split_root, seed)
    used = sorted(set().union(*lists.values()))
    folders = video_folders(lists, {c: videos_of[c] for c in used}, seed)
    layouts = [get_layout(name) for name in LAYOUTS_OF[features]]
    names_csv = out / "class-split" / f"{CSV_TAG[dataset]}_w2v_class_names.csv"
    manual = read_name_map(names_csv, "manual") if names_csv.is_file() else {}
    manual = {c: manual.get(c, readable_name(c)) for c in used}

    staging = out / f".assemble-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        cs = staging / "class-split"
        write_lines(cs / "all_class.txt", used)
        write_csv(cs / names_csv.name, ["original", "manual"], [[c, manual[c]] for c in used])
        key_of = manual  # the names embedded: ClipClap's UCF files are keyed by its CLIP class names
        if dataset == "UCF" and features == "clipclap":
            from avlowshot.data.synth import clip_class_names

            clip_names = clip_class_names(dataset)
            key_of = {c: clip_names.get(c, manual[c]) for c in used}
            write_csv(
                cs / "ucf_clip_class_names.csv",
                ["original", "manual", "clip_class_name"],
                [[c, manual[c], key_of[c]] for c in used],
            )
        for name, names in lists.items():
            write_lines(cs / SPLIT_FAMILY / f"{name}.txt", names)
        names = [key_of[c] for c in used]
        text_files = embed(names)
        # one class of one split folder in memory at a time (a full VGGSound is 23 GB of features)
        for folder, by_class in folders.items():
            for c, vids in by_class.items():
                loaded = [load_video_features(feature_file(work, v))[:2] for v in vids]
                for spec in layouts:
                    for m, k in (("audio", 0), ("video", 1)):
                        write_class_file(spec, spec.class_file(staging, m, folder, c), _stored(spec, loaded, k), vids)
        first = load_video_features(feature_file(work, items[0].video_id))
        for spec in layouts:
            root = spec.features_root(staging)
            meta = {
                m: {"dim": int(first[k].shape[-1]), "dtype": _stored(spec, [first], k)[0].dtype.name}
                for m, k in (("audio", 0), ("video", 1))
            }
            meta.update(extractor_meta or {})
            (root / EXTRACTOR_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
            tag = CSV_TAG[dataset] if spec.family == "clipclap" else W2V_TAG[dataset]
            for pattern, vectors, enc_spec in text_files:
                save_embeddings(root / "text" / pattern.format(tag=tag), names, vectors, enc_spec)
        written = [spec.name for spec in layouts]
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _stored(spec, loaded: list[tuple[np.ndarray, np.ndarray]], k: int):
    """Modality ``k`` of the loaded videos as the layout stores it: the rows (temporal), or one vector per video
    (averaged layouts: the mean over time, float32)."""
    feats = [x[k] for x in loaded]
    if spec.temporal:
        return feats
    return np.stack([f.astype(np.float32).mean(axis=0) if f.ndim == 2 else f for f in feats])


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace the features folders and class-split files of ``out`` by the staged ones."""
    for src in sorted((staging / "features").iterdir()):
        dst = out / "features" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if dst.exists():
            old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
            os.replace(dst, old)
        os.replace(src, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    for src in sorted(p for p in (staging / "class-split").rglob("*") if p.is_file()):
        dst = out / src.relative_to(staging)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
