"""The generic epoch loop, shared by every method and both stages.

An epoch is ``n_batches`` class-balanced batches drawn with replacement (as the references do). The indices of the
whole epoch (and the negatives, for methods that need them) come at once from a ``torch.Generator`` seeded from
(seed, stage, repeat, epoch), so a resumed run draws exactly what an uninterrupted one draws. Model init and dropout
use the global torch RNG, seeded before the model is built and saved in every checkpoint.

After each epoch: optional validation on a split (all samples, eval mode, batched), best-epoch tracking by strictly
higher HM, the LR schedule (ReduceLROnPlateau on the validation HM, or a replay of recorded drops), TensorBoard
scalars, a checkpoint (kept: the latest and the best), and ``history.json``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avlowshot.data.batching import Batch, ClassBalancedSampler, SequenceWindow, gather, length_order
from avlowshot.data.splits import EvalSplit
from avlowshot.data.store import FeatureStore
from avlowshot.errors import AvlowshotError, ConfigError
from avlowshot.eval import metrics
from avlowshot.train import checkpoint as ckpt
from avlowshot.train.config import RunConfig

log = logging.getLogger("avlowshot.train")

STAGE_CODES = {"stage-1": 1, "stage-2": 2}


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (model init, dropout): torch CPU + CUDA, numpy, random."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, stage: int, repeat: int, epoch: int) -> int:
    """Seed of the sampling generator of one epoch (independent streams per seed, stage, repeat, epoch)."""
    state = np.random.SeedSequence([seed % (2**63), stage, repeat, epoch]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def precision(device: torch.device, amp: str):
    """The autocast context of ``cfg.amp`` on ``device``: bf16 (``"bf16"``, or ``"auto"`` on CUDA) or none."""
    on = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def adam(params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Adam:
    """``torch.optim.Adam`` with PyTorch's fused kernel where it has one for these parameters (CPU and CUDA floats):
    one pass over all tensors instead of a dozen small kernels per tensor. The same update to float rounding
    (tested); measured on AVCA's 3.3 M parameters (59 tensors), 2 threads: 9.6 -> 2.6 ms per step."""
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.Adam(params, **kwargs)


def compile_method(method) -> None:
    """``torch.compile`` the method's loss and sample encoder in place (dynamic shapes: temporal batches vary in
    length). The parameters and the state dict are the module's own, so checkpoints are unchanged."""
    method.losses = torch.compile(method.losses, dynamic=True)
    method.encode_samples = torch.compile(method.encode_samples, dynamic=True)
    method.pad_multiple = COMPILE_PAD  # batches padded to few lengths: each new shape would recompile


COMPILE_PAD = 8


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AvlowshotError(
                f"--device {name}: no CUDA device is available (torch {torch.__version__}, "
                f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA); use --device cpu"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AvlowshotError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise AvlowshotError(f"--device {name}: expected cpu or cuda")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation of one split


@torch.no_grad()
def encode_samples(
    method, store: FeatureStore, indices: np.ndarray, device: torch.device, batch_size: int, phase: str = "test"
):
    """Sample codes of ``indices`` in order, in eval mode, ``batch_size`` at a time.

    Temporal samples are encoded in order of length (each batch padded only to its own longest sequence) and the
    codes put back in the order of ``indices``: with masks the codes are the same, the padding work is not."""
    was_training = method.training
    method.eval()
    window = method.sequence_window(training=False, phase=phase)
    indices = np.asarray(indices)
    order = length_order(store, indices, window) if store.temporal else None
    ordered = indices if order is None else indices[order]
    try:
        parts = []
        for start in range(0, len(ordered), batch_size):
            batch = gather(store, ordered[start : start + batch_size], window, tight=True)
            batch = batch.padded(getattr(method, "pad_multiple", 1)).to(device, non_blocking=True)
            parts.append(method.encode_samples(batch))
        if order is None:
            restore = None
        else:
            restore = torch.empty(len(order), dtype=torch.int64)
            restore[torch.as_tensor(order)] = torch.arange(len(order))
            restore = restore.to(device)

        def cat(chunks):
            out = torch.cat(chunks)
            return out if restore is None else out[restore]

        if isinstance(parts[0], torch.Tensor):
            return cat(parts)
        if isinstance(parts[0], tuple | list):
            return type(parts[0])(cat(p) for p in zip(*parts, strict=True))
        if isinstance(parts[0], dict):
            return {k: cat([p[k] for p in parts]) for k in parts[0]}
        raise TypeError(f"encode_samples returned {type(parts[0]).__name__}")
    finally:
        method.train(was_training)


