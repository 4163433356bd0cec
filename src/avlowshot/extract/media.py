"""Video decoding with PyAV: the frames and the audio track of one video, as a backbone needs them.

The references first converted every video to 25 fps with ffmpeg and then read frames with OpenCV, and exported
the audio track with pydub before resampling it. Here one pass of PyAV does both: frames are picked by time stamp
on the target frame grid (what ``ffmpeg -r 25`` does: repeat or drop the frame shown at each grid time), scaled by
libswscale to the size the backbone crops from, and the audio is resampled by libswresample to mono float at the
backbone's rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avlowshot.errors import DataError

VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv")


@dataclass
class Decoded:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB
    audio: np.ndarray  # float32 [n] mono in [-1, 1]
    fps: float  # frames per second of ``frames``
    audio_rate: int
    duration: float  # seconds


def decode(
    path: str | Path,
    *,
    fps: float | None,
    audio_rate: int,
    frame_size: tuple[int, int] | None = None,
    frame_pick: str = "all",
) -> Decoded:
    """Decode ``path``. ``fps=None`` keeps the native frame rate; ``frame_size=(w, h)`` scales each frame;
    ``frame_pick="middle"`` keeps only the middle frame (without holding the others in memory)."""
    import av

    path = Path(path)
    if frame_pick not in ("all", "middle"):
        raise ValueError(f"frame_pick must be 'all' or 'middle', not {frame_pick!r}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError("no video stream", path=path, fix="the layouts need both a video and an audio track")
            if not container.streams.audio:
                raise DataError("no audio stream", path=path, fix="the layouts need both a video and an audio track")
            times, frames = _read_frames(container, frame_size, frame_pick)
        with av.open(str(path)) as container:
            audio = _read_audio(container, audio_rate)
    except DataError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode ({type(exc).__name__}: {exc})", path=path) from None
    if len(frames) == 0:
        raise DataError("no decodable video frame", path=path)
    native_fps = _native_fps(times)
    duration = max(float(times[-1]) + 1.0 / native_fps, len(audio) / audio_rate)
    if frame_pick == "middle":
        return Decoded(frames[None], audio, native_fps, audio_rate, duration)
    stack = np.stack(frames)
    if fps is None:
        return Decoded(stack, audio, native_fps, audio_rate, duration)
    video_duration = float(times[-1]) + 1.0 / native_fps
    n_out = max(1, int(round(video_duration * fps)))
    grid = np.arange(n_out) / fps
    # the frame on screen at each grid time (the first frame for grid times before it)
    pick = np.clip(np.searchsorted(times, grid + 1e-6, side="right") - 1, 0, len(frames) - 1)
    return Decoded(stack[pick], audio, float(fps), audio_rate, duration)


def decode_job(args: tuple[int, Path, dict]) -> tuple[int, Decoded | str]:
    """``(index, path, decode kwargs) -> (index, Decoded or the error text)``: one video for a decoding worker;
    any failure becomes the message that goes to the failure log."""
    index, path, kw = args
    try:
        return index, decode(path, **kw)
    except DataError as exc:
        return index, str(exc)
    except Exception as exc:  # any decoder failure skips the video
        return index, f"{path}: {type(exc).__name__}: {exc}"


def _read_frames(container, frame_size, frame_pick) -> tuple[np.ndarray, list]:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    size = {} if frame_size is None else {"width": frame_size[0], "height": frame_size[1]}
    times, frames = [], []
    if frame_pick == "middle":  # two passes, as the reference: count the decodable frames, then take the middle one
        count = sum(1 for _ in container.decode(stream))
        container.seek(0)
        for i, frame in enumerate(container.decode(stream)):
            times.append(_time(frame, i, stream))
            if i == count // 2:
                return np.asarray(times), frame.to_ndarray(format="rgb24", **size)
        raise DataError("the middle frame did not decode twice the same way", key="video")
    for i, frame in enumerate(container.decode(stream)):
        times.append(_time(frame, i, stream))
        frames.append(frame.to_ndarray(format="rgb24", **size))
    order = np.argsort(np.asarray(times), kind="stable")  # presentation order
    return np.asarray(times)[order], [frames[i] for i in order]


def _time(frame, index: int, stream) -> float:
    if frame.time is not None:
        return float(frame.time)
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    return index / rate


def _native_fps(times: np.ndarray) -> float:
    if len(times) < 2:
        return 25.0
    step = float(np.median(np.diff(times)))
    return 1.0 / step if step > 0 else 25.0


def _read_audio(container, rate: int) -> np.ndarray:
    import av

    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks = []
    for frame in container.decode(stream):
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):  # flush
        chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def write_test_video(
    path: str | Path,
    *,
    seconds: float = 2.0,
    fps: int = 25,
    size: tuple[int, int] = (160, 120),
    tone_hz: float = 440.0,
    colour: tuple[int, int, int] = (200, 40, 40),
    audio_rate: int = 44100,
    with_audio: bool = True,
) -> Path:
    """Write a short H.264/AAC video with a moving coloured square and a sine tone (for tests and demos)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    n_frames = int(round(seconds * fps))
    with av.open(str(path), mode="w") as out:
        vstream = out.add_stream("libx264" if path.suffix != ".avi" else "mpeg4", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = w, h, "yuv420p"
        astream = out.add_stream("aac", rate=audio_rate, layout="mono") if with_audio else None
        for i in range(n_frames):
            img = np.full((h, w, 3), 16, dtype=np.uint8)
            x = int((w - 32) * i / max(1, n_frames - 1))
            img[h // 2 - 16 : h // 2 + 16, x : x + 32] = colour
            for packet in vstream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in vstream.encode(None):
            out.mux(packet)
        if astream is not None:
            t = np.arange(int(seconds * audio_rate)) / audio_rate
            wave = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            step = 1024
            for start in range(0, len(wave), step):
                frame = av.AudioFrame.from_ndarray(wave[None, start : start + step], format="fltp", layout="mono")
                frame.sample_rate = audio_rate
                frame.pts = start
                for packet in astream.encode(frame):
                    out.mux(packet)
            for packet in astream.encode(None):
                out.mux(packet)
    return path
