"""f-VAEGAN-D2 (AVCA repository baseline): parameter counts of the shipped configs, the critic / generator / classifier
losses on hand-made batches from the spec's formulas, which networks each step trains, the generated unseen
features reaching the classifier, the score direction, the curriculum, and learning through the CLI
(specs/avca.md §2.6, §3.6, §4.6, §6.3-§6.4)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch
from avlowshot.models import InputDims, build_method, count_parameters, registry
from avlowshot.train.config import load_config

runner = CliRunner()
DIMS = {"main": InputDims(audio=512, video=512, text=300), "cls": InputDims(audio=128, video=4096, text=300)}
DATASETS = {"ucf": "UCF", "activitynet": "ActivityNet", "vggsound": "VGGSound"}
# Stage-2 label spaces (specs/avca.md §1.7: test = seen + unseen classes) and the stage-1 ones (val).
STAGE2_CLASSES = {("ucf", "main"): 51, ("activitynet", "main"): 200, ("vggsound", "main"): 276,
                  ("ucf", "cls"): 48, ("activitynet", "cls"): 198, ("vggsound", "cls"): 271}  # fmt: skip
SYN_NUM = {"ucf": 1000, "activitynet": 1000, "vggsound": 10000}  # run scripts' --syn_num (§6.4)


def linear(i: int, o: int) -> int:
    return i * o + o


def spec_counts(res: int, att: int = 300) -> dict[str, int]:
    """specs/avca.md §2.6 layer by layer."""
    return {
        "netE": linear(res + att, 300) + 2 * linear(300, 300),
        "netG": linear(300 + att, 512) + linear(512, res),
        "netD": linear(res + att, 512) + linear(512, 1),
        "netD2": linear(res, 512) + linear(512, 1),
    }


@pytest.mark.parametrize("name", registry.shipped_configs("fvaegan"))
def test_shipped_configs_match_the_reference_and_spec_parameter_counts(name):
    ds, fs = name.split("-")
    cfg = load_config(None, method="fvaegan", dataset=DATASETS[ds], feature_set=fs)
    assert (cfg.epochs, cfg.substage_epochs, cfg.lr, cfg.batch_size, cfg.n_batches) == (50, {"classifier": 30},
                                                                                         0.001, 64, 1)  # fmt: skip
    assert cfg.weight_decay == 0.0 and not cfg.lr_scheduler
    m = cfg.model
    assert (m["lambda1"], m["gan_weight"], m["vae_weight"], m["ud_weight"], m["beta1"]) == (10.0, 1e5, 1.0, 1.0, 0.5)
    assert m["classifier_lr"] == 0.001 and m["classifier_batch_size"] == SYN_NUM[ds] and m["generation"]
    dims = DIMS[fs]
    res = dims.audio + dims.video
    c = STAGE2_CLASSES[(ds, fs)]
    model = build_method("fvaegan", m, dims, classes=list(range(c)))
    want = spec_counts(res)
    for attr, n in want.items():
        assert count_parameters(getattr(model, attr)) == n, attr
    assert count_parameters(model.classifier) == linear(res, c)
    assert count_parameters(model) == sum(want.values()) + linear(res, c)
    if fs == "main":  # the reference's resSize 1024: E 578,100, G 833,024, D 678,913, D2 525,313
        assert list(want.values()) == [578_100, 833_024, 678_913, 525_313]
    # weights_init on D, D2 and the classifier: N(0, 0.02), zero bias
    first = model.netD.fc[0]
    assert float(first.bias.detach().abs().max()) == 0.0 and abs(float(first.weight.detach().std()) - 0.02) < 2e-3


def tiny(generation: bool = True, classes=(0, 1, 2, 3, 4)):
    dims = InputDims(audio=3, video=4, text=5)
    cfg = {"latent_size": 6, "encoder_hidden_size": 8, "decoder_hidden_size": 9, "ndh": 10, "lambda1": 10.0,
           "gan_weight": 7.0, "vae_weight": 0.5, "ud_weight": 2.0, "generation": generation}  # fmt: skip
    return build_method("fvaegan", cfg, dims, classes=list(classes))


def tiny_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = Batch(audio=torch.rand(4, 3, generator=g), video=torch.rand(4, 4, generator=g),
                  labels=torch.tensor([0, 1, 1, 0]))  # fmt: skip
    text = F.normalize(torch.randn(5, 5, generator=g), dim=1)
    return batch, text


def grads(m, loss) -> dict[str, bool]:
    m.zero_grad(set_to_none=True)
    loss.backward()
    return {a: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in getattr(m, a).parameters())
            for a in ("netE", "netG", "netD", "netD2", "classifier")}  # fmt: skip


def test_critic_step_is_the_wgan_gp_loss_of_both_critics():
    m = tiny()
    batch, table = tiny_batch()
    w = table[batch.labels]
    torch.manual_seed(3)
    got = m.losses(batch, w, step="critic")

    torch.manual_seed(3)  # the same draws in the spec's order: z, then alpha of D, then alpha of D2
    x = F.normalize(torch.cat((batch.audio, batch.video), 1), dim=1)  # audio first
    fake = m.netG(torch.randn(4, 6), w).detach()

    def penalty(critic, *cond):
        a = torch.rand(4, 1)
        xh = (a * x + (1 - a) * fake).requires_grad_(True)
        (g,) = torch.autograd.grad(critic(xh, *cond).sum(), xh, create_graph=True)
        return ((g.norm(dim=1) - 1) ** 2).mean()

    l_d = m.netD(fake, w).mean() - m.netD(x, w).mean() + 10.0 * penalty(m.netD, w)
    l_d2 = 2.0 * (m.netD2(fake).mean() - m.netD2(x).mean() + 10.0 * penalty(m.netD2))
    assert math.isclose(float(got["l_critic"].detach()), float(l_d.detach()), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(float(got["l_critic_uncond"].detach()), float(l_d2.detach()), rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(float(got["loss"].detach()), float((l_d + l_d2).detach()), rel_tol=1e-5, abs_tol=1e-6)
    # only the critics learn from it (the fake is detached)
    assert grads(m, got["loss"]) == {"netE": False, "netG": False, "netD": True, "netD2": True, "classifier": False}


def test_generator_step_is_the_vae_plus_weighted_gan_loss_and_leaves_the_critics_alone():
    m = tiny()
    batch, table = tiny_batch(1)
    w = table[batch.labels]
    torch.manual_seed(5)
    got = m.losses(batch, w, step="generator")

    torch.manual_seed(5)
    x = F.normalize(torch.cat((batch.audio, batch.video), 1), dim=1)
    h = torch.relu(m.netE.fc[0](torch.cat((x, w), 1)))
    mean, log_var = m.netE.linear_means(h), m.netE.linear_log_var(h)
    z = mean + torch.randn(4, 6) * torch.exp(0.5 * log_var)
    recon = m.netG(z, w)
    bce = -(x * torch.log(recon) + (1 - x) * torch.log(1 - recon)).sum()  # BCE summed over all elements
    kld = -0.5 * (1 + log_var - mean**2 - log_var.exp()).sum()
    g_cost = -m.netD(recon, w).mean() - m.netD(m.netG(torch.randn(4, 6), w), w).mean()
    want = 7.0 * g_cost + 0.5 * (bce + kld)
    assert math.isclose(float(got["loss"].detach()), float(want.detach()), rel_tol=1e-5)
    assert math.isclose(float(got["l_vae"].detach()), float((bce + kld).detach()), rel_tol=1e-5)
    assert grads(m, got["loss"]) == {"netE": True, "netG": True, "netD": False, "netD2": False, "classifier": False}
    assert all(p.requires_grad for p in m.netD.parameters())  # the flags come back


def test_generated_unseen_features_train_the_classifier():
    """Classes 0, 1 are the training classes; 2, 3, 4 are unseen: with generation, the classifier sees generated
    rows of exactly those classes, and turning generation off changes the unseen columns' update."""
    batch, table = tiny_batch(2)
    kw = {"class_ids": torch.tensor([0, 1]), "label_text": table}
    updates = {}
    for gen in (True, False):
        m = tiny(generation=gen)
        torch.manual_seed(0)
        out = m.losses(batch, table[batch.labels], **kw)
        assert ("l_ce_fake" in out) == gen
        assert grads(m, out["loss"])["netG"] is False  # the generator is not trained by the classifier
        updates[gen] = m.classifier.weight.grad[2:].clone()
        if not gen:  # real rows only: the loss is the plain CE of the real batch
            x = F.normalize(torch.cat((batch.audio, batch.video), 1), dim=1)
            assert torch.allclose(out["loss"], F.cross_entropy(m.classifier(x), batch.labels))
    assert not torch.allclose(updates[True], updates[False])

    m = tiny()
    torch.manual_seed(0)
    out = m.losses(batch, table[batch.labels], **kw)
    # 4 real rows over 2 seen classes = 2 per class -> 2 generated rows per unseen class; recompute that CE
    torch.manual_seed(0)
    labels = torch.tensor([2, 2, 3, 3, 4, 4])
    fake = F.normalize(m.netG(torch.randn(6, 6), table[labels]), dim=1)
    x = F.normalize(torch.cat((batch.audio, batch.video), 1), dim=1)
    want = F.cross_entropy(m.classifier(torch.cat((x, fake))), torch.cat((batch.labels, labels)))
    assert torch.allclose(out["loss"], want, atol=1e-6)
    assert torch.allclose(out["l_ce_fake"], F.cross_entropy(m.classifier(fake), labels), atol=1e-6)


