"""The two-stage protocol end to end: CLI run, result record, resume, determinism, parts, evaluate, report, configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from avlowshot import __version__
from avlowshot.cli import app
from avlowshot.errors import ConfigError
from avlowshot.train import protocol
from avlowshot.train.config import load_config
from avlowshot.train.trainer import Interrupted

runner = CliRunner()

# A short but real run: the faithful AVCA model, small batches, few epochs.
QUICK = ["epochs=4", "n_batches=12", "batch_size=64"]
SMALL = QUICK + ["model.embeddings_hidden_size=128"]  # runs compared with runs: a narrower AVCA does as well


@pytest.fixture(scope="module")
def ucf(synth_root):
    return synth_root("avca-cls", "UCF", scale=0.1)


def _spec(root: Path, log_dir: Path, cache: Path, *, seed: int | None = None, compat: str = "none", sets=SMALL):
    cfg = load_config(None, method="avca", dataset="UCF", feature_set="cls", overrides=sets, seed=seed)
    return protocol.RunSpec(
        method="avca", layout="avca-cls", dataset="UCF", root_dir=root, log_dir=log_dir, cfg=cfg, compat=compat,
        cache_dir=cache,
    )  # fmt: skip


def _cli_run(root: Path, log_dir: Path, cache: Path, *extra: str):
    args = ["run", "--method", "avca", "--layout", "avca-cls", "--dataset", "UCF", "--root-dir", str(root)]
    args += ["--log-dir", str(log_dir), "--cache-dir", str(cache), "--quiet"]
    for item in QUICK:
        args += ["--set", item]
    return runner.invoke(app, args + list(extra))


@pytest.fixture(scope="module")
def finished_run(ucf, tmp_path_factory):
    """One full CLI run (stage 1, stage 2, eval), shared by the read-only tests below."""
    base = tmp_path_factory.mktemp("run")
    result = _cli_run(ucf, base / "runs", base / "cache")
    assert result.exit_code == 0, result.output
    return base, base / "runs" / "avca_UCF_avca-cls_seed42"


def test_cli_run_writes_the_result_record(finished_run):
    _, run_dir = finished_run
    rec = json.loads((run_dir / "result.json").read_text())
    assert rec["method"] == "avca" and rec["dataset"] == "UCF" and rec["layout"] == "avca-cls"
    assert rec["feature_set"] == "cls" and rec["split_family"] == "cls_split" and rec["task"] == "gzsl"
    assert rec["shots"] is None and rec["seed"] == 42 and rec["compat"] == "none" and rec["version"] == __version__
    assert (
        rec["config"]["epochs"] == 4 and rec["config"]["n_batches"] == 12 and rec["config"]["model"]["momentum"] == 0.99
    )
    assert rec["n_params"] == 3_330_908  # trainable parameters of the faithful UCF cls AVCA
    assert 0 <= rec["best_epoch"] < 4 and rec["stage2_epochs"] == rec["best_epoch"] + 1
    assert rec["beta"] == rec["beta_test"] and 0 <= rec["beta"] <= 3
    assert set(rec["metrics"]) == {"seen", "unseen", "hm", "zsl"}
    assert len(rec["timings"]["stage-1"]["per_epoch"]) == 4
    assert len(rec["timings"]["stage-2"]["per_epoch"]) == rec["best_epoch"] + 1
    # per-class accuracies keyed by class name; the test split of UCF cls has 42 seen + 6 unseen classes
    assert len(rec["per_class_zsl"]) > 0 and set(rec["per_class_zsl"]) <= set(rec["per_class"])
    m = rec["metrics"]
    chance = 100 / len(rec["per_class"])  # 1/48 in the joint label space
    assert m["seen"] > 5 * chance and m["unseen"] > 5 * chance, m
    assert len(rec["per_class_zsl"]) == 6 and m["zsl"] > 2 * 100 / 6, m
    hm = 2 * m["seen"] * m["unseen"] / (m["seen"] + m["unseen"])
    assert m["hm"] == pytest.approx(hm, rel=1e-4)
    # the resolved config is saved and loads back as a config
    cfg = load_config(run_dir / "config.yaml", method="avca")
    assert cfg.epochs == 4 and cfg.batch_size == 64
    # checkpoints: safetensors + JSON sidecar, the stage-1 best and the last epoch kept
    ck = sorted(p.name for p in (run_dir / "stage-1" / "checkpoints").iterdir())
    assert f"epoch-{rec['best_epoch']:03d}" in ck and "epoch-003" in ck and len(ck) <= 2
    side = json.loads((run_dir / "stage-1" / "checkpoints" / "epoch-003" / "model.json").read_text())
    assert side["epoch"] == 3 and set(side["files"]) == {"model.safetensors", "state.pt"}
    assert all(len(digest) == 64 for digest in side["files"].values())  # sha256 of each file
    assert list((run_dir / "stage-1").glob("events.out.tfevents.*"))


def test_evaluate_reproduces_and_report_lists(finished_run):
    base, run_dir = finished_run
    before = json.loads((run_dir / "result.json").read_text())
    res = runner.invoke(app, ["evaluate", "--run-dir", str(run_dir), "--cache-dir", str(base / "cache"), "--no-write"])
    assert res.exit_code == 0, res.output
    assert f"{before['metrics']['hm']:.2f}" in res.output
    # another precision on the same checkpoints (the GPU check's bf16 vs fp32); on the CPU auto = off = fp32
    fp32 = protocol.evaluate_run(run_dir, cache_dir=base / "cache", write=False, amp="off")
    assert fp32["metrics"] == before["metrics"]
    bad = runner.invoke(app, ["evaluate", "--run-dir", str(run_dir), "--no-write", "--amp", "fp8"])
    assert bad.exit_code == 2 and "--amp fp8: expected one of auto, bf16, off" in bad.output

    md = runner.invoke(app, ["report", "--log-dir", str(base / "runs")])
    assert md.exit_code == 0, md.output
    row = [line for line in md.output.splitlines() if line.startswith("| avca")]
    assert len(row) == 1 and f"{before['metrics']['unseen']:.2f}" in row[0]
    csv = runner.invoke(app, ["report", "--log-dir", str(base / "runs"), "--format", "csv"]).output.splitlines()
    head, values = csv[0].split(","), csv[1].split(",")
    assert float(values[head.index("seen")]) == pytest.approx(before["metrics"]["seen"], abs=1e-4)
    tex = runner.invoke(app, ["report", "--log-dir", str(base / "runs"), "--format", "latex"]).output
    assert r"\begin{tabular}" in tex and "cls\\_split" in tex
    bad = runner.invoke(app, ["report", "--log-dir", str(base / "runs"), "--format", "xlsx"])
    assert bad.exit_code == 2 and "markdown, csv, latex" in bad.output


def _weights(run_dir: Path, stage: str, epoch: int) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / stage / "checkpoints" / f"epoch-{epoch:03d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def whole_run(ucf, tmp_path_factory):
    """One uninterrupted protocol run: what the resumed and the part-by-part runs must give."""
    base = tmp_path_factory.mktemp("whole")
    return protocol.run(_spec(ucf, base / "a", base / "cache")), base / "a"


@pytest.mark.parametrize("stop_at", [("stage-1", 1), ("stage-2", 0)])
def test_resume_equals_uninterrupted(ucf, tmp_path, stop_at, whole_run):
    cache = tmp_path / "cache"
    whole, whole_dir = whole_run

    stage_seen = []

    def stop(epoch, record):
        if stage_seen[-1] == stop_at[0] and epoch == stop_at[1]:
            raise Interrupted

    spec = _spec(ucf, tmp_path / "b", cache)
    with pytest.raises(Interrupted):
        protocol.run(spec, on_epoch_end=stop, on_stage=stage_seen.append)
    assert not (spec.run_dir / "result.json").exists()
    with pytest.raises(Exception, match="--resume"):  # a run directory is never silently overwritten
        protocol.run(spec)
    resumed = protocol.run(spec, resume=True)

    assert resumed["metrics"] == whole["metrics"] and resumed["beta"] == whole["beta"]
    assert resumed["best_epoch"] == whole["best_epoch"] and resumed["per_class"] == whole["per_class"]
    a, b = whole_dir / spec.run_dir.name, spec.run_dir
    last2 = whole["best_epoch"]
    for stage, epoch in (("stage-1", 3), ("stage-2", last2)):
        wa, wb = _weights(a, stage, epoch), _weights(b, stage, epoch)
        assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    hist_a = json.loads((a / "stage-1" / "history.json").read_text())
    hist_b = json.loads((b / "stage-1" / "history.json").read_text())
    assert [h["train"] for h in hist_a] == [h["train"] for h in hist_b]


def test_parts_and_seeds(ucf, tmp_path, whole_run):
    cache = tmp_path / "cache"
    whole = whole_run[0]
    spec = _spec(ucf, tmp_path / "parts", cache)
    with pytest.raises(Exception, match="stage 1 has not finished"):
        protocol.run(spec, parts="stage-2")
    assert protocol.run(spec, parts="stage-1") is None
    assert protocol.run(spec, parts="stage-2") is None
    parts = protocol.run(spec, parts="eval")
    assert parts["metrics"] == whole["metrics"]  # same seed, same numbers, whichever way it is run

    other = protocol.run(_spec(ucf, tmp_path / "seed", cache, seed=7))
    assert other["seed"] == 7 and "seed7" in other["run_dir"]
    assert other["metrics"] != whole["metrics"]


def test_official_compat_uses_the_reference_class_vector_order(tmp_path):
    from avlowshot.data.benchmark import load_benchmark
    from avlowshot.data.synth import write_synthetic

    shared = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "UCF" / "class-split"
    if not shared.is_dir():
        pytest.skip("needs ../shared/benchmarks for the real UCF class names")
    root = write_synthetic("avca-cls", "UCF", tmp_path / "UCF", scale=0.05, seed=0, class_split=shared)
    cache = tmp_path / "cache"
    classes = load_benchmark("avca-cls", root, "UCF", cache_dir=cache).store.classes
    assert len(classes.misassigned_in_official_order()) == 79  # spec quirk 1: 79 of 101 UCF classes

    tiny = ["epochs=1", "n_batches=3", "batch_size=32"]
    fixed = protocol.run(_spec(root, tmp_path / "runs", cache, sets=tiny))
    spec = _spec(root, tmp_path / "runs", cache, compat="official", sets=tiny)
    official = protocol.run(spec)
    assert official["compat"] == "official" and spec.run_dir.name.endswith("_official")
    assert official["metrics"] != fixed["metrics"]  # same seed and batches, other class vectors
    if official["beta"] == 0:  # the reference's test-time stand-in for a zero beta
        assert official["beta_test"] == 1e-10
    else:
        assert official["beta_test"] == pytest.approx(official["beta"])


def test_config_errors_name_the_key_and_the_file(ucf, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: avca\nepochs: 3\nlearning_rate: 0.1\nmodel: {momentum: 0.99}\n")
    res = _cli_run(ucf, tmp_path / "runs", tmp_path / "cache", "--config", str(bad))
    assert res.exit_code == 2 and "learning_rate" in res.output and "bad.yaml" in res.output
    res = _cli_run(ucf, tmp_path / "runs", tmp_path / "cache", "--set", "epochs=many")
    assert res.exit_code == 2 and "epochs" in res.output and "many" in res.output
    res = _cli_run(ucf, tmp_path / "runs", tmp_path / "cache", "--set", "model.depth=3")
    assert res.exit_code == 2 and "model.depth" in res.output
    with pytest.raises(ConfigError, match="momentum"):
        load_config(None, method="avca", dataset="UCF", feature_set="cls", overrides=["model.momentum=fast"])
    res = _cli_run(ucf, tmp_path / "runs", tmp_path / "cache", "--device", "cuda:7")
    assert res.exit_code == 2 and "cuda" in res.output
    res = _cli_run(ucf, tmp_path / "runs", tmp_path / "cache", "--method", "nope")
    assert res.exit_code == 2
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("result.json"))


def test_gfsl_run_reports_each_repeat_and_mean_std(ucf, tmp_path):
    """GFSL derived from a GZSL root: base / novel / HM / FSL per stage-2 repeat and as mean +- std."""
    res = _cli_run(ucf, tmp_path / "runs", tmp_path / "cache", "--shots", "5", "--set", "epochs=2")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "avca_UCF_avca-cls_5shot_seed42"
    rec = json.loads((run_dir / "result.json").read_text())
    assert rec["task"] == "gfsl" and rec["shots"] == 5 and rec["split_family"] == "cls_split/5-shot"
    assert sorted(p.name for p in (run_dir / "stage-2").iterdir()) == ["repeat-0", "repeat-1", "repeat-2"]
    assert len(rec["repeats"]) == 3 and set(rec["metrics"]) == {"base", "novel", "hm", "fsl"}
    for key in ("base", "novel", "fsl"):
        values = [r[key] for r in rec["repeats"]]
        assert rec["metrics"][key] == pytest.approx(np.mean(values), abs=1e-9)
        assert rec["metrics_std"][key] == pytest.approx(np.std(values), abs=1e-9)
    b, n = rec["metrics"]["base"], rec["metrics"]["novel"]
    assert rec["metrics"]["hm"] == pytest.approx(2 * b * n / (b + n), rel=1e-6)  # HM of the means, as AV-DIFF
    assert b > 3 * 100 / len(rec["per_class"][0]) and n > 3 * 100 / len(rec["per_class"][0])
    assert "repeat 2" in res.output and "±" in res.output


def test_substage_epochs_must_name_a_substage():
    with pytest.raises(ConfigError, match="substage_epochs.full.*no substages"):
        load_config(None, method="avca", dataset="UCF", feature_set="cls", overrides=["substage_epochs.full=3"])
    with pytest.raises(ConfigError, match=r"--set substage_epochs.fulll=3.*unknown substage \(known: full\)"):
        load_config(
            None, method="avdiff", dataset="UCF", feature_set="cls", shots=5, overrides=["substage_epochs.fulll=3"]
        )
    with pytest.raises(ConfigError, match=">= 1"):
        load_config(
            None, method="avdiff", dataset="UCF", feature_set="cls", shots=5, overrides=["substage_epochs.full=0"]
        )
    cfg = load_config(
        None, method="avdiff", dataset="UCF", feature_set="cls", shots=5, overrides=["substage_epochs.full=2"]
    )
    assert cfg.substage_epochs["full"] == 2


def test_prefetching_changes_no_number(ucf, tmp_path):
    """The background gather of the next batch (``prefetch``) yields the same batches: same losses, same metrics."""
    cache = tmp_path / "cache"
    on = protocol.run(_spec(ucf, tmp_path / "on", cache, sets=[*QUICK, "prefetch=always", "epochs=2"]), parts="stage-1")
    off = protocol.run(
        _spec(ucf, tmp_path / "off", cache, sets=[*QUICK, "prefetch=never", "epochs=2"]), parts="stage-1"
    )
    assert on is None and off is None
    hist = [json.loads(next((tmp_path / d).rglob("history.json")).read_text()) for d in ("on", "off")]
    assert [h["train"] for h in hist[0]] == [h["train"] for h in hist[1]]
    assert [h["val"] for h in hist[0]] == [h["val"] for h in hist[1]]


def test_python_run_spec_checks_as_the_command_does(tmp_path):
    """``avlowshot.api.run_spec`` is the command's wiring: the method / layout check and the config resolution
    (sets, variant) apply from Python too."""
    from avlowshot.api import run_spec

    with pytest.raises(ConfigError, match="method 'tcaf' cannot read this layout"):
        run_spec("tcaf", "avca-cls", "UCF", root_dir=tmp_path, log_dir=tmp_path / "runs")
    spec = run_spec(
        "avdiff", "avdiff", "UCF", root_dir=tmp_path, log_dir=tmp_path / "runs", shots=5, sets=["epochs=2"],
        variant="av-gan", threads=1,
    )  # fmt: skip
    assert spec.cfg.epochs == 2 and spec.shots == 5 and spec.threads == 1
    assert spec.cfg.variant == "av-gan"
