"""AV-DIFF's ablations (paper Tables 3-6) as named variants: fusion schedules, AV-GAN, unimodal inputs, av_prot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch
from avlowshot.data.classes import ClassTable
from avlowshot.data.store import FeatureStore
from avlowshot.errors import ConfigError
from avlowshot.models import InputDims, build_method, count_parameters
from avlowshot.models.avdiff import ConditionalWGAN, fusion_rules
from avlowshot.train.config import load_config, variant_files

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
DIMS = InputDims(audio=128, video=4096, text=300)
VARIANTS = {
    "full-attention": ("fusion", "full"), "cross-attention": ("fusion", "cross"),
    "self-attention": ("fusion", "self"), "alternate": ("fusion", "alternate"), "av-gan": ("generator", "wgan"),
    "audio": ("modalities", "audio"), "visual": ("modalities", "video"), "av-prot": ("conditioning", "av_prot"),
}  # fmt: skip


def _model(**kw):
    torch.manual_seed(0)
    cfg = {"transformer_depth": 4, "layer_change_attention": 2, "diffusion_steps": 5, **kw}
    return build_method("avdiff", cfg, DIMS, classes=np.arange(5))


def _batch(b=6, la=4, lv=5, seed=2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    am, vm = torch.ones(b, la, dtype=torch.bool), torch.ones(b, lv, dtype=torch.bool)
    am[0, -1] = vm[0, -2:] = False
    at, vt = torch.arange(la).float().expand(b, la) * 0.96, torch.arange(lv).float().expand(b, lv) * 0.64
    a, v = torch.rand(b, la, 128, generator=g) * 255, torch.rand(b, lv, 4096, generator=g)
    return Batch(a, v, torch.arange(b) % 5, am, vm, at, vt)


@pytest.mark.parametrize("dataset", ["UCF", "ActivityNet", "VGGSound"])
def test_every_variant_is_a_shipped_config_for_every_dataset(dataset):
    assert set(variant_files("avdiff")) == set(VARIANTS)
    for name, (key, value) in VARIANTS.items():
        cfg = load_config(None, method="avdiff", dataset=dataset, feature_set="cls", shots=5, variant=name)
        assert cfg.variant == name and cfg.model[key] == value and cfg.dataset == dataset
    with pytest.raises(ConfigError, match="no such variant.*shipped: alternate, audio, av-gan"):
        load_config(None, method="avdiff", dataset="UCF", feature_set="cls", shots=5, variant="av-gann")


def test_fusion_schedules_of_table_3_and_unimodal_full_attention():
    def rules(**kw):
        return fusion_rules(_model(**kw).config)

    assert rules() == ["self", "self", "full", "full"]  # AV-DIFF's hybrid attention (Z = 2)
    assert rules(fusion="full") == ["full"] * 4
    assert rules(fusion="cross") == ["cross"] * 4 and rules(fusion="self") == ["self"] * 4
    assert rules(fusion="alternate") == ["self", "full", "self", "full"]
    assert rules(modalities="audio") == ["full"] * 4  # Table 5: unimodal variants use full attention only
    # cross: audio attends to video and the class token only
    m = _model(fusion="cross")
    mask = m.attention_masks(2, 2, torch.ones(1, 5, dtype=torch.bool))[0][0]
    want = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 1, 1], [1, 0, 0, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    assert torch.equal(mask, want.bool())


@pytest.mark.parametrize("use,other", [("audio", "video"), ("video", "audio")])
def test_unimodal_variant_ignores_the_other_modality(use, other):
    m = _model(modalities=use).eval()
    batch, changed = _batch(), _batch()
    setattr(changed, other, getattr(batch, other) * 3 + 1)
    same = _batch()
    setattr(changed, use, getattr(same, use))
    with torch.no_grad():
        torch.testing.assert_close(m.encode_samples(batch), m.encode_samples(changed))
        both = _model().eval()
        assert not torch.allclose(both.encode_samples(batch), both.encode_samples(changed))


def test_wgan_losses_and_gradients_reach_only_their_own_network():
    gan = ConditionalWGAN(x_dim=4, w_dim=3, latent=2, g_hidden=8, d_hidden=8, gp=10.0)
    g = torch.Generator().manual_seed(0)
    real, w = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    torch.manual_seed(1)
    total = gan.loss(real, w)
    total.backward()
    d_grad = [p.grad.clone() for p in gan.D.parameters()]
    g_grad = [p.grad.clone() for p in gan.G.parameters()]
    # the same draws, the two losses written out: the critic sees detached fakes, G sees the critic's output only
    gan.zero_grad()
    torch.manual_seed(1)
    z = torch.randn(5, 2)
    fake = gan.G(torch.cat((z, w), 1))
    eps = torch.rand(5, 1)
    mix = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    d_mix = gan.D(torch.cat((mix, w), 1))
    grad = torch.autograd.grad(d_mix.sum(), mix, create_graph=True)[0]
    gp = ((grad.norm(dim=1) - 1) ** 2).mean()
    critic = gan.D(torch.cat((fake.detach(), w), 1)).mean() - gan.D(torch.cat((real, w), 1)).mean() + 10 * gp
    gen = -gan.D(torch.cat((fake, w), 1)).mean()
    assert total.item() == pytest.approx((critic + gen).item(), rel=1e-5)
    critic.backward()
    for want, got in zip([p.grad for p in gan.D.parameters()], d_grad, strict=True):
        torch.testing.assert_close(got, want)
    gan.zero_grad()
    gen.backward()
    for want, got in zip([p.grad for p in gan.G.parameters()], g_grad, strict=True):
        torch.testing.assert_close(got, want)


def test_av_gan_model_trains_the_classifier_on_generated_novel_features():
    m = _model(generator="wgan", latent_generator=16, discriminator_hidden_size=32, generator_hidden_size=32)
    assert not hasattr(m, "generator") and isinstance(m.diffusion, ConditionalWGAN)
    m.train()
    out = m.losses(_batch(), torch.randn(6, 300), stream="novel")
    assert set(out) == {"l_ce", "l_ce_fake", "l_gan", "loss"}
    m.zero_grad()
    out["l_ce_fake"].backward()
    assert m.diffusion.G[0].weight.grad.abs().sum() > 0 and m.O_proj.fc[0].weight.grad is None


def test_av_prot_conditions_the_generator_on_class_means_of_the_training_samples():
    rng = np.random.default_rng(0)
    lengths = [3, 1, 4, 2, 5, 2]
    audio = [rng.integers(0, 255, (n, 128)).astype(np.uint8) for n in lengths]
    video = [rng.random((n, 4096)).astype(np.float32) for n in lengths]
    labels = np.array([0, 0, 1, 1, 2, 4])
    names = [f"c{i}" for i in range(5)]
    table = ClassTable(names, False, names, {n: np.ones(300, np.float32) for n in names})
    store = FeatureStore.from_arrays(audio, video, labels, table)
    m = _model(conditioning="av_prot")
    default = _model()
    gen_in = m.generator.net[1].in_features
    assert gen_in == 64 + 1 + 128 + 4096 and default.generator.net[1].in_features == 64 + 1 + 300
    assert count_parameters(m) - count_parameters(default) == (4224 - 300) * m.generator.net[1].out_features
    m.observe_training_set(store, np.array([0, 1, 2, 4]))

    def mean_of(i):
        v = video[i] / np.linalg.norm(video[i], axis=1, keepdims=True)
        return np.concatenate([audio[i].mean(0) / 255.0, v.mean(0)])

    for c, members in ((0, [0, 1]), (1, [2]), (2, [4])):
        proto = np.mean([mean_of(i) for i in members], axis=0)
        np.testing.assert_allclose(m.prototypes[c].numpy(), proto / np.linalg.norm(proto), rtol=1e-4, atol=1e-6)
    cond = m._condition(torch.randn(3, 300), torch.tensor([1, 0, 2]))
    assert torch.equal(cond, m.prototypes[[1, 0, 2]])


def test_cli_variant_run_names_its_run_directory(synth_root, tmp_path):
    root = synth_root("avdiff", "UCF", scale=0.05, shots=5)
    narrow = [
        "epochs=3", "substage_epochs.full=2", "n_batches=20", "batch_size=32", "lr=3e-3", "eval_batch_size=256",
        "model.embeddings_hidden_size=64", "model.transformer_dim=64", "model.transformer_heads=2",
        "model.transformer_dim_head=16", "model.transformer_depth=2", "model.layer_change_attention=1",
        "model.decoder_hidden_size=64", "model.generator_hidden_size=64",
    ]  # fmt: skip
    args = ["run", "--method", "avdiff", "--layout", "avdiff", "--dataset", "UCF", "--shots", "5", "--variant",
            "av-gan", "--root-dir", str(root), "--log-dir", str(tmp_path / "runs"), "--cache-dir",
            str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    for item in narrow:
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "runs" / "avdiff_UCF_avdiff_5shot_seed42_av-gan" / "result.json").read_text())
    assert rec["config"]["variant"] == "av-gan" and rec["config"]["model"]["generator"] == "wgan"
    m = rec["metrics"]
    # three short epochs: the base classes are barely learnt (base 8.7 % and 5.95 % with two dropout streams, chance
    # 2.1 %), the novel ones well (55.6 / 57.4 %)
    assert m["base"] > 2 * 100 / 48 and m["novel"] > 3 * 100 / 48 and m["fsl"] > 100 / 6, m
    bad = runner.invoke(app, args[:10] + ["nope"] + args[11:])
    assert bad.exit_code == 2 and "no such variant" in bad.output
