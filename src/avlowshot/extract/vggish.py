"""VGGish (AudioSet) audio backbone of the "cls" features: log-mel front end, model, loaders, PCA post-processing.

Reference: AVCA / TCAF ``cls_feature_extraction`` with a PyTorch port of the AudioSet VGGish (spec ``avca.md``
§7.2, ``tcaf.md`` §7.1). A 16-kHz mono waveform is cut into non-overlapping 0.96-s log-mel examples ``[96, 64]``,
each goes through VGGish to a 128-d embedding, and the AudioSet PCA + 8-bit quantisation turns it into uint8 codes:
``[Ta, 128]`` uint8 with ``Ta = 1 + (n_frames - 96) // 96`` (about ``floor(duration / 0.96)``).

Weights:

* ``pytorch_vggish.pth``: a ``torch.save``-d state dict of the tcvrick port (``audioset-vggish-tensorflow-to-pytorch``,
  release asset), keys ``features.{0,3,6,8,11,13}.{weight,bias}`` and ``fc.{0,2,4}.{weight,bias}``. The
  harritaylor/torchvggish file (``vggish-10086976.pth``) has the same tensors under ``embeddings.{0,2,4}.*`` instead
  of ``fc.{0,2,4}.*``; :func:`load_vggish` renames that one prefix (see ``KEY_RENAMES``) and nothing else, so either
  file can be saved as ``pytorch_vggish.pth``. Both ports flatten the last conv map in TF's NHWC order, as here.
* ``vggish_pca_params.npz``: the AudioSet release's PCA parameters (``storage.googleapis.com/audioset/
  vggish_pca_params.npz``), arrays ``pca_eigen_vectors`` ``[128, 128]`` and ``pca_means`` ``[128]`` or ``[128, 1]``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avlowshot.errors import DataError, WeightsError
from avlowshot.extract.weights import load_checked, read_state_dict, state_width

VGGISH_WEIGHTS_NAME = "pytorch_vggish.pth"
VGGISH_PCA_NAME = "vggish_pca_params.npz"
VGGISH_WEIGHTS_FIX = (
    "download 'pytorch_vggish.pth' from the releases of tcvrick/audioset-vggish-tensorflow-to-pytorch (or save the "
    "harritaylor/torchvggish 'vggish-10086976.pth' under that name) into the weights directory"
)
VGGISH_PCA_FIX = (
    "download 'vggish_pca_params.npz' from the AudioSet VGGish release "
    "(https://storage.googleapis.com/audioset/vggish_pca_params.npz) into the weights directory"
)

# Log-mel front end (AudioSet vggish_params / mel_features).
SAMPLE_RATE = 16000
STFT_WINDOW = 400  # 25 ms
STFT_HOP = 160  # 10 ms
FFT_LENGTH = 512  # next power of two >= 400
NUM_MEL_BINS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s of 10-ms frames
EXAMPLE_HOP = 96  # non-overlapping examples
EMBEDDING_SIZE = 128
QUANTIZE_MIN = -2.0
QUANTIZE_MAX = 2.0

# Port key prefixes renamed on load: harritaylor/torchvggish -> tcvrick (this module's names).
KEY_RENAMES = {"embeddings.": "fc."}


# --------------------------------------------------------------------------------------------------------------------
# log-mel front end


def hertz_to_mel(hertz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log(1.0 + np.asarray(hertz, dtype=np.float64) / 700.0)


def mel_matrix(
    num_spectrogram_bins: int = FFT_LENGTH // 2 + 1,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = NUM_MEL_BINS,
    lower_hz: float = MEL_MIN_HZ,
    upper_hz: float = MEL_MAX_HZ,
) -> np.ndarray:
    """``[num_spectrogram_bins, num_mel_bins]`` float64 weights, built like AudioSet ``spectrogram_to_mel_matrix``.

    Band ``i`` is a triangle *in mel space* from edge ``i`` over centre ``i+1`` to edge ``i+2`` of
    ``num_mel_bins + 2`` edges spaced evenly in mel between ``lower_hz`` and ``upper_hz``; the spectrogram bins sit
    at ``linspace(0, sample_rate / 2, num_spectrogram_bins)`` Hz. The DC bin gets weight 0 (HTK).
    """
    bins_mel = hertz_to_mel(np.linspace(0.0, sample_rate / 2.0, num_spectrogram_bins))[:, None]
    edges = np.linspace(hertz_to_mel(lower_hz), hertz_to_mel(upper_hz), num_mel_bins + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel - lower) / (center - lower)
    falling = (upper - bins_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


def periodic_hann(length: int) -> np.ndarray:
    """Periodic Hann window ``0.5 - 0.5 cos(2 pi n / length)`` (not the symmetric one of ``np.hanning``)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi / length * np.arange(length))


