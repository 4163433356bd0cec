"""Zorro, the masked multimodal transformer (Recasens et al., 2023), as a baseline of AV-DIFF's GFSL table, after
``specs/baselines.md`` §3.5 (no official code; the AV-DIFF adaptation is not public: a ``--zorro`` flag; **PROPOSED**).

One transformer over ``[audio tokens ; fusion tokens ; video tokens]`` (token front-end ``TF``; ``n_f = 8`` fusion
tokens, init N(0, 1)) with Zorro's fixed mask: an audio or video query attends only to keys of its own modality, a
fusion query attends to every key, so the unimodal streams stay unimodal and only the fusion tokens gather both;
padded keys are never attended. ``L`` TCAF shared-norm layers (8 x 64, MLP 128) shared by all token types, a final
LayerNorm, and AV-DIFF's head on the mean of the fusion tokens (AV-DIFF: "a classifier on top of the averaged
bottleneck attention tokens"): ``theta_o = O_proj(c)``, CE on the fusion logits, softmax at test. ``P_fsl`` protocol
and AV-DIFF's per-dataset values (§1.7). Alternatives: ``fusion_tokens`` (grid 4 / 8 / 16); ``unimodal_losses``
(paper-style extra CE heads on the mean audio and video tokens; the test reads the fusion head only).

Parameters (cls features, H = 512): UCF 5,662,440 (L = 4, 48 classes), ActivityNet 6,364,718 (L = 5, 198),
VGGSound 8,447,047 (L = 8, 271).

Published (AV-DIFF Table 2, GFSL HM / FSL, 1 / 5 / 10-shot): VGGSound 18.88 / 21.79, 29.56 / 35.17, 32.06 / 40.66;
UCF 44.35 / 34.52, 51.86 / 42.59, 58.89 / 49.06; ActivityNet 14.56 / 11.94, 23.14 / 21.94, 27.35 / 26.33.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from avlowshot.data.batching import Batch
from avlowshot.models.base import InputDims
from avlowshot.models.fusion import DIM_OUT, TokenConfig, TokenFusionBaseline, masked_mean
from avlowshot.models.layers import EmbeddingNet, SharedNormTransformer

AUDIO, FUSION, VIDEO = 1, 0, 2  # token kinds


class ZorroConfig(TokenConfig):
    head: str = Field("fsl", pattern="^fsl$", description="AV-DIFF's classifier head (GFSL)")
    fusion_tokens: int = Field(8, ge=1, description="n_f (PROPOSED 8; grid 4, 8, 16)")
    unimodal_losses: bool = Field(False, description="alternative: CE heads on the mean audio and video tokens too")


def zorro_mask(kinds: Tensor, valid: Tensor) -> Tensor:
    """``[B, N, N]``, True = query i may attend key j: ``valid_i and valid_j and (kind_i == kind_j or i is a fusion
    token)``."""
    same = kinds.unsqueeze(1) == kinds.unsqueeze(0)
    allowed = same | (kinds == FUSION).unsqueeze(1)
    return allowed.unsqueeze(0) & valid.unsqueeze(2) & valid.unsqueeze(1)


class Zorro(TokenFusionBaseline):
    name: ClassVar[str] = "zorro"
    config_class: ClassVar[type[BaseModel]] = ZorroConfig
    tasks: ClassVar[tuple[str, ...]] = ("gfsl",)
    layouts: ClassVar[tuple[str, ...]] = ("avdiff", "tcaf-cls", "tcaf-main")

    config: ZorroConfig

    def build_backbone(self, config: ZorroConfig, dims: InputDims) -> None:
        c, d, bn = config, config.transformer_dim, config.embeddings_batch_norm
        self.build_front_end(config, dims)
        self.fusion = nn.Parameter(torch.randn(1, c.fusion_tokens, d))
        self.transformer = SharedNormTransformer(
            d, c.transformer_depth, c.transformer_heads, c.transformer_dim_head, c.transformer_mlp_dim,
            c.transformer_dropout,
        )  # fmt: skip
        self.norm = nn.LayerNorm(d)
        self.O_proj = EmbeddingNet(d, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)

    def encode_tokens(self, batch: Batch, positions: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(normed outputs [B, La + n_f + Lv, D], token kinds [N], valid [B, N])."""
        xa, xv, am, vm = self.tokens(batch, positions)
        b, nf = xa.shape[0], self.fusion.shape[1]
        x = torch.cat((xa, self.fusion.expand(b, -1, -1).to(xa.dtype), xv), dim=1)
        valid = torch.cat((am, am.new_ones(b, nf), vm), dim=1)
        kinds = torch.tensor([AUDIO] * xa.shape[1] + [FUSION] * nf + [VIDEO] * xv.shape[1], device=x.device)
        return self.norm(self.transformer(x, zorro_mask(kinds, valid))), kinds, valid

    def theta_o(self, batch: Batch, positions: bool = False) -> tuple[Tensor, list[Tensor]]:
        out, kinds, valid = self.encode_tokens(batch, positions)
        theta = self.O_proj(out[:, kinds == FUSION].mean(dim=1))
        unimodal = []
        if self.config.unimodal_losses and self.training:
            for kind in (AUDIO, VIDEO):
                sel = kinds == kind
                unimodal.append(self.O_proj(masked_mean(out[:, sel], valid[:, sel])))
        return theta, unimodal
