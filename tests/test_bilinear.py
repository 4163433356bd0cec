"""ALE, DEVISE and SJE (specs/avca.md §2.4, §3.4, §5, §6.4): parameter counts of every shipped config, the three
hinge losses on hand-made scores, dropout on input and text, the input order, Euclidean scoring against the raw class
text, and learning through the CLI on synthetic UCF (avca-cls)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch
from avlowshot.models import ALE, DEVISE, SJE, InputDims, build_method, count_parameters, registry
from avlowshot.train.config import load_config

METHODS = ("ale", "devise", "sje")
DATASETS = {"ucf": "UCF", "activitynet": "ActivityNet", "vggsound": "VGGSound"}
DIMS = {"main": InputDims(512, 512, 300), "cls": InputDims(128, 4096, 300)}
COUNTS = {"main": 307_200, "cls": 1_267_200}  # specs §2.4
DROPOUT = {"ucf": 0.2, "activitynet": 0.2, "vggsound": 0.0}  # --dropout_baselines (§6.4)


@pytest.mark.parametrize("method", METHODS)
def test_shipped_configs_match_run_scripts_and_spec_parameter_counts(method):
    names = registry.shipped_configs(method)
    assert names == sorted(f"{ds}-{fs}" for ds in DATASETS for fs in ("cls", "main"))
    for name in names:
        ds, fs = name.split("-")
        cfg = load_config(None, method=method, dataset=DATASETS[ds], feature_set=fs)
        assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.n_batches) == (50, 1e-3, 256, 500), name
        assert cfg.weight_decay == 0.0 and cfg.lr_scheduler and cfg.beta_grid == "avca", name
        assert cfg.model == {"dropout_baselines": DROPOUT[ds], "norm_inputs": fs == "cls", "margin": 0.1}, name
        model = build_method(method, cfg.model, DIMS[fs])
        assert count_parameters(model) == COUNTS[fs], name
        assert [k for k, _ in model.named_parameters()] == ["bilinear.weight"]  # the reference's name, no bias


# Hand-made scores (class text = identity, W = identity, so the scores are the inputs):
# row 0, label rank 0: costs [0, 0.1 + 0.45 - 0.5, max(0, 0.1 + 0.3 - 0.5)] = [0, 0.05, 0]
# row 1, label rank 2: costs [0.1 + 0.2 - 0.25, 0.1 + 0.9 - 0.25, 0] = [0.05, 0.75, 0]
SCORES = torch.tensor([[0.5, 0.45, 0.3], [0.2, 0.9, 0.25]])
EXPECTED = {
    "devise": (0.05 + 0.05 + 0.75) / 2,  # every violation
    "sje": (0.05 + 0.75) / 2,  # the largest violation per row
    # r = 1 -> H(1)/1 = 1; r = 2 -> H(2)/2 = 1.5/2
    "ale": (0.05 * 1 / (1 + 1e-8) + (0.05 + 0.75) * 1.5 / (2 + 1e-8)) / 2,
}


def identity_model(method: str, **cfg):
    model = build_method(method, {"dropout_baselines": 0.0, **cfg}, InputDims(audio=1, video=2, text=3))
    with torch.no_grad():
        model.bilinear.weight.copy_(torch.eye(3))
    return model


@pytest.mark.parametrize("method", METHODS)
def test_losses_are_the_spec_formulas_on_hand_made_scores(method):
    model = identity_model(method).eval()
    batch = Batch(audio=SCORES[:, 2:], video=SCORES[:, :2], labels=torch.tensor([5, 9]))  # x = [video ‖ audio]
    out = model.losses(batch, torch.eye(3)[[0, 2]], class_text=torch.eye(3), class_ids=torch.tensor([5, 7, 9]))
    torch.testing.assert_close(out["loss"], torch.tensor(EXPECTED[method]))
    # No violation at all: the loss is exactly 0.
    far = Batch(audio=torch.zeros(2, 1), video=torch.tensor([[5.0, 0.0], [0.0, 5.0]]), labels=torch.tensor([5, 7]))
    zero = model.losses(far, torch.eye(3)[:2], class_text=torch.eye(3), class_ids=torch.tensor([5, 7, 9]))
    assert zero["loss"].item() == 0.0
    with pytest.raises(ValueError, match="class_text"):
        model.losses(batch, torch.eye(3)[[0, 2]])


def test_the_three_reductions_on_random_scores():
    """Costs recomputed with Python loops from the spec (§3.4), ALE's H(r) summed term by term."""
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(7, 9, generator=g), torch.randint(0, 9, (7,), generator=g)
    want = dict.fromkeys(METHODS, 0.0)
    for i in range(7):
        y = int(labels[i])
        costs = [max(0.0, 0.1 + float(scores[i, j]) - float(scores[i, y])) for j in range(9) if j != y]
        r = sum(c > 0 for c in costs)
        want["ale"] += sum(costs) * sum(1 / m for m in range(1, r + 1)) / (r + 1e-8) / 7
        want["devise"] += sum(costs) / 7
        want["sje"] += max(costs) / 7
    batch = Batch(audio=scores[:, 5:], video=scores[:, :5], labels=labels)
    for method in METHODS:
        model = build_method(method, {"dropout_baselines": 0.0}, InputDims(audio=4, video=5, text=9)).eval()
        with torch.no_grad():
            model.bilinear.weight.copy_(torch.eye(9))
        got = model.losses(batch, torch.eye(9)[labels], class_text=torch.eye(9), class_ids=torch.arange(9))["loss"]
        torch.testing.assert_close(got, torch.tensor(want[method]), rtol=1e-5, atol=1e-6)


