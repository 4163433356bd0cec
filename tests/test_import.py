"""import-run: the authors' run folders (../shared/conformance, written by the reference code itself) imported and
evaluated reproduce the reference's own evaluation; crafted, foreign, mismatched and incomplete folders are refused
with nothing written; the --compat official fidelity details of the training loop."""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.errors import AvlowshotError
from avlowshot.importers import import_run, load_args_pickle, load_reference_checkpoint
from avlowshot.train.protocol import evaluate_run

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
needs_kits = pytest.mark.skipif(not CONFORMANCE.is_dir(), reason="../shared/conformance not present")

KITS = {  # method: (layout, dataset root inside the kit)
    "avca": ("avca-cls", "avgzsl_benchmark_datasets/UCF"),
    "tcaf": ("tcaf-cls", "avgzsl_benchmark_non_averaged_datasets/UCF"),
    "clipclap": ("clipclap", "avgzsl_benchmark_non_averaged_datasets/UCF"),
    "avdiff": ("avdiff", "avgzsl_benchmark_non_averaged_datasets/w2v_embedding/UCF"),
}
TOL = 1e-4  # percent


def _import(method: str, out: Path, cache: Path, ref_dir: Path | None = None, **kw) -> Path:
    layout, root = KITS[method]
    kit = CONFORMANCE / method
    return import_run(
        method, ref_dir or kit, layout=layout, dataset="UCF", root_dir=kit / root, out=out,
        cache_dir=cache, **kw,
    )  # fmt: skip


def _close(got: float, want_fraction: float) -> None:
    assert abs(got - 100.0 * want_fraction) <= TOL, (got, 100.0 * want_fraction)


def _recall_vector(per_class: dict[str, float | None], names: list[str]) -> np.ndarray:
    """Class name -> percent as the reference's vector: fraction per class id, 0 outside the split."""
    out = np.zeros(len(names))
    for i, name in enumerate(names):
        v = per_class.get(name)
        out[i] = 0.0 if v is None else v / 100.0
    return out


def _class_names(method: str) -> list[str]:
    root = CONFORMANCE / method / KITS[method][1]
    return sorted((root / "class-split" / "all_class.txt").read_text().split())


@needs_kits
@pytest.mark.parametrize("method", ["avca", "tcaf", "clipclap"])
def test_import_reproduces_reference_gzsl(method, tmp_path, one_thread):
    exp = json.loads((CONFORMANCE / method / "expected.json").read_text())
    if method == "clipclap":  # through the command line: import-run, then evaluate
        layout, root = KITS[method]
        run_dir, cache = tmp_path / "run", str(tmp_path / "cache")
        cmd = ["import-run", "--from", method, "--ref-dir", str(CONFORMANCE / method), "--layout", layout,
               "--dataset", "UCF", "--root-dir", str(CONFORMANCE / method / root), "--out", str(run_dir),
               "--cache-dir", cache]  # fmt: skip
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 0, res.output
        assert "(compat official)" in " ".join(res.output.split())
        res = CliRunner().invoke(app, ["evaluate", "--run-dir", str(run_dir), "--cache-dir", cache])
        assert res.exit_code == 0, res.output
        assert "13.10" in res.output and "10.19" in res.output  # the reference's printed seen and HM
    else:
        run_dir = _import(method, tmp_path / "run", tmp_path / "cache")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["compat"] == "official" and info["imported"]["from"] == method
    assert info["imported"]["stage_1_epoch"] == exp["stage_A_checkpoint_epoch"]
    for f, meta in exp["files"].items():  # the source files, by digest
        if f.endswith((".pt", ".pkl")):
            assert info["imported"]["files"][str((CONFORMANCE / method / f).resolve())] == meta["sha256"]
    res = evaluate_run(run_dir, cache_dir=tmp_path / "cache")
    val, test = exp["stage_A_on_val_beta_search"], exp["stage_B_on_test"]
    for k in ("seen", "unseen", "hm", "zsl"):
        _close(res["val"][k], val[k])
        _close(res["metrics"][k], test[k])
    assert res["beta"] == pytest.approx(val["beta"], abs=1e-12)
    assert res["beta_test"] == pytest.approx(exp["beta_used_on_test"], rel=1e-12, abs=1e-20)
    names = _class_names(method)
    np.testing.assert_allclose(
        _recall_vector(res["per_class_zsl"], names), exp["stage_B_on_test_zsl_recall_per_class_id"], atol=1e-6
    )
    assert res["imported"]["from"] == method


