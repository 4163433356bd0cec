"""Plots of runs and tables (matplotlib, the ``plot`` extra), each written as PNG and PDF.

For a run directory: ``beta.*`` the stage-1 validation seen / unseen / HM (base / novel / HM) against the
calibration beta with the chosen beta marked (``val_curve`` of result.json); ``training.*`` the loss terms and the
validation HM per epoch of every stage folder (substages and repeats included); ``per-class.*`` the test accuracy of
every class, sorted, seen and unseen (base and novel) in two colours; ``tsne.*`` a t-SNE map of the test sample codes
and the class codes of the stage-2 model, coloured by class (it loads the model and the test features). For a log
dir: the plots of every run below it, and for a paper table the bar chart of ours (mean +- std over seeds) against
the published numbers (``table-<name>.*``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from avlowshot.errors import AvlowshotError

log = logging.getLogger("avlowshot.plots")

FIGSIZE = (8.0, 5.0)
DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out_dir / f"{stem}.{ext}"
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format=ext, dpi=DPI)
        tmp.replace(path)  # never a half-written image under the final name
        paths.append(path)
    _plt().close(fig)
    return paths


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AvlowshotError(f"{path}: not found (a finished run writes it)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise AvlowshotError(f"{path}: unreadable ({exc})") from None


def _group_names(task: str) -> tuple[str, str]:
    return ("base", "novel") if task == "gfsl" else ("seen", "unseen")


def plot_beta(result: dict[str, Any], out_dir: Path) -> list[Path]:
    curve = result.get("val_curve")
    if not curve:
        log.warning("%s: no val_curve in result.json (older run): re-evaluate it (avlowshot evaluate)", out_dir)
        return []
    plt = _plt()
    s_name, u_name = _group_names(result.get("task", "gzsl"))
    fig, ax = plt.subplots(figsize=FIGSIZE)
    b = np.asarray(curve["beta"], dtype=float)
    ax.plot(b, curve["seen"], marker=".", label=s_name)
    ax.plot(b, curve["unseen"], marker=".", label=u_name)
    ax.plot(b, curve["hm"], marker=".", label="HM", linewidth=2)
    ax.axvline(result["beta"], color="k", linestyle="--", label=f"chosen beta {result['beta']:.3g}")
    ax.set(xlabel="calibration beta", ylabel="stage-1 validation accuracy (%)", title=_title(result))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_dir, "beta")


def _title(result: dict[str, Any]) -> str:
    shots = f" {result['shots']}-shot" if result.get("shots") else ""
    return f"{result['method']} on {result['dataset']} {result['layout']}{shots}, seed {result['seed']}"


def plot_training(run_dir: Path, result: dict[str, Any], out_dir: Path) -> list[Path]:
    histories = sorted(run_dir.glob("stage-*/**/history.json"))
    if not histories:
        return []
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(histories), 2, figsize=(10.0, 2.6 * len(histories) + 0.6), squeeze=False)
    for (ax_loss, ax_val), path in zip(axes, histories, strict=True):
        hist = _read(path)
        name = str(path.parent.relative_to(run_dir))
        epochs = [h["epoch"] + 1 for h in hist]
        for term in hist[0]["train"] if hist else []:
            ax_loss.plot(epochs, [h["train"].get(term) for h in hist], marker=".", label=term)
        ax_loss.set(title=f"{name}: training losses", xlabel="epoch")
        for ax in (ax_loss, ax_val):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(0.5, max(epochs, default=1) + 0.5)
        ax_loss.legend(fontsize=7)
        if any("val" in h for h in hist):
            for key in ("seen", "unseen", "hm"):
                ax_val.plot(epochs, [100 * h["val"][key] if "val" in h else np.nan for h in hist], marker=".",
                            label={"seen": "seen/base", "unseen": "unseen/novel", "hm": "HM"}[key])  # fmt: skip
            ax_val.set(title=f"{name}: validation (%)", xlabel="epoch")
            ax_val.legend(fontsize=7)
        else:
            ax_val.plot(epochs, [h.get("lr") for h in hist], marker=".")
            ax_val.set(title=f"{name}: learning rate", xlabel="epoch", yscale="log")
    fig.suptitle(_title(result))
    fig.tight_layout()
    return _save(fig, out_dir, "training")


def _per_class(result: dict[str, Any]) -> tuple[dict[str, float], set[str]]:
    pc = result.get("per_class") or {}
    zsl = result.get("per_class_zsl") or {}
    if isinstance(pc, list):  # GFSL: one mapping per repeat, averaged
        names = pc[0].keys()
        pc = {n: float(np.nanmean([np.nan if r.get(n) is None else r[n] for r in pc])) for n in names}
        zsl = zsl[0] if zsl else {}
    pc = {n: v for n, v in pc.items() if v is not None and v == v}
    return pc, set(zsl)


def plot_per_class(result: dict[str, Any], out_dir: Path) -> list[Path]:
    pc, unseen = _per_class(result)
    if not pc:
        return []
    plt = _plt()
    s_name, u_name = _group_names(result.get("task", "gzsl"))
    items = sorted(pc.items(), key=lambda kv: -kv[1])
    colors = ["tab:orange" if n in unseen else "tab:blue" for n, _ in items]
    width = max(8.0, min(40.0, 0.12 * len(items)))
    fig, ax = plt.subplots(figsize=(width, 5.0))
    ax.bar(range(len(items)), [v for _, v in items], color=colors)
    if len(items) <= 60:
        ax.set_xticks(range(len(items)), [n for n, _ in items], rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", label=s_name), Patch(color="tab:orange", label=u_name)])
    ax.set(ylabel="test accuracy (%)", title=f"{_title(result)}: per-class test accuracy")
    fig.tight_layout()
    return _save(fig, out_dir, "per-class")


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = float(max(2.0, min(30.0, (len(x) - 1) / 3.0)))
    with threadpool_limits(1):  # its OpenMP threads oversubscribe a busy machine (measured: 30x slower)
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def stage2_test_codes(run_dir: Path, root_dir=None, cache_dir=None, max_samples: int = 2000):
    """(sample codes [N, d], labels [N], class codes [C, d] or None, class ids [C], unseen ids) of the stage-2
    model on its (first) test split; class codes only when they live in the samples' space."""
    import torch

    from avlowshot.train import checkpoint as ckpt
    from avlowshot.train import protocol
    from avlowshot.train.trainer import encode_samples

    info, cfg = protocol.load_run_info(run_dir)
    if root_dir is not None:
        info = {**info, "root_dir": str(Path(root_dir).resolve())}
    if not Path(info["root_dir"]).is_dir():
        raise AvlowshotError(
            f"{run_dir / protocol.RUN_FILE}: dataset root {info['root_dir']} not found; pass --root-dir"
        )
    ctx = protocol.RunContext(info, cfg, "cpu", cache_dir=cache_dir if cache_dir is not None else info.get("cache_dir"))
    stage_dir = ctx.stage2_dirs(run_dir)[0]
    summary = protocol.read_summary(stage_dir)
    if summary is None:
        raise AvlowshotError(f"{stage_dir}: stage 2 has not finished")
    method = ctx.build(2)
    c = ckpt.load_checkpoint(stage_dir / summary.checkpoint_last)
    method.load_state_dict(c.model_state())
    method.eval()
    split = ctx.protocol.stage2_test[0]
    idx = split.indices
    if len(idx) > max_samples:
        idx = np.sort(np.random.default_rng(0).choice(idx, max_samples, replace=False))
    with torch.no_grad():
        codes = encode_samples(method, ctx.store, idx, ctx.device, cfg.eval_batch_size)
        classes = torch.as_tensor(split.classes)
        class_codes = None
        if isinstance(codes, torch.Tensor) and not method.needs_label_space:
            cc = method.encode_classes(ctx.text[classes])
            if isinstance(cc, torch.Tensor) and cc.dim() == 2 and cc.shape[1] == codes.shape[1]:
                class_codes = cc.float().numpy()
        if not isinstance(codes, torch.Tensor):  # a tuple / dict of codes: the first part stands for the sample
            codes = codes[0] if isinstance(codes, tuple | list) else next(iter(codes.values()))
    labels = ctx.store.labels[torch.as_tensor(idx)].numpy()
    return codes.float().reshape(len(idx), -1).numpy(), labels, class_codes, split.classes, set(split.unseen.tolist())


