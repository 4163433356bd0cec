"""The ``download`` command (registered on the main app by ``avlowshot.cli``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from avlowshot.cli_common import DATASET_HELP, LAYOUT_HELP, console, err_console, fail, styled
from avlowshot.errors import AvlowshotError, WeightsError


def register(app: typer.Typer) -> None:
    @app.command(epilog="Example: avlowshot download --dataset UCF --features cls --to data")
    def download(
        dataset: str = typer.Option(..., help=DATASET_HELP),
        features: str = typer.Option(
            ..., help="cls (C3D/VGGish) | main (SeLaVi) | clipclap (CLIP/CLAP) | avdiff (GFSL k-shot folders)."
        ),
        to: Path = typer.Option(..., help="Folder the archive is kept and unpacked in, e.g. data/."),
        layout: str = typer.Option(
            None, help=f"{LAYOUT_HELP}: the layout to fetch (default: tcaf-cls / tcaf-main / clipclap / avdiff)."
        ),
        mirror: list[str] = typer.Option(
            [], "--mirror", help="A mirror base URL tried first (BASE/<archive file>); repeatable."
        ),
        mirrors_only: bool = typer.Option(False, help="Try only the mirrors, not the authors' links."),
        retries: int = typer.Option(3, help="Retries per URL (each continues the partial file)."),
    ) -> None:
        """Fetch the authors' feature archive, unpack it into the layout's folder and check it (resumable).

        Example: avlowshot download --dataset UCF --features cls --to data
        """
        try:
            from avlowshot.data.download import download as run_download
        except ImportError as exc:  # pooch / requests are the `download` extra
            raise fail(
                WeightsError(f"the download command needs pooch ({exc})", fix="pip install 'avlowshot[download]'")
            ) from None
        try:
            with Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                console=err_console,
            ) as bar:  # fmt: skip
                task = bar.add_task(f"{dataset} {features}", total=None)
                done = run_download(
                    dataset,
                    features,
                    to,
                    layout=layout,
                    mirrors=mirror,
                    mirrors_only=mirrors_only,
                    retries=retries,
                    on_bytes=lambda have, total: bar.update(task, completed=have, total=total),
                )
        except AvlowshotError as exc:
            raise fail(exc) from None
        if done.skipped:
            console.print(f"{done.root}: {done.layout} features there already", highlight=False, soft_wrap=True)
        else:
            note = " (recorded: first use)" if done.recorded else " (verified)"
            console.print(f"{done.archive.name}: sha256 {done.sha256}{note}", highlight=False, soft_wrap=True)
        for report in done.checked:
            shots = f" {report.shots}-shot" if report.shots else ""
            console.print(
                styled("ok", "green"),
                f"check-data {report.layout}{shots}: {report.n_classes} classes, every file read",
                highlight=False,
                soft_wrap=True,
            )
        shots = " --shots K" if done.layout == "avdiff" and len(done.checked) > 1 else ""
        console.print(
            f"next: avlowshot run --method METHOD --layout {done.layout} --dataset {done.dataset} "
            f"--root-dir {done.root}{shots} --log-dir runs",
            highlight=False,
            soft_wrap=True,
        )
