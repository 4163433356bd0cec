"""The "cls" extractor: C3D clips and features, VGGish log-mel / model / PCA codes, weight loading and its errors.

Models are small-width random variants (``width=4`` C3D: 256-d fc7; ``width=2`` VGGish: 128-d output) saved with
``torch.save(state_dict)`` and read back through the real loaders; the real sizes are only built on ``meta``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avlowshot.errors import ConfigError, DataError, WeightsError
from avlowshot.extract.c3d import C3D, C3D_MEAN, C3D_STD, c3d_clips, c3d_features, load_c3d
from avlowshot.extract.cls_features import ClsExtractor
from avlowshot.extract.vggish import (
    VGGish,
    VGGishPCA,
    load_vggish,
    load_vggish_pca,
    log_mel_examples,
    postprocess,
    vggish_features,
)

C3D_W, VGG_W = 4, 2
C3D_DIM = 64 * C3D_W  # fc7 of the width-4 C3D


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """A weights dir with small random C3D / VGGish state dicts and a PCA npz (identity, zero means)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("cls_weights")
    torch.save(C3D(width=C3D_W).state_dict(), root / "c3d.pickle")
    torch.save(VGGish(width=VGG_W).state_dict(), root / "pytorch_vggish.pth")
    np.savez(root / "vggish_pca_params.npz", pca_eigen_vectors=np.eye(128), pca_means=np.zeros(128))
    return root


def _rgb(t: int, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def _normalised(rgb) -> np.ndarray:
    return (np.asarray(rgb, np.float32) / 255.0 - np.asarray(C3D_MEAN, np.float32)) / np.asarray(C3D_STD, np.float32)


# ------------------------------------------------------------------------------------------------------------ C3D


def test_c3d_weights_roundtrip_and_feature_shapes(small_weights, tmp_path):
    model = load_c3d(small_weights / "c3d.pickle", width=C3D_W)
    assert not model.training
    # the 2017 c3d.pickle predates the zip format: the legacy format loads too (weights_only=True)
    torch.save(model.state_dict(), tmp_path / "c3d.pickle", _use_new_zipfile_serialization=False)
    legacy = load_c3d(tmp_path / "c3d.pickle", width=C3D_W)
    assert all(torch.equal(legacy.state_dict()[k], v) for k, v in model.state_dict().items())
    frames = _rgb(37)
    feats = c3d_features(model, frames)
    assert feats.shape == (3, C3D_DIM) and feats.dtype == np.float32  # ceil(37/16) = 3
    assert np.isfinite(feats).all() and (feats >= 0).all()  # fc7 after ReLU
    with torch.inference_mode():
        direct = model(c3d_clips(frames)).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-6)
    # batching by whole clips changes nothing
    np.testing.assert_allclose(c3d_features(model, frames, batch=1), feats, rtol=1e-5, atol=1e-6)
    assert c3d_features(model, frames[:0]).shape == (0, C3D_DIM)


@pytest.mark.parametrize("t", [1, 15, 16, 17, 32, 33])
def test_c3d_clip_count_is_ceil_t_over_16(t):
    clips = c3d_clips(_rgb(t, 8, 10))
    assert clips.shape == (math.ceil(t / 16), 3, 16, 112, 112) and clips.dtype == torch.float32


def test_c3d_last_clip_zero_filled_in_normalised_space():
    clips = c3d_clips(_rgb(17, 128, 171))
    assert torch.count_nonzero(clips[1, :, 1:]) == 0  # frames 17..31 of clip 1 are padding
    assert torch.count_nonzero(clips[1, :, 0]) > 0  # frame 16 is real
    assert torch.count_nonzero(clips[0]) > 0


def test_c3d_crop_offset_and_normalisation_on_a_hand_made_frame():
    # a 128x171 frame skips the resize; torchvision's centre crop starts at row round(16/2)=8, col round(59/2)=30
    frame = np.zeros((1, 128, 171, 3), np.uint8)
    frame[0, :, :] = (10, 0, 200)
    frame[0, 8, 30] = (255, 255, 255)
    frame[0, 7, 29] = (1, 2, 3)  # outside the crop
    clip = c3d_clips(frame)[0, :, 0].numpy()  # [3, 112, 112]
    np.testing.assert_allclose(clip[:, 0, 0], _normalised((255, 255, 255)), rtol=1e-6)
    np.testing.assert_allclose(clip[:, 5, 7], _normalised((10, 0, 200)), rtol=1e-6)
    assert not np.isclose(clip, _normalised((1, 2, 3))[:, None, None], atol=1e-3).all(axis=0).any()


