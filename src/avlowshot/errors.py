"""Errors a user sees: each names the file, the key and the fix."""

from __future__ import annotations

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
