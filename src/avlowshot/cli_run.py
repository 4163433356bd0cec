"""The ``run``, ``evaluate`` and ``report`` commands (registered on the main app by ``avlowshot.cli``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from avlowshot.cli_common import DATASET_HELP, LAYOUT_HELP, console, err_console, fail
from avlowshot.errors import AvlowshotError

THREADS_HELP = (
    "CPU threads (default: torch's, the number of cores). Recorded in run.json; the same seed gives the same "
    "numbers at the same count, and --resume keeps it."
)
VERIFY_HELP = (
    "Hash every byte of the feature files and rebuild the cache if any changed since it was built (reads them all; "
    "the default key is size, mtime, inode and inode change time)."
)


def _setup_logging(quiet: bool) -> None:
    """One plain line per epoch on stderr (readable in log files and CI, unlike a wrapped rich layout)."""
    logger = logging.getLogger("avlowshot")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(getattr(h, "_avlowshot", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._avlowshot = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def print_result(result: dict[str, Any]) -> None:
    """The run's identity on one line, then its metrics as a table."""
    console.print(result_title(result), highlight=False, soft_wrap=True)
    console.print(metrics_table(result))


def result_title(result: dict[str, Any]) -> str:
    shots = f", {result['shots']} shots" if result.get("shots") else ""
    imported = result.get("imported")
    if imported:  # import-run: the authors' checkpoints, their stored stage-1 epoch
        return (
            f"{result['method']} on {result['dataset']} {result['layout']} ({result['split_family']}{shots}, "
            f"compat {result['compat']}): the reference's checkpoints from {imported['ref_dir']} (stage-1 epoch "
            f"{imported['stage_1_epoch']}), beta {result['beta']:.4g}"
        )
    best = "none (no training)" if result["best_epoch"] is None else result["best_epoch"] + 1
    return (
        f"{result['method']} on {result['dataset']} {result['layout']} ({result['split_family']}{shots}, "
        f"seed {result['seed']}, compat {result['compat']}): best epoch {best}, "
        f"beta {result['beta']:.4g}"
    )


def metrics_table(result: dict[str, Any]) -> Table:
    task = result.get("task", "gzsl")
    keys = ("seen", "unseen", "hm", "zsl") if task == "gzsl" else ("base", "novel", "hm", "fsl")
    heads = {"seen": "seen", "unseen": "unseen", "hm": "HM", "zsl": "ZSL", "base": "base", "novel": "novel",
             "fsl": "FSL"}  # fmt: skip
    table = Table()
    table.add_column("", justify="left")
    for k in keys:
        table.add_column(heads[k], justify="right")
    for i, rep in enumerate(result.get("repeats") or []):
        table.add_row(f"repeat {i}", *(f"{rep[k]:.2f}" for k in keys))
    std = result.get("metrics_std") or {}
    row = []
    for k in keys:
        cell = f"{result['metrics'][k]:.2f}"
        if k in std:
            cell += f" ± {std[k]:.2f}"
        row.append(cell)
    table.add_row("mean" if result.get("repeats") else "test", *row, style="bold")
    return table


def interrupted(ctx: typer.Context, run_dir: Path, progress: list[tuple[str, int]]) -> typer.Exit:
    """Ctrl-C: say where the run stopped and the command that continues it; exit code 130."""
    if not progress:
        text = f"interrupted before the first finished epoch of {run_dir}: nothing to resume; run the command again"
        err_console.print(text, highlight=False, soft_wrap=True)
        return typer.Exit(130)
    where = ", ".join(f"{stage} after epoch {epoch + 1}" for stage, epoch in progress)
    err_console.print(f"interrupted: {run_dir}: {where} finished", highlight=False, soft_wrap=True)
    err_console.print(f"continue with: {_resume_command(ctx)}", highlight=False, soft_wrap=True)
    return typer.Exit(130)