def class_scores(method, codes, class_text: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` scores of encoded samples against classes given by text rows and global ids (classifier methods
    read their columns of ``class_ids``, the others encode ``class_text``)."""
    if method.needs_label_space:
        return method.scores(codes, method.encode_classes(class_text, class_ids=class_ids))
    return method.scores(codes, method.encode_classes(class_text))


@torch.no_grad()
def score_split(
    method,
    store: FeatureStore,
    split: EvalSplit,
    text: torch.Tensor,
    device: torch.device,
    batch_size: int,
    phase: str = "test",
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(scores ``[N, C]`` on CPU with columns = split classes in ascending global id, labels ``[N]``, classes).
    ``phase``: ``"val"`` or ``"test"``, passed to the method's evaluation window."""
    classes = split.classes  # ascending global ids
    codes = encode_samples(method, store, split.indices, device, batch_size, phase)
    was_training = method.training
    method.eval()
    try:
        class_text = text[torch.as_tensor(classes, device=text.device)]
        scores = class_scores(method, codes, class_text, torch.as_tensor(classes, dtype=torch.int64))
    finally:
        method.train(was_training)
    labels = store.labels[torch.as_tensor(split.indices, dtype=torch.int64)]
    return scores.float().cpu(), labels, classes


def evaluate_split(
    method,
    store: FeatureStore,
    split: EvalSplit,
    text: torch.Tensor,
    device: torch.device,
    batch_size: int,
    *,
    betas: torch.Tensor | None = None,
    beta: float | None = None,
    phase: str = "test",
):
    """Seen / unseen / HM / ZSL (or base / novel / HM / FSL) of ``method`` on ``split`` (``metrics.evaluate``);
    ``phase="val"`` for the validation split."""
    scores, labels, classes = score_split(method, store, split, text, device, batch_size, phase)
    return metrics.evaluate(
        scores,
        labels,
        torch.as_tensor(classes, dtype=torch.int64),
        torch.as_tensor(split.seen, dtype=torch.int64),
        torch.as_tensor(split.unseen, dtype=torch.int64),
        len(store.classes),
        kind=method.score_kind,
        betas=betas,
        beta=beta,
    )


def metric_record(result) -> dict[str, float]:
    """Fractions of an EvalResult as plain floats (the history and the TensorBoard scalars)."""
    return {k: float(getattr(result, k)) for k in ("seen", "unseen", "hm", "zsl", "beta")}


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StageOutcome:
    """What a finished stage (or repeat) hands to the protocol; also ``summary.json``."""

    name: str
    epochs: int
    best_epoch: int | None  # 0-based, by strictly higher val HM (None without selection)
    best_hm: float | None
    beta_best: float | None  # val beta at the best epoch
    beta_last: float | None  # val beta at the last epoch
    lr_drops: list[int]  # 0-based epochs after which the LR was reduced
    history: list[dict[str, Any]]
    seconds: float
    checkpoint_last: str  # relative to the stage dir
    checkpoint_best: str | None
    finished: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "finished": self.finished,
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "best_hm": self.best_hm,
            "beta_best": self.beta_best,
            "beta_last": self.beta_last,
            "lr_drops": self.lr_drops,
            "seconds": self.seconds,
            "checkpoint_last": self.checkpoint_last,
            "checkpoint_best": self.checkpoint_best,
            "history": self.history,
            **self.extra,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> StageOutcome:
        known = {
            "name", "finished", "epochs", "best_epoch", "best_hm", "beta_best", "beta_last", "lr_drops", "seconds",
            "checkpoint_last", "checkpoint_best", "history",
        }  # fmt: skip
        return StageOutcome(
            name=d["name"],
            epochs=d["epochs"],
            best_epoch=d["best_epoch"],
            best_hm=d["best_hm"],
            beta_best=d["beta_best"],
            beta_last=d["beta_last"],
            lr_drops=list(d["lr_drops"]),
            history=list(d["history"]),
            seconds=d["seconds"],
            checkpoint_last=d["checkpoint_last"],
            checkpoint_best=d["checkpoint_best"],
            finished=d.get("finished", True),
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass
class EpochPlan:
    """The random draws of one training epoch (see :meth:`Trainer.plan_epoch`)."""

    indices: torch.Tensor  # [n_batches, B] store indices
    negatives: torch.Tensor | None  # [n_batches, B], a sample of another class per positive
    window: SequenceWindow | None
    draws: torch.Tensor | None  # [n_batches, B] uniform window-start draws
    negative_draws: torch.Tensor | None
    class_kwargs: dict[str, Any]
    novel: EpochPlan | None = None  # substages with a novel stream: its own draws (after the base stream's)


class Interrupted(Exception):
    """Raised by an ``on_epoch_end`` callback to stop a run after a checkpoint (tests, time limits)."""


EpochCallback = Callable[[int, dict[str, Any]], None]


class Trainer:
    """Trains one method for one stage (or one GFSL repeat) and checkpoints into ``out_dir``."""

    def __init__(
        self,
        method,
        store: FeatureStore,
        text: torch.Tensor,
        cfg: RunConfig,
        device: torch.device,
        out_dir: str | Path,
        *,
        name: str,
        seed: int,
        stage: int,
        repeat: int = 0,
        compat: str = "none",
        progress: bool = False,
        meta: dict[str, Any] | None = None,
        substage=None,
    ):
        self.method = method
        self.store = store
        self.text = text
        self.cfg = cfg
        self.device = device
        self.out_dir = Path(out_dir)
        self.name = name
        self.seed = seed
        self.stage = stage
        self.repeat = repeat
        self.compat = compat
        self.progress = progress
        self.meta = meta or {}
        self.substage = substage  # models.base.Substage of a curriculum method, else None
        self.novel_text: torch.Tensor | None = None  # text table of the novel stream (None: ``text``)
        self.checkpoints = self.out_dir / "checkpoints"
        # A substage optimises every parameter (frozen ones get no gradient, so Adam skips them) so that its state
        # can carry over between substages that freeze different parts.
        params = list(method.parameters()) if substage is not None else list(method.trainable_parameters())
        # A method without trainable parameters (text-match) has no optimiser; it only runs zero-epoch stages.
        lr = substage.lr if substage is not None and substage.lr is not None else cfg.lr
        betas = substage.adam_betas if substage is not None and substage.adam_betas is not None else (0.9, 0.999)
        wd = substage.weight_decay if substage is not None and substage.weight_decay is not None else cfg.weight_decay
        self.optimizer = adam(params, lr=lr, betas=betas, weight_decay=wd) if params else None
        self.batch_size = substage.batch_size if substage is not None and substage.batch_size else cfg.batch_size
        self.n_batches = substage.n_batches if substage is not None and substage.n_batches else cfg.n_batches
        self.scheduler = None
        if cfg.lr_scheduler and self.optimizer is not None:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="max", patience=cfg.lr_patience, factor=cfg.lr_factor
            )

    # ------------------------------------------------------------------------------------------------------------

    def has_checkpoint(self) -> bool:
        return bool(ckpt.list_checkpoints(self.checkpoints))

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _save(self, epoch: int, book: dict[str, Any], val: dict[str, float] | None) -> None:
        meta = {
            **self.meta,
            "stage": self.name,
            "epoch": epoch,
            "epochs_done": epoch + 1,
            "val": val,
            "trainer": book,
        }
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": ckpt.rng_state(),
        }
        ckpt.save_checkpoint(ckpt.epoch_dir(self.checkpoints, epoch), self.method.state_dict(), meta, state)
        keep = {epoch}
        if book.get("best_epoch") is not None:
            keep.add(int(book["best_epoch"]))
        ckpt.prune_checkpoints(self.checkpoints, keep)
        ckpt.atomic_write_json(self.out_dir / "history.json", book["history"])

    def _restore(self) -> tuple[int, dict[str, Any]]:
        last = ckpt.list_checkpoints(self.checkpoints)[-1]
        c = ckpt.load_checkpoint(ckpt.epoch_dir(self.checkpoints, last))
        book = c.trainer_book()
        c.load_model(self.method, self.device)
        c.restore_training(self.optimizer, self.scheduler)
        log.info("%s: resuming after epoch %d (%s)", self.name, last + 1, c.path)
        return last + 1, book

    # ------------------------------------------------------------------------------------------------------------

    def fit(
        self,
        train_indices: np.ndarray,
        epochs: int,
        *,
        val: EvalSplit | None = None,
        select_best: bool = False,
        schedule: str = "val",
        replay_drops: list[int] | tuple[int, ...] = (),
        resume: bool = False,
        on_epoch_end: EpochCallback | None = None,
        novel_indices: np.ndarray | None = None,
    ) -> StageOutcome:
        """Train for ``epochs`` epochs on ``train_indices`` (store indices).

        ``val``: evaluated after every epoch (beta searched on ``cfg.beta_grid``); ``select_best`` tracks the best
        epoch by strictly higher HM. ``schedule``: ``"val"`` steps ReduceLROnPlateau on the val HM (needs ``val``),
        ``"replay"`` multiplies the LR by ``lr_factor`` after each epoch in ``replay_drops``, ``"none"`` keeps it.
        With ``cfg.lr_scheduler`` false the LR never changes.

        With a ``substage`` (curriculum methods): ``novel_indices`` is the novel stream of a ``novel_stream``
        substage (every iteration: one step on a base batch, one on a novel batch), or of a ``joint`` one (one
        class-uniform stream over both); validation uses the substage's
        grid and metric (``val_metric``) for best-epoch selection and the schedule.
        """
        if epochs == 0:
            return self._fit_untrained(val, select_best)
        if self.optimizer is None:
            raise ConfigError(
                f"method '{self.cfg.method}' has no trainable parameters: it runs zero-epoch stages (set epochs: 0)"
            )
        if schedule == "val" and val is None:
            raise ValueError("schedule='val' needs a validation split")
        cfg = self.cfg
        sub = self.substage
        sampler, novel_sampler = self.samplers(train_indices, novel_indices)
        grid = sub.beta_grid if sub is not None and sub.beta_grid else cfg.beta_grid
        val_key = sub.val_metric if sub is not None else "hm"
        betas = metrics.beta_grid(grid) if val is not None else None
        official_best = self.compat == "official"
        drops = set(int(e) for e in replay_drops)

        start = 0
        book: dict[str, Any] = {
            "best_epoch": None,
            "best_hm": None,
            "beta_best": None,
            "beta_last": None,
            "lr_drops": [],
            "history": [],
        }
        if self.has_checkpoint():
            if not resume:
                raise AvlowshotError(f"{self.checkpoints}: checkpoints exist; pass --resume to continue")
            start, book = self._restore()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        writer = _summary_writer(self.out_dir, purge_step=start + 1 if start > 0 else None)
        t_stage = time.perf_counter()
        try:
            for epoch in range(start, epochs):
                record = self._epoch(sampler, epoch, epochs, novel_sampler)
                lr_used = self._lr()
                val_rec = None
                if val is not None:
                    t0 = time.perf_counter()
                    with precision(self.device, cfg.amp):
                        res = evaluate_split(
                            self.method, self.store, val, self.text, self.device, cfg.eval_batch_size, betas=betas,
                            phase="val",
                        )  # fmt: skip
                    val_rec = metric_record(res)
                    record["time_val"] = time.perf_counter() - t0
                    record["val"] = val_rec
                    book["beta_last"] = val_rec["beta"]
                    if select_best:
                        best = book["best_hm"]
                        if best is None or val_rec[val_key] > best or (official_best and not best):
                            book["best_epoch"], book["best_hm"] = epoch, val_rec[val_key]
                            book["beta_best"] = val_rec["beta"]
                if cfg.lr_scheduler and self.scheduler is not None:
                    if schedule == "val":
                        self.scheduler.step(val_rec[val_key])
                    elif schedule == "replay" and epoch in drops:
                        for g in self.optimizer.param_groups:
                            g["lr"] = g["lr"] * cfg.lr_factor
                if self._lr() < lr_used:
                    book["lr_drops"].append(epoch)
                record["lr"] = lr_used
                book["history"].append(record)
                self._save(epoch, book, val_rec)
                self._log(writer, epoch, epochs, record, book)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, record)
        finally:
            if writer is not None:
                writer.close()
        seconds = sum(r["time_train"] + r.get("time_val", 0.0) for r in book["history"])
        last = epochs - 1
        outcome = StageOutcome(
            name=self.name,
            epochs=epochs,
            best_epoch=book["best_epoch"],
            best_hm=book["best_hm"],
            beta_best=book["beta_best"],
            beta_last=book["beta_last"],
            lr_drops=book["lr_drops"],
            history=book["history"],
            seconds=seconds,
            checkpoint_last=str(ckpt.epoch_dir(Path("checkpoints"), last)),
            checkpoint_best=(
                str(ckpt.epoch_dir(Path("checkpoints"), book["best_epoch"])) if book["best_epoch"] is not None else None
            ),
        )
        outcome.extra["wall_seconds_last_session"] = time.perf_counter() - t_stage
        ckpt.atomic_write_json(self.out_dir / "summary.json", outcome.to_json())
        return outcome

    def _fit_untrained(self, val: EvalSplit | None, select_best: bool) -> StageOutcome:
        """A zero-epoch stage: the initial model is the stage's only checkpoint (``checkpoints/initial``), validated
        once when ``val`` is given (and then the "best" one, with ``best_epoch`` None)."""
        sub = self.substage
        grid = sub.beta_grid if sub is not None and sub.beta_grid else self.cfg.beta_grid
        val_key = sub.val_metric if sub is not None else "hm"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        val_rec = None
        if val is not None:
            with precision(self.device, self.cfg.amp):
                res = evaluate_split(
                    self.method, self.store, val, self.text, self.device, self.cfg.eval_batch_size,
                    betas=metrics.beta_grid(grid), phase="val",
                )  # fmt: skip
            val_rec = metric_record(res)
            log.info(
                "%s (no training): val S %.2f U %.2f HM %.2f ZSL %.2f beta %.3g", self.name,
                *(100 * val_rec[k] for k in ("seen", "unseen", "hm", "zsl")), val_rec["beta"],
            )  # fmt: skip
        rel = Path("checkpoints") / "initial"
        meta = {**self.meta, "stage": self.name, "epoch": -1, "epochs_done": 0, "val": val_rec}
        ckpt.save_checkpoint(self.out_dir / rel, self.method.state_dict(), meta)
        selected = select_best and val_rec is not None
        outcome = StageOutcome(
            name=self.name,
            epochs=0,
            best_epoch=None,
            best_hm=val_rec[val_key] if selected else None,
            beta_best=val_rec["beta"] if selected else None,
            beta_last=None if val_rec is None else val_rec["beta"],
            lr_drops=[],
            history=[],
            seconds=time.perf_counter() - t0,
            checkpoint_last=str(rel),
            checkpoint_best=str(rel) if selected else None,
        )
        ckpt.atomic_write_json(self.out_dir / "summary.json", outcome.to_json())
        return outcome

    def plan_epoch(
        self, sampler: ClassBalancedSampler, epoch: int, novel_sampler: ClassBalancedSampler | None = None
    ) -> EpochPlan:
        """Every random draw of one epoch, from one generator seeded by (seed, stage, repeat, epoch): the batch
        indices, then the negatives (methods that need them), then the window starts (methods with a window);
        then the same for the novel stream, if any."""
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.stage, self.repeat, epoch))
        plan = self._plan(sampler, gen)
        if novel_sampler is not None:
            plan.novel = self._plan(novel_sampler, gen)
        return plan

    def _plan(self, sampler: ClassBalancedSampler, gen: torch.Generator) -> EpochPlan:
        method = self.method
        idx = sampler.epoch(gen)  # [n_batches, B]
        neg = None
        if method.needs_negatives:
            neg = sampler.negatives(self.store.labels[idx.reshape(-1)], gen).view_as(idx)
        window = method.sequence_window(training=True) if self.store.temporal else None
        draws = neg_draws = None
        if window is not None:
            draws = torch.rand(idx.shape, generator=gen, dtype=torch.float64)
            if neg is not None:
                neg_draws = torch.rand(idx.shape, generator=gen, dtype=torch.float64)
        # Methods whose loss scores every class of the split get their text embeddings and ids (ascending).
        class_kwargs = {}
        if method.needs_class_table:
            class_ids = torch.as_tensor(sampler.class_ids, dtype=torch.int64, device=self.text.device)
            class_kwargs = {"class_text": self.text[class_ids], "class_ids": class_ids}
        if method.needs_label_text:
            class_kwargs["label_text"] = self.text[method.label_space.to(self.text.device)]
        return EpochPlan(idx, neg, window, draws, neg_draws, class_kwargs)

    def load_batch(
        self, plan: EpochPlan, b: int, text: torch.Tensor | None = None
    ) -> tuple[Batch, torch.Tensor, dict[str, Any]]:
        """The data path of batch ``b``: gather (pad / window, masks) and move to the device; its text rows (from
        ``text``, default the run's table) and the extra arguments of ``losses``."""
        text = self.text if text is None else text
        batch = gather(self.store, plan.indices[b], plan.window, None if plan.draws is None else plan.draws[b])
        batch = batch.padded(getattr(self.method, "pad_multiple", 1)).to(self.device, non_blocking=True)
        kwargs = dict(plan.class_kwargs)
        if plan.negatives is not None:
            draws = None if plan.negative_draws is None else plan.negative_draws[b]
            nb = gather(self.store, plan.negatives[b], plan.window, draws)
            nb = nb.padded(getattr(self.method, "pad_multiple", 1)).to(self.device, non_blocking=True)
            kwargs.update(negative=nb, negative_text=self.text[nb.labels])
        return batch, text[batch.labels], kwargs

    def train_step(
        self, batch: Batch, text: torch.Tensor, kwargs: dict[str, Any], after: bool = True
    ) -> dict[str, torch.Tensor]:
        """One optimiser step, then (``after``) the method's :meth:`after_step` hook; returns the detached loss
        terms."""
        with precision(self.device, self.cfg.amp):
            losses = self.method.losses(batch, text, **kwargs)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        if after:
            self.method.after_step(batch, text)
        return {k: v.detach() for k, v in losses.items()}

    def load_iteration(self, plan: EpochPlan, b: int) -> list[tuple[Batch, torch.Tensor, dict[str, Any]]]:
        """The batches of iteration ``b``: one, or for a substage with a novel stream the base and the novel batch
        (each with its ``stream`` argument); a substage with named ``steps`` repeats the base batch once per step
        (with its ``step`` argument)."""
        if self.substage is None:
            return [self.load_batch(plan, b)]
        batch, text, kwargs = self.load_batch(plan, b)
        if self.substage.steps:
            return [(batch, text, {**kwargs, "stream": "base", "step": s}) for s in self.substage.steps]
        items = [(batch, text, {**kwargs, "stream": "base"})]
        if plan.novel is not None:
            batch, text, kwargs = self.load_batch(plan.novel, b, self.novel_text)
            items.append((batch, text, {**kwargs, "stream": "novel"}))
        return items

    def train_iteration(self, items: list[tuple[Batch, torch.Tensor, dict[str, Any]]]) -> dict[str, torch.Tensor]:
        """One optimiser step per batch of the iteration (two streams, or a substage's named steps); the loss terms
        prefixed per step, or per stream. The :meth:`after_step` hooks run after all the steps, once per batch, in
        the reference's order (AV-DIFF's extra pass after both of its optimiser steps)."""
        if len(items) == 1:
            return self.train_step(*items[0])
        losses: dict[str, torch.Tensor] = {}
        total = None
        for item in items:
            part = self.train_step(*item, after=False)
            prefix = item[2].get("step") or item[2]["stream"]
            losses.update({f"{prefix}_{k}": v for k, v in part.items()})
            total = part["loss"] if total is None else total + part["loss"]
        done: set[int] = set()
        for batch, text, _ in items:
            if id(batch) not in done:
                done.add(id(batch))
                self.method.after_step(batch, text)
        losses["loss"] = total
        return losses

    def samplers(
        self, train_indices: np.ndarray, novel_indices: np.ndarray | None = None
    ) -> tuple[ClassBalancedSampler, ClassBalancedSampler | None]:
        """The samplers of a stage (the base stream, or one joint stream with the novel samples; the novel stream
        of a ``novel_stream`` substage), after the method is told what it trains on (its observe hooks)."""
        sub = self.substage
        stream = train_indices
        if sub is not None and sub.joint and novel_indices is not None:
            stream = np.union1d(train_indices, novel_indices)
        labels = self.store.labels.numpy()
        sampler = ClassBalancedSampler(labels, stream, self.batch_size, self.n_batches)
        novel_sampler = None
        if sub is not None and sub.novel_stream:
            if novel_indices is None:
                raise ValueError(f"substage {sub.name!r} needs novel_indices")
            novel_sampler = ClassBalancedSampler(labels, novel_indices, self.batch_size, self.n_batches)
        seen_by_method = train_indices if novel_indices is None else np.union1d(train_indices, novel_indices)
        self.method.observe_training_set(self.store, seen_by_method)
        if novel_indices is not None:
            self.method.observe_novel_set(self.store, novel_indices)
        return sampler, novel_sampler

    def prefetching(self) -> bool:
        """``cfg.prefetch``; ``auto`` = on when the features are larger than half of the physical memory.
        Measured on full-size VGGSound tcaf-cls (23 GB, cold page cache): 1.08 -> 0.84 s per step; on features
        that fit in RAM the thread slowed AVCA's steps by 25 % on 2 cores."""
        if self.cfg.prefetch != "auto":
            return self.cfg.prefetch == "always"
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return False
        return self.store.audio.data.nbytes + self.store.video.data.nbytes > ram // 2

    def iterations(self, plan: EpochPlan, n: int):
        """The loaded batches of iterations ``0..n-1`` in order. With prefetching (``cfg.prefetch``) the next
        iteration is gathered on a background thread while the current one trains, so reading memory-mapped
        features (page faults, disk) overlaps the computation; the batches are the same either way."""
        if not self.prefetching() or n < 2:
            for b in range(n):
                yield self.load_iteration(plan, b)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="avlowshot-data") as pool:
            pending = pool.submit(self.load_iteration, plan, 0)
            for b in range(n):
                items = pending.result()
                if b + 1 < n:
                    pending = pool.submit(self.load_iteration, plan, b + 1)
                yield items

    def _epoch(
        self, sampler: ClassBalancedSampler, epoch: int, epochs: int, novel_sampler: ClassBalancedSampler | None = None
    ) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.method.train()
        plan = self.plan_epoch(sampler, epoch, novel_sampler)
        sums: dict[str, torch.Tensor] = {}
        bar = _bar(self.n_batches, f"{self.name} {epoch + 1}/{epochs}", self.progress)
        try:
            for b, items in enumerate(self.iterations(plan, self.n_batches)):
                losses = self.train_iteration(items)
                for k, v in losses.items():
                    sums[k] = sums[k] + v if k in sums else v.clone()
                if bar is not None:
                    bar.update(1)
                    if (b + 1) % 50 == 0 and self.device.type == "cpu":  # on a GPU this would sync the host
                        bar.set_postfix(loss=f"{float(sums['loss']) / (b + 1):.4f}")
        finally:
            if bar is not None:
                bar.close()
        train = {k: float(v) / self.n_batches for k, v in sums.items()}
        if not math.isfinite(train.get("loss", 0.0)):
            raise AvlowshotError(
                f"{self.name}, epoch {epoch + 1}: the training loss is {train['loss']} "
                f"(diverged; try a lower lr, e.g. --set lr={cfg.lr / 10:g})"
            )
        return {"epoch": epoch, "train": train, "time_train": time.perf_counter() - t0}

    def _log(self, writer, epoch: int, epochs: int, record: dict[str, Any], book: dict[str, Any]) -> None:
        step = epoch + 1
        if writer is not None:
            for k, v in record["train"].items():
                writer.add_scalar(f"train/{k}", v, step)
            writer.add_scalar("train/lr", record["lr"], step)
            for k, v in (record.get("val") or {}).items():
                writer.add_scalar(f"val/{k}", v * 100 if k != "beta" else v, step)
            writer.flush()
        msg = f"{self.name} epoch {epoch + 1}/{epochs}: loss {record['train']['loss']:.4f} lr {record['lr']:.2e}"
        if record.get("val"):
            v = record["val"]
            s_, u_, z_ = ("base", "novel", "FSL") if getattr(self, "task", "gzsl") == "gfsl" else ("S", "U", "ZSL")
            msg += f" | val {s_} {100 * v['seen']:.2f} {u_} {100 * v['unseen']:.2f} HM {100 * v['hm']:.2f}"
            msg += f" {z_} {100 * v['zsl']:.2f} beta {v['beta']:.3g}"
            if book["best_epoch"] is not None:
                msg += f" (best HM {100 * book['best_hm']:.2f} @ {book['best_epoch'] + 1})"
        log.info(msg)


def _summary_writer(log_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        log.warning("tensorboard is not installed: no event files")
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
