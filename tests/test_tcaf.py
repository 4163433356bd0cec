"""TCAF: parameter counts of the shipped configs, attention masks, the Fourier time embedding, fixed-window
collation, losses, the reference quirks behind ``--compat official``, a CLI run, and a temporal-order problem that
time-averaged inputs cannot solve (specs/tcaf.md §1.9, §2, §3, §6.3, §10, §11)."""

from __future__ import annotations

import importlib.resources
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch, ClassBalancedSampler, SequenceWindow, gather
from avlowshot.data.store import FeatureStore
from avlowshot.errors import ConfigError
from avlowshot.models import TCAF, InputDims, build_method, count_parameters
from avlowshot.models.layers import (
    FourierTimeEmbedding,
    MaskedAttention,
    layer_masks,
    token_attention_mask,
)
from avlowshot.train.config import RunConfig
from avlowshot.train.trainer import Trainer, encode_samples

CLS = InputDims(audio=128, video=4096, text=300)
MAIN = InputDims(audio=512, video=512, text=300)

# specs/tcaf.md §2.9 and §6.3: params, then (lr, lr_scheduler, h_enc, r_enc, r_dec, r_add, depth, heads, dim_head,
# transformer dropout, embedding dropout, train window, test window).
SPEC = {
    "activitynet-cls": (7_269_972, (7e-5, True, 512, 0.3, 0.1, 0.1, 6, 8, 64, 0.4, 0.2, 60, 300)),
    "ucf-cls": (7_269_972, (7e-5, True, 512, 0.3, 0.1, 0.1, 6, 8, 64, 0.3, 0.2, None, None)),
    "vggsound-cls": (8_655_028, (6e-5, False, 512, 0.2, 0.2, 0.1, 8, 8, 64, 0.5, 0.1, None, None)),
    "activitynet-main": (5_161_908, (7e-5, True, 128, 0.2, 0.1, 0.1, 8, 3, 128, 0.3, 0.2, 60, 300)),
    "ucf-main": (4_521_764, (5e-5, False, 256, 0.4, 0.2, 0.1, 5, 8, 64, 0.3, 0.2, None, None)),
    "vggsound-main": (8_848_308, (7e-5, False, 128, 0.2, 0.2, 0.2, 8, 6, 128, 0.5, 0.2, None, None)),
}
SMALL = dict(
    embeddings_hidden_size=16,
    decoder_hidden_size=16,
    transformer_depth=2,
    transformer_heads=2,
    transformer_dim_head=8,
    transformer_mlp_dim=16,
    transformer_embedding_dim=8,
    embedding_dropout=0.0,
    decoder_dropout=0.0,
    additional_dropout=0.0,
    transformer_dropout=0.0,
    transformer_embedding_dropout=0.0,
)


def load_config(name: str) -> dict:
    return yaml.safe_load(importlib.resources.files("avlowshot").joinpath(f"configs/tcaf/{name}.yaml").read_text())


@pytest.mark.parametrize("name", list(SPEC))
def test_shipped_configs_match_best_configs_and_spec_parameter_counts(name):
    cfg = load_config(name)
    RunConfig.model_validate(cfg)
    params, (lr, sched, h_enc, r_enc, r_dec, r_add, depth, heads, dh, r_tr, r_emb, w_train, w_test) = SPEC[name]
    ds, fs = name.split("-")
    assert cfg["method"] == "tcaf" and cfg["feature_set"] == fs and cfg["dataset"].lower() == ds
    assert cfg["beta_grid"] == "tcaf" and cfg["epochs"] == 50 and cfg["batch_size"] == 64 and cfg["n_batches"] == 300
    assert cfg["lr"] == lr and cfg["lr_scheduler"] is sched and cfg["weight_decay"] == 1e-5
    assert cfg["eval_batch_size"] == 64  # eval_bs
    m = cfg["model"]
    assert (m["embeddings_hidden_size"], m["embedding_dropout"], m["decoder_dropout"], m["additional_dropout"]) == (
        h_enc,
        r_enc,
        r_dec,
        r_add,
    )
    assert (m["transformer_depth"], m["transformer_heads"], m["transformer_dim_head"]) == (depth, heads, dh)
    assert (m["transformer_dropout"], m["transformer_embedding_dropout"]) == (r_tr, r_emb)
    assert (m["train_window"], m["test_window"]) == (w_train, w_test)
    assert m["attention"] == "cross" and m["decoder_hidden_size"] == 512 and m["transformer_mlp_dim"] == 128

    model = build_method("tcaf", m, CLS if fs == "cls" else MAIN)
    assert count_parameters(model) == params
    assert count_parameters(model, trainable_only=True) == params  # the Fourier frequencies are a buffer
    assert "position_encoder_block.time_embedding.fourier_randn" in model.state_dict()


