"""Tables of result records: one row per ``result.json`` below a folder, as markdown, csv or LaTeX.

GZSL rows show seen / unseen / HM / ZSL, GFSL rows base / novel / HM / FSL (mean over the repeats, with the std over
repeats in markdown and LaTeX). Each task gets its own table in markdown and LaTeX; csv is one flat table with every
metric column (and ``*_std`` columns) so that it loads into a dataframe.
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
    if key in ID_COLUMNS or key == "path":
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


def _id_columns(rows: list[dict[str, Any]]) -> list[str]:
    cols = [c for c in ID_COLUMNS if c != "shots" or any(r.get("shots") for r in rows)]
    return cols + ["path"]


def markdown(records: list[dict[str, Any]]) -> str:
    parts = []
    for task, rows in _groups(records):
        cols = _id_columns(rows) + list(METRICS[task])
        head = [HEADERS[c] for c in cols]
        lines = [f"### {task.upper()}", "", "| " + " | ".join(head) + " |"]
        numeric = set(METRICS[task]) | {"shots", "seed"}
        lines.append("|" + "|".join("---:" if c in numeric else "---" for c in cols) + "|")
        for r in rows:
            lines.append("| " + " | ".join(_cell(r, c, True, "±") for c in cols) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def to_csv(records: list[dict[str, Any]]) -> str:
    metric_cols = ["seen", "unseen", "base", "novel", "hm", "zsl", "fsl"]
    present = [m for m in metric_cols if any(m in r["metrics"] for r in records)]
    std_cols = [m for m in present if any(m in (r.get("metrics_std") or {}) for r in records)]
    cols = ["task", *ID_COLUMNS, *present, *(f"{m}_std" for m in std_cols), "best_epoch", "beta", "path"]
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


def latex(records: list[dict[str, Any]]) -> str:
    parts = []
    for task, rows in _groups(records):
        cols = [c for c in _id_columns(rows) if c != "path"] + list(METRICS[task])
        spec = "".join("r" if c in METRICS[task] or c in ("shots", "seed") else "l" for c in cols)
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


def render(records: list[dict[str, Any]], fmt: str = "markdown") -> str:
    if fmt not in FORMATS:
        raise AvlowshotError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if not records:
        return ""
    return {"markdown": markdown, "csv": to_csv, "latex": latex}[fmt](records)


def report(log_dir: str | Path, fmt: str = "markdown") -> str:
    records = load_records(log_dir)
    if not records:
        raise AvlowshotError(f"{log_dir}: no result.json below this folder (finished runs write one)")
    return render(records, fmt)
