"""What every command shares: the consoles, the option help texts, and how a user error ends a command."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

from avlowshot.errors import AvlowshotError

# No markup: messages hold file paths, ``[key]`` tags and class names that rich would read as style tags and drop.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

LAYOUT_HELP = "avca-cls | avca-main | tcaf-cls | tcaf-main | clipclap | avdiff"
DATASET_HELP = "UCF | ActivityNet | VGGSound"


def fail(exc: AvlowshotError) -> typer.Exit:
    """Print a user error (it names the file, the key and the fix) and return the exit to raise: code 2."""
    err_console.print(styled("error:", "bold red"), str(exc), highlight=False, soft_wrap=True)
    return typer.Exit(2)


def styled(text: str, style: str) -> Text:
    """A styled piece of output (the consoles take no markup)."""
    return Text(text, style=style)
