"""text-match: the zero-training CLIP / CLAP cosine baseline, through the shared protocol with zero-epoch stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.benchmark import load_benchmark
from avlowshot.eval import metrics
from avlowshot.models import InputDims, build_method, count_parameters
from avlowshot.train.config import load_config

runner = CliRunner()


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_scores(audio, video, text, modality: str) -> np.ndarray:
    """Scaled cosines of CLIP video / CLIP text (text[:, :512]) and CLAP audio / CLAP text (text[:, 512:])."""
    s_v = 100.0 * _unit(video) @ _unit(text[:, :512]).T
    s_a = 100.0 * _unit(audio) @ _unit(text[:, 512:]).T
    return {"video": s_v, "audio": s_a, "fused": 0.5 * s_v + 0.5 * s_a}[modality]


@pytest.mark.parametrize("modality", ["fused", "video", "audio"])
def test_text_match_result_equals_numpy_cosines_and_the_shared_metric(synth_root, tmp_path, one_thread, modality):
    root = synth_root("clipclap", "UCF", scale=0.05)
    args = ["run", "--method", "text-match", "--layout", "clipclap", "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet",
            "--set", f"modality={modality}"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "text-match_UCF_clipclap_seed42"
    rec = json.loads((run_dir / "result.json").read_text())
    assert rec["n_params_total"] == 0 and rec["best_epoch"] is None and rec["stage2_epochs"] == 0
    assert json.loads((run_dir / "stage-1" / "summary.json").read_text())["epochs"] == 0

    bench = load_benchmark("clipclap", root, "UCF", cache_dir=tmp_path / "cache")
    store, proto = bench.store, bench.protocol()
    text = store.classes.embeddings("by-name").numpy()
    audio, video, labels = store.audio.data.numpy(), store.video.data.numpy(), store.labels.numpy()

    def evaluate(split, **kw):
        cols = split.classes
        scores = _numpy_scores(audio[split.indices], video[split.indices], text[cols], modality)
        return metrics.evaluate(
            scores.astype(np.float32), labels[split.indices], cols, split.seen, split.unseen, len(text),
            kind="probability", **kw,
        )  # fmt: skip

    val = evaluate(proto.stage1_val, betas="clipclap")
    test = evaluate(proto.stage2_test[0], beta=val.beta)
    assert rec["beta"] == pytest.approx(val.beta)
    for k in ("seen", "unseen", "hm", "zsl"):
        assert rec["metrics"][k] == pytest.approx(100 * getattr(test, k), abs=1e-4), k
        assert rec["val"][k] == pytest.approx(100 * getattr(val, k), abs=1e-4), k


def test_text_match_fusion_rules_and_the_score_direction():
    torch.manual_seed(0)
    cfg = load_config(None, method="text-match", dataset="UCF", feature_set="clipclap").model
    m = build_method("text-match", cfg, InputDims(1024, 512, 1536))
    assert count_parameters(m) == 0 and m.score_kind == "probability"
    a, v, t = torch.rand(5, 1024), torch.rand(5, 512), torch.randn(3, 1536)
    from avlowshot.data.batching import Batch

    batch = Batch(audio=a, video=v, labels=torch.zeros(5, dtype=torch.int64))
    s = m.scores(m.encode_samples(batch), m.encode_classes(t)).numpy()
    np.testing.assert_allclose(s, _numpy_scores(a.numpy(), v.numpy(), t.numpy(), "fused"), rtol=1e-5, atol=1e-4)
    soft = build_method(
        "text-match", {**cfg, "fusion": "softmax-mean", "video_weight": 0.25}, InputDims(1024, 512, 1536)
    )
    p = soft.scores(soft.encode_samples(batch), soft.encode_classes(t)).numpy()
    sv, sa = (
        _numpy_scores(a.numpy(), v.numpy(), t.numpy(), "video"),
        _numpy_scores(a.numpy(), v.numpy(), t.numpy(), "audio"),
    )

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    np.testing.assert_allclose(p, 0.25 * softmax(sv) + 0.75 * softmax(sa), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)


def test_text_match_refuses_training_epochs_and_other_layouts(synth_root, tmp_path, one_thread):
    root = synth_root("clipclap", "UCF", scale=0.05)
    base = ["run", "--method", "text-match", "--dataset", "UCF", "--root-dir", str(root), "--log-dir",
            str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    res = runner.invoke(app, [*base, "--layout", "clipclap", "--set", "epochs=2"])
    assert res.exit_code == 2 and "no trainable parameters" in res.output, res.output
    assert "--set epochs=2" in res.output and not (tmp_path / "runs").exists()  # refused before anything is written
    res = runner.invoke(app, [*base, "--layout", "avca-cls"])
    assert res.exit_code == 2 and "cannot read this layout" in res.output, res.output
