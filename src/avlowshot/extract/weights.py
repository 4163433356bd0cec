"""Reading backbone weight files: a ``torch.save``-d state dict, checked key by key against the model, so a
missing, unreadable or other-architecture file is a :class:`~avlowshot.errors.WeightsError` naming it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from avlowshot.errors import WeightsError


def read_state_dict(path: str | Path, *, expected_name: str, fix: str, map_location="cpu") -> dict[str, torch.Tensor]:
    """Read a ``torch.save``-d state dict with ``weights_only=True``; every failure is a :class:`WeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found (expected the file '{expected_name}')", path=path, fix=fix)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a corrupt file, a non-torch file, or a pickle with non-tensor objects
        raise WeightsError(
            f"cannot read the weight file as a torch state dict (expected '{expected_name}'): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            path=path,
            fix=fix,
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"the file holds a {type(state).__name__}, not a state dict of tensors (expected '{expected_name}')",
            path=path,
            fix=fix,
        )
    return dict(state)


def state_width(state: Mapping[str, torch.Tensor], key: str) -> int:
    """The ``width`` of a checkpoint: the output channels of its first conv (64 = the real model)."""
    w = state.get(key)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim >= 1 else 64


def load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], *, path: str | Path, what: str, fix: str) -> None:
    """Load ``state`` into ``model`` strictly; missing/unexpected keys and shape mismatches raise :class:`WeightsError`
    listing the first few of each (nothing is renamed, dropped or reshaped here)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:

        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes (file != model): {few(wrong)}")
        raise WeightsError(f"not the {what} architecture; " + "; ".join(parts), path=path, fix=fix)
    model.load_state_dict(state, strict=True)
