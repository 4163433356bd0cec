"""Training: the run config, the generic epoch loop, checkpoints, and the two-stage protocol.

Public API (imported lazily, so that ``import avlowshot.train`` stays cheap)::

    RunConfig, load_config, validate_config          config.py
    Trainer, StageOutcome, evaluate_split            trainer.py
    save_checkpoint, load_checkpoint                 checkpoint.py
    RunSpec, run, evaluate_run, run_name             protocol.py
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RunConfig": "config",
    "load_config": "config",
    "validate_config": "config",
    "Trainer": "trainer",
    "StageOutcome": "trainer",
    "Interrupted": "trainer",
    "evaluate_split": "trainer",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "RunSpec": "protocol",
    "run": "protocol",
    "evaluate_run": "protocol",
    "run_name": "protocol",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"avlowshot.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'avlowshot.train' has no attribute {name!r}")
