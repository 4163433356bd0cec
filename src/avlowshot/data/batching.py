"""Batches: an index gather from the packed store, padding to the batch's longest sequence, boolean masks.

No per-sample Python: the rows of all samples of a batch are gathered with one index tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from avlowshot.data.store import FeatureStore, Modality


@dataclass
class Batch:
    audio: torch.Tensor  # float32 [B, Da] or [B, La, Da]
    video: torch.Tensor  # float32 [B, Dv] or [B, Lv, Dv]
    labels: torch.Tensor  # int64 [B], global class ids
    audio_mask: torch.Tensor | None = None  # bool [B, La], True = valid row
    video_mask: torch.Tensor | None = None
    audio_time: torch.Tensor | None = None  # float32 [B, La], seconds from the first kept row
    video_time: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """On CUDA the tensors go through pinned memory, so a non-blocking copy does not wait for the device."""
        pin = non_blocking and torch.device(device).type == "cuda"
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = (v.pin_memory() if pin and v.device.type == "cpu" else v).to(device, non_blocking=non_blocking)
            values[f.name] = v
        return Batch(**values)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def padded(self, multiple: int) -> Batch:
        """Temporal rows padded (masked out) to a multiple of ``multiple``: fewer distinct shapes for
        ``torch.compile``; the outputs on the valid rows are unchanged."""
        if self.audio_mask is None or multiple <= 1:
            return self
        values = {}
        for m in ("audio", "video"):
            x, mask, t = getattr(self, m), getattr(self, f"{m}_mask"), getattr(self, f"{m}_time")
            extra = -x.shape[1] % multiple
            if extra:
                step = t[:, 1:2] - t[:, :1] if t.shape[1] > 1 else torch.ones_like(t[:, :1])
                x = torch.nn.functional.pad(x, (0, 0, 0, extra))
                mask = torch.nn.functional.pad(mask, (0, extra), value=False)
                t = torch.cat([t, t[:, -1:] + step * torch.arange(1, extra + 1, device=t.device)], dim=1)
            values.update({m: x, f"{m}_mask": mask, f"{m}_time": t})
        return Batch(labels=self.labels, **values)


def _gather_averaged(mod: Modality, idx: torch.Tensor) -> torch.Tensor:
    return mod.take(idx).to(torch.float32)


def _gather_temporal(
    mod: Modality,
    idx: torch.Tensor,
    max_len: int | None = None,
    starts: torch.Tensor | None = None,
    tight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad (and optionally crop to ``max_len`` rows from ``starts``) the sequences of ``idx``; ``tight``: pad only to
    the longest cropped sequence of the batch instead of ``max_len``."""
    begin = mod.offsets[idx]
    length = mod.offsets[idx + 1] - begin
    if starts is not None:
        begin = begin + starts
        length = length - starts
    if max_len is not None:
        length = length.clamp(max=max_len)
    longest = int(length.max()) if len(length) else 0
    width = longest if max_len is None or tight else int(max_len)
    batch = idx.numel()
    pos = torch.arange(width)
    mask = pos.unsqueeze(0) < length.unsqueeze(1)  # [B, L]
    # One gather straight into the padded layout (padding slots read some valid row, then only they are zeroed):
    # a zero-filled buffer and a scatter of the valid rows into it cost two more passes over [B, L, D]. Whole-row
    # copies (index_select, index_fill_) rather than element-wise advanced indexing and a boolean index_put: a UCF
    # training batch [64, 30, 4096] 11.3 -> 2.6 ms.
    rows = (begin.unsqueeze(1) + pos.unsqueeze(0)).clamp(max=max(len(mod.data) - 1, 0))
    padding = ~mask
    out = mod.take(rows.masked_fill_(padding, 0).view(-1)).to(torch.float32)
    out = out.index_fill_(0, padding.view(-1).nonzero().squeeze(1), 0).view(batch, width, mod.dim)
    # float64 products cast to float32, as the references compute their time stamps (i * 0.96 differs in float32)
    time = (pos.to(torch.float64) * mod.step_seconds).to(torch.float32).expand(batch, width).contiguous()
    return out, mask, time


