"""Attention Fusion and Perceiver (specs/baselines.md §1.2-§1.5, §2.1, §2.2, §3.1, §3.2): parameter counts of the
shipped configs, padding invariance, the two heads' losses and score directions, and learning through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from avlowshot.cli import app
from avlowshot.data.batching import Batch
from avlowshot.models import InputDims, build_method, count_parameters
from avlowshot.models.registry import shipped_configs
from avlowshot.train.config import load_config

runner = CliRunner()
DATASETS = {"ucf": "UCF", "activitynet": "ActivityNet", "vggsound": "VGGSound"}
DIMS = {"cls": InputDims(128, 4096, 300), "main": InputDims(512, 512, 300)}
STAGE2_CLASSES = {"UCF": 48, "ActivityNet": 198, "VGGSound": 271}  # C2 of the k-shot benchmarks


def emb(i: int, o: int, h: int = 0) -> int:
    """Parameters of EmbeddingNet(i -> [h ->] o) with BatchNorm in every layer."""
    return (i * h + 3 * h + h * o + 3 * o) if h else (i * o + 3 * o)


def expected(method: str, m: dict, dims: InputDims, classes: int) -> int:
    """The PROPOSED architecture's count, summed from its blocks (§1.2-§1.5, §2.1, §2.2)."""
    h, hd, d = m["embeddings_hidden_size"], m["decoder_hidden_size"], 300
    n = emb(dims.audio, d, h) + emb(dims.video, d, h)
    if method == "attention-fusion":
        n += 2 * emb(d, 64, hd) + 2 * (128 * 128 + 128)
    else:
        e = m["transformer_embedding_dim"]
        n += 2 * e + (e * e + e) + e + 2 * ((d + e) * d + d)  # modality, Fourier linear, padding, 2 projections
        n += m["num_latents"] * d
        ff = d * m["transformer_mlp_dim"] + m["transformer_mlp_dim"] + m["transformer_mlp_dim"] * d + d
        ci = m["cross_heads"] * m["cross_dim_head"]
        si = m["transformer_heads"] * m["transformer_dim_head"]
        xb = 3 * 2 * d + 3 * d * ci + (ci * d + d) + ff  # three LayerNorms, q/k/v, out, feed-forward
        tl = 2 * d + 3 * d * si + (si * d + d) + ff  # one shared LayerNorm
        n += m["transformer_depth"] * (xb + tl) + 2 * d + emb(d, 64, hd)
    if m["head"] == "fsl":
        return n + 64 * classes + classes
    return n + emb(64, dims.text, hd) + emb(dims.text, 64) + emb(64, dims.text)


SPEC = {  # specs/baselines.md §2.1, §2.2, §3.1, §3.2 (cls features)
    ("attention-fusion", "zsl"): {"UCF": 3_112_272, "ActivityNet": 3_112_272, "VGGSound": 3_112_272},
    ("attention-fusion", "fsl"): {"UCF": 2_887_096, "ActivityNet": 2_896_846, "VGGSound": 2_901_591},
    ("perceiver", "zsl"): {"UCF": 8_216_640, "ActivityNet": 8_216_640, "VGGSound": 9_913_952},
    ("perceiver", "fsl"): {"UCF": 6_294_152, "ActivityNet": 7_152_558, "VGGSound": 9_703_271},
}


@pytest.mark.parametrize("method", ["attention-fusion", "perceiver"])
def test_parameter_counts_of_every_shipped_config(method):
    names = shipped_configs(method)
    assert len(names) == 6 + 12  # GZSL cls/main x 3 datasets, GFSL 1/5/10/20-shot x 3 datasets
    for name in names:
        parts = name.split("-")
        dataset, fs = DATASETS[parts[0]], parts[1]
        shots = int(parts[2].removesuffix("shot")) if len(parts) == 3 else None
        cfg = load_config(None, method=method, dataset=dataset, feature_set=fs, shots=shots)
        classes = STAGE2_CLASSES[dataset]
        model = build_method(method, cfg.model, DIMS[fs], classes=list(range(classes)))
        n = count_parameters(model)
        assert n == expected(method, cfg.model, DIMS[fs], classes), name
        assert cfg.model["head"] == ("fsl" if shots else "zsl"), name
        if fs == "cls" and (shots is None or shots == 5):
            assert n == SPEC[(method, cfg.model["head"])][dataset], name
        assert model.score_kind == ("probability" if shots else "distance")


