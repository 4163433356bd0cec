"""AVGZSLNet and CJME (specs/avca.md §2.2, §2.3, §3.2, §3.3, §3.7, §5, §6.4), and AVCA on the clipclap layout:
parameter counts of every shipped config, the loss formulas on hand-made batches, the negatives and class table
the trainer hands them, the score direction, and learning through the CLI on synthetic UCF."""

from __future__ import annotations

import importlib.resources
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch, ClassBalancedSampler
from avlowshot.data.store import FeatureStore
from avlowshot.models import CJME, AVGZSLNet, InputDims, build_method, count_parameters, registry
from avlowshot.models.avgzslnet import attention_targets
from avlowshot.train.config import RunConfig, load_config
from avlowshot.train.trainer import Trainer

DIMS = {
    "main": InputDims(512, 512, 300),
    "cls": InputDims(128, 4096, 300),
    "clipclap": InputDims(1024, 512, 1536),
}
DATASETS = {"ucf": "UCF", "activitynet": "ActivityNet", "vggsound": "VGGSound"}
DROPOUT = {"ucf": 0.2, "activitynet": 0.2, "vggsound": 0.0}  # --dropout_baselines per dataset (§6.4)


def linear(i: int, o: int) -> int:
    return i * o + o


def mlp(i: int, h: int, o: int) -> int:  # Linear -> BN(h) -> ReLU -> Dropout -> Linear
    return linear(i, h) + 2 * h + linear(h, o)


def expected_parameters(method: str, d: InputDims) -> int:
    """From the layer shapes (specs §2.2 / §2.3): f_a, f_v (hidden 1024 -> 64), f_t (hidden 300 -> 64), and the
    decoder 64 -> 64 -> Dt (AVGZSLNet) or the attention BN(Da+Dv) -> Linear(Da+Dv, 1) (CJME)."""
    common = mlp(d.audio, 1024, 64) + mlp(d.video, 1024, 64) + mlp(d.text, 300, 64)
    if method == "avgzslnet":
        return common + mlp(64, 64, d.text)
    return common + 2 * (d.audio + d.video) + linear(d.audio + d.video, 1)


SPEC_COUNTS = {  # specs/avca.md §2.2, §2.3
    ("avgzslnet", "main"): 1_319_872,
    ("avgzslnet", "cls"): 4_596_672,
    ("cjme", "main"): 1_299_157,
    ("cjme", "cls"): 4_585_557,
}


def shipped(method: str, name: str) -> dict:
    text = importlib.resources.files("avlowshot").joinpath(f"configs/{method}/{name}.yaml").read_text()
    return yaml.safe_load(text)


@pytest.mark.parametrize("method", ["avgzslnet", "cjme"])
def test_shipped_configs_match_run_scripts_and_spec_parameter_counts(method):
    names = registry.shipped_configs(method)
    assert names == sorted(f"{ds}-{fs}" for ds in DATASETS for fs in ("clipclap", "cls", "main"))
    for name in names:
        ds, fs = name.split("-")
        raw = shipped(method, name)
        cfg = load_config(None, method=method, dataset=DATASETS[ds], feature_set=fs)
        assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.n_batches) == (50, 1e-3, 256, 500), name
        assert cfg.weight_decay == 0.0 and cfg.lr_scheduler and cfg.beta_grid == "avca", name
        m = raw["model"]
        assert m["embeddings_hidden_size"] == 1024 and m["embedding_use_bn"] is True and m["margin"] == 1.0
        if method == "avgzslnet":  # defaults + --decoder_use_bn --embedding_use_bn --normalize_decoder_outputs
            assert (m["embedding_dropout"], m["decoder_hidden_size"], m["decoder_dropout"]) == (0.8, 64, 0.5)
            assert m["decoder_use_bn"] is True and m["normalize_decoder_outputs"] is True
        else:
            assert m["dropout_baselines"] == DROPOUT[ds] and m["composite"] == "reference"
        model = build_method(method, cfg.model, DIMS[fs])
        n = count_parameters(model)
        assert n == expected_parameters(method, DIMS[fs]), name
        if (method, fs) in SPEC_COUNTS:
            assert n == SPEC_COUNTS[method, fs], name
    assert count_parameters(build_method("avgzslnet", shipped("avgzslnet", "ucf-clipclap")["model"], DIMS["clipclap"]))
    assert expected_parameters("avgzslnet", DIMS["clipclap"]) == 2_295_300  # the model card's numbers
    assert expected_parameters("cjme", DIMS["clipclap"]) == 2_195_781


