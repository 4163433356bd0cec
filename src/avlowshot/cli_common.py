"""What every command shares: the consoles, the option help texts, and how a user error ends a command."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from avlowshot.errors import AvlowshotError

console = Console()
err_console = Console(stderr=True)

LAYOUT_HELP = "avca-cls | avca-main | tcaf-cls | tcaf-main | clipclap | avdiff"
DATASET_HELP = "UCF | ActivityNet | VGGSound"


def fail(exc: AvlowshotError) -> typer.Exit:
    """Print a user error (it names the file, the key and the fix) and return the exit to raise: code 2."""
    # escaped: messages hold "[key]" and lists, which rich would read as markup and drop
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)
