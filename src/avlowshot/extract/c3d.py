"""C3D (Sports-1M) video backbone of the "cls" features: model, weight loader, clip builder, feature extractor.

Reference: AVCA / TCAF ``cls_feature_extraction/get_features_*.py`` with the DavideA ``c3d-pytorch`` port (spec
``avca.md`` §7.1, ``tcaf.md`` §7.1). The features are **fc7 after ReLU** (4096-d) of every non-overlapping 16-frame
clip of a 25-fps video, so a video of ``T`` frames gives ``ceil(T / 16)`` rows, one per 0.64 s.

Weights: ``c3d.pickle`` from DavideA/c3d-pytorch (the Sports-1M C3D converted from Caffe), a ``torch.save``-d state
dict with the keys ``conv1, conv2, conv3a, conv3b, conv4a, conv4b, conv5a, conv5b, fc6, fc7, fc8`` (each ``.weight``
and ``.bias``); fc8 (487 Sports-1M classes) is never used but kept so the file loads with strict key checking.

This module also holds the two state-dict helpers :func:`read_state_dict` and :func:`load_checked` that the VGGish
loader uses too.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avlowshot.errors import DataError
from avlowshot.extract.weights import load_checked, read_state_dict, state_width

C3D_WEIGHTS_NAME = "c3d.pickle"
C3D_MEAN = (0.43216, 0.394666, 0.37645)
C3D_STD = (0.22803, 0.22145, 0.216989)
RESIZE_HW = (128, 171)  # torchvision Resize((128, 171)): height 128, width 171
CROP = 112
CLIP_LEN = 16
C3D_WEIGHTS_FIX = (
    "download the Sports-1M C3D weights 'c3d.pickle' of DavideA/c3d-pytorch (linked from its README) and put the file, "
    "unchanged, in the weights directory"
)


# --------------------------------------------------------------------------------------------------------------------
# state-dict helpers (shared with vggish.py)


# --------------------------------------------------------------------------------------------------------------------
# model


class C3D(nn.Module):
    """Sports-1M C3D with the DavideA ``c3d-pytorch`` module names; ``forward`` returns fc7 after ReLU.

    Input ``[N, 3, 16, 112, 112]`` (normalised RGB, see :func:`c3d_clips`). Shapes with the default ``width=64``:
    conv1 64 → pool1 (1,2,2) → conv2 128 → pool2 → conv3a/b 256 → pool3 → conv4a/b 512 → pool4 → conv5a/b 512 →
    pool5 (2,2,2) with padding (0,1,1) → ``[N, 512, 1, 4, 4]`` → flatten 8192 → fc6 4096 + ReLU (+ dropout 0.5) →
    fc7 4096 + ReLU (+ dropout 0.5). fc8 (4096 → 487) exists only so the real checkpoint loads; it is not applied.

    ``width`` scales every channel count by ``width / 64`` and the fc sizes to ``64 * width`` (so ``width=4`` gives
    conv channels 4..32, flatten 512 and a 256-d output). It exists for small test models only; the real backbone is
    ``width=64``.
    """

    def __init__(self, width: int = 64, n_classes: int = 487, dropout: float = 0.5):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        c1, c2, c3, c4 = width, 2 * width, 4 * width, 8 * width
        self.width = width
        self.out_dim = 64 * width
        self.flat_dim = c4 * 4 * 4

        def conv(cin: int, cout: int) -> nn.Conv3d:
            return nn.Conv3d(cin, cout, kernel_size=(3, 3, 3), padding=(1, 1, 1))

        self.conv1 = conv(3, c1)
        self.pool1 = nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.conv2 = conv(c1, c2)
        self.pool2 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.conv3a = conv(c2, c3)
        self.conv3b = conv(c3, c3)
        self.pool3 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.conv4a = conv(c3, c4)
        self.conv4b = conv(c4, c4)
        self.pool4 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.conv5a = conv(c4, c4)
        self.conv5b = conv(c4, c4)
        self.pool5 = nn.MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2), padding=(0, 1, 1))
        self.fc6 = nn.Linear(self.flat_dim, self.out_dim)
        self.fc7 = nn.Linear(self.out_dim, self.out_dim)
        self.fc8 = nn.Linear(self.out_dim, n_classes)
        self.dropout = nn.Dropout(p=dropout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool1(self.relu(self.conv1(x)))
        h = self.pool2(self.relu(self.conv2(h)))
        h = self.relu(self.conv3a(h))
        h = self.pool3(self.relu(self.conv3b(h)))
        h = self.relu(self.conv4a(h))
        h = self.pool4(self.relu(self.conv4b(h)))
        h = self.relu(self.conv5a(h))
        h = self.pool5(self.relu(self.conv5b(h)))
        h = h.reshape(h.shape[0], self.flat_dim)
        h = self.dropout(self.relu(self.fc6(h)))
        return self.dropout(self.relu(self.fc7(h)))


def load_c3d(path: str | Path, device: str | torch.device = "cpu", *, width: int | None = None) -> C3D:
    """Build :class:`C3D` and load ``path`` (``c3d.pickle``) with strict key and shape checks; returns it in eval mode.
    ``width=None`` reads it off the file (conv1's output channels: 64 for the real model; the tests save small ones).

    Raises :class:`WeightsError` naming the file when it is missing, unreadable, or of another architecture.
    """
    state = read_state_dict(path, expected_name=C3D_WEIGHTS_NAME, fix=C3D_WEIGHTS_FIX, map_location="cpu")
    width = width or state_width(state, "conv1.weight")
    model = C3D(width=width)
    load_checked(model, state, path=path, what=f"C3D (width {width})", fix=C3D_WEIGHTS_FIX)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------------------------
# preprocessing


def _check_frames(frames: np.ndarray) -> None:
    bad = not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4
    if bad or frames.shape[-1] != 3 or min(frames.shape[1:3]) < 1:
        got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise DataError(
            f"video frames must be a uint8 array [T, H, W, 3] (RGB), got {got}",
            key="frames",
            fix="decode the video to RGB uint8 frames (e.g. PyAV frame.to_ndarray(format='rgb24')) and stack them",
        )


def c3d_clips(
    frames: np.ndarray, *, bgr: bool = False, negative_wrap: bool = False, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Turn uint8 RGB frames ``[T, H, W, 3]`` (at 25 fps) into C3D input clips ``[ceil(T/16), 3, 16, 112, 112]``.

    Per frame, as the reference's ``ToPILImage → Resize((128,171)) → CenterCrop(112) → ToTensor → Normalize``:

    * resize to height 128, width 171 with ``F.interpolate(mode="bilinear", antialias=True)`` on the whole batch,
      rounded and clamped to 0..255 like PIL's uint8 output. This **approximates** PIL's bilinear resize (the same
      triangle filter widened when downscaling): against Pillow 13 it differs by at most one grey level, on a few
      percent of the pixels (see the tests). Frames already 128×171 are passed through unchanged;
    * centre crop 112×112 at top ``round((128-112)/2) = 8``, left ``round((171-112)/2) = 30`` (torchvision's rule);
    * ``/255``, then normalise with mean ``C3D_MEAN`` and std ``C3D_STD``.

    Clips are non-overlapping 16-frame windows from frame 0; the last partial clip is filled with zeros in the
    normalised space (the reference's zero padding), so there are ``ceil(T/16)`` clips (0 for ``T = 0``).

    ``bgr=True`` reverses the channel order first: the reference read frames with OpenCV (BGR) and never converted
    them. ``negative_wrap=True`` reproduces the UCF/VGGSound scripts' float tensor → ``ToPILImage`` overflow: pixel
    ``x`` becomes ``(256 - x) mod 256`` (0 stays 0). Both act per pixel before the resize, as in the reference.

    The work is done on ``device`` (the uint8 frames are moved there first) and the clips are returned there.
    """
    _check_frames(frames)
    t = int(frames.shape[0])
    n_clips = math.ceil(t / CLIP_LEN)
    out = torch.zeros((n_clips * CLIP_LEN, 3, CROP, CROP), dtype=torch.float32, device=device)
    if t == 0:
        return out.reshape(0, 3, CLIP_LEN, CROP, CROP)
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    if negative_wrap:
        x = (-x.to(torch.int16)).remainder(256).to(torch.uint8)
    if bgr:
        x = x.flip(-1)
    x = x.permute(0, 3, 1, 2).to(torch.float32)  # [T, 3, H, W], 0..255
    if tuple(x.shape[-2:]) != RESIZE_HW:
        x = F.interpolate(x, size=RESIZE_HW, mode="bilinear", align_corners=False, antialias=True)
        x = x.round_().clamp_(0.0, 255.0)
    top = int(round((RESIZE_HW[0] - CROP) / 2.0))
    left = int(round((RESIZE_HW[1] - CROP) / 2.0))
    x = x[:, :, top : top + CROP, left : left + CROP]
    mean = torch.tensor(C3D_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(C3D_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    out[:t] = (x / 255.0 - mean) / std
    return out.reshape(n_clips, CLIP_LEN, 3, CROP, CROP).permute(0, 2, 1, 3, 4).contiguous()


def c3d_features(
    model: C3D, frames: np.ndarray, *, batch: int = 8, bgr: bool = False, negative_wrap: bool = False
) -> np.ndarray:
    """fc7 features ``[ceil(T/16), model.out_dim]`` float32 (4096-d for the real model) of uint8 RGB frames at 25 fps.

    Frames are preprocessed ``batch`` clips at a time (so memory stays bounded on long videos), on the model's
    device, and run there under ``torch.inference_mode`` in eval mode (dropout off); the model's mode is restored after.
    """
    _check_frames(frames)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = next(model.parameters()).device
    t = int(frames.shape[0])
    rows: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            step = batch * CLIP_LEN
            for start in range(0, t, step):
                clips = c3d_clips(frames[start : start + step], bgr=bgr, negative_wrap=negative_wrap, device=device)
                rows.append(model(clips).float().cpu().numpy())
    finally:
        model.train(was_training)
    if not rows:
        return np.zeros((0, model.out_dim), dtype=np.float32)
    return np.concatenate(rows, axis=0).astype(np.float32, copy=False)
