"""ALE (Akata et al., TPAMI 2016), DEVISE (Frome et al., NeurIPS 2013) and SJE (Akata et al., CVPR 2015) as
re-implemented in the AVCA repository (``ExplainableML/AVCA-GZSL`` @ ``2711aeb``: ``DeviseModel`` in
``src/model.py``, ``ClsContrastiveLoss`` in ``src/loss.py``), faithful to ``specs/avca.md`` §2.4, §3.4, §4 and §5.

One bilinear compatibility for all three: ``x = [video ‖ audio]`` (L2-normalised per row with ``norm_inputs``, the
cls-feature scripts), ``Dropout(x)`` and ``Dropout(text)`` in training (one dropout module, applied to both), and
``s = W·x · textᵀ`` with ``W = Linear(Dv+Da, Dt, bias=False)`` over the K classes of the training split (labels
re-indexed to their rank among them). With ``cost_ij = max(0, margin + s_ij - s_iy)`` (``cost_iy = 0``,
margin 0.1) the three losses differ only in how they reduce it:

* DEVISE: ``sum_ij cost_ij / B`` (every violating class);
* SJE: ``sum_i max_j cost_ij / B`` (the most violating class);
* ALE: ``sum_ij cost_ij · H(r_i) / (r_i + 1e-8) / B`` with ``r_i = #{j: cost_ij > 0}`` and ``H(k) = sum_{m<=k} 1/m``
  (rank-weighted).

**Evaluation**: the reference trains with the dot product but tests with the **Euclidean** distance between ``W·x``
and the raw class text vectors (specs §9 item 8), so ``score_kind="distance"`` and ``encode_classes`` is the identity.

**Exact** (from the code): the model, the input order (video first), normalisation then dropout, the dropout on the
text matrix, the margin, the three reductions (ALE's harmonic weights in float32), the scored quantity, the
run-script hyper-parameters (§6.4: 50 epochs, Adam lr 1e-3 without weight decay, ReduceLROnPlateau on val HM, 500
class-balanced batches of 256, dropout 0.2 / 0.2 / 0.0 for UCF / ActivityNet / VGGSound, ``norm_inputs`` on cls
features, beta grid linspace(0, 3, 16)). **Differences**: dropout masks come from another random stream. The
reference's ALE weight table stops at 700 violating classes; here it grows with the class count (same values).
Nothing is PROPOSED on the AVCA table; on another layout the projection width follows the class-text dim.

**Layouts**: ``avca-cls`` / ``avca-main`` (AVCA table); ``tcaf-cls`` / ``tcaf-main`` also work (averaged over each
video's valid rows at load, the ``cls`` / ``main`` configs serve).

**Parameters** (``W`` only): main 307,200 (1024 x 300), cls 1,267,200 (4224 x 300), the same for the three.

**Published numbers** (HM / ZSL, specs/results.md, AVCA README). cls: ALE UCF 35.37 / 32.30, ActivityNet 1.55 / 6.16,
VGGSound 3.23 / 4.97; DEVISE UCF 31.98 / 35.48, ActivityNet 0.33 / 5.84, VGGSound 3.64 / 4.72; SJE UCF 24.28 / 32.47,
ActivityNet 2.35 / 4.35, VGGSound 4.69 / 3.22. main: ALE UCF 23.66 / 16.32, ActivityNet 3.94 / 7.90, VGGSound
0.53 / 5.48; DEVISE UCF 23.56 / 16.09, ActivityNet 4.91 / 8.53, VGGSound 2.08 / 5.59; SJE UCF 26.50 / 18.93,
ActivityNet 5.57 / 7.08, VGGSound 2.15 / 4.06.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from avlowshot.data.batching import Batch
from avlowshot.models.base import InputDims, Method, check_averaged
from avlowshot.models.layers import Dropout


class BilinearConfig(BaseModel):
    """The ``model:`` block of an ALE / DEVISE / SJE config: the reference's flags, argparse defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dropout_baselines: float = Field(0.2, ge=0, lt=1, description="dropout on the input and on the class text")
    norm_inputs: bool = Field(False, description="L2-normalise [video ‖ audio] per row (the cls scripts)")
    margin: float = Field(0.1, gt=0, description="ClsContrastiveLoss margin (0.1 in main.py)")


