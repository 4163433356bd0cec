"""The interface every method implements; the trainer and the evaluator only ever call these members.

A method holds the architecture and the losses. The loop, the sampler, the optimiser and its schedule, checkpoints
and metrics live in ``train/`` and ``eval/``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel
from torch import Tensor, nn

from avlowshot.data.batching import Batch, SequenceWindow


@dataclass(frozen=True)
class Substage:
    """One part of a method's training curriculum (:meth:`Method.curriculum`), run by the shared protocol in order.

    ``novel_stream``: every iteration is a step on a batch of the base stream, then a step on a batch of the novel
    stream (the few-shot samples; two optimiser steps; :meth:`Method.losses` gets ``stream="base"`` / ``"novel"``);
    otherwise one stream of base classes only. :meth:`Method.enter_substage` (freezing) runs before training.
    ``val_metric``: the validation score that selects the best epoch and drives the LR schedule (``"hm"`` or
    ``"seen"`` = base accuracy); ``beta_grid``: the validation grid (``None``: the run's ``beta_grid``).
    ``epochs_key``: the key of ``substage_epochs`` giving its stage-1 epochs (``None``: ``epochs``).
    ``reset_optimizer``: a fresh Adam and schedule at the start; else the previous substage's optimiser state
    carries over. ``reference_beta_from`` / ``reference_beta_zero_search``: what the reference does with the test
    beta, reproduced under ``--compat official`` (last epoch's beta; a beta of 0 re-searched on the test set).
    ``validate``: ``False`` trains the substage's epochs without validation and hands its last epoch on (stage 2
    trains as many; e.g. a generator whose quality only the next substage's classifier measures).
    ``steps``: named optimiser steps per iteration on the same batch (e.g. a GAN's ``("critic", "generator")``;
    :meth:`Method.losses` gets ``step=name``); empty: one step. ``lr`` / ``adam_betas`` / ``weight_decay`` /
    ``batch_size`` / ``n_batches``: the substage's own optimiser and batches (``None``: the run config's; Adam's
    betas (0.9, 0.999)). ``joint`` (GFSL): one class-uniform stream over base and novel samples together (a
    one-stage GFSL model's sampler); in stage 2 such a substage, like a ``novel_stream`` one, is trained per repeat.
    """

    name: str
    novel_stream: bool = False
    val_metric: str = "hm"
    beta_grid: str | None = None
    epochs_key: str | None = None
    reset_optimizer: bool = True
    reference_beta_from: str | None = None
    reference_beta_zero_search: bool = False
    validate: bool = True
    steps: tuple[str, ...] = ()
    lr: float | None = None
    adam_betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    joint: bool = False
    batch_size: int | None = None
    n_batches: int | None = None


@dataclass(frozen=True)
class InputDims:
    """Feature dims of the benchmark a method is built for: audio, video and class-text embedding."""

    audio: int
    video: int
    text: int


class Method(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every method.

    ``score_kind`` says how to read :meth:`scores`: ``"distance"`` (lower = better) or ``"probability"``.
    ``needs_negatives``: the trainer passes, for each positive, a random sample of another class and that class's
    text embedding to :meth:`losses`. ``compat`` is the run's compatibility mode; methods whose reference quirks
    are fixed by default read it to switch them back on.

    Train/eval mode is the caller's business, as for any ``nn.Module``: :meth:`losses` and :meth:`after_step` run
    in train mode, :meth:`encode_samples` / :meth:`encode_classes` in eval mode under ``torch.no_grad``.
    """

    name: ClassVar[str]
    score_kind: ClassVar[str]
    needs_negatives: ClassVar[bool]
    config_class: ClassVar[type[BaseModel]]  # schema of the ``model:`` block of the method's YAML configs
    needs_class_table: ClassVar[bool] = False
    """The trainer passes ``class_text`` [K, Dt] and ``class_ids`` [K] (every training class, ascending id) to
    :meth:`losses`, for losses that score each sample against all classes (e.g. a cross-entropy)."""

    needs_label_space: ClassVar[bool] = False
    """The method has a classifier over a fixed label space: it is built with ``classes=`` (global ids of the
    stage's classes) and :meth:`encode_classes` gets ``class_ids`` of the split's classes."""
    # model keys whose published value is the class-text dim (word2vec's 300); they follow a dataset of one's own
    text_dim_keys: ClassVar[tuple[str, ...]] = ()

    needs_label_text: ClassVar[bool] = False
    """The trainer passes ``label_text`` [C, Dt], the text rows of the label space (``label_space``, ascending id),
    to :meth:`losses` (e.g. to generate features of the label space's classes that have no training samples)."""

    beta_family: ClassVar[str | None] = None
    """The reference family whose test-beta conversion ``--compat official`` applies (``metrics.transfer_beta``);
    ``None``: the method's own name."""

    tasks: ClassVar[tuple[str, ...]] = ("gzsl",)
    """Protocols the method runs: ``"gzsl"`` and / or ``"gfsl"`` (``--shots k`` or the avdiff layout)."""

    layouts: ClassVar[tuple[str, ...]] = ()
    """The layouts (``--layout``) the method reads; any other is refused before anything is loaded."""

    inputs: ClassVar[str] = "any"
    """``"averaged"``: the method takes ``[B, D]`` features; a temporal layout is averaged over each video's valid
    rows once, when the data is loaded. ``"temporal"``: ``[B, L, D]`` with masks. ``"any"``: the method copes."""

    average_normalized_video: ClassVar[bool] = False
    """``inputs = "averaged"`` on a temporal layout: each video row is L2-normalised before the mean (TCAF's
    input normalisation applied before averaging, baselines.md §1.1)."""

    trainable: ClassVar[bool] = True
    """``False``: nothing to train (no parameters); the configs must set ``epochs: 0`` and the protocol runs
    zero-epoch stages (the initial model is evaluated)."""

    @classmethod
    def curriculum(cls, cfg, compat: str = "none") -> list[Substage] | None:
        """The substages of a method trained in parts (e.g. AV-DIFF's base / full), or ``None``: one stage."""
        return None

    def observe_training_set(self, store, indices) -> None:  # noqa: B027 - optional hook, no-op by default
        """Called by the trainer before a stage (or substage) trains, with the store and the store indices of every
        sample it trains on (base and novel streams together), e.g. to compute class prototypes from them."""

    def observe_novel_set(self, store, indices) -> None:  # noqa: B027 - optional hook, no-op by default
        """Called after :meth:`observe_training_set` when the stage trains on few-shot novel samples (GFSL), with
        their store indices (e.g. to know which classes to generate features of)."""

    def enter_substage(self, name: str) -> None:  # noqa: B027 - optional hook
        """Called before a substage trains (e.g. to freeze parts of the model)."""

    def stream_text(self, text: Tensor, labels) -> Tensor:
        """The text table ``[K, Dt]`` of a novel stream whose samples have ``labels`` (store order); the run's
        table by default (AV-DIFF's official mode pairs novel samples with another class's vector)."""
        return text

    def __init__(self, config: BaseModel, dims: InputDims, compat: str = "none"):
        super().__init__()
        self.config = config
        self.dims = dims
        self.compat = compat

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser steps (frozen ones, ``requires_grad=False``, are left out)."""
        return [p for p in self.parameters() if p.requires_grad]

    @abc.abstractmethod
    def losses(
        self, batch: Batch, text: Tensor, negative: Batch | None = None, negative_text: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Named scalar loss terms of one training batch; ``"loss"`` is the total to back-propagate.

        ``text`` ``[B, Dt]`` is the class text embedding of each positive's label, ``negative_text`` that of each
        negative's label.
        """

    def sequence_window(self, training: bool, phase: str = "test") -> SequenceWindow | None:
        """Fixed collation window of temporal batches (random starts in training, centred in evaluation), or
        ``None`` to pad each batch to its longest sequence. ``phase`` (evaluation only): ``"val"`` when scoring the
        validation split, ``"test"`` otherwise (methods whose reference uses other windows on val)."""
        return None

    def after_step(self, batch: Batch, text: Tensor) -> None:  # noqa: B027 - optional hook, no-op by default
        """Hook run after each optimiser step on the same positive batch (iterations with a base and a novel
        stream: after both steps, on each batch in turn)."""

    @abc.abstractmethod
    def encode_samples(self, batch: Batch) -> Tensor:
        """``[B, d]`` sample codes for evaluation."""

    @abc.abstractmethod
    def encode_classes(self, text: Tensor) -> Tensor:
        """``[C, d]`` class codes from class text embeddings ``[C, Dt]``."""

    @abc.abstractmethod
    def scores(self, sample_codes: Tensor, class_codes: Tensor) -> Tensor:
        """``[N, C]`` scores of every sample against every class, read according to ``score_kind``."""


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements.

    By default every ``nn.Parameter`` counts, frozen ones included: that is how the specs count (AVCA UCF-main
    1,693,108 includes the never-optimised ``pos_emb1D``, 600). ``trainable_only`` counts what the optimiser steps
    (:meth:`Method.trainable_parameters` for a method, else ``requires_grad`` parameters).
    """
    if not trainable_only:
        params = list(model.parameters())
    elif isinstance(model, Method):
        params = model.trainable_parameters()
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in params)


def check_averaged(batch: Batch, method: str) -> None:
    """Methods on averaged features take ``[B, D]`` tensors; temporal ``[B, L, D]`` batches are a setup error."""
    if batch.audio.dim() != 2 or batch.video.dim() != 2:
        raise ValueError(
            f"{method} takes averaged features ([B, D] per modality), got audio {tuple(batch.audio.shape)} and "
            f"video {tuple(batch.video.shape)}: use a feature set with averaged features"
        )