def plot_tsne(run_dir: Path, result: dict[str, Any], out_dir: Path, root_dir=None, cache_dir=None) -> list[Path]:
    codes, labels, class_codes, classes, unseen = stage2_test_codes(run_dir, root_dir, cache_dir)
    x = codes if class_codes is None else np.concatenate([codes, class_codes])
    xy = tsne_2d(x, seed=int(result.get("seed") or 0))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 7.0))
    order = {int(c): i for i, c in enumerate(classes)}
    cmap = plt.get_cmap("tab20", max(len(classes), 1))
    col = np.array([cmap(order.get(int(y), 0) % cmap.N) for y in labels]).reshape(len(labels), 4)
    is_unseen = np.array([int(y) in unseen for y in labels], dtype=bool)
    n = len(codes)
    for mask, marker, size, label in ((~is_unseen, "o", 8, "test samples, seen/base"),
                                      (is_unseen, "^", 12, "test samples, unseen/novel")):  # fmt: skip
        if mask.any():
            ax.scatter(xy[:n][mask, 0], xy[:n][mask, 1], c=col[mask], s=size, marker=marker, label=label)
    if class_codes is not None:
        cc = [cmap(i % cmap.N) for i in range(len(classes))]
        ax.scatter(xy[n:, 0], xy[n:, 1], c=cc, s=90, marker="*", edgecolors="k", linewidths=0.5, label="class codes")
    ax.set(title=f"{_title(result)}: t-SNE of test codes", xticks=[], yticks=[])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_dir, "tsne")


