"""Run configuration: one YAML per method x benchmark, validated on load, overridable from the command line.

A config file holds the top-level keys of :class:`RunConfig` and a ``model:`` section validated by the method's own
schema (``avlowshot.models.registry.config_model(method)``). Every unknown key and every value of the wrong type is
an error that names the key and the file (or the ``--set`` option it came from). ``--set key=value`` values are typed
like YAML scalars (``4`` is an int, ``1e-3`` a float, ``true`` a bool, ``null`` None); ``--set model.key=value``
reaches into the model section.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import reprlib
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from avlowshot.errors import ConfigError

COMPAT_MODES = ("none", "official")
AmpMode = Literal["auto", "bf16", "off"]
AMP_MODES: tuple[str, ...] = get_args(AmpMode)

log = logging.getLogger("avlowshot.train")


# ----------------------------------------------------------------------------------------------------------------
# YAML: PyYAML (YAML 1.1) reads ``1e-3`` as a string; every config writer expects a float.


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        """A key given twice in one mapping is an error (PyYAML keeps the last one silently). Keys merged in with
        ``<<`` may be overridden, as YAML intends."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"the key {_echo(key)} is given twice (first at line {seen[key].line + 1}); keep one",
                        key_node.start_mark,
                    )  # fmt: skip
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40
MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; a bigger file is not one
MAX_ERRORS = 10  # lines of an "invalid config" message


def _echo(value: Any) -> str:
    """A bounded repr of a value from a config: the work and the length stay small even for a value built by YAML
    aliases into billions of elements or an int of a million digits."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a repr must never fail an error message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 120 else text[:117] + "..."


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def yaml_dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------------------------------------------


# Bounds that no real run comes near and that keep a hostile config from allocating an epoch plan of terabytes
MAX_SEED = 2**64 - 1  # what torch.manual_seed takes
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 20
MAX_BATCHES = 1_000_000
MAX_EPOCH_SAMPLES = 1 << 27  # n_batches x batch_size: the indices of one epoch are drawn at once (1 GiB of int64)


class RunConfig(BaseModel):
    """Everything that decides the numbers of a run, except the data (layout, dataset, shots) and the seed's role."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)

    method: str = Field(description="registered method name, e.g. avca")
    variant: str | None = Field(
        None, description="named variant of the method (an ablation row, `run --variant`); part of the run name"
    )
    dataset: str | None = Field(None, description="benchmark the config was made for (checked against the run)")
    feature_set: str | None = Field(None, description="cls | main | clipclap (checked against the layout)")
    seed: int = Field(
        42, ge=0, le=MAX_SEED, description="seed of model init, dropout and sampling (--seed overrides); 0 to 2**64-1"
    )
    epochs: int = Field(
        50, ge=0, le=MAX_EPOCHS, description="stage-1 epochs (0: no training, the initial model is evaluated)"
    )
    substage_epochs: dict[str, int] = Field(
        default_factory=dict,
        description="stage-1 epochs of the later substages of curriculum methods (AV-DIFF: full); the first "
        "substage trains 'epochs'. --set substage_epochs.full=20",
    )
    lr: float = Field(1e-3, gt=0, le=1e3)
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    n_batches: int = Field(
        500, ge=1, le=MAX_BATCHES, description="batches per epoch (class-balanced, with replacement)"
    )
    weight_decay: float = Field(1e-5, ge=0, le=1e3, description="Adam L2 weight decay (coupled)")
    lr_scheduler: bool = Field(True, description="ReduceLROnPlateau('max') on the validation HM")
    lr_patience: int = Field(3, ge=0, le=MAX_EPOCHS)
    lr_factor: float = Field(0.1, gt=0, lt=1)
    beta_grid: str = Field("avca", description="calibrated-stacking grid searched on validation (metrics.beta_grid)")
    beta_from: Literal["best", "last"] = Field(
        "best", description="stage-1 epoch whose validation beta is used at test (AV-DIFF: last)"
    )
    reference_stage2_lr: Literal["val-hm", "replay"] = Field(
        "val-hm",
        description="what the reference does with the LR in stage 2, reproduced under --compat official: step the "
        "scheduler on the stage-1 val HM (AVCA/TCAF/ClipClap) or replay stage-1 drops (AV-DIFF). "
        "The default mode always replays the stage-1 drops.",
    )
    eval_batch_size: int = Field(1024, ge=1, le=MAX_BATCH)
    prefetch: Literal["auto", "always", "never"] = Field(
        "auto",
        description="gather the next training batch on a thread while this one trains; auto: on when the features "
        "exceed half of the RAM (disk reads to hide), off otherwise (on 2 cores the thread costs more than it saves)",
    )
    amp: AmpMode = Field(
        "auto",
        description="mixed precision of training steps and evaluation: bf16 autocast; auto = bf16 on CUDA, off on "
        "the CPU (CPUs without bf16 units run it slower than fp32)",
    )
    compile: bool = Field(False, description="torch.compile the method's loss and encoders (dynamic shapes)")
    model: dict[str, Any] = Field(default_factory=dict, description="method-specific, validated by its schema")

    @field_validator("beta_grid")
    @classmethod
    def _known_grid(cls, value: str) -> str:
        from avlowshot.eval.metrics import BETA_GRIDS

        if value not in BETA_GRIDS:
            raise ValueError(f"not a known grid (known: {', '.join(sorted(BETA_GRIDS))})")
        return value


