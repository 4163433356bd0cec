"""Tables of result records below a folder, as markdown, csv or LaTeX.

By default runs that differ only in seed are one row: mean +- std over the seeds (sample std, ddof=1) and n. Runs
of other feature sets, split families, shots, compat modes, layouts, variants or configs are never mixed in a row
(``config`` is a hash of the config without its seed). ``by="run"`` lists one row per ``result.json``: GFSL rows
then show the std over the novel-shot repeats. GZSL rows show seen / unseen / HM / ZSL, GFSL rows base / novel /
HM / FSL. Each task gets its own table in markdown and LaTeX; csv is one flat table with every metric column (and
``*_std`` columns) so that it loads into a dataframe.

``paper_table`` renders a named paper table (``avlowshot.sweeps.tables``): each cell ours (mean +- std, n) beside
the published number and the difference; a cell without runs shows the published number alone.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from avlowshot.errors import AvlowshotError

FORMATS = ("markdown", "csv", "latex")
ID_COLUMNS = ("method", "dataset", "layout", "feature_set", "split_family", "shots", "seed", "compat")
GROUP_COLUMNS = ("method", "variant", "dataset", "layout", "feature_set", "split_family", "shots", "compat", "config",
                 "n", "seeds")  # fmt: skip
METRICS = {"gzsl": ("seen", "unseen", "hm", "zsl"), "gfsl": ("base", "novel", "hm", "fsl")}
HEADERS = {
    "method": "method",
    "dataset": "dataset",
    "layout": "layout",
    "feature_set": "features",
    "split_family": "split",
    "shots": "shots",
    "seed": "seed",
    "compat": "compat",
    "seen": "S",
    "unseen": "U",
    "hm": "HM",
    "zsl": "ZSL",
    "base": "B",
    "novel": "N",
    "fsl": "FSL",
    "path": "run",
    "variant": "variant",
    "config": "config",
    "n": "n",
    "seeds": "seeds",
}


def load_records(log_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``result.json`` below ``log_dir`` (sorted by task, dataset, features, method, shots, seed)."""
    from avlowshot.train.protocol import find_results

    records = []
    for path in find_results(log_dir):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise AvlowshotError(f"{path}: unreadable result record ({exc})") from None
        if not isinstance(rec, dict) or "metrics" not in rec or "method" not in rec:
            raise AvlowshotError(f"{path}: not a result record (no 'method' / 'metrics')")
        rec = dict(rec)
        rec["path"] = str(path.parent.relative_to(log_dir)) if Path(log_dir) in path.parents else str(path.parent)
        rec.setdefault("task", "gfsl" if "base" in rec["metrics"] else "gzsl")
        marker = path.parent / "sweep.json"  # written by a sweep: the table row / variant that made the run
        if marker.is_file():
            try:
                rec.update({k: v for k, v in json.loads(marker.read_text(encoding="utf-8")).items() if k != "sets"})
            except (OSError, json.JSONDecodeError):
                pass
        rec.setdefault("variant", None)
        records.append(rec)

    def key(r: dict[str, Any]):
        return (
            r["task"] != "gzsl",
            str(r.get("dataset")),
            str(r.get("feature_set")),
            str(r.get("method")),
            r.get("shots") or 0,
            str(r.get("compat")),
            r.get("seed") or 0,
        )

    return sorted(records, key=key)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _cell(rec: dict[str, Any], key: str, with_std: bool, pm: str) -> str:
    if key in ID_COLUMNS or key in GROUP_COLUMNS or key == "path":
        return _fmt(rec.get(key))
    value = rec["metrics"].get(key)
    if value is None:
        return ""
    text = f"{float(value):.2f}"
    std = (rec.get("metrics_std") or {}).get(key)
    if with_std and std is not None:
        text += f" {pm} {float(std):.2f}"
    return text


