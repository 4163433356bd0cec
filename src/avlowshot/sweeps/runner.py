"""Executing a sweep: every run through the library's protocol (``protocol.run``, as ``avlowshot run`` does), one
Ray task per run, each asking Ray for its CPUs and GPU fraction.

A run whose ``result.json`` exists (made with the same config) is skipped; any other run is started with
``resume=True``, so an interrupted one continues from its last finished epoch and a new one starts from scratch.
Each run's state lives in ``<log-dir>/sweep-status/<run>.json`` (state, stage, epoch, error) next to its log
``<run>.log``; a failure is recorded there and the others go on. ``<run-dir>/sweep.json`` tells the report which
table row and variant made the run.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avlowshot.errors import AvlowshotError, ConfigError
from avlowshot.sweeps.grid import RunRequest
from avlowshot.train import checkpoint as ckpt

STATUS_DIR = "sweep-status"
MARKER_FILE = "sweep.json"
STATES = ("left", "running", "done", "failed")


def status_path(req: RunRequest, suffix: str = ".json") -> Path:
    return Path(req.log_dir) / STATUS_DIR / (req.run_id.replace("/", "__") + suffix)


def read_status(req: RunRequest) -> dict[str, Any] | None:
    import json

    try:
        return json.loads(status_path(req).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_status(req: RunRequest, state: str, **fields: Any) -> dict[str, Any]:
    rec = {
        "run": req.run_id,
        "state": state,
        "method": req.method,
        "dataset": req.dataset,
        "layout": req.layout,
        "shots": req.shots,
        "seed": req.run_seed,
        "compat": req.compat,
        "variant": req.variant,
        "table": req.table,
        "row": req.row,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        **fields,
    }
    path = status_path(req)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(path, rec)
    return rec


def finished_state(req: RunRequest) -> str:
    """``finished`` (result.json of the same config), ``resume`` (a run directory without result), ``new``;
    raises :class:`ConfigError` when the run directory was made with another config."""
    from avlowshot.train.config import config_diff, validate_config
    from avlowshot.train.protocol import RESULT_FILE, load_run_info

    run_dir = req.run_dir
    if not (run_dir / "run.json").is_file():
        return "resume" if run_dir.is_dir() and any(run_dir.iterdir()) else "new"
    _, old = load_run_info(run_dir)
    if req.resolved is not None:
        new = validate_config(req.resolved, source=str(run_dir / "config.yaml"))
        diff = config_diff(old, new)
        if diff:
            raise ConfigError(
                f"{run_dir / 'config.yaml'}: this run directory was made with another config (differs in: "
                f"{', '.join(diff)}); use the same --set values, another --log-dir, or a 'variant'"
            )
    return "finished" if (run_dir / RESULT_FILE).is_file() else "resume"


def _metrics_summary(result: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in result["metrics"].items()}


def execute_run(req_dict: dict[str, Any]) -> dict[str, Any]:
    """Run one request to the end (or to its failure) and return its final status record. Runs in a Ray worker or
    in the calling process; never raises for a failing run (the failure is the record)."""
    req = RunRequest.from_dict(req_dict)
    t0 = time.time()
    if req.error is not None:
        return _write_status(req, "failed", error=req.error, seconds=0.0)
    try:
        state = finished_state(req)
    except AvlowshotError as exc:
        return _write_status(req, "failed", error=str(exc), seconds=0.0)
    if state == "finished":
        import json

        result = json.loads((req.run_dir / "result.json").read_text(encoding="utf-8"))
        return _write_status(req, "done", skipped=True, metrics=_metrics_summary(result), seconds=0.0)

    import torch

    from avlowshot.train import protocol
    from avlowshot.train.config import validate_config

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(req.cpus)))
    progress = {"stage": None, "epoch": None}
    _write_status(req, "running", resumed=state == "resume", **progress)

    def on_stage(stage: str) -> None:
        progress.update(stage=stage, epoch=None)
        _write_status(req, "running", resumed=state == "resume", **progress)

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        progress["epoch"] = epoch + 1
        _write_status(req, "running", resumed=state == "resume", **progress)

    logger = logging.getLogger("avlowshot")
    handler = logging.FileHandler(status_path(req, ".log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        cfg = validate_config(req.resolved, source=f"sweep request {req.run_id}")
        spec = protocol.RunSpec(
            method=req.method,
            layout=req.layout,
            dataset=req.dataset,
            root_dir=Path(req.root_dir),
            log_dir=req.run_log_dir,
            cfg=cfg,
            shots=req.shots,
            compat=req.compat,
            device=req.device,
            cache_dir=None if req.cache_dir is None else Path(req.cache_dir),
        )
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(
            spec.run_dir / MARKER_FILE,
            {"variant": req.variant, "table": req.table, "row": req.row, "sets": list(req.sets)},
        )
        result = protocol.run(spec, resume=True, on_epoch_end=on_epoch, on_stage=on_stage)
    except Exception as exc:  # any failure of one run is recorded; the sweep goes on
        text = str(exc) if isinstance(exc, AvlowshotError) else f"{type(exc).__name__}: {exc}"
        logger.error("run failed: %s\n%s", text, traceback.format_exc())
        return _write_status(req, "failed", error=text, seconds=time.time() - t0, **progress)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
        torch.set_num_threads(threads)
    return _write_status(req, "done", skipped=False, metrics=_metrics_summary(result), seconds=time.time() - t0)


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Per-run state of a sweep in progress (``left``, ``running``, ``done``, ``failed``)."""

    requests: list[RunRequest]
    states: dict[str, str] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        for r in self.requests:
            self.states.setdefault(r.run_id, "left")

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for s in self.states.values():
            out[s] += 1
        return out

    def line(self) -> str:
        c = self.counts()
        return f"runs: {c['done']} done, {c['running']} running, {c['failed']} failed, {c['left']} left"

    def set(self, run_id: str, record: dict[str, Any]) -> None:
        self.states[run_id] = record["state"] if record["state"] in STATES else "left"
        self.details[run_id] = record