def test_avca_clipclap_configs_are_the_cls_scripts_on_1536_d_text():
    """AVCA on the ClipClap table (PROPOSED, specs/baselines.md §2.3.5): the cls run-script values, W_proj / D on
    the 1536-d CLIP ‖ CLAP text, 2,117,168 parameters."""
    for ds in DATASETS:
        clip, cls = shipped("avca", f"{ds}-clipclap"), shipped("avca", f"{ds}-cls")
        assert clip["model"] == cls["model"] and clip["feature_set"] == "clipclap"
        assert {k: v for k, v in clip.items() if k not in ("model", "feature_set")} == {
            k: v for k, v in cls.items() if k not in ("model", "feature_set")
        }
        cfg = load_config(None, method="avca", dataset=DATASETS[ds], feature_set="clipclap")
        model = build_method("avca", cfg.model, DIMS["clipclap"])
        assert count_parameters(model) == 2_117_168
        assert model.W_proj.fc[0].in_features == 1536 and model.D.fc[0].out_features == 1536
        assert model.A_enc.fc[0].in_features == 1024 and model.V_enc.fc[0].in_features == 512


def test_layers_and_state_dict_keys_follow_the_reference():
    d = InputDims(5, 6, 7)
    avgzsl = build_method("avgzslnet", {"embedding_use_bn": True, "decoder_use_bn": True}, d)
    kinds = [type(m).__name__ for m in avgzsl.triplet_net.embedding_net1.fc]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]  # no output activation
    assert [type(m).__name__ for m in avgzsl.decoder_net.embedding_net.fc][-1] == "Linear"
    assert avgzsl.decoder_net.embedding_net.fc[-1].out_features == 7  # decodes to the class-text dim
    keys = set(avgzsl.state_dict())
    assert {"triplet_net.embedding_net3.fc.0.weight", "decoder_net.embedding_net.fc.4.bias"} <= keys
    cjme = build_method("cjme", {}, d)  # embedding_use_bn defaults to False, as argparse
    assert [type(m).__name__ for m in cjme.triplet_net.embedding_net2.fc] == [
        "Linear", "ReLU", "Dropout", "Linear", "ReLU"
    ]  # fmt: skip
    assert {"attention_model.0.running_mean", "attention_model.1.weight"} <= set(cjme.state_dict())
    assert cjme.attention_model[0].num_features == 11 and cjme.triplet_net.embedding_net3.fc[0].out_features == 300
    one = build_method("avgzslnet", {"embeddings_hidden_size": 0}, d)
    assert [type(m).__name__ for m in one.triplet_net.embedding_net1.fc] == ["Linear"]


# ----------------------------------------------------------------------------------------------------------------
# Losses, computed from the spec's formulas


def tml(a, p, n, margin):
    """nn.TripletMarginLoss(margin, p=2, eps=1e-6, reduction='none')."""
    return torch.clamp((a - p + 1e-6).norm(dim=1) - (a - n + 1e-6).norm(dim=1) + margin, min=0)