def test_seeded_init_follows_reference_construction_order():
    """A_enc, V_enc, W_proj, D_w, cls_token, the embedding block, the transformer, O_proj, D_o (specs §2.3)."""
    dims = InputDims(audio=6, video=10, text=12)
    torch.manual_seed(0)
    model = build_method("tcaf", {**SMALL, "transformer_dim": 12, "transformer_depth": 1}, dims)
    torch.manual_seed(0)
    expected = {}
    for name, (i, o) in dict(A_enc=(6, 16), V_enc=(10, 16)).items():
        expected[name] = [torch.nn.Linear(i, o).weight, torch.nn.Linear(o, 12).weight]
    expected["W_proj"] = [torch.nn.Linear(12, 64).weight]
    expected["D_w"] = [torch.nn.Linear(64, 12).weight]
    expected["cls_token"] = torch.randn(1, 1, 12)
    assert torch.equal(model.A_enc.fc[0].weight, expected["A_enc"][0])
    assert torch.equal(model.V_enc.fc[4].weight, expected["V_enc"][1])
    assert torch.equal(model.W_proj.fc[0].weight, expected["W_proj"][0])
    assert torch.equal(model.D_w.fc[0].weight, expected["D_w"][0])
    assert torch.equal(model.cls_token, expected["cls_token"])
    assert torch.equal(model.position_encoder_block.modal_embedding.weight, torch.nn.Embedding(2, 8).weight)


# ----------------------------------------------------------------------------------------------------------------
# Attention masks (specs §2.6, §11): tokens [CLS, a0, a1, v0, v1, v2], the last video token padded.

KINDS = torch.tensor([0, 1, 1, 2, 2, 2])
VALID = torch.tensor([[True, True, True, True, True, False]])
EXPECTED_MASKS = {
    "cross": [
        [1, 1, 1, 1, 1, 0],  # CLS: itself and every valid token
        [1, 0, 0, 1, 1, 0],  # audio: CLS and the valid video tokens
        [1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 0],  # video: CLS and the audio tokens
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],  # padded query: nothing
    ],
    "self": [
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    "full": [[1, 1, 1, 1, 1, 0]] * 5 + [[0] * 6],
}


@pytest.mark.parametrize("rule", list(EXPECTED_MASKS))
def test_attention_masks_as_explicit_matrices(rule):
    mask = token_attention_mask(KINDS, rule, VALID, global_kind=0)
    assert mask.dtype == torch.bool and mask.shape == (1, 6, 6)
    assert mask[0].int().tolist() == EXPECTED_MASKS[rule]
    # Without validity: [N, N], no padding blocked.
    unpadded = token_attention_mask(KINDS, rule)
    assert unpadded.shape == (6, 6)
    assert torch.equal(unpadded[:5, :5], mask[0, :5, :5]) and unpadded[5, 0]


def test_mask_rules_without_global_tokens_and_per_layer_masks():
    kinds = torch.tensor([1, 1, 2])
    assert token_attention_mask(kinds, "cross", global_kind=None).int().tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 0]]
    assert token_attention_mask(kinds, "self", global_kind=None).int().tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    named = {r: token_attention_mask(kinds, r) for r in ("self", "full")}
    hybrid = layer_masks(named, ["self", "self", "full"])  # e.g. AV-DIFF's hybrid attention
    assert [m is named["self"] for m in hybrid] == [True, True, False]
    with pytest.raises(ValueError, match="attention rule"):
        token_attention_mask(kinds, "diagonal")


