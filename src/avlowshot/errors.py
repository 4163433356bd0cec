"""Errors a user sees: each names the file, the key and the fix."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class AvlowshotError(Exception):
    """Base class of every error the CLI turns into a clean message and exit code 2."""


class DataError(AvlowshotError):
    """Bad input data: a missing, corrupt or inconsistent file of a dataset root."""

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.key = key
        self.fix = fix
        parts = []
        if self.path is not None:
            parts.append(f"{self.path}")
        if key is not None:
            parts.append(f"[{key}]")
        head = " ".join(parts)
        text = f"{head}: {message}" if head else message
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class ConfigError(AvlowshotError):
    """A config file or override with an unknown key or a value of the wrong type."""


class WeightsError(AvlowshotError):
    """A backbone weight file that is missing, unreadable or of another architecture."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.fix = fix
        text = f"{self.path}: {message}" if self.path else message
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class CheckpointError(AvlowshotError):
    """A damaged, changed or foreign file of a run directory (checkpoint, sidecar, training state, summary)."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.fix = fix
        text = f"{self.path}: {message}" if self.path else message
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class DiskFullError(AvlowshotError):
    """The device ran out of space (or quota) while a checkpoint, cache or result was written; nothing was kept."""

    def __init__(self, folder: str | Path, needed: int, free: int | None, what: str):
        self.folder = str(folder)
        self.needed = needed
        free_text = "" if free is None else f", {_mib(free)} free"
        super().__init__(
            f"{self.folder}: no space left on the device while writing {what} (needs {_mib(needed)}{free_text}); "
            "nothing of it was kept\n"
            f"  fix: free at least {_mib(needed)} there (or use another folder) and run the same command again "
            "(a run continues with --resume)"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(folder: str | Path, needed: int, what: str) -> DiskFullError:
    """The error for a write of ``needed`` bytes into ``folder`` that found the device full."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    return DiskFullError(folder, needed, free, what)