def _check_waveform(waveform: np.ndarray) -> np.ndarray:
    if not isinstance(waveform, np.ndarray) or waveform.ndim != 1 or not np.issubdtype(waveform.dtype, np.floating):
        got = f"{waveform.dtype} {waveform.shape}" if isinstance(waveform, np.ndarray) else type(waveform).__name__
        raise DataError(
            f"audio must be a 1-D float array (mono, {SAMPLE_RATE} Hz, range [-1, 1]), got {got}",
            key="audio",
            fix="decode the audio track to float samples, average the channels to mono and resample to 16 kHz",
        )
    if not np.all(np.isfinite(waveform)):
        raise DataError(
            "audio has NaN or infinite samples",
            key="audio",
            fix="check the decoder output; re-encode the file if it is damaged",
        )
    return waveform.astype(np.float64, copy=False)


def log_mel_examples(waveform: np.ndarray) -> np.ndarray:
    """Log-mel examples ``[N, 96, 64]`` float32 of a mono 16-kHz waveform, as AudioSet ``waveform_to_examples``.

    STFT frames of 400 samples every 160 without centre padding (``n_frames = 1 + (len - 400) // 160``), periodic
    Hann window, ``|rfft|`` with 512 points, :func:`mel_matrix`, ``log(mel + 0.01)``; then non-overlapping examples of
    96 frames: ``N = 1 + (n_frames - 96) // 96``, and ``N = 0`` (an empty ``[0, 96, 64]`` array) for clips with
    fewer than 96 frames, i.e. under 15 600 samples (0.975 s). Computed in float64 like the reference (where the
    samples are int16 / 32768, a float64 array).
    """
    x = _check_waveform(waveform)
    n_frames = 1 + (x.shape[0] - STFT_WINDOW) // STFT_HOP if x.shape[0] >= STFT_WINDOW else 0
    n_examples = 1 + (n_frames - EXAMPLE_FRAMES) // EXAMPLE_HOP if n_frames >= EXAMPLE_FRAMES else 0
    if n_examples == 0:
        return np.zeros((0, EXAMPLE_FRAMES, NUM_MEL_BINS), dtype=np.float32)
    # Only the frames that end up in an example are computed (the framing drops the rest anyway).
    n_used = (n_examples - 1) * EXAMPLE_HOP + EXAMPLE_FRAMES
    frames = np.lib.stride_tricks.sliding_window_view(x, STFT_WINDOW)[::STFT_HOP][:n_used]
    window = periodic_hann(STFT_WINDOW)
    weights = mel_matrix()
    log_mel = np.empty((n_used, NUM_MEL_BINS), dtype=np.float64)
    block = 8192  # frames per rfft call: bounds the complex spectrum to ~34 MB on long recordings
    for start in range(0, n_used, block):
        spectrum = np.abs(np.fft.rfft(frames[start : start + block] * window, n=FFT_LENGTH))
        log_mel[start : start + block] = np.log(spectrum @ weights + LOG_OFFSET)
    starts = np.arange(n_examples) * EXAMPLE_HOP
    examples = log_mel[starts[:, None] + np.arange(EXAMPLE_FRAMES)[None, :]]
    return examples.astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# model