def hinge_costs(scores: Tensor, target: Tensor, margin: float) -> Tensor:
    """``cost_ij = max(0, margin + s_ij - s_iy)`` with the true class's own cost set to 0, ``[B, K]``."""
    positive = scores.gather(1, target.unsqueeze(1))
    cost = (margin + scores - positive).clamp(min=0)
    return cost.masked_fill(F.one_hot(target, scores.shape[1]).bool(), 0)


def harmonic_weights(ranks: Tensor, n_classes: int) -> Tensor:
    """ALE's ``H(r) / (r + 1e-8)``, ``H(k) = sum_{m=1..k} 1/m`` as a float32 cumulative sum (``H(0) = 0``)."""
    table = torch.zeros(n_classes + 1, device=ranks.device)
    table[1:] = torch.cumsum(1 / (torch.arange(n_classes, device=ranks.device).float() + 1), 0)
    return table[ranks] / (ranks + 1e-8)


class _Bilinear(Method):
    score_kind: ClassVar[str] = "distance"
    needs_negatives: ClassVar[bool] = False
    needs_class_table: ClassVar[bool] = True
    config_class: ClassVar[type[BaseModel]] = BilinearConfig
    layouts: ClassVar[tuple[str, ...]] = ("avca-cls", "avca-main", "tcaf-cls", "tcaf-main")
    inputs: ClassVar[str] = "averaged"
    beta_family: ClassVar[str] = "avca"  # --compat official converts the test beta as the AVCA repository does
    title: ClassVar[str]

    config: BilinearConfig

    def __init__(self, config: BilinearConfig, dims: InputDims, compat: str = "none"):
        super().__init__(config, dims, compat)
        # Reference names, so its state dicts load: ``bilinear.weight`` [Dt, Dv+Da].
        self.bilinear = nn.Linear(dims.video + dims.audio, dims.text, bias=False)
        self.dropout = Dropout(config.dropout_baselines)

    def _input(self, batch: Batch) -> Tensor:
        check_averaged(batch, self.title)
        x = torch.cat((batch.video, batch.audio), dim=1)  # video first, as the reference
        return F.normalize(x, dim=1) if self.config.norm_inputs else x

    def reduce(self, cost: Tensor) -> Tensor:
        """The loss from the hinge costs ``[B, K]`` (per method)."""
        raise NotImplementedError

    def losses(
        self,
        batch: Batch,
        text: Tensor,
        negative: Batch | None = None,
        negative_text: Tensor | None = None,
        *,
        class_text: Tensor | None = None,
        class_ids: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``class_text`` ``[K, Dt]`` / ``class_ids`` ``[K]`` (ascending): every class of the training split."""
        if class_text is None or class_ids is None:
            raise ValueError(f"{self.title} needs class_text and class_ids of every training class")
        target = torch.searchsorted(class_ids.to(batch.labels.device), batch.labels)
        x = self.dropout(self._input(batch))
        scores = self.bilinear(x) @ self.dropout(class_text).t()
        cost = hinge_costs(scores, target, self.config.margin)
        loss = self.reduce(cost)
        return {"loss": loss}

    def encode_samples(self, batch: Batch) -> Tensor:
        """``W·x`` ``[B, Dt]``."""
        return self.bilinear(self._input(batch))

    def encode_classes(self, text: Tensor) -> Tensor:
        """The raw class text: the reference compares ``W·x`` with the word vectors themselves."""
        return text

    def scores(self, sample_codes: Tensor, class_codes: Tensor) -> Tensor:
        return torch.cdist(sample_codes, class_codes)


class DEVISE(_Bilinear):
    name: ClassVar[str] = "devise"
    title: ClassVar[str] = "DEVISE"

    def reduce(self, cost: Tensor) -> Tensor:
        return cost.sum() / cost.shape[0]


class SJE(_Bilinear):
    name: ClassVar[str] = "sje"
    title: ClassVar[str] = "SJE"

    def reduce(self, cost: Tensor) -> Tensor:
        return cost.max(dim=1).values.sum() / cost.shape[0]


class ALE(_Bilinear):
    name: ClassVar[str] = "ale"
    title: ClassVar[str] = "ALE"

    def reduce(self, cost: Tensor) -> Tensor:
        ranks = (cost > 0).sum(1, keepdim=True)
        return (cost * harmonic_weights(ranks, cost.shape[1])).sum() / cost.shape[0]
