"""HiP, the Hierarchical Perceiver (Carreira et al., 2022), as a baseline of AV-DIFF's GFSL table, after
``specs/baselines.md`` §3.3 (official JAX code exists for HiP itself; the AV-DIFF adaptation is not public: a
``--hierarchical_perceiver`` flag; "implemented in a similar way" to the adapted Perceiver; **PROPOSED**).

Encoder + processor of HiP (the decoder only serves HiP's reconstruction loss and is dropped for classification), in
the TCAF / AV-DIFF width, on the token front-end ``TF``:

* block 1 (encoder, 2 groups = the audio tokens and the video tokens): per-group learned queries ``Q1_g`` (16 x 300,
  init N(0, 1)) cross-attend to their group's tokens (one cross-attention block, 1 head x 64, shared by the groups,
  padded keys masked), then two self-attention layers inside each group (TCAF's shared-norm layer, 8 x 64, shared);
* block 2 (processor, 1 group): the 32 block-1 latents are regrouped into one, 16 queries ``Q2`` cross-attend to them,
  then ``max(1, L - 2)`` self-attention layers (L = 4 / 5 / 8: 2 / 3 / 6);
* ``c = LayerNorm(mean over the 16 latents)``, AV-DIFF's head ``theta_o = O_proj(c)`` and classifier, CE; softmax
  at test; the ``P_fsl`` protocol with AV-DIFF's per-dataset values (§1.7).

Alternatives (keys): ``latents_per_group``, ``block1_self_attends``; TCAF's GELU feed-forward is used instead of HiP's
squared ReLU with widening 4 (not built), and the two modalities are HiP's groups rather than the official
contiguous split of the concatenated tokens (not built).

Parameters (cls features, H = 512): UCF 5,986,696 (L = 4, 48 classes), ActivityNet 6,688,974 (L = 5, 198),
VGGSound 8,771,303 (L = 8, 271).

Published (AV-DIFF Table 2, GFSL HM / FSL, 1 / 5 / 10-shot): VGGSound 19.27 / 18.64, 26.82 / 30.67, 29.25 / 35.13;
UCF 21.79 / 34.88, 36.44 / 42.23, 50.69 / 43.29; ActivityNet 13.80 / 10.31, 18.10 / 16.25, 19.37 / 17.06.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from avlowshot.data.batching import Batch
from avlowshot.models.base import InputDims
from avlowshot.models.fusion import DIM_OUT, TokenConfig, TokenFusionBaseline
from avlowshot.models.layers import CrossAttentionBlock, EmbeddingNet, SharedNormTransformer


class HiPConfig(TokenConfig):
    head: str = Field("fsl", pattern="^fsl$", description="AV-DIFF's classifier head (GFSL)")
    latents_per_group: int = Field(16, ge=1, description="queries per group in both blocks")
    block1_self_attends: int = Field(2, ge=1, description="self-attention layers inside each group of block 1")
    cross_heads: int = Field(1, ge=1)
    cross_dim_head: int = Field(64, ge=1)


class HiP(TokenFusionBaseline):
    name: ClassVar[str] = "hip"
    config_class: ClassVar[type[BaseModel]] = HiPConfig
    tasks: ClassVar[tuple[str, ...]] = ("gfsl",)
    layouts: ClassVar[tuple[str, ...]] = ("avdiff", "tcaf-cls", "tcaf-main")

    config: HiPConfig

    def build_backbone(self, config: HiPConfig, dims: InputDims) -> None:
        c, d, bn = config, config.transformer_dim, config.embeddings_batch_norm
        p, n = c.transformer_dropout, c.latents_per_group
        self.build_front_end(config, dims)

        def self_attention(depth: int) -> SharedNormTransformer:
            return SharedNormTransformer(
                d, depth, c.transformer_heads, c.transformer_dim_head, c.transformer_mlp_dim, p
            )

        self.queries1 = nn.Parameter(torch.randn(2, n, d))  # one query set per group: audio, video
        self.cross1 = CrossAttentionBlock(d, c.cross_heads, c.cross_dim_head, c.transformer_mlp_dim, p)
        self.self1 = self_attention(c.block1_self_attends)
        self.queries2 = nn.Parameter(torch.randn(1, n, d))
        self.cross2 = CrossAttentionBlock(d, c.cross_heads, c.cross_dim_head, c.transformer_mlp_dim, p)
        self.self2 = self_attention(max(1, c.transformer_depth - 2))
        self.norm = nn.LayerNorm(d)
        self.O_proj = EmbeddingNet(d, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)

    def fused(self, batch: Batch, positions: bool = False) -> Tensor:
        xa, xv, am, vm = self.tokens(batch, positions)
        b = xa.shape[0]
        q = self.queries1.to(xa.dtype)
        # the two groups as one batch of 2B: shared weights, per-group queries and keys
        z1 = torch.cat((
            self.cross1(q[0].expand(b, -1, -1), xa, am),
            self.cross1(q[1].expand(b, -1, -1), xv, vm),
        ))  # fmt: skip
        z1 = self.self1(z1)
        z1 = torch.cat((z1[:b], z1[b:]), dim=1)  # regroup: one group of 2 x 16 latents
        z2 = self.cross2(self.queries2.to(z1.dtype).expand(b, -1, -1), z1)
        return self.norm(self.self2(z2).mean(dim=1))

    def theta_o(self, batch: Batch, positions: bool = False) -> tuple[Tensor, list[Tensor]]:
        return self.O_proj(self.fused(batch, positions)), []
