"""Hyper-alignment / Hyper-single / Hyper-multiple (specs/baselines.md §2.3): parameter counts, the alignment loss
against the spec's formulas, its curvature independence (§2.3.3, §5.3.1) and learning through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch
from avlowshot.models import InputDims, build_method, count_parameters
from avlowshot.models.hyperbolic import alignment_loss
from avlowshot.models.registry import shipped_configs
from avlowshot.train.config import load_config

runner = CliRunner()

DIMS = {"main": InputDims(512, 512, 300), "cls": InputDims(128, 4096, 300), "clipclap": InputDims(1024, 512, 1536)}
AVCA_PARAMS = {"main": 1_693_108, "cls": 3_331_508, "clipclap": 2_117_168}  # avca.md §2.1, baselines.md §2.3.5
EXTRA = {"hyper-alignment": lambda k: 0, "hyper-single": lambda k: 601, "hyper-multiple": lambda k: 601 * k}


@pytest.mark.parametrize("method", ["hyper-alignment", "hyper-single", "hyper-multiple"])
def test_parameter_counts_of_every_shipped_config(method):
    names = shipped_configs(method)
    assert len(names) == (9 if method == "hyper-multiple" else 6)
    for name in names:
        ds, fs = name.split("-")
        dataset = {"ucf": "UCF", "activitynet": "ActivityNet", "vggsound": "VGGSound"}[ds]
        cfg = load_config(None, method=method, dataset=dataset, feature_set=fs)
        model = build_method(method, cfg.model, DIMS[fs])
        k = cfg.model.get("num_curvature", 0)
        assert count_parameters(model) == AVCA_PARAMS[fs] + EXTRA[method](k), name
        assert cfg.model["curvature"] == 0.01 and cfg.epochs == 50 and cfg.n_batches == 500


def _reference_maps(x: np.ndarray, c) -> np.ndarray:
    """hyptorch ``logmap0(project(x, c), c)`` written out in numpy (float64)."""
    c = np.broadcast_to(np.asarray(c, dtype=np.float64), (len(x), 1))
    norm = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-5)
    maxnorm = (1 - 1e-3) / np.sqrt(c)
    y = np.where(norm > maxnorm, x / norm * maxnorm, x)
    yn = np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-5)
    return np.arctanh(np.clip(np.sqrt(c) * yn, -1 + 1e-5, 1 - 1e-5)) * y / (np.sqrt(c) * yn)


def _sim_mse(x: np.ndarray, y: np.ndarray) -> float:
    def sim(z):
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        return z @ z.T

    return float(np.mean((sim(x) - sim(y)) ** 2))


@pytest.mark.parametrize("c", [0.01, 0.5, "per-row"])
def test_alignment_loss_is_curvature_independent(c):
    g = np.random.default_rng(0)
    phi = [np.abs(g.standard_normal((64, 300))) * 3 for _ in range(4)]  # post-ReLU rows, some outside the ball
    cv = g.uniform(0.001, 0.01, (64, 1)) if c == "per-row" else c
    cn = g.uniform(0.001, 0.01, (64, 1)) if c == "per-row" else c
    v, a, vn, an = phi
    want = _sim_mse(_reference_maps(v, cv), _reference_maps(a, cv)) + _sim_mse(
        _reference_maps(vn, cn), _reference_maps(an, cn)
    )
    euclid = _sim_mse(v, a) + _sim_mse(vn, an)
    assert want == pytest.approx(euclid, abs=1e-12)  # §2.3.3: the maps only rescale rows
    t = [torch.tensor(p) for p in phi]
    ct = torch.tensor(cv, requires_grad=True) if c == "per-row" else torch.tensor(float(c), requires_grad=True)
    got = alignment_loss(t[0], t[1], t[2], t[3], (ct, ct.detach() if c != "per-row" else torch.tensor(cn)))
    assert float(got.detach()) == pytest.approx(want, abs=1e-12)
    assert float(alignment_loss(*t)) == pytest.approx(euclid, abs=1e-12)
    got.backward()
    assert float(ct.grad.abs().max()) < 1e-10  # the gradient reaching the curvature is (analytically) zero


def _batch(g, n, dims, labels):
    return Batch(audio=torch.rand(n, dims.audio, generator=g), video=torch.rand(n, dims.video, generator=g),
                 labels=torch.as_tensor(labels))  # fmt: skip


def test_hyper_loss_is_avca_plus_the_weighted_alignment_of_the_encoder_outputs():
    dims = InputDims(16, 24, 300)
    g = torch.Generator().manual_seed(1)
    pos, neg = _batch(g, 8, dims, [0, 1, 2, 3] * 2), _batch(g, 8, dims, [1, 2, 3, 0] * 2)
    text, text_neg = torch.randn(8, 300, generator=g), torch.randn(8, 300, generator=g)
    cfg = load_config(None, method="hyper-multiple", dataset="UCF", feature_set="cls").model
    cfg = {**cfg, "embeddings_hidden_size": 32, "decoder_hidden_size": 16}
    avca_cfg = {k: v for k, v in cfg.items() if k not in ("curvature", "alignment", "align_weight", "num_curvature")}
    out = {}
    for name, mc in (("avca", avca_cfg), ("hyper-multiple", cfg), ("poincare", {**cfg, "alignment": "poincare"})):
        torch.manual_seed(0)
        model = build_method("hyper-multiple" if name == "poincare" else name, mc, dims).eval()  # no dropout / BN noise
        out[name] = model.losses(pos, text, neg, text_neg)
        if name == "hyper-multiple":
            with torch.no_grad():
                phi = [model.V_enc(pos.video), model.A_enc(pos.audio), model.V_enc(neg.video), model.A_enc(neg.audio)]
        if name == "poincare":
            out[name]["loss"].backward()
            fuse_grad = model.fusenet1.weight.grad
    want = 1e-3 * (_sim_mse(*(p.double().numpy() for p in phi[:2])) + _sim_mse(*(p.double().numpy() for p in phi[2:])))
    out = {name: {key: float(v.detach()) for key, v in losses.items()} for name, losses in out.items()}
    assert out["hyper-multiple"]["l_align"] == pytest.approx(want, rel=1e-5)
    assert out["hyper-multiple"]["loss"] == pytest.approx(out["avca"]["loss"] + want, rel=1e-6)
    assert out["poincare"]["l_align"] == pytest.approx(want, rel=1e-4)  # the released maps: same value
    assert fuse_grad is not None and float(fuse_grad.abs().max()) < 1e-9  # fusenet1 learns nothing from the loss
    assert "l_align" not in out["avca"]


@pytest.mark.parametrize(
    "method,layout", [("hyper-alignment", "avca-cls"), ("hyper-single", "avca-main"), ("hyper-multiple", "clipclap")]
)
def test_hyper_methods_learn_through_the_cli(synth_root, tmp_path, one_thread, method, layout):
    root = synth_root(layout, "UCF", scale=0.1)
    args = ["run", "--method", method, "--layout", layout, "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    for item in ("epochs=4", "n_batches=12", "batch_size=64"):
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs" / f"{method}_UCF_{layout}_seed42" / "result.json").read_text())
    chance = 100 / len(rec["per_class"])
    assert rec["metrics"]["seen"] > 3 * chance and rec["metrics"]["unseen"] > 3 * chance, rec["metrics"]