def _tiny(method: str, head: str = "zsl", **kw):
    m = {"head": head, "embeddings_hidden_size": 32, "decoder_hidden_size": 16, **kw}
    if method == "perceiver":
        m.update(transformer_depth=2, transformer_heads=2, transformer_dim_head=8, num_latents=4)
    return build_method(method, m, InputDims(12, 20, 300), classes=[2, 5, 7])


def _batch(g: torch.Generator, lengths_a, lengths_v, pad: int = 0, labels=(2, 5, 7)) -> Batch:
    """A temporal batch; ``pad`` extra padded rows (zeros, mask False) appended to both modalities."""
    b = len(lengths_a)
    la, lv = max(lengths_a) + pad, max(lengths_v) + pad
    a = torch.rand(b, la, 12, generator=g) * 255
    v = torch.rand(b, lv, 20, generator=g)
    am = torch.arange(la)[None] < torch.tensor(lengths_a)[:, None]
    vm = torch.arange(lv)[None] < torch.tensor(lengths_v)[:, None]
    a, v = a * am[..., None], v * vm[..., None]
    at = torch.arange(la, dtype=torch.float32).expand(b, la) * 0.96
    vt = torch.arange(lv, dtype=torch.float32).expand(b, lv) * 0.64
    return Batch(a, v, torch.tensor(labels), am, vm, at, vt)


@pytest.mark.parametrize("method", ["attention-fusion", "perceiver"])
@pytest.mark.parametrize("head", ["zsl", "fsl"])
def test_padding_does_not_change_the_eval_outputs(method, head):
    torch.manual_seed(0)
    model = _tiny(method, head).eval()
    batch = _batch(torch.Generator().manual_seed(1), [3, 5, 2], [4, 7, 3])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat((t, torch.zeros(t.shape[0], 6, *t.shape[2:], dtype=t.dtype)), 1)

    def later(t: torch.Tensor) -> torch.Tensor:
        return torch.cat((t, t[:, -1:] + torch.arange(1, 7)), 1)

    padded = Batch(
        pad(batch.audio), pad(batch.video), batch.labels, pad(batch.audio_mask), pad(batch.video_mask),
        later(batch.audio_time), later(batch.video_time),
    )  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model.encode_samples(padded), model.encode_samples(batch), rtol=1e-5, atol=1e-6)


def test_zsl_head_losses_and_distance_scores_follow_the_tcaf_formulas():
    torch.manual_seed(0)
    model = _tiny("perceiver").eval()
    g = torch.Generator().manual_seed(2)
    batch = _batch(g, [3, 5, 2], [4, 7, 3], labels=(5, 2, 7))
    class_text, class_ids = torch.randn(3, 300, generator=g), torch.tensor([2, 5, 7])
    text = class_text[torch.searchsorted(class_ids, batch.labels)]
    with torch.no_grad():
        out = model.losses(batch, text, class_text=class_text, class_ids=class_ids)
        theta = model.encode_samples(batch)
        tw = model.W_proj(text)
        want_rec = ((model.D_o(theta) - text) ** 2).mean() + ((model.D_w(tw) - text) ** 2).mean()
        logits = theta @ model.W_proj(class_text).t()
        want_ce = -torch.log_softmax(logits, 1)[torch.arange(3), torch.tensor([1, 0, 2])].mean()
        scores = model.scores(theta, model.encode_classes(class_text, class_ids=class_ids))
    torch.testing.assert_close(out["l_rec"], want_rec)
    torch.testing.assert_close(out["l_reg"], ((theta - tw) ** 2).mean())
    torch.testing.assert_close(out["l_ce"], want_ce)
    torch.testing.assert_close(out["loss"], want_rec + ((theta - tw) ** 2).mean() + want_ce)
    assert model.score_kind == "distance" and not model.needs_label_space  # open set: any class text scores
    torch.testing.assert_close(scores, torch.cdist(theta, model.W_proj(class_text)))


