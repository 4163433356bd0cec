"""Hyperbolic audio-visual zero-shot learning (Hong et al., ICCV 2023): Hyper-alignment, Hyper-single and
Hyper-multiple, after ``specs/baselines.md`` §2.3.

**Source [CODE].** ``JHome1/Hyper-AVZSL`` @ ``8460954``, ``Hyper-AVZSL-online/src/model_improvements.py``
(``Hyper_AVCA``, ``Alignment_loss``, ``Sim_matrix``), ``hyptorch/pmath.py`` (``project``, ``logmap0``) and the run
scripts ``run_scripts/*-GZSL/hyper_avca.sh``. Everything but the alignment term is AVCA's (``models/avca.py``: the
same modules in the same construction order, losses, negatives, optimiser, protocol and Euclidean ``theta_v`` vs
``W_proj(w)`` test with calibrated stacking).

**Exact.** ``Hyper_AVCA`` = AVCA plus, built after every AVCA module (so the seeded init of the AVCA part is
unchanged and the RNG stream shifts as in the reference), the curvature network ``fusenet1``: nothing for
Hyper-alignment, ``Linear(600, 1)`` + sigmoid for Hyper-single, ``Linear(600, K)`` + sigmoid for Hyper-multiple, on
``[phi_v ; phi_a]`` (video first). The loss is AVCA's plus ``1e-3 * l_align`` (added last), with ``phi`` the encoder
outputs ``A_enc(a)``, ``V_enc(v)`` of the positives and of the negatives::

    Sim(X)   = (X / ||X||_row) (X / ||X||_row)^T            B x B cosine Gram matrix (no eps)
    A(x, y)  = MSE(Sim(x), Sim(y))
    h_c(x)   = logmap0_c(project_c(x))                       Poincare ball of curvature -c
    l_align  = A(h_c(phi_v), h_c(phi_a)) + A(h_c(phi_v-), h_c(phi_a-))
    c        = curvature (alignment); curvature * sigmoid(fusenet1([phi_v; phi_a])) per sample (single; the
               negatives get theirs from their own phi); K such curvatures, the mean over k of l_align (multiple)

**Curvature independence (§2.3.3).** ``project_c`` and ``logmap0_c`` rescale every row by a positive scalar and
``Sim`` normalises rows, so ``l_align`` equals the Euclidean ``MSE(Sim(phi_v), Sim(phi_a)) + ...`` for every
``c > 0`` and the three variants have the same loss; ``fusenet1`` gets no gradient (``alignment: cosine``, the
default, computes that form and leaves ``fusenet1`` untouched) or an analytically zero one
(``alignment: poincare``, the released maps; only round-off and Adam's weight decay move it). Hyper-single and
Hyper-multiple therefore differ from Hyper-alignment only by their extra parameters (count, init RNG). Both forms
are tested equal.

**Hyper-parameters [CODE, run scripts].** ``hyper-*/<ds>-{cls,main}.yaml``: the AVCA run-script values per dataset
and feature set (all scripts: curvature 0.01, 50 epochs, lr 1e-3 with the plateau scheduler, 500 batches, hidden
512/512, depth 1, both triplet extras and the reg loss; bs 256, VGGSound main 64). The scripts only run
Hyper-alignment; the single / multiple variants use the same values.

**PROPOSED.** ``num_curvature`` K of Hyper-multiple (no script or text gives it): 4, behind ``num_curvature``; by the
property above it changes the parameter count only. ClipClap-table version (``hyper-multiple/<ds>-clipclap.yaml``,
§2.3.5): AVCA widened to the clipclap inputs (A_enc 1024 -> 512 -> 300, V_enc 512 -> 512 -> 300) and 1536-d
CLIP ‖ CLAP text (``W_proj`` 1536 -> 64, ``D`` 64 -> 1536), the 300-d internal width kept, the Hyper-AVZSL **cls**
hyper-parameters of the dataset and the AVCA protocol; ``--compat official`` reads the class text in ClipClap's
loader order (its ActivityNet / VGGSound id quirk), as the other ClipClap-table rows. Alternative: ClipClap's
protocol constants, ``--set batch_size=64 --set n_batches=300 --set lr=7e-5 --set epochs=20 --set beta_grid=clipclap``
(UCF; ActivityNet / VGGSound lr 1e-4 and 15 epochs).

**Parameters** (total, ``pos_emb1D`` included; ``+ 601 K`` for multiple): main 1,693,108 (alignment) / 1,693,709
(single) / 1,695,512 (multiple, K = 4); cls 3,331,508 / 3,332,109 / 3,333,912; clipclap 2,117,168 / 2,117,769 /
2,119,572.

**Published.** ClipClap README (CLIP/CLAP features, cls split), Hyper-multiple GZSL HM 11.87 (VGGSound) / 41.56
(UCF) / 20.90 (ActivityNet), ZSL 8.47 / 40.28 / 22.18 (AVCA on the same features: 11.26 / 36.69 / 21.76). The paper's
own numbers on the AVCA benchmarks are not in reachable text (abstract: HM gains of about 3.0 / 7.0 / 5.3 points
over the state of the art on VGGSound / UCF / ActivityNet).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor, nn

from avlowshot.models.avca import AVCA, MODEL_DIM, AVCAConfig
from avlowshot.models.base import InputDims

# hyptorch/pmath.py constants
BALL_EPS = 1e-3  # project: max norm (1 - 1e-3) / sqrt(c)
MIN_NORM = 1e-5  # norms clamped below
ARTANH_CLAMP = 1 - 1e-5


class HyperConfig(AVCAConfig):
    """The ``model:`` block of Hyper-alignment / Hyper-single: AVCA's keys plus the reference's ``--curvature``."""

    curvature: float = Field(0.01, gt=0, description="c (alignment), the scale s of the learned c (single/multiple)")
    alignment: Literal["cosine", "poincare"] = Field(
        "cosine", description="cosine: the curvature-free form of l_align; poincare: the released hyperbolic maps"
    )
    align_weight: float = Field(1e-3, ge=0, description="weight of l_align (1e-3 hard-coded in the reference)")


class HyperMultipleConfig(HyperConfig):
    num_curvature: int = Field(4, ge=1, description="K curvatures (PROPOSED: no script sets it)")


# ----------------------------------------------------------------------------------------------------------------
# The alignment loss (Alignment_loss / Sim_matrix / hyptorch maps)


def sim_matrix(x: Tensor) -> Tensor:
    """Cosine Gram matrix of the rows, without an eps (an all-zero row gives NaN, as in the reference)."""
    x = x / x.norm(dim=1, keepdim=True)
    return x @ x.t()


def project(x: Tensor, c: Tensor | float) -> Tensor:
    """``pmath.project``: rows outside the ball of radius ``(1 - 1e-3) / sqrt(c)`` are pulled onto it."""
    c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    norm = x.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM)
    maxnorm = (1 - BALL_EPS) / c**0.5
    return torch.where(norm > maxnorm, x / norm * maxnorm, x)


def logmap0(y: Tensor, c: Tensor | float) -> Tensor:
    """``pmath.logmap0``: ``artanh(sqrt(c) ||y||) y / (sqrt(c) ||y||)``."""
    sqrt_c = torch.as_tensor(c, dtype=y.dtype, device=y.device) ** 0.5
    y_norm = y.norm(dim=-1, keepdim=True).clamp_min(MIN_NORM)
    return y / y_norm / sqrt_c * torch.atanh((sqrt_c * y_norm).clamp(-ARTANH_CLAMP, ARTANH_CLAMP))


def to_tangent(x: Tensor, c: Tensor | float) -> Tensor:
    """``h_c(x) = logmap0_c(project_c(x))``; ``c`` a float or per-row ``[B, 1]``."""
    return logmap0(project(x, c), c)


def align(x: Tensor, y: Tensor) -> Tensor:
    """``MSE(Sim(x), Sim(y))``."""
    return F.mse_loss(sim_matrix(x), sim_matrix(y))


def alignment_loss(
    phi_v: Tensor, phi_a: Tensor, phi_v_neg: Tensor, phi_a_neg: Tensor, curvatures=None, poincare: bool = True
) -> Tensor:
    """``l_align`` of the positives plus the negatives. ``curvatures``: ``None`` (Euclidean / cosine form), or a
    pair (positives, negatives) of a float, per-row ``[B, 1]`` or per-row-and-k ``[B, K]`` curvatures (mean over
    k). ``poincare=False`` ignores the curvatures (they cannot change the value, §2.3.3)."""
    if curvatures is None or not poincare:
        return align(phi_v, phi_a) + align(phi_v_neg, phi_a_neg)
    c_pos, c_neg = curvatures
    if not isinstance(c_pos, Tensor) or c_pos.dim() == 0 or c_pos.shape[-1] == 1:
        return align(to_tangent(phi_v, c_pos), to_tangent(phi_a, c_pos)) + align(
            to_tangent(phi_v_neg, c_neg), to_tangent(phi_a_neg, c_neg)
        )
    k = c_pos.shape[-1]
    total = 0.0
    for i in range(k):
        cp, cn = c_pos[:, i : i + 1], c_neg[:, i : i + 1]
        total = (
            total
            + align(to_tangent(phi_v, cp), to_tangent(phi_a, cp))
            + align(to_tangent(phi_v_neg, cn), to_tangent(phi_a_neg, cn))
        )
    return total / k


# ----------------------------------------------------------------------------------------------------------------


class HyperAlignment(AVCA):
    """AVCA + ``1e-3 * l_align`` at the fixed curvature ``curvature``."""

    name: ClassVar[str] = "hyper-alignment"
    config_class: ClassVar[type[BaseModel]] = HyperConfig
    tasks: ClassVar[tuple[str, ...]] = ("gzsl",)
    n_curvatures: ClassVar[int] = 0  # outputs of fusenet1 (0: no network, fixed c)

    config: HyperConfig

    needs_label_space: ClassVar[bool] = False  # AVCA's text head only

    def __init__(self, config: HyperConfig, dims: InputDims, compat: str = "none"):
        super().__init__(config, dims, compat)
        k = self.curvature_outputs()
        # Built after every AVCA module, as the reference (its init draws come last).
        self.fusenet1 = nn.Linear(2 * MODEL_DIM, k) if k else None

    def curvature_outputs(self) -> int:
        return self.n_curvatures

    def curvatures(self, phi_v: Tensor, phi_a: Tensor) -> Tensor | float:
        """Per-row curvatures ``s * sigmoid(fusenet1([phi_v; phi_a]))`` ``[B, K]``, or the fixed ``c``."""
        if self.fusenet1 is None:
            return self.config.curvature
        return self.config.curvature * torch.sigmoid(self.fusenet1(torch.cat((phi_v, phi_a), dim=1)))

    def encoder_terms(self, phi_a: Tensor, phi_v: Tensor, phi_a_neg: Tensor, phi_v_neg: Tensor) -> dict[str, Tensor]:
        c = self.config
        poincare = c.alignment == "poincare"
        curv = None
        if poincare:
            curv = (self.curvatures(phi_v, phi_a), self.curvatures(phi_v_neg, phi_a_neg))
        l_align = alignment_loss(phi_v, phi_a, phi_v_neg, phi_a_neg, curv, poincare=poincare)
        return {"l_align": c.align_weight * l_align}


class HyperSingle(HyperAlignment):
    """One learned curvature per sample: ``curvature * sigmoid(Linear(600, 1)([phi_v; phi_a]))``."""

    name: ClassVar[str] = "hyper-single"
    n_curvatures: ClassVar[int] = 1


class HyperMultiple(HyperAlignment):
    """K learned curvatures per sample; ``l_align`` is the mean over them."""

    name: ClassVar[str] = "hyper-multiple"
    config_class: ClassVar[type[BaseModel]] = HyperMultipleConfig

    config: HyperMultipleConfig

    def curvature_outputs(self) -> int:
        return self.config.num_curvature
