"""Damaged run folders, bad configs, kills and a full disk: a clear error (exit 2) naming the file and the fix, the
run folder left as it was, and ``--resume`` finishing with the numbers of an undisturbed run."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data import cache as cache_mod
from avlowshot.train import checkpoint as ckpt

runner = CliRunner()
QUICK = ["epochs=2", "n_batches=3", "batch_size=32"]
NAME = "avca_UCF_avca-cls_seed42"


def _run_args(root: Path, log_dir: Path, cache: Path, *extra: str) -> list[str]:
    args = ["run", "--method", "avca", "--layout", "avca-cls", "--dataset", "UCF", "--root-dir", str(root)]
    args += ["--log-dir", str(log_dir), "--cache-dir", str(cache), "--quiet"]
    for item in QUICK:
        args += ["--set", item]
    return args + list(extra)


@pytest.fixture(scope="module")
def finished(synth_root, tmp_path_factory):
    """(dataset root, cache folder, a finished run folder, its result record), shared read-only."""
    root = synth_root("avca-cls")
    base = tmp_path_factory.mktemp("finished")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture (function-scoped) does for the tests
    try:
        res = runner.invoke(app, _run_args(root, base / "runs", base / "cache"))
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    run_dir = base / "runs" / NAME
    return root, base / "cache", run_dir, json.loads((run_dir / "result.json").read_text())


def _copy_run(finished, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / NAME
    shutil.copytree(finished[2], dst)
    return dst


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _tmp_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith(".tmp") or ".old-" in p.name or ".tmp-" in p.name]


# ----------------------------------------------------------------------------------------------------------------
# Damaged run folders. Each damage returns (file named in the message, message, whether the run is finished).

S2 = Path("stage-2/checkpoints/epoch-001")


def _resign(folder: Path) -> None:
    """Update the sidecar's checksums, as if the damage had happened before the checkpoint was written."""
    meta = json.loads((folder / "model.json").read_text())
    meta["files"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in meta["files"]}
    (folder / "model.json").write_text(json.dumps(meta))


def _unfinish(run_dir: Path) -> None:
    """Stage 2 in progress: what ``run --resume`` restores from its last checkpoint."""
    (run_dir / "stage-2" / "summary.json").unlink()
    (run_dir / "result.json").unlink()


def _safetensors_truncated(run_dir):
    f = run_dir / S2 / "model.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    _resign(f.parent)
    return f, "not a readable safetensors file: corrupt or truncated", True


def _safetensors_header(run_dir):
    f = run_dir / S2 / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"{not json at all"
    f.write_bytes(bytes(data))
    _resign(f.parent)
    return f, "not a readable safetensors file: corrupt or truncated", True


def _weights_changed(run_dir):
    f = run_dir / S2 / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    return f, "the file was changed after it was written (its sha256 no longer matches model.json)", True


def _missing_key(run_dir):
    f = run_dir / S2 / "model.safetensors"
    tensors = load_file(f)
    gone = sorted(tensors)[0]
    tensors.pop(gone)
    save_file(tensors, f)
    _resign(f.parent)
    return f, f"the weights do not fit the run's model (missing {gone})", True


def _wrong_shape(run_dir):
    f = run_dir / S2 / "model.safetensors"
    tensors = load_file(f)
    key = sorted(tensors)[-1]
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, f)
    _resign(f.parent)
    return f, f"'{key}' is (3, 3), the model has", True


def _sidecar_without_files(run_dir):
    f = run_dir / S2 / "model.json"
    meta = json.loads(f.read_text())
    meta.pop("files")
    f.write_text(json.dumps(meta))
    return f, "the sidecar lacks 'files'", True


def _summary_without_field(run_dir):
    f = run_dir / "stage-2" / "summary.json"
    meta = json.loads(f.read_text())
    meta.pop("checkpoint_last")
    f.write_text(json.dumps(meta))
    return f, "lacks the field 'checkpoint_last'", True