@dataclass(frozen=True)
class SequenceWindow:
    """Fixed-length windows of temporal batches (TCAF's ``fixed`` collation, used on ActivityNet).

    Every video sequence is cut or padded to ``length`` rows; the audio window covers the same seconds,
    ``round(length * video_step / audio_step)`` rows, and starts at the row nearest the video start in seconds.
    The video start is uniform in ``[0, T - length]`` for training draws and ``(T - length) // 2`` (centred) without
    draws. ``official`` reproduces the reference collator (specs/tcaf.md §1.9): audio length
    ``round(length * video_step * audio_step)``, a random start in ``[0, T - length - 1]`` (the last offset is never
    drawn).
    """

    length: int
    official: bool = False

    def lengths(self, store: FeatureStore) -> tuple[int, int]:
        """(audio rows, video rows) of every window."""
        rv, ra = store.video.step_seconds, store.audio.step_seconds
        audio = self.length * rv * ra if self.official else self.length * rv / ra
        return int(round(audio)), self.length

    def starts(
        self, store: FeatureStore, idx: torch.Tensor, draws: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(audio starts, video starts) ``[B]`` of the windows of samples ``idx``; ``draws`` ``[B]`` uniform in
        [0, 1) place random windows, ``None`` centres them."""
        la, lv = self.lengths(store)
        ta, tv = store.audio.lengths()[idx], store.video.lengths()[idx]
        dv, da = tv - lv, ta - la
        if draws is None:
            sv = dv.clamp(min=0) // 2
        else:
            span = dv if self.official else dv + 1
            sv = (draws.to(torch.float64) * span.clamp(min=0)).long()
        sv = torch.where(dv > 0, sv, torch.zeros_like(sv))
        rv, ra = store.video.step_seconds, store.audio.step_seconds
        aligned = torch.round(sv.to(torch.float64) * (rv / ra)).long()  # same instant in audio rows
        # Audio that fits its window is kept whole (start 0), else it starts at the video's start, or as late as
        # it can; the reference does the same.
        return torch.minimum(da.clamp(min=0), aligned), sv


def gather(
    store: FeatureStore,
    indices: np.ndarray | torch.Tensor,
    window: SequenceWindow | None = None,
    draws: torch.Tensor | None = None,
    tight: bool = False,
) -> Batch:
    """The samples ``indices`` of ``store`` as one batch (temporal features padded to the longest sequence).

    With a ``window``, temporal features are cut / padded to the window's fixed lengths instead, at random starts
    from ``draws`` (``[B]`` uniforms, training) or centred (``draws=None``, evaluation). Times restart at 0 at the
    first kept row. ``tight`` (evaluation): windows are padded only to the batch's longest cropped sequence; with
    the masks that changes no score, only the padding work."""
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    labels = store.labels[idx]
    if not store.temporal:
        return Batch(_gather_averaged(store.audio, idx), _gather_averaged(store.video, idx), labels)
    if window is None:
        a, am, at = _gather_temporal(store.audio, idx)
        v, vm, vt = _gather_temporal(store.video, idx)
    else:
        la, lv = window.lengths(store)
        sa, sv = window.starts(store, idx, draws)
        a, am, at = _gather_temporal(store.audio, idx, la, sa, tight)
        v, vm, vt = _gather_temporal(store.video, idx, lv, sv, tight)
    return Batch(a, v, labels, am, vm, at, vt)


def length_order(store: FeatureStore, indices: np.ndarray, window: SequenceWindow | None = None) -> np.ndarray:
    """Positions into ``indices`` that sort its samples by (video, audio) rows as collated (cropped to the window),
    so that evaluation batches hold sequences of similar length and pay little for padding. Stable: equal lengths
    keep their store order."""
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    lv, la = store.video.lengths()[idx], store.audio.lengths()[idx]
    if window is not None:
        wa, wv = window.lengths(store)
        la, lv = la.clamp(max=wa), lv.clamp(max=wv)
    return np.lexsort((la.numpy(), lv.numpy()))


class ClassBalancedSampler:
    """The references' sampler: ``n_batches`` batches of ``batch_size`` draws *with replacement*, each draw a
    uniformly random class, then a uniformly random sample of it (``WeightedRandomSampler`` with class-uniform
    weights). Fully vectorised; one epoch of indices is drawn at once from a seeded generator."""

    def __init__(self, labels: np.ndarray, indices: np.ndarray, batch_size: int, n_batches: int):
        indices = np.asarray(indices, dtype=np.int64)
        lab = np.asarray(labels)[indices]
        order = np.argsort(lab, kind="stable")
        self.sorted_indices = torch.from_numpy(indices[order])
        self.class_ids, starts, counts = np.unique(lab[order], return_index=True, return_counts=True)
        self.starts = torch.from_numpy(starts.astype(np.int64))
        self.counts = torch.from_numpy(counts.astype(np.int64))
        self.batch_size = batch_size
        self.n_batches = n_batches

    @property
    def n_classes(self) -> int:
        return len(self.class_ids)

    def epoch(self, generator: torch.Generator) -> torch.Tensor:
        """``[n_batches, batch_size]`` store indices."""
        shape = (self.n_batches, self.batch_size)
        cls = torch.randint(self.n_classes, shape, generator=generator)
        within = (torch.rand(shape, generator=generator, dtype=torch.float64) * self.counts[cls]).long()
        return self.sorted_indices[self.starts[cls] + within]

    def negatives(self, labels_of_positives: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """For each positive, a sample of a uniformly random *other* class of this split (AVCA-style negatives)."""
        pos_cls = torch.searchsorted(torch.from_numpy(self.class_ids), labels_of_positives)
        shift = torch.randint(1, self.n_classes, pos_cls.shape, generator=generator)
        cls = (pos_cls + shift) % self.n_classes
        within = (torch.rand(cls.shape, generator=generator, dtype=torch.float64) * self.counts[cls]).long()
        return self.sorted_indices[self.starts[cls] + within]
