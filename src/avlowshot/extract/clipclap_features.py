"""ClipClap video-level features: one CLIP image embedding of the middle frame and one CLAP audio embedding of a
10-s centre crop per video (spec ``clipclap.md`` §8.1), with Hugging Face ``transformers`` backbones.

Weights are local Hugging Face folders; nothing is downloaded (``local_files_only=True`` everywhere)::

    <weights_dir>/clip/   a saved CLIPModel + CLIPProcessor, e.g. openai/clip-vit-base-patch32
                          (config.json, model.safetensors, tokenizer files, preprocessor_config.json)
    <weights_dir>/clap/   a saved ClapModel + ClapProcessor, e.g. laion/clap-htsat-unfused
                          (config.json, model.safetensors, tokenizer files, preprocessor_config.json)

Make them once on a machine with internet::

    from transformers import CLIPModel, CLIPProcessor, ClapModel, ClapProcessor
    CLIPModel.from_pretrained("openai/clip-vit-base-patch32").save_pretrained("W/clip")
    CLIPProcessor.from_pretrained("openai/clip-vit-base-patch32").save_pretrained("W/clip")
    ClapModel.from_pretrained("laion/clap-htsat-unfused").save_pretrained("W/clap")
    ClapProcessor.from_pretrained("laion/clap-htsat-unfused").save_pretrained("W/clap")

Differences from the reference, on purpose or forced:

* **Audio backbone.** The reference used the WavCaps HTSAT-BERT CLAP (1024-d embeddings, 32 kHz input, 64 mels,
  fmin 50, fmax 14000). ``transformers`` has no WavCaps model; its CLAP (LAION HTSAT) gives ``projection_dim``
  (512 for the LAION checkpoints) features at 48 kHz through ``ClapFeatureExtractor``. Features made here are therefore
  not the published ones, and a ClipClap model trained on them has other input dims than the paper's 1024-d model
  (the layout records the dims this extractor writes).
* **Precision.** The reference ran CLIP in fp16 on CUDA; here every backbone runs in float32 and the image vector is
  cast to float16 only after the L2 normalisation (the stored dtype is the reference's).
* **Colour.** The reference read frames with OpenCV and never converted BGR to RGB, so CLIP saw R and B swapped.
  ``compat="fixed"`` (default) feeds the RGB frame; ``compat="official"`` swaps R and B to reproduce the reference.
  The reference's UCF-only colour-negative wrap (a float 0..255 tensor through ``ToPILImage``) is **not**
  reproduced in either mode.
* **Frame.** The caller picks the frame (``frame_pick = "middle"``); with several frames the middle one,
  ``frames[T // 2]``, is used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avlowshot.errors import DataError, WeightsError

CLIP_FOLDER = "clip"
CLAP_FOLDER = "clap"
CLIP_MODEL_ID = "openai/clip-vit-base-patch32"
CLAP_MODEL_ID = "laion/clap-htsat-unfused"
AUDIO_SECONDS = 10.0  # every audio clip is made exactly this long (reference: 320,000 samples at 32 kHz)
COMPAT_MODES = ("fixed", "official")

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _fix(kind: str, folder: Path) -> str:
    model_id, model_cls, proc_cls = {
        "clip": (CLIP_MODEL_ID, "CLIPModel", "CLIPProcessor"),
        "clap": (CLAP_MODEL_ID, "ClapModel", "ClapProcessor"),
    }[kind]
    return (
        f"put a saved Hugging Face {model_cls} folder there (config.json, model.safetensors, tokenizer and "
        f"preprocessor files); on a machine with internet: {model_cls}.from_pretrained('{model_id}')"
        f".save_pretrained('{folder}') and {proc_cls}.from_pretrained('{model_id}').save_pretrained('{folder}')"
    )


def check_hf_folder(folder: str | Path, kind: str) -> Path:
    """``folder`` as a Path after checking it holds a Hugging Face ``kind`` (clip | clap) model, else WeightsError."""
    folder = Path(folder)
    fix = _fix(kind, folder)
    if not folder.is_dir():
        raise WeightsError(f"the {kind.upper()} weight folder does not exist", path=folder, fix=fix)
    config = folder / "config.json"
    if not config.is_file():
        raise WeightsError("no config.json: not a saved Hugging Face model folder", path=folder, fix=fix)
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise WeightsError(f"config.json is not readable JSON ({exc})", path=config, fix=fix) from None
    if model_type != kind:
        raise WeightsError(
            f"config.json has model_type {model_type!r}, expected {kind!r} (a {kind.upper()} model)",
            path=config,
            fix=fix,
        )
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise WeightsError(f"no weight file ({' or '.join(_WEIGHT_FILES[::2])})", path=folder, fix=fix)
    return folder


def fingerprint(path: str | Path) -> str:
    """A short content hash of a weight file or folder that does not depend on where it lies: each file's relative
    name and size, the full bytes of files up to 4 MiB and the first and last MiB of bigger ones (hidden files are
    skipped). Cheap on multi-GB files, and it changes with any retrained or re-exported weights."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    h = hashlib.sha256()
    chunk = 1 << 20
    for f in files:
        size = f.stat().st_size
        name = f.name if f == path else f.relative_to(path).as_posix()
        h.update(f"{name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 4 * chunk:
                h.update(fh.read())
            else:
                h.update(fh.read(chunk))
                fh.seek(size - chunk)
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def _load(kind: str, folder: Path, what: str, loader):
    try:
        return loader()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise WeightsError(
            f"could not load the {kind.upper()} {what} ({type(exc).__name__}: {exc})",
            path=folder,
            fix=_fix(kind, folder),
        ) from None


@dataclass
class HFBundle:
    """A loaded CLIP or CLAP folder: the model (eval mode) and, when asked for, its tokenizer and processor."""

    kind: str
    folder: Path
    model: Any
    tokenizer: Any = None
    processor: Any = None
    device: str = "cpu"


def load_hf(
    folder: str | Path, kind: str, *, device: str = "cpu", tokenizer: bool = False, processor: bool = False
) -> HFBundle:
    """Load a local CLIP (``kind="clip"``) or CLAP (``"clap"``) folder without touching the network.

    ``processor`` loads the image processor (CLIP) or the audio feature extractor (CLAP)."""
    import transformers

    folder = check_hf_folder(folder, kind)
    model_cls = transformers.CLIPModel if kind == "clip" else transformers.ClapModel
    model = _load(kind, folder, "model", lambda: model_cls.from_pretrained(folder, local_files_only=True))
    model = model.to(device=device, dtype=_torch().float32).eval()
    bundle = HFBundle(kind, folder, model, device=device)
    if tokenizer:
        bundle.tokenizer = _load(
            kind, folder, "tokenizer", lambda: transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        )
    if processor:
        if kind == "clip":
            # transformers 5 without torchvision: the PIL image processor (what the reference's preprocess used);
            # transformers 4: CLIPImageProcessor is the PIL one.
            proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        else:
            proc_cls = transformers.ClapFeatureExtractor
        if not (folder / "preprocessor_config.json").is_file():
            raise WeightsError(
                "no preprocessor_config.json (the image processor / audio feature extractor)",
                path=folder,
                fix=_fix(kind, folder),
            )
        bundle.processor = _load(
            kind, folder, "processor", lambda: proc_cls.from_pretrained(folder, local_files_only=True)
        )
    return bundle


def _torch():
    import torch

    return torch


def features_of(output):
    """The projected embedding from ``get_image/text/audio_features``: a tensor in transformers 4, a ModelOutput
    whose ``pooler_output`` holds the projected features in transformers 5."""
    torch = _torch()
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"unexpected output of a get_*_features call: {type(output).__name__}")


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Float32 rows of unit L2 norm (the norm is computed in float64; a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x.astype(np.float64), axis=axis, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def fit_audio_length(audio: np.ndarray, rate: int, seconds: float = AUDIO_SECONDS) -> np.ndarray:
    """Exactly ``seconds`` of audio, as the reference: zeros appended at the end when shorter, the centre crop
    ``[len//2 - n//2, len//2 - n//2 + n)`` when longer (n = seconds * rate; for the reference's 10 s at 32 kHz this is
    ``[len//2 - 160000, len//2 + 160000)``)."""
    n = int(round(seconds * rate))
    audio = np.asarray(audio, dtype=np.float32)
    if len(audio) < n:
        return np.concatenate([audio, np.zeros(n - len(audio), np.float32)])
    if len(audio) > n:
        start = len(audio) // 2 - n // 2
        return audio[start : start + n]
    return audio


class ClipClapExtractor:
    """``(frames, audio) -> (audio_vec, video_vec)`` for one video.

    * ``frames``: uint8 ``[T, H, W, 3]`` RGB (or one ``[H, W, 3]`` frame); the extractor is asked for the middle frame
      (``frame_pick``), and uses ``frames[T // 2]`` if given more.
    * ``audio``: float32 mono in [-1, 1] at ``audio_rate`` Hz, any length (made exactly 10 s, see ``fit_audio_length``).
    * Returns ``audio_vec`` (D_clap,) float32 and ``video_vec`` (D_clip,) float16, both L2-normalised.

    ``audio_rate`` is the CLAP feature extractor's sampling rate (48000 for the LAION checkpoints; the reference's
    WavCaps CLAP took 32 kHz). See the module docstring for how this differs from the reference."""

    name = "clipclap"
    video_fps = None  # native frame rate: only one frame is used
    frame_size = None  # native size: CLIPImageProcessor resizes and crops
    frame_pick = "middle"

    def __init__(self, clip: HFBundle, clap: HFBundle, compat: str = "fixed"):
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        self.clip = clip
        self.clap = clap
        self.compat = compat
        self.audio_rate = int(clap.processor.sampling_rate)
        expected = int(round(AUDIO_SECONDS * self.audio_rate))
        got = getattr(clap.processor, "nb_max_samples", expected)
        if got != expected:
            raise WeightsError(
                f"the CLAP feature extractor takes {got} samples ({got / self.audio_rate:g} s), the reference's clips "
                f"are {AUDIO_SECONDS:g} s",
                path=clap.folder / "preprocessor_config.json",
                fix='set "max_length_s": 10 in preprocessor_config.json',
            )
        # Which mel path the feature extractor takes must match the model: "fusion" stacks 4 mels (fusion models),
        # "rand_trunc" gives 1 (unfused models). A 10-s clip is never cropped by either.
        self._truncation = "fusion" if getattr(clap.model.config.audio_config, "enable_fusion", False) else "rand_trunc"
        self.audio_dim = int(clap.model.config.projection_dim)
        self.video_dim = int(clip.model.config.projection_dim)

    @classmethod
    def from_weights(cls, weights_dir: str | Path, device: str = "cpu", compat: str = "fixed") -> ClipClapExtractor:
        """Load ``weights_dir/clip/`` and ``weights_dir/clap/`` (saved Hugging Face folders, see the module doc)."""
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        weights_dir = Path(weights_dir)
        clip = load_hf(weights_dir / CLIP_FOLDER, "clip", device=device, processor=True)
        clap = load_hf(weights_dir / CLAP_FOLDER, "clap", device=device, processor=True)
        return cls(clip, clap, compat=compat)

    def spec(self) -> dict:
        """What was extracted, for the root's ``extractor.json``."""
        return {
            "extractor": self.name,
            "compat": self.compat,
            "audio": {
                "dim": self.audio_dim,
                "dtype": "float32",
                "rate": self.audio_rate,
                "seconds": AUDIO_SECONDS,
                "model": self.clap.folder.name,
                "fingerprint": fingerprint(self.clap.folder),
            },
            "video": {
                "dim": self.video_dim,
                "dtype": "float16",
                "frame": self.frame_pick,
                "model": self.clip.folder.name,
                "fingerprint": fingerprint(self.clip.folder),
            },
        }

    # -- the two halves, usable on their own ---------------------------------------------------------------------

    def image_features(self, frame: np.ndarray) -> np.ndarray:
        """(D_clip,) float32, L2-normalised, of one uint8 RGB frame [H, W, 3]."""
        torch = _torch()
        frame = np.asarray(frame)
        if self.compat == "official":
            frame = frame[..., ::-1]  # the reference fed OpenCV's BGR frame as if it were RGB
        frame = np.ascontiguousarray(frame)
        pixels = self.clip.processor(images=frame, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.clip.model.get_image_features(pixel_values=pixels.to(self.clip.device, torch.float32))
        return l2_normalize(features_of(out).float().cpu().numpy()[0])

    def audio_features(self, audio: np.ndarray) -> np.ndarray:
        """(D_clap,) float32, L2-normalised, of mono float audio at ``audio_rate`` (cropped/padded to 10 s)."""
        torch = _torch()
        wave = fit_audio_length(audio, self.audio_rate)
        inputs = self.clap.processor(
            wave, sampling_rate=self.audio_rate, truncation=self._truncation, return_tensors="pt"
        )
        kwargs = {"input_features": inputs["input_features"].to(self.clap.device, torch.float32)}
        if "is_longer" in inputs:
            kwargs["is_longer"] = inputs["is_longer"].to(self.clap.device)
        with torch.inference_mode():
            out = self.clap.model.get_audio_features(**kwargs)
        return l2_normalize(features_of(out).float().cpu().numpy()[0])

    def __call__(self, frames: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise DataError(
                f"expected uint8 RGB frames [T, H, W, 3], got {frames.dtype} {list(frames.shape)}", key="frames"
            )
        if frames.shape[0] == 0:
            raise DataError(
                "no decoded frame: the image feature needs one",
                key="frames",
                fix="check that the video has a readable video stream",
            )
        audio = np.asarray(audio)
        if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
            raise DataError(f"expected mono float audio [samples], got {audio.dtype} {list(audio.shape)}", key="audio")
        video_vec = self.image_features(frames[frames.shape[0] // 2]).astype(np.float16)
        audio_vec = self.audio_features(audio.astype(np.float32, copy=False))
        return audio_vec, video_vec
