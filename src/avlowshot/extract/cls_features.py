"""The "cls" feature extractor of AVCA / TCAF / AV-DIFF: temporal C3D (video, 4096-d) and VGGish (audio, 128-d).

Per video it returns ``(audio [Ta, 128] uint8, video [Tv, 4096] float32)``: one VGGish code per non-overlapping
0.96 s of 16-kHz mono audio (:mod:`avlowshot.extract.vggish`) and one C3D fc7 row per non-overlapping 16-frame clip
of the 25-fps video (:mod:`avlowshot.extract.c3d`), i.e. ``Tv = ceil(n_frames / 16)``. The averaged ("AVCA") features
are the row means; averaging is left to the caller.

Weight files a user must supply, all in one directory (``ClsExtractor.from_weights(weights_dir)``):

``c3d.pickle``
    Sports-1M C3D of DavideA/c3d-pytorch (the download link is in that repository's README), a ``torch.save``-d
    state dict with keys ``conv1 … conv5b, fc6, fc7, fc8`` (``.weight``/``.bias``). Used unchanged.
``pytorch_vggish.pth``
    A PyTorch port of the AudioSet VGGish, a ``torch.save``-d state dict: the tcvrick
    ``audioset-vggish-tensorflow-to-pytorch`` release asset (keys ``features.*``, ``fc.*``), or the harritaylor
    ``torchvggish`` file ``vggish-10086976.pth`` renamed (keys ``features.*``, ``embeddings.*``; renamed on load).
``vggish_pca_params.npz``
    The AudioSet PCA parameters (``https://storage.googleapis.com/audioset/vggish_pca_params.npz``), arrays
    ``pca_eigen_vectors`` [128, 128] and ``pca_means`` [128] (or [128, 1]).

Files are read with ``torch.load(weights_only=True)`` / ``np.load(allow_pickle=False)``; a missing, unreadable or
wrong-architecture file is a :class:`~avlowshot.errors.WeightsError` naming it.

``compat``: ``"official"`` reproduces what the reference scripts fed C3D on UCF and VGGSound (OpenCV BGR frames taken
as RGB, and the float → ``ToPILImage`` wrap that turns pixel ``x`` into ``(256 - x) mod 256``), so features match the
released ones as closely as possible; ``"fixed"`` (default) feeds correct RGB pixels. The reference's ActivityNet
script had the BGR order but not the wrap; that mix is available through :func:`~avlowshot.extract.c3d.c3d_features`
(``bgr=True, negative_wrap=False``). Audio is the same in both modes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from avlowshot.errors import ConfigError, DataError, WeightsError
from avlowshot.extract.c3d import C3D, C3D_WEIGHTS_FIX, C3D_WEIGHTS_NAME, c3d_features, load_c3d
from avlowshot.extract.vggish import (
    VGGISH_PCA_FIX,
    VGGISH_PCA_NAME,
    VGGISH_WEIGHTS_FIX,
    VGGISH_WEIGHTS_NAME,
    VGGish,
    VGGishPCA,
    load_vggish,
    load_vggish_pca,
    vggish_features,
)

COMPAT_MODES = ("fixed", "official")


class ClsExtractor:
    """Callable ``(frames, audio) -> (audio_feats [Ta,128] uint8, video_feats [Tv,4096] float32)``.

    Attributes the decoder reads:

    * ``video_fps = 25.0``: frames must be resampled to 25 fps (the reference converted every video beforehand).
    * ``audio_rate = 16000``: mono float samples in [-1, 1] at 16 kHz.
    * ``frame_size = (171, 128)``: (width, height) the decoder may resize frames to while decoding (saves memory);
      C3D's preprocessing resizes to exactly this size anyway, and passes frames of this size through unchanged.
      Resizing in the decoder uses its own filter, so values can differ slightly from resizing here.
    * ``frame_pick = "all"``: every frame at ``video_fps`` is used (no sub-sampling).
    """

    name = "cls"
    video_fps = 25.0
    audio_rate = 16000
    frame_size = (171, 128)
    frame_pick = "all"

    def __init__(self, c3d: C3D, vggish: VGGish, pca: VGGishPCA, *, compat: str = "fixed", batch: int = 8):
        if compat not in COMPAT_MODES:
            raise ConfigError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        self.c3d = c3d.eval()
        self.vggish = vggish.eval()
        self.pca = pca
        self.compat = compat
        self.batch = batch

    @classmethod
    def from_weights(
        cls, weights_dir: str | Path, *, device: str | torch.device = "cpu", compat: str = "fixed"
    ) -> ClsExtractor:
        """Load ``c3d.pickle``, ``pytorch_vggish.pth`` and ``vggish_pca_params.npz`` from ``weights_dir``."""
        if compat not in COMPAT_MODES:
            raise ConfigError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        weights_dir = Path(weights_dir)
        fixes = {
            C3D_WEIGHTS_NAME: C3D_WEIGHTS_FIX,
            VGGISH_WEIGHTS_NAME: VGGISH_WEIGHTS_FIX,
            VGGISH_PCA_NAME: VGGISH_PCA_FIX,
        }
        names = tuple(fixes)
        missing = [name for name in names if not (weights_dir / name).is_file()]
        if missing:
            raise WeightsError(
                f"missing weight file(s) {', '.join(missing)} in {weights_dir} (the cls extractor needs "
                f"{', '.join(names)})",
                path=weights_dir / missing[0],
                fix="; ".join(fixes[name] for name in missing),
            )
        c3d = load_c3d(weights_dir / C3D_WEIGHTS_NAME, device=device)
        vggish = load_vggish(weights_dir / VGGISH_WEIGHTS_NAME, device=device)
        pca = load_vggish_pca(weights_dir / VGGISH_PCA_NAME)
        return cls(c3d, vggish, pca, compat=compat)

    def __call__(self, frames: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``frames``: uint8 ``[T, H, W, 3]`` RGB at 25 fps (T >= 1); ``audio``: float32 mono ``[S]`` at 16 kHz.

        Returns ``(audio [Ta, 128] uint8, video [Tv, 4096] float32)``. ``Ta`` is 0 when the audio has fewer than
        15 600 samples (0.975 s: 96 STFT frames), including a video without an audio track passed as an empty
        array; deciding what to do with such a video is the caller's business.
        """
        if isinstance(frames, np.ndarray) and frames.ndim >= 1 and frames.shape[0] == 0:
            raise DataError("no video frames", key="frames", fix="check that the file has a decodable video stream")
        official = self.compat == "official"
        video = c3d_features(self.c3d, frames, batch=self.batch, bgr=official, negative_wrap=official)
        audio_feats = vggish_features(self.vggish, self.pca, audio)
        return audio_feats, video
