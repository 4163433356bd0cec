"""SLDG (AV-DIFF Table 2, PROPOSED after baselines.md §3.9): the Gaussian temporal attention's formula, padding,
late fusion of the two streams, parameter counts, and learning through the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch
from avlowshot.models import InputDims, build_method, count_parameters
from avlowshot.models.sldg import GaussianTemporalAttention
from avlowshot.train.config import load_config

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def test_gaussian_attention_follows_the_formula_and_ignores_padding():
    torch.manual_seed(0)
    att = GaussianTemporalAttention(4)
    x = torch.randn(2, 5, 4)
    valid = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    w = att(x, valid)
    # sample 0 by hand: u = [mean of 3 valid tokens ; log 3], tau = 0, 0.5, 1
    u = torch.cat((x[0, :3].mean(0), torch.tensor([math.log(3)])))
    mu = torch.sigmoid(att.mu(u))
    sigma = 0.05 + torch.nn.functional.softplus(att.sigma(u))
    g = torch.exp(-((torch.tensor([0.0, 0.5, 1.0]) - mu) ** 2) / (2 * sigma**2))
    torch.testing.assert_close(w[0, :3], g / g.sum())
    assert torch.equal(w[0, 3:], torch.zeros(2)) and w[1, 0].item() == pytest.approx(1.0)
    assert sigma.item() == pytest.approx(0.3, abs=0.2)  # sigma starts near 0.3 (bias log(e^0.25 - 1))
    # padding rows of any content change nothing
    x2 = x.clone()
    x2[0, 3:] = 100.0
    torch.testing.assert_close(att(x2, valid), w)


def test_parameter_counts_and_late_fusion():
    for dataset, n in (("UCF", 48), ("ActivityNet", 198), ("VGGSound", 271)):
        for shots in (1, 5, 10, 20):
            cfg = load_config(None, method="sldg", dataset=dataset, feature_set="cls", shots=shots)
            m = build_method("sldg", cfg.model, InputDims(128, 4096, 300), classes=np.arange(n))
            assert count_parameters(m) == 2_852_160 + 130 * n
    torch.manual_seed(0)
    m = build_method("sldg", {"embeddings_hidden_size": 8, "decoder_hidden_size": 8}, InputDims(3, 5, 300),
                     classes=np.arange(4))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    am, vm = torch.ones(3, 4, dtype=torch.bool), torch.ones(3, 6, dtype=torch.bool)
    vm[0, 4:] = False
    batch = Batch(torch.rand(3, 4, 3, generator=g) * 255, torch.rand(3, 6, 5, generator=g), torch.tensor([0, 2, 3]),
                  am, vm, torch.zeros(3, 4), torch.zeros(3, 6))  # fmt: skip
    out = m.train().losses(batch, torch.zeros(3, 300))
    assert out["loss"].item() == pytest.approx(out["l_ce_v"].item() + out["l_ce_a"].item(), rel=1e-6)
    m.eval()
    with torch.no_grad():
        lv, la = m.stream_logits(batch)
        torch.testing.assert_close(m.encode_samples(batch), (lv.softmax(-1) + la.softmax(-1)) / 2)
    assert m.score_kind == "probability"


def test_sldg_learns_gfsl_through_the_cli(synth_root, tmp_path):
    root = synth_root("avdiff", "UCF", scale=0.05, shots=5)
    args = ["run", "--method", "sldg", "--layout", "avdiff", "--dataset", "UCF", "--shots", "5"]
    args += ["--root-dir", str(root), "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    for item in ("epochs=3", "n_batches=15", "batch_size=48", "lr=2e-3", "embeddings_hidden_size=64",
                 "decoder_hidden_size=64"):  # fmt: skip
        args += ["--set", item]
    res = runner.invoke(app, args + ["--quiet"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs" / "sldg_UCF_avdiff_5shot_seed42" / "result.json").read_text())
    m, chance = rec["metrics"], 100 / 48
    assert m["base"] > 3 * chance and m["novel"] > 3 * chance and m["fsl"] > 100 / 6, m