def hand_batch(d: InputDims, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pos = Batch(torch.randn(n, d.audio, generator=g), torch.randn(n, d.video, generator=g), torch.arange(n) % 3)
    neg = Batch(torch.randn(n, d.audio, generator=g), torch.randn(n, d.video, generator=g), (torch.arange(n) + 1) % 3)
    table = F.normalize(torch.randn(3, d.text, generator=g), dim=1)
    return pos, neg, table


def randomise_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("distance_fn", ["L2Loss", "SquaredL2Loss"])
def test_avgzslnet_loss_is_the_spec_formula(distance_fn):
    d = InputDims(5, 6, 7)
    cfg = {"embeddings_hidden_size": 8, "text_hidden_size": 4, "decoder_hidden_size": 3, "embedding_use_bn": True,
           "decoder_use_bn": True, "normalize_decoder_outputs": True, "margin": 0.7,
           "distance_fn": distance_fn}  # fmt: skip
    model = build_method("avgzslnet", cfg, d)
    randomise_bn(model, 1)
    model.eval()  # no dropout, fixed BN: the loss is a function of the inputs only
    pos, neg, table = hand_batch(d, 6, 0)
    w1, w2 = table[pos.labels], table[neg.labels]
    out = model.losses(pos, w1, neg, w2)

    net = model.triplet_net
    a1, v1, t1 = net.embedding_net1(pos.audio), net.embedding_net2(pos.video), net.embedding_net3(w1)
    a2, v2, t2 = net.embedding_net1(neg.audio), net.embedding_net2(neg.video), net.embedding_net3(w2)
    dec = lambda x: F.normalize(model.decoder_net.embedding_net(x), dim=1)  # noqa: E731
    sq = ((dec(t1) - w1) ** 2).sum(1), ((dec(a1) - w1) ** 2).sum(1), ((dec(v1) - w1) ** 2).sum(1)
    dist = sq if distance_fn == "SquaredL2Loss" else tuple(s.sqrt() for s in sq)
    l_rec = sum(x.mean() for x in dist)
    l_cmd = tml(dec(t1), dec(a1), dec(a2), 0.7).mean() + tml(dec(t1), dec(v1), dec(v2), 0.7).mean()
    l_ct = sum(tml(x, y, z, 0.7).mean() for x, y, z in ((t1, a1, a2), (a1, t1, t2), (t1, v1, v2), (v1, t1, t2)))
    torch.testing.assert_close(out["l_rec"], l_rec)
    torch.testing.assert_close(out["l_cta"] + out["l_ctv"], l_cmd)
    torch.testing.assert_close(out["l_ct"], l_ct)
    torch.testing.assert_close(out["loss"], l_rec + l_cmd + l_ct)
    # Negative = positive (same sample, same class text): every triplet term is exactly its margin.
    same = model.losses(pos, w1, pos, w1)
    torch.testing.assert_close(same["l_ct"], torch.tensor(4 * 0.7))
    torch.testing.assert_close(same["l_cta"] + same["l_ctv"], torch.tensor(2 * 0.7))


def test_cjme_attention_targets_follow_the_entropy_rule():
    h_a = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.3])
    h_v = torch.tensor([1.0, 2.0, 1.05, 0.95, 1.0])
    assert attention_targets(h_a, h_v).tolist() == [1.0, 0.0, 0.5, 0.5, 1.0]  # 1 = trust the video


