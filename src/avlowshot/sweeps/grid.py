"""Grids: a YAML file (or a named table) expanded into one run request per run directory.

A grid file::

    roots: {UCF: /data/UCF, VGGSound: /data/VGGSound, UCF/avdiff: /data/avdiff/UCF}
    resources: {cpus: 1, gpus: 0.25}       # what each run asks Ray for
    device: cpu                            # cpu | cuda
    runs:                                  # blocks, each the product of its lists
      - methods: [avca, tcaf]
        layouts: [avca-cls]
        datasets: [UCF]
        shots: [null]                      # GFSL: 1, 5, 10, 20
        seeds: [1, 2, 3]                   # null: the config's seed
        compat: [none]
        set: [epochs=20]                   # --set overrides of every run of the block
        config: my.yaml                    # optional: instead of the shipped config
        variant: lr-small                  # optional: runs go to <log-dir>/<variant>/ (same method, other config)

A file without ``runs:`` is one block. A dataset's root is ``roots["<dataset>/<layout>"]``, else
``roots["<dataset>"]``, else ``<root-dir>/<dataset>`` (``--root-dir``), else ``<root-dir>`` itself when it is a
dataset folder (holds ``class-split/``).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from avlowshot.errors import AvlowshotError, ConfigError
from avlowshot.train.config import read_yaml


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpus: float = Field(1.0, gt=0, description="CPUs per run (also its torch threads)")
    gpus: float = Field(0.0, ge=0, description="GPU fraction per run (0.25: four runs share a GPU)")


class Block(BaseModel):
    model_config = ConfigDict(extra="forbid")

    methods: list[str]
    datasets: list[str]
    layouts: list[str]
    shots: list[int | None] = [None]
    seeds: list[int | None] = [None]
    compat: list[str] = ["none"]
    set: list[str] = []
    set_by_dataset: dict[str, list[str]] = {}
    config: str | None = None
    variant: str | None = None


class GridFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roots: dict[str, str] = {}
    resources: Resources = Resources()
    device: str = "cpu"
    cache_dir: str | None = None
    runs: list[Block]


@dataclass
class RunRequest:
    """One run of a sweep, everything a worker needs (plain data: it travels to Ray workers)."""

    method: str
    layout: str
    dataset: str
    root_dir: str | None
    log_dir: str  # the sweep's log dir
    shots: int | None = None
    seed: int | None = None
    compat: str = "none"
    sets: tuple[str, ...] = ()
    config: str | None = None
    variant: str | None = None
    device: str = "cpu"
    cache_dir: str | None = None
    cpus: float = 1.0
    gpus: float = 0.0
    table: str | None = None
    row: str | None = None
    resolved: dict[str, Any] | None = None  # the validated config (RunConfig dump), when it loaded
    error: str | None = None  # why it cannot run (config or root), recorded as its failure
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def run_log_dir(self) -> Path:
        return Path(self.log_dir) / self.variant if self.variant else Path(self.log_dir)

    @property
    def run_seed(self) -> int:
        if self.resolved is not None:
            return int(self.resolved["seed"])
        return 42 if self.seed is None else self.seed

    @property
    def run_id(self) -> str:
        """The run directory relative to the sweep's log dir."""
        from avlowshot.train.protocol import run_name

        config_variant = self.resolved.get("variant") if self.resolved is not None else None  # a shipped variant
        name = run_name(self.method, self.dataset, self.layout, self.shots, self.run_seed, self.compat, config_variant)
        return f"{self.variant}/{name}" if self.variant else name

    @property
    def run_dir(self) -> Path:
        return Path(self.log_dir) / self.run_id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunRequest:
        d = dict(d)
        d["sets"] = tuple(d.get("sets") or ())
        return RunRequest(**d)


def resolve_root(dataset: str, layout: str, roots: dict[str, str], root_dir: str | Path | None) -> str | None:
    for key in (f"{dataset}/{layout}", dataset):
        if key in roots:
            return str(Path(roots[key]).expanduser())
    if root_dir is not None:
        base = Path(root_dir).expanduser()
        if (base / dataset).is_dir():
            return str(base / dataset)
        if (base / "class-split").is_dir():
            return str(base)
        return str(base / dataset)
    return None


def parse_roots(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``--root UCF=/data/UCF`` (or ``UCF/avdiff=/data/avdiff/UCF``) items -> mapping."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"--root {item}: expected DATASET=PATH or DATASET/LAYOUT=PATH (e.g. --root UCF=/data/UCF)"
            )
        key, path = item.split("=", 1)
        out[key.strip()] = path.strip()
    return out


def resolve(req: RunRequest) -> RunRequest:
    """Load and validate the run's config (the shipped one unless ``config``), filling ``resolved`` or ``error``."""
    from avlowshot.data.layouts import get_layout
    from avlowshot.models.registry import METHODS
    from avlowshot.train.config import load_config, variant_files

    try:
        if req.method not in METHODS:
            raise ConfigError(
                f"unknown method '{req.method}': not registered in avlowshot.models.registry.METHODS yet "
                f"(known: {', '.join(sorted(METHODS))}); the run starts working once it is"
            )
        spec_layout = get_layout(req.layout)
        cfg = load_config(
            req.config,
            method=req.method,
            dataset=req.dataset,
            feature_set=spec_layout.feature_set,
            overrides=list(req.sets),
            seed=req.seed,
            shots=req.shots,
            variant=req.variant if req.variant in variant_files(req.method) else None,  # a shipped ablation config
        )
        req.resolved = cfg.model_dump(mode="json")
        if req.root_dir is None:
            raise ConfigError(
                f"no dataset root for {req.dataset} ({req.layout}): pass --root {req.dataset}=PATH or --root-dir"
            )
    except AvlowshotError as exc:
        req.error = str(exc)
    return req


