"""MBT, Zorro and HiP, the audio-visual transformers of AV-DIFF's GFSL table: parameter counts of every shipped
config (baselines.md §3.3-§3.5), the data-free checks of §5.3 (padding invariance, the Zorro mask, MBT's bottleneck
as the only path between the modalities) and learning through the CLI on a synthetic 5-shot benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch
from avlowshot.models import InputDims, build_method, count_parameters
from avlowshot.models.zorro import AUDIO, FUSION, VIDEO, zorro_mask
from avlowshot.train.config import load_config

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
CLS = InputDims(audio=128, video=4096, text=300)
SMALL = InputDims(audio=12, video=20, text=300)
# baselines.md §3.3-§3.5 (stage 2: UCF 48, ActivityNet 198, VGGSound 271 classes)
PARAMS = {
    "mbt": {"UCF": 8_432_252, "ActivityNet": 9_827_058, "VGGSound": 13_986_971},
    "zorro": {"UCF": 5_662_440, "ActivityNet": 6_364_718, "VGGSound": 8_447_047},
    "hip": {"UCF": 5_986_696, "ActivityNet": 6_688_974, "VGGSound": 8_771_303},
}
CLASSES = {"UCF": 48, "ActivityNet": 198, "VGGSound": 271}
TINY_MODEL = dict(embeddings_hidden_size=16, decoder_hidden_size=16, transformer_dim=16, transformer_depth=3,
                  transformer_heads=2, transformer_dim_head=8, transformer_mlp_dim=16, transformer_embedding_dim=8,
                  embedding_dropout=0.0, decoder_dropout=0.0, transformer_dropout=0.0,
                  transformer_embedding_dropout=0.0)  # fmt: skip


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_parameter_counts_of_every_shipped_config(method):
    for dataset, want in PARAMS[method].items():
        for shots in (1, 5, 10, 20):
            cfg = load_config(None, method=method, dataset=dataset, feature_set="cls", shots=shots)
            assert cfg.beta_grid == "avdiff" and cfg.model["head"] == "fsl"
            model = build_method(method, cfg.model, CLS, classes=np.arange(CLASSES[dataset]))
            assert count_parameters(model) == want, (dataset, shots)


def _tiny(method: str, **kw):
    torch.manual_seed(0)
    return build_method(method, {**TINY_MODEL, **kw}, SMALL, classes=np.arange(8))


def _batch(g, lengths_a, lengths_v, pad=0) -> Batch:
    b = len(lengths_a)
    la, lv = max(lengths_a) + pad, max(lengths_v) + pad
    am = torch.arange(la)[None] < torch.tensor(lengths_a)[:, None]
    vm = torch.arange(lv)[None] < torch.tensor(lengths_v)[:, None]
    a = torch.rand(b, la, 12, generator=g) * 255 * am[..., None]
    v = torch.rand(b, lv, 20, generator=g) * vm[..., None]
    at = torch.arange(la, dtype=torch.float32).expand(b, la) * 0.96
    vt = torch.arange(lv, dtype=torch.float32).expand(b, lv) * 0.64
    return Batch(a, v, torch.tensor([1, 4, 6]), am, vm, at, vt)


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_padding_does_not_change_the_eval_outputs(method):
    model = _tiny(method).eval()
    short = _batch(torch.Generator().manual_seed(1), [3, 5, 2], [4, 7, 3])
    long = short
    padded = Batch(
        *(torch.cat((t, torch.zeros(3, 6, *t.shape[2:], dtype=t.dtype)), 1) for t in (long.audio, long.video)),
        long.labels,
        *(torch.cat((m, torch.zeros(3, 6, dtype=torch.bool)), 1) for m in (long.audio_mask, long.video_mask)),
        *(torch.cat((t, t[:, -1:] + torch.arange(1, 7)), 1) for t in (long.audio_time, long.video_time)),
    )
    with torch.no_grad():
        torch.testing.assert_close(model.encode_samples(padded), model.encode_samples(short), rtol=1e-5, atol=1e-6)


def test_zorro_mask_of_the_spec():
    kinds = torch.tensor([AUDIO, AUDIO, FUSION, VIDEO, VIDEO])
    want = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]).bool()
    assert torch.equal(zorro_mask(kinds, torch.ones(1, 5, dtype=torch.bool))[0], want)
    padded = zorro_mask(kinds, torch.tensor([[True, True, True, True, False]]))[0]
    assert not padded[:, 4].any() and torch.equal(padded[:4, :4], want[:4, :4])


def test_zorro_unimodal_streams_stay_unimodal():
    """Changing the video changes the fusion output but not the audio tokens' outputs."""
    model = _tiny("zorro").eval()
    batch = _batch(torch.Generator().manual_seed(2), [3, 4, 2], [5, 5, 3])
    other = Batch(batch.audio, batch.video * 2 + 0.5, batch.labels, batch.audio_mask, batch.video_mask,
                  batch.audio_time, batch.video_time)  # fmt: skip
    with torch.no_grad():
        out1, kinds, valid = model.encode_tokens(batch)
        out2, _, _ = model.encode_tokens(other)
    audio = (kinds == AUDIO).nonzero().flatten()
    keep = valid[:, audio]
    torch.testing.assert_close(out1[:, audio][keep], out2[:, audio][keep])
    assert not torch.allclose(out1[:, kinds == FUSION], out2[:, kinds == FUSION])