@pytest.mark.parametrize("composite", ["reference", "per-sample"])
def test_cjme_loss_is_the_spec_formula(composite):
    d = InputDims(5, 6, 7)
    cfg = {"embeddings_hidden_size": 8, "text_hidden_size": 4, "embedding_use_bn": True, "margin": 0.6,
           "composite": composite}  # fmt: skip
    model = build_method("cjme", cfg, d)
    randomise_bn(model, 2)
    with torch.no_grad():  # a wider spread of attention weights than the default init gives
        model.attention_model[1].weight.mul_(4)
    model.eval()
    pos, neg, table = hand_batch(d, 6, 3)
    w1, w2 = table[pos.labels], table[neg.labels]
    out = model.losses(pos, w1, neg, w2, class_text=table, class_ids=torch.arange(3))

    net = model.triplet_net
    a1, v1, t1 = net.embedding_net1(pos.audio), net.embedding_net2(pos.video), net.embedding_net3(w1)
    a2, v2 = net.embedding_net1(neg.audio), net.embedding_net2(neg.video)
    e = net.embedding_net3(table)
    entropy = lambda logits: -(logits.softmax(1) * logits.log_softmax(1)).sum(1)  # noqa: E731
    h_a, h_v = entropy(a1 @ e.t()), entropy(v1 @ e.t())
    target = torch.where(h_a - h_v > 0.1, 1.0, torch.where(h_v - h_a > 0.1, 0.0, 0.5))
    x = torch.cat((pos.audio, pos.video), 1)
    bn = model.attention_model[0]
    w = torch.sigmoid(model.attention_model[1]((x - bn.running_mean) / (bn.running_var + bn.eps).sqrt()
                                               * bn.weight + bn.bias))[:, 0]  # fmt: skip
    l_ta, l_tv = tml(t1, a1, a2, 0.6), tml(t1, v1, v2, 0.6)
    if composite == "reference":  # [B,1] * [B] broadcasts to [B,B] (specs §3.3)
        ct = ((1 - w)[:, None] * l_ta[None, :] + w[:, None] * l_tv[None, :]).mean()
        torch.testing.assert_close(ct, (1 - w).mean() * l_ta.mean() + w.mean() * l_tv.mean())
    else:
        ct = ((1 - w) * l_ta + w * l_tv).mean()
    torch.testing.assert_close(out["l_ct"], ct)
    torch.testing.assert_close(out["l_av"], ((a1 - v1) ** 2).mean())
    torch.testing.assert_close(out["l_sup"], ((w - target) ** 2).mean())
    torch.testing.assert_close(out["loss"], ct + ((a1 - v1) ** 2).mean() + ((w - target) ** 2).mean())
    with pytest.raises(ValueError, match="class_text"):
        model.losses(pos, w1, neg, w2)


def test_gradients_reach_every_trained_parameter():
    d = InputDims(5, 6, 7)
    pos, neg, table = hand_batch(d, 8, 4)
    for name, extra in (("avgzslnet", {}), ("cjme", {"class_text": table, "class_ids": torch.arange(3)})):
        model = build_method(name, {"embeddings_hidden_size": 8, "embedding_use_bn": True}, d)
        model.train()
        model.losses(pos, table[pos.labels], neg, table[neg.labels], **extra)["loss"].backward()
        missing = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == [], (name, missing)


# ----------------------------------------------------------------------------------------------------------------
# Scores


def test_scores_are_distances_of_the_reported_branch():
    d = InputDims(2, 2, 2)
    t = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    a = torch.tensor([[0.1, 0.0], [3.9, 0.2]])  # audio near class 0, then 1
    v = torch.tensor([[0.0, 3.8], [0.3, 0.1]])  # video near class 2, then 0
    for cls in (AVGZSLNet, CJME):
        assert cls.score_kind == "distance"
    avgzsl = build_method("avgzslnet", {}, d)
    torch.testing.assert_close(avgzsl.scores((a, v), t), torch.cdist(a, t) + torch.cdist(v, t))
    cjme = build_method("cjme", {}, d)
    thr = torch.tensor([[0.0], [1.0]])  # sample 0 trusts its audio, sample 1 its video
    s = cjme.scores((a, v, thr), t)
    assert s.argmin(1).tolist() == [0, 0]
    torch.testing.assert_close(s[0], torch.cdist(a, t)[0])
    torch.testing.assert_close(s[1], torch.cdist(v, t)[1])
    video_only = build_method("cjme", {"score_mode": "video"}, d)
    assert video_only.scores((a, v, thr), t).argmin(1).tolist() == [2, 0]


def test_cjme_encodes_the_thresholded_attention_in_eval_mode():
    d = InputDims(5, 6, 7)
    model = build_method("cjme", {"embeddings_hidden_size": 8}, d).eval()
    pos, _, table = hand_batch(d, 6, 5)
    with torch.no_grad():
        a, v, thr = model.encode_samples(pos)
        w = model.attention_model(torch.cat((pos.audio, pos.video), 1))
    assert a.shape == v.shape == (6, 64) and thr.shape == (6, 1)
    assert torch.equal(thr, (w >= 0.5).float()) and (a >= 0).all()  # CJME's output ReLU
    assert model.encode_classes(table).shape == (3, 64)