def _state_not_plain(run_dir):
    _unfinish(run_dir)
    f = run_dir / S2 / "state.pt"
    torch.save({"optimizer": torch.nn.Linear(2, 2), "scheduler": None, "rng": {}}, f)
    _resign(f.parent)
    return f, "refused: it holds objects other than tensors and plain containers", False


def _state_a_list(run_dir):
    _unfinish(run_dir)
    f = run_dir / S2 / "state.pt"
    torch.save([1, 2, 3], f)
    _resign(f.parent)
    return f, "not a training state: expected a dict with 'optimizer', 'scheduler', 'rng' (found list)", False


def _optimiser_of_other_parameters(run_dir):
    _unfinish(run_dir)
    f = run_dir / S2 / "state.pt"
    state = torch.load(f, weights_only=True)
    first = sorted(state["optimizer"]["state"])[0]
    state["optimizer"]["state"][first]["exp_avg"] = torch.zeros(7)
    torch.save(state, f)
    _resign(f.parent)
    return f, "the optimiser state belongs to other parameters ('exp_avg' of parameter 0 is (7,)", False


def _optimiser_groups(run_dir):
    _unfinish(run_dir)
    f = run_dir / S2 / "state.pt"
    state = torch.load(f, weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    group["params"] = group["params"][:-1]
    torch.save(state, f)
    _resign(f.parent)
    return f, "the optimiser state belongs to other parameters (parameter groups of", False


def _sidecar_without_trainer(run_dir):
    _unfinish(run_dir)
    f = run_dir / S2 / "model.json"
    meta = json.loads(f.read_text())
    meta.pop("trainer")
    f.write_text(json.dumps(meta))
    return f, "the sidecar lacks the trainer fields best_epoch", False


def _state_changed(run_dir):
    _unfinish(run_dir)
    f = run_dir / S2 / "state.pt"
    f.write_bytes(f.read_bytes() + b"\0")
    return f, "the file was changed after it was written", False


DAMAGES = [
    _safetensors_truncated,
    _safetensors_header,
    _weights_changed,
    _missing_key,
    _wrong_shape,
    _sidecar_without_files,
    _summary_without_field,
    _state_not_plain,
    _state_a_list,
    _optimiser_of_other_parameters,
    _optimiser_groups,
    _sidecar_without_trainer,
    _state_changed,
]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_damaged_run_folder(damage, finished, tmp_path, one_thread):
    root, cache, _, _ = finished
    run_dir = _copy_run(finished, tmp_path)
    path, message, is_finished = damage(run_dir)
    before = _digest(run_dir)
    commands = [_run_args(root, tmp_path / "runs", cache, "--resume")]
    if is_finished:  # evaluate and predict read only finished runs
        commands.append(["evaluate", "--run-dir", str(run_dir), "--cache-dir", str(cache)])
        ask = ["predict", "--run-dir", str(run_dir), "--cache-dir", str(cache), "--classes", "class_000"]
        commands.append([*ask, "--features", str(tmp_path / "never-read.npz")])
    for cmd in commands:
        res = runner.invoke(app, cmd)
        out = " ".join(res.output.split())
        assert res.exit_code == 2, (cmd[0], res.output, res.exception)
        assert f"{path}: " in out and message in out, (cmd[0], out)
        assert "fix: delete" in out and "--resume" in out
        assert "Traceback" not in out and "weights_only=False" not in out and "WeightsUnpickler" not in out
        assert _digest(run_dir) == before, cmd[0]


def test_damaged_checkpoint_fix_works(finished, tmp_path, one_thread):
    """Doing what the message says (delete the folder and the summary, resume) gives the undisturbed numbers."""
    root, cache, _, whole = finished
    run_dir = _copy_run(finished, tmp_path)
    _weights_changed(run_dir)
    shutil.rmtree(run_dir / S2)
    (run_dir / "stage-2" / "summary.json").unlink()
    res = runner.invoke(app, _run_args(root, tmp_path / "runs", cache, "--resume"))
    assert res.exit_code == 0, res.output
    again = json.loads((run_dir / "result.json").read_text())
    assert again["metrics"] == whole["metrics"] and again["per_class"] == whole["per_class"]


# ----------------------------------------------------------------------------------------------------------------
# Configs


def test_unknown_beta_grid_is_a_config_error(finished, tmp_path):
    root, cache, _, _ = finished
    res = runner.invoke(app, _run_args(root, tmp_path / "runs", cache, "--set", "beta_grid=avcaa"))
    assert res.exit_code == 2, res.output
    assert "--set beta_grid=avcaa: 'beta_grid': Value error, not a known grid (known: avca, avdiff" in res.output
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("method: avca\nbeta_grid: fine\n")
    res = runner.invoke(app, _run_args(root, tmp_path / "runs", cache, "--config", str(cfg)))
    assert res.exit_code == 2 and f"{cfg}: 'beta_grid'" in res.output and "not a known grid" in res.output
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------
# Kills: a process killed (os._exit, no clean-up runs) in the middle of an atomic write


KILLER = """
import os, sys
import torch
torch.set_num_threads(1)
real = os.replace
def replace(src, dst, *a, **k):
    if os.path.basename(str(dst)) == sys.argv[1] and os.path.basename(str(src)).startswith(sys.argv[2]):
        os._exit(137)  # killed after the temporary file / folder is complete, before it is renamed into place
    return real(src, dst, *a, **k)
os.replace = replace
from avlowshot.cli import app
app(sys.argv[3:])
"""


def _killed(args: list[str], target: str, tmp_prefix: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-c", KILLER, target, tmp_prefix, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_kill_during_result_write_then_resume(finished, tmp_path, one_thread):
    root, cache, _, whole = finished
    run_dir = _copy_run(finished, tmp_path)
    (run_dir / "result.json").unlink()
    args = _run_args(root, tmp_path / "runs", cache, "--resume")
    proc = _killed(args, "result.json", ".result.json.")
    assert proc.returncode == 137, proc.stderr
    left = _tmp_leftovers(run_dir)
    assert [p.name.startswith(".result.json.") and p.name.endswith(".tmp") for p in left] == [True]
    assert not (run_dir / "result.json").exists()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert _tmp_leftovers(run_dir) == []
    again = json.loads((run_dir / "result.json").read_text())
    assert again["metrics"] == whole["metrics"] and again["beta"] == whole["beta"]


def test_kill_during_checkpoint_write_then_resume(finished, tmp_path, one_thread):
    root, cache, _, whole = finished
    args = _run_args(root, tmp_path / "runs", cache)
    proc = _killed(args, "epoch-001", ".epoch-001.")  # stage 1, second epoch
    assert proc.returncode == 137, proc.stderr
    run_dir = tmp_path / "runs" / NAME
    left = _tmp_leftovers(run_dir)
    assert len(left) == 1 and left[0].parent.name == "checkpoints" and left[0].name.startswith(".epoch-001.")
    assert (left[0] / "model.json").is_file()  # complete, but never renamed: not a checkpoint
    assert ckpt.list_checkpoints(run_dir / "stage-1" / "checkpoints") == [0]
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert _tmp_leftovers(run_dir) == []
    again = json.loads((run_dir / "result.json").read_text())
    assert again["metrics"] == whole["metrics"] and again["per_class"] == whole["per_class"]


def test_checkpoint_moved_aside_is_put_back(tmp_path):
    """Killed between moving the old checkpoint aside and renaming the new one into place."""
    ck = tmp_path / "stage-1" / "checkpoints"
    c = ckpt.save_checkpoint(ckpt.epoch_dir(ck, 3), {"w": torch.ones(2)}, {"epoch": 3})
    os.replace(c.path, ck / ".epoch-003.old-4242")
    (ck / ".epoch-003.abcd.tmp").mkdir()
    (tmp_path / ".result.json.x1.tmp").write_text("{")
    removed = ckpt.remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".epoch-003.abcd.tmp", ".result.json.x1.tmp"]
    assert ckpt.list_checkpoints(ck) == [3] and _tmp_leftovers(tmp_path) == []
    assert torch.equal(ckpt.load_checkpoint(ckpt.epoch_dir(ck, 3)).model_state()["w"], torch.ones(2))


# ----------------------------------------------------------------------------------------------------------------
# Disk full


def _enospc_for(monkeypatch, module, name: str, when) -> list[str]:
    """Make ``module.name`` raise ENOSPC for the calls ``when(*args)`` selects; returns the paths refused."""
    real = getattr(module, name)
    refused: list[str] = []

    def full(*args, **kw):
        if when(*args):
            refused.append(str(args[0]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kw)

    monkeypatch.setattr(module, name, full)
    return refused


def test_disk_full_while_checkpointing_then_resume(finished, tmp_path, monkeypatch, one_thread):
    root, cache, _, whole = finished
    args = _run_args(root, tmp_path / "runs", cache)
    refused = _enospc_for(monkeypatch, ckpt, "_write_file", lambda p, *_: "stage-1" in str(p) and "epoch-001" in str(p))
    res = runner.invoke(app, args)
    run_dir = tmp_path / "runs" / NAME
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert refused and f"{run_dir / 'stage-1' / 'checkpoints'}: no space left on the device" in out
    assert "while writing checkpoint epoch-001 (needs" in out and "free at least" in out and "--resume" in out
    assert _tmp_leftovers(run_dir) == []  # nothing half-written
    assert ckpt.list_checkpoints(run_dir / "stage-1" / "checkpoints") == [0]
    assert not (run_dir / "stage-1" / "summary.json").exists()
    monkeypatch.undo()  # space is free again
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    again = json.loads((run_dir / "result.json").read_text())
    assert again["metrics"] == whole["metrics"] and again["per_class"] == whole["per_class"]


def test_disk_full_while_writing_the_result(finished, tmp_path, monkeypatch, one_thread):
    root, cache, _, whole = finished
    run_dir = _copy_run(finished, tmp_path)
    (run_dir / "result.json").unlink()
    before = _digest(run_dir)
    _enospc_for(monkeypatch, ckpt, "_write_file", lambda p, *_: Path(p).name.startswith(".result.json."))
    args = _run_args(root, tmp_path / "runs", cache, "--resume")
    res = runner.invoke(app, args)
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert f"{run_dir}: no space left on the device while writing result.json (needs" in out
    assert _digest(run_dir) == before
    monkeypatch.undo()
    assert runner.invoke(app, args).exit_code == 0
    assert json.loads((run_dir / "result.json").read_text())["metrics"] == whole["metrics"]


def test_disk_full_while_building_the_cache(finished, tmp_path, monkeypatch):
    root = finished[0]
    cache = tmp_path / "cache"
    calls = []
    real = cache_mod.CacheWriter.add

    def add(self, modality, arrays):
        calls.append(modality)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, modality, arrays)

    monkeypatch.setattr(cache_mod.CacheWriter, "add", add)
    res = runner.invoke(app, _run_args(root, tmp_path / "runs", cache))
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert f"{cache}: no space left on the device while writing the feature cache UCF-avca-cls-" in out
    assert "(needs" in out and not any(cache.iterdir())  # the half-built cache is gone
    assert not (tmp_path / "runs").exists()
    monkeypatch.undo()
    res = runner.invoke(app, ["check-data", "--layout", "avca-cls", "--root-dir", str(root), "--dataset", "UCF"])
    assert res.exit_code == 0


def test_cache_half_built_by_a_killed_process_is_removed(tmp_path):
    """A build holds a lock on its temporary folder; a folder whose lock is free was left by a dead builder."""
    final = tmp_path / "UCF-avca-cls-0123"
    dead, live = tmp_path / f".{final.name}.tmp-dead0001", tmp_path / f".{final.name}.tmp-live0001"
    for d in (dead, live):
        d.mkdir()
        (d / "audio.bin").write_bytes(b"\0" * 64)
    lock = cache_mod._lock_dir(live)  # a live build elsewhere
    try:
        removed = cache_mod.remove_dead_temps(tmp_path)
        assert removed == [dead.name] and not dead.exists() and live.exists()
    finally:
        cache_mod._unlock(lock)
