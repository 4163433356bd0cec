"""ClipClap-GZSL: parameter counts of the shipped configs, input dims per modality / text, losses, BN bookkeeping,
learning on a toy problem, and a short end-to-end CLI run (specs/clipclap.md §3, §4, §5.3, §7.3, §12)."""

from __future__ import annotations

import importlib.resources
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch
from avlowshot.errors import ConfigError
from avlowshot.models import METHODS, ClipClap, ClipClapConfig, InputDims, build_method, count_parameters

CLIPCLAP = InputDims(audio=1024, video=512, text=1536)  # the clipclap layout: CLAP audio, CLIP video, CLIP ‖ CLAP text
# specs/clipclap.md §7.3 (commands.sh): dataset -> (stage-1 epochs, lr).
RUN_SCRIPTS = {"ucf": (20, 7e-5), "activitynet": (15, 1e-4), "vggsound": (15, 1e-4)}
# specs/clipclap.md §3.2, both/both.
MODULES = {"O_enc": 787_968, "W_enc": 787_968, "O_proj": 296_640, "D_o": 297_984, "W_proj": 32_960, "D_w": 34_304}


pytestmark = pytest.mark.usefixtures("one_thread")


def load_config(name: str) -> dict:
    text = importlib.resources.files("avlowshot").joinpath(f"configs/clipclap/{name}.yaml").read_text()
    return yaml.safe_load(text)


def model(dims: InputDims = CLIPCLAP, compat: str = "none", **overrides) -> ClipClap:
    return build_method("clipclap", overrides, dims, compat)


def random_batch(n: int, dims: InputDims, gen: torch.Generator, n_classes: int = 5) -> tuple[Batch, torch.Tensor]:
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    table = F.normalize(torch.randn(n_classes, dims.text, generator=gen), dim=1)
    batch = Batch(
        audio=torch.randn(n, dims.audio, generator=gen), video=torch.randn(n, dims.video, generator=gen), labels=labels
    )
    return batch, table


def bn_calls(m: ClipClap) -> dict[str, int]:
    return {n: int(c.fc[1].num_batches_tracked) for n, c in m.named_children()}


@pytest.mark.parametrize("name", sorted(RUN_SCRIPTS))
def test_shipped_configs_match_run_scripts_and_spec_parameter_count(name):
    cfg = load_config(f"{name}-clipclap")
    epochs, lr = RUN_SCRIPTS[name]
    assert cfg["method"] == "clipclap" and cfg["feature_set"] == "clipclap"
    assert cfg["epochs"] == epochs and cfg["lr"] == pytest.approx(lr) and isinstance(cfg["lr"], float)
    assert (cfg["batch_size"], cfg["n_batches"], cfg["weight_decay"]) == (64, 300, 1e-5)
    assert cfg["lr_scheduler"] is True and cfg["beta_grid"] == "clipclap"
    assert cfg["model"] == dict(
        modality="both",
        text="auto",
        decoder_hidden_size=512,
        decoder_dropout=0.1,
        additional_dropout=0.1,
        rec_loss=True,
        reg_loss=True,
        cross_entropy_loss=True,
    )
    m = build_method("clipclap", cfg["model"], CLIPCLAP)
    assert count_parameters(m) == count_parameters(m, trainable_only=True) == 2_237_824
    assert {n: count_parameters(c) for n, c in m.named_children()} == MODULES
    # Defaults = config/clipclap.yaml, so an empty model block is the published model.
    assert ClipClapConfig().model_dump() == cfg["model"]
    assert METHODS["clipclap"] is ClipClap


@pytest.mark.parametrize(
    "modality, text, o_in, w_in, total",
    [
        ("both", "auto", 1536, 1536, 2_237_824),
        ("both", "both", 1536, 1536, 2_237_824),
        ("both", "clip", 1536, 512, 1_713_536),
        ("both", "clap", 1536, 1024, 1_975_680),
        ("audio", "auto", 1024, 1024, 1_713_536),  # the reference: CLAP text for audio
        ("video", "auto", 512, 512, 1_189_248),  # and CLIP text for video
        ("audio", "clip", 1024, 512, None),
        ("video", "both", 512, 1536, None),
    ],
)
def test_modality_and_text_select_the_inputs(modality, text, o_in, w_in, total):
    gen = torch.Generator().manual_seed(0)
    m = model(modality=modality, text=text).eval()
    assert (m.O_enc.fc[0].in_features, m.W_enc.fc[0].in_features) == (o_in, w_in)
    if total is not None:  # specs §3.2
        assert count_parameters(m) == total
    batch, table = random_batch(8, CLIPCLAP, gen)
    with torch.no_grad():
        codes, class_codes = m.encode_samples(batch), m.encode_classes(table)
        assert codes.shape == (8, 64) and class_codes.shape == (5, 64)
        # Only the selected inputs matter: perturb the others and the codes stay the same.
        other = Batch(
            audio=batch.audio if modality != "video" else torch.randn(8, 1024, generator=gen),
            video=batch.video if modality != "audio" else torch.randn(8, 512, generator=gen),
            labels=batch.labels,
        )
        assert torch.equal(m.encode_samples(other), codes)
        source = {"auto": {"both": "both", "audio": "clap", "video": "clip"}[modality]}.get(text, text)
        noisy = table.clone()
        if source == "clip":
            noisy[:, 512:] = torch.randn(5, 1024, generator=gen)
        elif source == "clap":
            noisy[:, :512] = torch.randn(5, 512, generator=gen)
        assert torch.equal(m.encode_classes(noisy), class_codes)
        # Video comes first in [v ‖ a] (specs §3.2).
        if modality == "both":
            x = m._sample_input(batch)
            assert torch.equal(x[:, :512], batch.video) and torch.equal(x[:, 512:], batch.audio)


