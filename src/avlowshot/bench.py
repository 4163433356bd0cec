"""``avlowshot bench``: speed and memory of one method on a synthetic benchmark of the real shape.

What is measured, in one process, with the same code paths as ``avlowshot run``:

* **data**: building (or reusing) the synthetic benchmark, opening it (cache build on first use, memory-mapped
  reopen after), and the data path of training (epoch plan = sampling, then per batch gather + padding / windows +
  masks + device copy), as a share of a training step; the once-per-stage set-up (samplers, the methods' observe
  hooks) is timed apart;
* **training**: ``--batches`` iterations (after warm-up steps) with the method's published config, of one
  substage for curriculum methods (``--substage``, default the first; set up as stage 1 sets it up, with its novel
  stream or joint stream): seconds per iteration (every optimiser step of its batches), samples/s, seconds per
  300-batch epoch;
* **FLOPs**: the model FLOPs of one training step (forward + backward, ``torch.utils.flop_counter``), the achieved
  FLOP/s, and the machine's fp32 matrix-multiply throughput on the *same GEMM shapes* the step issues, replayed in
  isolation in this run; their ratio says how close the step is to the machine's limit;
* **evaluation**: scoring the whole val split and every test split, including the search over the whole calibration
  grid;
* **memory**: peak resident set size and peak anonymous memory (sampled; file-backed pages of the memory-mapped
  features are not anonymous), and on CUDA the peak allocated device memory.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from avlowshot import __version__
from avlowshot.errors import AvlowshotError
from avlowshot.train.allocator import keep_freed_memory

EPOCH_BATCHES = 300  # the "epoch" the per-epoch figure is quoted for (AV-DIFF / ClipClap / TCAF use 300 batches)


@dataclass
class BenchSpec:
    method: str
    layout: str
    dataset: str
    scale: float
    device: str = "cpu"
    batches: int = 20
    warmup: int = 3
    seed: int = 0
    shots: int | None = None
    overrides: list[str] = field(default_factory=list)
    work_dir: Path | None = None
    evaluate: bool = True
    substage: str | None = None  # curriculum methods: the substage to time (default: the first)

    @property
    def name(self) -> str:
        shots = f"_{self.shots}shot" if self.shots else ""
        sub = f"_{self.substage}" if self.substage else ""
        device = self.device.replace(":", "")
        return f"{self.method}{sub}_{self.dataset}_{self.layout}{shots}_scale{self.scale:g}_{device}"

    @property
    def root(self) -> Path:
        """Where synthetic benchmarks, caches and records are kept: ``work_dir``, or the default."""
        return Path(self.work_dir) if self.work_dir is not None else default_work_dir()

    @property
    def record_path(self) -> Path:
        """The default JSON record: ``<root>/results/<name>.json``."""
        return self.root / "results" / f"{self.name}.json"


def default_work_dir() -> Path:
    from avlowshot.data.cache import default_cache_dir

    return default_cache_dir().parent / "bench"


# ----------------------------------------------------------------------------------------------------------------
# Memory


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (file-backed pages included)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024 if platform.system() == "Linux" else kb  # macOS reports bytes


class AnonymousMemorySampler:
    """Peak anonymous resident memory (``RssAnon``), sampled every ``interval`` seconds on a thread (Linux)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_kb = _proc_status_kb("RssAnon") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        kb = _proc_status_kb("RssAnon")
        if kb is not None and kb > self.peak_kb:
            self.peak_kb = kb

    def __enter__(self) -> AnonymousMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def available(self) -> bool:
        return _proc_status_kb("RssAnon") is not None


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and the GEMM reference


_GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