def test_dropout_is_applied_to_the_input_and_to_the_class_text_in_training():
    model = build_method("devise", {"dropout_baselines": 0.5}, InputDims(audio=3, video=4, text=6))
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append((tuple(x.shape), self.training))
            return x

    model.dropout = Recorder()
    batch = Batch(audio=torch.randn(5, 3), video=torch.randn(5, 4), labels=torch.tensor([0, 1, 2, 0, 1]))
    model.train().losses(batch, torch.randn(5, 6), class_text=torch.randn(3, 6), class_ids=torch.arange(3))
    assert seen == [((5, 7), True), ((3, 6), True)]  # [video ‖ audio] first, then the class table
    seen.clear()
    model.eval().encode_samples(batch)
    assert seen == []  # evaluation: no dropout anywhere


def test_input_is_video_then_audio_and_normalised_with_norm_inputs():
    batch = Batch(audio=torch.tensor([[3.0]]), video=torch.tensor([[0.0, 4.0]]), labels=torch.tensor([0]))
    for norm, want in ((False, [0.0, 4.0, 3.0]), (True, [0.0, 0.8, 0.6])):
        model = identity_model("sje", norm_inputs=norm).eval()
        torch.testing.assert_close(model.encode_samples(batch), torch.tensor([want]))


def test_scores_are_euclidean_distances_to_the_raw_class_text():
    for cls in (ALE, DEVISE, SJE):
        assert cls.score_kind == "distance" and cls.needs_class_table and not cls.needs_negatives
    model = identity_model("ale").eval()
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.equal(model.encode_classes(text), text)  # no projection of the class side
    codes = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 1.1]])
    s = model.scores(codes, model.encode_classes(text))
    torch.testing.assert_close(s, torch.cdist(codes, text))
    assert s.argmin(1).tolist() == [0, 2]  # lower = better


runner = CliRunner()


@pytest.mark.parametrize("method", METHODS)
def test_learns_on_avca_cls(method, synth_root, tmp_path, one_thread):
    root = synth_root("avca-cls", "UCF", scale=0.1)
    args = ["run", "--method", method, "--layout", "avca-cls", "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    # A linear model learns the synthetic (non-linear) text -> feature map more slowly: more steps, a higher lr.
    for item in ("epochs=5", "n_batches=24", "batch_size=64", "lr=0.005"):
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs" / f"{method}_UCF_avca-cls_seed42" / "result.json").read_text())
    chance = 100 / len(rec["per_class"])
    assert rec["metrics"]["seen"] > 3 * chance and rec["metrics"]["unseen"] > 3 * chance, rec["metrics"]


def test_refuses_the_clipclap_layout_before_reading_anything(tmp_path):
    res = runner.invoke(app, ["run", "--method", "ale", "--layout", "clipclap", "--dataset", "UCF",
                              "--root-dir", str(tmp_path / "none"), "--log-dir", str(tmp_path / "runs")])  # fmt: skip
    assert res.exit_code == 2 and "method 'ale' cannot read this layout" in res.output
    assert not (tmp_path / "runs").exists()