def test_text_selection_needs_the_clip_clap_table():
    w2v = InputDims(audio=128, video=4096, text=300)
    with pytest.raises(ConfigError, match=r"model\.text: 'clip'.*1536.*300 dims"):
        model(w2v, text="clip")
    # auto / both use another layout's table whole.
    assert model(w2v).W_enc.fc[0].in_features == 300
    assert model(w2v, modality="audio").W_enc.fc[0].in_features == 300


def test_losses_terms_gradients_and_class_table():
    gen = torch.Generator().manual_seed(1)
    m = model().train()
    batch, table = random_batch(16, CLIPCLAP, gen, n_classes=7)
    ids = torch.arange(7)
    out = m.losses(batch, table[batch.labels], class_text=table, class_ids=ids)
    assert list(out) == ["l_rec", "l_reg", "l_ce", "loss"]
    assert all(v.dim() == 0 and math.isfinite(v.item()) for v in out.values())
    assert torch.equal(out["loss"], out["l_rec"] + out["l_reg"] + out["l_ce"])
    assert out["l_ce"].item() > 0
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    # The terms switch off with their flags.
    plain = model(reg_loss=False, cross_entropy_loss=False).train()
    assert list(plain.losses(batch, table[batch.labels])) == ["l_rec", "loss"]
    with pytest.raises(ConfigError, match="nothing to train"):
        model(rec_loss=False, reg_loss=False, cross_entropy_loss=False)
    with pytest.raises(ConfigError, match=r"model\.modality"):
        model(modality="text")


def test_loss_terms_match_spec_formulas_in_eval_mode():
    """With dropout off and BN in eval mode every term is recomputed from the sub-networks (specs §4)."""
    gen = torch.Generator().manual_seed(2)
    m = model().eval()
    batch, table = random_batch(12, CLIPCLAP, gen, n_classes=9)
    # Global ids need not be contiguous: the CE target is the label's position among the split's ascending ids.
    ids = torch.tensor([0, 3, 4, 8, 10, 11, 20, 21, 30])
    labels = ids[batch.labels]
    batch.labels = labels
    text = table[torch.searchsorted(ids, labels)]
    with torch.no_grad():
        out = m.losses(batch, text, class_text=table, class_ids=ids)
        theta_o = m.encode_samples(batch)
        w_e = m.W_enc(text)
        theta_w = m.W_proj(w_e)
        l_rec = F.mse_loss(w_e, m.D_o(theta_o)) + F.mse_loss(w_e, m.D_w(theta_w))
        l_reg = ((theta_o - theta_w) ** 2).mean()
        logits = theta_o @ m.encode_classes(table).t()
        l_ce = F.cross_entropy(logits, torch.searchsorted(ids, labels))
    for key, ref in dict(l_rec=l_rec, l_reg=l_reg, l_ce=l_ce).items():
        torch.testing.assert_close(out[key], ref, rtol=1e-5, atol=1e-6, msg=key)
    # Scores: plain Euclidean distance to the class codes.
    torch.testing.assert_close(m.scores(theta_o, theta_w), torch.cdist(theta_o, theta_w))

    # The CE term cannot be computed without the class table.
    with pytest.raises(ValueError, match="class_text"):
        m.losses(batch, text)


def test_bn_statistics_follow_reference_call_order_and_compat():
    """One BN batch per reference call (specs §5.3): forward + the CE class matrix; ``--compat official`` adds the
    extra train-mode get_embeddings pass (O_enc, O_proj 2; W_enc, W_proj 3; D_o, D_w 1)."""
    gen = torch.Generator().manual_seed(3)
    batch, table = random_batch(8, CLIPCLAP, gen)
    text = table[batch.labels]
    for compat, after in (
        ("none", dict(O_enc=1, W_enc=2, O_proj=1, D_o=1, W_proj=2, D_w=1)),
        ("official", dict(O_enc=2, W_enc=3, O_proj=2, D_o=1, W_proj=3, D_w=1)),
    ):
        m = model(compat=compat).train()
        m.losses(batch, text, class_text=table, class_ids=torch.arange(5))["loss"].backward()
        assert bn_calls(m) == dict(O_enc=1, W_enc=2, O_proj=1, D_o=1, W_proj=2, D_w=1)
        params = [p.detach().clone() for p in m.parameters()]
        stats = m.O_enc.fc[1].running_mean.clone()
        m.after_step(batch, text)
        assert bn_calls(m) == after, compat
        assert torch.equal(stats, m.O_enc.fc[1].running_mean) == (compat == "none")
        assert all(torch.equal(a, b) for a, b in zip(params, m.parameters(), strict=True))


