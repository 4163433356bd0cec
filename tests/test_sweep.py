"""Sweeps on a local Ray (2 CPUs, one instance for the module): kill midway + restart = uninterrupted, failures
recorded per run, named tables, report --table beside the published numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import avlowshot
from avlowshot import sweeps as sw
from avlowshot.cli import app
from avlowshot.sweeps.runner import read_status

ray = pytest.importorskip("ray")
runner = CliRunner()

TINY = ["epochs=3", "n_batches=4", "batch_size=32"]
SMALL_AVCA = ["model.embeddings_hidden_size=64", "model.decoder_hidden_size=64"]
RESULT_KEYS = ("metrics", "beta", "best_epoch", "per_class", "per_class_zsl", "val", "lr_drops")


@pytest.fixture(scope="module")
def local_ray():
    """One Ray instance for the module (start-up is the slow part on 2 cores); sweeps reuse it."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def grid(synth_root, tmp_path_factory):
    """2 methods x 2 seeds on tiny synthetic UCF roots, plus one run with a bad config key."""
    avca = synth_root("avca-cls", "UCF", scale=0.03)
    clip = synth_root("clipclap", "UCF", scale=0.03)
    path = tmp_path_factory.mktemp("grid") / "grid.yaml"
    sets = "[" + ", ".join(TINY) + "]"
    small = "[" + ", ".join(TINY + SMALL_AVCA) + "]"
    path.write_text(
        f"roots: {{UCF/avca-cls: '{avca}', UCF/clipclap: '{clip}'}}\n"
        "runs:\n"
        f"  - {{methods: [avca], layouts: [avca-cls], datasets: [UCF], seeds: [1, 2], set: {small}}}\n"
        f"  - {{methods: [clipclap], layouts: [clipclap], datasets: [UCF], seeds: [1, 2], set: {sets}}}\n"
        "  - {methods: [avca], layouts: [avca-cls], datasets: [UCF], seeds: [3], set: [epochs=2, model.depth=3]}\n"
    )
    return path


@pytest.fixture(scope="module")
def uninterrupted(grid, tmp_path_factory):
    """The reference: the same grid run to the end without interruption (in this process)."""
    log_dir = tmp_path_factory.mktemp("whole")
    summary = avlowshot.sweep(grid, log_dir=log_dir, executor="serial", cache_dir=log_dir / "cache")
    return log_dir, summary