@needs_kits
def test_import_reproduces_reference_avdiff(tmp_path, one_thread):
    exp = json.loads((CONFORMANCE / "avdiff" / "expected.json").read_text())
    run_dir = _import("avdiff", tmp_path / "run", tmp_path / "cache")
    res = evaluate_run(run_dir, cache_dir=tmp_path / "cache")
    assert res["shots"] == 5 and res["task"] == "gfsl"
    assert res["beta"] == exp["stage_1_returned_beta"] == 0.0
    for got, key in zip(res["repeats"], ("''", "_1", "_2"), strict=True):
        want = exp["repeats"][key]
        for ours, theirs in (("base", "seen"), ("novel", "unseen"), ("hm", "hm"), ("fsl", "zsl")):
            _close(got[ours], want[theirs])
        assert got["beta"] == pytest.approx(want["beta"], abs=1e-9)  # searched on test: the reference's beta-0 quirk
    mean = exp["mean_over_repeats"]
    for ours, theirs in (("base", "base"), ("novel", "novel"), ("hm", "hm_of_means"), ("fsl", "fsl")):
        _close(res["metrics"][ours], mean[theirs])


# ----------------------------------------------------------------------------------------------------------------
# Safe loading: crafted files run nothing and write nothing


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _args_pkl(path: Path, **values) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(argparse.Namespace(**values), protocol=4))


def test_crafted_checkpoint_is_refused_and_nothing_is_written(tmp_path):
    ref = tmp_path / "ref"
    _args_pkl(ref / "stage1" / "args.pkl", retrain_all=False, AVCA=True)
    _args_pkl(ref / "stage2" / "args.pkl", retrain_all=True, AVCA=True)
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "model": {"w": torch.zeros(1)}, "x": _Payload(marker)}, ref / "stage1" / "AVCA_score.pt")
    out = tmp_path / "runs" / "imported"
    with pytest.raises(
        AvlowshotError, match=r"AVCA_score\.pt: refused to load this checkpoint: it references '(io|builtins)\.open'"
    ):
        import_run("avca", ref, layout="avca-cls", dataset="UCF", root_dir=tmp_path / "no-data", out=out)
    assert not marker.exists()
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_crafted_args_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "args.pkl"
    f.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(
        AvlowshotError, match=r"args\.pkl: refused to unpickle the saved arguments: global '(io|builtins)\.open'"
    ):
        load_args_pickle(f)
    assert not marker.exists()


def test_reference_checkpoint_allow_list(tmp_path):
    """numpy scalars and a saved Namespace with paths load (the authors' files may hold them); tensors stay tensors."""
    f = tmp_path / "c.pt"
    ns = argparse.Namespace(lr=np.float64(1e-3), root_dir=Path("/data/UCF"))
    torch.save({"epoch": np.int64(3), "model": {"w": torch.ones(2)}, "metric": "score", "args": ns}, f)
    c = load_reference_checkpoint(f)
    assert c["epoch"] == 3 and isinstance(c["epoch"], int)
    assert c["args"].lr == 1e-3 and torch.equal(c["model"]["w"], torch.ones(2))
    f.write_bytes(b"not a zip")
    with pytest.raises(AvlowshotError, match="not a readable torch checkpoint"):
        load_reference_checkpoint(f)
    torch.save({"epoch": 1, "weights": {}}, f)
    with pytest.raises(AvlowshotError, match="with a state dict under 'model'"):
        load_reference_checkpoint(f)


def test_no_unrestricted_torch_load_in_the_package():
    src = Path(__file__).resolve().parents[1] / "src" / "avlowshot"
    offenders = [str(p) for p in src.rglob("*.py") if "weights_only=False" in p.read_text(encoding="utf-8")]
    assert offenders == []


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the file and what was expected, nothing written