def test_scores_are_classifier_probabilities_read_at_the_split_columns():
    m = tiny(classes=(3, 7, 9)).eval()
    assert m.score_kind == "probability"
    batch, _ = tiny_batch()
    with torch.no_grad():
        m.classifier.weight.zero_()
        m.classifier.bias.copy_(torch.tensor([0.0, 5.0, 1.0]))
        s = m.scores(m.encode_samples(batch), m.encode_classes(torch.zeros(2, 5), class_ids=torch.tensor([7, 9])))
    p = torch.softmax(torch.tensor([0.0, 5.0, 1.0]), 0)
    assert torch.allclose(s, p[1:].expand(4, 2)) and s.argmax(1).tolist() == [0] * 4  # higher = better
    with pytest.raises(ValueError, match="outside the classifier's label space"):
        m.encode_classes(torch.zeros(1, 5), class_ids=torch.tensor([4]))


def test_curriculum_generator_then_classifier():
    cfg = load_config(None, method="fvaegan", dataset="UCF", feature_set="main")
    gen, clf = registry.method_class("fvaegan").curriculum(cfg)
    assert (gen.name, gen.validate, gen.steps, gen.adam_betas) == ("generator", False, ("critic", "generator"),
                                                                   (0.5, 0.999))  # fmt: skip
    assert (clf.name, clf.validate, clf.epochs_key, clf.lr, clf.batch_size, clf.n_batches) == (
        "classifier", True, "classifier", 0.001, 1000, 16)  # fmt: skip
    assert clf.beta_grid is None and registry.method_class("fvaegan").curriculum(cfg, "official")[1].beta_grid == (
        "avdiff-base")  # fmt: skip
    m = build_method("fvaegan", cfg.model, DIMS["main"], classes=list(range(51)))
    m.enter_substage("classifier")
    assert count_parameters(m, trainable_only=True) == linear(1024, 51)


