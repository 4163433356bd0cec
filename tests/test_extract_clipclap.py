"""ClipClap video-level features (CLIP middle frame + CLAP 10-s audio) on tiny random Hugging Face folders."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from avlowshot.errors import DataError, WeightsError  # noqa: E402
from avlowshot.extract.clipclap_features import (  # noqa: E402
    ClipClapExtractor,
    features_of,
    fit_audio_length,
    load_hf,
)
from hf_tiny import CLAP_DIM, CLIP_DIM, make_tiny_weights  # noqa: E402

RATE = 48000


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("w"))


@pytest.fixture(scope="module")
def ex(weights):
    torch.set_num_threads(1)
    return ClipClapExtractor.from_weights(weights)


def _frame(seed=0, h=90, w=120):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _audio(n, seed=0):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, n).astype(np.float32)


def test_attributes(ex):
    assert ex.name == "clipclap"
    assert ex.video_fps is None and ex.frame_size is None and ex.frame_pick == "middle"
    assert ex.audio_rate == RATE  # the stock ClapFeatureExtractor (LAION CLAP); the reference's WavCaps took 32 kHz
    assert ex.compat == "fixed"
    assert (ex.audio_dim, ex.video_dim) == (CLAP_DIM, CLIP_DIM)


def test_outputs_dims_dtypes_norms_deterministic(ex):
    frames, audio = _frame()[None], _audio(3 * RATE)
    a, v = ex(frames, audio)
    assert a.shape == (CLAP_DIM,) and a.dtype == np.float32
    assert v.shape == (CLIP_DIM,) and v.dtype == np.float16
    assert np.linalg.norm(a) == pytest.approx(1, abs=1e-5)
    assert np.linalg.norm(v.astype(np.float32)) == pytest.approx(1, abs=2e-3)
    a2, v2 = ex(frames, audio)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(v, v2)
    # a different frame / clip gives a different vector
    a3, v3 = ex(_frame(1)[None], _audio(3 * RATE, seed=1))
    assert not np.allclose(a, a3) and not np.allclose(v, v3)


def test_image_path_matches_direct_computation(ex):
    frame = _frame(2)
    pixels = ex.clip.processor(images=frame, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 224, 224)
    with torch.inference_mode():
        direct = features_of(ex.clip.model.get_image_features(pixel_values=pixels))[0].numpy()
    direct = direct / np.linalg.norm(direct)
    _, v = ex(frame[None], _audio(RATE))
    np.testing.assert_allclose(v.astype(np.float32), direct, atol=2e-3)


def test_audio_path_matches_direct_computation(ex):
    wave = _audio(10 * RATE, seed=3)
    inputs = ex.clap.processor(wave, sampling_rate=RATE, truncation="rand_trunc", return_tensors="pt")
    with torch.inference_mode():
        direct = features_of(ex.clap.model.get_audio_features(input_features=inputs["input_features"]))[0].numpy()
    direct = direct / np.linalg.norm(direct)
    np.testing.assert_allclose(ex.audio_features(wave), direct, atol=1e-6)


def test_features_of_accepts_tensor_and_model_output():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = torch.ones(2, 3)
    assert features_of(t) is t
    assert features_of(BaseModelOutputWithPooling(pooler_output=t)) is t
    with pytest.raises(TypeError):
        features_of(object())


def test_fit_audio_length_reference_rule():
    # the reference: 10 s at 32 kHz = 320,000 samples; centre crop [len//2 - 160000, len//2 + 160000)
    n, rate = 320_000, 32_000
    x = np.arange(400_001, dtype=np.float32)
    out = fit_audio_length(x, rate)
    assert len(out) == n and out[0] == 400_001 // 2 - 160_000 and out[-1] == 400_001 // 2 + 160_000 - 1
    short = np.ones(1000, np.float32)
    out = fit_audio_length(short, rate)
    assert len(out) == n and out[:1000].sum() == 1000 and not out[1000:].any()  # zeros appended at the end
    exact = np.arange(n, dtype=np.float32)
    np.testing.assert_array_equal(fit_audio_length(exact, rate), exact)
    assert len(fit_audio_length(np.zeros(0, np.float32), rate)) == n


def test_extractor_crops_and_pads_to_10_s(ex):
    frame = _frame()[None]
    long = _audio(13 * RATE + 7, seed=4)
    start = len(long) // 2 - 5 * RATE
    a_long, _ = ex(frame, long)
    np.testing.assert_allclose(a_long, ex.audio_features(long[start : start + 10 * RATE]), atol=1e-6)
    assert not np.allclose(a_long, ex.audio_features(long[: 10 * RATE]), atol=1e-4)
    short = _audio(4 * RATE, seed=5)
    padded = np.concatenate([short, np.zeros(6 * RATE, np.float32)])
    a_short, _ = ex(frame, short)
    np.testing.assert_allclose(a_short, ex.audio_features(padded), atol=1e-6)


def test_middle_frame_and_compat_official_swaps_red_blue(weights, ex):
    frames = np.stack([_frame(10), _frame(11), _frame(12)])
    audio = _audio(RATE)
    _, v3 = ex(frames, audio)
    _, v1 = ex(frames[1], audio)  # a single [H, W, 3] frame is accepted too
    np.testing.assert_array_equal(v3, v1)
    official = ClipClapExtractor(ex.clip, ex.clap, compat="official")
    _, v_off = official(frames[1:2], audio)
    _, v_swapped = ex(frames[1:2, :, :, ::-1], audio)
    np.testing.assert_array_equal(v_off, v_swapped)
    assert not np.allclose(v_off.astype(np.float32), v1.astype(np.float32), atol=1e-3)
    with pytest.raises(ValueError, match="compat"):
        ClipClapExtractor.from_weights(weights, compat="bgr")


def test_bad_inputs_are_data_errors(ex):
    with pytest.raises(DataError, match="no decoded frame"):
        ex(np.zeros((0, 8, 8, 3), np.uint8), _audio(RATE))
    with pytest.raises(DataError, match="uint8"):
        ex(np.zeros((1, 8, 8, 3), np.float32), _audio(RATE))
    with pytest.raises(DataError, match="mono"):
        ex(_frame()[None], np.zeros((2, RATE), np.float32))


def test_missing_or_wrong_weights(tmp_path, weights):
    with pytest.raises(WeightsError) as err:
        ClipClapExtractor.from_weights(tmp_path)
    assert str(tmp_path / "clip") in str(err.value) and "CLIPModel" in str(err.value)
    shutil.copytree(weights / "clip", tmp_path / "clip")
    with pytest.raises(WeightsError) as err:
        ClipClapExtractor.from_weights(tmp_path)
    assert str(tmp_path / "clap") in str(err.value) and "laion/clap-htsat-unfused" in str(err.value)
    shutil.copytree(weights / "clip", tmp_path / "clap")  # a CLIP folder where the CLAP one belongs
    with pytest.raises(WeightsError, match="model_type 'clip', expected 'clap'"):
        ClipClapExtractor.from_weights(tmp_path)
    shutil.rmtree(tmp_path / "clap")
    shutil.copytree(weights / "clap", tmp_path / "clap")
    (tmp_path / "clap" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no weight file"):
        load_hf(tmp_path / "clap", "clap")
    (tmp_path / "clip" / "preprocessor_config.json").unlink()
    with pytest.raises(WeightsError, match="preprocessor_config.json"):
        load_hf(tmp_path / "clip", "clip", processor=True)


def test_clap_clip_length_must_be_10_s(tmp_path, weights):
    shutil.copytree(weights, tmp_path / "w")
    cfg_file = tmp_path / "w" / "clap" / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(max_length_s=5, nb_max_samples=5 * RATE)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="max_length_s"):
        ClipClapExtractor.from_weights(tmp_path / "w")


def test_spec(ex, weights):
    spec = ex.spec()
    assert spec["audio"]["dim"] == CLAP_DIM and spec["audio"]["dtype"] == "float32"
    assert spec["video"]["dim"] == CLIP_DIM and spec["video"]["dtype"] == "float16"
    assert spec["audio"]["rate"] == RATE and spec["compat"] == "fixed"
    json.dumps(spec)