def expand_block(
    block: Block,
    *,
    log_dir: str | Path,
    roots: dict[str, str],
    root_dir: str | Path | None,
    resources: Resources,
    device: str,
    cache_dir: str | None,
    base_dir: Path | None = None,
    extra_sets: tuple[str, ...] = (),
    seeds: list[int | None] | None = None,
) -> list[RunRequest]:
    out = []
    config = block.config
    if config is not None and base_dir is not None and not Path(config).is_absolute():
        config = str(base_dir / config)
    for method, layout, dataset, shots, seed, compat in itertools.product(
        block.methods, block.layouts, block.datasets, block.shots, seeds or block.seeds, block.compat
    ):
        sets = tuple(block.set) + tuple(block.set_by_dataset.get(dataset, ())) + tuple(extra_sets)
        out.append(
            RunRequest(
                method=method,
                layout=layout,
                dataset=dataset,
                root_dir=resolve_root(dataset, layout, roots, root_dir),
                log_dir=str(log_dir),
                shots=shots,
                seed=seed,
                compat=compat,
                sets=sets,
                config=config,
                variant=block.variant,
                device=device,
                cache_dir=cache_dir,
                cpus=resources.cpus,
                gpus=resources.gpus,
            )
        )
    return out


def load_grid_file(path: str | Path) -> GridFile:
    path = Path(path)
    raw = read_yaml(path)
    if "runs" not in raw:
        top = {k: raw.pop(k) for k in ("roots", "resources", "device", "cache_dir") if k in raw}
        raw = {**top, "runs": [raw]}
    try:
        return GridFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{path}: '{key}': {msg}")
        raise ConfigError("invalid grid file\n  " + "\n  ".join(problems)) from None


def dedupe(requests: list[RunRequest]) -> list[RunRequest]:
    """One request per run directory; two requests for one directory with other configs are an error."""
    seen: dict[str, RunRequest] = {}
    out = []
    for r in requests:
        key = r.run_id
        if key in seen:
            if seen[key].resolved != r.resolved or seen[key].sets != r.sets:
                raise ConfigError(
                    f"two runs of the grid write {key} with other configs; give one of them a 'variant' "
                    f"(a sub-folder of the log dir)"
                )
            continue
        seen[key] = r
        out.append(r)
    return out


def filter_values(text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise ConfigError(f"{text!r}: expected a comma-separated list") from None


def table_requests(
    name: str,
    *,
    log_dir: str | Path,
    roots: dict[str, str] | None = None,
    root_dir: str | Path | None = None,
    datasets: list[str] | None = None,
    methods: list[str] | None = None,
    shots: list[int] | None = None,
    seeds: list[int | None] | None = None,
    rows: list[str] | None = None,
    sets: tuple[str, ...] = (),
    compat: str | None = None,
    resources: Resources | None = None,
    device: str = "cpu",
    cache_dir: str | None = None,
) -> list[RunRequest]:
    """The runs of a named table, filtered (datasets, methods, shots, row labels or variants) and overridden."""
    from avlowshot.sweeps.tables import get_table

    table = get_table(name)
    resources = resources or Resources()
    out = []
    for row in table.rows:
        if methods is not None and row.method not in methods:
            continue
        if rows is not None and row.label not in rows and (row.variant or row.method) not in rows:
            continue
        for dataset, k in table.cells():
            if datasets is not None and dataset not in datasets:
                continue
            if shots is not None and k not in shots:
                continue
            for seed in seeds or [None]:
                out.append(
                    RunRequest(
                        method=row.method,
                        layout=row.layout,
                        dataset=dataset,
                        root_dir=resolve_root(dataset, row.layout, roots or {}, root_dir),
                        log_dir=str(log_dir),
                        shots=k,
                        seed=seed,
                        compat=compat or row.compat,
                        sets=row.overrides(dataset) + tuple(sets),
                        variant=row.variant,
                        device=device,
                        cache_dir=cache_dir,
                        cpus=resources.cpus,
                        gpus=resources.gpus,
                        table=name,
                        row=row.label,
                    )
                )
    return out


def grid_requests(
    path: str | Path,
    *,
    log_dir: str | Path,
    roots: dict[str, str] | None = None,
    root_dir: str | Path | None = None,
    sets: tuple[str, ...] = (),
    resources: Resources | None = None,
    device: str | None = None,
    cache_dir: str | None = None,
    seeds: list[int | None] | None = None,
) -> list[RunRequest]:
    """The runs of a grid file; ``seeds`` replaces the blocks' seeds, ``sets`` is added to every block's."""
    grid = load_grid_file(path)
    all_roots = {**grid.roots, **(roots or {})}
    out = []
    for block in grid.runs:
        out += expand_block(
            block,
            log_dir=log_dir,
            roots=all_roots,
            root_dir=root_dir,
            resources=resources or grid.resources,
            device=device or grid.device,
            cache_dir=cache_dir or grid.cache_dir,
            base_dir=Path(path).parent,
            extra_sets=tuple(sets),
            seeds=seeds,
        )
    return out


def prepare(requests: list[RunRequest]) -> list[RunRequest]:
    """Resolve every request's config (errors become per-run failures) and drop duplicates."""
    return dedupe([resolve(r) for r in requests])


def config_hash(config: dict[str, Any]) -> str:
    """Six hex digits of a config without its seed: runs that differ only in seed share it."""
    import json

    body = {k: v for k, v in config.items() if k != "seed"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:6]