@pytest.mark.parametrize(
    ("bgr", "wrap", "expected"),
    [
        (False, False, (10, 0, 200)),
        (True, False, (200, 0, 10)),  # channels reversed
        (False, True, (246, 0, 56)),  # (256 - x) mod 256, 0 stays 0
        (True, True, (56, 0, 246)),
    ],
)
def test_c3d_bgr_and_negative_wrap_arithmetic(bgr, wrap, expected):
    frame = np.zeros((1, 128, 171, 3), np.uint8)
    frame[:] = (10, 0, 200)
    pixel = c3d_clips(frame, bgr=bgr, negative_wrap=wrap)[0, :, 0, 50, 50].numpy()
    np.testing.assert_allclose(pixel, _normalised(expected), rtol=1e-6)


def test_c3d_resize_keeps_a_constant_frame_constant():
    frame = np.zeros((2, 90, 120, 3), np.uint8)
    frame[:] = (255, 128, 7)
    clip = c3d_clips(frame)[0, :, :2].numpy()
    np.testing.assert_allclose(clip, np.broadcast_to(_normalised((255, 128, 7))[:, None, None, None], clip.shape))


def test_c3d_resize_is_within_one_grey_level_of_pil_bilinear():
    image_mod = pytest.importorskip("PIL.Image")  # the reference resized with torchvision on PIL images
    yy, xx = np.mgrid[0:90, 0:120]
    smooth = np.stack([127 + 100 * np.sin(xx / 7 + c) * np.cos(yy / 11) for c in range(3)], -1)
    frame = np.clip(smooth + np.random.default_rng(5).normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    pil = np.asarray(image_mod.fromarray(frame).resize((171, 128), image_mod.BILINEAR))[8:120, 30:142]
    ours = c3d_clips(frame[None])[0, :, 0].permute(1, 2, 0).numpy()
    diff = np.abs(ours - _normalised(pil)) * 255 * np.asarray(C3D_STD, np.float32)  # back to grey levels
    assert diff.max() < 1.0 + 1e-3 and diff.mean() < 0.5


def test_c3d_bad_frames_are_data_errors():
    with pytest.raises(DataError, match="uint8"):
        c3d_clips(np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match=r"\[T, H, W, 3\]"):
        c3d_clips(np.zeros((4, 8, 8), np.uint8))


# ------------------------------------------------------------------------------------------------------------ VGGish


def test_log_mel_number_of_examples():
    # 2.5 s: n_frames = 1 + (40000 - 400) // 160 = 248, N = 1 + (248 - 96) // 96 = 2
    assert log_mel_examples(np.zeros(40000, np.float32)).shape == (2, 96, 64)
    # 96 STFT frames need 400 + 95 * 160 = 15600 samples
    assert log_mel_examples(np.zeros(15600, np.float32)).shape == (1, 96, 64)
    short = log_mel_examples(np.zeros(15599, np.float32))
    assert short.shape == (0, 96, 64) and short.dtype == np.float32
    assert log_mel_examples(np.zeros(0, np.float32)).shape == (0, 96, 64)


def test_log_mel_silence_is_log_offset():
    ex = log_mel_examples(np.zeros(16000, np.float32))
    assert ex.dtype == np.float32
    assert (ex == np.float32(np.log(0.01))).all()


def test_log_mel_1khz_tone_peaks_in_the_band_holding_1khz():
    t = np.arange(40000) / 16000.0
    ex = log_mel_examples((0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32))

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    edges = np.linspace(mel(125.0), mel(7500.0), 66)
    band = int(np.argmin(np.abs(edges[1:-1] - mel(1000.0))))  # nearest centre (band 19)
    assert edges[band] < mel(1000.0) < edges[band + 2]
    assert (ex.mean(axis=1).argmax(axis=1) == band).all()


def test_log_mel_matches_a_direct_per_frame_computation():
    x = np.random.default_rng(1).uniform(-1, 1, 16000 * 2).astype(np.float32)
    ex = log_mel_examples(x)

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    # the spec's construction, written out bin by bin and band by band
    bins_mel = mel(np.linspace(0.0, 8000.0, 257))
    edges = np.linspace(mel(125.0), mel(7500.0), 66)
    weights = np.zeros((257, 64))
    for i in range(64):
        for k in range(1, 257):
            up = (bins_mel[k] - edges[i]) / (edges[i + 1] - edges[i])
            down = (edges[i + 2] - bins_mel[k]) / (edges[i + 2] - edges[i + 1])
            weights[k, i] = max(0.0, min(up, down))
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    for example, frame in [(0, 0), (0, 95), (1, 7)]:
        start = (example * 96 + frame) * 160
        spectrum = np.abs(np.fft.rfft(x[start : start + 400].astype(np.float64) * hann, 512))
        np.testing.assert_allclose(ex[example, frame], np.log(spectrum @ weights + 0.01), rtol=1e-5, atol=1e-5)


def test_vggish_weights_roundtrip_harritaylor_keys_and_shapes(small_weights, tmp_path):
    model = load_vggish(small_weights / "pytorch_vggish.pth", width=VGG_W)
    pca = load_vggish_pca(small_weights / "vggish_pca_params.npz")
    assert pca.means.shape == (128, 1)
    wave = np.random.default_rng(2).uniform(-0.5, 0.5, 40000).astype(np.float32)
    codes = vggish_features(model, pca, wave)
    assert codes.shape == (2, 128) and codes.dtype == np.uint8
    assert vggish_features(model, pca, wave[:15000]).shape == (0, 128)
    # the harritaylor port names the fc block "embeddings"; it loads to the same numbers
    state = torch.load(small_weights / "pytorch_vggish.pth", weights_only=True)
    renamed = {k.replace("fc.", "embeddings.", 1) if k.startswith("fc.") else k: v for k, v in state.items()}
    torch.save(renamed, tmp_path / "pytorch_vggish.pth")
    np.testing.assert_array_equal(
        vggish_features(load_vggish(tmp_path / "pytorch_vggish.pth", width=VGG_W), pca, wave), codes
    )


def test_vggish_flattens_in_nhwc_order_like_the_ports():
    model = VGGish(width=1)  # last conv map [N, 8, 6, 4], flattened to 6*4*8 = 192
    with torch.no_grad():
        for layer in (model.fc[0], model.fc[2], model.fc[4]):
            layer.weight.zero_()
            layer.bias.zero_()
        model.fc[0].weight[0, (1 * 4 + 2) * 8 + 3] = 1.0  # NHWC index of (h=1, w=2, c=3)
        model.fc[2].weight[0, 0] = 1.0
        model.fc[4].weight[0, 0] = 1.0
        x = torch.randn(3, 1, 96, 64)
        fmap = model.features(x)
        out = model(x)
    assert fmap.shape == (3, 8, 6, 4)
    torch.testing.assert_close(out[:, 0], fmap[:, 3, 1, 2])


def test_pca_postprocess_against_hand_computation(tmp_path):
    eig = 2.0 * np.eye(128)
    eig[0, 1] = 1.0  # out_0 = 2 v_0 + v_1; the transpose would put v_0 into out_1 instead
    np.savez(tmp_path / "vggish_pca_params.npz", pca_eigen_vectors=eig, pca_means=np.full((128, 1), 0.5))
    pca = load_vggish_pca(tmp_path / "vggish_pca_params.npz")
    x = np.full((1, 128), 0.5, np.float32)  # v = x - 0.5 = 0 -> 0 -> (0 + 2) * 63.75 = 127.5 -> 127
    x[0, :9] = [0.75, 1.0, 1.5, 2.0, -1.0, 0.0, -0.5, 0.625, 0.4]
    # v:       0.25, 0.5, 1.0, 1.5, -1.5, -0.5, -1.0, 0.125, -0.1
    # out:     2*.25+.5=1 -> 191.25; 1 -> 191.25; 2 -> 255; 3 -> clip 2 -> 255; -3 -> clip -2 -> 0;
    #          -1 -> 63.75; -2 -> 0; 0.25 -> 143.4375; -0.2 -> 114.75   (then truncated to uint8)
    expected = np.full((1, 128), 127, np.uint8)
    expected[0, :9] = [191, 191, 255, 255, 0, 63, 0, 143, 114]
    got = postprocess(x, pca)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------------------------------------ errors


def test_missing_weight_files_name_the_file(tmp_path, small_weights):
    with pytest.raises(WeightsError, match="c3d.pickle") as err:
        load_c3d(tmp_path / "c3d.pickle")
    assert err.value.path == str(tmp_path / "c3d.pickle") and err.value.fix
    with pytest.raises(WeightsError, match="pytorch_vggish.pth"):
        load_vggish(tmp_path / "pytorch_vggish.pth")
    with pytest.raises(WeightsError, match="vggish_pca_params.npz"):
        load_vggish_pca(tmp_path / "vggish_pca_params.npz")
    with pytest.raises(WeightsError, match="c3d.pickle, pytorch_vggish.pth, vggish_pca_params.npz"):
        ClsExtractor.from_weights(tmp_path)
    (tmp_path / "c3d.pickle").write_bytes((small_weights / "c3d.pickle").read_bytes())
    with pytest.raises(WeightsError, match="missing weight file.*pytorch_vggish.pth") as err:
        ClsExtractor.from_weights(tmp_path)
    assert err.value.path == str(tmp_path / "pytorch_vggish.pth")


def test_wrong_or_corrupt_weight_files(tmp_path, small_weights):
    wrong = tmp_path / "c3d.pickle"
    torch.save(VGGish(width=VGG_W).state_dict(), wrong)
    with pytest.raises(WeightsError, match=r"c3d\.pickle.*missing keys: conv1\.weight.*unexpected keys: features"):
        load_c3d(wrong, width=C3D_W)
    with pytest.raises(WeightsError, match=r"c3d\.pickle.*wrong shapes.*conv1\.weight"):
        load_c3d(small_weights / "c3d.pickle", width=8)
    junk = tmp_path / "pytorch_vggish.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"pytorch_vggish\.pth.*cannot read"):
        load_vggish(junk)
    np.savez(tmp_path / "vggish_pca_params.npz", eigen=np.eye(128))
    with pytest.raises(WeightsError, match=r"vggish_pca_params\.npz.*missing arrays"):
        load_vggish_pca(tmp_path / "vggish_pca_params.npz")


def test_real_size_parameter_counts():
    # C3D, 3x3x3 convs (k = 27): conv1 3*64*27+64 = 5,248; conv2 64*128*27+128 = 221,312; conv3a 884,992;
    # conv3b 1,769,728; conv4a 3,539,456; conv4b/conv5a/conv5b 7,078,400 each -> convs 27,655,936.
    # fc6 8192*4096+4096 = 33,558,528; fc7 16,781,312; fc8 4096*487+487 = 1,995,239 -> fc 52,335,079.
    # total 79,991,015.
    # VGGish, 3x3 convs: 640 + 73,856 + 295,168 + 590,080 + 1,180,160 + 2,359,808 = 4,499,712;
    # fc 12288*4096+4096 = 50,335,744; 16,781,312; 4096*128+128 = 524,416 -> 67,641,472; total 72,141,184.
    with torch.device("meta"):
        c3d, vggish = C3D(), VGGish()
    assert sum(p.numel() for p in c3d.parameters()) == 79_991_015
    assert sum(p.numel() for p in vggish.parameters()) == 72_141_184
    assert c3d.fc7.out_features == 4096 and c3d.flat_dim == 8192 and vggish.flat_dim == 12288


# ------------------------------------------------------------------------------------------------------------ extractor


def test_cls_extractor_end_to_end(small_weights):
    c3d = load_c3d(small_weights / "c3d.pickle", width=C3D_W)
    vggish = load_vggish(small_weights / "pytorch_vggish.pth", width=VGG_W)
    pca = load_vggish_pca(small_weights / "vggish_pca_params.npz")
    fixed, official = ClsExtractor(c3d, vggish, pca), ClsExtractor(c3d, vggish, pca, compat="official")
    assert (fixed.name, fixed.video_fps, fixed.audio_rate, fixed.frame_size, fixed.frame_pick) == (
        "cls",
        25.0,
        16000,
        (171, 128),
        "all",
    )
    frames = _rgb(20, 36, 48, seed=3)
    audio = np.random.default_rng(4).uniform(-0.5, 0.5, 40000).astype(np.float32)
    a, v = fixed(frames, audio)
    assert a.shape == (2, 128) and a.dtype == np.uint8
    assert v.shape == (2, C3D_DIM) and v.dtype == np.float32
    np.testing.assert_allclose(v, c3d_features(c3d, frames), rtol=1e-6)
    a2, v2 = official(frames, audio)
    np.testing.assert_array_equal(a2, a)
    np.testing.assert_allclose(v2, c3d_features(c3d, frames, bgr=True, negative_wrap=True), rtol=1e-6)
    assert not np.allclose(v2, v)
    a3, v3 = fixed(frames, np.zeros(0, np.float32))  # no audio track
    assert a3.shape == (0, 128) and v3.shape == (2, C3D_DIM)
    with pytest.raises(DataError, match="no video frames"):
        fixed(frames[:0], audio)
    with pytest.raises(DataError, match="mono"):
        fixed(frames, np.zeros((40000, 2), np.float32))
    with pytest.raises(ConfigError):
        ClsExtractor(c3d, vggish, pca, compat="bogus")
    assert isinstance(pca, VGGishPCA)
