"""The two-stage protocol, one run directory per (method, dataset, layout, shots, seed, compat), and the result
record.

Run directory ``<log-dir>/<method>_<dataset>_<layout>[_<k>shot]_seed<N>[_official]/``::

    run.json          what was run: method, layout, dataset, root dir, shots, seed, compat, threads, version
    config.yaml       the resolved config (loadable with --config)
    stage-1/          checkpoints/epoch-NNN/ (latest + best), history.json, summary.json, TensorBoard events
    stage-2/          the same (GZSL); GFSL: stage-2/repeat-0/, repeat-1/, repeat-2/
    result.json       the result record (written by the eval part)

Methods trained in substages (``Method.curriculum``, e.g. AV-DIFF: base, full) get one folder per substage:
``stage-1/<substage>/`` for each, ``stage-2/<substage>/`` for every substage but the last, and the last substage
per repeat in ``stage-2/repeat-r/`` (GZSL: in ``stage-2/<substage>/``); an earlier substage that reads the novel
shots (``novel_stream`` or ``joint``) is trained per repeat too, in ``stage-2/<substage>/repeat-r/``. A substage
without validation (``Substage.validate``, e.g. f-VAEGAN's generator) hands its last epoch on. A substage starts
from the previous one's best (stage 1) or last (stage 2) checkpoint, optionally with its optimiser state; stage 2 trains
each substage for its stage-1 best + 1 epochs and replays its stage-1 LR drops.

Stage 1 trains on stage-1 train (GFSL: base + the stage-1 novel shots), validates on stage-1 val after every epoch
and keeps the best epoch (strictly higher HM) and its beta. Stage 2 builds a fresh model with the same seed and
trains on stage-2 train (GFSL: + the novel shots of the repeat) for best + 1 epochs. By default the learning-rate
drops recorded in stage 1 are replayed at the same epochs; ``--compat official`` does what the reference does
(``reference_stage2_lr``). The eval part re-scores the stage-1 model on val to get beta (the same numbers as during
training) and tests every stage-2 model with it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avlowshot import __version__
from avlowshot.errors import AvlowshotError, CheckpointError, ConfigError
from avlowshot.eval import metrics
from avlowshot.train import checkpoint as ckpt
from avlowshot.train import threads as threads_mod
from avlowshot.train.config import (
    AMP_MODES,
    COMPAT_MODES,
    RunConfig,
    config_diff,
    dump_config,
    read_yaml,
    validate_config,
)
from avlowshot.train.trainer import (
    EpochCallback,
    StageOutcome,
    Trainer,
    compile_method,
    evaluate_split,
    metric_record,
    precision,
    resolve_device,
    seed_everything,
)

log = logging.getLogger("avlowshot.train")

PARTS = ("all", "stage-1", "stage-2", "eval")
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
RESULT_FILE = "result.json"
RUN_FIELDS = ("method", "layout", "dataset", "root_dir", "shots", "seed", "compat")
GZSL_KEYS = ("seen", "unseen", "hm", "zsl")
GFSL_KEYS = ("base", "novel", "hm", "fsl")


def run_name(
    method: str,
    dataset: str,
    layout: str,
    shots: int | None,
    seed: int,
    compat: str = "none",
    variant: str | None = None,
) -> str:
    name = f"{method}_{dataset}_{layout}"
    if shots:
        name += f"_{shots}shot"
    name += f"_seed{seed}"
    if compat != "none":
        name += f"_{compat}"
    if variant:
        name += f"_{variant}"
    return name


@dataclass
class RunSpec:
    """Everything a run needs; ``cfg`` is the resolved config (its ``seed`` is the run's seed)."""

    method: str
    layout: str
    dataset: str
    root_dir: Path
    log_dir: Path
    cfg: RunConfig
    shots: int | None = None
    compat: str = "none"
    device: str = "cpu"
    cache_dir: Path | None = None
    rebuild_cache: bool = False
    verify_cache: bool = False
    progress: bool = False
    threads: int | None = None  # CPU threads (None: the run directory's recorded count, else the current one)

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def run_dir(self) -> Path:
        return Path(self.log_dir) / run_name(
            self.method, self.dataset, self.layout, self.shots, self.seed, self.compat, self.cfg.variant
        )


# ----------------------------------------------------------------------------------------------------------------
# Context: the data and everything derived from it, loaded once per command


class RunContext:
    def __init__(self, info: dict[str, Any], cfg: RunConfig, device: str, progress: bool = False, **load_kw):
        from avlowshot.data.benchmark import load_benchmark

        self.info = info
        self.cfg = cfg
        self.device = resolve_device(device)
        self.progress = progress
        self.compat = info["compat"]
        t0 = time.perf_counter()
        self.bench = load_benchmark(
            info["layout"],
            info["root_dir"],
            info["dataset"],
            shots=info["shots"],
            cache_dir=load_kw.get("cache_dir"),
            rebuild_cache=load_kw.get("rebuild_cache", False),
            verify_cache=load_kw.get("verify_cache", False),
        )
        from avlowshot.models import registry

        self.store = self.bench.store
        cls = registry.method_class(cfg.method)
        if cls.inputs == "averaged":  # temporal layouts: each video's mean over its valid rows
            self.store = self.store.averaged(normalize_video_rows=cls.average_normalized_video)
        self.protocol = self.bench.protocol(info["shots"])
        self.task = self.protocol.task
        order = "official" if self.compat == "official" else "by-name"
        self.text = self.store.classes.embeddings(order).to(self.device)
        self.load_seconds = time.perf_counter() - t0
        log.info(
            "loaded %s %s (%d videos, %d classes) in %.1fs",
            info["dataset"],
            info["layout"],
            len(self.store),
            len(self.store.classes),
            self.load_seconds,
        )

    def build(self, stage: int = 2):
        """A fresh method, its init seeded by the run's seed (every stage and repeat starts from the same init).
        Methods with a classifier get the label space of ``stage`` (1: stage-1 val classes, 2: test classes)."""
        from avlowshot.models import registry
        from avlowshot.models.base import InputDims

        seed_everything(self.cfg.seed)
        dims = InputDims(self.store.audio.dim, self.store.video.dim, int(self.text.shape[1]))
        method = registry.build_method(
            self.cfg.method, dict(self.cfg.model), dims, self.compat, classes=self.label_space(stage)
        ).to(self.device)
        if self.cfg.compile:
            compile_method(method)
        return method

    def label_space(self, stage: int) -> np.ndarray:
        p = self.protocol
        return p.stage1_val.classes if stage == 1 else np.union1d(p.stage2_train.classes, p.stage2_test[0].classes)

    @property
    def curriculum(self):
        """The method's substages (``Method.curriculum``), or None."""
        from avlowshot.models import registry

        cls = registry.method_class(self.cfg.method)
        subs = cls.curriculum(self.cfg, self.compat)
        if subs and self.task not in cls.tasks:
            raise ConfigError(
                f"method '{self.cfg.method}' is a generalised few-shot method: pass --shots (1, 5, 10 or 20)"
            )
        return subs or None

    def stage1_dir(self, run_dir: Path) -> Path:
        """The stage-1 folder whose model gives beta (the last substage's for curriculum methods)."""
        subs = self.curriculum
        return run_dir / "stage-1" / subs[-1].name if subs else run_dir / "stage-1"

    def trainer(self, method, out_dir: Path, name: str, stage: int, repeat: int = 0, substage=None) -> Trainer:
        trainer = Trainer(
            method,
            self.store,
            self.text,
            self.cfg,
            self.device,
            out_dir,
            name=name,
            seed=self.cfg.seed,
            stage=stage,
            repeat=repeat,
            compat=self.compat,
            progress=self.progress,
            meta={"method": self.cfg.method, "version": __version__},
            substage=substage,
        )
        trainer.task = self.task  # epoch lines say base / novel / FSL for GFSL
        return trainer

    def stage1_train_indices(self) -> np.ndarray:
        p = self.protocol
        idx = p.stage1_train.indices
        if p.stage1_novel is not None:
            idx = np.union1d(idx, p.stage1_novel.indices)
        return idx

    def stage2_train_indices(self, repeat: int) -> np.ndarray:
        p = self.protocol
        idx = p.stage2_train.indices
        if p.stage2_novel:
            idx = np.union1d(idx, p.stage2_novel[repeat].indices)
        return idx

    @property
    def n_repeats(self) -> int:
        return len(self.protocol.stage2_test)

    def stage2_dirs(self, run_dir: Path) -> list[Path]:
        if self.task == "gfsl":
            return [run_dir / "stage-2" / f"repeat-{r}" for r in range(self.n_repeats)]
        subs = self.curriculum
        return [run_dir / "stage-2" / subs[-1].name] if subs else [run_dir / "stage-2"]


# ----------------------------------------------------------------------------------------------------------------
# Run directory bookkeeping


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AvlowshotError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AvlowshotError(f"{path}: unreadable ({exc})") from None


def read_summary(stage_dir: Path) -> StageOutcome | None:
    f = stage_dir / "summary.json"
    if not f.is_file():
        return None
    fix = f"delete {f} and run the same `avlowshot run` command with --resume (it is rewritten from the checkpoints)"
    data = _read_json(f)
    try:
        s = StageOutcome.from_json(data)
    except (KeyError, TypeError, AttributeError) as exc:
        what = f"lacks the field {exc}" if isinstance(exc, KeyError) else "is not a stage summary"
        raise CheckpointError(what, path=f, fix=fix) from None
    if not isinstance(s.checkpoint_last, str) or not isinstance(s.best_epoch, int | None):
        raise CheckpointError("has a malformed 'checkpoint_last' or 'best_epoch'", path=f, fix=fix)
    return s if s.finished else None


def _stage_started(stage_dir: Path) -> bool:
    return (stage_dir / "summary.json").is_file() or bool(ckpt.list_checkpoints(stage_dir / "checkpoints"))


def load_run_info(run_dir: str | Path) -> tuple[dict[str, Any], RunConfig]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AvlowshotError(f"{run_dir}: run directory not found")
    info_file, cfg_file = run_dir / RUN_FILE, run_dir / CONFIG_FILE
    if not info_file.is_file() or not cfg_file.is_file():
        raise AvlowshotError(
            f"{run_dir}: not a run directory (it needs {RUN_FILE} and {CONFIG_FILE}; "
            f"pass the folder <log-dir>/<method>_<dataset>_<layout>..._seed<N>)"
        )
    info = _read_json(info_file)
    missing = [k for k in RUN_FIELDS if not isinstance(info, dict) or k not in info]
    if missing:
        raise CheckpointError(
            f"lacks the field(s) {', '.join(missing)}",
            path=info_file,
            fix=f"restore {RUN_FILE} (it is written once, when the run starts) or start the run again in another "
            "--log-dir",
        )
    cfg = validate_config(read_yaml(cfg_file), source=str(cfg_file))
    return info, cfg


def _prepare_run_dir(spec: RunSpec, parts: str, resume: bool) -> dict[str, Any]:
    run_dir = spec.run_dir
    info = {
        "method": spec.method,
        "layout": spec.layout,
        "dataset": spec.dataset,
        "root_dir": str(Path(spec.root_dir).resolve()),
        "cache_dir": str(Path(spec.cache_dir).resolve()) if spec.cache_dir else None,
        "shots": spec.shots,
        "seed": spec.seed,
        "compat": spec.compat,
        "threads": spec.threads,
        "version": __version__,
    }
    have_info = (run_dir / RUN_FILE).is_file()
    if have_info and not (run_dir / RESULT_FILE).is_file() and not run_progress(run_dir):
        # nothing was trained with the old settings: the corrected command takes the folder over
        have_info = False
        for stage in ("stage-1", "stage-2"):
            if (run_dir / stage).is_dir():
                shutil.rmtree(run_dir / stage)
    if have_info:
        old, old_cfg = load_run_info(run_dir)
        for key in ("method", "layout", "dataset", "shots", "seed", "compat"):
            if old.get(key) != info[key]:
                raise ConfigError(f"{run_dir / RUN_FILE}: '{key}' is {old.get(key)!r}, this run has {info[key]!r}")
        info["threads"] = _recorded_threads(run_dir, old, spec.threads)
        diff = config_diff(old_cfg, spec.cfg)
        if diff:
            raise ConfigError(
                f"{run_dir / CONFIG_FILE}: this run directory was made with another config "
                f"(differs in: {', '.join(diff)}); use the same config and --set values, or another --log-dir"
            )
        if old.get("root_dir") != info["root_dir"]:
            log.warning("dataset root changed: %s -> %s", old.get("root_dir"), info["root_dir"])
    if not resume and parts != "eval":
        stages = {"all": ["stage-1", "stage-2"], "stage-1": ["stage-1"], "stage-2": ["stage-2"]}[parts]
        busy = [s for s in stages if (run_dir / s).exists() and any((run_dir / s).iterdir())]
        if (run_dir / RESULT_FILE).is_file() and parts == "all":
            busy.append(RESULT_FILE)
        if busy:
            raise AvlowshotError(
                f"{run_dir}: the run directory already holds {', '.join(busy)}; pass --resume to continue it, "
                f"--run eval to re-evaluate it, or choose another --log-dir"
            )
    if info["threads"] is None:
        info["threads"] = threads_mod.default_threads()
    return info


def _init_run_dir(spec: RunSpec, info: dict[str, Any]) -> None:
    """Write run.json and config.yaml of a new run directory; clean up an existing one after a kill. Called once the
    data has loaded, so bad data leaves no run directory behind."""
    run_dir = spec.run_dir
    if (run_dir / RUN_FILE).is_file():
        for p in ckpt.remove_leftovers(run_dir):
            log.info("removed %s, left by an interrupted write", p)
        if (run_dir / RESULT_FILE).is_file() or run_progress(run_dir):
            return
        # nothing was trained with the old settings: the corrected command takes the folder over
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(run_dir / CONFIG_FILE, dump_config(spec.cfg))
    ckpt.atomic_write_json(run_dir / RUN_FILE, {**info, "created": _now()})


def _recorded_threads(run_dir: Path, old: dict[str, Any], asked: int | None) -> int | None:
    """The thread count of a run directory: the one it was trained with. Another one would change the numbers (the
    sums of floating-point reductions are split by thread), so asking for it is an error."""
    recorded = old.get("threads")
    if recorded is None:
        log.warning(
            "%s records no thread count (an older version made it): continuing with %s threads; the numbers may "
            "differ from an uninterrupted run", run_dir / RUN_FILE, asked or threads_mod.default_threads(),
        )  # fmt: skip
        return asked
    if asked is not None and asked != recorded:
        raise ConfigError(
            f"{run_dir / RUN_FILE}: this run was trained with {recorded} threads, --threads {asked} asks for "
            f"another count, which changes the numbers (floating-point sums are split by thread); continue with "
            f"--threads {recorded} (or without --threads), or start a new run in another --log-dir"
        )
    if asked is None and recorded != threads_mod.default_threads():
        log.info("using the run's recorded %d threads", recorded)
    return int(recorded)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------------
# Stages


def substage_trainer(ctx: RunContext, stage: int, repeat: int, index: int, sub, out: Path, init, novel_idx):
    """A fresh model for substage ``sub`` (number ``index``), started from ``init`` = (stage dir, checkpoint) of
    the previous substage (model weights; optimiser state too unless ``sub.reset_optimizer``)."""
    method = ctx.build(stage)
    c = None
    if init is not None:
        c = ckpt.load_checkpoint(init[0] / init[1])
        c.load_model(method, ctx.device)
    method.enter_substage(sub.name)
    name = f"stage-{stage}/" + (sub.name if out.name == sub.name else out.name)
    # distinct sampling streams per substage: repeat code 100 * substage index + repeat
    trainer = ctx.trainer(method, out, name, stage=stage, repeat=100 * index + repeat, substage=sub)
    if c is not None and not sub.reset_optimizer:
        c.load_optimizer(trainer.optimizer, c.train_state()["optimizer"])
    if novel_idx is not None:
        trainer.novel_text = method.stream_text(ctx.text, ctx.store.labels.numpy()[novel_idx])
    return trainer


def substage_epochs(cfg: RunConfig, sub) -> int:
    return cfg.epochs if sub.epochs_key is None else cfg.substage_epochs.get(sub.epochs_key, cfg.epochs)


def reads_novel(sub) -> bool:
    """The substage trains on the few-shot novel samples (a novel stream, or one joint stream with the base)."""
    return sub.novel_stream or sub.joint


def stage1_novel_indices(ctx: RunContext, sub) -> np.ndarray | None:
    """The few-shot novel samples stage-1 substage ``sub`` reads (a novel or joint stream), or None."""
    p = ctx.protocol
    return p.stage1_novel.indices if reads_novel(sub) and p.stage1_novel is not None else None


def handed_on(outcome: StageOutcome) -> tuple[int, str]:
    """(stage-2 epochs, stage-1 checkpoint the next substage starts from) of a finished stage-1 substage: its
    best epoch, or its last for a substage trained without validation."""
    if outcome.best_epoch is None:
        return outcome.epochs, outcome.checkpoint_last
    return outcome.best_epoch + 1, outcome.checkpoint_best


def run_curriculum_stage1(ctx: RunContext, run_dir: Path, *, resume: bool, on_epoch_end) -> list[StageOutcome]:
    p = ctx.protocol
    outcomes: list[StageOutcome] = []
    prev_dir = None
    for i, sub in enumerate(ctx.curriculum):
        out = run_dir / "stage-1" / sub.name
        done = read_summary(out)
        if done is not None and resume:
            log.info("stage-1/%s: finished before, skipped", sub.name)
        else:
            init = None if prev_dir is None else (prev_dir, handed_on(outcomes[-1])[1])
            novel = stage1_novel_indices(ctx, sub)
            trainer = substage_trainer(ctx, 1, 0, i, sub, out, init, novel if sub.novel_stream else None)
            done = trainer.fit(
                p.stage1_train.indices,
                substage_epochs(ctx.cfg, sub),
                val=p.stage1_val if sub.validate else None,
                select_best=sub.validate,
                schedule="val" if sub.validate else "none",
                resume=resume,
                on_epoch_end=on_epoch_end,
                novel_indices=novel,
            )
        outcomes.append(done)
        prev_dir = out
    return outcomes


def run_curriculum_stage2(ctx: RunContext, run_dir: Path, *, resume: bool, on_epoch_end) -> list[StageOutcome]:
    p, subs = ctx.protocol, ctx.curriculum
    s1 = [read_summary(run_dir / "stage-1" / sub.name) for sub in subs]
    if any(s is None for s in s1):
        raise AvlowshotError(f"{run_dir / 'stage-1'}: stage 1 has not finished; run --run stage-1 (or all) first")
    n = ctx.n_repeats
    prev: list[tuple[Path, str] | None] = [None] * n  # per repeat: where its next substage starts from
    for i, sub in enumerate(subs[:-1]):
        # a substage that reads the novel shots is trained once per repeat, on that repeat's shots
        per_repeat = reads_novel(sub) and bool(p.stage2_novel) and n > 1
        for r in range(n) if per_repeat else [0]:
            out = run_dir / "stage-2" / sub.name / (f"repeat-{r}" if per_repeat else "")
            done = read_summary(out)
            if done is None or not resume:
                novel = p.stage2_novel[r].indices if reads_novel(sub) and p.stage2_novel else None
                trainer = substage_trainer(ctx, 2, r, i, sub, out, prev[r], novel if sub.novel_stream else None)
                done = trainer.fit(
                    p.stage2_train.indices, handed_on(s1[i])[0], schedule="replay", replay_drops=s1[i].lr_drops,
                    resume=resume, on_epoch_end=on_epoch_end, novel_indices=novel,
                )  # fmt: skip
            if per_repeat:
                prev[r] = (out, done.checkpoint_last)
            else:
                prev = [(out, done.checkpoint_last)] * n
    outcomes = []
    last, i = subs[-1], len(subs) - 1
    for r, out in enumerate(ctx.stage2_dirs(run_dir)):
        done = read_summary(out)
        if done is not None and resume:
            log.info("stage-2/repeat-%d: finished before, skipped", r)
            outcomes.append(done)
            continue
        novel = p.stage2_novel[r].indices if reads_novel(last) and p.stage2_novel else None
        trainer = substage_trainer(ctx, 2, r, i, last, out, prev[r], novel if last.novel_stream else None)
        outcomes.append(
            trainer.fit(
                p.stage2_train.indices,
                handed_on(s1[-1])[0],
                schedule="replay",
                replay_drops=s1[-1].lr_drops,
                resume=resume,
                on_epoch_end=on_epoch_end,
                novel_indices=novel,
            )  # fmt: skip
        )
    return outcomes


def run_stage1(ctx: RunContext, run_dir: Path, *, resume: bool, on_epoch_end: EpochCallback | None) -> StageOutcome:
    if ctx.curriculum:
        return run_curriculum_stage1(ctx, run_dir, resume=resume, on_epoch_end=on_epoch_end)[-1]
    out = run_dir / "stage-1"
    done = read_summary(out)
    if done is not None and resume:
        log.info("stage-1: finished before (%d epochs), skipped", done.epochs)
        return done
    method = ctx.build(1)  # label-space methods: the stage-1 classes (as evaluate_stages loads it)
    trainer = ctx.trainer(method, out, "stage-1", stage=1)
    return trainer.fit(
        ctx.stage1_train_indices(),
        ctx.cfg.epochs,
        val=ctx.protocol.stage1_val,
        select_best=True,
        schedule="val",
        resume=resume,
        on_epoch_end=on_epoch_end,
    )


def stage2_epochs(s1: StageOutcome) -> int:
    """Stage 2 trains the stage-1 best epoch + 1 epochs; a zero-epoch stage 1 (no training) gives zero."""
    return 0 if s1.epochs == 0 else s1.best_epoch + 1


def stage2_schedule(cfg: RunConfig, compat: str) -> str:
    """``"replay"`` (default: the stage-1 LR drops at the same epochs) or ``"val"`` (official AVCA / TCAF /
    ClipClap: ReduceLROnPlateau on the stage-1 val HM, although those samples are stage-2 training data)."""
    if compat == "official" and cfg.reference_stage2_lr == "val-hm":
        return "val"
    return "replay"


def run_stage2(
    ctx: RunContext, run_dir: Path, *, resume: bool, on_epoch_end: EpochCallback | None
) -> list[StageOutcome]:
    if ctx.curriculum:
        return run_curriculum_stage2(ctx, run_dir, resume=resume, on_epoch_end=on_epoch_end)
    s1 = read_summary(run_dir / "stage-1")
    if s1 is None:
        raise AvlowshotError(f"{run_dir / 'stage-1'}: stage 1 has not finished; run --run stage-1 (or all) first")
    epochs = stage2_epochs(s1)
    schedule = stage2_schedule(ctx.cfg, ctx.compat)
    outcomes = []
    for r, out in enumerate(ctx.stage2_dirs(run_dir)):
        name = "stage-2" if ctx.task == "gzsl" else f"stage-2/repeat-{r}"
        done = read_summary(out)
        if done is not None and resume:
            log.info("%s: finished before, skipped", name)
            outcomes.append(done)
            continue
        method = ctx.build()
        trainer = ctx.trainer(method, out, name, stage=2, repeat=r)
        outcomes.append(
            trainer.fit(
                ctx.stage2_train_indices(r),
                epochs,
                val=ctx.protocol.stage1_val if schedule == "val" else None,
                select_best=False,
                schedule=schedule,
                replay_drops=s1.lr_drops,
                resume=resume,
                on_epoch_end=on_epoch_end,
            )
        )
    return outcomes


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and the result record


def _load_model(ctx: RunContext, stage_dir: Path, rel: str, stage: int = 2):
    c = ckpt.load_checkpoint(stage_dir / rel)
    method = ctx.build(stage)
    c.load_model(method, ctx.device)
    method.eval()
    return method


def test_beta(beta: float, ctx: RunContext) -> float:
    """The beta applied at test: the stage-1 beta itself, or under ``--compat official`` the reference's conversion
    of it (``metrics.transfer_beta``, e.g. AVCA's 0 -> 1e-10)."""
    if ctx.compat != "official":
        return beta
    from avlowshot.models import registry

    return metrics.transfer_beta(beta, registry.method_class(ctx.cfg.method).beta_family or ctx.cfg.method)


def _mean_mode_beta(ctx: RunContext, model, val, grid: str, modes: tuple[str, ...]) -> float:
    """``--compat official`` for methods scored in several modes (AVGZSLNet, CJME): the AVCA repository's test beta
    is the mean of the betas searched on val for each mode (audio, video, both), 0 replaced by 1e-10."""
    found = []
    for mode in modes:
        model.score_mode = mode
        with precision(ctx.device, ctx.cfg.amp):
            res = evaluate_split(
                model, ctx.store, val, ctx.text, ctx.device, ctx.cfg.eval_batch_size, betas=metrics.beta_grid(grid),
                phase="val",
            )  # fmt: skip
        found.append(float(res.beta))
    model.score_mode = None
    mean = sum(found) / len(found)
    log.info("official test beta: mean of the %s betas %s = %g", "/".join(modes), found, mean)
    return 1e-10 if mean == 0 else mean


def _percent(result, task: str) -> dict[str, float]:
    return {k: float(v) for k, v in result.as_percent(task).items()}


def _per_class(recalls: dict[int, float], names: list[str]) -> dict[str, float | None]:
    """Global class id -> recall as class name -> percent (None for a class without test samples)."""
    return {names[c]: (None if v != v else round(100.0 * v, 4)) for c, v in recalls.items()}


def evaluate_stages(ctx: RunContext, run_dir: Path) -> dict[str, Any]:
    """Beta from the stage-1 model on val, then every stage-2 model on its test split. Returns the result fields
    that depend on the weights (metrics, beta, per-class accuracies)."""
    t0 = time.perf_counter()
    s1_dir = ctx.stage1_dir(run_dir)
    s1 = read_summary(s1_dir)
    if s1 is None:
        raise AvlowshotError(f"{s1_dir}: stage 1 has not finished")
    last_sub = ctx.curriculum[-1] if ctx.curriculum else None
    s2 = [read_summary(d) for d in ctx.stage2_dirs(run_dir)]
    if any(s is None for s in s2):
        raise AvlowshotError(f"{run_dir / 'stage-2'}: stage 2 has not finished; run --run stage-2 first")
    cfg = ctx.cfg
    names = ctx.store.classes.names
    beta_from = cfg.beta_from
    if ctx.compat == "official" and last_sub is not None and last_sub.reference_beta_from:
        beta_from = last_sub.reference_beta_from
    grid = last_sub.beta_grid if last_sub is not None and last_sub.beta_grid else cfg.beta_grid
    rel = s1.checkpoint_best if beta_from == "best" else s1.checkpoint_last
    model_a = _load_model(ctx, s1_dir, rel, stage=1)
    val = ctx.protocol.stage1_val
    with precision(ctx.device, cfg.amp):
        res_val = evaluate_split(
            model_a,
            ctx.store,
            val,
            ctx.text,
            ctx.device,
            cfg.eval_batch_size,
            betas=metrics.beta_grid(grid),
            phase="val",
        )
    beta = float(res_val.beta)
    recorded = s1.beta_best if beta_from == "best" else s1.beta_last
    if recorded is not None and abs(recorded - beta) > 1e-9:
        log.warning("stage-1 beta re-computed on val is %g; %g was recorded during training", beta, recorded)
    beta_test = test_beta(beta, ctx)
    modes = getattr(model_a, "reference_beta_modes", ())
    if ctx.compat == "official" and modes:
        beta_test = _mean_mode_beta(ctx, model_a, val, grid, modes)
    del model_a
    tests, per_class, per_class_zsl = [], [], []
    for r, (out, summ) in enumerate(zip(ctx.stage2_dirs(run_dir), s2, strict=True)):
        model_b = _load_model(ctx, out, summ.checkpoint_last)
        split = ctx.protocol.stage2_test[r]
        if ctx.compat == "official" and last_sub is not None and last_sub.reference_beta_zero_search and not beta:
            # the reference's ``if best_beta:`` treats 0.0 as unset and searches the grid on the test set
            test_kw = {"betas": metrics.beta_grid(grid)}
        else:
            test_kw = {"beta": beta_test}
        with precision(ctx.device, cfg.amp):
            res = evaluate_split(model_b, ctx.store, split, ctx.text, ctx.device, cfg.eval_batch_size, **test_kw)
        tests.append(res)
        per_class.append(_per_class(res.per_class, names))
        per_class_zsl.append(_per_class(res.per_class_zsl, names))
        del model_b
    record: dict[str, Any] = {
        "beta": beta,
        "beta_test": None if beta_test is None else float(beta_test),
        "val": {k: (100.0 * v if k != "beta" else v) for k, v in metric_record(res_val).items()},
        # the stage-1 val metrics at every beta of the grid (avlowshot plot draws them against the chosen beta)
        "val_curve": {
            "beta": [float(b) for b in res_val.curve.betas],
            **{k: [100.0 * float(v) for v in getattr(res_val.curve, k)] for k in ("seen", "unseen", "hm")},
        },
    }
    if ctx.task == "gzsl":
        record["metrics"] = _percent(tests[0], "gzsl")
        record["per_class"] = per_class[0]
        record["per_class_zsl"] = per_class_zsl[0]
    else:
        summary = metrics.gfsl_summary(tests)
        record["metrics"] = {k: summary[k] for k in GFSL_KEYS}
        record["metrics_std"] = {k: summary[f"{k}_std"] for k in GFSL_KEYS if f"{k}_std" in summary}
        # each repeat's test beta too: the reference re-searches a beta of 0 on the test split (official mode)
        record["repeats"] = [{**rep, "beta": float(t.beta)} for rep, t in zip(summary["repeats"], tests, strict=True)]
        record["per_class"] = per_class
        record["per_class_zsl"] = per_class_zsl
    record["eval_seconds"] = time.perf_counter() - t0
    return record


def _timings(s1: StageOutcome, s2: list[StageOutcome], eval_seconds: float, task: str) -> dict[str, Any]:
    def stage(s: StageOutcome) -> dict[str, Any]:
        return {
            "seconds": s.seconds,
            "epochs": s.epochs,
            "per_epoch": [r["time_train"] + r.get("time_val", 0.0) for r in s.history],
            "per_epoch_train": [r["time_train"] for r in s.history],
            "per_epoch_val": [r.get("time_val", 0.0) for r in s.history],
        }

    out = {"stage-1": stage(s1)}
    if task == "gzsl":
        out["stage-2"] = stage(s2[0])
    else:
        out["stage-2"] = {
            "seconds": sum(s.seconds for s in s2),
            "repeats": [stage(s) for s in s2],
        }
    out["eval"] = eval_seconds
    return out


def split_family(ctx: RunContext) -> str:
    """``cls_split`` / ``main_split`` (GZSL), ``<k>-shot`` (avdiff layout), ``<family>/<k>-shot`` (GFSL derived from a
    GZSL split)."""
    fam = ctx.bench.split_family
    if ctx.task == "gfsl" and ctx.bench.spec.task != "gfsl":
        return f"{fam}/{ctx.info['shots']}-shot"
    return fam


def build_result(ctx: RunContext, run_dir: Path, evaluated: dict[str, Any]) -> dict[str, Any]:
    from avlowshot.models.base import count_parameters

    info, cfg = ctx.info, ctx.cfg
    s1 = read_summary(ctx.stage1_dir(run_dir))
    s2 = [read_summary(d) for d in ctx.stage2_dirs(run_dir)]
    method = ctx.build()
    n_trainable = int(count_parameters(method, trainable_only=True))
    n_total = int(count_parameters(method))
    del method
    result: dict[str, Any] = {
        "method": cfg.method,
        "dataset": info["dataset"],
        "layout": info["layout"],
        "feature_set": ctx.bench.feature_set,
        "split_family": split_family(ctx),
        "task": ctx.task,
        "shots": info["shots"],
        "seed": cfg.seed,
        "compat": info["compat"],
        "version": __version__,
        "config": cfg.model_dump(mode="json"),
        "n_params": n_trainable,
        "n_params_total": n_total,
        "best_epoch": s1.best_epoch,
        "stage2_epochs": stage2_epochs(s1),
        "best_val_hm": None if s1.best_hm is None else 100.0 * s1.best_hm,
        "beta": evaluated["beta"],
        "beta_test": evaluated["beta_test"],
        "lr_drops": s1.lr_drops,
        "metrics": evaluated["metrics"],
    }
    for key in ("metrics_std", "repeats"):
        if key in evaluated:
            result[key] = evaluated[key]
    result["val"] = evaluated["val"]
    result["val_curve"] = evaluated["val_curve"]
    result["per_class"] = evaluated["per_class"]
    result["per_class_zsl"] = evaluated["per_class_zsl"]
    result["timings"] = _timings(s1, s2, evaluated["eval_seconds"], ctx.task)
    if ctx.curriculum:
        subs: dict[str, Any] = {}
        for sub in ctx.curriculum:
            a = read_summary(run_dir / "stage-1" / sub.name)
            b = read_summary(run_dir / "stage-2" / sub.name)
            subs[sub.name] = {
                "best_epoch": a.best_epoch,
                "best_val": a.best_hm,
                "val_metric": sub.val_metric if sub.validate else None,
                # None: an imported run (the reference saved its best checkpoint, not its epoch count)
                "stage2_epochs": handed_on(a)[0] if a.best_epoch is not None or not sub.validate else None,
                "lr_drops": a.lr_drops,
                "seconds_stage1": a.seconds,
                "seconds_stage2": None if b is None else b.seconds,
            }
        result["substages"] = subs
        m = ctx.build()
        m.enter_substage(ctx.curriculum[-1].name)
        result["n_params_last_substage"] = int(count_parameters(m, trainable_only=True))
        del m
    if info.get("imported"):  # a run directory written by ``import-run``: where its weights came from
        result["imported"] = {k: info["imported"].get(k) for k in ("from", "reference", "ref_dir", "stage_1_epoch")}
    result["timings"]["load_data"] = ctx.load_seconds
    result["device"] = str(ctx.device)
    result["threads"] = info.get("threads")  # the training count (run.json)
    result["eval_threads"] = torch.get_num_threads()
    result["host"] = platform.node()
    result["torch"] = torch.__version__
    result["root_dir"] = info["root_dir"]
    result["run_dir"] = str(run_dir)
    result["created"] = _now()
    return result


def write_result(run_dir: Path, result: dict[str, Any]) -> Path:
    path = run_dir / RESULT_FILE
    ckpt.atomic_write_json(path, result)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def run(
    spec: RunSpec,
    *,
    parts: str = "all",
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Run the protocol (or a part of it) and return the result record (None unless the eval part ran)."""
    if parts not in PARTS:
        raise ConfigError(f"--run {parts}: expected one of {', '.join(PARTS)}")
    if spec.compat not in COMPAT_MODES:
        raise ConfigError(f"--compat {spec.compat}: expected one of {', '.join(COMPAT_MODES)}")
    if spec.cfg.method != spec.method:
        raise ConfigError(f"config is for method '{spec.cfg.method}', the run asks for '{spec.method}'")
    from avlowshot.models import registry

    registry.check_method_layout(spec.method, spec.layout, spec.shots)
    resolve_device(spec.device)  # fail before touching the disk
    threads_mod.check_threads(spec.threads)
    from avlowshot.data.benchmark import preflight

    preflight(spec.layout, spec.root_dir, spec.dataset, spec.shots)  # class files and lists, before any write
    run_dir = spec.run_dir
    created = not run_dir.exists()
    try:
        return _run_parts(spec, parts, resume, on_epoch_end, on_stage)
    except BaseException:
        # a start that failed before its first finished epoch leaves nothing that blocks the corrected re-run
        if created and run_dir.is_dir() and not run_progress(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def run_progress(run_dir: Path) -> list[tuple[str, int]]:
    """(stage folder, last finished epoch, 0-based) of every stage folder of a run with a finished epoch."""
    out = []
    for ck in sorted(Path(run_dir).rglob("checkpoints")):
        epochs = ckpt.list_checkpoints(ck)
        if epochs:
            out.append((ck.parent.relative_to(run_dir).as_posix(), epochs[-1]))
    return out


def _run_parts(spec: RunSpec, parts: str, resume: bool, on_epoch_end, on_stage) -> dict[str, Any] | None:
    info = _prepare_run_dir(spec, parts, resume)
    with threads_mod.pinned(info["threads"]):
        return _run(spec, info, parts, resume, on_epoch_end, on_stage)


def _run(spec: RunSpec, info: dict[str, Any], parts: str, resume: bool, on_epoch_end, on_stage):
    ctx = RunContext(
        info, spec.cfg, spec.device, spec.progress, cache_dir=spec.cache_dir, rebuild_cache=spec.rebuild_cache,
        verify_cache=spec.verify_cache,
    )  # fmt: skip
    _init_run_dir(spec, info)
    run_dir = spec.run_dir
    log.info("run directory %s", run_dir)
    if parts in ("all", "stage-1"):
        if on_stage:
            on_stage("stage-1")
        run_stage1(ctx, run_dir, resume=resume, on_epoch_end=on_epoch_end)
    if parts in ("all", "stage-2"):
        if on_stage:
            on_stage("stage-2")
        run_stage2(ctx, run_dir, resume=resume, on_epoch_end=on_epoch_end)
    if parts in ("all", "eval"):
        if on_stage:
            on_stage("eval")
        result = build_result(ctx, run_dir, evaluate_stages(ctx, run_dir))
        write_result(run_dir, result)
        return result
    return None


def evaluate_run(
    run_dir: str | Path,
    *,
    root_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    write: bool = True,
    threads: int | None = None,
    verify_cache: bool = False,
    amp: str | None = None,
) -> dict[str, Any]:
    """Rebuild the model from the run directory's config, re-run the beta search on val and the test, rewrite
    ``result.json`` (timings of training are kept) and return it. ``threads``: default the run's recorded count.
    ``amp``: evaluate under another precision than the run's (``auto`` | ``bf16`` | ``off``), e.g. to compare
    bf16 autocast with fp32 on the same checkpoints."""
    run_dir = Path(run_dir)
    threads_mod.check_threads(threads)
    info, cfg = load_run_info(run_dir)
    if amp is not None:
        if amp not in AMP_MODES:
            raise ConfigError(f"--amp {amp}: expected one of {', '.join(AMP_MODES)}")
        cfg = cfg.model_copy(update={"amp": amp})
    if root_dir is not None:
        info = {**info, "root_dir": str(Path(root_dir).resolve())}
    elif not Path(info["root_dir"]).is_dir():
        raise AvlowshotError(f"{run_dir / RUN_FILE}: dataset root {info['root_dir']} not found; pass --root-dir")
    recorded = info.get("threads")
    if threads is not None and recorded is not None and threads != recorded:
        log.warning("evaluating with %d threads; the run was trained with %d (the last digits may differ)", threads,
                    recorded)  # fmt: skip
    with threads_mod.pinned(threads if threads is not None else recorded):
        ctx = RunContext(
            info, cfg, device, cache_dir=cache_dir if cache_dir is not None else info.get("cache_dir"),
            verify_cache=verify_cache,
        )  # fmt: skip
        result = build_result(ctx, run_dir, evaluate_stages(ctx, run_dir))
    if write:
        ckpt.remove_leftovers(run_dir)
        write_result(run_dir, result)
    return result


def find_results(log_dir: str | Path) -> list[Path]:
    """Every ``result.json`` below a folder, sorted."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise AvlowshotError(f"{log_dir}: folder not found")
    return sorted(Path(root) / RESULT_FILE for root, _, files in os.walk(log_dir) if RESULT_FILE in files)