def _copy_runs(method: str, tmp_path: Path) -> Path:
    dst = tmp_path / "ref"
    shutil.copytree(CONFORMANCE / method / "runs", dst / "runs")
    return dst


def test_not_a_reference_run(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(AvlowshotError, match=r"empty: not a reference run folder: no run folder with saved arguments"):
        import_run("tcaf", tmp_path / "empty", layout="tcaf-cls", dataset="UCF", root_dir=tmp_path, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@needs_kits
def test_another_methods_checkpoint(tmp_path):
    with pytest.raises(
        AvlowshotError, match=r"args\.pkl: these are the saved arguments of a run of AVCA \(CVPR 2022\), not of TCAF"
    ):
        import_run("tcaf", CONFORMANCE / "avca", layout="tcaf-cls", dataset="UCF",
                   root_dir=CONFORMANCE / "tcaf" / KITS["tcaf"][1], out=tmp_path / "o")  # fmt: skip
    # a TCAF file renamed to AVCA's name: caught by its keys
    ref = _copy_runs("avca", tmp_path)
    a = ref / "runs" / "attention_ucf_val_cls" / "AVCA_score.pt"
    c = torch.load(
        next((CONFORMANCE / "tcaf" / "runs").glob("*/Multimodal_Sequence_Transformer_score.pt")), weights_only=True
    )
    torch.save({**c, "epoch": 4}, a)  # the epoch of AVCA's stage 1, so that the stage-2 file is found
    with pytest.raises(
        AvlowshotError,
        match=r"AVCA_score\.pt: this is not a checkpoint of AVCA \(CVPR 2022\): its state dict has the keys of TCAF",
    ):
        _import("avca", tmp_path / "o", tmp_path / "cache", ref_dir=ref)
    assert not (tmp_path / "o").exists()


@needs_kits
def test_wrong_class_count_and_shapes(tmp_path):
    ref = _copy_runs("avdiff", tmp_path)
    f = next(ref.glob("runs/*/checkpoints_1/AVDiff_score_ckpt_1.pt"))
    c = torch.load(f, weights_only=True)
    c["model"]["classifier.weight"] = c["model"]["classifier.weight"][:40]
    c["model"]["classifier.bias"] = c["model"]["classifier.bias"][:40]
    torch.save(c, f)
    with pytest.raises(
        AvlowshotError,
        match=r"checkpoints_1/AVDiff_score_ckpt_1\.pt: 'classifier.weight' has shape \(40, 64\).*"
        r"the classifier has 40 classes, the stage-2 label space of this dataset has 48",
    ):
        _import("avdiff", tmp_path / "o", tmp_path / "cache", ref_dir=ref)
    ref = _copy_runs("avca", tmp_path / "b")
    f = ref / "runs" / "attention_ucf_val_cls" / "AVCA_score.pt"
    c = torch.load(f, weights_only=True)
    c["model"]["V_enc.fc.0.weight"] = c["model"]["V_enc.fc.0.weight"][:, :512]
    torch.save(c, f)
    with pytest.raises(
        AvlowshotError,
        match=r"AVCA_score\.pt: 'V_enc.fc.0.weight' has shape \(16, 512\), "
        r"the model built from the saved arguments expects \(16, 4096\)",
    ):
        _import("avca", tmp_path / "o", tmp_path / "cache", ref_dir=ref)
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")] == []


@needs_kits
def test_missing_stage_and_wrong_dataset(tmp_path):
    ref = _copy_runs("clipclap", tmp_path)
    ckpt = next(ref.glob("runs/*/checkpoints/ClipClap_model_score_ckpt_1.pt"))
    with pytest.raises(AvlowshotError, match=r"--dataset VGGSound"):
        import_run("clipclap", ref, layout="clipclap", dataset="VGGSound", root_dir=tmp_path, out=tmp_path / "o")
    ckpt.rename(ckpt.with_name("ClipClap_model_score_ckpt_0.pt"))
    with pytest.raises(
        AvlowshotError,
        match=r"ClipClap_model_score_ckpt_1\.pt: missing stage 2 checkpoint: the stage-1 model is from epoch 2.*"
        r"holds ClipClap_model_score_ckpt_0\.pt",
    ):
        _import("clipclap", tmp_path / "o", tmp_path / "cache", ref_dir=ref)
    shutil.rmtree(ckpt.parents[1])  # the whole stage-2 folder
    with pytest.raises(AvlowshotError, match=r"missing stage: no stage-2 run folder"):
        _import("clipclap", tmp_path / "o", tmp_path / "cache", ref_dir=ref)
    assert not (tmp_path / "o").exists()


@needs_kits
def test_refused_argument_and_cli_exit_code(tmp_path):
    ref = _copy_runs("tcaf", tmp_path)
    pkl = next(ref.glob("runs/*/args.pkl"))
    args = load_args_pickle(pkl)
    args["transformer_embedding_time_embed_type"] = "fixed"
    _args_pkl(pkl, **args)
    layout, root = KITS["tcaf"]
    cmd = ["import-run", "--from", "tcaf", "--ref-dir", str(ref), "--layout", layout, "--dataset", "UCF",
           "--root-dir", str(CONFORMANCE / "tcaf" / root), "--out", str(tmp_path / "o")]  # fmt: skip
    res = CliRunner().invoke(app, cmd)
    assert res.exit_code == 2
    assert "argument 'transformer_embedding_time_embed_type' is 'fixed'" in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------------
# --compat official fidelity details (issue 16, point 5)


def test_official_ddpm_step_coefficient():
    from avlowshot.models.avdiff import DenoiseDiffusion

    steps = 200
    eps_net = lambda x, t, w: torch.full_like(x, 0.5)  # noqa: E731 - a fixed epsilon prediction
    ref, ours = DenoiseDiffusion(eps_net, steps, official=True), DenoiseDiffusion(eps_net, steps)
    # 1 - alpha differs from beta in float32 for some steps, which is why the operation order matters
    assert bool(((1.0 - ref.alpha) != ref.beta).any())
    x, z, w = torch.randn(steps, 8), torch.randn(steps, 8), torch.zeros(steps, 3)
    t = torch.arange(steps)
    a, ab = ref.alpha[t, None], ref.alpha_bar[t, None]
    want = 1.0 / a.sqrt() * (x - (1.0 - a) / (1.0 - ab).sqrt() * 0.5) + ref.beta[t, None].sqrt() * z
    assert torch.equal(ref.p_sample(x, t, w, z), want)
    assert torch.allclose(ours.p_sample(x, t, w, z), want, atol=1e-5)


def test_time_stamps_are_float64_products_cast_to_float32():
    from avlowshot.data.batching import _gather_temporal
    from avlowshot.data.store import Modality

    n = 400
    for step in (0.96, 0.64):
        mod = Modality(torch.zeros(n, 2), torch.tensor([0, n]), step_seconds=step)
        _, _, t = _gather_temporal(mod, torch.tensor([0]))
        want = torch.from_numpy(np.arange(n) * step).to(torch.float32)
        assert torch.equal(t[0], want)
        assert not torch.equal(t[0], torch.arange(n, dtype=torch.float32) * step)  # the float32 product differs


def test_two_stream_iteration_runs_the_extra_passes_after_both_steps():
    from avlowshot.train.trainer import Trainer

    calls = []
    fake = SimpleNamespace(
        train_step=lambda b, t, kw, after=True: calls.append(("step", b, after)) or {"loss": torch.tensor(1.0)},
        method=SimpleNamespace(after_step=lambda b, t: calls.append(("after", b))),
    )
    Trainer.train_iteration(fake, [("base", None, {"stream": "base"}), ("novel", None, {"stream": "novel"})])
    assert calls == [("step", "base", False), ("step", "novel", False), ("after", "base"), ("after", "novel")]
    calls.clear()
    fake.train_step = lambda b, t, kw, after=True: calls.append(("step", b, after)) or {"loss": torch.tensor(1.0)}
    Trainer.train_iteration(fake, [("base", None, {})])
    assert calls == [("step", "base", True)]
