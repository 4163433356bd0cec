"""``avlowshot bench`` at a tiny scale: the command runs and its JSON record has every field, with sane values."""

from __future__ import annotations

import json
import time

import torch
from typer.testing import CliRunner

from avlowshot.bench import gemm_throughput, step_flops_and_gemms
from avlowshot.cli import app

runner = CliRunner()


def test_bench_writes_a_complete_record(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--method", "avca", "--layout", "avca-cls", "--dataset", "UCF", "--scale", "0.03"]
    args += ["--batches", "2", "--set", "batch_size=32", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text())
    assert rec["method"] == "avca" and rec["device"] == "cpu" and rec["n_params"] == 3_330_908
    d, t, e, m = rec["data"], rec["train"], rec["eval"], rec["memory"]
    assert d["videos"] > 0 and d["open_seconds"] > 0 and d["reopen_seconds"] > 0 and d["feature_bytes"] > 0
    assert t["batch_size"] == 32 and t["timed_batches"] == 2
    assert 0 < t["data_share"] < 1 and t["samples_per_second"] > 0
    assert t["seconds_per_300_batch_epoch"] == t["seconds_per_batch"] * 300
    assert t["flops_per_step"] > 1e8 and t["achieved_flops_per_s"] > 0 and t["model_shapes_flops_per_s"] > 0
    assert 0 < t["fraction_of_gemm_throughput"]
    assert set(e["splits"]) == {"val", "test"} and e["betas"] == 16
    assert all(s["seconds"] > 0 and s["videos"] > 0 for s in e["splits"].values())
    assert m["peak_rss_bytes"] > 0
    assert "samples / s" in res.output
    # a second run reuses the synthetic benchmark and its cache
    res = runner.invoke(app, args + ["--no-eval"])
    assert res.exit_code == 0, res.output
    again = json.loads(out.read_text())
    assert again["data"]["synth_seconds"] is None and "eval" not in again


def test_flop_count_and_gemm_shapes_of_a_linear_step():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64)

    def step():
        layer(x).sum().backward()

    flops, gemms = step_flops_and_gemms(step)
    # forward 16x64 @ 64x32, backward: grad of weight (32x16 @ 16x64); no grad of the input (a leaf without grad)
    assert flops == 2 * 16 * 64 * 32 * 2
    assert sum(gemms.values()) == 2
    rates = gemm_throughput(gemms, torch.device("cpu"), min_seconds=0.01)
    assert rates["gemm_flops_per_step"] == flops and rates["model_shapes_flops_per_s"] > 0


def test_bench_refuses_bad_requests(tmp_path):
    base = ["bench", "--layout", "avca-cls", "--dataset", "UCF", "--scale", "0.03", "--work-dir", str(tmp_path)]
    res = runner.invoke(app, base + ["--method", "nope"])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(app, base + ["--method", "avca", "--batches", "0"])
    assert res.exit_code == 2 and "--batches" in res.output


def test_bench_table_rows_cover_every_trainable_method():
    from avlowshot.bench import table_rows
    from avlowshot.models.registry import METHODS

    ucf = {r.method: r for r in table_rows("UCF")}
    assert set(ucf) == {n for n, c in METHODS.items() if c.trainable}
    assert (ucf["avca"].layout, ucf["clipclap"].layout, ucf["tcaf"].layout) == ("avca-cls", "clipclap", "tcaf-cls")
    assert (ucf["avdiff"].layout, ucf["avdiff"].shots, ucf["perceiver"].layout) == ("avdiff", 5, "avdiff")
    vgg = {r.method: r for r in table_rows("VGGSound")}
    assert (vgg["mbt"].layout, vgg["mbt"].shots) == ("tcaf-cls", 5)
    # a curriculum method: one row per substage, evaluation timed on the first
    avdiff = [(r.substage, r.evaluate) for r in table_rows("UCF", ["avdiff"])]
    assert avdiff == [("base", True), ("full", False)]
    assert [r.substage for r in table_rows("UCF", ["fvaegan"])] == ["generator", "classifier"]


def test_bench_times_a_named_substage_and_refuses_an_unknown_one(tmp_path):
    base = ["bench", "--method", "fvaegan", "--layout", "avca-cls", "--dataset", "UCF", "--scale", "0.03",
            "--batches", "1", "--no-eval", "--work-dir", str(tmp_path)]  # fmt: skip
    res = runner.invoke(app, base + ["--substage", "generator", "--out", str(tmp_path / "g.json")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "g.json").read_text())
    # the generator substage: critic steps and a generator step on one batch (a gradient penalty inside)
    assert rec["substage"] == "generator" and rec["train"]["optimizer_steps_per_iteration"] > 1
    assert rec["train"]["batches_per_iteration"] == 1 and rec["train"]["flops_per_step"] > 0
    res = runner.invoke(app, base + ["--substage", "nope"])
    assert res.exit_code == 2 and "fvaegan has the substages generator, classifier" in res.output
    res = runner.invoke(app, ["bench", "--method", "ale", "--layout", "avca-cls", "--dataset", "UCF", "--scale",
                              "0.03", "--substage", "x", "--work-dir", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 2 and "no substages" in res.output


def test_bench_table_runs_each_row_in_its_own_process_and_prints_markdown(tmp_path):
    args = ["bench-table", "--dataset", "UCF", "--methods", "ale", "--scale", "0.03", "--batches", "1",
            "--work-dir", str(tmp_path), "--out", str(tmp_path / "speed.md")]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "results" / "ale_UCF_avca-cls_scale0.03_cpu.json").read_text())
    assert record["method"] == "ale" and record["train"]["batch_size"] == 256  # the published batch size
    table = (tmp_path / "speed.md").read_text()
    assert table.splitlines()[0].startswith("| method | benchmark | batch | ms / step")
    row = table.splitlines()[2]
    assert row.startswith("| ale | UCF avca-cls (") and row in res.output
    again = runner.invoke(app, args + ["--reuse"])  # the record is kept, not measured again
    assert again.exit_code == 0 and row in again.output
    res = runner.invoke(app, ["bench-table", "--dataset", "UCF", "--methods", "ale,nope", "--work-dir", str(tmp_path)])
    assert res.exit_code == 2 and "unknown method(s) nope" in res.output


def test_stage_set_up_is_not_charged_to_the_data_path(tmp_path, monkeypatch):
    """Samplers and observe hooks run once per stage (ProtoGAN's prototypes read the whole training set): the bench
    times them apart, so a slow set-up does not inflate the per-step data path."""
    from avlowshot.train.trainer import Trainer

    samplers = Trainer.samplers

    def slow_samplers(self, *args, **kwargs):
        time.sleep(0.5)
        return samplers(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "samplers", slow_samplers)
    out = tmp_path / "ale.json"
    args = ["bench", "--method", "ale", "--layout", "avca-cls", "--dataset", "UCF", "--scale", "0.03",
            "--batches", "2", "--no-eval", "--work-dir", str(tmp_path), "--out", str(out)]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    t = json.loads(out.read_text())["train"]
    assert t["stage_setup_seconds"] >= 0.5 and t["data_seconds"] < 0.1
    assert "stage set-up" in res.output
