"""The papers' tables as named grids, with their published numbers (package data, ``sweeps/tables/<name>.yaml``).

A table has columns (dataset, shots, metric; the feature set follows from the layout) and rows (a method and its
config: layout, ``--set`` overrides, a variant name when the same method appears with another config). Each row
carries the published numbers of its cells, copied verbatim from ``specs/results.md``, with the source.

Rows whose method is not registered yet stay in the table: running them records a per-run "unknown method" failure,
and they start working once the method is in ``models/registry.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from avlowshot.errors import ConfigError
from avlowshot.train.config import yaml_load

METRIC_NAMES = {"seen": "S", "unseen": "U", "hm": "HM", "zsl": "ZSL", "base": "B", "novel": "N", "fsl": "FSL"}


@dataclass(frozen=True)
class Column:
    dataset: str
    metric: str  # a key of the result record's ``metrics``
    label: str
    shots: int | None = None


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    published: tuple[float | None, ...]
    layout: str
    variant: str | None = None  # a sub-folder of the log dir for a method run with another config
    sets: tuple[str, ...] = ()
    sets_by_dataset: dict[str, tuple[str, ...]] = field(default_factory=dict)
    compat: str = "none"

    def overrides(self, dataset: str) -> tuple[str, ...]:
        return self.sets + self.sets_by_dataset.get(dataset, ())


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    source: str
    notes: tuple[str, ...]
    layout: str
    task: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]

    @property
    def feature_set(self) -> str:
        from avlowshot.data.layouts import get_layout

        return get_layout(self.layout).feature_set

    def cells(self):
        """(dataset, shots) pairs the table's columns cover, in column order."""
        out: list[tuple[str, int | None]] = []
        for c in self.columns:
            if (c.dataset, c.shots) not in out:
                out.append((c.dataset, c.shots))
        return out

    def published(self, row: Row, col: Column) -> float | None:
        return row.published[self.columns.index(col)]


def _package_dir():
    return resources.files("avlowshot").joinpath("sweeps", "tables")


@cache
def table_names() -> tuple[str, ...]:
    """Names of the shipped tables, in the order of the papers."""
    order = ["avca-main", "avca-cls", "tcaf", "clipclap"] + [f"avdiff-table{i}" for i in range(2, 7)]
    have = sorted(p.name[: -len(".yaml")] for p in _package_dir().iterdir() if p.name.endswith(".yaml"))
    return tuple([n for n in order if n in have] + [n for n in have if n not in order])


def _parse(name: str, raw: dict[str, Any]) -> PaperTable:
    cols = tuple(Column(c["dataset"], c["metric"], c["label"], c.get("shots")) for c in raw["columns"])
    rows = []
    for r in raw["rows"]:
        pub = tuple(None if v is None else float(v) for v in r["published"])
        if len(pub) != len(cols):
            raise ConfigError(f"table {name}: row {r['label']!r} has {len(pub)} numbers for {len(cols)} columns")
        rows.append(
            Row(
                label=r["label"],
                method=r["method"],
                published=pub,
                layout=r.get("layout", raw["layout"]),
                variant=r.get("variant"),
                sets=tuple(r.get("set", ())),
                sets_by_dataset={k: tuple(v) for k, v in (r.get("set_by_dataset") or {}).items()},
                compat=r.get("compat", "none"),
            )
        )
    return PaperTable(
        name=name,
        title=raw["title"],
        source=raw["source"],
        notes=tuple(raw.get("notes", ())),
        layout=raw["layout"],
        task=raw["task"],
        columns=cols,
        rows=tuple(rows),
    )


@cache
def get_table(name: str) -> PaperTable:
    if name not in table_names():
        raise ConfigError(f"--table {name}: unknown table (known: {', '.join(table_names())}; see avlowshot tables)")
    text = _package_dir().joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return _parse(name, yaml_load(text))


def describe(table: PaperTable) -> str:
    """A plain-text listing of a table: its rows (method + config) and columns (dataset, features, shots, metric)."""
    from avlowshot.models.registry import METHODS

    lines = [f"{table.name}: {table.title}", f"  source: {table.source}"]
    lines += [f"  note: {n}" for n in table.notes]
    lines.append(f"  columns ({table.task.upper()}, features {table.feature_set}):")
    for c in table.columns:
        shots = f", {c.shots}-shot" if c.shots else ""
        lines.append(f"    {c.label:<20} {c.dataset}{shots}, {METRIC_NAMES.get(c.metric, c.metric)}")
    lines.append("  rows:")
    for r in table.rows:
        cfg = list(r.sets) + [f"{ds}: {' '.join(v)}" for ds, v in r.sets_by_dataset.items()]
        extra = f" --set {' '.join(cfg)}" if cfg else ""
        var = f" [{r.variant}]" if r.variant else ""
        state = "" if r.method in METHODS else "  (method not registered yet)"
        lines.append(f"    {r.label:<26} {r.method} on {r.layout}{var}{extra}{state}")
    return "\n".join(lines) + "\n"
