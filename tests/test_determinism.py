"""Same seed, same numbers: repeated runs (in this process and in a fresh CLI process) at a recorded thread count
give identical histories and metrics; a run directory refuses to continue under another thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avlowshot.errors import ConfigError
from avlowshot.train import protocol
from avlowshot.train.config import load_config

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["epochs=2", "n_batches=4", "batch_size=32"]
NAME = "avca_UCF_avca-cls_seed42"


@pytest.fixture(scope="module")
def ucf(synth_root):
    return synth_root("avca-cls", "UCF", scale=0.1)


def _spec(root: Path, log_dir: Path, cache: Path, threads: int | None = None) -> protocol.RunSpec:
    cfg = load_config(None, method="avca", dataset="UCF", feature_set="cls", overrides=TINY)
    return protocol.RunSpec(
        method="avca", layout="avca-cls", dataset="UCF", root_dir=root, log_dir=log_dir, cfg=cfg, cache_dir=cache,
        threads=threads,
    )  # fmt: skip


def _numbers(run_dir: Path) -> dict:
    """Everything that must repeat bit for bit: per-epoch losses and val metrics of both stages, test metrics."""
    result = json.loads((run_dir / "result.json").read_text())
    hist = {s: json.loads((run_dir / s / "history.json").read_text()) for s in ("stage-1", "stage-2")}
    per_epoch = {s: [(r["train"], r.get("val")) for r in h] for s, h in hist.items()}
    return {"epochs": per_epoch, "metrics": result["metrics"], "beta": result["beta"], "val": result["val"]}


def test_same_seed_same_numbers_in_this_process_and_in_a_fresh_one(ucf, tmp_path):
    cache = tmp_path / "cache"
    runs = [protocol.run(_spec(ucf, tmp_path / f"in-{i}", cache, threads=2)) for i in range(2)]
    assert runs[0]["threads"] == 2 and runs[0]["eval_threads"] == 2
    assert json.loads((tmp_path / "in-0" / NAME / "run.json").read_text())["threads"] == 2
    args = [
        "run", "--method", "avca", "--layout", "avca-cls", "--dataset", "UCF", "--root-dir", str(ucf),
        "--log-dir", str(tmp_path / "cli"), "--cache-dir", str(cache), "--threads", "2", "--quiet",
    ]  # fmt: skip
    for item in TINY:
        args += ["--set", item]
    code = "import sys; from avlowshot.cli import app; sys.argv[0] = 'avlowshot'; app()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = _numbers(tmp_path / "in-0" / NAME)
    for other in (tmp_path / "in-1" / NAME, tmp_path / "cli" / NAME):
        assert _numbers(other) == first
    assert first["metrics"]["hm"] > 0  # a real run, not an empty record


def test_a_run_directory_keeps_its_thread_count(ucf, tmp_path):
    cache = tmp_path / "cache"
    before = torch.get_num_threads()
    protocol.run(_spec(ucf, tmp_path, cache, threads=1), parts="stage-1")
    assert torch.get_num_threads() == before  # restored after the run
    run_dir = tmp_path / NAME
    assert json.loads((run_dir / "run.json").read_text())["threads"] == 1
    with pytest.raises(ConfigError, match=r"trained with 1 threads, --threads 2 .*continue with --threads 1"):
        protocol.run(_spec(ucf, tmp_path, cache, threads=2), parts="stage-2")
    # without --threads the recorded count is used: stage 2 and the record say 1
    seen = []
    spec = _spec(ucf, tmp_path, cache)
    result = protocol.run(spec, parts="all", resume=True, on_stage=lambda s: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {1} and result["threads"] == 1


def test_bad_thread_counts_are_config_errors(ucf, tmp_path):
    for bad in (0, -1, 10**6):
        with pytest.raises(ConfigError, match="--threads"):
            protocol.run(_spec(ucf, tmp_path, tmp_path / "cache", threads=bad))
    assert not (tmp_path / NAME).exists()