def test_trainer_hands_negatives_of_other_classes_and_the_training_class_table(tmp_path):
    """specs §3.7: each positive is paired with a sample of another class of the split and that class's text; CJME
    also gets the text of every training class (ascending id)."""
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 4, 6, 9], 5)
    store = FeatureStore.from_arrays(
        rng.standard_normal((20, 5)).astype(np.float32), rng.standard_normal((20, 6)).astype(np.float32), labels, None
    )
    text = F.normalize(torch.randn(10, 7), dim=1)
    model = build_method("cjme", {"embeddings_hidden_size": 8}, InputDims(5, 6, 7))
    cfg = RunConfig(method="cjme", epochs=1, n_batches=3, batch_size=8)
    trainer = Trainer(model, store, text, cfg, torch.device("cpu"), tmp_path, name="s", seed=1, stage=1)
    plan = trainer.plan_epoch(ClassBalancedSampler(labels, np.arange(20), 8, 3), 0)
    for b in range(3):
        batch, pos_text, kw = trainer.load_batch(plan, b)
        assert (kw["negative"].labels != batch.labels).all()
        assert torch.equal(kw["negative_text"], text[kw["negative"].labels])
        assert torch.equal(pos_text, text[batch.labels])
        assert kw["class_ids"].tolist() == [1, 4, 6, 9] and torch.equal(kw["class_text"], text[[1, 4, 6, 9]])
        assert torch.isfinite(model.losses(batch, pos_text, **kw)["loss"])


# ----------------------------------------------------------------------------------------------------------------
# Learning through the CLI (AVCA table: avca-cls; TCAF table: tcaf-cls, averaged at load; ClipClap table: clipclap)

runner = CliRunner()


