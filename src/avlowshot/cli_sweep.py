"""The ``sweep``, ``tables``, ``tune`` and ``plot`` commands (registered on the main app by ``avlowshot.cli``)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from avlowshot.cli_common import console, err_console, fail
from avlowshot.errors import AvlowshotError, ConfigError


def _ints(text: str | None) -> list[int] | None:
    from avlowshot.sweeps.grid import filter_values

    return filter_values(text, int)


def register(app: typer.Typer) -> None:
    """Add ``sweep``, ``tables``, ``tune`` and ``plot`` to ``app``."""

    @app.command(
        "sweep",
        epilog="Example: avlowshot sweep --table avdiff-table2 --root-dir /data/avdiff --seeds 1,2,3 --log-dir runs",
    )
    def sweep_cmd(
        grid: Path = typer.Argument(None, help="A grid YAML file (or use --table NAME)."),
        table: str = typer.Option(None, help="A named paper table (avlowshot tables lists them)."),
        log_dir: Path = typer.Option(..., help="Parent folder of the run directories."),
        root_dir: Path = typer.Option(None, help="Folder holding one dataset root per dataset (<root-dir>/UCF, ...)."),
        root: list[str] = typer.Option([], help="DATASET=PATH or DATASET/LAYOUT=PATH (repeatable)."),
        datasets: str = typer.Option(None, help="Only these datasets, e.g. UCF,VGGSound."),
        methods: str = typer.Option(None, help="Only these methods, e.g. avdiff,tcaf."),
        shots: str = typer.Option(None, help="Only these shots, e.g. 1,5."),
        seeds: str = typer.Option(None, help="Seeds of every run, e.g. 1,2,3 (default: the grid's, else 42)."),
        rows: str = typer.Option(None, help="--table: only these rows (labels or variants), comma-separated."),
        set_: list[str] = typer.Option([], "--set", help="Config override of every run: key=value (repeatable)."),
        compat: str = typer.Option(None, help="--table: none | official for every row."),
        cpus: float = typer.Option(None, help="CPUs per run (default 1; also its torch threads)."),
        gpus: float = typer.Option(None, help="GPU fraction per run, e.g. 0.25: four runs share one GPU."),
        device: str = typer.Option(None, help="cpu | cuda (cuda needs --gpus)."),
        cache_dir: Path = typer.Option(None, help="Feature cache folder (default: the user cache)."),
        address: str = typer.Option(None, help="An existing Ray cluster (e.g. auto or ray://host:10001)."),
        num_cpus: int = typer.Option(None, help="CPUs of the local Ray instance (default: all)."),
        num_gpus: int = typer.Option(None, help="GPUs of the local Ray instance (default: all)."),
        executor: str = typer.Option("ray", help="ray | serial (in this process, one run after the other)."),
        dry_run: bool = typer.Option(False, help="Print the runs it would start and those already finished."),
    ) -> None:
        """Run a grid of runs on Ray; a sweep started again skips finished runs and resumes interrupted ones."""
        from avlowshot import sweeps as sw
        from avlowshot.sweeps.grid import filter_values, parse_roots

        try:
            requests = sw.plan(
                grid,
                table=table,
                log_dir=log_dir,
                roots=parse_roots(root),
                root_dir=root_dir,
                datasets=filter_values(datasets),
                methods=filter_values(methods),
                shots=_ints(shots),
                seeds=_ints(seeds),
                rows=filter_values(rows),
                sets=set_,
                compat=compat,
                cpus=cpus,
                gpus=gpus,
                device=device,
                cache_dir=cache_dir,
            )
            if dry_run:
                states = sw.dry_run(requests)
                for req, state in states:
                    extra = f"  [{req.row}]" if req.row else ""
                    console.print(f"{state.split(':')[0]:<9} {req.run_id}{extra}", highlight=False, soft_wrap=True)
                    if state.startswith("fails"):
                        for line in state[len("fails: ") :].splitlines():
                            console.print(f"          {line.strip()}", highlight=False, soft_wrap=True)
                counts = {k: sum(1 for _, s in states if s.split(":")[0] == k) for k in ("finished", "resume", "new")}
                counts["fails"] = len(states) - sum(counts.values())
                console.print(
                    f"{len(states)} runs: {counts['finished']} finished, {counts['resume']} to resume, "
                    f"{counts['new']} new, {counts['fails']} would fail"
                )
                return
            summary = sw.run_sweep(
                requests, executor=executor, address=address, num_cpus=num_cpus, num_gpus=num_gpus, show_progress=True
            )
        except AvlowshotError as exc:
            raise fail(exc) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: start the same command again to resume (finished runs are kept)")
            raise typer.Exit(130) from None
        sys.stdout.write(summary.text())
        console.print(f"status files: {Path(log_dir) / 'sweep-status'}; tables: avlowshot report --log-dir {log_dir}")
        if summary.failed:
            raise typer.Exit(1)

    @app.command("tables", epilog="Examples: avlowshot tables; avlowshot tables avdiff-table2")
    def tables_cmd(name: str = typer.Argument(None, help="One table (default: all).")) -> None:
        """List the named paper tables: rows (method + config) and columns (dataset, features, shots, metric)."""
        from avlowshot.sweeps.tables import describe, get_table, table_names

        try:
            names = [name] if name else list(table_names())
            text = "\n".join(describe(get_table(n)) for n in names)
        except AvlowshotError as exc:
            raise fail(exc) from None
        sys.stdout.write(text)

    @app.command(
        "tune",
        epilog="Example: avlowshot tune --method avca --layout avca-cls --dataset UCF --root-dir demo/UCF "
        "--log-dir tune --space lr=loguniform:1e-4:1e-2",
    )
    def tune_cmd(
        method: str = typer.Option(..., help="Method name, e.g. avca."),
        layout: str = typer.Option(..., help="Layout of the dataset root."),
        dataset: str = typer.Option(..., help="UCF | ActivityNet | VGGSound"),
        root_dir: Path = typer.Option(..., help="The dataset root."),
        log_dir: Path = typer.Option(..., help="Folder of the trials' stage-1 run directories."),
        space: list[str] = typer.Option(
            ...,
            help="KEY=KIND:ARGS, e.g. lr=loguniform:1e-4:1e-2, model.embedding_dropout=uniform:0:0.5, "
            "batch_size=choice:64,128,256, epochs=randint:5:20 (repeatable).",
        ),  # fmt: skip
        out: Path = typer.Option(..., help="Where to write the best config (a YAML for run --config)."),
        config: Path = typer.Option(None, help="Start from this config (default: the shipped one)."),
        set_: list[str] = typer.Option([], "--set", help="Fixed overrides of every trial."),
        shots: int = typer.Option(None, help="GFSL shots."),
        num_samples: int = typer.Option(8, help="Trials."),
        search: str = typer.Option("optuna", help="optuna (TPE) | random"),
        asha: bool = typer.Option(True, help="ASHA early stopping of weak trials (on the per-epoch val HM)."),
        seed: int = typer.Option(None, help="Seed of every trial (default: the config's)."),
        cpus: float = typer.Option(1, help="CPUs per trial."),
        gpus: float = typer.Option(0, help="GPU fraction per trial."),
        device: str = typer.Option("cpu", help="cpu | cuda"),
        cache_dir: Path = typer.Option(None, help="Feature cache folder."),
        address: str = typer.Option(None, help="An existing Ray cluster."),
        num_cpus: int = typer.Option(None, help="CPUs of the local Ray instance."),
    ) -> None:
        """Search config values with Ray Tune on the stage-1 validation HM (never the test set); write the best."""
        from avlowshot.sweeps.tune import tune

        try:
            best = tune(
                method=method, layout=layout, dataset=dataset, root_dir=root_dir, log_dir=log_dir, space=space,
                out=out, config=config, sets=set_, shots=shots, num_samples=num_samples, search=search, asha=asha,
                seed=seed, cpus=cpus, gpus=gpus, device=device, cache_dir=cache_dir, address=address, num_cpus=num_cpus,
            )  # fmt: skip
        except AvlowshotError as exc:
            raise fail(exc) from None
        for t in best["trials"]:
            console.print(f"trial {t['trial']}: val HM {t['val_hm']:.2f}  {t['params']}", highlight=False)
        console.print(
            f"best: val HM {best['val_hm']:.2f} with {best['params']}; config: {out}\n"
            f"run it: avlowshot run --config {out} --method {method} --layout {layout} --dataset {dataset} ...",
            highlight=False,
            soft_wrap=True,
        )

    @app.command("plot", epilog="Example: avlowshot plot runs --table avdiff-table2")
    def plot_cmd(
        path: Path = typer.Argument(..., help="A run directory, or a log dir (every run below it)."),
        out: Path = typer.Option(None, help="Output folder (default: <run-dir>/plots, <log-dir>/plots)."),
        table: str = typer.Option(None, help="With a log dir: also the bar chart of this paper table."),
        root_dir: Path = typer.Option(None, help="Dataset root, if it moved (t-SNE reads the test features)."),
        cache_dir: Path = typer.Option(None, help="Feature cache folder."),
        tsne: bool = typer.Option(True, help="Draw the t-SNE map (loads the model and the test features)."),
        runs: bool = typer.Option(True, help="With a log dir: the plots of every run (--no-runs: tables only)."),
    ) -> None:
        """Plot runs (beta curve, training, per-class accuracy, t-SNE) and tables (ours vs published): PNG + PDF."""
        from avlowshot.eval import plots

        try:
            files = plots.plot_path(
                path, out=out, table=table, root_dir=root_dir, cache_dir=cache_dir, tsne=tsne, runs=runs
            )
        except AvlowshotError as exc:
            raise fail(exc) from None
        except ImportError as exc:
            raise fail(ConfigError(f'plots need matplotlib: pip install "avlowshot[plot]" ({exc})')) from None
        for f in files:
            console.print(str(f), highlight=False)
