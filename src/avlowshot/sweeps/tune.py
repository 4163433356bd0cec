"""Hyper-parameter search with Ray Tune on the stage-1 validation HM (stage 1 only: the test set is never seen).

Each trial is ``protocol.run(..., parts="stage-1")`` in its own run directory ``<log-dir>/trials/<trial>/``,
reporting the validation HM after every epoch. The search is Optuna's TPE (``search="optuna"``) or random
(``"random"``), optionally with ASHA early stopping. The best trial's resolved config is written as a YAML that
``avlowshot run --config`` takes.

A search space item is ``KEY=KIND:ARGS`` with ``KEY`` any config key (``lr``, ``model.embedding_dropout``, ...):
``uniform:LOW:HIGH``, ``loguniform:LOW:HIGH``, ``randint:LOW:HIGH`` (both ends included), ``choice:A,B,C``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from avlowshot.errors import AvlowshotError, ConfigError
from avlowshot.train.config import parse_override

KINDS = ("uniform", "loguniform", "randint", "choice")


def parse_space(items: list[str] | tuple[str, ...]) -> dict[str, tuple[str, list[Any]]]:
    """``["lr=loguniform:1e-4:1e-2", ...]`` -> ``{"lr": ("loguniform", [1e-4, 1e-2])}`` (values typed as YAML)."""
    out: dict[str, tuple[str, list[Any]]] = {}
    for item in items:
        if "=" not in item or ":" not in item.split("=", 1)[1]:
            raise ConfigError(f"--space {item}: expected KEY=KIND:ARGS, e.g. lr=loguniform:1e-4:1e-2")
        key, spec = item.split("=", 1)
        kind, _, args = spec.partition(":")
        if kind not in KINDS:
            raise ConfigError(f"--space {item}: unknown kind {kind!r} (expected {', '.join(KINDS)})")
        parts = args.split(",") if kind == "choice" else args.split(":")
        values = [parse_override(f"x={p}")[1] for p in parts]
        if kind != "choice":
            if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"--space {item}: {kind} takes two numbers LOW:HIGH")
            if values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0):
                raise ConfigError(f"--space {item}: need 0 < LOW < HIGH (LOW < HIGH for {kind})")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"--space {item}: randint takes integers")
        elif len(values) < 2:
            raise ConfigError(f"--space {item}: choice needs at least two values")
        out[key.strip()] = (kind, values)
    if not out:
        raise ConfigError("give at least one --space KEY=KIND:ARGS")
    return out


def _tune_space(space: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    from ray import tune as rt

    make = {
        "uniform": lambda v: rt.uniform(float(v[0]), float(v[1])),
        "loguniform": lambda v: rt.loguniform(float(v[0]), float(v[1])),
        "randint": lambda v: rt.randint(v[0], v[1] + 1),  # Tune's upper end is exclusive
        "choice": lambda v: rt.choice(v),
    }
    return {key: make[kind](values) for key, (kind, values) in space.items()}


def _overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in params.items()]


def _load(base: dict[str, Any], params: dict[str, Any]):
    from avlowshot.data.layouts import get_layout
    from avlowshot.train.config import load_config

    return load_config(
        base["config"],
        method=base["method"],
        dataset=base["dataset"],
        feature_set=get_layout(base["layout"]).feature_set,
        overrides=list(base["sets"]) + _overrides(params),
        seed=base["seed"],
        shots=base["shots"],
    )


def _trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """One Tune trial: stage 1 with ``params``, reporting the validation HM (%) after every epoch."""
    import torch
    from ray import tune as rt

    from avlowshot.train import protocol

    torch.set_num_threads(max(1, int(base["cpus"])))
    cfg = _load(base, params)
    trial_dir = Path(base["log_dir"]) / "trials" / rt.get_context().get_trial_id()
    spec = protocol.RunSpec(
        method=base["method"], layout=base["layout"], dataset=base["dataset"], root_dir=Path(base["root_dir"]),
        log_dir=trial_dir, cfg=cfg, shots=base["shots"], device=base["device"],
        cache_dir=None if base["cache_dir"] is None else Path(base["cache_dir"]),
    )  # fmt: skip
    best = {"hm": float("-inf")}

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        hm = 100.0 * float(record["val"]["hm"])
        best["hm"] = max(best["hm"], hm)
        rt.report({"val_hm": hm, "best_val_hm": best["hm"], "run_dir": str(spec.run_dir)})

    protocol.run(spec, parts="stage-1", resume=True, on_epoch_end=on_epoch)


def tune(
    *,
    method: str,
    layout: str,
    dataset: str,
    root_dir: str | Path,
    log_dir: str | Path,
    space: list[str],
    out: str | Path,
    config: str | Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    shots: int | None = None,
    num_samples: int = 8,
    search: str = "optuna",
    asha: bool = True,
    seed: int | None = None,
    cpus: float = 1,
    gpus: float = 0,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Run the search; write the best config to ``out`` and ``<log-dir>/tune-results.json``; return the summary."""
    from avlowshot.sweeps.runner import _ray, init_ray
    from avlowshot.train import checkpoint as ckpt
    from avlowshot.train.config import dump_config

    if search not in ("optuna", "random"):
        raise ConfigError(f"--search {search}: expected optuna or random")
    parsed = parse_space(space)
    log_dir = Path(log_dir).resolve()
    base = {
        "method": method, "layout": layout, "dataset": dataset, "root_dir": str(Path(root_dir).resolve()),
        "log_dir": str(log_dir), "config": None if config is None else str(Path(config).resolve()),
        "sets": list(sets), "shots": shots, "seed": seed, "cpus": cpus, "device": device,
        "cache_dir": None if cache_dir is None else str(Path(cache_dir).resolve()),
    }  # fmt: skip
    # fail before Ray starts: the fixed config and every searched key at its first value must validate
    cfg0 = _load(base, {k: v[0] for k, (_, v) in parsed.items()})
    if device.startswith("cuda") and gpus <= 0:
        raise ConfigError("--device cuda: give each trial a GPU share (--gpus 0.5)")
    _ray()
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    search_alg = None
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg0.seed)
    max_t = cfg0.epochs + sum(cfg0.substage_epochs.values())
    scheduler = ASHAScheduler(max_t=max_t, grace_period=1, reduction_factor=2) if asha else FIFOScheduler()
    started = init_ray(address, num_cpus)
    try:
        tuner = rt.Tuner(
            rt.with_resources(rt.with_parameters(_trial, base=base), {"cpu": cpus, "gpu": gpus}),
            param_space=_tune_space(parsed),
            tune_config=rt.TuneConfig(
                metric="best_val_hm", mode="max", num_samples=num_samples, search_alg=search_alg, scheduler=scheduler
            ),
            run_config=rt.RunConfig(storage_path=str(log_dir / "ray"), name="tune", verbose=0),
        )
        grid = tuner.fit()
    finally:
        if started:
            _ray().shutdown()
    trials = []
    for i, res in enumerate(grid):
        if res.error is not None or not res.metrics:
            trials.append({"trial": i, "params": res.config, "val_hm": float("nan"), "error": str(res.error)})
            continue
        m = res.metrics
        trials.append(
            {"trial": i, "params": res.config, "val_hm": float(m["best_val_hm"]),
             "epochs": int(m.get("training_iteration", 0)), "run_dir": m["run_dir"]}
        )  # fmt: skip
    good = [t for t in trials if t["val_hm"] == t["val_hm"]]
    if not good:
        raise AvlowshotError(f"every trial failed; see {log_dir / 'ray'} (first error: {trials[0].get('error')})")
    best = max(good, key=lambda t: t["val_hm"])
    cfg = _load(base, best["params"])
    header = (
        f"# avlowshot tune: best of {len(trials)} trials by stage-1 validation HM ({best['val_hm']:.2f}) on "
        f"{dataset} {layout}; searched: {', '.join(f'{k}={v}' for k, v in best['params'].items())}\n"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(Path(out), header + dump_config(cfg))
    summary = {"metric": "stage-1 validation HM (%)", "best": best, "trials": trials, "config": str(out)}
    ckpt.atomic_write_json(log_dir / "tune-results.json", summary)
    return {"val_hm": best["val_hm"], "params": best["params"], "trials": trials, "config": str(out)}
