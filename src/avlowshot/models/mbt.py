"""MBT, the Multimodal Bottleneck Transformer (Nagrani et al., NeurIPS 2021), as a baseline of AV-DIFF's GFSL table,
after ``specs/baselines.md`` §3.4 (the AV-DIFF adaptation is not public: only a ``--bmt`` flag; **PROPOSED**).

Per modality the token front-end ``TF`` (TCAF / AV-DIFF: per-token encoders, modality + Fourier time + padding
embedding) and a class token (init zeros, as the official code); ``n_b = 5`` bottleneck tokens (official 4, + 1 in
'token' mode; init N(0, 0.02)). ``L`` layers with **separate weights per modality** (TCAF's shared-norm layer, 8 x 64,
MLP 128): layers ``l < fusion_layer`` see one modality only; later layers run ``[x_m ; B]`` through the modality's
layer and average the two bottleneck outputs, ``B = (B_a + B_v) / 2``, the only path between the modalities. One
final LayerNorm; ``theta_m = O_proj(x_m[CLS])`` (one ``O_proj`` and one classifier for both). Training: the mean of
the per-modality cross-entropies; test: softmax of the mean logits (= the classifier of the mean theta, since the
classifier is linear). AV-DIFF's metric and the ``P_fsl`` protocol (one stage on base + k-shot novel, three stage-2
repeats), AV-DIFF's per-dataset values (§1.7).

``fusion_layer`` (default ``floor(L / 2)``: UCF 2, ActivityNet 2, VGGSound 4; grid ``floor(L/3)``, ``floor(L/2)``,
``floor(2L/3)``; the official code fuses from layer 8 of 12), ``bottleneck_tokens``. Alternative head ``'gap'`` is
not built.

Parameters (cls features, H = 512): UCF 8,432,252 (L = 4, 48 classes), ActivityNet 9,827,058 (L = 5, 198),
VGGSound 13,986,971 (L = 8, 271).

Published (AV-DIFF Table 2, GFSL HM / FSL, 1 / 5 / 10-shot): VGGSound 14.70 / 21.96, 27.26 / 34.95, 30.12 / 38.93;
UCF 39.65 / 27.99, 46.55 / 34.53, 50.04 / 39.73; ActivityNet 14.26 / 12.63, 23.26 / 22.38, 26.86 / 26.03.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor, nn

from avlowshot.data.batching import Batch
from avlowshot.models.base import InputDims
from avlowshot.models.fusion import DIM_OUT, TokenConfig, TokenFusionBaseline
from avlowshot.models.layers import EmbeddingNet, SharedNormLayer


class MBTConfig(TokenConfig):
    head: str = Field("fsl", pattern="^fsl$", description="AV-DIFF's classifier head (GFSL)")
    fusion_layer: int | None = Field(None, ge=0, description="first fusing layer L_f (None: floor(L / 2))")
    bottleneck_tokens: int = Field(5, ge=1, description="n_b (official 4 + 1 in 'token' mode)")


def pair_mask(valid: Tensor) -> Tensor:
    """``[B, N, N]``: query i may attend key j when both are real tokens."""
    return valid.unsqueeze(2) & valid.unsqueeze(1)


class MBT(TokenFusionBaseline):
    name: ClassVar[str] = "mbt"
    config_class: ClassVar[type[BaseModel]] = MBTConfig
    tasks: ClassVar[tuple[str, ...]] = ("gfsl",)
    layouts: ClassVar[tuple[str, ...]] = ("avdiff", "tcaf-cls", "tcaf-main")

    config: MBTConfig

    def build_backbone(self, config: MBTConfig, dims: InputDims) -> None:
        c, d, bn = config, config.transformer_dim, config.embeddings_batch_norm
        self.build_front_end(config, dims)
        self.cls_a = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_v = nn.Parameter(torch.zeros(1, 1, d))
        self.bottleneck = nn.Parameter(torch.randn(1, c.bottleneck_tokens, d) * 0.02)

        def layers() -> nn.ModuleList:
            widths = (d, c.transformer_heads, c.transformer_dim_head, c.transformer_mlp_dim, c.transformer_dropout)
            return nn.ModuleList(SharedNormLayer(*widths) for _ in range(c.transformer_depth))

        self.audio_layers, self.video_layers = layers(), layers()
        self.norm = nn.LayerNorm(d)
        self.O_proj = EmbeddingNet(d, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)
        self.fusion_layer = c.transformer_depth // 2 if c.fusion_layer is None else c.fusion_layer

    def class_tokens(self, batch: Batch, positions: bool = False) -> tuple[Tensor, Tensor]:
        """The two class-token outputs [B, D] after the bottleneck-fused layers and the final LayerNorm."""
        xa, xv, am, vm = self.tokens(batch, positions)
        b = xa.shape[0]
        one = am.new_ones(b, 1)
        xa = torch.cat((self.cls_a.expand(b, -1, -1).to(xa.dtype), xa), dim=1)
        xv = torch.cat((self.cls_v.expand(b, -1, -1).to(xv.dtype), xv), dim=1)
        am, vm = torch.cat((one, am), dim=1), torch.cat((one, vm), dim=1)
        nb = self.bottleneck.shape[1]
        bott = self.bottleneck.expand(b, -1, -1).to(xa.dtype)
        mask_a, mask_v = pair_mask(am), pair_mask(vm)
        fused_a = pair_mask(torch.cat((am, one.expand(b, nb)), dim=1))
        fused_v = pair_mask(torch.cat((vm, one.expand(b, nb)), dim=1))
        for i, (layer_a, layer_v) in enumerate(zip(self.audio_layers, self.video_layers, strict=True)):
            if i < self.fusion_layer:
                xa, xv = layer_a(xa, mask_a), layer_v(xv, mask_v)
                continue
            ya = layer_a(torch.cat((xa, bott), dim=1), fused_a)
            yv = layer_v(torch.cat((xv, bott), dim=1), fused_v)
            xa, xv = ya[:, :-nb], yv[:, :-nb]
            bott = (ya[:, -nb:] + yv[:, -nb:]) / 2
        return self.norm(xa[:, 0]), self.norm(xv[:, 0])

    def theta_o(self, batch: Batch, positions: bool = False) -> tuple[Tensor, list[Tensor]]:
        """The mean of the two modalities' ``theta`` (its logits are the mean logits) and the two thetas."""
        ca, cv = self.class_tokens(batch, positions)
        theta_a, theta_v = self.O_proj(ca), self.O_proj(cv)
        return (theta_a + theta_v) / 2, [theta_a, theta_v]

    def losses(self, batch: Batch, text: Tensor, negative=None, negative_text=None, **_) -> dict[str, Tensor]:
        """``(CE(logits_a, y) + CE(logits_v, y)) / 2``."""
        _, (theta_a, theta_v) = self.theta_o(batch)
        y = self.columns(batch.labels)
        out = {
            "l_ce_a": F.cross_entropy(self.classifier(theta_a), y),
            "l_ce_v": F.cross_entropy(self.classifier(theta_v), y),
        }
        out["loss"] = (out["l_ce_a"] + out["l_ce_v"]) / 2
        return out
