"""The method registry as a user sees it: `avlowshot methods`, unknown names, layouts a method cannot read, and
methods on averaged features run on a temporal layout (each video's mean over its valid rows)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.store import Modality
from avlowshot.models import registry

runner = CliRunner()


def test_methods_lists_every_registered_method_with_its_layouts():
    res = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for name, cls in registry.METHODS.items():
        line = next(row for row in res.output.splitlines() if f" {name} " in row)
        assert cls.layouts[0] in line
    card = runner.invoke(app, ["methods", "avca"])
    assert card.exit_code == 0 and "AVCA (CVPR 2022)" in card.output


def test_unknown_method_lists_the_known_ones(tmp_path):
    for args in (
        ["methods", "avcaa"],
        [
            "run",
            "--method",
            "avcaa",
            "--layout",
            "avca-cls",
            "--dataset",
            "UCF",
            "--root-dir",
            str(tmp_path),
            "--log-dir",
            str(tmp_path / "runs"),
        ],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2
        assert "unknown method 'avcaa'" in res.output and ", ".join(sorted(registry.METHODS)) in res.output
    assert not (tmp_path / "runs").exists()


def test_a_layout_the_method_cannot_read_is_refused_before_anything_is_read(tmp_path):
    missing = tmp_path / "no-such-root"  # never opened: the check comes first
    res = runner.invoke(app, ["run", "--method", "tcaf", "--layout", "avca-cls", "--dataset", "UCF",
                              "--root-dir", str(missing), "--log-dir", str(tmp_path / "runs")])  # fmt: skip
    assert res.exit_code == 2
    assert "method 'tcaf' cannot read this layout (it reads: tcaf-cls, tcaf-main)" in res.output
    assert not (tmp_path / "runs").exists()
    res = runner.invoke(app, ["run", "--method", "avdiff", "--layout", "tcaf-cls", "--dataset", "UCF",
                              "--root-dir", str(missing), "--log-dir", str(tmp_path / "runs")])  # fmt: skip
    assert res.exit_code == 2 and "does not run GZSL" in res.output and "--shots" in res.output


def test_averaging_a_temporal_modality_is_the_mean_of_its_rows():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 255, size=(n, 3)).astype(np.uint8) for n in (1, 4, 7, 2, 5)]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(s) for s in seqs])]))
    mod = Modality(torch.from_numpy(np.concatenate(seqs)), offsets, 0.96)
    avg = mod.averaged(chunk=2)  # chunks split the samples: the result must not depend on them
    assert avg.offsets is None and avg.data.dtype == torch.float32
    want = np.stack([s.astype(np.float64).mean(0) for s in seqs])
    np.testing.assert_allclose(avg.data.numpy(), want, rtol=1e-6)


def test_an_averaged_method_learns_on_a_temporal_layout(synth_root, tmp_path, one_thread):
    root = synth_root("tcaf-cls", "UCF", scale=0.1)
    args = ["run", "--method", "avca", "--layout", "tcaf-cls", "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    for item in ("epochs=4", "n_batches=12", "batch_size=64"):
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs" / "avca_UCF_tcaf-cls_seed42" / "result.json").read_text())
    chance = 100 / len(rec["per_class"])
    assert rec["metrics"]["seen"] > 3 * chance and rec["metrics"]["unseen"] > 3 * chance, rec["metrics"]


@pytest.mark.parametrize("method", ["ale", "devise", "sje", "apn", "avgzslnet"])
def test_avca_table_baselines_learn_on_main_features(method, synth_root, tmp_path, one_thread):
    """The AVCA table's main rows: the baselines learn on synthetic SeLaVi-like features too."""
    root = synth_root("avca-main", "UCF", scale=0.1)
    args = ["run", "--method", method, "--layout", "avca-main", "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    for item in ("epochs=5", "n_batches=24", "batch_size=64", "lr=0.005"):
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs" / f"{method}_UCF_avca-main_seed42" / "result.json").read_text())
    chance = 100 / len(rec["per_class"])
    assert rec["metrics"]["seen"] > 3 * chance and rec["metrics"]["unseen"] > 3 * chance, rec["metrics"]
