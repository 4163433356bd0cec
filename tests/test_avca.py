"""AVCA: parameter counts of the shipped configs, losses, gradients, BN bookkeeping, the shared layers, and learning
on a toy problem (specs/avca.md §2.1, §3.1, §4.3, §6.4)."""

from __future__ import annotations

import importlib.resources
import math

import pytest
import torch
import yaml
from torch import nn

from avlowshot.data.batching import Batch
from avlowshot.errors import ConfigError
from avlowshot.models import AVCA, AVCAConfig, InputDims, build_method, config_model, count_parameters
from avlowshot.models.layers import Attention, PreNormTransformer

MAIN = InputDims(audio=512, video=512, text=300)
CLS = InputDims(audio=128, video=4096, text=300)
CONFIGS = [f"{ds}-{fs}" for ds in ("ucf", "activitynet", "vggsound") for fs in ("main", "cls")]

# specs/avca.md §2.1 (the reference module built on CPU).
UCF_MAIN_MODULES = {
    "A_enc": 418_180,
    "V_enc": 418_180,
    "cross_attention": 400_264,
    "W_proj": 19_392,
    "D": 20_100,
    "A_proj": 188_096,
    "V_proj": 188_096,
    "A_rec": 20_100,
    "V_rec": 20_100,
    "pos_emb1D": 600,
}
# specs/avca.md §6.4: (r_enc, r_proj, r_dec, momentum, batch size) per run script.
RUN_SCRIPTS = {
    "ucf-main": (0.2, 0.3, 0.5, 0.1, 256),
    "ucf-cls": (0.2, 0.3, 0.5, 0.99, 256),
    "activitynet-main": (0.2, 0.2, 0.1, 0.99, 256),
    "activitynet-cls": (0.2, 0.2, 0.1, 0.99, 256),
    "vggsound-main": (0.0, 0.0, 0.1, 0.1, 64),
    "vggsound-cls": (0.0, 0.0, 0.0, 0.99, 256),
}


def load_config(name: str) -> dict:
    text = importlib.resources.files("avlowshot").joinpath(f"configs/avca/{name}.yaml").read_text()
    return yaml.safe_load(text)


def build(name: str) -> AVCA:
    cfg = load_config(name)
    return build_method("avca", cfg["model"], MAIN if cfg["feature_set"] == "main" else CLS)


def small_model(dims: InputDims, **overrides) -> AVCA:
    cfg = {
        "embeddings_hidden_size": 64,
        "decoder_hidden_size": 64,
        "embedding_dropout": 0.1,
        "decoder_dropout": 0.1,
        "additional_dropout": 0.1,
        "momentum": 0.1,
        "additional_triplets_loss": True,
        "reg_loss": True,
    }
    return build_method("avca", {**cfg, **overrides}, dims)


def random_batch(n: int, dims: InputDims, gen: torch.Generator) -> tuple[Batch, torch.Tensor]:
    batch = Batch(
        audio=torch.randn(n, dims.audio, generator=gen),
        video=torch.randn(n, dims.video, generator=gen),
        labels=torch.randint(0, 5, (n,), generator=gen),
    )
    return batch, torch.nn.functional.normalize(torch.randn(n, dims.text, generator=gen), dim=1)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_match_run_scripts_and_spec_parameter_counts(name):
    cfg = load_config(name)
    r_enc, r_proj, r_dec, momentum, bs = RUN_SCRIPTS[name]
    m = cfg["model"]
    assert cfg["method"] == "avca" and cfg["epochs"] == 50 and cfg["lr"] == 0.001 and cfg["n_batches"] == 500
    assert cfg["weight_decay"] == 1e-5 and cfg["lr_scheduler"] is True and cfg["batch_size"] == bs
    assert (m["embedding_dropout"], m["decoder_dropout"], m["additional_dropout"], m["momentum"]) == (
        r_enc,
        r_proj,
        r_dec,
        momentum,
    )
    assert m["embeddings_hidden_size"] == m["decoder_hidden_size"] == 512 and m["depth_transformer"] == 1
    assert m["additional_triplets_loss"] and m["reg_loss"]

    model = build(name)
    # The spec's totals count every nn.Parameter, the frozen pos_emb1D included; the optimiser steps 600 fewer.
    total = 1_693_108 if cfg["feature_set"] == "main" else 3_331_508
    assert count_parameters(model) == total
    assert count_parameters(model, trainable_only=True) == total - 600
    per_module = {n: count_parameters(c) for n, c in model.named_children()} | {"pos_emb1D": 600}
    if cfg["feature_set"] == "main":
        assert per_module == UCF_MAIN_MODULES
    else:
        assert per_module == UCF_MAIN_MODULES | {"A_enc": 221_572, "V_enc": 2_253_188}


