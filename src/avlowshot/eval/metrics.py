"""GZSL / GFSL metric with calibrated stacking, bit-compatible with the four reference repositories.

The references (AVCA, TCAF and ClipClap ``get_best_evaluation``; AV-DIFF's probability variant) build a float32
matrix of width ``n_all_classes``, add a float32 penalty ``beta`` to every column that is not an unseen (novel) class,
take the first argmin (distances) or argmax (probabilities), and score per-class mean recall. A beta grid is searched
and the first beta with the highest harmonic mean wins. This module returns the same numbers without materialising
``[n_betas, N, n_all]``:

* the penalty is constant over the non-unseen columns, so each sample's prediction only depends on its best
  non-unseen column and its best unseen column, found once;
* float32 rounding of ``score + beta`` can merge two distinct scores; the only way that changes the winner is a
  lower-id non-unseen column whose penalised value rounds onto the minimum. That is detected per sample from the
  smallest score among the columns left of the minimum, and only those rows are recomputed in full;
* the columns outside the split (1e14 in the references) can never win for finite scores below ``MAX_ABS_VALUE``,
  so they are left out;
* recall is float32 ``matches / targets``, the class means are float32 means in the order the caller gives the
  seen / unseen ids (as the references index them), and HM = 2SU / (S + U + eps) in float32.

Ties go to the lowest global class id (the first column), and between equal HMs to the first beta, as in the
references. A class with no test sample gets recall NaN (0/0), which makes its group mean and the HM NaN, as in the
references; ``np.argmax`` then picks the first NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

EPS = float(np.finfo(float).eps)
MAX_ABS_VALUE = 1e12
"""Scores and betas must stay below this in magnitude so the references' 1e14 out-of-split fill never wins."""

_GRID_LINSPACE = {"avca": (0.0, 3.0, 16), "tcaf": (0.0, 3.0, 16), "clipclap": (0.0, 5.0, 76), "avdiff": (0.0, 1.0, 11)}


def _frozen(values: np.ndarray) -> np.ndarray:
    values.setflags(write=False)
    return values


# torch.linspace, not numpy: the references iterate over a float32 torch.linspace, and 27 of the 76 ClipClap values
# differ from float32(np.linspace) in the last bit.
BETA_GRIDS: dict[str, np.ndarray] = {
    **{name: _frozen(torch.linspace(*spec).numpy()) for name, spec in _GRID_LINSPACE.items()},
    "avdiff-base": _frozen(np.zeros(1, dtype=np.float32)),
}
"""Float32 beta grids: AVCA / TCAF 0..3 step 0.2, ClipClap 0..5 step 1/15, AV-DIFF 0..1 step 0.1 (full substage)
and {0} (base substage)."""

MethodFamily = Literal["avca", "tcaf", "clipclap", "avdiff"]


def beta_grid(name: str) -> np.ndarray:
    """A writable float32 copy of a named reference grid (see ``BETA_GRIDS``)."""
    if name not in BETA_GRIDS:
        raise ValueError(f"unknown beta grid {name!r}; choose one of {sorted(BETA_GRIDS)}")
    return BETA_GRIDS[name].copy()


def transfer_beta(beta: float, method_family: MethodFamily) -> float:
    """The fixed test beta the reference derives from the validation beta.

    * ``avca``: ``(b + b + b) / 3`` (mean of the audio / video / both betas, equal for AVCA), 0 replaced by 1e-10;
    * ``tcaf``, ``clipclap``: ``(b + b + b + 1e-10) / 3``;
    * ``avdiff``: ``b`` unchanged (the last stage-1 epoch's beta).

    The offsets exist only to dodge the references' ``if best_beta:`` test, where 0.0 re-searches the grid on the
    test set; ``evaluate(beta=0.0)`` has no such quirk. The AV-DIFF reference does hit it: with a validation beta of
    0.0 it searched the ``"avdiff"`` grid on test, which a caller reproduces with ``evaluate(betas="avdiff")``.
    """
    if method_family == "avca":
        mean = (beta + beta + beta) / 3
        return 1e-10 if mean == 0 else mean
    if method_family in ("tcaf", "clipclap"):
        return (beta + beta + beta + 1e-10) / 3
    if method_family == "avdiff":
        return beta
    raise ValueError(f"unknown method family {method_family!r}; choose avca, tcaf, clipclap or avdiff")


def harmonic_mean(s, u):
    """``2su / (s + u + eps)`` with the references' float64 eps; keeps the dtype of tensor / array inputs."""
    return 2 * s * u / ((s + u) + EPS)


@dataclass(frozen=True)
class BetaCurve:
    """Seen / unseen / HM (fractions) for every beta searched, in grid order."""

    betas: np.ndarray
    seen: np.ndarray
    unseen: np.ndarray
    hm: np.ndarray