def test_masked_attention_matches_reference_formula():
    """The reference's einsum attention with masked_fill(-finfo.max) on every valid query row."""
    torch.manual_seed(0)
    attn = MaskedAttention(dim=12, heads=3, dim_head=4, dropout=0.0)
    x = torch.randn(2, 6, 12)
    valid = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    mask = token_attention_mask(KINDS, "cross", valid)
    q, k, v = (f(x).view(2, 6, 3, 4).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    dots = (q @ k.transpose(-1, -2) * 4**-0.5).masked_fill(~mask[:, None], -torch.finfo(torch.float32).max)
    ref = attn.to_out((dots.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 12))
    out = attn(x, mask)
    torch.testing.assert_close(out[valid], ref[valid])
    assert torch.isfinite(out).all()  # padded (fully blocked) rows give no NaN


def test_fourier_time_embedding_formula():
    torch.manual_seed(0)
    emb = FourierTimeEmbedding(8, scale=10.0)
    assert emb.fourier_randn.shape == (2, 4) and "fourier_randn" in dict(emb.named_buffers())
    t = torch.tensor([[0.0, 0.96, 1.92]])
    r = emb.fourier_randn
    proj = 2 * math.pi * t[..., None] * (r[0] + r[1])
    ref = emb.fourier_embeddings(torch.cat((proj.sin(), proj.cos()), -1))
    torch.testing.assert_close(emb(t), ref)


# ----------------------------------------------------------------------------------------------------------------
# Fixed-window collation (specs §1.9, §10.10)


def temporal_store(audio_lengths, video_lengths, audio_step=0.96, video_step=0.64, dim=3) -> FeatureStore:
    """Rows hold (sample, row index, modality) so that a gathered batch shows where it was cut."""
    audio = [np.stack([np.full(dim, 1000 * i + r, np.float32) for r in range(n)]) for i, n in enumerate(audio_lengths)]
    video = [np.stack([np.full(dim, 1000 * i + r, np.float32) for r in range(n)]) for i, n in enumerate(video_lengths)]
    return FeatureStore.from_arrays(
        audio, video, np.zeros(len(audio_lengths)), None, audio_step=audio_step, video_step=video_step
    )


def test_window_lengths_default_and_reference_formula():
    cls = temporal_store([5], [5])
    selavi = temporal_store([5], [5], 1.0, 1.0)
    assert SequenceWindow(60).lengths(cls) == (40, 60)  # the same 38.4 s of audio
    assert SequenceWindow(300).lengths(cls) == (200, 300)
    assert SequenceWindow(60, official=True).lengths(cls) == (37, 60)  # round(60 * 0.64 * 0.96)
    assert SequenceWindow(300, official=True).lengths(cls) == (184, 300)
    assert SequenceWindow(60).lengths(selavi) == SequenceWindow(60, official=True).lengths(selavi) == (60, 60)


def test_centred_test_windows():
    # video lengths 100 (cut), 20 (padded), 61 (cut by one); audio 70, 10, 30
    store = temporal_store([70, 10, 30], [100, 20, 61])
    window = SequenceWindow(60)
    batch = gather(store, np.arange(3), window)
    assert batch.video.shape == (3, 60, 3) and batch.audio.shape == (3, 40, 3)
    sa, sv = window.starts(store, torch.arange(3))
    assert sv.tolist() == [20, 0, 0]  # (T - 60) // 2
    assert sa.tolist() == [min(70 - 40, round(20 * 0.64 / 0.96)), 0, 0]  # aligned in seconds, at most T - La
    assert batch.video[0, :, 0].tolist() == [float(r) for r in range(20, 80)]
    assert batch.audio[0, :, 0].tolist() == [float(r) for r in range(13, 53)]
    assert batch.video_mask.sum(1).tolist() == [60, 20, 60] and batch.audio_mask.sum(1).tolist() == [40, 10, 30]
    assert torch.equal(batch.video[1, 20:], torch.zeros(40, 3))  # padded at the end
    torch.testing.assert_close(batch.video_time[0], torch.arange(60) * 0.64)
    torch.testing.assert_close(batch.audio_time[2], torch.arange(40) * 0.96)
    # the reference's 'fixed' test collation: same centre, audio 184 rows of a 300-row video window
    big = temporal_store([400], [500])
    sa, sv = SequenceWindow(300, official=True).starts(big, torch.tensor([0]))
    assert (int(sv), int(sa)) == (100, min(400 - 184, round(100 * 0.64 / 0.96)))


def test_random_training_windows_cover_the_range_and_are_seeded():
    store = temporal_store([30] * 4, [16, 10, 8, 12])  # video: 16 -> dv = 6, 10 -> dv = 0, 8 -> padded, 12 -> dv=2
    idx = torch.arange(4).repeat(500)

    def starts(official: bool, seed: int) -> torch.Tensor:
        draws = torch.rand(idx.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return SequenceWindow(10, official=official).starts(store, idx, draws)[1].view(500, 4)

    fixed, ref = starts(False, 0), starts(True, 0)
    assert set(fixed[:, 0].tolist()) == set(range(7)) and set(fixed[:, 3].tolist()) == {0, 1, 2}  # [0, dv]
    assert set(ref[:, 0].tolist()) == set(range(6)) and set(ref[:, 3].tolist()) == {0, 1}  # dv never drawn
    assert (fixed[:, 1:3] == 0).all() and (ref[:, 1:3] == 0).all()
    assert torch.equal(fixed, starts(False, 0)) and not torch.equal(fixed, starts(False, 1))
    batch = gather(store, idx[:4], SequenceWindow(10), torch.full((4,), 0.99, dtype=torch.float64))
    assert batch.video[0, :, 0].tolist() == [float(r) for r in range(6, 16)]  # the last offset
    assert batch.audio.shape[1] == round(10 * 0.64 / 0.96)


def test_trainer_draws_windows_from_the_epoch_generator(tmp_path):
    """Training batches are cut by the method's window from the epoch's seeded generator (so resume is exact);
    evaluation windows are centred."""
    store = temporal_store([40] * 8, [30, 50, 12, 70, 20, 33, 45, 9], audio_step=0.96, video_step=0.64)
    store.labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    text = F.normalize(torch.randn(4, 300, generator=torch.Generator().manual_seed(0)), dim=1)
    model = build_method("tcaf", {**SMALL, "train_window": 15, "test_window": 25}, InputDims(3, 3, 300))
    assert model.sequence_window(True) == SequenceWindow(15) and model.sequence_window(False) == SequenceWindow(25)
    assert build_method("tcaf", SMALL, InputDims(3, 3, 300)).sequence_window(True) is None
    cfg = RunConfig(method="tcaf", epochs=1, n_batches=3, batch_size=6, lr=1e-3)
    seen = []

    def record(batch, text, **kwargs):
        seen.append((batch.video[..., 0].clone(), batch.video_mask, kwargs["class_ids"].tolist()))
        return {"loss": (model.cls_token * 0).sum() + batch.video.sum() * 0}

    model.losses = record
    sampler = ClassBalancedSampler(store.labels.numpy(), np.arange(8), 6, 3)
    for run in range(2):
        trainer = Trainer(model, store, text, cfg, torch.device("cpu"), tmp_path / str(run), name="s", seed=1, stage=1)
        trainer._epoch(sampler, 0, 1)
    assert len(seen) == 6 and all(v.shape == (6, 15) for v, _, _ in seen) and seen[0][2] == [0, 1, 2, 3]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(seen[:3], seen[3:], strict=True))
    offsets = []
    for v, mask, _ in seen:  # every window holds consecutive rows of its sample, padding only after them
        assert (v[:, 1:] - v[:, :-1])[mask[:, 1:]].eq(1).all() and (v[~mask] == 0).all()
        offsets += (v[:, 0] % 1000).tolist()
    assert len(set(offsets)) > 1  # random starts
    del model.losses
    calls = []
    encode = model.encode_samples
    model.encode_samples = lambda batch: calls.append(batch) or encode(batch)
    assert encode_samples(model, store, np.arange(8), torch.device("cpu"), 3).shape == (8, 64)
    # centred 25-row evaluation windows, in length order (9, 12, 20 | 25 x 5 rows), each batch only as wide as its
    # longest window
    assert [b.video.shape[1] for b in calls] == [20, 25, 25]
    assert 1000 + (50 - 25) // 2 in torch.cat([b.video[:, 0, 0] for b in calls]).tolist()


# ----------------------------------------------------------------------------------------------------------------
# Model


def random_batch(n: int, dims: InputDims, gen: torch.Generator, la: int = 5, lv: int = 7) -> Batch:
    am = torch.arange(la) < torch.randint(1, la + 1, (n, 1), generator=gen)
    vm = torch.arange(lv) < torch.randint(1, lv + 1, (n, 1), generator=gen)
    return Batch(
        audio=torch.randint(0, 256, (n, la, dims.audio), generator=gen).float() * am[..., None],
        video=torch.rand(n, lv, dims.video, generator=gen) * vm[..., None],
        labels=torch.randint(0, 4, (n,), generator=gen) * 2,  # global ids 0, 2, 4, 6
        audio_mask=am,
        video_mask=vm,
        audio_time=(torch.arange(la) * 0.96).expand(n, la),
        video_time=(torch.arange(lv) * 0.64).expand(n, lv),
    )


def pad(batch: Batch, extra: int) -> Batch:
    def p(x, v=0):
        return F.pad(x, (0, 0, 0, extra), value=v) if x.dim() == 3 else F.pad(x, (0, extra), value=v)

    return Batch(
        p(batch.audio), p(batch.video), batch.labels, p(batch.audio_mask, False), p(batch.video_mask, False),
        F.pad(batch.audio_time, (0, extra)), F.pad(batch.video_time, (0, extra)),
    )  # fmt: skip


DIMS = InputDims(audio=6, video=10, text=12)


def small(compat: str = "none", **overrides) -> TCAF:
    torch.manual_seed(0)
    return build_method("tcaf", {**SMALL, "transformer_dim": 12, **overrides}, DIMS, compat=compat)


def test_losses_match_the_spec_formulas_and_reach_every_parameter():
    gen = torch.Generator().manual_seed(0)
    model = small().eval()
    batch = random_batch(8, DIMS, gen)
    class_text = F.normalize(torch.randn(4, 12, generator=gen), dim=1)
    class_ids = torch.tensor([0, 2, 4, 6])
    text = class_text[batch.labels // 2]
    with torch.no_grad():
        out = model.losses(batch, text, class_text=class_text, class_ids=class_ids)
        theta_o = model.encode_samples(batch)
        theta_w = model.encode_classes(text)
        ce = F.cross_entropy(theta_o @ model.encode_classes(class_text).t(), batch.labels // 2)
        rec = F.mse_loss(model.D_o(theta_o), text) + F.mse_loss(model.D_w(theta_w), text)
    assert list(out) == ["l_rec", "l_reg", "l_ce", "loss"]
    torch.testing.assert_close(out["l_ce"], ce)
    torch.testing.assert_close(out["l_reg"], F.mse_loss(theta_o, theta_w))
    torch.testing.assert_close(out["l_rec"], rec)
    assert torch.equal(out["loss"], out["l_rec"] + out["l_reg"] + out["l_ce"])

    model.train()
    model.losses(batch, text, class_text=class_text, class_ids=class_ids)["loss"].backward()
    for name, p in model.named_parameters():
        # The padding embedding only reaches padded tokens, which no token attends to (as in the reference).
        moved = name != "position_encoder_block.pad_embedding.weight"
        assert p.grad is not None and bool(p.grad.abs().sum() > 0) is moved, name
    assert list(small(rec_loss=False, reg_loss=False).losses(batch, text, class_text=class_text, class_ids=class_ids))
    with pytest.raises(ValueError, match="class_text"):
        model.losses(batch, text)
    scores = model.scores(theta_o, model.encode_classes(class_text))
    assert model.score_kind == "distance" and scores.shape == (8, 4) and (scores >= 0).all()


def test_default_ignores_padding_official_lets_it_into_batch_norm():
    gen = torch.Generator().manual_seed(1)
    batch = random_batch(6, DIMS, gen)
    text = F.normalize(torch.randn(6, 12, generator=gen), dim=1)
    kw = dict(class_text=text[:4], class_ids=torch.tensor([0, 2, 4, 6]))
    for compat, same in (("none", True), ("official", False)):
        model = small(compat).train()
        a = model.losses(batch, text, **kw)["loss"]
        b = model.losses(pad(batch, 3), text, **kw)["loss"]
        assert torch.allclose(a, b, atol=1e-5) is same, compat
    # eval: padding never matters
    for compat in ("none", "official"):
        model = small(compat).eval()
        with torch.no_grad():
            torch.testing.assert_close(model.encode_samples(batch), model.encode_samples(pad(batch, 3)))


def test_official_time_positions_normalisation_and_extra_pass():
    gen = torch.Generator().manual_seed(2)
    batch = random_batch(5, DIMS, gen)
    text = F.normalize(torch.randn(5, 12, generator=gen), dim=1)
    positions = Batch(**{**batch.__dict__})
    positions.audio_time = torch.arange(5.0).expand(5, 5)
    positions.video_time = torch.arange(7.0).expand(5, 7)
    default, official = small().eval(), small("official").eval()
    with torch.no_grad():
        # default: evaluated at the batch's seconds, as trained; official: at row indices 0, 1, 2, ...
        torch.testing.assert_close(default.encode_samples(batch), default._theta_o(batch, positions=False))
        torch.testing.assert_close(official.encode_samples(batch), official._theta_o(positions, positions=False))
        assert not torch.allclose(official._theta_o(batch, False), official._theta_o(positions, False))
        # video normalised per row (default) or per channel over time (official, specs §2.5)
        v = default._sequences(batch)[1]
        torch.testing.assert_close(v[batch.video_mask].norm(dim=-1), torch.ones(int(batch.video_mask.sum())))
        v = official._sequences(batch)[1]
        torch.testing.assert_close(v.norm(dim=1), torch.ones(5, 10))

    def tracked(model):
        return {n: int(getattr(model, n).fc[1].num_batches_tracked) for n in ("A_enc", "V_enc", "O_proj", "W_proj")}

    for model, moved in ((small(), 0), (small("official"), 1)):
        model.train()
        before = tracked(model)
        params = [p.detach().clone() for p in model.parameters()]
        model.after_step(batch, text)
        assert all(tracked(model)[n] == before[n] + moved for n in before)
        assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert small("official", train_window=4).sequence_window(True) == SequenceWindow(4, official=True)


def test_config_errors():
    with pytest.raises(ConfigError, match="transformer_dim"):
        build_method("tcaf", {**SMALL, "transformer_dim": 64}, CLS)
    with pytest.raises(ConfigError, match="at least one of"):
        build_method("tcaf", {"cross_entropy_loss": False, "reg_loss": False, "rec_loss": False}, CLS)
    with pytest.raises(ConfigError, match=r"model\.use_self_attention: unknown key"):
        build_method("tcaf", {"use_self_attention": True}, CLS)
    with pytest.raises(ValueError, match="temporal"):
        small().encode_samples(Batch(torch.zeros(2, 6), torch.zeros(2, 10), torch.zeros(2, dtype=torch.long)))


# ----------------------------------------------------------------------------------------------------------------
# End to end


def test_cli_run_on_synthetic_ucf(synth_root, tmp_path):
    root = synth_root("tcaf-cls", "UCF", scale=0.05)
    args = ["run", "--method", "tcaf", "--layout", "tcaf-cls", "--dataset", "UCF", "--root-dir", str(root)]
    args += ["--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    # The shipped UCF config with a narrow model, so that the test runs in seconds on a CPU.
    sets = ["epochs=3", "n_batches=15", "batch_size=48", "lr=2e-3", "model.embeddings_hidden_size=64"]
    sets += ["model.decoder_hidden_size=64", "model.transformer_depth=1", "model.transformer_heads=2"]
    sets += ["model.transformer_dim_head=32", "model.embedding_dropout=0.1", "model.transformer_dropout=0.1"]
    sets += ["model.decoder_dropout=0.1"]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "runs" / "tcaf_UCF_tcaf-cls_seed42" / "result.json").read_text())
    assert rec["method"] == "tcaf" and rec["layout"] == "tcaf-cls" and rec["feature_set"] == "cls"
    cfg = dict(load_config("ucf-cls")["model"])
    cfg.update(embeddings_hidden_size=64, decoder_hidden_size=64, transformer_depth=1, transformer_heads=2)
    cfg.update(transformer_dim_head=32, embedding_dropout=0.1, transformer_dropout=0.1, decoder_dropout=0.1)
    assert rec["n_params"] == count_parameters(build_method("tcaf", cfg, CLS))
    assert rec["config"]["model"]["attention"] == "cross" and rec["config"]["beta_grid"] == "tcaf"
    m = rec["metrics"]
    chance = 100 / len(rec["per_class"])  # 42 seen + 6 unseen test classes
    assert m["seen"] > 3 * chance and m["unseen"] > 3 * chance, m


def test_temporal_order_beats_time_averaged_inputs():
    """Two classes with the same audio and video events, told apart only by their order in time (audio first or
    video first). Time-averaged inputs carry no information (chance); TCAF's time embeddings and cross-modal
    attention solve it. (On ``avlowshot synth`` benchmarks the planted evidence is a window of 30-70 % of the rows;
    its time average keeps the class signal, and there the averaged baseline is as good as TCAF.)"""
    gen = torch.Generator().manual_seed(0)
    d, t, w, gap = 16, 12, 3, 2
    ev_a, ev_v = 2 * torch.randn(d, generator=gen), 2 * torch.randn(d, generator=gen)

    def make(n: int) -> Batch:
        y = torch.randint(0, 2, (n,), generator=gen)
        first = torch.randint(0, t - w - gap + 1, (n,), generator=gen)
        second = first + gap + (torch.rand(n, generator=gen) * (t - w - gap - first + 1)).long()
        sa, sv = torch.where(y == 1, first, second), torch.where(y == 1, second, first)
        pos = torch.arange(t)
        in_a = (pos >= sa[:, None]) & (pos < sa[:, None] + w)
        in_v = (pos >= sv[:, None]) & (pos < sv[:, None] + w)
        audio = 128 + 30 * (in_a[..., None] * ev_a + torch.randn(n, t, d, generator=gen))
        video = torch.relu(in_v[..., None] * ev_v + torch.randn(n, t, d, generator=gen))
        mask = torch.ones(n, t, dtype=torch.bool)
        time = torch.arange(t, dtype=torch.float32).expand(n, t)
        return Batch(audio, video, y, mask, mask, time, time)

    text = F.normalize(torch.randn(2, 300, generator=gen), dim=1)
    ids = torch.arange(2)
    test = make(400)
    cfg = dict(SMALL, embeddings_hidden_size=32, decoder_hidden_size=32, transformer_depth=1)
    cfg.update(transformer_dim_head=16, transformer_embedding_dim=64, transformer_embedding_fourier_scale=1.0)
    accuracy = {}
    for average in (False, True):
        torch.manual_seed(0)
        model = build_method("tcaf", {**cfg, "average_inputs": average}, InputDims(d, d, 300))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(120):
            batch = make(64)
            loss = model.losses(batch, text[batch.labels], class_text=text, class_ids=ids)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = model.scores(model.encode_samples(test), model.encode_classes(text)).argmin(1)
        accuracy[average] = (pred == test.labels).float().mean().item()
    assert accuracy[False] > 0.85 and accuracy[True] < 0.6, accuracy


def test_masked_rows_equal_gathered_rows():
    """The sync-free masked-BN form of embed_rows (CUDA, torch.compile) gives the gathered form's outputs, gradients
    and BN running statistics."""
    import copy

    from avlowshot.models.layers import EmbeddingNet, embed_rows

    torch.manual_seed(0)
    net = EmbeddingNet(12, 8, dropout=0.0, hidden=16)
    x = torch.randn(4, 7, 12, requires_grad=True)
    valid = torch.arange(7)[None] < torch.tensor([7, 3, 5, 1])[:, None]
    outs, grads, states = [], [], []
    for masked in (False, True):
        m = copy.deepcopy(net)
        out = embed_rows(m, x, valid, include_padding=False, masked=masked)
        (g,) = torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), x)
        outs.append(out.detach())
        grads.append(g)
        states.append(m.state_dict())
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and (outs[1][~valid] == 0).all()
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    for k in states[0]:
        assert torch.allclose(states[0][k].float(), states[1][k].float(), atol=1e-6), k