def _records(log_dir: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(log_dir.glob("*/result.json")):
        rec = json.loads(f.read_text())
        out[f.parent.name] = {k: rec[k] for k in RESULT_KEYS}
    return out


def test_killed_sweep_restarts_to_the_same_records(local_ray, grid, uninterrupted, tmp_path):
    whole_dir, whole = uninterrupted
    assert len(whole.records) == 5 and len(whole.done) == 4
    [bad] = whole.failed
    assert bad["run"] == "avca_UCF_avca-cls_seed3" and "model.depth" in bad["error"] and "unknown key" in bad["error"]
    assert "FAILED avca_UCF_avca-cls_seed3" in whole.text() and "model.depth" in whole.text()

    log_dir = tmp_path / "runs"
    seen = []

    def kill_midway(progress):
        # once a run has checkpointed its first epoch (of 3), kill every run in flight (Ray force-cancels the workers)
        seen.append(progress.counts())
        if any(d.get("state") == "running" and (d.get("epoch") or 0) >= 1 for d in progress.details.values()):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sw.sweep(grid, log_dir=log_dir, on_update=kill_midway, cache_dir=tmp_path / "cache", poll_seconds=0.2)
    interrupted = [
        p.parent.name for p in log_dir.glob("*/stage-1/checkpoints") if not (p.parents[1] / "result.json").exists()
    ]
    assert interrupted, "the kill came before any run had checkpointed"
    before = {p.parent.name for p in log_dir.glob("*/result.json")}
    assert len(before) < 4  # killed midway: not every run had finished

    again = sw.sweep(grid, log_dir=log_dir, cache_dir=tmp_path / "cache")
    assert len(again.done) == 4 and [r["run"] for r in again.failed] == ["avca_UCF_avca-cls_seed3"]
    skipped = {r["run"] for r in again.done if r.get("skipped")}
    assert skipped == before  # finished runs are not run twice
    resumed = [read_status(r) for r in sw.plan(grid, log_dir=log_dir) if r.run_id in interrupted]
    assert all(s["state"] == "done" for s in resumed)
    assert _records(log_dir) == _records(whole_dir)  # same numbers as the uninterrupted sweep, bit for bit

    # a third start has nothing left to do
    third = sw.sweep(grid, log_dir=log_dir, executor="serial", cache_dir=tmp_path / "cache")
    assert all(r.get("skipped") for r in third.done) and len(third.done) == 4


def test_cli_dry_run_and_report_table(grid, uninterrupted):
    log_dir, _ = uninterrupted
    res = runner.invoke(app, ["sweep", str(grid), "--log-dir", str(log_dir), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "finished  avca_UCF_avca-cls_seed1" in res.output and "5 runs: 4 finished" in res.output
    assert "model.depth" in res.output

    rec = [json.loads((log_dir / f"avca_UCF_avca-cls_seed{s}" / "result.json").read_text()) for s in (1, 2)]
    hm = [r["metrics"]["hm"] for r in rec]
    mean, std = sum(hm) / 2, abs(hm[0] - hm[1]) / 2**0.5  # sample std of two values
    res = runner.invoke(app, ["report", "--log-dir", str(log_dir), "--table", "avca-cls"])
    assert res.exit_code == 0, res.output
    [row] = [line for line in res.output.splitlines() if line.startswith("| AVCA |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{mean:.2f} ± {std:.2f} (n=2) / 41.34 ({mean - 41.34:+.2f})"  # UCF GZSL
    assert cells[1] == "8.31" and cells[3] == "9.92"  # no runs: the published number alone
    [ale] = [line for line in res.output.splitlines() if line.startswith("| ALE |")]
    assert "35.37" in ale and "±" not in ale
    csv = runner.invoke(app, ["report", "--log-dir", str(log_dir), "--table", "avca-cls", "--format", "csv"]).output
    head = csv.splitlines()[0].split(",")
    [line] = [
        x.split(",") for x in csv.splitlines() if x.startswith("avca-cls,AVCA,avca,") and ",UCF," in x and ",hm," in x
    ]
    assert float(line[head.index("ours")]) == pytest.approx(mean, abs=1e-4) and line[head.index("n")] == "2"
    assert float(line[head.index("published")]) == 41.34
    tex = runner.invoke(app, ["report", "--log-dir", str(log_dir), "--table", "avca-cls", "--format", "latex"]).output
    assert r"\begin{tabular}" in tex and f"{mean:.2f} $\\pm$ {std:.2f}" in tex

    # the plain report groups the seeds: one row per method, n=2
    md = runner.invoke(app, ["report", "--log-dir", str(log_dir)]).output
    rows = [line for line in md.splitlines() if line.startswith("| avca ")]
    assert len(rows) == 1 and "| 2 | 1,2 |" in rows[0] and f"{mean:.2f} ± {std:.2f}" in rows[0]
    per_run = runner.invoke(app, ["report", "--log-dir", str(log_dir), "--by", "run"]).output
    assert len([line for line in per_run.splitlines() if line.startswith("| avca ")]) == 2


def test_tables_list_every_paper_table_and_unknown_methods_fail_per_run(tmp_path):
    res = runner.invoke(app, ["tables"])
    assert res.exit_code == 0
    for name in ["avca-main", "avca-cls", "tcaf", "clipclap"] + [f"avdiff-table{i}" for i in range(2, 7)]:
        assert f"{name}: " in res.output
    assert "Zorro" in res.output and "(method not registered yet)" not in res.output  # every row has its method

    res = runner.invoke(
        app,
        ["sweep", "--table", "avdiff-table2", "--root", f"UCF={tmp_path}", "--datasets", "UCF", "--shots", "5",
         "--methods", "avdiff,zorro", "--seeds", "1,2", "--set", "epochs=2", "--log-dir", str(tmp_path / "r"),
         "--dry-run"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "new       avdiff_UCF_avdiff_5shot_seed1  [AV-DIFF]" in res.output
    assert "new       zorro_UCF_avdiff_5shot_seed2  [Zorro]" in res.output
    assert "4 runs: 0 finished, 0 to resume, 4 new, 0 would fail" in res.output

    # the ablation rows run the shipped avdiff variants
    reqs = sw.plan(table="avdiff-table3", log_dir=tmp_path / "r", root_dir=tmp_path, datasets=["UCF"])
    by_row = {r.row: r for r in reqs}
    assert by_row["A_cross + A_c"].resolved["model"]["fusion"] == "cross"
    assert by_row["A (full everywhere)"].resolved["model"]["fusion"] == "full"
    assert by_row["A_self + A_c"].resolved["variant"] == "self-attention"
    assert by_row["A (full everywhere)"].run_id == "full-attention/avdiff_UCF_avdiff_5shot_seed42_full-attention"
    assert by_row["AV-DIFF"].error is None and by_row["AV-DIFF"].run_id == "avdiff_UCF_avdiff_5shot_seed42"

    # an unknown method (a grid of one's own) is that run's failure; the others are planned normally
    grid = tmp_path / "grid.yaml"
    grid.write_text("methods: [avca, nosuch]\nlayouts: [avca-cls]\ndatasets: [UCF]\n")
    reqs = {r.method: r for r in sw.plan(grid, log_dir=tmp_path / "r", root_dir=tmp_path)}
    assert reqs["avca"].error is None and "unknown method 'nosuch'" in reqs["nosuch"].error
    summary = sw.run_sweep([reqs["nosuch"]], executor="serial", show_progress=False)
    assert summary.failed[0]["error"].startswith("unknown method 'nosuch'")


def test_published_numbers_are_those_of_the_specs():
    """Every shipped number equals specs/results.md (where ../shared exists)."""
    from avlowshot.sweeps.tables import get_table, table_names

    results = Path(__file__).resolve().parents[2] / "shared" / "specs" / "results.md"
    if not results.is_file():
        pytest.skip("needs ../shared/specs/results.md")
    text = results.read_text()
    lines = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")]
            lines.setdefault(cells[0], []).append(cells[1:])
    n = 0
    for name in table_names():
        t = get_table(name)
        for row in t.rows:
            want = [f"{v:.2f}" for v in row.published]
            got = [[f"{float(c.strip('*')):.2f}" for c in cand] for cand in lines[row.label] if len(cand) >= len(want)]
            assert any(g[: len(want)] == want for g in got) or _split_gzsl(lines[row.label], want)
            n += len(want)
    assert n == 6 * (8 + 7 + 6 + 5) + 18 * 11 + 12 * (5 + 2 + 3 + 2)


def _split_gzsl(candidates, want):
    """GZSL tables ship HM and ZSL of a row as one row of 6; the specs hold them in two tables of 3."""
    rows = [[f"{float(c.strip('*')):.2f}" for c in cand] for cand in candidates if len(cand) == 3]
    return any(a + b == want for a in rows for b in rows)


def test_plots_render(uninterrupted, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    log_dir, _ = uninterrupted
    run_dir = log_dir / "avca_UCF_avca-cls_seed1"
    res = runner.invoke(app, ["plot", str(run_dir), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    sizes = {"beta": (800, 500), "training": (1000, 580), "per-class": (800, 500), "tsne": (700, 700)}
    for stem, size in sizes.items():
        png, pdf = tmp_path / "run" / f"{stem}.png", tmp_path / "run" / f"{stem}.pdf"
        with Image.open(png) as im:
            assert im.size == size, stem
            pixels = np.asarray(im.convert("L"))
        assert pixels.std() > 5, f"{stem}.png is blank"  # something was drawn
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000

    res = runner.invoke(app, ["plot", str(log_dir), "--out", str(tmp_path / "all"), "--table", "avca-cls", "--no-runs"])
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "all" / "table-avca-cls.png") as im:
        assert im.size[1] == 500 and im.size[0] >= 600
    assert not list((tmp_path / "all").rglob("beta.png"))  # --no-runs: the table only


def test_tune_searches_on_stage1_validation_and_writes_a_run_config(local_ray, synth_root, tmp_path):
    pytest.importorskip("optuna")
    from avlowshot.errors import ConfigError
    from avlowshot.sweeps.tune import tune
    from avlowshot.train.config import load_config

    root = synth_root("avca-cls", "UCF", scale=0.03)
    kw = dict(method="avca", layout="avca-cls", dataset="UCF", root_dir=root, log_dir=tmp_path / "tune",
              out=tmp_path / "best.yaml", sets=TINY + SMALL_AVCA, cache_dir=tmp_path / "cache")  # fmt: skip
    with pytest.raises(ConfigError, match="model.nope"):  # a bad key fails before Ray is asked for anything
        tune(space=["model.nope=uniform:0:1"], **kw)
    with pytest.raises(ConfigError, match="LOW < HIGH"):
        tune(space=["lr=loguniform:1e-2:1e-4"], **kw)

    best = tune(space=["lr=loguniform:1e-4:1e-2", "model.embedding_dropout=uniform:0:0.5"], num_samples=2, **kw)
    assert len(best["trials"]) == 2 and best["val_hm"] == max(t["val_hm"] for t in best["trials"])
    cfg = load_config(tmp_path / "best.yaml", method="avca", dataset="UCF", feature_set="cls")
    assert cfg.lr == pytest.approx(best["params"]["lr"]) and cfg.epochs == 3 and cfg.n_batches == 4
    assert cfg.model["embedding_dropout"] == pytest.approx(best["params"]["model.embedding_dropout"])
    for t in best["trials"]:  # stage 1 only: no stage 2, no test, no result record
        run_dir = Path(t["run_dir"])
        assert (run_dir / "stage-1" / "history.json").is_file()
        assert not (run_dir / "stage-2").exists() and not (run_dir / "result.json").exists()
        hist = json.loads((run_dir / "stage-1" / "history.json").read_text())
        assert t["val_hm"] == pytest.approx(100 * max(h["val"]["hm"] for h in hist))
    assert json.loads((tmp_path / "tune" / "tune-results.json").read_text())["best"]["params"] == best["params"]


def test_python_api_run_and_load_results(synth_root, uninterrupted, tmp_path, one_thread):
    pd = pytest.importorskip("pandas")
    log_dir, _ = uninterrupted
    # avlowshot.run writes the run directory a sweep writes, with the same numbers (one torch thread, as a run
    # asking for one CPU gets)
    rec = avlowshot.run("avca", "avca-cls", "UCF", root_dir=synth_root("avca-cls", "UCF", scale=0.03),
                        log_dir=tmp_path, sets=TINY + SMALL_AVCA, seed=1, cache_dir=log_dir / "cache")  # fmt: skip
    swept = json.loads((log_dir / "avca_UCF_avca-cls_seed1" / "result.json").read_text())
    assert rec["run_dir"] == str(tmp_path / "avca_UCF_avca-cls_seed1")
    assert {k: rec[k] for k in RESULT_KEYS} == {k: swept[k] for k in RESULT_KEYS} and rec["config"] == swept["config"]

    runs = avlowshot.load_results(log_dir)
    assert isinstance(runs, pd.DataFrame) and len(runs) == 4
    assert set(runs["method"]) == {"avca", "clipclap"} and sorted(runs["seed"]) == [1, 1, 2, 2]
    avca = runs[runs["method"] == "avca"].sort_values("seed")
    assert list(avca["hm"]) == pytest.approx([json.loads((log_dir / p / "result.json").read_text())["metrics"]["hm"]
                                              for p in avca["path"]])  # fmt: skip
    groups = avlowshot.load_results(log_dir, by="seed")
    assert len(groups) == 2 and list(groups["n"]) == [2, 2]
    g = groups[groups["method"] == "avca"].iloc[0]
    assert g["hm"] == pytest.approx(avca["hm"].mean()) and g["hm_std"] == pytest.approx(avca["hm"].std(ddof=1))
