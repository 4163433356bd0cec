"""``avlowshot check-data``: validate a dataset root without writing anything (no cache, no temp files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avlowshot.data.benchmark import iter_samples, read_class_lists, read_class_table
from avlowshot.data.classes import class_list_notes
from avlowshot.data.layouts import check_dataset, declared_spec, get_layout, infer_shots
from avlowshot.data.splits import SHOT_CHOICES, Protocol, avdiff_protocol, derive_gfsl, gzsl_protocol
from avlowshot.data.store import FeatureStore, Modality
from avlowshot.errors import DataError


@dataclass
class CheckReport:
    layout: str
    shots: int | None
    dataset: str
    root: Path
    n_classes: int
    folders: list[tuple[str, int, int, int]]  # folder, classes, videos, feature rows (audio)
    protocol: Protocol
    notes: list[str] = field(default_factory=list)  # what was read leniently (CRLF, spaces, video order)


def check_root(layout: str, root_dir: str | Path, dataset: str, shots: int | None = None, progress=None) -> CheckReport:
    """Read and validate every file the layout uses; raise ``DataError`` on the first problem."""
    spec = get_layout(layout)
    dataset = check_dataset(dataset)
    root = Path(root_dir)
    if not root.is_dir():
        raise DataError("dataset root not found", path=root, fix="--root-dir must be the unpacked dataset folder")
    shots = infer_shots(spec, root, shots)
    spec = declared_spec(spec, root, dataset, shots if spec.task == "gfsl" else None)
    if shots is not None and shots not in SHOT_CHOICES:
        raise DataError(f"--shots {shots} is not a benchmark setting", key="shots", fix=f"use one of {SHOT_CHOICES}")
    if spec.task == "gfsl" and shots is None:
        raise DataError("the avdiff layout needs --shots", key="shots", fix=f"use one of {SHOT_CHOICES}")
    folder_shots = shots if spec.task == "gfsl" else None
    classes = read_class_table(spec, root, dataset, folder_shots)
    lists = read_class_lists(spec, root, classes, folder_shots)
    labels, folder, vids, rows = [], [], [], {f: [0, 0, 0] for f in spec.folders}
    per_class_shots: dict[str, dict[int, int]] = {}
    reordered: list[Path] = []
    samples = iter_samples(spec, root, classes, folder_shots, reordered)
    for i, (fold, cid, ids, audio, _video) in enumerate(samples):
        labels.append(np.full(len(ids), cid))
        folder.append(np.full(len(ids), spec.folders.index(fold)))
        vids += ids
        r = rows[fold]
        r[0] += 1
        r[1] += len(ids)
        r[2] += sum(len(a) for a in audio) if spec.temporal else len(ids)
        if "train_novel" in fold:
            per_class_shots.setdefault(fold, {})[cid] = len(ids)
        if progress:
            progress(i)
    for fold, counts in per_class_shots.items():
        for cid, n in counts.items():
            if n != shots:
                raise DataError(
                    f"class '{classes.names[cid]}' has {n} videos in {fold}, expected {shots} shots",
                    path=spec.features_root(root, folder_shots) / "audio" / fold,
                    key=classes.names[cid],
                    fix="the shot folders of a k-shot benchmark hold exactly k videos per novel class",
                )
    # A labels-only store: enough to assemble (and so validate) every split of the protocol.
    empty = Modality(torch.zeros(0, 1))
    store = FeatureStore(
        empty,
        empty,
        torch.from_numpy(np.concatenate(labels).astype(np.int64)),
        np.asarray(vids),
        np.concatenate(folder).astype(np.int16),
        list(spec.folders),
        classes,
    )
    if spec.task == "gfsl":
        protocol = avdiff_protocol(store, lists, shots)
    else:
        protocol = gzsl_protocol(store, lists)
        if shots is not None:
            protocol = derive_gfsl(store, protocol, shots)
    folders = [(f, *rows[f]) for f in spec.folders]
    notes = class_list_notes(root / "class-split" / "all_class.txt")
    for f in lists.files.values():
        notes += class_list_notes(f)
    if reordered:
        notes.append(
            f"{len(reordered)} video file(s) list the same videos as their audio file in another order; audio and "
            f"video are paired by video id (e.g. {reordered[0]})"
        )
    return CheckReport(spec.name, shots, dataset, root, len(classes), folders, protocol, notes)
