"""The Python API notebooks use: ``avlowshot.run``, ``avlowshot.sweep``, ``avlowshot.load_results``.

import avlowshot
rec = avlowshot.run("avca", "avca-cls", "UCF", root_dir="/data/UCF", log_dir="runs", sets=["epochs=20"])
summary = avlowshot.sweep(table="avdiff-table2", roots={"UCF": "/data/UCF"}, datasets=["UCF"],
                          seeds=[1, 2, 3], log_dir="runs")
df = avlowshot.load_results("runs")                 # one row per run
df = avlowshot.load_results("runs", by="seed")      # mean / std / n over seeds
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from avlowshot.errors import AvlowshotError


def run_spec(
    method: str,
    layout: str,
    dataset: str,
    *,
    root_dir: str | Path,
    log_dir: str | Path,
    config: str | Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    seed: int | None = None,
    shots: int | None = None,
    variant: str | None = None,
    compat: str = "none",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    rebuild_cache: bool = False,
    verify_cache: bool = False,
    threads: int | None = None,
    progress: bool = False,
):
    """The :class:`~avlowshot.train.protocol.RunSpec` of ``avlowshot run`` with these options: the dataset, the
    method / layout pair and the shots checked (shots read from an avdiff root when not given), the config
    resolved (shipped config or ``config``, then ``sets``, the variant and the root's declared text width)."""
    from avlowshot.data.layouts import check_dataset, declared_text_dim, get_layout, infer_shots
    from avlowshot.models import registry
    from avlowshot.train import protocol
    from avlowshot.train.config import load_config

    spec_layout = get_layout(layout)
    check_dataset(dataset)
    root_dir = Path(root_dir)
    shots = infer_shots(spec_layout, root_dir, shots)
    registry.check_method_layout(method, layout, shots)
    cfg = load_config(
        config,
        method=method,
        dataset=dataset,
        feature_set=spec_layout.feature_set,
        overrides=list(sets),
        seed=seed,
        shots=shots,
        variant=variant,
        text_dim=declared_text_dim(layout, root_dir, dataset, shots),
    )
    return protocol.RunSpec(
        method=method,
        layout=layout,
        dataset=dataset,
        root_dir=root_dir,
        log_dir=Path(log_dir),
        cfg=cfg,
        shots=shots,
        compat=compat,
        device=device,
        cache_dir=None if cache_dir is None else Path(cache_dir),
        rebuild_cache=rebuild_cache,
        verify_cache=verify_cache,
        progress=progress,
        threads=threads,
    )


def run(
    method: str,
    layout: str,
    dataset: str,
    *,
    root_dir: str | Path,
    log_dir: str | Path,
    parts: str = "all",
    resume: bool = False,
    **spec_kw: Any,
) -> dict[str, Any] | None:
    """``avlowshot run`` from Python: the two-stage protocol into ``<log_dir>/<run name>/``; returns the result
    record (None when ``parts`` leaves out the eval part). ``spec_kw``: the options of :func:`run_spec` (config,
    sets, seed, shots, variant, compat, device, cache_dir, threads, ...), as the command's."""
    from avlowshot.train import protocol

    spec = run_spec(method, layout, dataset, root_dir=root_dir, log_dir=log_dir, **spec_kw)
    return protocol.run(spec, parts=parts, resume=resume)


def sweep(grid: str | Path | None = None, **kw: Any):
    """``avlowshot sweep`` from Python (a grid file, or ``table=NAME``); see :func:`avlowshot.sweeps.sweep`."""
    from avlowshot.sweeps import sweep as _sweep

    return _sweep(grid, **kw)


def load_results(log_dir: str | Path, by: str = "run"):
    """Every result below ``log_dir`` as a pandas DataFrame: one row per run (``by="run"``: identity columns,
    ``seed``, the metrics, ``*_std`` over GFSL repeats, ``config`` hash, ``path``) or per seed group (``by="seed"``:
    the metrics' means, ``*_std`` over seeds, ``n``, ``seeds``)."""
    try:
        import pandas as pd
    except ImportError:
        raise AvlowshotError('load_results needs pandas: pip install "avlowshot[sweep]"') from None
    from avlowshot.eval.report import aggregate, load_records
    from avlowshot.sweeps.grid import config_hash

    if by not in ("run", "seed"):
        raise AvlowshotError(f"by={by!r}: expected 'run' or 'seed'")
    records = load_records(log_dir)
    ids = ["task", "method", "variant", "dataset", "layout", "feature_set", "split_family", "shots", "compat"]
    rows = []
    for r in aggregate(records) if by == "seed" else records:
        row = {k: r.get(k) for k in ids}
        if by == "seed":
            row.update(config=r["config"], n=r["n"], seeds=r["seeds"])
        else:
            row.update(seed=r.get("seed"), config=config_hash(r.get("config") or {}), path=r["path"])
            row.update(best_epoch=r.get("best_epoch"), beta=r.get("beta"))
        row.update(r["metrics"])
        row.update({f"{k}_std": v for k, v in (r.get("metrics_std") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)