def fvaegan_args(layout: str, root, tmp_path, *extra: str) -> list[str]:
    args = ["run", "--method", "fvaegan", "--layout", layout, "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    for item in SMALL + list(extra):
        args += ["--set", item]
    return args


# A tiny run on the reference's feature set (main): 200 GAN iterations with gan_weight 10 (at 1e5 the VAE term is
# negligible and 200 steps do not condition the generator on the word vector), 48 classifier steps at lr 0.1 (the
# shipped 1-update GAN epochs would learn nothing here).
SMALL = ["epochs=4", "n_batches=50", "batch_size=64", "gan_weight=10.0", "substage_epochs.classifier=4",
         "classifier_n_batches=12", "classifier_batch_size=64", "classifier_lr=0.1"]  # fmt: skip


def test_fvaegan_learns_through_the_cli(synth_root, tmp_path, one_thread):
    layout = "avca-main"
    root = synth_root(layout, "UCF", scale=0.1)
    res = runner.invoke(app, fvaegan_args(layout, root, tmp_path))
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / f"fvaegan_UCF_{layout}_seed42"
    rec = json.loads((run / "result.json").read_text())
    chance = 100 / len(rec["per_class"])
    assert rec["metrics"]["seen"] > 3 * chance and rec["metrics"]["unseen"] > 3 * chance, rec["metrics"]
    n_unseen = sum(1 for v in rec["per_class_zsl"].values() if v is not None)
    assert rec["metrics"]["zsl"] > 2.5 * 100 / n_unseen  # the generated unseen features carry their class
    assert set(rec["substages"]) == {"generator", "classifier"}
    assert rec["substages"]["generator"]["best_epoch"] is None and rec["substages"]["generator"]["stage2_epochs"] == 4
    for stage in ("stage-1", "stage-2"):
        assert (run / stage / "generator" / "summary.json").is_file()
        assert (run / stage / "classifier" / "summary.json").is_file()


def test_official_mode_has_no_calibration():
    from types import SimpleNamespace

    from avlowshot.train import protocol

    ctx = SimpleNamespace(compat="official", cfg=SimpleNamespace(method="fvaegan"))
    assert protocol.test_beta(0.0, ctx) == 0.0  # the val grid is {0} (plain argmax) and 0 stays 0 at test
