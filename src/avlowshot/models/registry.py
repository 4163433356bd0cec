"""Method names -> classes, and building a method from the ``model:`` block of a config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from avlowshot.errors import ConfigError
from avlowshot.models.apn import APN
from avlowshot.models.avca import AVCA
from avlowshot.models.avdiff import AVDiff
from avlowshot.models.avgzslnet import CJME, AVGZSLNet
from avlowshot.models.base import InputDims, Method
from avlowshot.models.bilinear import ALE, DEVISE, SJE
from avlowshot.models.clipclap import ClipClap
from avlowshot.models.fsgen import TSL, ProtoGAN
from avlowshot.models.fusion import AttentionFusion, Perceiver
from avlowshot.models.fvaegan import FVAEGAN
from avlowshot.models.hip import HiP
from avlowshot.models.hyperbolic import HyperAlignment, HyperMultiple, HyperSingle
from avlowshot.models.mbt import MBT
from avlowshot.models.sldg import SLDG
from avlowshot.models.tcaf import TCAF
from avlowshot.models.textmatch import TextMatch
from avlowshot.models.zorro import Zorro

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (AVCA, AVDiff, ClipClap, TCAF, APN, FVAEGAN)}
METHODS.update({cls.name: cls for cls in (HyperAlignment, HyperSingle, HyperMultiple)})
METHODS.update({cls.name: cls for cls in (AttentionFusion, Perceiver, TextMatch)})
METHODS.update({cls.name: cls for cls in (HiP, MBT, SLDG, Zorro)})
METHODS.update({cls.name: cls for cls in (AVGZSLNet, CJME, ALE, DEVISE, SJE)})
METHODS.update({cls.name: cls for cls in (ProtoGAN, TSL)})


def shipped_configs(name: str) -> list[str]:
    """Names (``<dataset>-<features>[-<k>shot]``) of the configs shipped for method ``name``."""
    from importlib import resources

    folder = resources.files("avlowshot").joinpath("configs", name)
    if not folder.is_dir():
        return []
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def model_card(name: str) -> str:
    """The method's model card: its module docstring (source, what is exact, what is proposed, parameter counts,
    published numbers)."""
    import sys

    return (sys.modules[method_class(name).__module__].__doc__ or "").strip()


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


def check_method_layout(name: str, layout: str, shots: int | None = None) -> type[Method]:
    """Refuse, before anything is loaded, a method on a layout it cannot read or a protocol it does not run."""
    cls = method_class(name)
    if cls.layouts and layout not in cls.layouts:
        raise ConfigError(
            f"--layout {layout}: method '{name}' cannot read this layout (it reads: {', '.join(cls.layouts)}); "
            f"use one of those layouts, or see `avlowshot methods` for the methods that read {layout}"
        )
    task = "gfsl" if shots or layout == "avdiff" else "gzsl"
    if task not in cls.tasks:
        fix = "drop --shots" if task == "gfsl" and layout != "avdiff" else "pass --shots k (1, 5, 10 or 20)"
        if task == "gfsl" and layout == "avdiff":
            fix = "use a GZSL layout without --shots"
        raise ConfigError(f"method '{name}' does not run {task.upper()} (it runs: {', '.join(cls.tasks)}); {fix}")
    return cls


def config_model(name: str) -> type[BaseModel]:
    """The pydantic schema of method ``name``'s model hyper-parameters (unknown keys are errors)."""
    return method_class(name).config_class


def validate_model_config(name: str, model_config: Mapping[str, Any], source: str | None = None) -> BaseModel:
    """Validate a ``model:`` block; a :class:`ConfigError` names the file (``source``), every bad key and why."""
    schema = config_model(name)
    try:
        return schema.model_validate(dict(model_config))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = "model." + ".".join(str(part) for part in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"{key}: unknown key for method {name!r} (known: {', '.join(schema.model_fields)})")
            else:
                problems.append(f"{key}: {err['msg']} (got {err['input']!r})")
        where = f"{source}: " if source else ""
        raise ConfigError(where + "invalid model config\n  " + "\n  ".join(problems)) from None


def build_method(
    name: str,
    model_config: Mapping[str, Any] | BaseModel,
    dims: InputDims,
    compat: str = "none",
    classes=None,
) -> Method:
    """Build method ``name`` for inputs of ``dims`` from its model config (a mapping, or an already validated
    instance of :func:`config_model`). ``classes``: the label space (global ids) of methods with a classifier
    (``needs_label_space``); ignored by the others."""
    cls = method_class(name)
    if not isinstance(model_config, cls.config_class):
        model_config = validate_model_config(name, model_config)
    if cls.needs_label_space:
        return cls(model_config, dims, compat=compat, classes=classes)
    return cls(model_config, dims, compat=compat)
