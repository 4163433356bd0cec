"""TCAF and AVCA adapted to GFSL (AV-DIFF Table 2; baselines.md §3.6, §3.7): TCAF keeps its model and text head
(distances, beta added to non-novel classes); AVCA gets a classifier on its video output (AVCA_cls by default,
AVCA_cls_original and the text head as alternatives)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avlowshot.data.batching import Batch
from avlowshot.eval.metrics import beta_grid
from avlowshot.models import InputDims, build_method, count_parameters
from avlowshot.train.config import load_config, shipped_config

pytestmark = pytest.mark.usefixtures("one_thread")
DIMS = InputDims(audio=128, video=4096, text=300)


def test_tcaf_gfsl_is_tcaf_with_its_text_head():
    assert shipped_config("tcaf", "UCF", "cls", shots=5).name == "ucf-cls.yaml"
    cfg = load_config(None, method="tcaf", dataset="UCF", feature_set="cls", shots=5)
    assert cfg.beta_grid == "tcaf"  # linspace(0, 3, 16), added to the distances of non-novel classes
    np.testing.assert_allclose(beta_grid("tcaf"), np.linspace(0, 3, 16), atol=1e-6)
    assert build_method("tcaf", cfg.model, DIMS).score_kind == "distance"


@pytest.mark.parametrize("dataset,n", [("UCF", 48), ("ActivityNet", 198), ("VGGSound", 271)])
def test_avca_gfsl_configs_add_a_classifier_on_theta_v(dataset, n):
    gz = load_config(None, method="avca", dataset=dataset, feature_set="cls")
    base = count_parameters(build_method("avca", gz.model, DIMS, classes=np.arange(n)))
    for shots in (1, 5, 10, 20):
        cfg = load_config(None, method="avca", dataset=dataset, feature_set="cls", shots=shots)
        assert cfg.model["head"] == "classifier" and cfg.beta_grid == "avdiff"
        assert {k: v for k, v in cfg.model.items() if k != "head"} == {k: v for k, v in gz.model.items() if k != "head"}
        m = build_method("avca", cfg.model, DIMS, classes=np.arange(n))
        assert count_parameters(m) == base + 65 * n and m.score_kind == "probability"


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(8, 128, generator=g), torch.randn(8, 4096, generator=g), torch.tensor([3, 5, 9] * 2 + [3, 5])
    )


def test_avca_classifier_heads_losses_and_probabilities():
    classes = np.array([3, 5, 9])
    small = {"embeddings_hidden_size": 32, "decoder_hidden_size": 16}
    torch.manual_seed(0)
    cls = build_method("avca", {**small, "head": "classifier"}, DIMS, classes=classes)
    batch, text = _batch(1), torch.randn(8, 300)
    cls.train()
    torch.manual_seed(1)
    out = cls.losses(batch, text)
    assert set(out) == {"l_ce", "loss"}
    torch.manual_seed(1)
    want = F.cross_entropy(cls.classifier(cls.encode_video(batch)), torch.tensor([0, 1, 2] * 2 + [0, 1]))
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    cls.eval()
    with torch.no_grad():
        probs = cls.encode_samples(batch)
        cols = cls.encode_classes(torch.zeros(2, 300), class_ids=torch.tensor([5, 9]))
        assert torch.allclose(probs.sum(1), torch.ones(8)) and torch.equal(cls.scores(probs, cols), probs[:, [1, 2]])
    # AVCA_cls_original: AVCA's own terms plus the CE; the text head: AVCA unchanged
    torch.manual_seed(0)
    orig = build_method("avca", {**small, "head": "classifier+avca"}, DIMS, classes=classes).train()
    neg = _batch(2)
    terms = orig.losses(batch, text, neg, torch.randn(8, 300))
    assert {"l_rec", "l_ct", "l_w", "l_ce"} <= set(terms)
    assert terms["loss"].item() == pytest.approx(sum(v.item() for k, v in terms.items() if k != "loss"), rel=1e-5)
    torch.manual_seed(0)
    text_head = build_method("avca", small, DIMS, classes=classes)
    assert not text_head.needs_label_space and text_head.score_kind == "distance"
    assert not hasattr(text_head, "classifier")