def test_padding_to_a_multiple_and_bf16_autocast_keep_the_outputs():
    """``Batch.padded`` (few shapes for torch.compile) leaves the encodings unchanged; bf16 autocast (``amp``) runs
    the same model with losses close to fp32."""
    from avlowshot.train.trainer import precision

    gen = torch.Generator().manual_seed(2)
    model = small().eval()
    batch = random_batch(6, DIMS, gen)
    padded = batch.padded(8)
    assert padded.audio.shape[1] % 8 == 0 and padded.video.shape[1] % 8 == 0
    assert padded.audio_mask.sum() == batch.audio_mask.sum()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_samples(padded), model.encode_samples(batch), atol=1e-5, rtol=1e-5)
        text = F.normalize(torch.randn(6, 12, generator=gen), dim=1)
        kw = dict(class_text=text[:4], class_ids=torch.tensor([0, 2, 4, 6]))
        fp32 = model.losses(batch, text, **kw)["loss"]
        with precision(torch.device("cpu"), "bf16"):
            bf16 = model.losses(batch, text, **kw)["loss"]
        with precision(torch.device("cpu"), "auto"):  # auto: fp32 on the CPU
            auto = model.losses(batch, text, **kw)["loss"]
    assert torch.isfinite(bf16) and abs(float(bf16) - float(fp32)) < 0.05 * abs(float(fp32)) and auto == fp32
