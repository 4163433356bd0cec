"""Sweeps: grids of runs (a grid file or a named paper table) executed on Ray, resumable, one run directory each.

plan(...)   -> the prepared run requests (configs validated; a bad one is that run's recorded failure)
sweep(...)  -> run them (Ray by default) and return a SweepSummary
dry_run(...) -> (request, state) pairs: finished / resume / new / fails
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from avlowshot.errors import ConfigError
from avlowshot.sweeps.grid import Resources, RunRequest, grid_requests, prepare, table_requests
from avlowshot.sweeps.runner import Progress, SweepSummary, finished_state, run_sweep

__all__ = ["plan", "sweep", "dry_run", "RunRequest", "SweepSummary", "Progress"]


def plan(
    grid: str | Path | None = None,
    *,
    table: str | None = None,
    log_dir: str | Path,
    roots: dict[str, str] | None = None,
    root_dir: str | Path | None = None,
    datasets: list[str] | None = None,
    methods: list[str] | None = None,
    shots: list[int] | None = None,
    seeds: list[int] | None = None,
    rows: list[str] | None = None,
    sets: list[str] | tuple[str, ...] = (),
    compat: str | None = None,
    cpus: float | None = None,
    gpus: float | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[RunRequest]:
    """The runs of a grid file or a named table (exactly one of them), filtered and overridden."""
    if (grid is None) == (table is None):
        raise ConfigError("give a grid file or --table NAME (one of them)")
    res = None
    if cpus is not None or gpus is not None:
        res = Resources(cpus=cpus or 1.0, gpus=gpus or 0.0)
    cache = None if cache_dir is None else str(cache_dir)
    if table is not None:
        reqs = table_requests(
            table,
            log_dir=log_dir,
            roots=roots,
            root_dir=root_dir,
            datasets=datasets,
            methods=methods,
            shots=shots,
            seeds=seeds,
            rows=rows,
            sets=tuple(sets),
            compat=compat,
            resources=res,
            device=device or "cpu",
            cache_dir=cache,
        )
    else:
        reqs = grid_requests(
            grid, log_dir=log_dir, roots=roots, root_dir=root_dir, sets=tuple(sets), resources=res, device=device,
            cache_dir=cache, seeds=seeds,
        )  # fmt: skip
        keep = []
        for r in reqs:
            if (datasets is None or r.dataset in datasets) and (methods is None or r.method in methods):
                if shots is None or r.shots in shots:
                    keep.append(r)
        reqs = keep
    if not reqs:
        raise ConfigError("the grid has no runs (check --datasets / --methods / --shots filters)")
    for r in reqs:
        if r.device.startswith("cuda") and r.gpus <= 0:
            raise ConfigError("--device cuda: give each run a GPU share (--gpus 0.25, or resources.gpus in the grid)")
    return prepare(reqs)


def dry_run(requests: list[RunRequest]) -> list[tuple[RunRequest, str]]:
    out = []
    for r in requests:
        if r.error is not None:
            out.append((r, "fails: " + r.error.strip()))
            continue
        try:
            out.append((r, finished_state(r)))
        except ConfigError as exc:
            out.append((r, "fails: " + str(exc).strip()))
    return out


def sweep(
    grid: str | Path | None = None,
    *,
    executor: str = "ray",
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    progress: bool = False,
    on_update: Callable[[Progress], None] | None = None,
    poll_seconds: float = 0.5,
    **plan_kw,
) -> SweepSummary:
    """Plan and run a sweep (see :func:`plan` for the grid arguments); Ray by default (``executor="serial"`` runs
    in this process). Finished runs are skipped, interrupted ones resumed."""
    requests = plan(grid, **plan_kw)
    return run_sweep(
        requests, executor=executor, address=address, num_cpus=num_cpus, num_gpus=num_gpus, show_progress=progress,
        on_update=on_update, poll_seconds=poll_seconds,
    )  # fmt: skip
