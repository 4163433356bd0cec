"""Split assembly and the GFSL derivation (AV-DIFF paper Table 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avlowshot.data.classes import ClassTable
from avlowshot.data.splits import derive_gfsl, gzsl_protocol
from avlowshot.data.store import FeatureStore, Modality
from avlowshot.data.synth import load_profile

FOLDERS = ["stage_1_train", "stage_1_val_seen", "stage_1_val_unseen", "stage_2_test_seen", "stage_2_test_unseen"]


def profile_store(dataset: str, family: str = "cls_split") -> tuple[FeatureStore, dict]:
    """A labels-only store with the real benchmark's per-class video counts."""
    prof = load_profile(dataset)
    n = prof["n_classes"]
    names = [f"c{i:03d}" for i in range(n)]
    classes = ClassTable(names, False, names, {k: np.ones(2, np.float32) for k in names})
    labels, folder, vids = [], [], []
    for f, split in enumerate(FOLDERS):
        for cid, count in prof["splits"][family][split]:
            labels += [cid] * count
            folder += [f] * count
            vids += [f"{split}-{cid}-{i}" for i in range(count)]
    empty = Modality(torch.zeros(0, 1))
    store = FeatureStore(
        empty, empty, torch.tensor(labels), np.array(vids), np.array(folder, np.int16), FOLDERS, classes
    )
    lists = {s: np.array(sorted(c for c, _ in rows)) for s, rows in prof["splits"][family].items()}
    return store, lists


@pytest.mark.parametrize(
    "dataset,row",
    [  # AV-DIFF Table 1 (5-shot): all, B1, N1, N2, V_B1, V_N1, Val_B, Val_N, V_B2, V_N2, Test_B, Test_N
        ("VGGSound", (271, 138, 69, 64, 70351, 345, 7817, 2757, 81270, 320, 9032, 2880)),
        ("UCF", (48, 30, 12, 6, 3174, 60, 353, 1407, 4994, 30, 555, 815)),
        ("ActivityNet", (198, 99, 51, 48, 9204, 255, 1023, 4052, 14534, 240, 1615, 3812)),
    ],
)
def test_derived_gfsl_reproduces_table_1(dataset, row):
    store, lists = profile_store(dataset)
    p = derive_gfsl(store, gzsl_protocol(store, lists), shots=5, seed=0)
    labels = store.labels.numpy()
    val, test = p.stage1_val, p.stage2_test
    got = (
        len(test[0].classes),
        len(p.stage1_train.classes),
        len(p.stage1_novel.classes),
        len(test[0].unseen),
        len(p.stage1_train.indices),
        len(p.stage1_novel.indices),
        int(np.isin(labels[val.indices], val.seen).sum()),
        int(np.isin(labels[val.indices], val.unseen).sum()),
        len(p.stage2_train.indices),
        len(p.stage2_novel[0].indices),
        int(np.isin(labels[test[0].indices], test[0].seen).sum()),
        int(np.isin(labels[test[0].indices], test[0].unseen).sum()),
    )
    assert got == row
    assert all(len(t.indices) == len(test[0].indices) for t in test)


def test_shots_are_seeded_nested_and_disjoint_from_tests():
    store, lists = profile_store("UCF")
    gz = gzsl_protocol(store, lists)
    one = derive_gfsl(store, gz, shots=1, seed=7)
    five = derive_gfsl(store, gz, shots=5, seed=7)
    again = derive_gfsl(store, gz, shots=5, seed=7)
    other = derive_gfsl(store, gz, shots=5, seed=8)
    assert set(one.stage1_novel.indices) <= set(five.stage1_novel.indices)
    assert np.array_equal(five.stage2_novel[2].indices, again.stage2_novel[2].indices)
    assert not np.array_equal(five.stage2_novel[0].indices, other.stage2_novel[0].indices)
    for novel, test in zip(five.stage2_novel, five.stage2_test, strict=True):
        assert not set(novel.indices) & set(test.indices)


def test_gzsl_split_counts_main_and_cls():
    for family, unseen, n_test in (("main_split", 9, 555 + 1267), ("cls_split", 6, 555 + 845)):
        store, lists = profile_store("UCF", family)
        p = gzsl_protocol(store, lists)
        assert len(p.stage2_test[0].unseen) == unseen and len(p.stage2_test[0].indices) == n_test
        assert len(p.stage1_val.indices) == 353 + 1467 and len(p.stage2_train.indices) == 4994