@dataclass(frozen=True)
class EvalResult:
    """Metric at the selected beta. Fractions in 0..1; in GFSL terms seen = base, unseen = novel, zsl = FSL."""

    seen: float
    unseen: float
    hm: float
    zsl: float
    beta: float
    per_class: dict[int, float]
    """global class id -> GZSL recall at ``beta``, for every class of the split."""
    per_class_zsl: dict[int, float]
    """unseen global class id -> recall when only unseen classes can be predicted."""
    curve: BetaCurve

    def as_percent(self, task: Literal["gzsl", "gfsl"]) -> dict[str, float]:
        """The four reported numbers x100, under the names the task's papers use."""
        if task == "gzsl":
            names = ("seen", "unseen", "hm", "zsl")
        elif task == "gfsl":
            names = ("base", "novel", "hm", "fsl")
        else:
            raise ValueError(f"unknown task {task!r}; choose 'gzsl' or 'gfsl'")
        return dict(zip(names, (100 * self.seen, 100 * self.unseen, 100 * self.hm, 100 * self.zsl), strict=True))


def _ids(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _betas(betas, beta) -> np.ndarray:
    if (betas is None) == (beta is None):
        raise ValueError("give exactly one of betas (a grid to search) and beta (a fixed value)")
    if beta is not None:
        grid = np.array([beta], dtype=np.float32)
    elif isinstance(betas, str):
        grid = beta_grid(betas)
    else:
        if isinstance(betas, torch.Tensor):
            betas = betas.detach().cpu().numpy()
        grid = np.asarray(betas, dtype=np.float32).reshape(-1)
    if grid.size == 0:
        raise ValueError("the beta grid is empty")
    if not np.all(np.abs(grid) < MAX_ABS_VALUE):
        raise ValueError(f"betas must be finite and below {MAX_ABS_VALUE:g} in magnitude")
    return grid


def _predictions(y: torch.Tensor, unseen_mask: np.ndarray, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First argmin over columns of ``y + beta * (column not unseen)`` for every beta, as [B, N] column indices,
    and the unseen-only argmin (the ZSL / FSL prediction, -1 when the split has no unseen class)."""
    n, n_betas = y.shape[0], betas.shape[0]
    nu_cols = torch.from_numpy(np.flatnonzero(~unseen_mask))
    u_cols = torch.from_numpy(np.flatnonzero(unseen_mask))
    if len(u_cols):
        yu = y[:, u_cols]
        iu = yu.argmin(dim=1)
        u_val = yu.gather(1, iu[:, None]).squeeze(1)
        u_pred = u_cols[iu]
    else:
        u_pred = torch.full((n,), -1, dtype=torch.long)
    if len(nu_cols) == 0:
        return u_pred.expand(n_betas, n), u_pred

    yn = y[:, nu_cols]
    i_n = yn.argmin(dim=1)
    m = yn.gather(1, i_n[:, None]).squeeze(1)
    left_of_min = torch.arange(len(nu_cols))[None, :] < i_n[:, None]
    m_left = torch.where(left_of_min, yn, torch.tensor(float("inf"))).amin(dim=1)
    v = m[None, :] + betas[:, None]
    i_nb = i_n.expand(n_betas, n).clone()
    # a lower-id column whose penalised score rounds onto the minimum wins the tie: recompute those rows in full
    ties = (m_left[None, :] + betas[:, None]) == v
    for b in ties.any(dim=1).nonzero().flatten().tolist():
        rows = ties[b].nonzero().flatten()
        i_nb[b, rows] = (yn[rows] + betas[b]).argmin(dim=1)
    nu_pred = nu_cols[i_nb]
    if len(u_cols) == 0:
        return nu_pred, u_pred
    take_nu = (v < u_val[None, :]) | ((v == u_val[None, :]) & (nu_pred < u_pred[None, :]))
    return torch.where(take_nu, nu_pred, u_pred[None, :]), u_pred


def _recall(pred: torch.Tensor, target_col: torch.Tensor, target_counts: torch.Tensor) -> torch.Tensor:
    """Per-class recall [B, C] as the references compute it: int64 matches / int64 targets -> float32."""
    n_betas, n_classes = pred.shape[0], target_counts.shape[0]
    hit = (pred == target_col[None, :]) & (target_col[None, :] >= 0)
    flat = (torch.arange(n_betas)[:, None] * n_classes + pred)[hit]
    matches = torch.bincount(flat, minlength=n_betas * n_classes).view(n_betas, n_classes)
    return matches / target_counts


def evaluate(
    scores,
    labels,
    classes,
    seen,
    unseen,
    n_all_classes: int,
    *,
    kind: Literal["distance", "probability"],
    betas: str | Sequence[float] | np.ndarray | torch.Tensor | None = None,
    beta: float | None = None,
) -> EvalResult:
    """Calibrated-stacking GZSL / GFSL metric on one split.

    ``scores`` [N, C]: one column per class of the split, in ascending global id order (``classes``); cast to
    float32 like the references' score matrix. ``kind="distance"``: lower is better and ``beta`` is added to every
    seen column; ``kind="probability"``: higher is better and ``beta`` is subtracted. ``labels`` [N] are global ids;
    samples whose label is outside the split are predicted but count for no class, as in the references.
    ``seen`` and ``unseen`` partition ``classes``; their order is the order of the float32 class means.

    Give ``betas`` (a grid name from ``BETA_GRIDS`` or values) to pick the first beta with the highest HM, or
    ``beta`` to evaluate one fixed value (0.0 included). Betas are float32, as in the references.
    """
    if kind not in ("distance", "probability"):
        raise ValueError(f"kind must be 'distance' or 'probability', got {kind!r}")
    grid = _betas(betas, beta)
    classes_np, seen_np, unseen_np, labels_np = (
        _ids(classes, "classes"),
        _ids(seen, "seen"),
        _ids(unseen, "unseen"),
        _ids(labels, "labels"),
    )
    n_classes = len(classes_np)
    if n_classes == 0 or np.any(np.diff(classes_np) <= 0) or classes_np[0] < 0 or classes_np[-1] >= n_all_classes:
        raise ValueError(f"classes must be non-empty, strictly ascending ids in [0, {n_all_classes})")
    if len(np.unique(seen_np)) != len(seen_np) or len(np.unique(unseen_np)) != len(unseen_np):
        raise ValueError("seen and unseen must not repeat a class")
    if np.intersect1d(seen_np, unseen_np).size or not np.array_equal(np.union1d(seen_np, unseen_np), classes_np):
        raise ValueError("seen and unseen must be disjoint and together equal classes")
    if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= n_all_classes):
        raise ValueError(f"labels must be global class ids in [0, {n_all_classes})")

    if not isinstance(scores, torch.Tensor):
        scores = torch.from_numpy(np.asarray(scores))
    y = scores.detach().to(device="cpu", dtype=torch.float32)
    if y.shape != (len(labels_np), n_classes):
        raise ValueError(f"scores must have shape [N={len(labels_np)}, C={n_classes}], got {tuple(y.shape)}")
    if not bool((y.abs() < MAX_ABS_VALUE).all()):
        raise ValueError(f"scores must be finite and below {MAX_ABS_VALUE:g} in magnitude")
    if kind == "probability":
        y = -y  # argmax of p - beta == argmin of -p + beta, exactly, first occurrence included

    unseen_mask = np.isin(classes_np, unseen_np)
    seen_idx = torch.from_numpy(np.searchsorted(classes_np, seen_np))
    unseen_idx = torch.from_numpy(np.searchsorted(classes_np, unseen_np))
    pos = np.minimum(np.searchsorted(classes_np, labels_np), n_classes - 1)
    target_col = torch.from_numpy(np.where(classes_np[pos] == labels_np, pos, -1))
    target_counts = torch.bincount(target_col[target_col >= 0], minlength=n_classes)

    betas_t = torch.from_numpy(grid)
    pred, pred_zsl = _predictions(y, unseen_mask, betas_t)
    recall = _recall(pred, target_col, target_counts)
    s = torch.stack([row[seen_idx].mean() for row in recall])
    u = torch.stack([row[unseen_idx].mean() for row in recall])
    hm = harmonic_mean(s, u)
    best = int(np.argmax(hm.numpy().astype(np.float64)))

    recall_zsl = _recall(pred_zsl[None, :], target_col, target_counts)[0][unseen_idx]
    return EvalResult(
        seen=s[best].item(),
        unseen=u[best].item(),
        hm=hm[best].item(),
        zsl=recall_zsl.mean().item(),
        beta=float(grid[best]),
        per_class=dict(zip(classes_np.tolist(), recall[best].tolist(), strict=True)),
        per_class_zsl=dict(zip(unseen_np.tolist(), recall_zsl.tolist(), strict=True)),
        curve=BetaCurve(
            betas=grid.copy(),
            seen=s.numpy().astype(np.float64),
            unseen=u.numpy().astype(np.float64),
            hm=hm.numpy().astype(np.float64),
        ),
    )


def gfsl_summary(results: Sequence[EvalResult]) -> dict:
    """AV-DIFF's final numbers over the novel-shot repeats, in percent.

    Means of base, novel and FSL; the HM is that of the mean base and mean novel accuracies (not the mean of the
    per-repeat HMs), as the reference reports it. The ``*_std`` entries are population standard deviations
    (ddof=0) over repeats (``hm_std``: of the per-repeat HMs), which the reference does not
    report; ``repeats`` holds each repeat's numbers.
    """
    if not results:
        raise ValueError("gfsl_summary needs at least one result")
    base = np.array([r.seen for r in results], dtype=np.float64)
    novel = np.array([r.unseen for r in results], dtype=np.float64)
    fsl = np.array([r.zsl for r in results], dtype=np.float64)
    return {
        "base": 100 * float(base.mean()),
        "novel": 100 * float(novel.mean()),
        "hm": 100 * float(harmonic_mean(base.mean(), novel.mean())),
        "fsl": 100 * float(fsl.mean()),
        "base_std": 100 * float(base.std()),
        "novel_std": 100 * float(novel.std()),
        "hm_std": 100 * float(np.std([r.hm for r in results])),
        "fsl_std": 100 * float(fsl.std()),
        "repeats": [r.as_percent("gfsl") for r in results],
    }
