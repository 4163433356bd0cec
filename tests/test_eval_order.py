"""Length-ordered evaluation: temporal samples are encoded sorted by length, each batch padded only to its own
longest sequence, and the codes are put back in store order. With masks in eval mode that must change no score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avlowshot.data.batching import Batch, SequenceWindow, gather, length_order
from avlowshot.data.classes import ClassTable
from avlowshot.data.store import FeatureStore
from avlowshot.models import InputDims, build_method
from avlowshot.train.trainer import encode_samples

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = InputDims(audio=6, video=10, text=12)
TCAF_SMALL = dict(
    embeddings_hidden_size=16, decoder_hidden_size=16, transformer_depth=2, transformer_heads=2,
    transformer_dim_head=8, transformer_mlp_dim=16, transformer_embedding_dim=8, transformer_dim=12,
)  # fmt: skip
AVDIFF_SMALL = dict(
    embeddings_hidden_size=16, transformer_dim=16, transformer_heads=2, transformer_dim_head=8, transformer_depth=2,
    layer_change_attention=1, decoder_hidden_size=16, diffusion_steps=4,
)  # fmt: skip


def _store(n: int = 70) -> FeatureStore:
    """Sequences with a long tail of lengths (1 to 80 video rows), as ActivityNet has."""
    rng = np.random.default_rng(0)
    lv = np.minimum(rng.geometric(0.06, size=n), 80)
    la = np.maximum(1, np.round(lv * 0.64 / 0.96)).astype(int)
    audio = [rng.normal(size=(k, DIMS.audio)).astype(np.float32) for k in la]
    video = [rng.normal(size=(k, DIMS.video)).astype(np.float32) for k in lv]
    names = [f"class_{i}" for i in range(4)]
    classes = ClassTable(names, False, names, {n: rng.normal(size=DIMS.text).astype(np.float32) for n in names})
    return FeatureStore.from_arrays(audio, video, rng.integers(0, 4, size=n), classes)


def _store_order_codes(method, store, indices, window, batch_size):
    """What evaluation did before: batches in store order, windows padded to their full length."""
    method.eval()
    with torch.no_grad():
        return torch.cat([
            method.encode_samples(gather(store, indices[i : i + batch_size], window))
            for i in range(0, len(indices), batch_size)
        ])  # fmt: skip


def _method(name: str, window: int | None):
    torch.manual_seed(0)
    if name == "tcaf":
        return build_method("tcaf", {**TCAF_SMALL, "test_window": window}, DIMS)
    return build_method("avdiff", {**AVDIFF_SMALL, "test_window": window}, DIMS, classes=np.arange(4))


@pytest.mark.parametrize("name", ["tcaf", "avdiff"])
@pytest.mark.parametrize("window", [None, 30])
def test_length_ordered_codes_equal_store_order_codes(name, window):
    store = _store()
    indices = np.random.default_rng(1).permutation(len(store))[:60]
    method = _method(name, window)
    win = method.sequence_window(training=False)
    assert (win is None) == (window is None)
    want = _store_order_codes(method, store, indices, win, 16)
    got = encode_samples(method, store, indices, torch.device("cpu"), 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_length_order_sorts_by_collated_length_and_batches_are_tight():
    store = _store()
    indices = np.arange(len(store))
    window = SequenceWindow(30)
    order = length_order(store, indices, window)
    lv = store.video.lengths().numpy().clip(max=30)[order]
    assert (np.diff(lv) >= 0).all() and sorted(order) == list(indices)
    short = indices[order[:8]]
    batch: Batch = gather(store, short, window, tight=True)
    assert batch.video.shape[1] == int(lv[:8].max()) < 30
    assert gather(store, short, window).video.shape[1] == 30  # training keeps the fixed window
