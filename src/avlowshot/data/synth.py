"""Synthetic benchmarks in the authors' layouts, at any scale, with planted structure.

Shape: the class splits and per-class video counts of the real benchmark (``profiles/benchmarks.json``, taken from
the authors' split csvs) times ``scale``, with at least the minimum the protocol needs per class; the real class
names when a class-split folder is given; the real feature dims, dtypes and time steps of each layout; per-dataset
clip durations (UCF ~7 s, ActivityNet trimmed segments ~45 s with a long tail, VGGSound 10 s).

Planted structure (what a model can learn, and must learn to transfer to unseen classes):

* each class has a latent code ``z`` in a low-dimensional space (rank 8); its text embeddings are fixed random
  linear maps of ``z`` plus a little class-specific noise, L2-normalised (300-d "w2v", or 512-d CLIP + 1024-d CLAP);
* its prototype is a fixed random *nonlinear* map of its text vector (``tanh`` of a random projection), split into an
  audio half and a video half: each modality carries a complementary part of the class signal;
* a video gets its class prototype plus video-level variation, only in a random contiguous window of its time steps
  (30-70 % of them); the other steps hold background; every row gets feature-space noise;
* rows are lifted to the feature space by fixed random projections and squashed like the real extractors (uint8
  VGGish around 128, post-ReLU C3D / SeLaVi, L2-normalised CLAP / float16 CLIP); averaged layouts store the mean.

Every class is drawn from its own generator seeded by (seed, class id, split), so the same seed gives the same
bytes whatever the order of writing, and memory holds one class at a time.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from avlowshot.data.classes import read_class_list
from avlowshot.data.layouts import (
    CASE_INSENSITIVE,
    CSV_TAG,
    GZSL_CLASS_LISTS,
    LayoutSpec,
    check_dataset,
    get_layout,
    write_class_file,
    write_csv,
    write_lines,
)
from avlowshot.data.safe_pickle import save_npy_dict
from avlowshot.data.splits import AVDIFF_REPEAT_SUFFIXES, N_REPEATS, SHOT_CHOICES, shot_positions
from avlowshot.errors import DataError

LATENT_RANK = 8
PROTO_DIM = 32  # per modality
DURATION = {  # seconds: (log-median, log-sigma, min, max); VGGSound clips are 10 s
    "UCF": (np.log(6.5), 0.45, 1.5, 30.0),
    "ActivityNet": (np.log(45.0), 0.8, 3.0, 240.0),
    "VGGSound": (np.log(10.0), 0.0, 10.0, 10.0),
}
MIN_PER_CLASS = 2


def load_profile(dataset: str) -> dict:
    text = resources.files("avlowshot.data").joinpath("profiles/benchmarks.json").read_text()
    return json.loads(text)[dataset]


@dataclass
class SynthClasses:
    names: list[str]  # all_class.txt names, sorted; id = position
    file_names: list[str]  # per id: spelling used in split txts and file names
    manual: list[str]  # per id: embedding key of the word2vec layouts
    clip: list[str]  # per id: embedding key of ClipClap's UCF text files (its ucf_clip_class_names.csv)


def _class_names(dataset: str, profile: dict, class_split: Path | None) -> SynthClasses:
    n = profile["n_classes"]
    if class_split is None:
        names = [f"class_{i:03d}" for i in range(n)]
        manual = [f"class {i:03d}" for i in range(n)]
        return SynthClasses(names, names, manual, manual)
    names = read_class_list(class_split / "all_class.txt")
    if len(names) != n:
        raise DataError(
            f"{len(names)} classes, but the {dataset} profile has {n}",
            path=class_split / "all_class.txt",
            fix=f"--class-split must be the class-split folder of {dataset}",
        )
    fold = (lambda s: s.lower()) if CASE_INSENSITIVE[dataset] else (lambda s: s)
    spelling = {fold(x): x for x in names}
    for txt in sorted(class_split.glob("*_split/stage_*.txt")):  # split txts may spell names differently
        for x in read_class_list(txt):
            if fold(x) not in spelling:
                raise DataError(f"class '{x}' is not in all_class.txt", path=txt, key=x)
            spelling[fold(x)] = x
    csv_file = class_split / f"{CSV_TAG[dataset]}_w2v_class_names.csv"
    manual_of = {}
    if csv_file.exists():
        with open(csv_file, newline="", encoding="utf-8") as fh:
            manual_of = {fold(r["original"].strip()): r["manual"].strip() for r in csv.DictReader(fh)}
    manual = [manual_of.get(fold(x), x) for x in names]
    clip_of = clip_class_names(dataset)
    clip = [clip_of.get(x, m) for x, m in zip(names, manual, strict=True)]
    return SynthClasses(names, [spelling[fold(x)] for x in names], manual, clip)


def clip_class_names(dataset: str) -> dict[str, str]:
    """Original class name -> the CLIP class name the ClipClap authors ship (UCF; the other benchmarks use their
    word2vec ``manual`` names). Keyed like the release, so sorted CLIP names keep the original class order."""
    text = resources.files("avlowshot.data").joinpath("profiles/clip_class_names.json").read_text()
    return json.loads(text).get(dataset, {})


class Generator:
    """The fixed random maps of one synthetic benchmark and the per-class sampling."""

    def __init__(self, spec: LayoutSpec, dataset: str, n_classes: int, seed: int):
        self.spec, self.dataset, self.seed = spec, dataset, seed
        g = np.random.default_rng([seed, 7001])
        self.z = g.standard_normal((n_classes, LATENT_RANK))
        self.text = {}
        for t in spec.text:
            lift = g.standard_normal((LATENT_RANK, t.dim))
            vec = self.z @ lift + 0.6 * np.sqrt(LATENT_RANK) * g.standard_normal((n_classes, t.dim))
            self.text[t.pattern] = (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)
        first = self.text[spec.text[0].pattern]
        w = g.standard_normal((first.shape[1], 2 * PROTO_DIM)) * np.sqrt(first.shape[1] / 300.0)
        proto = np.tanh(1.5 * (first @ w))  # the fixed nonlinear map text -> prototype
        self.proto = {"audio": proto[:, :PROTO_DIM], "video": proto[:, PROTO_DIM:]}
        self.lift = {}
        for m in ("audio", "video"):
            dim = getattr(spec, m).dim
            self.lift[m] = (g.standard_normal((PROTO_DIM, dim)) / np.sqrt(PROTO_DIM)).astype(np.float32)

    def durations(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu, sigma, lo, hi = DURATION[self.dataset]
        d = np.exp(mu + sigma * rng.standard_normal(n))
        if self.dataset == "VGGSound":  # most clips are the full 10 s, a few are cut short
            d = np.where(rng.random(n) < 0.9, 10.0, rng.uniform(4.0, 10.0, n))
        return np.clip(d, lo, hi)

    def class_videos(self, class_id: int, split_code: int, n: int) -> tuple[list, list]:
        """Audio and video features of ``n`` videos of one class (lists of per-video arrays, or 2-D arrays)."""
        rng = np.random.default_rng([self.seed, class_id, split_code])
        dur = self.durations(rng, n)
        out = []
        for m in ("audio", "video"):
            fs = getattr(self.spec, m)
            signal = self.proto[m][class_id] + 0.9 * rng.standard_normal((n, PROTO_DIM))  # video-level variation
            if self.spec.temporal:
                out.append(self._temporal(rng, m, signal, np.maximum(1, (dur / fs.step_seconds).astype(int))))
            else:
                out.append(self._averaged(rng, m, signal))
        return out[0], out[1]

    def _temporal(self, rng, m: str, signal: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        total = int(lengths.sum())
        owner = np.repeat(np.arange(len(lengths)), lengths)
        step = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        frac = rng.uniform(0.3, 0.7, len(lengths))
        width = np.maximum(1, np.round(frac * lengths)).astype(int)
        start = (rng.random(len(lengths)) * (lengths - width + 1)).astype(int)
        evidence = (step >= start[owner]) & (step < (start + width)[owner])  # class evidence in a window
        latent = np.where(evidence[:, None], signal[owner], 0.0) + 0.6 * rng.standard_normal((total, PROTO_DIM))
        rows = self._lift(rng, m, latent.astype(np.float32))
        return np.split(rows, np.cumsum(lengths)[:-1])

    def _averaged(self, rng, m: str, signal: np.ndarray) -> np.ndarray:
        latent = 0.5 * signal + 0.5 * rng.standard_normal(signal.shape)  # ~ the mean over a clip's rows
        return self._lift(rng, m, latent.astype(np.float32))

    def _lift(self, rng, m: str, latent: np.ndarray) -> np.ndarray:
        fs = getattr(self.spec, m)
        x = latent @ self.lift[m]
        x += 0.5 * rng.standard_normal(x.shape, dtype=np.float32)
        if fs.dim == 128:  # VGGish: PCA'd, clipped and quantised to uint8 around 128
            x = np.clip(np.rint(128.0 + 40.0 * x), 0, 255)
            return x.astype(np.uint8) if self.spec.temporal else x.astype(np.float32)
        if self.spec.family == "clipclap":  # CLIP / CLAP embeddings are L2-normalised; CLIP is stored as float16
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            return x.astype(fs.dtype)
        return np.maximum(x, 0.0, out=x).astype(np.float32)  # post-ReLU C3D fc7 / pooled SeLaVi


def _video_ids(dataset: str, class_file_name: str, class_id: int, split_code: int, n: int, seed: int) -> list[str]:
    if dataset == "UCF":
        stem = class_file_name.replace(" ", "")
        return [f"v_{stem}_g{split_code:02d}{i // 100:02d}_c{i % 100:02d}" for i in range(n)]
    ids = []
    for i in range(n):
        h = hashlib.blake2b(f"{seed}/{class_id}/{split_code}/{i}".encode(), digest_size=9).digest()
        yt = __import__("base64").urlsafe_b64encode(h).decode()[:11]
        ids.append(f"{yt}_{(i * 7) % 600:06d}" if dataset == "VGGSound" else f"{yt}_{i % 5}")
    return ids


def _scaled(count: int, scale: float, minimum: int) -> int:
    return max(minimum, int(round(count * scale)))


def write_synthetic(
    layout: str,
    dataset: str,
    out: str | Path,
    *,
    scale: float,
    seed: int = 0,
    shots: int | None = None,
    class_split: str | Path | None = None,
    progress=None,
) -> Path:
    """Write a synthetic benchmark root at ``out`` and return it. ``progress(done, total)`` is called per class."""
    spec = get_layout(layout)
    dataset = check_dataset(dataset, known_only=True)
    if not scale > 0:
        raise DataError(f"--scale {scale} must be > 0", key="scale")
    if spec.task == "gfsl" and shots not in SHOT_CHOICES:
        raise DataError("the avdiff layout needs --shots", key="shots", fix=f"use one of {SHOT_CHOICES}")
    if spec.task == "gzsl" and shots is not None and shots not in SHOT_CHOICES:
        # GZSL layouts: --shots k sizes the novel classes for `run --shots k` (k shots + 1 test video each)
        raise DataError(f"--shots {shots} is not a benchmark setting", key="shots", fix=f"use one of {SHOT_CHOICES}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError("output folder exists and is not empty", path=out, fix="choose a new --out folder")
    profile = load_profile(dataset)
    family = "main_split" if spec.feature_set == "main" else "cls_split"
    counts = {s: dict(map(tuple, v)) for s, v in profile["splits"][family].items()}
    classes = _class_names(dataset, profile, Path(class_split) if class_split else None)
    gen = Generator(spec, dataset, profile["n_classes"], seed)
    novel_min = max(MIN_PER_CLASS, (shots or 0) + 1)
    minimum = {"stage_1_val_unseen": novel_min, "stage_2_test_unseen": novel_min}

    _write_class_split(spec, out, dataset, classes, counts, family, shots)
    _write_text(spec, out, dataset, classes, gen, shots)
    # (source split, class id, n videos): the stage-1 and test folders; stage_2_train is never read by any layout
    plan = [
        (split, cid, _scaled(n, scale, minimum.get(split, MIN_PER_CLASS)))
        for split in (
            "stage_1_train",
            "stage_1_val_seen",
            "stage_1_val_unseen",
            "stage_2_test_seen",
            "stage_2_test_unseen",
        )
        for cid, n in sorted(counts[split].items())
    ]
    for done, (split, cid, n) in enumerate(plan, 1):
        code = GZSL_CLASS_LISTS.index(split)
        audio, video = gen.class_videos(cid, code, n)
        vids = _video_ids(dataset, classes.file_names[cid], cid, code, n, seed)
        for folder, sel in _target_folders(spec, split, vids, cid, shots, seed):
            name = classes.file_names[cid]
            for m, feats in (("audio", audio), ("video", video)):
                part = [feats[i] for i in sel] if isinstance(feats, list) else feats[sel]
                write_class_file(spec, spec.class_file(out, m, folder, name, shots), part, [vids[i] for i in sel])
        if progress:
            progress(done, len(plan))
    return out


def _target_folders(spec: LayoutSpec, split: str, vids: list[str], cid: int, shots: int | None, seed: int):
    """Which folders (and which of the class's videos) a GZSL split's class goes to in this layout."""
    everything = np.arange(len(vids))
    if spec.task != "gfsl":
        return [(split, everything)]
    if split == "stage_1_train":
        return [("stage_1_train_base", everything)]
    if split in ("stage_1_val_seen", "stage_2_test_seen"):
        return [(split, everything)]
    if split == "stage_1_val_unseen":  # k shots for stage-1 novel training, the rest for validation
        chosen = shot_positions(vids, shots, seed, 0, cid)
        return [("stage_1_train_novel", chosen), ("stage_1_val_novel", np.setdiff1d(everything, chosen))]
    targets = []
    for r in range(N_REPEATS):
        chosen = shot_positions(vids, shots, seed, r + 1, cid)
        suffix = AVDIFF_REPEAT_SUFFIXES[r]
        targets += [
            (f"stage_2_train_novel{suffix}", chosen),
            (f"stage_2_test_novel{suffix}", np.setdiff1d(everything, chosen)),
        ]
    return targets


def _write_class_split(spec, out: Path, dataset: str, classes: SynthClasses, counts: dict, family: str, shots) -> None:
    cs = out / "class-split"
    write_lines(cs / "all_class.txt", classes.names)
    pairs = [[o, m] for o, m in zip(classes.names, classes.manual, strict=True)]
    write_csv(cs / f"{CSV_TAG[dataset]}_w2v_class_names.csv", ["original", "manual"], pairs)
    if spec.family == "clipclap" and dataset == "UCF":
        rows = [p + [c] for p, c in zip(pairs, classes.clip, strict=True)]
        write_csv(cs / "ucf_clip_class_names.csv", ["original", "manual", "clip_class_name"], rows)
    lists = {s: sorted(classes.file_names[c] for c in counts[s]) for s in GZSL_CLASS_LISTS}
    if spec.task == "gfsl":
        lists = {
            "stage_1_base_train": lists["stage_1_train"],
            "stage_1_novel_train": lists["stage_1_val_unseen"],
            "stage_1_val_seen": lists["stage_1_val_seen"],
            "stage_1_val_unseen": lists["stage_1_val_unseen"],
            "stage_2_base_train": lists["stage_2_train"],
            "stage_2_novel_train": lists["stage_2_test_unseen"],
            "stage_2_test_seen": lists["stage_2_test_seen"],
            "stage_2_test_unseen": lists["stage_2_test_unseen"],
        }
    for name, names in lists.items():
        write_lines(spec.split_root(out, shots) / f"{name}.txt", names)


def _write_text(spec, out: Path, dataset: str, classes: SynthClasses, gen: Generator, shots) -> None:
    for t, path in zip(spec.text, spec.text_files(out, dataset, shots), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = classes.clip if spec.family == "clipclap" and dataset == "UCF" else classes.manual
        save_npy_dict(path, {m: gen.text[t.pattern][c] for c, m in enumerate(keys)})