def _resume_command(ctx) -> str:
    """The command line of this invocation (from its parsed options) with --resume."""
    import shlex

    words = ["avlowshot", ctx.info_name or "run"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "resume" or value is None or value == param.default or not param.opts:
            continue
        opt = max(param.opts, key=len)
        if param.is_flag:
            words.append(opt)
            continue
        for v in value if isinstance(value, list | tuple) else [value]:
            words += [opt, str(v)]
    return shlex.join(words + ["--resume"])


def register(app: typer.Typer) -> None:
    """Add ``run``, ``evaluate`` and ``report`` to ``app``."""

    @app.command(
        "run",
        epilog="Example: avlowshot run --method avca --layout avca-cls --dataset UCF --root-dir demo/UCF "
        "--log-dir runs --set epochs=8",
    )
    def run_cmd(
        ctx: typer.Context,
        method: str = typer.Option(..., help="Method name, e.g. avca."),
        layout: str = typer.Option(..., help=LAYOUT_HELP),
        dataset: str = typer.Option(..., help=DATASET_HELP),
        root_dir: Path = typer.Option(..., help="The unpacked dataset folder (holds class-split/ and features/)."),
        log_dir: Path = typer.Option(..., help="Parent folder of the run directory."),
        config: Path = typer.Option(None, help="YAML config (default: the shipped one for method, dataset, features)."),
        set_: list[str] = typer.Option([], "--set", help="Override a config key: key=value or model.key=value."),
        seed: int = typer.Option(None, help="Seed (default: the config's, 42)."),
        shots: int = typer.Option(None, help="GFSL: shots per novel class (avdiff layout, or derived from GZSL)."),
        variant: str = typer.Option(
            None, help="A named variant of the method (an ablation row, e.g. av-gan); `avlowshot methods M` lists them."
        ),
        run: str = typer.Option("all", "--run", help="all | stage-1 | stage-2 | eval"),
        resume: bool = typer.Option(False, help="Continue the run directory from its last finished epoch."),
        device: str = typer.Option("cpu", help="cpu | cuda"),
        compat: str = typer.Option("none", help="none | official (reproduce the reference's quirks)."),
        cache_dir: Path = typer.Option(None, help="Feature cache folder (default: the user cache)."),
        rebuild_cache: bool = typer.Option(False, help="Rebuild the feature cache."),
        verify_cache: bool = typer.Option(False, help=VERIFY_HELP),
        threads: int = typer.Option(None, help=THREADS_HELP),
        quiet: bool = typer.Option(False, help="Only warnings and the final table."),
    ) -> None:
        """Train stage 1, retrain stage 2, test, and write result.json (or one part with --run)."""
        from avlowshot.train.threads import pin_environment

        pin_environment()  # before torch loads its thread pools
        from avlowshot.api import run_spec
        from avlowshot.train import protocol

        _setup_logging(quiet)
        spec = None
        try:
            spec = run_spec(
                method,
                layout,
                dataset,
                root_dir=root_dir,
                log_dir=log_dir,
                config=config,
                sets=set_,
                seed=seed,
                shots=shots,
                variant=variant,
                compat=compat,
                device=device,
                cache_dir=cache_dir,
                rebuild_cache=rebuild_cache,
                verify_cache=verify_cache,
                threads=threads,
                progress=sys.stderr.isatty() and not quiet,
            )
            result = protocol.run(spec, parts=run, resume=resume)
        except AvlowshotError as exc:
            raise fail(exc) from None
        except KeyboardInterrupt:
            if spec is None:
                raise typer.Exit(130) from None
            raise interrupted(ctx, spec.run_dir, protocol.run_progress(spec.run_dir)) from None
        if result is not None:
            print_result(result)
            console.print(f"result: {spec.run_dir / protocol.RESULT_FILE}")
        else:
            console.print(f"{run} finished: {spec.run_dir}")

    @app.command("evaluate", epilog="Example: avlowshot evaluate --run-dir runs/avca_UCF_avca-cls_seed42")
    def evaluate_cmd(
        run_dir: Path = typer.Option(..., help="A run directory (holds run.json, config.yaml, stage-1/, stage-2/)."),
        root_dir: Path = typer.Option(None, help="Dataset root, if it moved since the run."),
        cache_dir: Path = typer.Option(None, help="Feature cache folder."),
        device: str = typer.Option("cpu", help="cpu | cuda"),
        write: bool = typer.Option(True, help="Rewrite result.json."),
        verify_cache: bool = typer.Option(False, help=VERIFY_HELP),
        threads: int = typer.Option(None, help="CPU threads (default: the count the run was trained with)."),
        amp: str = typer.Option(None, help="auto | bf16 | off: another precision than the run's (default: its own)."),
    ) -> None:
        """Re-evaluate the saved checkpoints of a run (beta on val, test with it) and rewrite result.json."""
        from avlowshot.train.threads import pin_environment

        pin_environment()
        from avlowshot.train import protocol

        _setup_logging(True)
        try:
            result = protocol.evaluate_run(
                run_dir, root_dir=root_dir, cache_dir=cache_dir, device=device, write=write, threads=threads,
                verify_cache=verify_cache, amp=amp,
            )  # fmt: skip
        except AvlowshotError as exc:
            raise fail(exc) from None
        print_result(result)

    @app.command("report", epilog="Example: avlowshot report --log-dir runs --table avdiff-table2 --format latex")
    def report_cmd(
        log_dir: Path = typer.Option(..., help="Folder searched for result.json files."),
        format: str = typer.Option("markdown", "--format", help="markdown | csv | latex"),
        table: str = typer.Option(None, help="A paper table (avlowshot tables): ours beside the published numbers."),
        by: str = typer.Option("seed", help="seed: one row per group of runs differing only in seed | run"),
        compat: str = typer.Option("none", help="--table: the compat mode of our runs (none | official)."),
    ) -> None:
        """Print a table of all result records below a folder (mean ± std over seeds), or a paper's table."""
        from avlowshot.eval.report import paper_table, report

        try:
            text = paper_table(table, log_dir, format, compat) if table else report(log_dir, format, by)
        except AvlowshotError as exc:
            raise fail(exc) from None
        sys.stdout.write(text)
