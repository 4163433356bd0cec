"""Every bad input fails early, names the file, the key and the fix, exits 2 from the CLI, and writes nothing."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.benchmark import load_benchmark
from avlowshot.data.check import check_root
from avlowshot.data.safe_pickle import load_npy_dict, load_pickle, save_npy_dict
from avlowshot.errors import DataError

runner = CliRunner()
TCAF = "features/cls_features_non_averaged"
RUN = ["run", "--method", "tcaf", "--layout", "tcaf-cls", "--dataset", "UCF", "--quiet"]


def _copy(synth_root, tmp_path, layout="tcaf-cls", **kw) -> Path:
    root = tmp_path / "UCF"
    shutil.copytree(synth_root(layout, **kw), root)
    return root


def _first(root: Path, sub: str) -> Path:
    return sorted((root / sub).glob("*.*"))[0]


def _rewrite(path: Path, edit) -> None:
    with open(path, "rb") as fh:
        obj = pickle.load(fh)
    edit(obj)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


def _missing_folder(root):
    shutil.rmtree(root / TCAF / "video/stage_1_val_unseen")
    return "stage_1_val_unseen", "missing split folder"


def _missing_class_file(root):
    f = _first(root, f"{TCAF}/video/stage_2_test_seen")
    f.unlink()
    return f.stem, "has a audio file but no video file"


def _truncated_pickle(root):
    f = _first(root, f"{TCAF}/audio/stage_1_train")
    f.write_bytes(f.read_bytes()[:100])
    return f.name, "truncated or corrupt pickle"


def _wrong_dims(root):
    f = _first(root, f"{TCAF}/video/stage_1_train")
    _rewrite(f, lambda o: o.__setitem__("features", [x[:, :512] for x in o["features"]]))
    return f.name, "expected [T, 4096]"


def _wrong_dtype(root):
    f = _first(root, f"{TCAF}/audio/stage_1_train")
    _rewrite(f, lambda o: o.__setitem__("features", [x.astype(np.int64) for x in o["features"]]))
    return f.name, "dtype int64, expected uint8"


def _different_ids(root):
    f = _first(root, f"{TCAF}/video/stage_1_val_seen")

    def edit(o):
        o["video_names"][0] = b"someone_else"

    _rewrite(f, edit)
    return f.name, "audio and video list different videos"


def _nan(root):
    f = _first(root, f"{TCAF}/video/stage_2_test_unseen")

    def edit(o):
        o["features"][0][0, 3] = np.nan

    _rewrite(f, edit)
    return f.name, "NaN or Inf"


def _empty_class(root):
    for m in ("audio", "video"):
        f = _first(root, f"{TCAF}/{m}/stage_1_train")
        _rewrite(f, lambda o: [o.__setitem__(k, []) for k in ("features", "video_names", "fps")])
    return f.name, "empty class"


def _class_without_embedding(root):
    path = root / TCAF / "text/word_embeddings_ucf_normed.npy"
    table = load_npy_dict(path)
    table.pop("class 007")
    save_npy_dict(path, table)
    return "class 007", "has no text embedding"


def _unknown_class_file(root):
    for m in ("audio", "video"):
        f = _first(root, f"{TCAF}/{m}/stage_1_train")
        f.rename(f.with_name("NotAClass.pkl"))
    return "NotAClass", "is not in all_class.txt"


def _corrupt_npy(root):
    (root / TCAF / "text/word_embeddings_ucf_normed.npy").write_bytes(b"\x93NUMPY garbage")
    return "word_embeddings_ucf_normed.npy", "not a valid .npy"


def _lists_overlap(root):
    split = root / "class-split/cls_split"
    name = (split / "stage_1_train.txt").read_text().split()[0]
    with open(split / "stage_1_val_unseen.txt", "a") as fh:
        fh.write(f"{name}\n")
    return "stage_1_val_unseen.txt", f"class '{name}' is listed in both stage_1_train.txt and stage_1_val_unseen.txt"


def _duplicated_class(root):
    path = root / "class-split/all_class.txt"
    name = path.read_text().split()[5]
    path.write_text(path.read_text() + f"{name}\n")
    return "all_class.txt", f"class '{name}' is listed twice"


def _non_utf8_video_id(root):
    f = _first(root, f"{TCAF}/audio/stage_1_val_seen")
    _rewrite(f, lambda o: o["video_names"].__setitem__(1, b"v_\xff\xfe"))
    return f.name, "is not UTF-8 text"


def _video_names_not_strings(root):
    f = _first(root, f"{TCAF}/video/stage_1_train")
    _rewrite(f, lambda o: o.__setitem__("video_names", list(range(len(o["video_names"])))))
    return f.name, "video id is a int (0), expected a string or bytes"


def _features_none(root):
    f = _first(root, f"{TCAF}/audio/stage_2_test_seen")
    _rewrite(f, lambda o: o.__setitem__("features", None))
    return f.name, "'features' is a NoneType, expected a list of numpy arrays"


def _features_not_arrays(root):
    f = _first(root, f"{TCAF}/video/stage_2_test_seen")
    _rewrite(f, lambda o: o.__setitem__("features", [x.tolist() for x in o["features"]]))
    return f.name, "features[0] is a list, not a numpy array"


def _beyond_float32(root):
    f = _first(root, f"{TCAF}/video/stage_1_val_unseen")

    def edit(o):
        x = o["features"][0].astype(np.float64)
        x[0, 7] = 1e39  # finite as float64, inf as float32
        o["features"][0] = x

    _rewrite(f, edit)
    return f.name, "finite as float64 but beyond the float32 range"


def _dangling_symlink(root):
    f = _first(root, f"{TCAF}/audio/stage_1_train")
    f.unlink()
    f.symlink_to(f.with_name("moved_away.pkl"))
    return f.name, "dangling symlink"


def _symlink_loop(root):
    f = _first(root, f"{TCAF}/video/stage_2_test_unseen")
    f.unlink()
    f.symlink_to(f.name)
    return f.name, "symlink loop"


CASES = [
    _missing_folder,
    _missing_class_file,
    _truncated_pickle,
    _wrong_dims,
    _wrong_dtype,
    _different_ids,
    _nan,
    _empty_class,
    _class_without_embedding,
    _unknown_class_file,
    _corrupt_npy,
    _lists_overlap,
    _duplicated_class,
    _non_utf8_video_id,
    _video_names_not_strings,
    _features_none,
    _features_not_arrays,
    _beyond_float32,
    _dangling_symlink,
    _symlink_loop,
]


@pytest.mark.parametrize("breakage", CASES, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_library_and_cli(breakage, synth_root, tmp_path, cache_dir):
    root = _copy(synth_root, tmp_path)
    needle, message = breakage(root)
    before = _digest(root)
    with pytest.raises(DataError) as err:
        load_benchmark("tcaf-cls", root, "UCF", cache_dir=cache_dir)
    text = str(err.value)
    assert message in text and needle in text
    assert "fix:" in text or err.value.path is not None
    # nothing half-written: no cache folder, no temp folder, dataset untouched
    assert not cache_dir.exists() or not any(cache_dir.iterdir())
    assert _digest(root) == before
    result = runner.invoke(app, ["check-data", "--layout", "tcaf-cls", "--root-dir", str(root), "--dataset", "UCF"])
    assert result.exit_code == 2, result.output
    assert message in result.output and needle in result.output
    assert _digest(root) == before
    # run refuses the same root before it creates a run directory or a cache
    logs = tmp_path / "runs"
    result = runner.invoke(app, [*RUN, "--root-dir", str(root), "--log-dir", str(logs), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2, result.output
    assert message in result.output and needle in result.output
    assert not logs.exists() and (not cache_dir.exists() or not any(cache_dir.iterdir()))
    assert _digest(root) == before


def test_corrupt_h5(synth_root, tmp_path, cache_dir):
    root = _copy(synth_root, tmp_path, layout="avca-cls")
    f = _first(root, "features/cls_features/audio/stage_1_train")
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(DataError, match="corrupt HDF5"):
        load_benchmark("avca-cls", root, "UCF", cache_dir=cache_dir)
    shutil.copy(synth_root("avca-cls") / f.relative_to(root), f)  # restore, break another file
    g = _first(root, "features/cls_features/video/stage_1_val_seen")
    with h5py.File(g, "a") as fh:
        del fh["video_urls"]
    with pytest.raises(DataError, match="missing dataset 'video_urls'"):
        check_root("avca-cls", root, "UCF")


def test_shot_count_larger_than_available(synth_root):
    root = synth_root("tcaf-cls")  # 2-5 videos per novel class at this scale
    with pytest.raises(DataError, match="20 shots need at least 21") as err:
        check_root("tcaf-cls", root, "UCF", shots=20)
    assert "--shots" in str(err.value)
    result = runner.invoke(
        app, ["check-data", "--layout", "tcaf-cls", "--root-dir", str(root), "--dataset", "UCF", "--shots", "20"]
    )
    assert result.exit_code == 2 and "shots need at least" in result.output


def test_avdiff_shot_folder_with_wrong_count(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path, layout="avdiff", shots=1)
    for m in ("audio", "video"):
        src = _first(root, f"features/1-shot/{m}/stage_1_val_novel")
        dst = root / f"features/1-shot/{m}/stage_1_train_novel" / src.name
        shutil.copy(src, dst)
    with pytest.raises(DataError, match="expected 1 shots"):
        check_root("avdiff", root, "UCF", shots=1)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_crafted_pickle_is_refused_and_never_runs(synth_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _copy(synth_root, tmp_path)
    f = _first(root, f"{TCAF}/audio/stage_1_train")
    f.write_bytes(pickle.dumps({"features": [_Exploit()], "video_names": [b"x"], "fps": [25]}))
    with pytest.raises(DataError, match="refused to unpickle.*posix.system|refused to unpickle.*os.system"):
        load_pickle(f)
    result = runner.invoke(app, ["check-data", "--layout", "tcaf-cls", "--root-dir", str(root), "--dataset", "UCF"])
    assert result.exit_code == 2 and "refused to unpickle" in result.output
    assert not (tmp_path / "PWNED").exists()


def test_crafted_npy_is_refused(tmp_path):
    arr = np.empty((), dtype=object)
    arr[()] = {"a": _Exploit()}
    path = tmp_path / "evil.npy"
    np.save(path, arr, allow_pickle=True)
    with pytest.raises(DataError, match="refused to unpickle"):
        load_npy_dict(path)
    assert not (tmp_path / "PWNED").exists()


def test_real_embedding_files_load(tmp_path):
    shared = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
    if not shared.exists():
        pytest.skip("../shared/benchmarks not present")
    for ds, tag, n in (("UCF", "ucf", 101), ("ActivityNet", "activity", 200), ("VGGSound", "vggsound", 309)):
        table = load_npy_dict(shared / ds / "text" / f"word_embeddings_{tag}_normed.npy")
        assert len(table) == n
        assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in table.values())


def test_unknown_layout_and_dataset(synth_root):
    root = synth_root("tcaf-cls")
    r = runner.invoke(app, ["check-data", "--layout", "nope", "--root-dir", str(root), "--dataset", "UCF"])
    assert r.exit_code == 2 and "unknown layout 'nope'" in r.output
    r = runner.invoke(app, ["check-data", "--layout", "tcaf-cls", "--root-dir", str(root), "--dataset", "bad name!"])
    assert r.exit_code == 2 and "unknown dataset 'bad name!'" in r.output
    # a dataset of one's own is allowed; a UCF root has no name map for it
    r = runner.invoke(app, ["check-data", "--layout", "tcaf-cls", "--root-dir", str(root), "--dataset", "Kinetics"])
    assert r.exit_code == 2 and "kinetics_w2v_class_names.csv: class-name map not found" in r.output


def _check_and_run(root: Path, tmp_path: Path, layout: str, method: str):
    args = ["--layout", layout, "--root-dir", str(root), "--dataset", "UCF"]
    checked = runner.invoke(app, ["check-data", *args])
    run = ["run", "--method", method, *args, "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c")]
    ran = runner.invoke(app, [*run, "--quiet", "--set", "epochs=1", "--set", "n_batches=1"])
    return checked, ran


def test_split_class_without_feature_files(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path)
    name = (root / "class-split/cls_split/stage_1_train.txt").read_text().split()[0]
    for m in ("audio", "video"):
        (root / TCAF / m / "stage_1_train" / f"{name}.pkl").unlink()
    before = _digest(root)
    for res in _check_and_run(root, tmp_path, "tcaf-cls", "tcaf"):
        assert res.exit_code == 2, res.output
        assert "stage_1_train.txt" in res.output and "have no feature files in the folder(s)" in res.output
        assert name in res.output and "[" + name + "]" in res.output  # the key survives the console's markup
    assert not (tmp_path / "runs").exists()
    assert _digest(root) == before


def test_h5_with_absurd_declared_shape_is_refused_from_the_header(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path, layout="avca-cls")
    f = _first(root, "features/cls_features/video/stage_1_train")
    f.unlink()
    with h5py.File(f, "w") as fh:  # 2^31 x 4096 float32 declared (32 TiB), nothing written: a 2 KiB file
        fh.create_dataset("data", shape=(2**31, 4096), dtype="float32")
        fh.create_dataset("video_urls", data=np.array([b"v_1"]))
    assert f.stat().st_size < 10_000
    before = _digest(root)
    for res in _check_and_run(root, tmp_path, "avca-cls", "avca"):
        assert res.exit_code == 2, res.output
        assert f.name in res.output and "declares shape (2147483648, 4096) float32 (32.0 TiB)" in res.output
        assert "stores only 0 bytes" in res.output
    assert _digest(root) == before


def test_crlf_and_spaces_in_class_lists_read_and_reported(synth_root, tmp_path, cache_dir):
    clean = synth_root("tcaf-cls")
    root = _copy(synth_root, tmp_path)
    for path in (root / "class-split/all_class.txt", root / "class-split/cls_split/stage_1_train.txt"):
        lines = path.read_text().splitlines()
        path.write_bytes("".join(f"{x}  \r\n" for x in lines).encode())
    res = runner.invoke(app, ["check-data", "--layout", "tcaf-cls", "--root-dir", str(root), "--dataset", "UCF"])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "all_class.txt: CRLF line ends, read as plain line ends" in flat
    assert "all_class.txt: spaces around 101 class name(s) stripped" in flat
    assert "stage_1_train.txt: spaces around 30 class name(s) stripped" in flat
    a, b = check_root("tcaf-cls", clean, "UCF"), check_root("tcaf-cls", root, "UCF")
    assert a.protocol.describe() == b.protocol.describe() and a.notes == []


def test_audio_and_video_in_another_order_are_paired_by_id(synth_root, tmp_path, cache_dir):
    clean = synth_root("tcaf-cls")
    root = _copy(synth_root, tmp_path)
    f = _first(root, f"{TCAF}/video/stage_1_train")

    def reverse(o):
        for k in ("features", "video_names", "fps"):
            o[k] = o[k][::-1]

    _rewrite(f, reverse)
    res = runner.invoke(app, ["check-data", "--layout", "tcaf-cls", "--root-dir", str(root), "--dataset", "UCF"])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "1 video file(s) list the same videos as their audio file in another order" in flat
    assert "paired by video id" in flat and f.name in flat
    a = load_benchmark("tcaf-cls", clean, "UCF", cache_dir=cache_dir / "a").store
    b = load_benchmark("tcaf-cls", root, "UCF", cache_dir=cache_dir / "b").store
    assert list(a.video_ids) == list(b.video_ids)
    assert torch.equal(a.video.data, b.video.data) and torch.equal(a.video.offsets, b.video.offsets)


def test_h5_float64_beyond_float32(synth_root, tmp_path):
    root = _copy(synth_root, tmp_path, layout="avca-cls")
    f = _first(root, "features/cls_features/audio/stage_2_test_seen")
    with h5py.File(f, "a") as fh:
        data = fh["data"][()].astype(np.float64)
        data[-1, 5] = -1e39
        del fh["data"]
        fh.create_dataset("data", data=data)
    before = _digest(root)
    for res in _check_and_run(root, tmp_path, "avca-cls", "avca"):
        assert res.exit_code == 2, res.output
        assert f"{f} [features]: audio features hold 1e+39 (row {len(data) - 1}), finite as float64" in res.output
    assert _digest(root) == before