def test_state_dict_keys_and_seeded_init_follow_the_reference():
    torch.manual_seed(42)
    m = model()
    keys = set(m.state_dict())
    for key in ("O_enc.fc.0.weight", "W_enc.fc.1.running_var", "O_proj.fc.5.num_batches_tracked", "D_w.fc.0.bias"):
        assert key in keys, key
    torch.manual_seed(42)
    # Construction order O_enc, W_enc, O_proj, D_o, W_proj, D_w (reference ClipClap_model.__init__).
    shapes = [(1536, 512), (1536, 512), (512, 512), (512, 64), (64, 512), (512, 512), (512, 64), (64, 512)]
    expected = [p for i, o in shapes for p in nn.Linear(i, o).parameters()]
    linear = [p for mod in m.modules() if isinstance(mod, nn.Linear) for p in mod.parameters()]
    assert len(linear) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(linear, expected, strict=True))


def test_temporal_batches_are_averaged_over_valid_rows():
    gen = torch.Generator().manual_seed(4)
    dims = InputDims(audio=16, video=8, text=12)
    m = model(dims).eval()
    a, v = torch.randn(3, 5, 16, generator=gen), torch.randn(3, 4, 8, generator=gen)
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    vm = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    temporal = Batch(a, v, torch.zeros(3, dtype=torch.int64), audio_mask=am, video_mask=vm)
    mean_a = torch.stack([a[i, am[i]].mean(0) for i in range(3)])
    mean_v = torch.stack([v[i, vm[i]].mean(0) for i in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(m.encode_samples(temporal), m.encode_samples(Batch(mean_a, mean_v, temporal.labels)))


def test_learns_a_separable_toy_problem_and_loss_decreases():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n_classes, dims = 6, InputDims(audio=32, video=16, text=24)
    proto_a = 2 * torch.randn(n_classes, dims.audio, generator=gen)
    proto_v = 2 * torch.randn(n_classes, dims.video, generator=gen)
    class_text = F.normalize(torch.randn(n_classes, dims.text, generator=gen), dim=1)

    def sample(labels: torch.Tensor) -> Batch:
        return Batch(
            audio=proto_a[labels] + torch.randn(len(labels), dims.audio, generator=gen),
            video=proto_v[labels] + torch.randn(len(labels), dims.video, generator=gen),
            labels=labels,
        )

    m = model(dims, decoder_hidden_size=64).train()
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-3, weight_decay=1e-5)
    ids = torch.arange(n_classes)
    history = []
    for _ in range(80):
        batch = sample(torch.randint(0, n_classes, (32,), generator=gen))
        text = class_text[batch.labels]
        loss = m.losses(batch, text, class_text=class_text, class_ids=ids)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step(batch, text)
        history.append(loss.item())
    assert all(math.isfinite(x) for x in history)
    assert sum(history[-10:]) < 0.6 * sum(history[:10])

    m.eval()
    test_labels = torch.arange(n_classes).repeat_interleave(20)
    with torch.no_grad():
        scores = m.scores(m.encode_samples(sample(test_labels)), m.encode_classes(class_text))
    assert scores.shape == (120, n_classes) and (scores >= 0).all()
    assert (scores.argmin(1) == test_labels).float().mean().item() > 0.9


def test_cli_run_end_to_end(synth_root, tmp_path):
    root = synth_root("clipclap", "UCF", scale=0.05)
    args = ["run", "--method", "clipclap", "--layout", "clipclap", "--dataset", "UCF", "--root-dir", str(root)]
    args += ["--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    args += ["--set", "epochs=3", "--set", "n_batches=20", "--set", "lr=1e-3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "runs").glob("*/result.json")
    res = json.loads(path.read_text())
    assert res["method"] == "clipclap" and res["feature_set"] == "clipclap" and res["layout"] == "clipclap"
    assert res["n_params"] == 2_237_824
    assert res["config"]["beta_grid"] == "clipclap" and res["config"]["batch_size"] == 64
    n_test = len(res["per_class"])
    assert n_test == 48  # UCF cls_split test: 42 seen + 6 unseen classes
    chance = 100.0 / n_test
    m = res["metrics"]
    assert m["seen"] > chance and m["unseen"] > chance and m["hm"] > chance, m