def test_bn_momentum_only_on_output_bn_of_hidden_nets():
    model = build("ucf-cls")  # --momentum 0.99
    hidden_nets = {"A_enc", "V_enc", "A_proj", "V_proj"}
    for name in ("A_enc", "V_enc", "W_proj", "D", "A_proj", "V_proj", "A_rec", "V_rec"):
        bns = [m for m in getattr(model, name).modules() if isinstance(m, nn.BatchNorm1d)]
        expected = [0.1, 0.99] if name in hidden_nets else [0.1]
        assert [bn.momentum for bn in bns] == expected, name


def test_pos_emb_is_frozen_and_state_dict_uses_reference_keys():
    model = build("ucf-main")
    assert not model.pos_emb1D.requires_grad
    assert all(p is not model.pos_emb1D for p in model.trainable_parameters())
    keys = set(model.state_dict())
    # Released reference checkpoints load without a key map.
    for key in (
        "pos_emb1D",
        "A_enc.fc.0.weight",
        "A_enc.fc.5.running_var",
        "W_proj.fc.1.num_batches_tracked",
        "cross_attention.layers.0.0.norm.weight",
        "cross_attention.layers.0.0.fn.to_qkv.weight",
        "cross_attention.layers.0.0.fn.to_out.0.bias",
        "cross_attention.layers.0.1.fn.net.3.weight",
    ):
        assert key in keys, key
    assert "cross_attention.layers.0.0.fn.to_qkv.bias" not in keys


def test_seeded_init_follows_reference_construction_order():
    torch.manual_seed(42)
    model = build("ucf-main")
    torch.manual_seed(42)
    # The reference's Linear layers in construction order, then pos_emb1D (specs §2.1): A_enc, V_enc,
    # cross_attention (to_qkv, to_out, ff1, ff2), W_proj, D, A_proj, V_proj, A_rec, V_rec.
    shapes = [(512, 512), (512, 300)] * 2 + [(300, 900, False), (300, 300), (300, 64), (64, 300)]
    shapes += [(300, 64), (64, 300)] + [(300, 512), (512, 64)] * 2 + [(64, 300)] * 2
    expected = []
    for in_dim, out_dim, *bias in shapes:
        expected += list(nn.Linear(in_dim, out_dim, bias=bias[0] if bias else True).parameters())
    expected.append(torch.randn(2, 300))
    linear = [p for mod in model.modules() if isinstance(mod, nn.Linear) for p in mod.parameters()]
    assert len(linear) + 1 == len(expected)
    for a, b in zip(linear + [model.pos_emb1D], expected, strict=True):
        assert torch.equal(a, b)


def test_training_step_losses_and_gradients():
    gen = torch.Generator().manual_seed(0)
    dims = InputDims(audio=24, video=40, text=300)
    model = small_model(dims).train()
    batch, text = random_batch(16, dims, gen)
    negative, negative_text = random_batch(16, dims, gen)
    out = model.losses(batch, text, negative, negative_text)

    assert list(out) == ["l_rec", "l_ct", "l_w", "l_t", "l_r", "loss"]
    assert all(v.dim() == 0 and math.isfinite(v.item()) for v in out.values())
    assert torch.equal(out["loss"], out["l_rec"] + out["l_ct"] + out["l_w"] + out["l_t"] + out["l_r"])
    out["loss"].backward()
    for name, p in model.named_parameters():
        if name == "pos_emb1D":
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    # The optional terms switch off with their flags.
    plain = small_model(dims, additional_triplets_loss=False, reg_loss=False).train()
    assert list(plain.losses(batch, text, negative, negative_text)) == ["l_rec", "l_ct", "l_w", "loss"]
    with pytest.raises(ValueError, match="negative"):
        model.losses(batch, text)


