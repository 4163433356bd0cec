"""The ``bench`` command (registered on the main app by ``avlowshot.cli``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import typer
from rich.table import Table

from avlowshot.cli_common import DATASET_HELP, LAYOUT_HELP, console, err_console, fail, styled
from avlowshot.errors import AvlowshotError


def _si(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def summary_table(rec: dict) -> Table:
    d, t, m = rec["data"], rec["train"], rec["memory"]
    table = Table(title=f"{rec['method']} on {rec['dataset']} {rec['layout']} x{rec['scale']:g}, {rec['device']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("videos / classes", f"{d['videos']:,} / {d['classes']}"),
        ("features", _si(d["feature_bytes"], "B")),
        ("open (first / reopen)", f"{d['open_seconds']:.2f} s / {d['reopen_seconds']:.2f} s"),
        ("trainable parameters", f"{rec['n_params']:,}"),
        ("batch size", str(t["batch_size"])),
        ("stage set-up (samplers, observe hooks; once per stage)", f"{t.get('stage_setup_seconds', 0):.2f} s"),
        ("training step (data + step)", f"{t['seconds_per_batch'] * 1e3:.1f} ms"),
        ("data path share", f"{100 * t['data_share']:.1f} %"),
        ("samples / s", f"{t['samples_per_second']:.0f}"),
        ("300-batch epoch", f"{t['seconds_per_300_batch_epoch']:.1f} s"),
        ("FLOPs per step", _si(t["flops_per_step"], "FLOP")),
        ("achieved", _si(t["achieved_flops_per_s"], "FLOP/s")),
        ("GEMM, the step's shapes", _si(t["model_shapes_flops_per_s"], "FLOP/s")),
        ("fraction of GEMM throughput", f"{100 * (t['fraction_of_gemm_throughput'] or 0):.1f} %"),
    ]
    for name, e in (rec.get("eval") or {}).get("splits", {}).items():
        rows.append((f"eval {name} ({e['videos']:,} videos, {rec['eval']['betas']} betas)", f"{e['seconds']:.2f} s"))
    rows.append(("peak RSS", _si(m["peak_rss_bytes"], "B")))
    rows.append(("peak anonymous memory", _si(m["peak_anon_bytes"], "B")))
    if m.get("cuda_peak_allocated_bytes") is not None:
        rows.append(("peak CUDA memory", _si(m["cuda_peak_allocated_bytes"], "B")))
    for row in rows:
        table.add_row(*row)
    return table


def register(app: typer.Typer) -> None:
    @app.command(
        "bench",
        epilog="Example: avlowshot bench --method tcaf --layout tcaf-cls --dataset UCF --scale 1.0 --batches 10",
    )
    def bench_cmd(
        method: str = typer.Option(..., help="Method name, e.g. avca."),
        layout: str = typer.Option(..., help=LAYOUT_HELP),
        dataset: str = typer.Option(..., help=DATASET_HELP),
        scale: float = typer.Option(0.1, help="Synthetic benchmark size (1.0 = the real benchmark's size)."),
        device: str = typer.Option("cpu", help="cpu | cuda"),
        batches: int = typer.Option(20, help="Timed training steps (after 3 warm-up steps)."),
        shots: int = typer.Option(None, help="GFSL: shots per novel class."),
        set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. batch_size=64."),
        seed: int = typer.Option(0, help="Seed of the synthetic benchmark and the model."),
        threads: int = typer.Option(None, help="torch intra-op threads (default: torch's)."),
        work_dir: Path = typer.Option(None, help="Where synthetic benchmarks and caches are kept and reused."),
        out: Path = typer.Option(None, help="JSON record (default: <work-dir>/results/<name>.json)."),
        no_eval: bool = typer.Option(False, "--no-eval", help="Skip the evaluation timing."),
        substage: str = typer.Option(None, help="Curriculum methods: the substage to time (default: the first)."),
    ) -> None:
        """Measure data loading, training throughput, FLOPs vs GEMM throughput, evaluation time and memory."""
        from avlowshot.train.threads import pin_environment

        pin_environment()  # before torch loads its thread pools
        from avlowshot import bench

        spec = bench.BenchSpec(
            method=method, layout=layout, dataset=dataset, scale=scale, device=device, batches=batches,
            shots=shots, overrides=list(set_), seed=seed, work_dir=work_dir, evaluate=not no_eval, substage=substage,
        )  # fmt: skip
        try:
            with bench.threads(threads):
                record = bench.run_bench(spec, progress=lambda msg: err_console.print(styled(msg, "dim")))
        except AvlowshotError as exc:
            raise fail(exc) from None
        path = out or spec.record_path
        bench.write_record(record, path)
        console.print(summary_table(record))
        console.print(f"record: {path}")

    @app.command(
        "bench-table",
        epilog="Example: avlowshot bench-table --dataset UCF --methods avca,tcaf,avdiff --batches 10 --out speed.md",
    )
    def bench_table_cmd(
        dataset: str = typer.Option(..., help=DATASET_HELP),
        methods: str = typer.Option(None, help="Comma-separated methods (default: every trainable method)."),
        scale: float = typer.Option(1.0, help="Synthetic benchmark size (1.0 = the real benchmark's size)."),
        device: str = typer.Option("cpu", help="cpu | cuda"),
        batches: int = typer.Option(10, help="Timed training steps per method (after 3 warm-up steps)."),
        threads: int = typer.Option(None, help="torch intra-op threads (default: torch's)."),
        work_dir: Path = typer.Option(None, help="Where synthetic benchmarks, caches and records are kept."),
        reuse: bool = typer.Option(False, "--reuse", help="Keep the rows whose record exists; measure the rest."),
        out: Path = typer.Option(None, help="Also write the markdown table to this file."),
    ) -> None:
        """Run `bench` for every method of the speed table and print the table as markdown.

        Published configs and batch sizes; one fresh process per row (a curriculum method: one per substage), one
        after the other; the records are kept under <work-dir>/results."""
        from avlowshot import bench

        try:
            rows = bench.table_rows(dataset, [m.strip() for m in methods.split(",")] if methods else None)
        except AvlowshotError as exc:
            raise fail(exc) from None
        records, failed = [], []
        for i, row in enumerate(rows, 1):
            spec = bench.BenchSpec(method=row.method, layout=row.layout, dataset=dataset, scale=scale, device=device,
                                   shots=row.shots, substage=row.substage, work_dir=work_dir)  # fmt: skip
            path = spec.record_path
            if not (reuse and path.is_file()):
                label = row.method + (f" ({row.substage})" if row.substage else "")
                err_console.print(styled(f"[{i}/{len(rows)}] {label} on {dataset} {row.layout}", "dim"))
                cmd = [sys.executable, "-m", "avlowshot", "bench", "--method", row.method, "--layout", row.layout,
                       "--dataset", dataset, "--scale", str(scale), "--device", device, "--batches", str(batches),
                       "--work-dir", str(spec.root), "--out", str(path)]  # fmt: skip
                cmd += ["--shots", str(row.shots)] if row.shots else []
                cmd += ["--substage", row.substage] if row.substage else []
                cmd += [] if row.evaluate else ["--no-eval"]
                cmd += ["--threads", str(threads)] if threads else []
                done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode != 0:
                    failed.append(label)
                    err_console.print(styled(f"{label} failed:", "bold red"), done.stderr.strip()[-2000:])
                    continue
            records.append(json.loads(path.read_text()))
        table = bench.markdown_table(records)
        typer.echo(table, nl=False)  # plain text: no wrapping of the wide rows
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table)
        if failed:
            raise fail(AvlowshotError(f"bench failed for {', '.join(failed)} (messages above)"))