def test_fsl_head_is_a_classifier_over_the_label_space_read_as_probabilities():
    torch.manual_seed(0)
    model = _tiny("attention-fusion", "fsl").eval()
    batch = _batch(torch.Generator().manual_seed(3), [3, 5, 2], [4, 7, 3], labels=(7, 2, 5))
    with torch.no_grad():
        out = model.losses(batch, torch.zeros(3, 300))
        theta, _ = model.theta_o(batch)
        logits = model.classifier(theta)
        probs = model.encode_samples(batch)
        scores = model.scores(probs, model.encode_classes(torch.zeros(2, 300), class_ids=torch.tensor([5, 7])))
    torch.testing.assert_close(out["l_ce"], F.cross_entropy(logits, torch.tensor([2, 0, 1])))
    assert model.score_kind == "probability" and model.needs_label_space and set(out) == {"l_ce", "loss"}
    torch.testing.assert_close(scores, torch.softmax(logits, 1)[:, [1, 2]])
    with pytest.raises(ValueError, match="label space"):
        model.losses(_batch(torch.Generator(), [2, 2, 2], [2, 2, 2], labels=(2, 5, 3)), torch.zeros(3, 300))


def test_attention_fusion_is_a_convex_per_dimension_mix_of_the_two_modalities():
    torch.manual_seed(0)
    model = _tiny("attention-fusion", unimodal_losses=True).eval()
    batch = _batch(torch.Generator().manual_seed(4), [3, 5, 2], [4, 7, 3])
    with torch.no_grad():
        theta, (ta, tv) = model.theta_o(batch)
    assert bool((theta >= torch.minimum(ta, tv) - 1e-6).all() and (theta <= torch.maximum(ta, tv) + 1e-6).all())
    # the averaged inputs: the mean of each video's valid normalised rows
    a = batch.audio / 255
    want_a = torch.stack([a[i, :n].mean(0) for i, n in enumerate([3, 5, 2])])
    with torch.no_grad():
        torch.testing.assert_close(model.O_proj_a(model.A_enc(want_a)), ta)
    out = model.losses(batch, torch.randn(3, 300), class_text=torch.randn(3, 300), class_ids=torch.tensor([2, 5, 7]))
    assert {"l_ce_a", "l_ce_v"} <= set(out)


def test_perceiver_geglu_alternative_builds_and_runs():
    torch.manual_seed(0)
    gelu, geglu = _tiny("perceiver"), _tiny("perceiver", feed_forward="geglu")
    # per block and feed-forward: GEGLU x4 (300 -> 2400, 1200 -> 300) in place of TCAF's 300 -> 128 -> 300
    delta = (300 * 2400 + 2400 + 1200 * 300 + 300) - (300 * 128 + 128 + 128 * 300 + 300)
    assert count_parameters(geglu) - count_parameters(gelu) == 2 * 2 * delta
    batch = _batch(torch.Generator().manual_seed(5), [3, 5, 2], [4, 7, 3])
    out = geglu.train().losses(
        batch, torch.randn(3, 300), class_text=torch.randn(3, 300), class_ids=torch.tensor([2, 5, 7])
    )
    assert torch.isfinite(out["loss"])


TINY = ["epochs=3", "n_batches=15", "batch_size=48", "lr=2e-3", "embeddings_hidden_size=64", "decoder_hidden_size=64",
        "embedding_dropout=0.1", "decoder_dropout=0.1"]  # fmt: skip
TINY_PERCEIVER = ["transformer_depth=1", "transformer_heads=2", "transformer_dim_head=32", "transformer_dropout=0.1",
                  "num_latents=8"]  # fmt: skip


@pytest.mark.parametrize(
    "method,layout,shots",
    [("attention-fusion", "tcaf-main", None), ("perceiver", "tcaf-cls", None), ("attention-fusion", "tcaf-cls", 5)],
)
def test_fusion_baselines_learn_through_the_cli(synth_root, tmp_path, one_thread, method, layout, shots):
    root = synth_root(layout, "UCF", scale=0.1)
    args = ["run", "--method", method, "--layout", layout, "--dataset", "UCF", "--root-dir", str(root),
            "--log-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    if shots:
        args += ["--shots", str(shots)]
    for item in TINY + (TINY_PERCEIVER if method == "perceiver" else []):
        args += ["--set", item]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    name = f"{method}_UCF_{layout}" + (f"_{shots}shot" if shots else "") + "_seed42"
    rec = json.loads((tmp_path / "runs" / name / "result.json").read_text())
    if shots:
        assert rec["task"] == "gfsl" and rec["config"]["model"]["head"] == "fsl"
        chance = 100 / len(rec["per_class"][0])
        assert rec["metrics"]["base"] > 3 * chance and rec["metrics"]["novel"] > 3 * chance, rec["metrics"]
    else:
        chance = 100 / len(rec["per_class"])
        assert rec["metrics"]["seen"] > 3 * chance and rec["metrics"]["unseen"] > 3 * chance, rec["metrics"]
