"""ProtoGAN and TSL (baselines.md §3.8, §3.10): parameter counts, input formulas, GAN and classifier losses on
hand-made batches, the use of the synthetic novel features, and learning through the CLI."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch
from avlowshot.data.classes import ClassTable
from avlowshot.data.store import FeatureStore
from avlowshot.models import registry
from avlowshot.models.base import InputDims, count_parameters
from avlowshot.models.fsgen import TSL, ProtoGAN, concat_average, segment_features
from avlowshot.train.config import read_yaml, validate_config

runner = CliRunner()
DIMS = InputDims(128, 4096, 300)
STAGE2_CLASSES = {"ucf": 48, "activitynet": 198, "vggsound": 271}


def _lin(i, o):
    return i * o + o


def expected_params(method: str, c: int) -> int:
    """Counted from the spec's layer list (§3.8 / §3.10), independently of the code."""
    if method == "protogan":
        g = _lin(128 + 4224, 4096) + _lin(4096, 4224)
        d = _lin(4224 + 4224, 4096) + _lin(4096, 1)
        return g + d + 2 * _lin(4224, c)
    r = _lin(4224, 512) + 2 * 512 + _lin(512, 512) + 2 * 512  # EmbeddingNet 4224 -> 512 -> 512, two BNs
    g = _lin(600, 4096) + _lin(4096, 512)
    d = _lin(812, 4096) + _lin(4096, 1)
    return r + g + d + 3 * _lin(512, c)


@pytest.mark.parametrize("method", ["protogan", "tsl"])
def test_parameter_counts_of_every_shipped_config(method):
    names = registry.shipped_configs(method)
    assert len(names) == 12
    for name in names:
        ds = name.split("-")[0]
        path = resources.files("avlowshot").joinpath("configs", method, name + ".yaml")
        cfg = validate_config(read_yaml(path), source=str(path))
        assert cfg.method == method and cfg.dataset.lower() == ds
        with torch.device("meta"):
            m = registry.build_method(method, cfg.model, DIMS, classes=np.arange(STAGE2_CLASSES[ds]))
        assert count_parameters(m) == expected_params(method, STAGE2_CLASSES[ds]), name
    assert expected_params("protogan", 48) == 70_152_417 and expected_params("tsl", 271) == 10_738_478