TOP_LEVEL_KEYS = tuple(RunConfig.model_fields)
MAPPING_KEYS = ("model", "substage_epochs")


def _fmt_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _raise_validation(exc: ValidationError, source: str, overrides: dict[str, str], prefix: str = "") -> None:
    lines = []
    errors = exc.errors()
    unknown = False
    for err in errors[:MAX_ERRORS]:
        key = prefix + _fmt_loc(err["loc"])
        where = f"--set {key}={overrides[key]}" if key in overrides else source
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            unknown = unknown or not prefix
        elif "input" in err and err["type"] != "missing":
            msg += f", got {_echo(err['input'])} ({type(err['input']).__name__})"
        lines.append(f"{where}: '{_echo_key(key)}': {msg}")
    if len(errors) > MAX_ERRORS:
        lines.append(f"... and {len(errors) - MAX_ERRORS} more")
    if unknown:
        lines.append(f"(known keys: {', '.join(TOP_LEVEL_KEYS)})")
    raise ConfigError("invalid config\n  " + "\n  ".join(lines)) from None


def _echo_key(key: str) -> str:
    return key if len(key) <= 80 else key[:77] + "..."


def parse_override(item: str) -> tuple[str, Any, str]:
    """``key=value`` -> (key, typed value, raw value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value (e.g. --set epochs=4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError, OverflowError) as exc:
        problem = str(getattr(exc, "problem", None) or exc)
        raise ConfigError(f"--set {_echo_key(item)}: value is not a YAML scalar ({_echo(problem)})") from None
    return key, value, raw


def _model_keys(method) -> tuple[str, ...]:
    from avlowshot.models.registry import METHODS

    cls = METHODS.get(method) if isinstance(method, str) else None
    return tuple(cls.config_class.model_fields) if cls is not None else ()


def apply_overrides(raw: dict, items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Apply ``--set`` items to the raw mapping in place; returns {key: raw value} for error messages."""
    seen: dict[str, str] = {}
    for item in items:
        key, value, text = parse_override(item)
        parts = key.split(".")
        if parts[0] not in TOP_LEVEL_KEYS and parts[0] in _model_keys(raw.get("method")):
            parts = ["model", *parts]  # a model hyper-parameter may be set without its "model." prefix
        if parts[0] not in TOP_LEVEL_KEYS:
            raise ConfigError(f"--set {item}: unknown key '{parts[0]}' (known: {', '.join(TOP_LEVEL_KEYS)})")
        if len(parts) > 1 and parts[0] not in MAPPING_KEYS:
            raise ConfigError(
                f"--set {item}: '{parts[0]}' has no sub-keys "
                f"(only {', '.join(k + '.<key>' for k in MAPPING_KEYS)} have)"
            )
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{p}' is not a mapping")
            node = child
        node[parts[-1]] = value
        seen[".".join(parts)] = text
    return seen


