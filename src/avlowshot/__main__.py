"""``python -m avlowshot``: the command line (``bench-table`` runs each row this way, in a fresh process)."""

from avlowshot.cli import app

app()
