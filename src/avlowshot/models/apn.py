"""APN baseline of the AVCA repository (``src/model.py::APN``, flag ``--apn``), faithful to ``specs/avca.md`` §2.5,
§3.5, §4.3 and §5.

Source: the AVCA-GZSL repository's audio-visual port of the image "Attribute Prototype Network" (Xu et al.,
NeurIPS 2020). It is a degenerate copy without a backbone: the "feature maps" are 1x1, so both convolutions are plain
linear maps (specs §9.9).

Exact to the reference (all kept, the published numbers depend on them):

* input ``x = cat(video, audio)`` (video first), L2-normalised per row when ``norm_inputs`` (every cls run script);
* two bias-free maps ``ALE_vector`` and ``prototype_vectors`` of shape (300, Dv + Da, 1, 1), initialised to
  ``2e-4 * U(0, 1)``; ``pre_attri_final = x . ALE^T``, ``pre_attri_layer4 = x . prototypes^T`` (the max-pool over a
  1x1 map is the identity);
* the loss (§3.5) ``CE(softmax(pre_attri_final . T^T), y) + MSE(pre_attri_final, w) + CE(softmax(pre_attri_layer4
  . T^T), y) + MSE(pre_attri_layer4, w)`` over the training split's classes (T = their raw word vectors, y = rank of
  the label in the ascending class ids, w = the positive's word vector). ``CrossEntropyLoss`` is applied to softmax
  probabilities, i.e. a log-softmax stacked on a softmax (§9.9);
* prediction by Euclidean distance of ``pre_attri_final`` [N, 300] to the raw class word vectors
  (``score_kind = "distance"``): trained with dot products, tested with nearest neighbour (§9.8);
* no dropout (``--dropout_baselines`` is unused by APN), the PyTorch default init elsewhere; the main optimiser
  Adam(lr, betas 0.9/0.999, no weight decay) with ReduceLROnPlateau(max, patience 3) on the val HM (§4.1).

The protocol is the shared one (class-balanced batches with replacement, best stage-1 epoch by val HM, stage 2 for
best + 1 epochs, the stage-1 beta on the test split), as in the reference's ``main.py`` / ``get_evaluation.py``;
``--compat official`` replays the reference's stage-2 LR schedule and its test-beta conversion (0 -> 1e-10).

Parameter counts (2 x 300 x (Dv + Da)): avca-main 614,400; avca-cls 2,534,400 (specs §2.5), on every dataset.

Measured on a synthetic UCF avca-cls (scale 0.1; 4 epochs of 12 batches of 64, ``lr=0.02``): test seen 32.1,
unseen 56.7, HM 41.0, ZSL 69.9 (chance 2.1 / 2.1 / 2.1 / 16.7). At the scripts' lr 1e-3 those 48 steps stay near
chance: the cross-entropy on softmax probabilities has gradients of order 1/C.

Published numbers (AVCA README, specs §8 / ``specs/results.md``; test HM / ZSL, x100):

============  ===============  ============  ===================
features      VGGSound-GZSL    UCF-GZSL      ActivityNet-GZSL
============  ===============  ============  ===================
main (HM)     5.11             20.61         7.27
main (ZSL)    4.49             16.44         6.34
cls (HM)      6.29             18.35         3.58
cls (ZSL)     6.50             29.69         3.97
============  ===============  ============  ===================
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from avlowshot.data.batching import Batch
from avlowshot.models.base import InputDims, Method, check_averaged
from avlowshot.models.layers import label_columns

INIT_SCALE = 2e-4  # the reference's 2e-4 * rand(...)


class APNConfig(BaseModel):
    """The ``model:`` block of an APN config: the reference's ``main.py`` flags that APN reads."""

    model_config = ConfigDict(extra="forbid", strict=True)

    norm_inputs: bool = Field(False, description="L2-normalise cat(video, audio) per row (the cls run scripts)")


class APN(Method):
    name: ClassVar[str] = "apn"
    score_kind: ClassVar[str] = "distance"
    needs_negatives: ClassVar[bool] = False
    needs_class_table: ClassVar[bool] = True  # the CE terms score every class of the training split
    config_class: ClassVar[type[BaseModel]] = APNConfig
    beta_family: ClassVar[str | None] = "avca"  # get_evaluation.py: (b + b + b) / 3, 0 -> 1e-10
    tasks: ClassVar[tuple[str, ...]] = ("gzsl",)
    layouts: ClassVar[tuple[str, ...]] = ("avca-cls", "avca-main", "tcaf-cls", "tcaf-main")
    inputs: ClassVar[str] = "averaged"

    config: APNConfig

    def __init__(self, config: APNConfig, dims: InputDims, compat: str = "none"):
        super().__init__(config, dims, compat)
        d = dims.video + dims.audio
        # Parameter names and shapes of the reference (1x1 convolution kernels).
        self.ALE_vector = nn.Parameter(INIT_SCALE * torch.rand(dims.text, d, 1, 1))
        proto = nn.Parameter(INIT_SCALE * torch.rand(dims.text, d, 1, 1))
        self.prototype_vectors = nn.ParameterDict({"layer4": proto})

    def _input(self, batch: Batch) -> Tensor:
        check_averaged(batch, "APN")
        x = torch.cat((batch.video, batch.audio), dim=1)
        return F.normalize(x, dim=1) if self.config.norm_inputs else x

    def attributes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(``pre_attri['final']``, ``pre_attri['layer4']``) [B, 300]: the two 1x1 convolutions as linear maps."""
        return x @ self.ALE_vector.flatten(1).t(), x @ self.prototype_vectors["layer4"].flatten(1).t()

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
        """§3.5 over the training split's classes (``class_text`` / ``class_ids``, ascending id)."""
        if class_text is None or class_ids is None:
            raise ValueError("APN scores every training class: pass class_text and class_ids")
        final, layer4 = self.attributes(self._input(batch))
        y = label_columns(class_ids.to(batch.labels.device), batch.labels)
        output_final = torch.softmax(final @ class_text.t(), dim=1)
        pre_class = torch.softmax(layer4 @ class_text.t(), dim=1)
        out = {
            "l_ce_final": F.cross_entropy(output_final, y),  # CE on probabilities, as the reference
            "l_attri_final": F.mse_loss(final, text),
            "l_ce_layer4": F.cross_entropy(pre_class, y),
            "l_attri_layer4": F.mse_loss(layer4, text),
        }
        out["loss"] = out["l_ce_final"] + out["l_attri_final"] + out["l_ce_layer4"] + out["l_attri_layer4"]
        return out

    def encode_samples(self, batch: Batch) -> Tensor:
        """``pre_attri['final']`` [B, 300]."""
        return self.attributes(self._input(batch))[0]

    def encode_classes(self, text: Tensor) -> Tensor:
        """The raw class word vectors."""
        return text

    def scores(self, sample_codes: Tensor, class_codes: Tensor) -> Tensor:
        # Default compute mode, as the reference's torch.cdist (ties break the same way).
        return torch.cdist(sample_codes, class_codes)