class VGGish(nn.Module):
    """VGGish with the tcvrick port's module names; input ``[N, 1, 96, 64]`` log-mel, output ``[N, 128]`` (post-ReLU).

    ``features``: conv3×3 64 → ReLU → maxpool 2 → 128 → ReLU → pool → 256 → ReLU → 256 → ReLU → pool → 512 → ReLU →
    512 → ReLU → pool, giving ``[N, 512, 6, 4]``; that map is flattened in **NHWC** order (``permute(0, 2, 3, 1)``,
    as both PyTorch ports do, matching the TF model) to 12288; ``fc``: 12288 → 4096 → 4096 → 128 with a ReLU after
    every layer including the last.

    ``width`` scales the conv channels by ``width / 64`` and the two hidden fc sizes to ``64 * width``; the embedding
    stays 128-d so the AudioSet PCA applies. It exists for small test models only; the real model is ``width=64``.
    """

    def __init__(self, width: int = 64):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.width = width
        plan = [width, "M", 2 * width, "M", 4 * width, 4 * width, "M", 8 * width, 8 * width, "M"]
        layers: list[nn.Module] = []
        cin = 1
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, int(item), kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True)]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        hidden = 64 * width
        self.flat_dim = cin * (EXAMPLE_FRAMES // 16) * (NUM_MEL_BINS // 16)
        self.fc = nn.Sequential(
            nn.Linear(self.flat_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, EMBEDDING_SIZE),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).permute(0, 2, 3, 1).reshape(x.shape[0], self.flat_dim)
        return self.fc(h)


def load_vggish(path: str | Path, device: str | torch.device = "cpu", *, width: int | None = None) -> VGGish:
    """Build :class:`VGGish` and load ``path`` (``pytorch_vggish.pth``) strictly; returns it in eval mode.

    Keys of the harritaylor port (``embeddings.*``) are renamed to ``fc.*`` (``KEY_RENAMES``); any other mismatch
    of keys or shapes is a :class:`WeightsError` naming the file.
    """
    state = read_state_dict(path, expected_name=VGGISH_WEIGHTS_NAME, fix=VGGISH_WEIGHTS_FIX, map_location="cpu")
    renamed = {}
    for key, value in state.items():
        for old, new in KEY_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        renamed[key] = value
    width = width or state_width(renamed, "features.0.weight")  # None: read off the file, as load_c3d
    model = VGGish(width=width)
    load_checked(model, renamed, path=path, what=f"VGGish (width {width})", fix=VGGISH_WEIGHTS_FIX)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------------------------
# PCA post-processing


@dataclass(frozen=True)
class VGGishPCA:
    """AudioSet PCA parameters: ``eigen_vectors`` ``[D, D]`` and ``means`` ``[D, 1]`` (D = 128 for the real file)."""

    eigen_vectors: np.ndarray
    means: np.ndarray


def load_vggish_pca(path: str | Path) -> VGGishPCA:
    """Read ``vggish_pca_params.npz`` (``pca_eigen_vectors`` [128,128], ``pca_means`` [128] or [128,1]).

    The arrays keep their stored dtype (float64 in the AudioSet file) so :func:`postprocess` does the reference's
    arithmetic. Missing file, unreadable file, missing keys or wrong shapes raise :class:`WeightsError`.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"PCA parameter file not found (expected the file '{VGGISH_PCA_NAME}')", path=path, fix=VGGISH_PCA_FIX
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsError(
            f"cannot read the file as a NumPy .npz archive (expected '{VGGISH_PCA_NAME}'): {exc}",
            path=path,
            fix=VGGISH_PCA_FIX,
        ) from exc
    missing = [k for k in ("pca_eigen_vectors", "pca_means") if k not in arrays]
    if missing:
        raise WeightsError(
            f"missing arrays {missing}; the file has {sorted(arrays)} (expected '{VGGISH_PCA_NAME}')",
            path=path,
            fix=VGGISH_PCA_FIX,
        )
    vectors, means = arrays["pca_eigen_vectors"], arrays["pca_means"]
    d = EMBEDDING_SIZE
    ok = (
        vectors.shape == (d, d)
        and means.shape in ((d,), (d, 1))
        and np.issubdtype(vectors.dtype, np.floating)
        and np.issubdtype(means.dtype, np.floating)
    )
    if not ok:
        raise WeightsError(
            f"pca_eigen_vectors {vectors.dtype} {vectors.shape} / pca_means {means.dtype} {means.shape}; expected "
            f"float [{d}, {d}] and float [{d}] or [{d}, 1]",
            path=path,
            fix=VGGISH_PCA_FIX,
        )
    return VGGishPCA(eigen_vectors=vectors, means=means.reshape(-1, 1))


def postprocess(embeddings: np.ndarray, pca: VGGishPCA) -> np.ndarray:
    """AudioSet ``Postprocessor.postprocess``: ``uint8`` codes ``[N, D]`` of raw embeddings ``[N, D]``.

    ``pca_applied = (eigen_vectors @ (x.T - means)).T``, clipped to [-2, 2], then ``(c + 2) * (255 / 4)`` cast to
    uint8 (truncation, not rounding, as in AudioSet; the harritaylor port rounds instead).
    """
    x = np.asarray(embeddings)
    d = pca.eigen_vectors.shape[0]
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"embeddings must be [N, {d}], got {x.shape}")
    pca_applied = (pca.eigen_vectors @ (x.T - pca.means)).T
    clipped = np.clip(pca_applied, QUANTIZE_MIN, QUANTIZE_MAX)
    quantized = (clipped - QUANTIZE_MIN) * (255.0 / (QUANTIZE_MAX - QUANTIZE_MIN))
    return quantized.astype(np.uint8)


def vggish_features(model: VGGish, pca: VGGishPCA, waveform_16k: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """uint8 VGGish codes ``[Ta, 128]`` of a mono 16-kHz float waveform (``Ta = 0`` under 15 600 samples).

    Runs :func:`log_mel_examples`, the model on its device under ``torch.inference_mode`` (``batch`` examples at a
    time), then :func:`postprocess`.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    examples = log_mel_examples(waveform_16k)
    if examples.shape[0] == 0:
        return np.zeros((0, pca.eigen_vectors.shape[0]), dtype=np.uint8)
    device = next(model.parameters()).device
    rows = []
    with torch.inference_mode():
        for start in range(0, examples.shape[0], batch):
            x = torch.from_numpy(examples[start : start + batch]).unsqueeze(1).to(device)
            rows.append(model(x).float().cpu().numpy())
    return postprocess(np.concatenate(rows, axis=0), pca)
