"""Decoding, the resumable extract pipeline, the layouts it writes, and predict: through the CLI, with generated
videos and small randomly initialised backbones saved in the documented weight formats."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.errors import DataError
from avlowshot.extract.media import decode, write_test_video
from avlowshot.extract.pipeline import list_videos, parse_shard

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = {"PlayingGuitar": (440.0, (220, 40, 40)), "horse_riding": (880.0, (40, 220, 40)),
           "Typing": (1320.0, (40, 40, 220)), "Bowling": (1760.0, (220, 220, 40))}  # fmt: skip
PER_CLASS = 4


def test_decode_resamples_frames_and_audio(tmp_path):
    path = write_test_video(tmp_path / "a.mp4", seconds=2.0, fps=30, tone_hz=1000.0)
    d = decode(path, fps=25, audio_rate=16000, frame_size=(171, 128))
    assert d.frames.shape == (50, 128, 171, 3) and d.frames.dtype == np.uint8 and d.fps == 25
    assert d.audio.dtype == np.float32 and abs(len(d.audio) - 32000) < 2100  # AAC adds a priming frame
    spectrum = np.abs(np.fft.rfft(d.audio[4000:20000]))
    assert np.fft.rfftfreq(16000, 1 / 16000)[spectrum.argmax()] == pytest.approx(1000, abs=2)
    # the square moves left to right: its centre column grows over time
    red = d.frames[..., 0].astype(int) - d.frames[..., 2].astype(int)
    centres = [np.nonzero(red[i].max(axis=0) > 80)[0].mean() for i in (0, 25, 49)]
    assert centres[0] < centres[1] < centres[2]
    mid = decode(path, fps=None, audio_rate=48000, frame_pick="middle")
    assert mid.frames.shape == (1, 120, 160, 3) and mid.fps == pytest.approx(30, abs=0.1)
    assert abs(len(mid.audio) - 96000) < 6200


def test_decode_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    with pytest.raises(DataError, match="broken.mp4.*cannot decode"):
        decode(bad, fps=25, audio_rate=16000)
    silent = write_test_video(tmp_path / "silent.mp4", seconds=1.0, with_audio=False)
    with pytest.raises(DataError, match="no audio stream"):
        decode(silent, fps=25, audio_rate=16000)


def test_video_lists_and_shards(tmp_path):
    for c in ("b", "a"):
        for v in ("x", "y", "z"):
            write_test_video(tmp_path / "vids" / c / f"{c}{v}.avi", seconds=0.4)
    items = list_videos(tmp_path / "vids")
    assert [(i.class_name, i.video_id) for i in items][:2] == [("a", "ax"), ("a", "ay")] and len(items) == 6
    (tmp_path / "list.csv").write_text("path,class\nvids/a/ax.avi,first\nvids/b/bx.avi,second\n")
    listed = list_videos(tmp_path / "list.csv")
    assert [(i.class_name, i.video_id, i.path.is_file()) for i in listed] == [
        ("first", "ax", True),
        ("second", "bx", True),
    ]
    shutil.copy(tmp_path / "vids" / "a" / "ax.avi", tmp_path / "vids" / "b" / "ax.avi")
    with pytest.raises(DataError, match="'ax' appears twice"):
        list_videos(tmp_path / "vids")
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "x/2", "1/0"):
        with pytest.raises(DataError, match="is not i/N"):
            parse_shard(bad)


def _weights(folder):
    """Small C3D / VGGish in the documented files (c3d.pickle, pytorch_vggish.pth, vggish_pca_params.npz)."""
    from avlowshot.extract.c3d import C3D
    from avlowshot.extract.vggish import VGGish

    folder.mkdir()
    torch.manual_seed(0)
    torch.save(C3D(width=4).state_dict(), folder / "c3d.pickle")
    torch.save(VGGish(width=4).state_dict(), folder / "pytorch_vggish.pth")
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((128, 128)))
    np.savez(folder / "vggish_pca_params.npz", pca_eigen_vectors=q * 8.0, pca_means=np.zeros((128, 1)))
    return folder


def _videos(folder):
    for c, (tone, colour) in CLASSES.items():
        for k in range(PER_CLASS):
            write_test_video(folder / c / f"{c[:3]}{k}.mp4", seconds=1.3 + 0.2 * k, size=(96, 72),
                             tone_hz=tone * (1 + 0.05 * k), colour=colour)  # fmt: skip
    (folder / "Typing" / "broken.mp4").write_bytes(b"\x00" * 2048)


def _extract(vids, out, weights, *extra):
    args = ["extract", "--features", "cls", "--videos", str(vids), "--out", str(out), "--weights", str(weights)]
    return runner.invoke(app, args + list(extra))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    base = tmp_path_factory.mktemp("extract")
    weights, vids, out = _weights(base / "weights"), base / "videos", base / "MyActions"
    _videos(vids)
    first = _extract(vids, out, weights, "--shard", "0/2")
    assert first.exit_code == 0, first.output
    assert "shard 0/2: 9 videos" in first.output and "without --shard" in first.output
    assert not (out / "features").exists()  # a shard alone does not assemble
    res = _extract(vids, out, weights)
    return base, weights, vids, out, first, res


def test_extract_is_resumable_logs_failures_and_writes_the_layouts(extracted):
    base, weights, vids, out, first, res = extracted
    assert res.exit_code == 0, res.output
    # the second run did only the other shard; the broken file is logged and left out, the rest go on
    assert "16 extracted" not in res.output and "already done" in res.output
    failed = [json.loads(x) for x in (out / "extracted" / "cls" / "failed-0of1.jsonl").read_text().splitlines()]
    assert [f["video_id"] for f in failed] == ["broken"] and "cannot decode" in failed[0]["error"]
    said = " ".join(res.output.split())  # rich wraps long paths at the console width
    assert "wrote tcaf-cls, avca-cls" in said and "1 failed videos left out" in said
    z = np.load(out / "extracted" / "cls" / "videos" / "Pla2.npz")
    # 1.7 s: ceil(42.5 frames / 16) = 3 C3D rows of 0.64 s, floor(1.7 / 0.96) = 1 VGGish row
    assert z["video"].shape == (3, 256) and z["video"].dtype == np.float32
    assert z["audio"].shape == (1, 128) and z["audio"].dtype == np.uint8 and str(z["class_name"]) == "PlayingGuitar"
    again = _extract(vids, out, weights)
    assert again.exit_code == 0 and "0 extracted" in again.output and "16 already done" in again.output
    for layout in ("tcaf-cls", "avca-cls"):
        chk = runner.invoke(app, ["check-data", "--layout", layout, "--root-dir", str(out), "--dataset", "MyActions"])
        assert chk.exit_code == 0, chk.output
        assert "every check passed" in chk.output
    names = (out / "class-split" / "myactions_w2v_class_names.csv").read_text().splitlines()
    assert "PlayingGuitar,Playing Guitar" in names and "horse_riding,horse riding" in names
    sidecar = json.loads(
        (out / "features/cls_features/text/word_embeddings_myactions_normed.npy.encoder.json").read_text()
    )
    assert sidecar["encoder"] == "minilm" and sidecar["dim"] == 384


def test_extract_refuses_other_settings_and_missing_weights(extracted, tmp_path):
    base, weights, vids, out, *_ = extracted
    res = _extract(vids, out, weights, "--compat", "official")
    assert res.exit_code == 2 and "extracted with other settings (compat differ)" in res.output
    empty = tmp_path / "noweights"
    empty.mkdir()
    res = _extract(vids, tmp_path / "x", empty)
    assert res.exit_code == 2 and "c3d.pickle" in res.output


def test_run_and_predict_on_extracted_features(extracted):
    base, weights, vids, out, *_ = extracted
    log = base / "runs"
    args = ["run", "--method", "avca", "--layout", "avca-cls", "--dataset", "MyActions", "--root-dir", str(out),
            "--log-dir", str(log), "--cache-dir", str(base / "cache"), "--quiet",
            "--set", "epochs=2", "--set", "n_batches=3", "--set", "batch_size=4"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    run_dir = next(log.iterdir())
    feats = out / "extracted" / "cls" / "videos" / "Pla0.npz"
    names = "Playing Guitar, Typing, strumming a ukulele"
    res = runner.invoke(app, ["predict", "--run-dir", str(run_dir), "--features", str(feats), "--classes", names])
    assert res.exit_code == 0, res.output
    for name in ("Playing Guitar", "Typing", "strumming a ukulele"):
        assert name in res.output
    assert "new" in res.output and ("seen" in res.output or "unseen" in res.output)
    # features of another extraction (other compat) or of other dims are refused
    other = base / "other" / "extracted" / "cls"
    (other / "videos").mkdir(parents=True)
    meta = json.loads((out / "extracted" / "cls" / "extractor.json").read_text())
    (other / "extractor.json").write_text(json.dumps({**meta, "compat": "official"}))
    shutil.copy(feats, other / "videos" / "Pla0.npz")
    ask = ["predict", "--run-dir", str(run_dir), "--classes", "Typing"]
    res = runner.invoke(app, ask + ["--features", str(other / "videos" / "Pla0.npz")])
    assert res.exit_code == 2 and "compat differ" in res.output
    z = np.load(feats)
    np.savez(base / "narrow.npz", audio=z["audio"], video=z["video"][:, :100], class_name=z["class_name"])
    res = runner.invoke(app, ask + ["--features", str(base / "narrow.npz")])
    assert res.exit_code == 2 and "video features are 100-d but the run was trained on 256-d" in res.output
    res = runner.invoke(app, ["predict", "--run-dir", str(run_dir), "--video", str(vids / "Bowling" / "Bow1.mp4"),
                              "--weights", str(weights), "--classes", "bowling, typing", "--top", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output


def test_clipclap_extraction_trains_and_predicts(tmp_path):
    from hf_tiny import CLAP_DIM, CLIP_DIM, make_tiny_weights

    weights, vids, out = make_tiny_weights(tmp_path / "w"), tmp_path / "videos", tmp_path / "MyClips"
    for c, (tone, colour) in CLASSES.items():
        for k in range(3):
            write_test_video(vids / c / f"{c[:3]}{k}.mp4", seconds=1.0, size=(64, 48), tone_hz=tone, colour=colour)
    res = runner.invoke(app, ["extract", "--features", "clipclap", "--videos", str(vids), "--out", str(out),
                              "--weights", str(weights), "--workers", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "12 extracted" in res.output and "wrote clipclap" in res.output
    meta = json.loads((out / "features/cls_features_non_averaged/extractor.json").read_text())
    assert meta["audio"] == {"dim": CLAP_DIM, "dtype": "float32"} and meta["video"] == {
        "dim": CLIP_DIM,
        "dtype": "float16",
    }
    chk = runner.invoke(app, ["check-data", "--layout", "clipclap", "--root-dir", str(out), "--dataset", "MyClips"])
    assert chk.exit_code == 0, chk.output
    log = tmp_path / "runs"
    res = runner.invoke(app, ["run", "--method", "clipclap", "--layout", "clipclap", "--dataset", "MyClips",
                              "--root-dir", str(out), "--log-dir", str(log), "--cache-dir", str(tmp_path / "cache"),
                              "--quiet", "--set", "epochs=1", "--set", "n_batches=2",
                              "--set", "batch_size=4"])  # fmt: skip
    assert res.exit_code == 0, res.output
    run_dir = next(log.iterdir())
    ask = ["predict", "--run-dir", str(run_dir), "--features", str(out / "extracted/clipclap/videos/Typ0.npz"),
           "--classes", "Typing, knitting a scarf"]  # fmt: skip
    res = runner.invoke(app, ask)
    assert res.exit_code == 2 and "--text-weights" in res.output  # CLIP/CLAP text needs its weights folder
    res = runner.invoke(app, ask + ["--text-weights", str(weights)])
    assert res.exit_code == 0, res.output
    assert "knitting a scarf" in res.output and "new" in res.output
    # another encoder than the one the run was trained with is refused
    res = runner.invoke(app, ask + ["--text-encoder", "minilm"])
    assert res.exit_code == 2 and "384-d vectors" in res.output


def test_embed_classes_writes_the_layout_text_files(tmp_path):
    from avlowshot.data.safe_pickle import load_npy_dict
    from hf_tiny import CLAP_DIM, CLIP_DIM, make_tiny_weights

    names = tmp_path / "classes.txt"
    names.write_text("playing guitar\nplaying violin\nhorse riding\n")
    out = tmp_path / "text" / "word_embeddings_mine_normed.npy"
    res = runner.invoke(app, ["embed-classes", "--classes", str(names), "--out", str(out)])
    assert res.exit_code == 0 and "3 classes x 384 (minilm)" in res.output, res.output
    vec = load_npy_dict(out)  # the restricted reader of the authors' format
    assert list(vec) == ["playing guitar", "playing violin", "horse riding"]
    cos = lambda a, b: float(vec[a] @ vec[b])  # noqa: E731
    assert cos("playing guitar", "playing violin") > cos("playing guitar", "horse riding")
    assert json.loads(out.with_name(out.name + ".encoder.json").read_text())["encoder"] == "minilm"
    weights = make_tiny_weights(tmp_path / "w")
    both = tmp_path / "cc" / "word_embeddings_mine_normed.npy"
    res = runner.invoke(app, ["embed-classes", "--encoder", "clip+clap", "--classes", str(names), "--out", str(both),
                              "--weights", str(weights)])  # fmt: skip
    assert res.exit_code == 0, res.output
    clip, clap = load_npy_dict(both), load_npy_dict(both.with_name("wavcaps_" + both.name))
    assert clip["horse riding"].shape == (CLIP_DIM,) and clap["horse riding"].shape == (CLAP_DIM,)
    res = runner.invoke(app, ["embed-classes", "--encoder", "w2v", "--classes", str(names), "--out", str(out)])
    assert res.exit_code == 2 and "pass --weights" in res.output  # embed-classes' option (it has no --text-weights)


def test_own_videos_minilm_pipeline_trains_tcaf_and_predicts_loose_names(extracted, tmp_path):
    """extract (MiniLM 384-d class text) -> run TCAF with no dim override -> predict with names in any case and
    spacing; re-running extract with a class outside the stored split is refused, not silently dropped."""
    base, weights, vids, out, *_ = extracted
    log = tmp_path / "runs"
    args = ["run", "--method", "tcaf", "--layout", "tcaf-cls", "--dataset", "MyActions", "--root-dir", str(out),
            "--log-dir", str(log), "--cache-dir", str(tmp_path / "cache"), "--quiet",
            "--set", "epochs=1", "--set", "n_batches=2", "--set", "batch_size=4",
            "--set", "model.transformer_heads=2", "--set", "model.transformer_dim_head=8"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    run_dir = log / "tcaf_MyActions_tcaf-cls_seed42"
    assert "transformer_dim: 384" in (run_dir / "config.yaml").read_text()  # followed the MiniLM text, not 300
    feats = out / "extracted" / "cls" / "videos" / "Typ0.npz"
    res = runner.invoke(app, ["predict", "--run-dir", str(run_dir), "--features", str(feats),
                              "--classes", "TYPING, playingguitar, Horse  Riding"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "new" not in res.output.split("class in the run")[1]  # all three matched the run's classes
    # a moved dataset root: the error's fix names predict's own --root-dir, which then finds it
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "root_dir": str(tmp_path / "moved")}))
    ask = ["predict", "--run-dir", str(run_dir), "--features", str(feats), "--classes", "typing"]
    res = runner.invoke(app, ask)
    assert res.exit_code == 2 and "--root-dir" in res.output, res.output
    assert runner.invoke(app, ask + ["--root-dir", str(out)]).exit_code == 0
    more = tmp_path / "videos"
    shutil.copytree(vids, more)
    for k in range(2):
        write_test_video(more / "Knitting" / f"Kni{k}.mp4", seconds=1.3, size=(96, 72), tone_hz=300.0)
    before = (out / "class-split" / "cls_split" / "stage_1_train.txt").read_text()
    res = _extract(more, out, weights)
    assert res.exit_code == 2 and "'Knitting'" in res.output and "in no list of the stored class split" in res.output
    assert (out / "class-split" / "cls_split" / "stage_1_train.txt").read_text() == before
    assert not (
        out / "features" / "cls_features_non_averaged" / "audio" / "stage_2_test_unseen" / "Knitting.pkl"
    ).exists()
