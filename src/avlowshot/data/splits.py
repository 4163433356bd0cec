"""Split assembly: which samples and which classes each stage of the protocol uses.

GZSL (AVCA / TCAF / ClipClap, ``main_split`` or ``cls_split``):

* stage-1 train = folder ``stage_1_train`` (classes ``stage_1_train.txt``);
* stage-1 val = folders ``stage_1_val_seen`` + ``stage_1_val_unseen`` (seen = ``stage_1_val_seen.txt``, unseen =
  ``stage_1_val_unseen.txt``);
* stage-2 train = the three stage-1 folders (classes = stage-1 train + val unseen); the ``stage_2_train`` folder is
  never read, exactly as in the references;
* test = folders ``stage_2_test_seen`` + ``stage_2_test_unseen`` restricted to the classes of the txt files (this
  is how ``cls_split`` drops the unseen classes that overlap the extractors' pre-training data).

GFSL (AV-DIFF): base classes B1 / novel N1 in stage 1, B2 = B1 + N1 / N2 in stage 2, k shots per novel class,
three stage-2 repeats with their own shots and their own novel test videos. Either read from the avdiff layout or
derived from a GZSL split with ``derive_gfsl`` (see its docstring for the documented shot selection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avlowshot.data.store import FeatureStore
from avlowshot.errors import DataError

SHOT_CHOICES = (1, 5, 10, 20)
N_REPEATS = 3


@dataclass
class TrainSplit:
    name: str
    indices: np.ndarray  # store indices
    classes: np.ndarray  # global ids, sorted


@dataclass
class EvalSplit:
    name: str
    indices: np.ndarray
    seen: np.ndarray  # global ids of seen (base) classes
    unseen: np.ndarray  # global ids of unseen (novel) classes

    @property
    def classes(self) -> np.ndarray:
        return np.union1d(self.seen, self.unseen)


@dataclass
class Protocol:
    task: str  # "gzsl" | "gfsl"
    stage1_train: TrainSplit
    stage1_val: EvalSplit
    stage2_train: TrainSplit
    stage2_test: list[EvalSplit]  # GZSL: [test]; GFSL: one per repeat
    stage1_novel: TrainSplit | None = None  # GFSL: k shots of each N1 class
    stage2_novel: list[TrainSplit] = field(default_factory=list)  # GFSL: k shots of each N2 class, per repeat
    shots: int | None = None

    def describe(self) -> list[tuple[str, int, int]]:
        """(name, n_classes, n_videos) per split, for tables."""
        rows = [(s.name, len(s.classes), len(s.indices)) for s in (self.stage1_train, self.stage1_novel) if s]
        rows.append((self.stage1_val.name, len(self.stage1_val.classes), len(self.stage1_val.indices)))
        rows.append((self.stage2_train.name, len(self.stage2_train.classes), len(self.stage2_train.indices)))
        rows += [(s.name, len(s.classes), len(s.indices)) for s in self.stage2_novel]
        rows += [(s.name, len(s.classes), len(s.indices)) for s in self.stage2_test]
        return rows


def _restrict(store: FeatureStore, indices: np.ndarray, classes: np.ndarray) -> np.ndarray:
    keep = np.isin(store.labels.numpy()[indices], classes)
    return indices[keep]


class ClassLists(dict):
    """Class ids of each ``class-split/<family>/<name>.txt`` by name; ``files`` and ``features`` say where the lists
    and the feature folders are, for messages."""

    def __init__(self, lists: dict[str, np.ndarray], files: dict[str, Path] | None = None, features=None):
        super().__init__(lists)
        self.files = files or {}
        self.features = features  # the layout's features/<dir> folder, or None


def _check_nonempty(store: FeatureStore, indices, classes, split: str, folders, lists=None, sources=()) -> None:
    present = set(np.unique(store.labels.numpy()[indices]).tolist())
    missing = [int(c) for c in classes if int(c) not in present]
    if not missing:
        return
    names = ", ".join(store.classes.names[c] for c in missing[:5])
    source = next((s for s in sources if lists is not None and missing[0] in set(lists[s].tolist())), None)
    files = getattr(lists, "files", {})
    where = files.get(source) if source else None
    feats = getattr(lists, "features", None)
    folder_list = ", ".join(folders)
    listed = f"{source}.txt" if source else f"the class lists of {split}"
    on_disk = f"{feats}/{{audio,video}}/<folder>/" if feats is not None else "features/.../{audio,video}/<folder>/"
    raise DataError(
        f"{len(missing)} class(es) listed in {listed} have no feature files in the folder(s) {split} reads "
        f"({folder_list}): {names}",
        path=where,
        key=store.classes.names[missing[0]],
        fix=f"add their files to {on_disk} or remove them from {listed}",
    )


def _train(store, name, folders, classes, lists=None, sources=()) -> TrainSplit:
    idx = _restrict(store, store.in_folders(*folders), classes)
    _check_nonempty(store, idx, classes, name, folders, lists, sources)
    return TrainSplit(name, idx, np.sort(classes))


def _eval(store, name, folders, seen, unseen, lists=None, sources=()) -> EvalSplit:
    idx = _restrict(store, store.in_folders(*folders), np.union1d(seen, unseen))
    _check_nonempty(store, idx, np.union1d(seen, unseen), name, folders, lists, sources)
    return EvalSplit(name, idx, np.sort(seen), np.sort(unseen))


def gzsl_protocol(store: FeatureStore, lists: dict[str, np.ndarray]) -> Protocol:
    """``lists``: class ids of each ``class-split/<family>/stage_*.txt``."""
    s1 = ("stage_1_train", "stage_1_val_seen", "stage_1_val_unseen")
    L = lists
    val_lists = ("stage_1_val_seen", "stage_1_val_unseen")
    test_lists = ("stage_2_test_seen", "stage_2_test_unseen")
    return Protocol(
        task="gzsl",
        stage1_train=_train(store, "stage_1_train", ["stage_1_train"], L["stage_1_train"], L, ["stage_1_train"]),
        stage1_val=_eval(store, "stage_1_val", s1[1:], *(L[n] for n in val_lists), L, val_lists),
        stage2_train=_train(
            store,
            "stage_2_train",
            s1,
            np.union1d(L["stage_1_train"], L["stage_1_val_unseen"]),
            L,
            ["stage_1_train", "stage_1_val_unseen"],
        ),
        stage2_test=[_eval(store, "stage_2_test", test_lists, *(L[n] for n in test_lists), L, test_lists)],
    )


AVDIFF_REPEAT_SUFFIXES = ("", "_1", "_2")


def avdiff_protocol(store: FeatureStore, lists: dict[str, np.ndarray], shots: int) -> Protocol:
    """GFSL as the avdiff layout defines it (``class-split/<k>-shot/*.txt`` + its 11 feature folders)."""
    L = lists
    base1, novel1 = L["stage_1_base_train"], L["stage_1_novel_train"]
    s1 = ("stage_1_train_base", "stage_1_train_novel", "stage_1_val_seen", "stage_1_val_novel")
    n2 = L["stage_2_novel_train"]
    val_lists = ("stage_1_val_seen", "stage_1_val_unseen")
    test_lists = ("stage_2_test_seen", "stage_2_test_unseen")
    return Protocol(
        task="gfsl",
        shots=shots,
        stage1_train=_train(store, "stage_1_train_base", ["stage_1_train_base"], base1, L, ["stage_1_base_train"]),
        stage1_novel=_train(store, "stage_1_train_novel", ["stage_1_train_novel"], novel1, L, ["stage_1_novel_train"]),
        stage1_val=_eval(store, "stage_1_val", s1[2:], *(L[n] for n in val_lists), L, val_lists),
        stage2_train=_train(
            store,
            "stage_2_train_base",
            s1,
            np.union1d(base1, L["stage_1_val_unseen"]),
            L,
            ["stage_1_base_train", "stage_1_val_unseen"],
        ),
        stage2_novel=[
            _train(store, f"stage_2_train_novel{r}", [f"stage_2_train_novel{r}"], n2, L, ["stage_2_novel_train"])
            for r in AVDIFF_REPEAT_SUFFIXES
        ],
        stage2_test=[
            _eval(
                store,
                f"stage_2_test{r}",
                ["stage_2_test_seen", f"stage_2_test_novel{r}"],
                *(L[n] for n in test_lists),
                L,
                test_lists,
            )
            for r in AVDIFF_REPEAT_SUFFIXES
        ],
    )


def shot_positions(video_ids, shots: int, seed: int, repeat: int, class_id: int) -> np.ndarray:
    """The documented shot selection: order a class's videos by video id, permute them with
    ``numpy.random.default_rng([seed, repeat, class_id])`` and take the first k. Returns positions into
    ``video_ids``. The shots of a smaller k are a prefix of those of a larger k (1 ⊂ 5 ⊂ 10 ⊂ 20) for the same seed
    and repeat."""
    order = np.argsort(np.asarray(video_ids), kind="stable")
    perm = np.random.default_rng([seed, repeat, int(class_id)]).permutation(len(order))
    return np.sort(order[perm[:shots]])


def select_shots(
    store: FeatureStore, indices: np.ndarray, classes: np.ndarray, shots: int, seed: int, repeat: int, where: str
) -> np.ndarray:
    """k shots per class of ``classes`` among ``indices`` (``shot_positions``); at least one video per class must
    remain for testing."""
    labels = store.labels.numpy()
    chosen = []
    for c in np.sort(classes):
        members = indices[labels[indices] == c]
        if len(members) < shots + 1:
            raise DataError(
                f"class '{store.classes.names[c]}' has {len(members)} videos in {where}; {shots} shots need at "
                f"least {shots + 1} (k to train, the rest to test)",
                key=where,
                fix=f"use fewer shots (--shots), one of {[k for k in SHOT_CHOICES if k < len(members)] or 'none'}",
            )
        chosen.append(members[shot_positions(store.video_ids[members], shots, seed, repeat, c)])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def derive_gfsl(store: FeatureStore, gzsl: Protocol, shots: int, seed: int = 0) -> Protocol:
    """A GFSL benchmark from a GZSL one, the way AV-DIFF's Table 1 counts it (specs/avdiff.md 1.4).

    B1 = GZSL stage-1 seen classes, N1 = stage-1 unseen classes; B2 = stage-2 seen, N2 = stage-2 unseen.
    Stage 1 novel train = k shots per N1 class drawn from the val-unseen videos (repeat 0); stage-1 val = val seen +
    the remaining val-unseen videos. Stage-2 base train = every stage-1 video (train, val seen, all val unseen).
    Repeat r in {0, 1, 2}: k shots per N2 class drawn from the test-unseen videos (repeat r + 1), tested on test seen +
    the remaining test-unseen videos. E.g. UCF cls, 5 shots: 30/12/6 classes, V_N1 = 60, Val_N = 1407, V_B2 = 4994,
    V_N2 = 30, Test_N = 815.
    """
    if shots not in SHOT_CHOICES:
        raise DataError(f"--shots {shots} is not a benchmark setting", key="shots", fix=f"use one of {SHOT_CHOICES}")
    if gzsl.task != "gzsl":
        raise ValueError("derive_gfsl needs a GZSL protocol")
    val, test = gzsl.stage1_val, gzsl.stage2_test[0]
    labels = store.labels.numpy()
    val_novel = val.indices[np.isin(labels[val.indices], val.unseen)]
    val_base = val.indices[np.isin(labels[val.indices], val.seen)]
    shots1 = select_shots(store, val_novel, val.unseen, shots, seed, 0, "stage_1_val_unseen")
    novel_test = test.indices[np.isin(labels[test.indices], test.unseen)]
    base_test = test.indices[np.isin(labels[test.indices], test.seen)]
    novel2, tests = [], []
    for r in range(N_REPEATS):
        suffix = AVDIFF_REPEAT_SUFFIXES[r]
        shots2 = select_shots(store, novel_test, test.unseen, shots, seed, r + 1, "stage_2_test_unseen")
        novel2.append(TrainSplit(f"stage_2_train_novel{suffix}", shots2, test.unseen))
        rest = np.setdiff1d(novel_test, shots2)
        tests.append(EvalSplit(f"stage_2_test{suffix}", np.union1d(base_test, rest), test.seen, test.unseen))
    return Protocol(
        task="gfsl",
        shots=shots,
        stage1_train=TrainSplit("stage_1_train_base", gzsl.stage1_train.indices, gzsl.stage1_train.classes),
        stage1_novel=TrainSplit("stage_1_train_novel", shots1, val.unseen),
        stage1_val=EvalSplit(
            "stage_1_val", np.union1d(val_base, np.setdiff1d(val_novel, shots1)), val.seen, val.unseen
        ),
        stage2_train=TrainSplit(
            "stage_2_train_base",
            np.union1d(gzsl.stage1_train.indices, val.indices),
            np.union1d(gzsl.stage1_train.classes, val.unseen),
        ),
        stage2_novel=novel2,
        stage2_test=tests,
    )