def test_loss_terms_match_spec_formulas_in_eval_mode():
    """With dropout off and BN in eval mode every term can be recomputed from encode-style passes."""
    gen = torch.Generator().manual_seed(1)
    dims = InputDims(audio=8, video=8, text=12)
    model = small_model(dims, first_additional_triplet=2.0, second_additional_triplet=0.5).eval()
    batch, text = random_batch(6, dims, gen)
    negative, negative_text = random_batch(6, dims, gen)
    with torch.no_grad():
        out = model.losses(batch, text, negative, negative_text)
        tml = nn.TripletMarginLoss(margin=1.0)
        mse = nn.MSELoss()
        theta_v, theta_v_neg = model.encode_samples(batch), model.encode_samples(negative)
        theta_w, theta_w_neg = model.encode_classes(text), model.encode_classes(negative_text)
        phi_a = model.A_enc(batch.audio)
        phi_v = model.V_enc(batch.video)
        y = model.cross_attention(torch.stack((phi_a, phi_v), 1) + model.pos_emb1D)
        # The double residual: the transformer output already holds its input, phi is added once more.
        theta_a = model.A_proj(phi_a + y[:, 0])
        torch.testing.assert_close(theta_v, model.V_proj(phi_v + y[:, 1]))
        pa, pv = model.A_enc(negative.audio), model.V_enc(negative.video)
        yn = model.cross_attention(torch.stack((pa, pv), 1) + model.pos_emb1D)
        theta_a_neg = model.A_proj(pa + yn[:, 0])
        l_t = 2.0 * (tml(theta_a, theta_w, theta_a_neg) + tml(theta_v, theta_w, theta_v_neg)) + 0.5 * (
            tml(theta_w, theta_a, theta_w_neg) + tml(theta_w, theta_v, theta_w_neg)
        )
        rho = {k: model.D(v) for k, v in dict(w=theta_w, a=theta_a, v=theta_v, an=theta_a_neg, vn=theta_v_neg).items()}
        l_rec = mse(text, rho["v"]) + mse(text, rho["a"]) + mse(text, rho["w"])
        l_ct = tml(rho["w"], rho["a"], rho["an"]) + tml(rho["w"], rho["v"], rho["vn"])
        l_r = (
            mse(model.V_rec(theta_v), phi_v)
            + mse(model.A_rec(theta_a), phi_a)
            + mse(theta_v, theta_w)
            + mse(theta_a, theta_w)
        )
    for key, ref in dict(l_t=l_t, l_rec=l_rec, l_ct=l_ct, l_r=l_r).items():
        torch.testing.assert_close(out[key], ref, rtol=1e-5, atol=1e-6, msg=key)


