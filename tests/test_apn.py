"""APN (AVCA repository baseline): parameter counts of the shipped configs, the loss on a hand-made batch from the
spec's formula, the score direction, and learning through the CLI (specs/avca.md §2.5, §3.5, §5, §6.4)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch
from avlowshot.models import InputDims, build_method, count_parameters, registry
from avlowshot.train.config import load_config

runner = CliRunner()
DIMS = {"main": InputDims(audio=512, video=512, text=300), "cls": InputDims(audio=128, video=4096, text=300)}
SPEC_PARAMS = {"main": 614_400, "cls": 2_534_400}  # specs/avca.md §2.5


@pytest.mark.parametrize("name", registry.shipped_configs("apn"))
def test_shipped_configs_match_run_scripts_and_spec_parameter_counts(name):
    ds, fs = name.split("-")
    cfg = load_config(None, method="apn", dataset={"ucf": "UCF", "activitynet": "ActivityNet"}.get(ds, "VGGSound"),
                      feature_set=fs)  # fmt: skip
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.n_batches, cfg.weight_decay) == (50, 0.001, 256, 500, 0.0)
    assert cfg.lr_scheduler and cfg.lr_patience == 3 and cfg.beta_grid == "avca"
    assert cfg.model == {"norm_inputs": fs == "cls"}  # --norm_inputs in every cls script
    model = build_method("apn", cfg.model, DIMS[fs])
    assert count_parameters(model) == SPEC_PARAMS[fs] == 2 * 300 * (DIMS[fs].audio + DIMS[fs].video)
    assert model.ALE_vector.shape == (300, DIMS[fs].video + DIMS[fs].audio, 1, 1)
    w = model.ALE_vector.detach()
    assert 0 <= float(w.min()) and float(w.max()) <= 2e-4  # 2e-4 * U(0, 1)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("norm", [False, True])
def test_loss_equals_the_spec_formula_on_a_hand_made_batch(norm):
    dims = InputDims(audio=2, video=3, text=4)
    m = build_method("apn", {"norm_inputs": norm}, dims)
    rng = np.random.default_rng(1)
    ale, proto = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    with torch.no_grad():
        m.ALE_vector.copy_(torch.tensor(ale).view(4, 5, 1, 1))
        m.prototype_vectors["layer4"].copy_(torch.tensor(proto).view(4, 5, 1, 1))
    audio, video = rng.normal(size=(3, 2)), rng.normal(size=(3, 3))
    class_ids = torch.tensor([2, 5, 7])  # global ids of the training classes; labels map to their ranks
    labels = np.array([5, 2, 7])
    class_text = rng.normal(size=(3, 4))
    text = class_text[[1, 0, 2]]
    batch = Batch(audio=torch.tensor(audio, dtype=torch.float32), video=torch.tensor(video, dtype=torch.float32),
                  labels=torch.tensor(labels))  # fmt: skip
    got = m.losses(batch, torch.tensor(text, dtype=torch.float32),
                   class_text=torch.tensor(class_text, dtype=torch.float32), class_ids=class_ids)  # fmt: skip

    # Independent numpy: x = cat(video, audio); CE applied to softmax probabilities (log-softmax of a softmax).
    x = np.concatenate([video, audio], axis=1)
    if norm:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = np.array([1, 0, 2])

    def ce_on_probs(attr):
        p = _softmax(attr @ class_text.T)
        return float(np.mean(-np.log(_softmax(p)[np.arange(3), y])))

    f, l4 = x @ ale.T, x @ proto.T
    want = ce_on_probs(f) + np.mean((f - text) ** 2) + ce_on_probs(l4) + np.mean((l4 - text) ** 2)
    assert math.isclose(float(got["loss"].detach()), want, rel_tol=1e-5)
    assert math.isclose(float(got["l_attri_final"].detach()), np.mean((f - text) ** 2), rel_tol=1e-5)


def test_scores_are_euclidean_distances_to_the_raw_word_vectors():
    dims = InputDims(audio=2, video=2, text=3)
    m = build_method("apn", {"norm_inputs": False}, dims).eval()
    assert m.score_kind == "distance"
    with torch.no_grad():
        m.ALE_vector.zero_()
        m.ALE_vector[:, :3, 0, 0] = torch.eye(3)  # pre_attri_final = the first 3 input dims (video 0-1, audio 0)
    batch = Batch(audio=torch.tensor([[0.0, 9.0], [1.0, 9.0]]), video=torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
                  labels=torch.tensor([0, 1]))  # fmt: skip
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    s = m.scores(m.encode_samples(batch), m.encode_classes(text))
    assert torch.allclose(s, torch.tensor([[0.0, math.sqrt(2)], [math.sqrt(2), 0.0]]), atol=1e-6)
    assert s.argmin(dim=1).tolist() == [0, 1]  # lower = better


@pytest.mark.parametrize("layout", ["avca-cls", "tcaf-cls"])
def test_apn_learns_through_the_cli(layout, synth_root, tmp_path, one_thread):
    root = synth_root(layout, "UCF", scale=0.1)
    args = ["run", "--method", "apn", "--layout", layout, "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    # The CE on softmax probabilities has tiny gradients (specs §9.9): 48 steps need a larger lr than the scripts'.
    for item in ("epochs=4", "n_batches=12", "batch_size=64", "lr=0.02"):
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs" / f"apn_UCF_{layout}_seed42" / "result.json").read_text())
    chance = 100 / len(rec["per_class"])
    assert rec["metrics"]["seen"] > 3 * chance and rec["metrics"]["unseen"] > 3 * chance, rec["metrics"]
    assert rec["n_params"] == 2 * 300 * (128 + 4096)


def test_official_test_beta_is_the_avca_conversion():
    from types import SimpleNamespace

    from avlowshot.train import protocol

    ctx = SimpleNamespace(compat="official", cfg=SimpleNamespace(method="apn"))
    assert protocol.test_beta(0.0, ctx) == 1e-10  # get_evaluation.py: a falsy beta would re-search on test
    assert protocol.test_beta(0.4, ctx) == pytest.approx(0.4)
    assert protocol.test_beta(0.0, SimpleNamespace(compat="none", cfg=ctx.cfg)) == 0.0
