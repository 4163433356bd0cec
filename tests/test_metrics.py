"""The calibrated-stacking metric against the specs' test vector, a literal reference implementation and hand counts."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from avlowshot.eval.metrics import (
    BETA_GRIDS,
    BetaCurve,
    EvalResult,
    beta_grid,
    evaluate,
    gfsl_summary,
    harmonic_mean,
    transfer_beta,
)

# ---------------------------------------------------------------------------------------------------------------------
# Literal reference: the ClipClap / TCAF / AVCA ``get_best_evaluation`` (distances) and AV-DIFF's variant
# (probabilities), full [N, n_all] matrix, one pass per beta. ``betas`` is the float32 tensor the reference iterates.


def reference_metric(scores, targets, seen, unseen, n_all, betas, kind):
    seen_label_array = torch.tensor(seen, dtype=torch.long)
    unseen_label_array = torch.tensor(unseen, dtype=torch.long)
    seen_unseen_array = torch.tensor(np.sort(np.concatenate((seen, unseen))), dtype=torch.long)
    targets = torch.tensor(targets, dtype=torch.long)
    n = scores.shape[0]
    seen_scores, unseen_scores, hm_scores, zsl_scores, recalls = [], [], [], [], []
    for beta in betas:
        if kind == "distance":
            distance_mat = torch.zeros((n, n_all), dtype=torch.float) + 99999999999999
            distance_mat[:, seen_unseen_array] = scores
            mask = torch.zeros(n_all, dtype=torch.long)
            mask[seen_label_array] = 99999999999999
            distance_mat_zsl = distance_mat + mask
            mask = torch.zeros(n_all, dtype=torch.long) + beta
            mask[unseen_label_array] = 0
            neighbor_batch = torch.argmin(distance_mat + mask, dim=1)
            neighbor_batch_zsl = torch.argmin(distance_mat_zsl, dim=1)
        else:
            d = torch.full((n, n_all), -1e14)
            d[:, seen_unseen_array] = scores
            pen = torch.zeros(n_all) - beta
            pen[unseen_label_array] = 0
            neighbor_batch = torch.argmax(d + pen, dim=1)
            pen_f = torch.zeros(n_all)
            pen_f[seen_label_array] = -1e14
            neighbor_batch_zsl = torch.argmax(d + pen_f, dim=1)

        match_idx = neighbor_batch.eq(targets.int()).nonzero().flatten()
        match_counts = torch.bincount(neighbor_batch[match_idx], minlength=n_all)[seen_unseen_array]
        target_counts = torch.bincount(targets, minlength=n_all)[seen_unseen_array]
        per_class_recall = torch.zeros(n_all, dtype=torch.float)
        per_class_recall[seen_unseen_array] = match_counts / target_counts
        s = per_class_recall[seen_label_array].mean()
        u = per_class_recall[unseen_label_array].mean()
        hm = (2 * u * s) / ((u + s) + np.finfo(float).eps)
        gzsl_recall = per_class_recall

        match_idx = neighbor_batch_zsl.eq(targets.int()).nonzero().flatten()
        match_counts = torch.bincount(neighbor_batch_zsl[match_idx], minlength=n_all)[seen_unseen_array]
        per_class_recall = torch.zeros(n_all, dtype=torch.float)
        per_class_recall[seen_unseen_array] = match_counts / target_counts
        zsl = per_class_recall[unseen_label_array].mean()

        seen_scores.append(s.item())
        unseen_scores.append(u.item())
        hm_scores.append(hm.item())
        zsl_scores.append(zsl.item())
        recalls.append(gzsl_recall)
    best = np.argmax(hm_scores)
    return {
        "seen": seen_scores[best],
        "unseen": unseen_scores[best],
        "hm": hm_scores[best],
        "zsl": zsl_scores[best],
        "beta": betas[best].item(),
        "recall": recalls[best],
    }


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def assert_matches_reference(result: EvalResult, ref: dict) -> None:
    for key in ("seen", "unseen", "hm", "zsl", "beta"):
        assert same(getattr(result, key), ref[key]), (key, getattr(result, key), ref[key])
    for cls, acc in result.per_class.items():
        assert same(acc, ref["recall"][cls].item()), (cls, acc)


def random_case(seed: int, style: str):
    """15 global classes, a split of 10 (6 seen given in shuffled order, 4 unseen), tie-prone scores."""
    rng = np.random.default_rng(seed)
    n_all, n = 15, 120
    classes = np.sort(rng.choice(n_all, size=10, replace=False))
    perm = rng.permutation(classes)
    seen, unseen = perm[:6], perm[6:]
    labels = np.concatenate([classes, rng.choice(classes, size=n - len(classes) - 4)])
    outside = np.setdiff1d(np.arange(n_all), classes)
    labels = rng.permutation(np.concatenate([labels, rng.choice(outside, size=4)]))  # out-of-split labels count nowhere
    shape = (n, len(classes))
    if style == "int":
        scores = rng.integers(0, 6, size=shape).astype(np.float32)
    elif style == "fifteenths":
        scores = (rng.integers(0, 40, size=shape) * np.float32(1 / 15)).astype(np.float32)
    elif style == "big":  # around 2**24, where adding beta rounds distinct scores onto one value
        scores = (2.0**24 + rng.integers(-6, 7, size=shape)).astype(np.float32)
    else:
        scores = rng.random(shape, dtype=np.float32)
    return torch.from_numpy(scores), labels, classes, seen, unseen, n_all


# ---------------------------------------------------------------------------------------------------------------------


def avca_vector():
    emb = torch.tensor(
        [(0.2, 0.1), (1.5, 0), (3.8, 0.3), (2.6, 0.2), (0.1, 2.5), (0.3, 3.6), (3.0, 2.4), (2.2, 3.9), (1.0, 1.2)]
    )
    class_emb = torch.tensor([(0.0, 0), (4, 0), (0, 4), (4, 4)])
    labels = [0, 0, 2, 2, 3, 3, 5, 5, 3]
    return torch.cdist(emb, class_emb), labels, [0, 2, 3, 5], [0, 2], [3, 5], 6


def test_avca_checked_vector_search():
    r = evaluate(*avca_vector(), kind="distance", betas="avca")
    assert (r.seen, r.unseen, r.hm, r.zsl) == (1.0, 1.0, 1.0, 1.0)
    assert r.beta == pytest.approx(1.6) and r.beta == float(np.float32(1.6))
    assert r.per_class == {0: 1.0, 2: 1.0, 3: 1.0, 5: 1.0}
    assert len(r.curve.hm) == 16 and r.curve.hm[7] < 1.0 == r.curve.hm[8]


def test_avca_checked_vector_fixed_beta():
    r = evaluate(*avca_vector(), kind="distance", beta=transfer_beta(0.0, "avca"))
    assert r.seen == 1.0 and r.zsl == 1.0
    assert r.unseen == pytest.approx(0.833333, abs=1e-6)
    assert r.hm == pytest.approx(0.909091, abs=1e-6)
    assert r.beta == pytest.approx(1e-10)
    assert r.per_class_zsl == {3: 1.0, 5: 1.0}
    assert r.as_percent("gzsl") == pytest.approx({"seen": 100.0, "unseen": 83.3333, "hm": 90.9091, "zsl": 100.0}, 1e-5)


def test_fixed_beta_zero_is_not_a_search():
    r = evaluate(*avca_vector(), kind="distance", beta=0.0)
    assert r.beta == 0.0 and r.unseen == pytest.approx(5 / 6) and len(r.curve.betas) == 1


@pytest.mark.parametrize("kind", ["distance", "probability"])
@pytest.mark.parametrize("style", ["int", "fifteenths", "big", "uniform"])
def test_matches_literal_reference_on_every_grid(kind, style):
    for seed in range(2):
        scores, labels, classes, seen, unseen, n_all = random_case(seed, style)
        for name in BETA_GRIDS:
            grid = torch.from_numpy(beta_grid(name))
            ref = reference_metric(scores, labels, seen, unseen, n_all, grid, kind)
            got = evaluate(scores, labels, classes, seen, unseen, n_all, kind=kind, betas=name)
            assert_matches_reference(got, ref)
        for b in (0.0, 0.2, 1.6, 1 / 15):  # fixed betas, 0.0 included (no falsy re-search)
            ref = reference_metric(scores, labels, seen, unseen, n_all, torch.tensor([b], dtype=torch.float), kind)
            got = evaluate(scores, labels, classes, seen, unseen, n_all, kind=kind, beta=b)
            assert_matches_reference(got, ref)


def test_rounding_tie_goes_to_lowest_class_id():
    # distances 2**24-1 (class 0) and 2**24-2 (class 1) both round to 2**24 once beta=1.6 is added in float32:
    # the full argmin then picks class 0, although class 1 is strictly closer.
    scores = torch.tensor([[2.0**24 - 1, 2.0**24 - 2, 2.0**24 + 4]])
    args = (scores, [0], [0, 1, 2], [0, 1], [2], 3)
    assert evaluate(*args, kind="distance", beta=1.6).per_class[0] == 1.0
    assert evaluate(*args, kind="distance", beta=0.0).per_class[0] == 0.0
    ref = reference_metric(scores, [0], [0, 1], [2], 3, torch.tensor([1.6]), "distance")
    assert ref["recall"][0].item() == 1.0


def test_class_without_samples_gives_nan_like_the_reference():
    scores, labels, classes, seen, unseen, n_all = random_case(3, "int")
    keep = labels != seen[0]
    scores, labels = scores[torch.from_numpy(keep)], labels[keep]
    got = evaluate(scores, labels, classes, seen, unseen, n_all, kind="distance", betas="tcaf")
    assert math.isnan(got.seen) and math.isnan(got.hm) and math.isnan(got.per_class[int(seen[0])])
    assert got.beta == 0.0  # np.argmax picks the first NaN
    ref = reference_metric(scores, labels, seen, unseen, n_all, torch.from_numpy(beta_grid("tcaf")), "distance")
    assert_matches_reference(got, ref)


# ---------------------------------------------------------------------------------------------------------------------
# GFSL, probability scores. Classes 1, 2 (base) and 4, 5 (novel) of 6; dyadic values make every sum exact.

GFSL_SCORES = torch.tensor(
    [
        [0.5, 0.125, 0.25, 0.125],  # label 1
        [0.125, 0.5, 0.375, 0.0],  # label 2
        [0.5, 0.125, 0.375, 0.0],  # label 4
        [0.125, 0.125, 0.25, 0.5],  # label 4
        [0.125, 0.25, 0.125, 0.5],  # label 5
    ]
)
GFSL_ARGS = (GFSL_SCORES, [1, 2, 4, 4, 5], [1, 2, 4, 5], [1, 2], [4, 5], 6)


def test_gfsl_hand_counts_beta_zero():
    # predictions 1, 2, 1, 5, 5: base 2/2 classes right, novel (0/2 + 1/1)/2; FSL (novel columns only): 4, 5, 5
    r = evaluate(*GFSL_ARGS, kind="probability", beta=0.0)
    assert r.as_percent("gfsl") == pytest.approx({"base": 100.0, "novel": 50.0, "hm": 200 / 3, "fsl": 75.0}, 1e-6)
    assert r.per_class == {1: 1.0, 2: 1.0, 4: 0.0, 5: 1.0}
    assert r.per_class_zsl == {4: 0.5, 5: 1.0}


def test_gfsl_hand_counts_beta_quarter():
    # beta 0.25: sample 1 ties 0.25 (class 1) with 0.25 (class 4) and the lower id wins; sample 2 moves to class 4
    r = evaluate(*GFSL_ARGS, kind="probability", beta=0.25)
    assert (r.seen, r.unseen, r.zsl) == (0.5, 0.75, 0.75)
    assert r.hm == pytest.approx(0.6)
    assert r.per_class == {1: 1.0, 2: 0.0, 4: 0.5, 5: 1.0}


def test_gfsl_search_takes_first_maximum():
    # HM: 0 at beta 0.5, 2/3 at 0.125 (ties go to the lower base id) and 2/3 again at 0.0
    r = evaluate(*GFSL_ARGS, kind="probability", betas=[0.5, 0.125, 0.0])
    assert r.beta == 0.125 and r.hm == pytest.approx(2 / 3)
    np.testing.assert_allclose(r.curve.hm, [0.0, 2 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(r.curve.unseen, [0.75, 0.5, 0.5], rtol=1e-6)


def test_base_only_split_does_not_crash():
    r = evaluate(GFSL_SCORES[:2, :2], [1, 2], [1, 2], [1, 2], [], 6, kind="probability", betas="avdiff-base")
    assert r.seen == 1.0 and r.beta == 0.0
    assert math.isnan(r.unseen) and math.isnan(r.hm) and math.isnan(r.zsl) and r.per_class_zsl == {}


# ---------------------------------------------------------------------------------------------------------------------


def test_grids_and_transfers():
    assert len(beta_grid("avca")) == 16 and beta_grid("tcaf")[-1] == 3.0
    clipclap = beta_grid("clipclap")
    assert len(clipclap) == 76 and clipclap[-1] == 5.0 and clipclap.dtype == np.float32
    assert beta_grid("avdiff")[1] == np.float32(0.1) and float(beta_grid("avdiff")[1]) == pytest.approx(0.1000000015)
    assert beta_grid("avdiff-base").tolist() == [0.0]
    assert transfer_beta(0.0, "avca") == 1e-10 and transfer_beta(0.4, "avca") == pytest.approx(0.4, abs=1e-15)
    assert transfer_beta(0.0, "tcaf") == pytest.approx(1e-10 / 3)
    assert transfer_beta(0.4, "clipclap") == pytest.approx(0.4 + 1e-10 / 3, abs=1e-15)
    assert transfer_beta(0.0, "avdiff") == 0.0
    with pytest.raises(ValueError):
        beta_grid("nope")


def test_bad_inputs_are_refused():
    scores, labels, classes, seen, unseen, n_all = avca_vector()
    with pytest.raises(ValueError, match="exactly one"):
        evaluate(scores, labels, classes, seen, unseen, n_all, kind="distance", betas="avca", beta=0.2)
    with pytest.raises(ValueError, match="together equal"):
        evaluate(scores, labels, classes, seen, [3], n_all, kind="distance", beta=0.2)
    with pytest.raises(ValueError, match="finite"):
        evaluate(scores * float("nan"), labels, classes, seen, unseen, n_all, kind="distance", beta=0.2)
    with pytest.raises(ValueError, match="shape"):
        evaluate(scores[:, :3], labels, classes, seen, unseen, n_all, kind="distance", beta=0.2)


def test_gfsl_summary_is_hm_of_means():
    def result(base, novel, fsl):
        curve = BetaCurve(np.zeros(1, np.float32), np.array([base]), np.array([novel]), np.zeros(1))
        return EvalResult(base, novel, harmonic_mean(base, novel), fsl, 0.0, {}, {}, curve)

    summary = gfsl_summary([result(0.5, 0.2, 0.4), result(0.6, 0.4, 0.5), result(0.7, 0.3, 0.6)])
    assert summary["base"] == pytest.approx(60.0) and summary["novel"] == pytest.approx(30.0)
    assert summary["hm"] == pytest.approx(40.0)  # the mean of the per-repeat HMs would be 39.52
    assert summary["fsl"] == pytest.approx(50.0)
    assert summary["base_std"] == pytest.approx(100 * np.std([0.5, 0.6, 0.7]))
    assert summary["repeats"][1] == pytest.approx({"base": 60.0, "novel": 40.0, "hm": 48.0, "fsl": 50.0})


def test_speed_20000_by_300_over_the_clipclap_grid():
    gen = torch.Generator().manual_seed(0)
    n, n_all = 20000, 310
    classes = np.arange(5, 305)
    seen, unseen = classes[:250], classes[250:]
    labels = torch.randint(5, 305, (n,), generator=gen)
    scores = torch.rand(n, 300, generator=gen)
    evaluate(scores[:100], labels[:100], classes, seen, unseen, n_all, kind="distance", betas="clipclap")  # warm-up
    start = time.perf_counter()
    r = evaluate(scores, labels, classes, seen, unseen, n_all, kind="distance", betas="clipclap")
    elapsed = time.perf_counter() - start
    assert len(r.curve.hm) == 76
    assert elapsed < 1.0, f"{elapsed:.3f} s"