def read_yaml(path: Path) -> dict:
    try:
        size = Path(path).stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes is not a config (at most {MAX_CONFIG_BYTES}); pass a YAML config")
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = str(getattr(exc, "problem", None) or exc)
        problem = problem if len(problem) <= 300 else problem[:297] + "..."
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    except (ValueError, RecursionError, OverflowError) as exc:  # e.g. an int of more than 4300 digits, deep nesting
        raise ConfigError(f"{path}: not a config ({type(exc).__name__}: {_echo(str(exc))})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values, got {type(data).__name__}")
    return data


def validate_config(
    raw: dict,
    *,
    source: str,
    overrides: dict[str, str] | None = None,
    method: str | None = None,
) -> RunConfig:
    """Validate a raw mapping (top level here, ``model`` by the method's schema). ``method`` fills or checks the
    ``method`` key."""
    overrides = overrides or {}
    raw = copy.deepcopy(raw)
    if method is not None:
        if raw.get("method") not in (None, method):
            raise ConfigError(f"{source}: 'method': the config is for '{raw['method']}', the run asks for '{method}'")
        raw["method"] = method
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        _raise_validation(exc, source, overrides)
    from avlowshot.models import registry  # the model schema is the method's business

    try:
        schema = registry.config_model(cfg.method)
    except KeyError:
        raise ConfigError(f"{source}: 'method': unknown method '{cfg.method}'") from None
    except ConfigError:
        raise
    except Exception as exc:  # a registry that reports unknown names its own way
        raise ConfigError(f"{source}: 'method': {exc}") from None
    try:
        model = schema.model_validate(cfg.model)
    except ValidationError as exc:
        _raise_validation(exc, source, overrides, prefix="model.")
    cfg.model = model.model_dump(mode="json")
    if not registry.method_class(cfg.method).trainable and cfg.epochs != 0:
        where = f"--set epochs={overrides['epochs']}" if "epochs" in overrides else source
        raise ConfigError(
            f"{where}: 'epochs': method '{cfg.method}' has no trainable parameters: it runs zero-epoch stages "
            f"(set epochs: 0)"
        )
    _check_finite(cfg, source, overrides)
    _check_epoch_size(cfg, source)
    _check_substage_epochs(cfg, source, overrides)
    return cfg


def _check_finite(cfg: RunConfig, source: str, overrides: dict[str, str]) -> None:
    """No inf / nan anywhere (the top level refuses them itself; method schemas may not)."""

    def walk(value: Any, key: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            where = f"--set {key}={overrides[key]}" if key in overrides else source
            raise ConfigError(f"{where}: '{key}': must be a finite number, got {value}")
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, key)

    walk(cfg.model, "model")


def _check_epoch_size(cfg: RunConfig, source: str) -> None:
    samples = cfg.n_batches * cfg.batch_size
    if samples > MAX_EPOCH_SAMPLES:
        raise ConfigError(
            f"{source}: 'n_batches' x 'batch_size' = {cfg.n_batches} x {cfg.batch_size} = {samples} samples per "
            f"epoch, more than {MAX_EPOCH_SAMPLES} (an epoch's draws are made at once); lower one of them"
        )


def _check_substage_epochs(cfg: RunConfig, source: str, overrides: dict[str, str]) -> None:
    """``substage_epochs`` may only name the later substages of the method's curriculum, with epochs >= 1."""
    from avlowshot.models import registry

    subs = registry.method_class(cfg.method).curriculum(cfg, "none") or []
    known = sorted({s.epochs_key for s in subs if s.epochs_key})
    for key, epochs in cfg.substage_epochs.items():
        dotted = f"substage_epochs.{key}"
        where = f"--set {dotted}={overrides[dotted]}" if dotted in overrides else source
        if key not in known:
            have = f"known: {', '.join(known)}" if known else f"method '{cfg.method}' has no substages"
            raise ConfigError(f"{where}: '{dotted}': unknown substage ({have})")
        if not 1 <= epochs <= MAX_EPOCHS:
            raise ConfigError(f"{where}: '{dotted}': must be >= 1 and <= {MAX_EPOCHS}, got {_echo(epochs)}")