@dataclass
class SweepSummary:
    records: list[dict[str, Any]]  # final status records, in request order

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["state"] == "failed"]

    @property
    def done(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["state"] == "done"]

    def text(self) -> str:
        skipped = sum(1 for r in self.done if r.get("skipped"))
        lines = [
            f"{len(self.records)} runs: {len(self.done)} done ({skipped} finished before), {len(self.failed)} failed"
        ]
        for r in self.failed:
            first = str(r.get("error", "")).strip().splitlines() or [""]
            lines.append(f"  FAILED {r['run']}: {first[0]}")
            lines += [f"      {extra}" for extra in first[1:4]]
        return "\n".join(lines) + "\n"


class ProgressView:
    """The live done / running / failed / left view on stderr (a line per change when not a terminal)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.live = None
        self.last = None
        if enabled and sys.stderr.isatty():
            from rich.live import Live

            from avlowshot.cli_common import err_console

            self.live = Live(console=err_console, refresh_per_second=2, transient=False)
            self.live.start()

    def update(self, progress: Progress) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            from rich.table import Table

            table = Table(title=progress.line(), title_justify="left")
            for col in ("running", "stage", "epoch"):
                table.add_column(col)
            for run_id, state in progress.states.items():
                if state == "running":
                    d = progress.details.get(run_id, {})
                    table.add_row(run_id, str(d.get("stage") or ""), str(d.get("epoch") or ""))
            self.live.update(table)
        else:
            line = progress.line()
            if line != self.last:
                print(line, file=sys.stderr, flush=True)
                self.last = line

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def _ray():
    try:
        import ray
    except ImportError:
        raise AvlowshotError(
            'sweeps run on Ray, which is not installed: pip install "avlowshot[sweep]" (or use --executor serial)'
        ) from None
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Connect to Ray (an existing session, ``address``, or a new local instance); True if this call started it."""
    ray = _ray()
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kw)
    return True


def run_sweep(
    requests: list[RunRequest],
    *,
    executor: str = "ray",
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    show_progress: bool = True,
    on_update: Callable[[Progress], None] | None = None,
    poll_seconds: float = 0.5,
) -> SweepSummary:
    """Execute the (prepared) requests; returns the final status record of each. An interrupt (Ctrl-C, or an
    exception raised by ``on_update``) cancels the runs in flight (their checkpoints stay: the same sweep started
    again resumes them) and is raised again."""
    if executor not in ("ray", "serial"):
        raise ConfigError(f"--executor {executor}: expected ray or serial")
    progress = Progress(requests)
    view = ProgressView(show_progress)
    final: dict[str, dict[str, Any]] = {}
    try:
        if executor == "serial":
            for req in requests:
                progress.states[req.run_id] = "running"
                view.update(progress)
                if on_update:
                    on_update(progress)
                final[req.run_id] = execute_run(req.to_dict())
                progress.set(req.run_id, final[req.run_id])
                view.update(progress)
                if on_update:
                    on_update(progress)
        else:
            _run_on_ray(requests, progress, view, final, address, num_cpus, num_gpus, on_update, poll_seconds)
    finally:
        view.close()
    return SweepSummary([final[r.run_id] for r in requests])


def _settled(req: RunRequest) -> bool:
    """True when the run needs no worker: its config failed, it finished before, or its run dir conflicts."""
    if req.error is not None:
        return True
    try:
        return finished_state(req) == "finished"
    except AvlowshotError:
        return True


def _run_on_ray(requests, progress, view, final, address, num_cpus, num_gpus, on_update, poll_seconds):
    ray = _ray()
    started = init_ray(address, num_cpus, num_gpus)
    task = ray.remote(execute_run)
    pending: dict[Any, RunRequest] = {}
    submitted: dict[str, float] = {}  # status files older than this are from an earlier sweep
    try:
        for req in requests:
            if _settled(req):  # nothing to run (a recorded failure, or finished before): settle it here
                final[req.run_id] = execute_run(req.to_dict())
                progress.set(req.run_id, final[req.run_id])
                continue
            ref = task.options(num_cpus=req.cpus, num_gpus=req.gpus, max_retries=0).remote(req.to_dict())
            pending[ref] = req
            submitted[req.run_id] = time.time() - 1.0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll_seconds)
            for ref in ready:
                req = pending.pop(ref)
                try:
                    final[req.run_id] = ray.get(ref)
                except Exception as exc:  # the worker died (killed, out of memory): a failure of that run
                    final[req.run_id] = _write_status(req, "failed", error=f"worker lost: {type(exc).__name__}")
                progress.set(req.run_id, final[req.run_id])
            for req in pending.values():
                rec = read_status(req)
                if rec is not None and rec.get("state") == "running" and rec.get("time", 0) >= submitted[req.run_id]:
                    progress.set(req.run_id, rec)
            view.update(progress)
            if on_update:
                on_update(progress)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        for req in pending.values():
            rec = read_status(req)
            if rec is not None and rec.get("state") == "running":
                _write_status(req, "interrupted", stage=rec.get("stage"), epoch=rec.get("epoch"))
        raise
    finally:
        if started:
            ray.shutdown()