@pytest.mark.parametrize("method", ["avgzslnet", "cjme"])
@pytest.mark.parametrize("layout", ["avca-cls", "tcaf-cls", "clipclap"])
def test_learns_on_every_layout_of_its_tables(method, layout, synth_root, tmp_path, one_thread):
    root = synth_root(layout, "UCF", scale=0.1)
    args = ["run", "--method", method, "--layout", layout, "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    sets = ["epochs=4", "n_batches=12", "batch_size=64"]
    if layout != "avca-cls":  # the shipped config on avca-cls; elsewhere narrower f_a / f_v keep the test short
        sets.append("model.embeddings_hidden_size=256")
    for item in sets:
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs" / f"{method}_UCF_{layout}_seed42" / "result.json").read_text())
    chance = 100 / len(rec["per_class"])
    m = rec["metrics"]
    # CJME on clipclap varies most by seed (seen 6.0 / 9.5 / 23.8 % for seeds 42 / 1 / 2, chance 2.1 %): the HM must
    # be far above chance and each side clearly above it.
    assert m["hm"] > 3 * chance and m["seen"] > 2 * chance and m["unseen"] > 2 * chance, m


def test_avca_learns_on_the_clipclap_layout(synth_root, tmp_path, one_thread):
    root = synth_root("clipclap", "UCF", scale=0.1)
    args = ["run", "--method", "avca", "--layout", "clipclap", "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    for item in ("epochs=4", "n_batches=12", "batch_size=64"):
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs" / "avca_UCF_clipclap_seed42" / "result.json").read_text())
    chance = 100 / len(rec["per_class"])
    assert rec["metrics"]["seen"] > 3 * chance and rec["metrics"]["unseen"] > 3 * chance, rec["metrics"]


def test_official_test_beta_is_the_mean_of_the_three_mode_betas(synth_root, tmp_path, one_thread):
    """specs §5.3: with --compat official the test beta is (beta_audio + beta_video + beta_both) / 3 of the
    stage-1 model on val (0 -> 1e-10); by default it is the beta of the scored mode."""
    from avlowshot.eval import metrics
    from avlowshot.train import protocol
    from avlowshot.train.trainer import evaluate_split

    root = synth_root("avca-cls", "UCF", scale=0.1)
    base = ["run", "--method", "avgzslnet", "--layout", "avca-cls", "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    for item in ("epochs=2", "n_batches=6", "batch_size=64"):
        base += ["--set", item]
    for extra in ([], ["--compat", "official"]):
        res = runner.invoke(app, base + extra)
        assert res.exit_code == 0, res.output
    plain = json.loads((tmp_path / "runs" / "avgzslnet_UCF_avca-cls_seed42" / "result.json").read_text())
    assert plain["beta_test"] == plain["beta"]
    run_dir = tmp_path / "runs" / "avgzslnet_UCF_avca-cls_seed42_official"
    official = json.loads((run_dir / "result.json").read_text())
    info, cfg = protocol.load_run_info(run_dir)
    ctx = protocol.RunContext(info, cfg, "cpu", cache_dir=tmp_path / "cache")
    s1 = protocol.read_summary(run_dir / "stage-1")
    model = protocol._load_model(ctx, run_dir / "stage-1", s1.checkpoint_best, stage=1)
    betas = []
    for mode in ("audio", "video", "both"):
        model.score_mode = mode
        res = evaluate_split(model, ctx.store, ctx.protocol.stage1_val, ctx.text, ctx.device, 1024,
                             betas=metrics.beta_grid("avca"), phase="val")  # fmt: skip
        betas.append(float(res.beta))
    mean = sum(betas) / 3
    assert official["beta_test"] == pytest.approx(1e-10 if mean == 0 else mean, abs=1e-12), betas
    assert official["beta"] == betas[2]  # the reported val beta stays the scored mode's


def test_mean_mode_beta_scores_each_mode_and_restores_the_model(monkeypatch):
    from types import SimpleNamespace

    from avlowshot.train import protocol

    model = build_method("avgzslnet", {}, InputDims(3, 4, 5))
    ctx = SimpleNamespace(device=torch.device("cpu"), cfg=RunConfig(method="avgzslnet"), store=None, text=None)
    for found, want in (
        ({"audio": 0.2, "video": 0.6, "both": 1.6}, 0.8),
        ({"audio": 0.0, "video": 0.0, "both": 0.0}, 1e-10),
    ):
        calls = []

        def fake(method, *args, found=found, calls=calls, **kwargs):
            calls.append((method.score_mode, kwargs["phase"]))
            return SimpleNamespace(beta=found[method.score_mode])

        monkeypatch.setattr(protocol, "evaluate_split", fake)
        got = protocol._mean_mode_beta(ctx, model, None, "avca", AVGZSLNet.reference_beta_modes)
        assert calls == [("audio", "val"), ("video", "val"), ("both", "val")]
        assert got == pytest.approx(want) and model.score_mode is None


@pytest.mark.parametrize("method", ["avgzslnet", "cjme", "ale", "devise", "sje"])
def test_losses_and_scores_under_bf16_autocast(method):
    """``amp: bf16`` (the CUDA default): every term stays finite and the scores keep their shape."""
    d = InputDims(5, 6, 7)
    pos, neg, table = hand_batch(d, 8, 6)
    model = build_method(method, {"embeddings_hidden_size": 8} if method in ("avgzslnet", "cjme") else {}, d)
    extra = {"class_text": table, "class_ids": torch.arange(3)} if model.needs_class_table else {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train().losses(pos, table[pos.labels], neg, table[neg.labels], **extra)
        assert all(torch.isfinite(v).all() for v in out.values())
        out["loss"].backward()
        model.eval()
        with torch.no_grad():
            s = model.scores(model.encode_samples(pos), model.encode_classes(table))
    assert s.shape == (8, 3) and torch.isfinite(s).all()
