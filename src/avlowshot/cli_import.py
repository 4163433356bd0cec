"""The ``import-run`` command (registered on the main app by ``avlowshot.cli``)."""

from __future__ import annotations

from pathlib import Path

import typer

from avlowshot.cli_common import DATASET_HELP, LAYOUT_HELP, console, fail
from avlowshot.errors import AvlowshotError


def register(app: typer.Typer) -> None:
    @app.command(
        "import-run",
        epilog="Example: avlowshot import-run --from tcaf --ref-dir models/UCF --layout tcaf-cls --dataset UCF "
        "--root-dir data/UCF --out runs/tcaf_UCF_authors",
    )
    def import_run_cmd(
        from_: str = typer.Option(..., "--from", help="avca | tcaf | clipclap | avdiff: the reference code base."),
        ref_dir: Path = typer.Option(
            ..., help="The reference's run folder(s): the stage-1 and stage-2 folders it wrote, or their parent."
        ),
        layout: str = typer.Option(..., help=LAYOUT_HELP),
        dataset: str = typer.Option(..., help=DATASET_HELP),
        root_dir: Path = typer.Option(..., help="The unpacked dataset folder the run was trained on."),
        out: Path = typer.Option(..., help="The avlowshot run directory to write (must not exist or be empty)."),
        stage_1: Path = typer.Option(None, "--stage-1", help="The stage-1 run folder, if --ref-dir holds several."),
        stage_2: Path = typer.Option(None, "--stage-2", help="The stage-2 run folder, if --ref-dir holds several."),
        cache_dir: Path = typer.Option(None, help="Feature cache folder (default: the user cache)."),
        device: str = typer.Option("cpu", help="cpu | cuda (only used to check the weights load)."),
    ) -> None:
        """Import the authors' released checkpoints as a run directory; then `avlowshot evaluate --run-dir OUT`."""
        from avlowshot.cli_run import _setup_logging
        from avlowshot.importers import import_run

        _setup_logging(True)
        try:
            run_dir = import_run(
                from_,
                ref_dir,
                layout=layout,
                dataset=dataset,
                root_dir=root_dir,
                out=out,
                stage1=stage_1,
                stage2=stage_2,
                cache_dir=cache_dir,
                device=device,
            )
        except AvlowshotError as exc:
            raise fail(exc) from None
        console.print(f"imported {from_} run into {run_dir} (compat official)", highlight=False, soft_wrap=True)
        console.print(f"evaluate it with: avlowshot evaluate --run-dir {run_dir}", highlight=False, soft_wrap=True)