def _groups(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    out = []
    for task in ("gzsl", "gfsl"):
        rows = [r for r in records if r["task"] == task]
        if rows:
            out.append((task, rows))
    return out


def _id_columns(rows: list[dict[str, Any]], ids: tuple[str, ...] | None = None) -> list[str]:
    """The identity columns of ``rows``: per run (with the run folder) or per seed group; shots and variant only
    when some row has one."""
    grouped = ids is not None
    cols = [c for c in (ids or ID_COLUMNS) if c not in ("shots", "variant") or any(r.get(c) for r in rows)]
    return cols if grouped else cols + ["path"]


def markdown(records: list[dict[str, Any]], ids: tuple[str, ...] | None = None) -> str:
    parts = []
    for task, rows in _groups(records):
        cols = _id_columns(rows, ids) + list(METRICS[task])
        head = [HEADERS[c] for c in cols]
        lines = [f"### {task.upper()}", "", "| " + " | ".join(head) + " |"]
        numeric = set(METRICS[task]) | {"shots", "seed", "n"}
        lines.append("|" + "|".join("---:" if c in numeric else "---" for c in cols) + "|")
        for r in rows:
            lines.append("| " + " | ".join(_cell(r, c, True, "±") for c in cols) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def to_csv(records: list[dict[str, Any]], ids: tuple[str, ...] | None = None) -> str:
    metric_cols = ["seen", "unseen", "base", "novel", "hm", "zsl", "fsl"]
    present = [m for m in metric_cols if any(m in r["metrics"] for r in records)]
    std_cols = [m for m in present if any(m in (r.get("metrics_std") or {}) for r in records)]
    tail = [] if ids is not None else ["best_epoch", "beta", "path"]
    cols = ["task", *(ids or ID_COLUMNS), *present, *(f"{m}_std" for m in std_cols), *tail]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in records:
        row = []
        for c in cols:
            if c in present:
                v = r["metrics"].get(c)
            elif c.endswith("_std") and c[:-4] in std_cols:
                v = (r.get("metrics_std") or {}).get(c[:-4])
            else:
                v = r.get(c)
            row.append("" if v is None else (f"{v:.4f}" if isinstance(v, float) else v))
        w.writerow(row)
    return buf.getvalue()


_LATEX_ESCAPE = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}"}


def _tex(text: str) -> str:
    return "".join(_LATEX_ESCAPE.get(ch, ch) for ch in text)


def latex(records: list[dict[str, Any]], ids: tuple[str, ...] | None = None) -> str:
    parts = []
    for task, rows in _groups(records):
        cols = [c for c in _id_columns(rows, ids) if c != "path"] + list(METRICS[task])
        spec = "".join("r" if c in METRICS[task] or c in ("shots", "seed", "n") else "l" for c in cols)
        lines = [f"% {task.upper()}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule"]
        lines.append(" & ".join(_tex(HEADERS[c]) for c in cols) + r" \\")
        lines.append(r"\midrule")
        for r in rows:
            cells = [_tex(_cell(r, c, True, "$\\pm$")) if c not in METRICS[task] else _cell(r, c, True, "$\\pm$")
                     for c in cols]  # fmt: skip
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def render(records: list[dict[str, Any]], fmt: str = "markdown", ids: tuple[str, ...] | None = None) -> str:
    if fmt not in FORMATS:
        raise AvlowshotError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if not records:
        return ""
    return {"markdown": markdown, "csv": to_csv, "latex": latex}[fmt](records, ids)


# ----------------------------------------------------------------------------------------------------------------
# Seed groups


def group_key(rec: dict[str, Any]) -> tuple:
    """What must be equal for two runs to share a row: all but the seed."""
    from avlowshot.sweeps.grid import config_hash

    return (
        rec["task"], rec.get("method"), rec.get("variant"), rec.get("dataset"), rec.get("layout"),
        rec.get("feature_set"), rec.get("split_family"), rec.get("shots"), rec.get("compat"),
        config_hash(rec.get("config") or {}),
    )  # fmt: skip


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group of runs that differ only in seed: mean and sample std (ddof=1; None for n=1) of each
    metric over the seeds, n, the seeds, and the run folders."""
    import numpy as np

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    out = []
    for key, runs in groups.items():
        first = runs[0]
        names = [m for m in first["metrics"] if all(m in r["metrics"] for r in runs)]
        values = {m: np.array([float(r["metrics"][m]) for r in runs], dtype=np.float64) for m in names}
        row = {k: first.get(k) for k in ("task", "method", "variant", "dataset", "layout", "feature_set",
                                         "split_family", "shots", "compat", "row", "table")}  # fmt: skip
        row.update(
            config=key[-1],
            n=len(runs),
            seeds=",".join(str(s) for s in sorted(r.get("seed") for r in runs)),
            metrics={m: float(v.mean()) for m, v in values.items()},
            metrics_std={m: float(v.std(ddof=1)) for m, v in values.items()} if len(runs) > 1 else {},
            paths=[r["path"] for r in runs],
            created=max(str(r.get("created", "")) for r in runs),
        )
        out.append(row)
    return out


def report(log_dir: str | Path, fmt: str = "markdown", by: str = "seed") -> str:
    """The table of every result below ``log_dir``: seed groups (``by="seed"``) or one row per run."""
    if by not in ("seed", "run"):
        raise AvlowshotError(f"--by {by}: expected seed or run")
    records = load_records(log_dir)
    if not records:
        raise AvlowshotError(f"{log_dir}: no result.json below this folder (finished runs write one)")
    if by == "run":
        return render(records, fmt)
    return render(aggregate(records), fmt, GROUP_COLUMNS)


# ----------------------------------------------------------------------------------------------------------------
# A paper's table: ours beside the published numbers


def table_cells(table, groups: list[dict[str, Any]], compat: str = "none") -> tuple[list[list[dict]], list[str]]:
    """For each row and column of ``table`` (a :class:`~avlowshot.sweeps.tables.PaperTable`): ``ours`` (mean),
    ``std``, ``n``, ``published``, ``diff``. A cell matches the seed groups of its row's method, variant and layout
    and its column's dataset and shots; of several (other configs), the one with the most seeds (then the newest)
    is shown and a note says so."""
    notes = []
    cells = []
    for row in table.rows:
        line = []
        for col in table.columns:
            match = [
                g for g in groups
                if g["method"] == row.method and g.get("variant") == row.variant and g["layout"] == row.layout
                and g["dataset"] == col.dataset and (g.get("shots") or None) == col.shots
                and g.get("compat") == (compat or row.compat) and col.metric in g["metrics"]
            ]  # fmt: skip
            pub = table.published(row, col)
            cell: dict[str, Any] = {"published": pub, "ours": None, "std": None, "n": 0, "diff": None}
            if match:
                best = max(match, key=lambda g: (g["n"], g["created"]))
                if len(match) > 1:
                    notes.append(
                        f"{row.label} / {col.label}: {len(match)} configs ran; shown: config {best['config']} "
                        f"(n={best['n']}; others: {', '.join(g['config'] for g in match if g is not best)})"
                    )
                ours = best["metrics"][col.metric]
                cell.update(ours=ours, std=best["metrics_std"].get(col.metric), n=best["n"], config=best["config"])
                cell["paths"] = best["paths"]
                if pub is not None:
                    cell["diff"] = ours - pub
            line.append(cell)
        cells.append(line)
    return cells, sorted(set(notes))


def _ours(cell: dict[str, Any], pm: str, minus: str = "-") -> str:
    text = f"{cell['ours']:.2f}"
    if cell["std"] is not None:
        text += f" {pm} {cell['std']:.2f}"
    return text + f" (n={cell['n']})"


def _paper_cell(cell: dict[str, Any], pm: str) -> str:
    pub = "" if cell["published"] is None else f"{cell['published']:.2f}"
    if cell["ours"] is None:
        return pub
    if cell["published"] is None:
        return _ours(cell, pm)
    return f"{_ours(cell, pm)} / {pub} ({cell['diff']:+.2f})"


def paper_table(
    name: str, log_dir: str | Path | None = None, fmt: str = "markdown", compat: str = "none", records=None
) -> str:
    """The named paper table with our runs below ``log_dir`` (or ``records``) beside the published numbers."""
    from avlowshot.sweeps.tables import get_table

    if fmt not in FORMATS:
        raise AvlowshotError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    table = get_table(name)
    if records is None:
        records = load_records(log_dir) if log_dir is not None else []
    cells, notes = table_cells(table, aggregate(records), compat)
    n_runs = len({p for line in cells for c in line for p in c.get("paths", ())})
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["table", "row", "method", "variant", "layout", "column", "dataset", "feature_set", "shots",
                    "metric", "ours", "ours_std", "n", "published", "diff", "config", "source"])  # fmt: skip
        for row, line in zip(table.rows, cells, strict=True):
            for col, c in zip(table.columns, line, strict=True):
                num = [None if c[k] is None else f"{c[k]:.4f}" for k in ("ours", "std")]
                pub = None if c["published"] is None else f"{c['published']:.2f}"
                diff = None if c["diff"] is None else f"{c['diff']:.4f}"
                w.writerow([table.name, row.label, row.method, row.variant or "", row.layout, col.label, col.dataset,
                            table.feature_set, col.shots or "", col.metric, num[0] or "", num[1] or "", c["n"],
                            pub or "", diff or "", c.get("config", ""), table.source])  # fmt: skip
        return buf.getvalue()
    if fmt == "markdown":
        lines = [f"### {table.name}: {table.title}", "", f"Published: {table.source}.", ""]
        lines.append(
            "Each cell: ours, mean ± std over seeds (n) / published (ours − published); without runs: the "
            f"published number. Compat {compat}; {n_runs} runs."
        )
        lines += ["", "| " + " | ".join(["model", *(c.label for c in table.columns)]) + " |"]
        lines.append("|---|" + "|".join("---:" for _ in table.columns) + "|")
        for row, line in zip(table.rows, cells, strict=True):
            lines.append("| " + " | ".join([row.label, *(_paper_cell(c, "±") for c in line)]) + " |")
        lines += [""] + [f"- note: {n}" for n in (*table.notes, *notes)]
        return "\n".join(lines).rstrip() + "\n"
    spec = "l" + "r" * len(table.columns)
    lines = [f"% {table.name}: {table.title}", f"% published: {table.source}", f"\\begin{{tabular}}{{{spec}}}"]
    lines += [r"\toprule", " & ".join(_tex(h) for h in ["Model", *(c.label for c in table.columns)]) + r" \\"]
    lines.append(r"\midrule")
    for row, line in zip(table.rows, cells, strict=True):
        tex_cells = [_tex(row.label)]
        for c in line:
            tex_cells.append(
                _paper_cell(c, "$\\pm$").replace("(n=", "($n$=").replace("(+", "($+$").replace("(-", "($-$")
            )
        lines.append(" & ".join(tex_cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% note: {n}" for n in (*table.notes, *notes)]
    return "\n".join(lines) + "\n"
