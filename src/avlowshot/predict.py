"""``avlowshot predict``: rank any list of class names for one video with a trained run.

The final (stage-2) model of the run scores the video against every name. A name the run knows (its original or
manual name) keeps the text vector it was trained with; any other name is embedded on the fly with the text encoder
the run's data were embedded with. That encoder is checked, not trusted: re-embedding the run's own class names must
give back the vectors it was trained with (cosine > 0.999), so a different encoder (or other weights) is refused.
The video's features are checked the same way against the training root's ``extractor.json`` (feature set,
backbone weights, compat) and its dims. Seen classes get the run's calibration (its test beta), as in the protocol.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avlowshot.data.layouts import ENCODER_SUFFIX, EXTRACTOR_FILE
from avlowshot.errors import AvlowshotError, DataError

COSINE_MATCH = 0.999


@dataclass
class Ranked:
    name: str
    score: float
    role: str  # seen | unseen | new (a name the run never saw)


def _fold(name: str) -> str:
    return "".join(name.lower().split())


def parse_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise DataError("no class names given", key="classes", fix='e.g. --classes "playing guitar, horse riding"')
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"class '{dup}' is listed twice", key=dup)
    return names


def _feature_set(layout: str) -> str:
    from avlowshot.data.layouts import get_layout

    fs = get_layout(layout).feature_set
    if fs == "main":
        raise AvlowshotError(
            f"runs on {layout} use SeLaVi features, which `extract` does not compute; pass --features with SeLaVi "
            "features of the video instead of --video"
        )
    return fs


class Predictor:
    def __init__(
        self,
        run_dir: str | Path,
        device: str = "cpu",
        cache_dir: str | Path | None = None,
        root_dir: str | Path | None = None,
    ):
        from avlowshot.train.protocol import (
            RESULT_FILE,
            RunContext,
            _load_model,
            _read_json,
            load_run_info,
            read_summary,
        )

        self.run_dir = Path(run_dir)
        info, cfg = load_run_info(self.run_dir)
        if root_dir is not None:
            info = {**info, "root_dir": str(Path(root_dir).resolve())}
        self.ctx = RunContext(info, cfg, device, cache_dir=cache_dir)
        dirs = self.ctx.stage2_dirs(self.run_dir)
        summary = read_summary(dirs[0])
        result_file = self.run_dir / RESULT_FILE
        if summary is None or not result_file.is_file():
            raise AvlowshotError(f"{self.run_dir}: the run has not finished (no {RESULT_FILE}); finish it with `run`")
        self.method = _load_model(self.ctx, dirs[0], summary.checkpoint_last)
        record = _read_json(result_file)
        beta = record.get("beta_test") if isinstance(record, dict) else "?"
        if beta is not None and not isinstance(beta, int | float):
            raise AvlowshotError(
                f"{result_file}: 'beta_test' is {beta!r}, expected a number; rewrite it with "
                f"`avlowshot evaluate --run-dir {self.run_dir}`"
            )
        self.beta = beta or 0.0
        self.spec = self.ctx.bench.spec
        self.features_root = self.spec.features_root(self.ctx.bench.root, self.ctx.bench.shots)

    # -- features --------------------------------------------------------------------------------------------

    @property
    def extractor_meta(self) -> dict[str, Any] | None:
        path = self.features_root / EXTRACTOR_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def features_from_video(self, video: Path, weights: Path) -> tuple[np.ndarray, np.ndarray]:
        from avlowshot.extract.media import decode
        from avlowshot.extract.pipeline import build_extractor, weights_digest

        features = _feature_set(self.spec.name)
        meta = self.extractor_meta or {}
        compat = meta.get("compat", "fixed")
        if meta.get("weights") and meta["weights"] != weights_digest(features, Path(weights)):
            raise AvlowshotError(
                f"{weights}: these backbone weights are not the ones the run's features were extracted with "
                f"(checksums in {self.features_root / EXTRACTOR_FILE}); pass the same --weights folder"
            )
        extractor = build_extractor(features, weights, str(self.ctx.device), compat)
        d = decode(
            video,
            fps=extractor.video_fps,
            audio_rate=extractor.audio_rate,
            frame_size=extractor.frame_size,
            frame_pick=extractor.frame_pick,
        )
        return extractor(d.frames, d.audio)

    def features_from_file(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        from avlowshot.extract.pipeline import load_video_features

        audio, video, _ = load_video_features(path)
        made_by = path.parent.parent / EXTRACTOR_FILE  # extracted/<features>/videos/<id>.npz
        mine = self.extractor_meta
        if made_by.is_file() and mine is not None:
            theirs = json.loads(made_by.read_text(encoding="utf-8"))
            diff = [k for k in ("features", "compat", "weights") if theirs.get(k) != mine.get(k)]
            if diff:
                raise AvlowshotError(
                    f"{path}: extracted with other settings than the run's features ({', '.join(diff)} differ: "
                    f"{made_by} vs {self.features_root / EXTRACTOR_FILE})"
                )
        return audio, video

    def _store(self, audio: np.ndarray, video: np.ndarray):
        from avlowshot.data.store import FeatureStore

        store = self.ctx.store
        for name, arr, mod in (("audio", audio, store.audio), ("video", video, store.video)):
            if arr.shape[-1] != mod.dim:
                raise AvlowshotError(
                    f"the video's {name} features are {arr.shape[-1]}-d but the run was trained on {mod.dim}-d "
                    f"{self.spec.name} features; extract them with the run's feature set"
                )
        if store.temporal:
            audio, video = (np.atleast_2d(a) for a in (audio, video))
            return FeatureStore.from_arrays(
                [audio], [video], np.zeros(1), store.classes,
                audio_step=store.audio.step_seconds, video_step=store.video.step_seconds,
            )  # fmt: skip
        audio, video = (a.astype(np.float32).mean(axis=0) if a.ndim == 2 else a for a in (audio, video))
        return FeatureStore.from_arrays(audio[None], video[None], np.zeros(1), store.classes)

    # -- class names -----------------------------------------------------------------------------------------

    def _known(self, name: str) -> int | None:
        """The class id of a name the run knows (its original or manual name): exactly, else ignoring case and
        spaces (``playing guitar`` = ``PlayingGuitar``); None for a new name."""
        table = self.ctx.store.classes
        pairs = list(enumerate(zip(table.names, table.text_key, strict=True)))
        for cid, (orig, key) in pairs:
            if name in (orig, key):
                return cid
        fold = _fold(name)
        hits = sorted({cid for cid, (orig, key) in pairs if fold in (_fold(orig), _fold(key))})
        if len(hits) > 1:
            raise DataError(
                f"'{name}' matches {len(hits)} classes of the run when case and spaces are ignored: "
                + ", ".join(table.names[c] for c in hits),
                key="classes",
                fix="spell the class exactly as the run's class-split names it",
            )
        return hits[0] if hits else None

    def check_names(self, names: list[str]) -> None:
        """A method with a classifier (AV-DIFF) scores only its label space: refuse other names before anything
        else is loaded or embedded."""
        if not self.method.needs_label_space:
            return
        table = self.ctx.store.classes
        space = set(np.asarray(self.method.label_space.cpu()).tolist())
        for n in names:
            cid = self._known(n)
            if cid is None or cid not in space:
                some = ", ".join(table.names[c] for c in sorted(space)[:6])
                raise DataError(
                    f"'{n}' is not in the label space of this {self.ctx.cfg.method} run: its classifier scores only "
                    f"the {len(space)} classes it was trained on",
                    key="classes",
                    fix=f"name classes of the run (e.g. {some}, ...); new names need a method without a classifier",
                )

    def text_rows(self, names: list[str], encoder=None) -> tuple[torch.Tensor, list[int | None]]:
        known = [self._known(n) for n in names]
        text = self.ctx.text.cpu()
        new = [n for n, k in zip(names, known, strict=True) if k is None]
        rows = torch.zeros(len(names), text.shape[1])
        if new:
            if encoder is None:
                raise AvlowshotError(
                    f"'{new[0]}' is not a class of this run; to embed new names pass --text-encoder (and "
                    f"--text-weights) matching {self._encoder_hint()}"
                )
            self.check_encoder(encoder)
            vecs = torch.from_numpy(np.asarray(encoder.encode(new), dtype=np.float32))
            it = iter(vecs)
            for i, k in enumerate(known):
                if k is None:
                    rows[i] = next(it)
        for i, k in enumerate(known):
            if k is not None:
                rows[i] = text[k]
        return rows, known

    def _encoder_hint(self) -> str:
        files = self.spec.text_files(self.ctx.bench.root, self.ctx.bench.dataset, self.ctx.bench.shots)
        sidecar = files[0].with_name(files[0].name + ENCODER_SUFFIX)
        if sidecar.is_file():
            return f"the encoder recorded in {sidecar}"
        return f"the encoder that made {files[0]}"

    def check_encoder(self, encoder) -> None:
        """Refuse an encoder that does not give back the run's own class vectors."""
        table = self.ctx.store.classes
        text = self.ctx.text.cpu().numpy()
        if encoder.dim != text.shape[1]:
            raise AvlowshotError(
                f"the {encoder.name} text encoder gives {encoder.dim}-d vectors; the run was trained on "
                f"{text.shape[1]}-d class embeddings ({self._encoder_hint()})"
            )
        probe = list(range(min(8, len(table.names))))
        again = np.asarray(encoder.encode([table.text_key[c] for c in probe]), dtype=np.float32)
        want = text[probe]
        cos = (again * want).sum(1) / (np.linalg.norm(again, axis=1) * np.linalg.norm(want, axis=1) + 1e-12)
        if float(cos.min()) < COSINE_MATCH:
            worst = probe[int(cos.argmin())]
            raise AvlowshotError(
                f"the {encoder.name} text encoder does not reproduce the run's class embeddings (cosine "
                f"{cos.min():.3f} for '{table.text_key[worst]}'); use {self._encoder_hint()}"
            )

    # -- ranking ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rank(self, audio: np.ndarray, video: np.ndarray, names: list[str], encoder=None) -> list[Ranked]:
        from avlowshot.train.trainer import class_scores, encode_samples

        self.check_names(names)
        store = self._store(audio, video)
        rows, known = self.text_rows(names, encoder)
        method, device = self.method, self.ctx.device
        codes = encode_samples(method, store, np.arange(1), device, 1)
        ids = torch.as_tensor([-1 if k is None else k for k in known], dtype=torch.int64)
        scores = class_scores(method, codes, rows.to(device), ids).float().cpu()[0]
        seen = set(self.ctx.protocol.stage2_train.classes.tolist())
        is_seen = torch.tensor([k is not None and k in seen for k in known])
        sign = 1.0 if method.score_kind == "distance" else -1.0
        scores = scores + sign * float(self.beta) * is_seen
        order = torch.argsort(scores, descending=method.score_kind != "distance", stable=True)
        out = []
        for i in order.tolist():
            role = "new" if known[i] is None else ("seen" if bool(is_seen[i]) else "unseen")
            out.append(Ranked(names[i], float(scores[i]), role))
        return out