def step_flops_and_gemms(step) -> tuple[int, dict[tuple[int, ...], int]]:
    """Run ``step()`` once and count its FLOPs with ``torch.utils.flop_counter``'s per-op formulas; returns (total
    FLOPs, {(b, m, k, n): count} of its GEMMs). A dispatch mode alone, not ``FlopCounterMode``: its module hooks
    break the ``autograd.grad`` of a WGAN-GP gradient penalty."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    gemms: dict[tuple[int, ...], int] = {}
    total = [0]

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            packet = func.overloadpacket
            name = packet.__name__
            if name in _GEMM_OPS:
                a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
                if a.dim() == 2:
                    shape = (1, a.shape[0], a.shape[1], b.shape[1])
                else:
                    shape = (a.shape[0], a.shape[1], a.shape[2], b.shape[2])
                gemms[shape] = gemms.get(shape, 0) + 1
            out = func(*args, **kwargs)
            if packet in flop_registry:
                total[0] += int(flop_registry[packet](*args, **kwargs, out_val=out))
            return out

    with Recorder():
        step()
    return total[0], gemms


def gemm_throughput(gemms: dict[tuple[int, ...], int], device: torch.device, min_seconds: float = 0.05) -> dict:
    """Replay every GEMM shape of a step in isolation (fp32) and return the FLOP/s of the whole set: the rate this
    machine reaches on exactly these matrix products. Also a 1024^3 square GEMM as a machine reference."""

    def rate(b: int, m: int, k: int, n: int) -> float:
        x = torch.randn(b, m, k, device=device)
        y = torch.randn(b, k, n, device=device)
        fn = (lambda: torch.bmm(x, y)) if b > 1 else (lambda: torch.mm(x[0], y[0]))
        fn()
        reps, elapsed = 0, 0.0
        while elapsed < min_seconds:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(max(1, reps)):
                fn()
            _sync(device)
            elapsed += time.perf_counter() - t0
            reps = max(1, reps) * 2
        done = reps - 1  # 1 + 2 + 4 + ... + reps/2 calls
        return 2.0 * b * m * k * n * done / elapsed

    total_flops, total_seconds = 0.0, 0.0
    for (b, m, k, n), count in gemms.items():
        f = 2.0 * b * m * k * n * count
        total_flops += f
        total_seconds += f / rate(b, m, k, n)
    square = rate(1, 1024, 1024, 1024)
    return {
        "shapes": len(gemms),
        "gemm_flops_per_step": total_flops,
        "model_shapes_flops_per_s": total_flops / total_seconds if total_seconds else None,
        "square_1024_flops_per_s": square,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------


def synthetic_root(spec: BenchSpec, work_dir: Path) -> tuple[Path, float | None]:
    """The synthetic benchmark of ``spec`` under ``work_dir/synth`` (written once, atomically); seconds it took to
    write, or None when it was reused."""
    from avlowshot.data.layouts import get_layout
    from avlowshot.data.synth import write_synthetic

    layout = get_layout(spec.layout)
    shots = spec.shots if layout.task == "gfsl" else None
    name = f"{spec.layout}_{spec.dataset}_scale{spec.scale:g}_seed{spec.seed}" + (f"_{shots}shot" if shots else "")
    root = work_dir / "synth" / name
    if root.is_dir():
        return root, None
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root.parent))
    try:
        t0 = time.perf_counter()
        write_synthetic(spec.layout, spec.dataset, tmp / "root", scale=spec.scale, seed=spec.seed, shots=shots)
        seconds = time.perf_counter() - t0
        os.replace(tmp / "root", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root, seconds


def run_bench(spec: BenchSpec, progress=None) -> dict[str, Any]:
    """Measure ``spec`` and return the record (see the module docstring)."""
    from avlowshot.data.layouts import get_layout
    from avlowshot.models.base import count_parameters
    from avlowshot.train.config import load_config
    from avlowshot.train.protocol import RunContext
    from avlowshot.train.trainer import evaluate_split, precision, resolve_device

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    if spec.batches < 1 or spec.warmup < 0:
        raise AvlowshotError(f"--batches must be >= 1 (got {spec.batches})")
    device = resolve_device(spec.device)
    work_dir = spec.root
    layout = get_layout(spec.layout)
    cfg = load_config(
        None,
        method=spec.method,
        dataset=spec.dataset,
        feature_set=layout.feature_set,
        overrides=list(spec.overrides),
        seed=spec.seed,
        shots=spec.shots,
    )
    record: dict[str, Any] = {
        "method": spec.method,
        "layout": spec.layout,
        "dataset": spec.dataset,
        "scale": spec.scale,
        "shots": spec.shots,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "version": __version__,
        "torch": torch.__version__,
        "host": platform.node(),
        "allocator": keep_freed_memory(),
        "config": cfg.model_dump(mode="json"),
    }
    with AnonymousMemorySampler() as anon:
        say(f"synthetic benchmark under {work_dir / 'synth'}")
        root, synth_seconds = synthetic_root(spec, work_dir)
        cache_dir = work_dir / "cache"
        info = {
            "method": spec.method, "layout": spec.layout, "dataset": spec.dataset, "root_dir": str(root),
            "shots": spec.shots, "seed": spec.seed, "compat": "none",
        }  # fmt: skip
        say("opening the benchmark (first use builds the cache)")
        ctx = RunContext(info, cfg, spec.device, cache_dir=cache_dir)
        first_open = ctx.load_seconds
        t0 = time.perf_counter()
        RunContext(info, cfg, spec.device, cache_dir=cache_dir)
        reopen = time.perf_counter() - t0
        anon.sample()
        record["data"] = {
            "root": str(root),
            "videos": len(ctx.store),
            "classes": len(ctx.store.classes),
            "synth_seconds": synth_seconds,
            "open_seconds": first_open,
            "reopen_seconds": reopen,
            "feature_bytes": int(ctx.store.audio.data.nbytes + ctx.store.video.data.nbytes),
            "peak_rss_after_load_bytes": peak_rss_bytes(),
            "peak_anon_after_load_bytes": anon.peak_kb * 1024 if anon.available else None,
        }

        # ---- training: one substage of a curriculum method (default its first), set up as stage 1 sets it up
        from avlowshot.train.protocol import stage1_novel_indices, substage_trainer

        subs = ctx.curriculum or []
        names = [sub.name for sub in subs]
        if spec.substage is not None and spec.substage not in names:
            raise AvlowshotError(
                f"--substage {spec.substage}: {spec.method} has "
                + (f"the substages {', '.join(names)}" if names else "no substages (it trains in one stage)")
            )
        substage = next((sub for sub in subs if sub.name == spec.substage), subs[0] if subs else None)
        steps = spec.warmup + spec.batches
        out_dir = Path(tempfile.mkdtemp(prefix="avlowshot-bench-"))
        try:
            if substage is None:
                novel = None
                trainer = ctx.trainer(ctx.build(1), out_dir, "bench", stage=1)
            else:
                novel = stage1_novel_indices(ctx, substage)
                stream = novel if substage.novel_stream else None
                trainer = substage_trainer(ctx, 1, 0, subs.index(substage), substage, out_dir, None, stream)
            method = trainer.method
            record["substage"] = None if substage is None else substage.name
            record["n_params"] = int(count_parameters(method, trainable_only=True))
            trainer.n_batches = steps
            say(f"training: {spec.warmup} warm-up + {spec.batches} timed steps of {trainer.batch_size}")
            method.train()
            # The samplers and the methods' observe hooks (e.g. ProtoGAN's class prototypes over the whole training
            # set) run once per stage, not per batch: timed apart from the data path.
            t0 = time.perf_counter()
            sampler, novel_sampler = trainer.samplers(ctx.protocol.stage1_train.indices, novel)
            setup_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            plan = trainer.plan_epoch(sampler, 0, novel_sampler)
            plan_seconds = time.perf_counter() - t0
            data_s, step_s = 0.0, 0.0
            for b in range(steps):
                _sync(device)
                t0 = time.perf_counter()
                items = trainer.load_iteration(plan, b)
                _sync(device)
                t1 = time.perf_counter()
                trainer.train_iteration(items)
                _sync(device)
                t2 = time.perf_counter()
                if b >= spec.warmup:
                    data_s += t1 - t0
                    step_s += t2 - t1
            # the plan covers `steps` batches; charge the timed ones their share
            data_s += plan_seconds * spec.batches / steps
            items = trainer.load_iteration(plan, 0)
            flops, gemms = step_flops_and_gemms(lambda: trainer.train_iteration(items))
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        # an iteration: one batch, or a base and a novel batch; each of its optimiser steps (a GAN's critic and
        # generator steps on one batch) is part of it
        batches_read = len({id(item[0]) for item in items})
        per_batch = (data_s + step_s) / spec.batches
        achieved = flops / (step_s / spec.batches) if step_s > 0 else None
        say("GEMM reference: replaying the step's matrix products")
        gemm = gemm_throughput(gemms, device)
        record["train"] = {
            "batch_size": trainer.batch_size,
            "optimizer_steps_per_iteration": len(items),
            "batches_per_iteration": batches_read,
            "timed_batches": spec.batches,
            "seconds_per_batch": per_batch,
            "step_seconds": step_s / spec.batches,
            "data_seconds": data_s / spec.batches,
            "stage_setup_seconds": setup_seconds,
            "data_share": data_s / (data_s + step_s),
            "samples_per_second": trainer.batch_size * batches_read / per_batch,
            f"seconds_per_{EPOCH_BATCHES}_batch_epoch": per_batch * EPOCH_BATCHES,
            "flops_per_step": flops,
            "achieved_flops_per_s": achieved,
            **gemm,
            "fraction_of_gemm_throughput": (
                achieved / gemm["model_shapes_flops_per_s"] if achieved and gemm["model_shapes_flops_per_s"] else None
            ),
            "fraction_of_square_gemm": achieved / gemm["square_1024_flops_per_s"] if achieved else None,
        }

        # ---- evaluation: every sample of val and test, the whole calibration grid
        if spec.evaluate:
            from avlowshot.eval import metrics

            grid = metrics.beta_grid(cfg.beta_grid)
            splits = [("val", ctx.protocol.stage1_val)] + [
                (f"test{'' if i == 0 else i}", s) for i, s in enumerate(ctx.protocol.stage2_test)
            ]
            evals = {}
            # a classifier's label space differs between stages (AV-DIFF, the GFSL heads): test with a stage-2 model
            test_method = ctx.build(2) if substage is not None or method.needs_label_space else method
            for name, split in splits:
                model = method if name == "val" else test_method
                say(f"evaluating {name} ({len(split.indices)} videos x {len(grid)} betas)")
                _sync(device)
                t0 = time.perf_counter()
                phase = "val" if name == "val" else "test"
                with precision(device, cfg.amp):
                    bs = cfg.eval_batch_size
                    evaluate_split(model, ctx.store, split, ctx.text, device, bs, betas=grid, phase=phase)
                _sync(device)
                evals[name] = {"videos": len(split.indices), "seconds": time.perf_counter() - t0}
            record["eval"] = {"betas": len(grid), "splits": evals}

    record["memory"] = {
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_anon_bytes": anon.peak_kb * 1024 if anon.available else None,
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    return record


def write_record(record: dict[str, Any], path: Path) -> None:
    from avlowshot.train.checkpoint import atomic_write_json

    atomic_write_json(path, record)


@contextlib.contextmanager
def threads(n: int | None):
    """Run with ``n`` torch intra-op threads (None: the current count), pinned like a run (``train.threads``)."""
    from avlowshot.train.threads import pinned

    with pinned(n):
        yield


# ----------------------------------------------------------------------------------------------------------------
# The speed table: one row per trainable method and dataset, each measured in its own process


# In both papers' tables; timed in AV-DIFF's (their GFSL head), beside the other few-shot transformers.
GFSL_FIRST = ("attention-fusion", "perceiver")
TABLE_SHOTS = 5


@dataclass(frozen=True)
class TableRow:
    method: str
    layout: str
    shots: int | None
    substage: str | None = None  # a curriculum method has one row per substage
    evaluate: bool = True  # evaluation is timed once per method (its first row)


def table_rows(dataset: str, methods: list[str] | None = None) -> list[TableRow]:
    """The README speed table's rows for ``dataset``, in registry order: GZSL methods on the features of their
    paper's table (averaged methods on avca-cls, ClipClap on clipclap, TCAF on tcaf-cls), GFSL methods at 5 shots
    on the avdiff layout (VGGSound: the tcaf-cls features with ``--shots 5``, the derived few-shot benchmark, whose
    23 GB serve every temporal method; a full-size avdiff VGGSound root would be another 23 GB). A curriculum
    method gets one row per substage of its published config. Methods without trainable parameters (text-match)
    have no step to time."""
    from avlowshot.data.layouts import get_layout
    from avlowshot.models.registry import METHODS
    from avlowshot.train.config import load_config

    unknown = sorted(set(methods or []) - set(METHODS))
    if unknown:
        raise AvlowshotError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    rows = []
    for name, cls in METHODS.items():
        if (methods and name not in methods) or not cls.trainable:
            continue
        if "gzsl" in cls.tasks and name not in GFSL_FIRST:
            layout, shots = ("avca-cls" if "avca-cls" in cls.layouts else cls.layouts[0]), None
        else:
            layout, shots = ("tcaf-cls" if dataset == "VGGSound" else "avdiff"), TABLE_SHOTS
        cfg = load_config(None, method=name, dataset=dataset, feature_set=get_layout(layout).feature_set, shots=shots)
        subs = [sub.name for sub in cls.curriculum(cfg) or []] or [None]
        rows += [TableRow(name, layout, shots, sub if len(subs) > 1 else None, i == 0) for i, sub in enumerate(subs)]
    return rows


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f}"


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The README's speed table for bench records (one row each)."""
    head = (
        "| method | benchmark | batch | ms / step | data path | samples/s | s / 300 batches | GFLOP / step "
        "| of GEMM peak | eval val / test (s) | anon / RSS GB |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    lines = []
    for r in records:
        t, m = r["train"], r["memory"]
        shots = f" {r['shots']}-shot" if r.get("shots") else ""
        bench_name = f"{r['dataset']} {r['layout']}{shots} ({r['data']['videos']:,})"
        splits = (r.get("eval") or {}).get("splits", {})
        tests = [e["seconds"] for name, e in splits.items() if name.startswith("test")]
        if "val" in splits:
            test = f"{tests[0]:.1f}" if len(tests) == 1 else f"{min(tests):.1f}-{max(tests):.1f} (x{len(tests)})"
            evals = f"{splits['val']['seconds']:.1f} / {test}"
        else:
            evals = "not timed"
        frac = t.get("fraction_of_gemm_throughput")
        method = r["method"] + (f" ({r['substage']})" if r.get("substage") else "")  # the timed substage
        lines.append(
            f"| {method} | {bench_name} | {t['batch_size']} | {t['seconds_per_batch'] * 1e3:.0f} "
            f"| {100 * t['data_share']:.1f} % | {t['samples_per_second']:,.0f} "
            f"| {t[f'seconds_per_{EPOCH_BATCHES}_batch_epoch']:.0f} | {t['flops_per_step'] / 1e9:.1f} "
            f"| {'n/a' if frac is None else f'{100 * frac:.0f} %'} | {evals} "
            f"| {_gb(m['peak_anon_bytes'])} / {_gb(m['peak_rss_bytes'])} |"
        )
    return head + "\n".join(lines) + "\n"