def test_bn_statistics_follow_reference_call_order():
    """One BN batch per reference call (specs §2.1): the unused passes count too, then the extra train-mode
    get_embeddings pass of §4.3 adds one more to A_enc, V_enc, W_proj, V_proj, A_proj."""
    gen = torch.Generator().manual_seed(2)
    dims = InputDims(audio=8, video=8, text=16)
    model = small_model(dims).train()
    batch, text = random_batch(8, dims, gen)
    negative, negative_text = random_batch(8, dims, gen)

    def calls() -> dict[str, int]:
        return {
            n: int(getattr(model, n).fc[1].num_batches_tracked)
            for n, _ in model.named_children()
            if n != "cross_attention"
        }

    model.losses(batch, text, negative, negative_text)["loss"].backward()
    assert calls() == dict(A_enc=2, V_enc=2, W_proj=2, D=6, A_proj=3, V_proj=3, A_rec=1, V_rec=1)
    params = [p.detach().clone() for p in model.parameters()]
    stats = model.V_proj.fc[5].running_mean.clone()
    model.after_step(batch, text)
    assert calls() == dict(A_enc=3, V_enc=3, W_proj=3, D=6, A_proj=4, V_proj=4, A_rec=1, V_rec=1)
    assert not torch.equal(stats, model.V_proj.fc[5].running_mean)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def test_attention_matches_reference_formula_with_and_without_mask():
    torch.manual_seed(3)
    attn = Attention(dim=12, heads=3, dim_head=4, dropout=0.0)
    x = torch.randn(2, 5, 12)

    def reference(x, mask=None):  # the references' einsum attention with masked_fill(-finfo.max)
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(2, 5, 3, 4).transpose(1, 2) for t in (q, k, v))
        dots = q @ k.transpose(-1, -2) * 4**-0.5
        if mask is not None:
            dots = dots.masked_fill(~mask[:, None], -torch.finfo(dots.dtype).max)
        out = (dots.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 12)
        return attn.to_out(out)

    torch.testing.assert_close(attn(x), reference(x))
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = valid[:, :, None] & valid[:, None, :]  # padded queries see no key at all
    torch.testing.assert_close(attn(x, mask), reference(x, mask))
    # A fully blocked query row attends uniformly (no NaN), as in the references.
    q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    uniform = attn.to_out(v.view(2, 5, 3, 4).mean(1, keepdim=True).reshape(2, 1, 12))
    torch.testing.assert_close(attn(x, mask)[0, 3], uniform[0, 0])

    layer = PreNormTransformer(dim=12, depth=2, heads=3, dim_head=4, mlp_dim=8, dropout=0.0)
    assert torch.isfinite(layer(x, mask)).all()


def test_learns_a_separable_toy_problem():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n_classes, dims = 4, InputDims(audio=16, video=16, text=32)
    proto_a = 2 * torch.randn(n_classes, dims.audio, generator=gen)
    proto_v = 2 * torch.randn(n_classes, dims.video, generator=gen)
    class_text = torch.nn.functional.normalize(torch.randn(n_classes, dims.text, generator=gen), dim=1)

    def sample(labels: torch.Tensor) -> Batch:
        return Batch(
            audio=proto_a[labels] + torch.randn(len(labels), dims.audio, generator=gen),
            video=proto_v[labels] + torch.randn(len(labels), dims.video, generator=gen),
            labels=labels,
        )

    model = small_model(dims, embedding_dropout=0.0, decoder_dropout=0.0, additional_dropout=0.0).train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, weight_decay=1e-5)
    history = []
    for _ in range(60):
        labels = torch.randint(0, n_classes, (32,), generator=gen)
        neg_labels = (labels + torch.randint(1, n_classes, (32,), generator=gen)) % n_classes
        batch, negative = sample(labels), sample(neg_labels)
        loss = model.losses(batch, class_text[labels], negative, class_text[neg_labels])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(batch, class_text[labels])
        history.append(loss.item())
    assert sum(history[-10:]) < 0.7 * sum(history[:10])

    model.eval()
    test_labels = torch.arange(n_classes).repeat_interleave(25)
    with torch.no_grad():
        scores = model.scores(model.encode_samples(sample(test_labels)), model.encode_classes(class_text))
    assert scores.shape == (100, n_classes) and (scores >= 0).all()
    accuracy = (scores.argmin(1) == test_labels).float().mean().item()
    assert accuracy > 0.9


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.hidden_size: unknown key"):
        build_method("avca", {"hidden_size": 512}, MAIN)
    with pytest.raises(ConfigError, match=r"model\.momentum"):
        build_method("avca", {"momentum": "high"}, MAIN)
    with pytest.raises(ConfigError, match=r"unknown method 'avcaa'; known methods: .*\bavca\b"):
        build_method("avcaa", {}, MAIN)
    assert config_model("avca") is AVCAConfig
    # Unset keys take the reference main.py defaults.
    assert AVCAConfig().model_dump() == load_config("ucf-main")["model"] | dict(
        embeddings_hidden_size=1024,
        decoder_hidden_size=64,
        embedding_dropout=0.8,
        decoder_dropout=0.5,
        additional_dropout=0.0,
        momentum=0.99,
        additional_triplets_loss=False,
        reg_loss=False,
        head="text",
    )
