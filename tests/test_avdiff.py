"""AV-DIFF: parameter counts of the shipped configs, hybrid attention masks, the DDPM, batched sampling, the
curriculum end to end through the CLI (avdiff layout and GFSL derived from tcaf-cls), and exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch
from avlowshot.models import InputDims, build_method, count_parameters
from avlowshot.models.avdiff import AVDiff, official_novel_text
from avlowshot.train import protocol
from avlowshot.train.config import load_config
from avlowshot.train.trainer import Interrupted

runner = CliRunner()
DIMS = InputDims(128, 4096, 300)

# specs/avdiff.md §3.10: (C1, total, trainable after freeze), (C2, total, trainable after freeze)
PARAMS = {
    ("UCF", 1): ((42, 5_689_047, 220_523), (48, 5_689_437, 220_913)),
    ("UCF", 5): ((42, 5_716_567, 248_043), (48, 5_716_957, 248_433)),
    ("UCF", 10): ((42, 5_716_567, 248_043), (48, 5_716_957, 248_433)),
    ("UCF", 20): ((42, 5_771_607, 303_083), (48, 5_771_997, 303_473)),
    ("ActivityNet", 1): ((150, 6_388_595, 227_543), (198, 6_391_715, 230_663)),
    **{("ActivityNet", k): ((150, 6_416_115, 255_063), (198, 6_419_235, 258_183)) for k in (5, 10, 20)},
    **{("VGGSound", k): ((207, 8_497_404, 258_768), (271, 8_501_564, 262_928)) for k in (1, 5, 10, 20)},
}

# A narrowed model and a short schedule for the end-to-end runs (the faithful one takes minutes on 2 CPU cores).
NARROW = [
    "epochs=3", "substage_epochs.full=2", "n_batches=20", "batch_size=32", "lr=3e-3", "eval_batch_size=256",
    "model.embeddings_hidden_size=64", "model.transformer_dim=64", "model.transformer_heads=2",
    "model.transformer_dim_head=16", "model.transformer_depth=2", "model.layer_change_attention=1",
    "model.decoder_hidden_size=64", "model.diffusion_steps=6",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dataset,shots", sorted(PARAMS))
def test_parameter_counts_of_shipped_configs(dataset, shots):
    cfg = load_config(None, method="avdiff", dataset=dataset, feature_set="cls", shots=shots)
    assert cfg.dataset == dataset and cfg.beta_grid == "avdiff" and cfg.substage_epochs == {"full": 20}
    for n_classes, total, trainable in PARAMS[dataset, shots]:
        torch.manual_seed(0)
        m = build_method("avdiff", cfg.model, DIMS, classes=np.arange(n_classes))
        assert count_parameters(m) == total
        m.enter_substage("full")
        assert count_parameters(m, trainable_only=True) == trainable


def _model(**kw) -> AVDiff:
    cfg = {"transformer_depth": 3, "layer_change_attention": 2, "diffusion_steps": 100, **kw}
    torch.manual_seed(0)
    return build_method("avdiff", cfg, DIMS, classes=np.arange(5))


def test_hybrid_attention_masks_per_layer():
    m = _model()
    # Ta = 2, Tv = 3, the last video token padded (specs §3.5's printed example); rows = queries.
    valid = torch.tensor([[True, True, True, True, True, False]])
    masks = m.attention_masks(2, 3, valid)
    self_cls = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 0, 0, 1, 1, 0],
            [1, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],  # padded query: blocked everywhere (the attention lets it through uniformly)
        ],
        dtype=torch.bool,
    )
    full = torch.tensor([[1, 1, 1, 1, 1, 0]] * 5 + [[0] * 6], dtype=torch.bool)
    assert len(masks) == 3
    assert torch.equal(masks[0][0], self_cls) and torch.equal(masks[1][0], self_cls)
    assert torch.equal(masks[2][0], full)


def test_ddpm_schedule_noising_and_one_step():
    d = _model().diffusion
    assert d.beta[1].item() == pytest.approx(3.0101e-4, abs=1e-8)
    assert d.alpha_bar[0].item() == pytest.approx(0.9999, abs=1e-7)
    assert d.alpha_bar[50].item() == pytest.approx(0.769291, abs=1e-5)
    assert d.alpha_bar[99].item() == pytest.approx(0.363563, abs=1e-5)
    g = torch.Generator().manual_seed(1)
    x0, eps, z = (torch.randn(4, 64, generator=g) for _ in range(3))
    w = torch.randn(4, 300, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    ab = torch.tensor([float(np.prod([1 - (1e-4 + (0.02 - 1e-4) * i / 99) for i in range(s + 1)])) for s in t])
    want = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * eps
    assert torch.allclose(d.q_sample(x0, t, eps), want, atol=1e-5)
    with torch.no_grad():
        eps_hat = d.eps_model(x0, t, w)
        beta = 1e-4 + (0.02 - 1e-4) * t.double() / 99
        mean = (x0 - (beta / (1 - ab.double()).sqrt())[:, None] * eps_hat) / (1 - beta).sqrt()[:, None]
        want = mean + beta.sqrt()[:, None] * z
        assert torch.allclose(d.p_sample(x0, t, w, z), want.float(), atol=1e-5)
        # the epsilon network's input is LeakyReLU(cat[x_t, raw integer t, w])
        first = d.eps_model.net[1]
        raw = torch.cat((x0, t.float()[:, None], w), dim=1)
        assert torch.allclose(first(torch.nn.functional.leaky_relu(raw, 0.01)), d.eps_model.net[:2](raw))


def _batch(b=6, la=4, lv=5) -> Batch:
    g = torch.Generator().manual_seed(2)
    am = torch.ones(b, la, dtype=torch.bool)
    vm = torch.ones(b, lv, dtype=torch.bool)
    am[0, -1] = vm[0, -2:] = False
    at = torch.arange(la).float().expand(b, la) * 0.96
    vt = torch.arange(lv).float().expand(b, lv) * 0.64
    return Batch(
        torch.rand(b, la, 128, generator=g) * 255, torch.rand(b, lv, 4096, generator=g),
        torch.arange(b) % 5, am, vm, at, vt,
    )  # fmt: skip


def test_sampling_is_batched_and_trains_through_the_chain():
    m = _model(diffusion_steps=7)
    m.train()
    calls = []
    m.generator.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    batch = _batch()
    text = torch.randn(6, 300)
    out = m.losses(batch, text, stream="novel")
    assert set(out) == {"l_ce", "l_ce_fake", "l_diff", "loss"}
    assert calls == [6] * 7 + [6]  # 7 sampling steps, each for the whole batch; then the L_diff call
    # CE on the synthetic features alone reaches the epsilon network through the sampler, not the fusion part
    m.zero_grad()
    out["l_ce_fake"].backward()
    assert m.generator.net[1].weight.grad.abs().sum() > 0
    assert m.O_proj.fc[0].weight.grad is None
    calls.clear()
    base = m.losses(batch, text, stream="base")  # default: no sampling where the samples are unused
    assert set(base) == {"l_ce", "l_diff", "loss"} and calls == [6]
    off = _model(diffusion=False)
    assert set(off.losses(batch, text, stream="novel")) == {"l_ce", "loss"}


def test_freeze_and_scores():
    m = _model()
    m.enter_substage("full")
    frozen = {n.split(".")[0] for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"A_enc", "V_enc", "cls_token", "position_encoder_block", "Audio_visual_transformer"}
    m.train()
    assert not m.A_enc.training and m.O_proj.training  # default: frozen modules in eval mode
    m.eval()
    with torch.no_grad():
        p = m.encode_samples(_batch())
        cols = m.encode_classes(torch.zeros(2, 300), class_ids=torch.tensor([1, 3]))
        assert torch.allclose(p.sum(1), torch.ones(6)) and torch.equal(m.scores(p, cols), p[:, [1, 3]])


def test_official_novel_text_permutation():
    text = torch.arange(60, dtype=torch.float32).view(60, 1)
    labels = np.array([40, 40, 7, 33, 50, 7])  # set order of {40, 7, 33, 50} in a 8-slot table: 40, 33, 50, 7
    out = official_novel_text(text, labels)
    order = list({40, 7, 33, 50})
    ranked = sorted(order)
    for c in ranked:
        assert out[c, 0] == ranked[order.index(c)]
    assert out[0, 0] == 0  # other classes keep their vector


def _cli(root, base, layout, *extra):
    args = ["run", "--method", "avdiff", "--layout", layout, "--dataset", "UCF", "--shots", "5"]
    args += ["--root-dir", str(root), "--log-dir", str(base / "runs"), "--cache-dir", str(base / "cache"), "--quiet"]
    for item in NARROW:
        args += ["--set", item]
    return runner.invoke(app, args + list(extra))


def _check_record(rec, layout):
    assert rec["method"] == "avdiff" and rec["task"] == "gfsl" and rec["shots"] == 5 and rec["layout"] == layout
    assert len(rec["repeats"]) == 3 and set(rec["metrics"]) == {"base", "novel", "hm", "fsl"}
    assert set(rec["metrics_std"]) == {"base", "novel", "hm", "fsl"}
    assert set(rec["substages"]) == {"base", "full"}
    assert rec["stage2_epochs"] == rec["substages"]["full"]["best_epoch"] + 1
    m = rec["metrics"]
    chance = 100 / 48  # GFSL: the joint label space of UCF (42 base + 6 novel classes)
    assert m["base"] > 3 * chance and m["novel"] > 3 * chance, m
    assert m["fsl"] > 100 / 6, m
    assert m["hm"] == pytest.approx(2 * m["base"] * m["novel"] / (m["base"] + m["novel"]), rel=1e-4)


def test_cli_run_avdiff_layout(synth_root, tmp_path):
    root = synth_root("avdiff", "UCF", scale=0.05, shots=5)
    res = _cli(root, tmp_path, "avdiff")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "avdiff_UCF_avdiff_5shot_seed42"
    _check_record(json.loads((run_dir / "result.json").read_text()), "avdiff")
    for d in ("stage-1/base", "stage-1/full", "stage-2/base", "stage-2/repeat-0", "stage-2/repeat-2"):
        assert (run_dir / d / "summary.json").is_file()
    # predict ranks names of the classifier's label space and refuses others
    rng = np.random.default_rng(0)
    feats = tmp_path / "one.npz"
    np.savez(feats, audio=rng.integers(0, 255, (6, 128), dtype=np.uint8),
             video=rng.random((9, 4096), dtype=np.float32), class_name=np.str_("x"))  # fmt: skip
    names = (root / "class-split" / "all_class.txt").read_text().split()[:3]
    ask = ["predict", "--run-dir", str(run_dir), "--features", str(feats), "--cache-dir", str(tmp_path / "cache")]
    res = runner.invoke(app, ask + ["--classes", ", ".join(names)])
    assert res.exit_code == 0, res.output
    assert all(n in res.output for n in names) and "probability" in res.output
    res = runner.invoke(app, ask + ["--classes", f"{names[0]}, juggling kittens"])
    assert res.exit_code == 2 and "not in the label space" in res.output


def test_cli_run_derived_from_tcaf_cls(synth_root, tmp_path):
    root = synth_root("tcaf-cls", "UCF", scale=0.1)  # 5 shots + test videos per novel class
    res = _cli(root, tmp_path, "tcaf-cls", "--set", "model.diffusion=false")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs" / "avdiff_UCF_tcaf-cls_5shot_seed42" / "result.json").read_text())
    _check_record(rec, "tcaf-cls")
    assert rec["config"]["model"]["diffusion"] is False and rec["split_family"] == "cls_split/5-shot"


def test_resume_equals_uninterrupted(synth_root, tmp_path):
    root = synth_root("avdiff", "UCF", scale=0.05, shots=5)
    sets = [s for s in NARROW if not s.startswith(("n_batches", "epochs", "substage"))]
    sets += ["n_batches=3", "epochs=2", "substage_epochs.full=2", "lr_scheduler=false"]  # Adam carries over

    def spec(log):
        cfg = load_config(None, method="avdiff", dataset="UCF", feature_set="cls", shots=5, overrides=sets)
        return protocol.RunSpec(
            method="avdiff", layout="avdiff", dataset="UCF", root_dir=root, log_dir=tmp_path / log, cfg=cfg,
            shots=5, cache_dir=tmp_path / "cache", compat="official",
        )  # fmt: skip

    whole = protocol.run(spec("a"))
    for k, stop_at in enumerate((2,)):  # stage-1 full, epoch 0 (started from the base substage's best)
        calls = []

        def stop(epoch, record, stop_at=stop_at, calls=calls):
            calls.append(epoch)
            if len(calls) == stop_at + 1:
                raise Interrupted

        s = spec(f"b{k}")
        with pytest.raises(Interrupted):
            protocol.run(s, on_epoch_end=stop)
        resumed = protocol.run(s, resume=True)
        assert resumed["metrics"] == whole["metrics"] and resumed["per_class"] == whole["per_class"]
        assert resumed["substages"]["base"]["best_epoch"] == whole["substages"]["base"]["best_epoch"]
    assert math.isfinite(whole["metrics"]["fsl"])


def test_validation_windows_follow_the_compat_mode():
    """ActivityNet: the reference validates stage 1 on 30-row windows and tests on 300; the default uses 300."""
    from avlowshot.data.batching import SequenceWindow

    windows = {"train_window": 60, "val_window": 30, "test_window": 300}
    cfg = {"transformer_depth": 3, "layer_change_attention": 2, "diffusion_steps": 100, **windows}
    fixed = build_method("avdiff", cfg, DIMS, classes=np.arange(5))
    official = build_method("avdiff", cfg, DIMS, compat="official", classes=np.arange(5))
    assert fixed.sequence_window(True) == SequenceWindow(60)
    assert fixed.sequence_window(False, phase="val") == SequenceWindow(300)
    assert fixed.sequence_window(False, phase="test") == SequenceWindow(300)
    assert official.sequence_window(False, phase="val") == SequenceWindow(30, official=True)
    assert official.sequence_window(False, phase="test") == SequenceWindow(300, official=True)
