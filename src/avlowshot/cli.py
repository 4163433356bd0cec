"""The command line: a thin layer over the library."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from avlowshot import __version__
from avlowshot.cli_common import DATASET_HELP, LAYOUT_HELP, console, err_console, fail, styled
from avlowshot.errors import AvlowshotError

app = typer.Typer(
    help="Audio-visual low-shot (GZSL / GFSL) video classification on pre-extracted features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console
    )


@app.callback(invoke_without_command=True)
def main(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        console.print(f"avlowshot {__version__}")
        raise typer.Exit()


@app.command(epilog="Example: avlowshot synth --layout avca-cls --dataset UCF --scale 0.3 --seed 0 --out demo/UCF")
def synth(
    layout: str = typer.Option(..., help=LAYOUT_HELP),
    dataset: str = typer.Option(..., help=DATASET_HELP),
    out: Path = typer.Option(..., help="Dataset root to write (must not exist or be empty)."),
    scale: float = typer.Option(0.1, help="Videos per class = real count x scale (1.0 = full size)."),
    seed: int = typer.Option(0, help="Same seed, same bytes."),
    shots: int = typer.Option(
        None,
        help="avdiff layout: shots per novel class (1, 5, 10 or 20); other layouts: give every novel class at least "
        "k + 1 videos, for `run --shots k`.",
    ),
    class_split: Path = typer.Option(None, help="A real class-split folder: use its class names."),
) -> None:
    """Write a synthetic benchmark in one of the authors' layouts, shaped like the real one."""
    from avlowshot.data.synth import write_synthetic

    try:
        with _progress() as bar:
            task = bar.add_task(f"synth {dataset} {layout}", total=None)
            root = write_synthetic(
                layout,
                dataset,
                out,
                scale=scale,
                seed=seed,
                shots=shots,
                class_split=class_split,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except AvlowshotError as exc:
        raise fail(exc) from None
    console.print(f"wrote {root}")


@app.command("check-data", epilog="Example: avlowshot check-data --layout tcaf-cls --root-dir data/UCF --dataset UCF")
def check_data(
    layout: str = typer.Option(..., help=LAYOUT_HELP),
    root_dir: Path = typer.Option(..., help="The unpacked dataset folder (holds class-split/ and features/)."),
    dataset: str = typer.Option(..., help=DATASET_HELP),
    shots: int = typer.Option(None, help="avdiff: the shot folder; other layouts: check a derived GFSL benchmark."),
) -> None:
    """Validate a dataset root (nothing is written) and print classes and videos per split."""
    from avlowshot.data.check import check_root

    try:
        with _progress() as bar:
            task = bar.add_task("reading class files", total=None)
            report = check_root(layout, root_dir, dataset, shots, progress=lambda i: bar.update(task, completed=i + 1))
    except AvlowshotError as exc:
        raise fail(exc) from None
    folders = Table(title=f"{report.dataset} {report.layout}: feature folders ({report.n_classes} classes in all)")
    for col in ("folder", "classes", "videos", "audio rows"):
        folders.add_column(col, justify="left" if col == "folder" else "right")
    for name, n_cls, n_vid, n_rows in report.folders:
        folders.add_row(name, str(n_cls), str(n_vid), str(n_rows))
    console.print(folders)
    shots_note = f", {report.shots} shots" if report.shots else ""
    splits = Table(title=f"{report.protocol.task.upper()} protocol{shots_note}")
    for col in ("split", "classes", "videos"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, n_cls, n_vid in report.protocol.describe():
        splits.add_row(name, str(n_cls), str(n_vid))
    console.print(splits)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    console.print(styled("ok", "green") + ": every file read, every check passed")


def _config_summary(names: list[str]) -> str:
    """``ucf-cls, ucf-main, vggsound-cls, ...`` -> ``ucf, vggsound x cls, main`` when the names form a full grid."""
    if not names:
        return "(none: pass --config)"
    pairs = [n.split("-", 1) for n in names]
    datasets, rests = sorted({d for d, _ in pairs}), sorted({r for _, r in pairs})
    if len(pairs) == len(datasets) * len(rests):
        return f"{', '.join(datasets)} x {', '.join(rests)}"
    return ", ".join(names)


@app.command("methods", epilog="Examples: avlowshot methods; avlowshot methods avdiff")
def methods(
    name: str = typer.Argument(None, help="A method: print its model card (e.g. `avlowshot methods avca`)."),
) -> None:
    """List every method with its tasks, the layouts it reads and its shipped configs; with a name, its model card."""
    from avlowshot.models import registry
    from avlowshot.train.config import variant_files

    try:
        if name is not None:
            registry.method_class(name)
            console.print(registry.model_card(name), markup=False, highlight=False)
            console.print(f"\nshipped configs: {_config_summary(registry.shipped_configs(name))}", markup=False)
            variants = sorted(variant_files(name))
            if variants:
                console.print(f"variants (run --variant NAME): {', '.join(variants)}", markup=False)
            return
    except AvlowshotError as exc:
        raise fail(exc) from None
    table = Table(title="methods (`avlowshot methods NAME` prints a model card)")
    for col in ("method", "tasks", "input", "layouts", "shipped configs"):
        table.add_column(col, overflow="fold")
    for key in sorted(registry.METHODS):
        cls = registry.METHODS[key]
        configs = registry.shipped_configs(key)
        table.add_row(
            key,
            ", ".join(t.upper() for t in cls.tasks),
            cls.inputs,
            ", ".join(cls.layouts),
            _config_summary(configs) + (f" (+ variants: {', '.join(sorted(v))})" if (v := variant_files(key)) else ""),
        )
    console.print(table)


from avlowshot import cli_bench, cli_download, cli_extract, cli_import, cli_run, cli_sweep  # noqa: E402 - these commands need ``app``

cli_download.register(app)
cli_run.register(app)
cli_bench.register(app)
cli_extract.register(app)
cli_sweep.register(app)
cli_import.register(app)