def _temporal_batch(lengths_a, lengths_v, da=4, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, la, lv = len(lengths_a), max(lengths_a), max(lengths_v)
    am = torch.arange(la)[None] < torch.tensor(lengths_a)[:, None]
    vm = torch.arange(lv)[None] < torch.tensor(lengths_v)[:, None]
    audio = torch.rand(b, la, da, generator=g) * 255 * am[..., None]
    video = torch.rand(b, lv, dv, generator=g) * vm[..., None]
    at = torch.arange(la, dtype=torch.float32)[None].expand(b, -1) * 0.96
    vt = torch.arange(lv, dtype=torch.float32)[None].expand(b, -1) * 0.64
    return Batch(audio, video, torch.zeros(b, dtype=torch.int64), am, vm, at, vt)


def test_protogan_input_is_the_normalised_average_of_the_valid_rows():
    batch = _temporal_batch([2, 3], [3, 1])
    x = concat_average(batch)
    for i, (na, nv) in enumerate(((2, 3), (3, 1))):
        v = F.normalize(batch.video[i, :nv], dim=1).mean(0)
        a = (batch.audio[i, :na] / 255).mean(0)
        ref = torch.cat((v, a))
        torch.testing.assert_close(x[i], ref / ref.norm())


def test_tsl_segments_split_the_video_and_pick_the_audio_of_each_span():
    batch = _temporal_batch([3, 4], [5, 2])
    x, valid = segment_features(batch, segments=2)
    assert valid.tolist() == [[True, True], [True, True]]
    a, v = batch.audio / 255, F.normalize(batch.video, dim=-1)

    def seg(a_rows, v_rows):
        ref = torch.cat((a_rows.mean(0), v_rows.mean(0)))
        return ref / ref.norm()

    # video 0: 5 tokens -> chunks [0, 3) and [3, 5), i.e. [0, 1.92) s and [1.92, 3.2) s; audio at 0, 0.96, 1.92 s
    torch.testing.assert_close(x[0, 0], seg(a[0, :2], v[0, :3]))
    torch.testing.assert_close(x[0, 1], seg(a[0, 2:3], v[0, 3:5]))
    # video 1: 2 tokens -> [0, 0.64) and [0.64, 1.28) s; audio 0 in the first, the second has none: nearest to 0.96 s
    torch.testing.assert_close(x[1, 0], seg(a[1, :1], v[1, :1]))
    torch.testing.assert_close(x[1, 1], seg(a[1, 1:2], v[1, 1:2]))
    # S = min(10, T_v): 5 and 2 segments
    x10, valid10 = segment_features(batch, segments=10)
    assert valid10.sum(1).tolist() == [5, 2] and x10.shape[1] == 10
    assert torch.all(x10[~valid10] == 0)


def _tiny(method, **kw):
    cls = {"protogan": ProtoGAN, "tsl": TSL}[method]
    cfg = cls.config_class(generator_hidden=16, critic_hidden=16, noise_dim=8, **kw)
    torch.manual_seed(0)
    dims = InputDims(4, 6, 5)
    if method == "tsl":
        cfg = cls.config_class(generator_hidden=16, critic_hidden=16, noise_dim=8, representation_dim=8, **kw)
    return cls(cfg, dims, classes=np.array([0, 1, 2, 3]))


def test_gan_losses_equal_the_wgan_gp_formulas():
    m = _tiny("protogan")
    x = F.normalize(torch.rand(6, 10), dim=1)
    cond = torch.rand(6, 10)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(1)
    out = m.critic_loss(x, cond)
    torch.manual_seed(1)
    fake = m.netG(torch.randn(6, 8), cond)
    alpha = torch.rand(6, 1)
    x_hat = (alpha * x + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(m.netD(x_hat, cond).sum(), x_hat)
    gp = ((grad.norm(dim=1) - 1) ** 2).mean()
    ref = m.netD(fake, cond).mean() - m.netD(x, cond).mean() + 10 * gp
    torch.testing.assert_close(out["loss"], ref)
    torch.manual_seed(2)
    out = m.generator_loss(cond, y)
    torch.manual_seed(2)
    fake = m.netG(torch.randn(6, 8), cond)
    assert torch.allclose(fake.norm(dim=1), torch.ones(6)) and bool((fake >= 0).all())  # ReLU, then L2
    ref = -m.netD(fake, cond).mean() + 0.01 * F.cross_entropy(m.f_pre(fake), y)
    torch.testing.assert_close(out["loss"], ref)
    out["loss"].backward()  # the generator step trains G only
    assert m.netD.fc[0].weight.grad is None and m.netG.fc[0].weight.grad is not None


def _store(n_per_class=(3, 3, 1, 1), seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n_per_class)
    lengths = rng.integers(1, 4, len(labels))
    audio = [rng.integers(0, 255, (n, 4)).astype(np.uint8) for n in lengths]
    video = [rng.random((n, 6)).astype(np.float32) for n in lengths]
    names = [f"c{i}" for i in range(4)]
    table = ClassTable(names, False, names, {n: np.ones(5, np.float32) for n in names})
    return FeatureStore.from_arrays(audio, video, labels, table), audio, video, labels


def test_prototypes_and_the_synthetic_share_of_a_classifier_batch():
    store, audio, video, labels = _store()
    m = _tiny("protogan", n_syn=10)
    idx = np.arange(len(labels))
    m.observe_training_set(store, idx)
    m.observe_novel_set(store, idx[labels >= 2])
    assert m.novel_ids.tolist() == [2, 3] and m.n_real == 8
    for c in range(4):
        xs = []
        for i in np.flatnonzero(labels == c):
            v = video[i] / np.linalg.norm(video[i], axis=1, keepdims=True)
            x = np.concatenate([v.mean(0), audio[i].mean(0) / 255.0])
            xs.append(x / np.linalg.norm(x))
        np.testing.assert_allclose(m.prototypes[c].numpy(), np.mean(xs, 0), rtol=1e-4, atol=1e-6)
    # pooled set: 8 real + 10 fakes x 2 novel classes; a batch of 14 gets round(14 * 10 / 28) = 5 fakes per class
    assert m.synthetic_per_class(14) == 5
    x = torch.rand(14, 10)
    y = torch.randint(0, 4, (14,))
    torch.manual_seed(3)
    out = m.classifier_loss(x, y, None)
    torch.manual_seed(3)
    fake = m.netG(torch.randn(10, 8), m.prototypes[torch.tensor([2] * 5 + [3] * 5)])
    logp = F.log_softmax(m.classifier(torch.cat((x, fake))), dim=1)
    ref = F.nll_loss(logp, torch.cat((y, torch.tensor([2] * 5 + [3] * 5))))
    torch.testing.assert_close(out["loss"], ref)


@pytest.mark.parametrize("method", ["protogan", "tsl"])
def test_turning_the_generator_off_changes_the_novel_classifier(method):
    store, *_ = _store()
    labels = store.labels.numpy()
    idx = np.arange(len(labels))
    weights = {}
    for gen in (True, False):
        m = _tiny(method, generation=gen)
        m.observe_training_set(store, idx)
        m.observe_novel_set(store, idx[labels >= 2])
        m.enter_substage("classifier")
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.01)
        torch.manual_seed(5)
        text = torch.ones(4, 5)
        for _ in range(3):
            out = m.losses(_hand_batch(store), text[store.labels], label_text=text)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        assert ("l_fake" in out) == gen
        weights[gen] = m.classifier.weight.detach().clone()
    assert not torch.allclose(weights[True][2:], weights[False][2:])  # novel columns 2, 3


def _hand_batch(store):
    """All samples of ``store`` as one padded temporal batch."""
    from avlowshot.data.batching import gather

    return gather(store, np.arange(len(store)), None)


def _cli(method, root, tmp_path, tiny):
    args = ["run", "--method", method, "--layout", "avdiff", "--dataset", "UCF", "--shots", "5"]
    args += ["--root-dir", str(root), "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    args += ["--quiet"]
    for item in tiny:
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / f"{method}_UCF_avdiff_5shot_seed42"
    return run_dir, json.loads((run_dir / "result.json").read_text())


GAN_TINY = [
    "epochs=2", "n_batches=8", "model.gan_batch_size=32", "model.generator_hidden=32", "model.critic_hidden=32",
    "model.critic_steps=1", "model.gan_lr=1e-3", "substage_epochs.pretrain=1", "model.pretrain_n_batches=10",
    "model.pretrain_lr=0.01", "substage_epochs.classifier=5", "model.classifier_n_batches=25",
    "model.classifier_batch_size=64", "model.classifier_lr=0.01", "eval_batch_size=256",
]  # fmt: skip


@pytest.mark.parametrize("method", ["protogan", "tsl"])
def test_learns_gfsl_through_the_cli(synth_root, tmp_path, one_thread, method):
    root = synth_root("avdiff", "UCF", scale=0.05, shots=5)
    tiny = GAN_TINY
    if method == "tsl":
        tiny = tiny + ["substage_epochs.representation=3", "model.representation_n_batches=15",
                       "model.representation_batch_size=48", "model.representation_dim=64",
                       "model.representation_lr=0.01", "model.pretrain_batch_size=32",
                       "model.classifier_n_batches=15", "model.classifier_batch_size=48"]  # fmt: skip
    run_dir, rec = _cli(method, root, tmp_path, tiny)
    m, chance = rec["metrics"], 100 / 48
    assert rec["task"] == "gfsl" and len(rec["repeats"]) == 3
    assert m["base"] > 3 * chance and m["novel"] > 3 * chance and m["fsl"] > 100 / 6, m
    # the generator and f_pre read each repeat's shots: trained once per repeat in stage 2
    for sub in ("pretrain", "generator"):
        assert all((run_dir / "stage-2" / sub / f"repeat-{r}" / "summary.json").is_file() for r in range(3))
    assert "l_fake" in json.loads((run_dir / "stage-1" / "classifier" / "history.json").read_text())[0]["train"]


def test_the_averaged_store_gives_protogan_the_same_inputs_and_prototypes():
    store, *_ = _store()
    idx = np.arange(len(store))
    avg = store.averaged(normalize_video_rows=True)
    from avlowshot.data.batching import gather

    torch.testing.assert_close(concat_average(gather(avg, idx)), concat_average(_hand_batch(store)))
    a, b = _tiny("protogan"), _tiny("protogan")
    a.observe_training_set(store, idx)
    b.observe_training_set(avg, idx)
    torch.testing.assert_close(a.prototypes, b.prototypes)
