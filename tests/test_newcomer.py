"""A newcomer's first hour through the CLI: errors that show their keys and real options, user mistakes caught before
anything is written, failed starts and Ctrl-C that leave a resumable state, settings that are explicit."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.models import registry

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
TINY = ["epochs=2", "n_batches=3", "batch_size=16", "eval_batch_size=256", "model.embeddings_hidden_size=32",
        "model.decoder_hidden_size=16"]  # fmt: skip


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def _options_of(command: str) -> set[str]:
    cmd = get_command(app).commands[command]  # type: ignore[attr-defined]
    return {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", ())) if o.startswith("--")}


def _assert_real_options(command: str, output: str) -> None:
    """Every --option an error names (in its text or its fix) is an option of the command that printed it."""
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", output))
    assert named <= _options_of(command), (command, named - _options_of(command), output)


def _run(root, tmp_path, *extra, method="avca", layout="avca-cls", dataset="UCF"):
    args = ["run", "--method", method, "--layout", layout, "--dataset", dataset, "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    return runner.invoke(app, args + list(extra))


# ---------------------------------------------------------------------------------------------------------------
# 2. errors show their [key] and name options the command has; unknown names list the valid ones


def test_errors_keep_their_key_and_name_real_options(synth_root, tmp_path):
    root = synth_root("avca-cls")
    res = runner.invoke(app, ["check-data", "--layout", "avdiff", "--root-dir", str(root), "--dataset", "UCF"])
    assert res.exit_code == 2 and "[shots]: the avdiff layout needs --shots" in res.output, res.output
    _assert_real_options("check-data", res.output)
    res = runner.invoke(app, ["embed-classes", "--encoder", "w2v", "--classes", str(root / "class-split" /
                                                                                 "all_class.txt"),
                              "--out", str(tmp_path / "x.npy")])  # fmt: skip
    assert res.exit_code == 2 and "pass --weights" in res.output, res.output
    _assert_real_options("embed-classes", res.output)
    res = runner.invoke(app, ["embed-classes", "--encoder", "glove", "--classes", str(root / "class-split" /
                                                                                   "all_class.txt"),
                              "--out", str(tmp_path / "x.npy")])  # fmt: skip
    assert res.exit_code == 2 and "use one of w2v, clip, clap, clip+clap, minilm" in res.output, res.output
    res = _run(root, tmp_path, method="avcaa")
    known = ", ".join(sorted(registry.METHODS))
    assert res.exit_code == 2 and f"known methods: {known}" in res.output, res.output
    res = runner.invoke(app, ["check-data", "--layout", "avca", "--root-dir", str(root), "--dataset", "UCF"])
    assert res.exit_code == 2 and "[layout]" in res.output and "avca-cls, avca-main, tcaf-cls" in res.output
    res = _run(root, tmp_path, "--compat", "fixed")
    assert res.exit_code == 2 and "none, official" in res.output
    res = runner.invoke(app, ["extract", "--features", "cls", "--videos", str(tmp_path), "--out", str(tmp_path / "o"),
                              "--weights", str(tmp_path), "--compat", "quirks"])  # fmt: skip
    assert res.exit_code == 2 and "use none or official" in res.output, res.output
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. user mistakes, caught before anything is written


def test_fewer_than_two_seen_classes_and_case_only_dataset_names(synth_root, tmp_path):
    import shutil

    root = tmp_path / "UCF"
    shutil.copytree(synth_root("avca-cls"), root)
    listed = root / "class-split" / "cls_split" / "stage_1_train.txt"
    listed.write_text(listed.read_text().splitlines()[0] + "\n")
    res = runner.invoke(app, ["check-data", "--layout", "avca-cls", "--root-dir", str(root), "--dataset", "UCF"])
    assert res.exit_code == 2 and "[stage_1_train]: 1 seen training class(es)" in res.output, res.output
    res = _run(root, tmp_path, *_sets(TINY))
    assert res.exit_code == 2 and "at least 2" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()
    res = _run(synth_root("avca-cls"), tmp_path, *_sets(TINY), dataset="ucf")
    assert res.exit_code == 2 and "only in case" in res.output and "--dataset UCF" in res.output, res.output
    res = runner.invoke(app, ["check-data", "--layout", "avca-cls", "--root-dir", str(root), "--dataset", "vggsound"])
    assert res.exit_code == 2 and "use --dataset VGGSound" in res.output
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. a failed start leaves nothing in the way; Ctrl-C says how to continue


def test_failed_start_leaves_no_run_directory(synth_root, tmp_path):
    root = synth_root("tcaf-main", scale=0.02)
    tiny = ["epochs=1", "n_batches=2", "batch_size=8", "model.transformer_heads=2", "model.transformer_dim_head=8"]
    # rec_loss needs transformer_dim = the 300-d text: the model build fails after the run directory was made
    res = _run(root, tmp_path, *_sets(tiny + ["model.transformer_dim=32"]), method="tcaf", layout="tcaf-main")
    assert res.exit_code == 2 and "transformer_dim" in res.output, res.output
    assert not (tmp_path / "runs" / "tcaf_UCF_tcaf-main_seed42").exists()
    res = _run(root, tmp_path, *_sets(tiny), method="tcaf", layout="tcaf-main")  # the corrected command
    assert res.exit_code == 0, res.output
    # a run directory without a finished epoch (e.g. killed during loading) is taken over by a corrected command
    run_dir = tmp_path / "runs" / "tcaf_UCF_tcaf-main_seed7"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"method": "tcaf", "layout": "tcaf-main", "dataset": "UCF",
                                                  "shots": None, "seed": 7, "compat": "none"}))  # fmt: skip
    (run_dir / "config.yaml").write_text("method: tcaf\nepochs: 7\n")
    (run_dir / "stage-1").mkdir()
    (run_dir / "stage-1" / "events.out").write_text("")
    res = _run(root, tmp_path, *_sets(tiny), "--seed", "7", method="tcaf", layout="tcaf-main")
    assert res.exit_code == 0, res.output
    assert "epochs: 1" in (run_dir / "config.yaml").read_text()


def test_ctrl_c_prints_where_the_run_stopped_and_the_resume_command(synth_root, tmp_path):
    root = synth_root("avca-cls")
    sets = ["epochs=3", "n_batches=20", "batch_size=16", "model.embeddings_hidden_size=32"]
    args = ["run", "--method", "avca", "--layout", "avca-cls", "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), *_sets(sets)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    # The child takes Ctrl-C as a foreground terminal run does (a test started from a background job, e.g. `pytest &`
    # in a script, inherits an ignored SIGINT, and Python then never raises KeyboardInterrupt), and it waits after
    # logging stage-1's first epoch, so that the signal lands in a live run at a known point.
    code = """import signal, sys, time, torch