def test_mbt_streams_meet_only_through_the_bottleneck():
    batch = _batch(torch.Generator().manual_seed(3), [3, 4, 2], [5, 5, 3])
    other = Batch(batch.audio, batch.video * 2 + 0.5, batch.labels, batch.audio_mask, batch.video_mask,
                  batch.audio_time, batch.video_time)  # fmt: skip
    late = _tiny("mbt", fusion_layer=3).eval()  # L_f = L: no layer fuses, the audio stream never sees the video
    fused = _tiny("mbt", fusion_layer=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(late.class_tokens(batch)[0], late.class_tokens(other)[0])
        assert not torch.allclose(fused.class_tokens(batch)[0], fused.class_tokens(other)[0])
    assert fused.fusion_layer == 1 and _tiny("mbt").fusion_layer == 1  # default floor(3 / 2)


def test_mbt_loss_is_the_mean_of_the_two_modalities_cross_entropies():
    model = _tiny("mbt").train()
    torch.manual_seed(5)
    batch = _batch(torch.Generator().manual_seed(4), [3, 4, 2], [5, 5, 3])
    out = model.losses(batch, torch.zeros(3, 300))
    assert out["loss"].item() == pytest.approx((out["l_ce_a"] + out["l_ce_v"]).item() / 2, rel=1e-6)
    model.eval()
    with torch.no_grad():
        probs = model.encode_samples(batch)
        _, (ta, tv) = model.theta_o(batch)
        want = torch.softmax((model.classifier(ta) + model.classifier(tv)) / 2, dim=-1)
    torch.testing.assert_close(probs, want)
    assert model.score_kind == "probability"


TINY = ["epochs=3", "n_batches=15", "batch_size=48", "lr=2e-3", "embeddings_hidden_size=64", "decoder_hidden_size=64",
        "transformer_dim=64", "transformer_depth=2", "transformer_heads=2", "transformer_dim_head=16",
        "transformer_mlp_dim=64", "embedding_dropout=0.1", "decoder_dropout=0.1"]  # fmt: skip


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_learns_gfsl_through_the_cli(synth_root, tmp_path, method):
    root = synth_root("avdiff", "UCF", scale=0.05, shots=5)
    args = ["run", "--method", method, "--layout", "avdiff", "--dataset", "UCF", "--shots", "5"]
    args += ["--root-dir", str(root), "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    args += ["--quiet"]
    for item in TINY + (["epochs=5"] if method == "hip" else []):  # HiP's two latent stages learn slower
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs" / f"{method}_UCF_avdiff_5shot_seed42" / "result.json").read_text())
    m, chance = rec["metrics"], 100 / 48
    assert rec["task"] == "gfsl" and len(rec["repeats"]) == 3
    assert m["base"] > 3 * chance and m["novel"] > 3 * chance and m["fsl"] > 100 / 6, m