def shipped_config(method: str, dataset: str, feature_set: str, shots: int | None = None) -> Path:
    """The shipped config of method x dataset x feature set: ``avlowshot/configs/<method>/<ds>-<fs>.yaml``; with
    ``shots``, ``<ds>-<fs>-<k>shot.yaml`` when the method ships one per shot setting (AV-DIFF), else the former."""
    base = resources.files("avlowshot").joinpath("configs", method)
    name = f"{dataset.lower()}-{feature_set}.yaml"
    path = base.joinpath(name)
    if shots:
        per_shot = base.joinpath(f"{dataset.lower()}-{feature_set}-{shots}shot.yaml")
        if per_shot.is_file() or not path.is_file():
            name, path = f"{dataset.lower()}-{feature_set}-{shots}shot.yaml", per_shot
    if not path.is_file():
        have = sorted(p.name for p in base.iterdir()) if base.is_dir() else []
        hint = f" (shipped for {method}: {', '.join(have)})" if have else f" (no config is shipped for '{method}')"
        raise ConfigError(f"no shipped config {method}/{name}{hint}; pass --config FILE")
    return Path(str(path))


def variant_files(method: str) -> dict[str, Path]:
    """The named variants shipped for ``method``: ``configs/<method>/variants/<name>.yaml``."""
    folder = resources.files("avlowshot").joinpath("configs", method, "variants")
    if not folder.is_dir():
        return {}
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def apply_variant(raw: dict, method: str, variant: str) -> None:
    """Merge the shipped variant ``variant`` of ``method`` (a partial config: the keys an ablation changes) into the
    raw config in place, before ``--set`` overrides, and record its name."""
    known = variant_files(method)
    if variant not in known:
        have = ", ".join(sorted(known)) if known else "none"
        raise ConfigError(f"--variant {variant}: method '{method}' has no such variant (shipped: {have})")
    path = known[variant]
    part = read_yaml(path)

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    merge(raw, part)
    raw["variant"] = variant


def load_config(
    path: str | Path | None,
    *,
    method: str | None = None,
    dataset: str | None = None,
    feature_set: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    seed: int | None = None,
    shots: int | None = None,
    variant: str | None = None,
    text_dim: int | None = None,
) -> RunConfig:
    """Load a YAML config (default: the shipped one for method x dataset x feature set), merge a named ``variant``,
    apply ``--set`` overrides and ``--seed``, validate, and check that it was made for this dataset and feature set.

    A ``--config`` file that leaves keys out is merged over the shipped config of its method x benchmark (never
    filled with the code's defaults, which are no published setting); without a shipped config it must be complete.
    ``text_dim``: the class-text dim a dataset of one's own declares; the method's text-bound model keys follow it
    (``Method.text_dim_keys``, e.g. TCAF's ``transformer_dim`` = 300 for word2vec) unless the config sets them."""
    from avlowshot.data.layouts import DATASETS

    if method is not None:
        from avlowshot.models.registry import method_class

        method_class(method)  # an unknown method lists the known ones, before any config is looked up
    own = dataset is not None and dataset not in DATASETS  # own data (from `extract`) starts from UCF's settings
    if path is None:
        if method is None or dataset is None or feature_set is None:
            raise ConfigError("no --config given and no method/dataset/feature set to find the shipped one")
        path = shipped_config(method, "UCF" if own else dataset, feature_set, shots)
        if own:
            log.info("no shipped config for %s: using %s (UCF's settings); pass --config to choose", dataset, path.name)
        raw = read_yaml(Path(path))
        user_model: set[str] = set()
        own_name = own
    else:
        raw = read_yaml(Path(path))
        own_name = own and "dataset" not in raw
        user_model = set(raw.get("model") or {}) if isinstance(raw.get("model"), dict) else set()
        raw = _merge_over_shipped(raw, Path(path), method, "UCF" if own else dataset, feature_set, shots)
    path = Path(path)
    if own_name:
        raw["dataset"] = dataset
    if variant:
        apply_variant(raw, method or raw.get("method"), variant)
    _follow_text_dim(raw, method, text_dim if own else None, user_model, overrides)
    applied = apply_overrides(raw, list(overrides))
    if seed is not None:
        raw["seed"] = seed
    cfg = validate_config(raw, source=str(path), overrides=applied, method=method)
    for key, want in (("dataset", dataset), ("feature_set", feature_set)):
        have = getattr(cfg, key)
        if want is not None and have is not None and have != want:
            where = f"--set {key}={applied[key]}" if key in applied else str(path)
            raise ConfigError(
                f"{where}: '{key}': the config is for {have}, the run is on {want} "
                f"(use the config made for {want}, or --set {key}={want} if you mean it)"
            )
    return cfg