signal.signal(signal.SIGINT, signal.default_int_handler)
from avlowshot.train.trainer import Trainer
log = Trainer._log
def log_and_wait(self, writer, epoch, *rest):
    log(self, writer, epoch, *rest)
    if self.name == "stage-1" and epoch == 0:
        time.sleep(60)
Trainer._log = log_and_wait
torch.set_num_threads(1); sys.argv[0] = "avlowshot"
from avlowshot.cli import app; app()
"""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    deadline = time.time() + 240
    for line in proc.stderr:  # type: ignore[union-attr]
        lines.append(line)
        if "stage-1 epoch 1/3" in line:
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "".join(lines)
    rest = proc.stderr.read()  # type: ignore[union-attr]
    assert proc.wait(60) == 130, "".join(lines) + rest
    assert "Traceback" not in rest
    assert re.search(r"interrupted: .*avca_UCF_avca-cls_seed42: stage-1 after epoch 1 finished", rest), rest
    command = re.search(r"continue with: (.*)", rest).group(1)
    words = shlex.split(command)
    assert words[:2] == ["avlowshot", "run"] and words[-1] == "--resume" and "epochs=3" in words
    res = runner.invoke(app, words[1:])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "avca_UCF_avca-cls_seed42" / "result.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# 6. explicit settings


def test_partial_config_is_merged_over_the_shipped_one(synth_root, tmp_path):
    root = synth_root("avca-cls")
    partial = tmp_path / "mine.yaml"
    partial.write_text("method: avca\nepochs: 1\nn_batches: 2\nbatch_size: 8\nmodel:\n  decoder_hidden_size: 16\n")
    res = _run(root, tmp_path, "--config", str(partial))
    assert res.exit_code == 0, res.output
    saved = (tmp_path / "runs" / "avca_UCF_avca-cls_seed42" / "config.yaml").read_text()
    # the shipped ucf-cls values (512 / 0.2), not the code defaults (1024 / 0.8); the file's own keys win
    assert "embeddings_hidden_size: 512" in saved and "embedding_dropout: 0.2" in saved
    assert "decoder_hidden_size: 16" in saved and "epochs: 1" in saved
    # no shipped config for hyper-alignment on clipclap features: a partial file is refused with what it lacks
    (tmp_path / "cc.yaml").write_text("method: hyper-alignment\nepochs: 1\n")
    res = _run(synth_root("clipclap", scale=0.02), tmp_path, "--config", str(tmp_path / "cc.yaml"),
               method="hyper-alignment", layout="clipclap")  # fmt: skip
    assert res.exit_code == 2 and "leaves out" in res.output and "no config is shipped" in res.output, res.output


def test_shots_inferred_synth_shots_for_gzsl_and_gfsl_epoch_lines(synth_root, tmp_path):
    avdiff = synth_root("avdiff", scale=0.02, shots=1)
    res = runner.invoke(app, ["check-data", "--layout", "avdiff", "--root-dir", str(avdiff), "--dataset", "UCF"])
    assert res.exit_code == 0 and "GFSL protocol, 1 shots" in res.output, res.output
    out = tmp_path / "UCF"
    res = runner.invoke(app, ["synth", "--layout", "avca-cls", "--dataset", "UCF", "--out", str(out), "--scale",
                              "0.01", "--shots", "5"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["check-data", "--layout", "avca-cls", "--root-dir", str(out), "--dataset", "UCF",
                              "--shots", "5"])  # fmt: skip
    assert res.exit_code == 0, res.output  # every novel class has k shots + a test video
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("avlowshot.train").addHandler(handler)
    try:
        res = runner.invoke(app, ["run", "--method", "avca", "--layout", "avca-cls", "--dataset", "UCF", "--root-dir",
                                  str(out), "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c"),
                                  "--shots", "5", *_sets(["epochs=1", "n_batches=2", "batch_size=8"])])  # fmt: skip
    finally:
        logging.getLogger("avlowshot.train").removeHandler(handler)
    assert res.exit_code == 0, res.output
    epoch = [x for x in lines if "stage-1 epoch 1/1" in x]
    assert epoch and " val base " in epoch[0] and " novel " in epoch[0] and " FSL " in epoch[0], lines


# ---------------------------------------------------------------------------------------------------------------
# 7. synthetic ClipClap roots carry the authors' CLIP class names


@pytest.mark.skipif(not (SHARED / "UCF" / "class-split").is_dir(), reason="needs ../shared/benchmarks")
def test_synth_clipclap_writes_the_clip_class_names(tmp_path):
    from avlowshot.data.benchmark import read_class_table
    from avlowshot.data.layouts import get_layout

    out = tmp_path / "UCF"
    res = runner.invoke(app, ["synth", "--layout", "clipclap", "--dataset", "UCF", "--out", str(out), "--scale",
                              "0.01", "--class-split", str(SHARED / "UCF" / "class-split")])  # fmt: skip
    assert res.exit_code == 0, res.output
    with open(out / "class-split" / "ucf_clip_class_names.csv", newline="") as fh:
        rows = {r["original"]: r for r in csv.DictReader(fh)}
    assert rows["CleanAndJerk"]["clip_class_name"] == "Clean And Jerk" and rows["CleanAndJerk"]["manual"] == (
        "Weight Lifting"
    )
    assert rows["HandstandPushups"]["clip_class_name"] == "Hand Stand Pushups"
    table = read_class_table(get_layout("clipclap"), out, "UCF")
    # the reference pairs the k-th sorted embedding key with the k-th class: with CLIP names that is the same class
    assert (table.embeddings("official") == table.embeddings("by-name")).all()
    chk = runner.invoke(app, ["check-data", "--layout", "clipclap", "--root-dir", str(out), "--dataset", "UCF"])
    assert chk.exit_code == 0, chk.output
