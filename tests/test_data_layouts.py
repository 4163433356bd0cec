"""Every layout: synthesize, read back, exact counts; determinism; cache; batching."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avlowshot.data.batching import ClassBalancedSampler, gather
from avlowshot.data.benchmark import load_benchmark
from avlowshot.data.layouts import LAYOUTS, get_layout
from avlowshot.data.synth import load_profile

GZSL_LAYOUTS = [x for x in LAYOUTS if x != "avdiff"]


def expected_counts(dataset: str, family: str, scale: float, minimum: dict[str, int] | None = None) -> dict[str, int]:
    minimum = minimum or {}
    prof = load_profile(dataset)["splits"][family]
    return {
        split: sum(max(minimum.get(split, 2), int(round(n * scale))) for _, n in rows) for split, rows in prof.items()
    }


def test_profile_reproduces_the_real_counts():
    ucf = load_profile("UCF")
    sums = {s: sum(n for _, n in rows) for s, rows in ucf["splits"]["cls_split"].items()}
    assert sums == {
        "stage_1_train": 3174,
        "stage_1_val_seen": 353,
        "stage_1_val_unseen": 1467,
        "stage_2_train": 4994,
        "stage_2_test_seen": 555,
        "stage_2_test_unseen": 845,
    }
    vgg = load_profile("VGGSound")["splits"]["main_split"]
    assert sum(n for _, n in vgg["stage_1_train"]) == 70351
    assert sum(n for _, n in vgg["stage_2_test_unseen"]) == 3450
    assert load_profile("ActivityNet")["n_classes"] == 200


@pytest.mark.parametrize("layout", GZSL_LAYOUTS)
def test_gzsl_layout_roundtrip(layout, synth_root, cache_dir):
    spec = get_layout(layout)
    root = synth_root(layout)
    bench = load_benchmark(layout, root, "UCF", cache_dir=cache_dir)
    store = bench.store
    family = "main_split" if spec.feature_set == "main" else "cls_split"
    want = expected_counts("UCF", family, 0.03)
    proto = bench.protocol()
    assert len(proto.stage1_train.indices) == want["stage_1_train"]
    assert len(proto.stage1_val.indices) == want["stage_1_val_seen"] + want["stage_1_val_unseen"]
    assert (
        len(proto.stage2_train.indices) == want["stage_1_train"] + want["stage_1_val_seen"] + want["stage_1_val_unseen"]
    )
    assert len(proto.stage2_test[0].indices) == want["stage_2_test_seen"] + want["stage_2_test_unseen"]
    n_unseen_test = 9 if family == "main_split" else 6
    assert (len(proto.stage1_train.classes), len(proto.stage1_val.unseen), len(proto.stage2_test[0].unseen)) == (
        30,
        12,
        n_unseen_test,
    )
    assert store.audio.dim == spec.audio.dim and store.video.dim == spec.video.dim
    assert str(store.audio.data.dtype) == f"torch.{spec.audio.dtype}"
    assert str(store.video.data.dtype) == f"torch.{spec.video.dtype}"
    assert store.temporal == spec.temporal
    assert bench.classes.embeddings().shape == (101, spec.text_dim)
    if spec.temporal:
        lengths = store.video.lengths().float()
        # UCF clips ~6.5 s median: C3D rows of 0.64 s, VGGish / SeLaVi rows of 0.96 s / 1 s
        assert 6 < lengths.median() < 14 if spec.feature_set == "cls" else 4 < lengths.median() < 9


def test_avdiff_layout_roundtrip(synth_root, cache_dir):
    root = synth_root("avdiff", shots=5)
    bench = load_benchmark("avdiff", root, "UCF", shots=5, cache_dir=cache_dir)
    proto = bench.protocol()
    want = expected_counts("UCF", "cls_split", 0.03, {"stage_1_val_unseen": 6, "stage_2_test_unseen": 6})
    assert proto.task == "gfsl" and proto.shots == 5
    assert len(proto.stage1_novel.indices) == 12 * 5
    assert len(proto.stage1_val.indices) == want["stage_1_val_seen"] + want["stage_1_val_unseen"] - 60
    assert (
        len(proto.stage2_train.indices) == want["stage_1_train"] + want["stage_1_val_seen"] + want["stage_1_val_unseen"]
    )
    assert [len(s.indices) for s in proto.stage2_novel] == [30, 30, 30]
    test_n = want["stage_2_test_seen"] + want["stage_2_test_unseen"] - 30
    assert [len(s.indices) for s in proto.stage2_test] == [test_n] * 3
    # the three repeats use different shots
    shots = [set(bench.store.video_ids[s.indices]) for s in proto.stage2_novel]
    assert shots[0] != shots[1] and shots[1] != shots[2]
    # shots never appear in their own repeat's test set
    for novel, test in zip(proto.stage2_novel, proto.stage2_test, strict=True):
        assert not set(bench.store.video_ids[novel.indices]) & set(bench.store.video_ids[test.indices])


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("layout", ["avca-cls", "tcaf-cls", "clipclap"])
def test_same_seed_same_bytes(layout, tmp_path):
    from avlowshot.data.synth import write_synthetic

    a = write_synthetic(layout, "UCF", tmp_path / "a", scale=0.02, seed=3)
    b = write_synthetic(layout, "UCF", tmp_path / "b", scale=0.02, seed=3)
    c = write_synthetic(layout, "UCF", tmp_path / "c", scale=0.02, seed=4)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)


def test_audio_and_video_matched_by_video_id(synth_root, tmp_path, cache_dir):
    root = tmp_path / "UCF"
    shutil.copytree(synth_root("tcaf-main"), root)
    vfile = next((root / "features/main_features_non_averaged/video/stage_1_train").glob("*.pkl"))
    afile = vfile.parents[2] / "audio" / "stage_1_train" / vfile.name
    with open(vfile, "rb") as fh:
        obj = pickle.load(fh)
    before = {bytes(n).decode(): f for n, f in zip(obj["video_names"], obj["features"], strict=True)}
    for key in ("features", "video_names", "fps"):  # reverse the video file's order only
        obj[key] = obj[key][::-1]
    with open(vfile, "wb") as fh:
        pickle.dump(obj, fh)
    store = load_benchmark("tcaf-main", root, "UCF", cache_dir=cache_dir).store
    with open(afile, "rb") as fh:
        first_id = bytes(pickle.load(fh)["video_names"][0]).decode()
    i = int(np.flatnonzero(store.video_ids == first_id)[0])
    rows = store.video.data[store.video.offsets[i] : store.video.offsets[i + 1]].numpy()
    np.testing.assert_array_equal(rows, before[first_id])


def test_cache_reopens_fast_and_rebuilds_when_stale(synth_root, tmp_path, cache_dir):
    root = tmp_path / "UCF"
    shutil.copytree(synth_root("tcaf-cls"), root)
    load_benchmark("tcaf-cls", root, "UCF", cache_dir=cache_dir)
    (first,) = [d for d in cache_dir.iterdir()]
    stamp = (first / "meta.json").stat().st_mtime_ns
    t = time.perf_counter()
    bench = load_benchmark("tcaf-cls", root, "UCF", cache_dir=cache_dir)
    assert time.perf_counter() - t < 1.0
    assert (first / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert isinstance(bench.store.video.data.numpy(), np.memmap) or bench.store.video.data.numpy().base is not None
    # change one input file: the old cache is never loaded again, and is cleaned up
    some = next((root / "features/cls_features_non_averaged/audio/stage_1_train").glob("*.pkl"))
    with open(some, "rb") as fh:
        obj = pickle.load(fh)
    obj["features"][0] = np.zeros_like(obj["features"][0])
    with open(some, "wb") as fh:
        pickle.dump(obj, fh)
    bench = load_benchmark("tcaf-cls", root, "UCF", cache_dir=cache_dir)
    (second,) = [d for d in cache_dir.iterdir()]
    assert second.name != first.name
    i = int(np.flatnonzero(bench.store.video_ids == bytes(obj["video_names"][0]).decode())[0])
    assert bench.store.audio.data[bench.store.audio.offsets[i]].sum() == 0
    # one flag rebuilds
    load_benchmark("tcaf-cls", root, "UCF", cache_dir=cache_dir, rebuild_cache=True)
    assert (second / "meta.json").stat().st_mtime_ns != (first.exists() or stamp)


def test_dataset_root_is_never_written(synth_root, cache_dir):
    root = synth_root("avca-cls")
    before = _tree_digest(root)
    load_benchmark("avca-cls", root, "UCF", cache_dir=cache_dir)
    assert _tree_digest(root) == before


def test_gather_pads_and_masks(synth_root, cache_dir):
    store = load_benchmark("tcaf-cls", synth_root("tcaf-cls"), "UCF", cache_dir=cache_dir).store
    idx = np.array([0, 5, 9])
    batch = gather(store, idx)
    lengths = store.video.lengths()[idx]
    assert batch.video.shape == (3, int(lengths.max()), 4096) and batch.video.dtype == torch.float32
    assert batch.video_mask.sum(1).tolist() == lengths.tolist()
    assert batch.audio.dtype == torch.float32 and batch.audio.max() <= 255
    k = int(lengths[0])
    off = int(store.video.offsets[0])
    torch.testing.assert_close(batch.video[0, :k], store.video.data[off : off + k].float())
    assert (batch.video[0, k:] == 0).all()
    torch.testing.assert_close(batch.video_time[0, :3], torch.tensor([0.0, 0.64, 1.28]))


def test_class_balanced_sampler():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    sampler = ClassBalancedSampler(labels, np.arange(100), batch_size=300, n_batches=20)
    epoch = sampler.epoch(torch.Generator().manual_seed(0))
    assert epoch.shape == (20, 300)
    frac = np.bincount(labels[epoch.numpy().ravel()], minlength=3) / epoch.numel()
    assert np.allclose(frac, 1 / 3, atol=0.02)  # classes drawn uniformly, not by size
    neg = sampler.negatives(torch.as_tensor(labels[epoch[0].numpy()]), torch.Generator().manual_seed(1))
    assert (torch.as_tensor(labels)[neg] != torch.as_tensor(labels)[epoch[0]]).all()
    again = sampler.epoch(torch.Generator().manual_seed(0))
    assert torch.equal(epoch, again)