def _merge_over_shipped(raw: dict, path: Path, method, dataset, feature_set, shots) -> dict:
    """``raw`` (a --config file) over the shipped config of its method x benchmark; with no shipped config for that
    benchmark, ``raw`` must set every key the method's shipped configs set."""
    method = raw.get("method", method)
    if not isinstance(method, str):
        return raw  # validation names the problem
    from avlowshot.data.layouts import DATASETS

    dataset = raw.get("dataset") or dataset
    if dataset is not None and dataset not in DATASETS:
        dataset = "UCF"  # a dataset of one's own starts from UCF's published settings
    feature_set = raw.get("feature_set") or feature_set
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    base_path = None
    if dataset is not None and feature_set is not None:
        try:
            base_path = shipped_config(method, dataset, feature_set, shots)
        except ConfigError:
            base_path = None
    if base_path is None:
        folder = resources.files("avlowshot").joinpath("configs", method)
        refs = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if refs:
            ref = read_yaml(Path(str(folder.joinpath(refs[0]))))
            missing = [k for k in ref if k not in raw and k not in ("dataset", "feature_set", "seed", "model")]
            missing += [f"model.{k}" for k in ref.get("model") or {} if k not in model]
            if missing:
                raise ConfigError(
                    f"{path}: the config leaves out {', '.join(missing[:8])}, and no config is shipped for {method} "
                    f"on {dataset} {feature_set} to take them from; set them (start from a shipped config or a "
                    "run's config.yaml)"
                )
        return raw
    base = read_yaml(base_path)
    taken = [k for k in base if k not in raw and k != "model"]
    taken += [f"model.{k}" for k in base.get("model") or {} if k not in model]
    if not taken:
        return raw
    merged = {**base, **{k: v for k, v in raw.items() if k != "model"}}
    merged["model"] = {**(base.get("model") or {}), **model}
    log.info("%s leaves out %s: taken from the shipped %s/%s", path, ", ".join(taken), method, base_path.name)
    return merged


def _follow_text_dim(raw: dict, method, text_dim: int | None, user_model: set[str], overrides) -> None:
    if text_dim is None or not isinstance(method, str):
        return
    from avlowshot.models.registry import method_class

    overridden = {parse_override(o)[0].removeprefix("model.") for o in overrides}
    model = raw.setdefault("model", {})
    for key in method_class(method).text_dim_keys:
        if key in user_model or key in overridden or model.get(key) == text_dim:
            continue
        log.info("model.%s = %d: the dataset's class-text dim (shipped: %s)", key, text_dim, model.get(key))
        model[key] = text_dim


def dump_config(cfg: RunConfig) -> str:
    return yaml_dump(cfg.model_dump(mode="json"))


def config_diff(a: RunConfig, b: RunConfig) -> list[str]:
    """Keys (dotted) whose values differ."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