def plot_run(run_dir: str | Path, out: str | Path | None = None, *, root_dir=None, cache_dir=None, tsne=True):
    """Every plot of one finished run; returns the files written."""
    run_dir = Path(run_dir)
    result = _read(run_dir / "result.json")
    out_dir = Path(out) if out is not None else run_dir / "plots"
    files = plot_beta(result, out_dir) + plot_training(run_dir, result, out_dir) + plot_per_class(result, out_dir)
    if tsne:
        files += plot_tsne(run_dir, result, out_dir, root_dir, cache_dir)
    return files


def plot_table(name: str, records: list[dict[str, Any]], out_dir: Path, compat: str = "none") -> list[Path]:
    """Grouped bars, ours (mean +- std over seeds) against published, for the cells of ``name`` that have runs."""
    from avlowshot.eval.report import aggregate, table_cells
    from avlowshot.sweeps.tables import get_table

    table = get_table(name)
    cells, _ = table_cells(table, aggregate(records), compat)
    bars = [(f"{row.label}\n{col.label}", c) for row, line in zip(table.rows, cells, strict=True)
            for col, c in zip(table.columns, line, strict=True) if c["ours"] is not None]  # fmt: skip
    if not bars:
        return []
    plt = _plt()
    x = np.arange(len(bars))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(bars) + 2), 5.0))
    pub = [np.nan if c["published"] is None else c["published"] for _, c in bars]
    ours = [c["ours"] for _, c in bars]
    err = [0.0 if c["std"] is None else c["std"] for _, c in bars]
    ax.bar(x - 0.2, pub, 0.4, label="published", color="tab:gray")
    ax.bar(x + 0.2, ours, 0.4, yerr=err, capsize=3, label="ours (mean ± std over seeds)", color="tab:blue")
    ax.set_xticks(x, [label for label, _ in bars], fontsize=7, rotation=45 if len(bars) > 6 else 0, ha="right")
    ax.set(ylabel="%", title=f"{table.name}: ours against published")
    ax.legend()
    fig.tight_layout()
    return _save(fig, out_dir, f"table-{name}")


def plot_path(
    path: str | Path, *, out=None, table: str | None = None, root_dir=None, cache_dir=None, tsne=True, runs=True
):
    """``path`` a run directory (its plots) or a log dir (every run's unless ``runs=False``, and the paper tables
    that have runs, or only ``table``)."""
    from avlowshot.eval.report import load_records
    from avlowshot.sweeps.tables import table_names

    path = Path(path)
    if (path / "result.json").is_file():
        return plot_run(path, out, root_dir=root_dir, cache_dir=cache_dir, tsne=tsne)
    records = load_records(path)
    if not records:
        raise AvlowshotError(f"{path}: neither a finished run directory nor a folder with result.json files below it")
    out_dir = Path(out) if out is not None else path / "plots"
    files = []
    for rec in records if runs else []:
        run_dir = path / rec["path"]
        files += plot_run(run_dir, out_dir / rec["path"], root_dir=None, cache_dir=cache_dir, tsne=tsne)
    for name in [table] if table else table_names():
        files += plot_table(name, records, out_dir)
    return files
