"""SLDG (Bo, Lu, He, WACV 2020: few-shot video classification from the video contents), as a baseline of AV-DIFF's
GFSL table, after ``specs/baselines.md`` §3.9. No code exists (AV-DIFF keeps a ``--sldg_tav`` flag only): the whole
design is **PROPOSED**. AV-DIFF: SLDG "weighs the frame features according to normal distributions" and its optical
flow stream is replaced by audio.

Two streams (video: C3D tokens, audio: VGGish tokens), each with one Gaussian temporal attention whose mean and width
come from the contents and the length of the video (the mechanism of the authors' later CLTA paper, an
*unverified* link), and late fusion:

* ``x_t = Enc_m(token_t)`` (``EmbeddingNet(D -> 512 -> 300)``, TCAF's input normalisation: audio / 255, video rows
  L2-normalised; no time or modality embedding);
* ``T`` = number of valid tokens, ``tau_t = t / (T - 1)`` in [0, 1] (0.5 when T = 1);
* ``u = [mean_t x_t ; log T]``, ``mu = sigmoid(w_mu u)`` (bias 0), ``sigma = 0.05 + softplus(w_sigma u + b)``
  with ``b = log(e^0.25 - 1)`` (sigma 0.3 at init);
* ``a_t = exp(-(tau_t - mu)^2 / (2 sigma^2))`` normalised over the valid tokens, ``z = sum_t a_t x_t``;
* ``logits_m = Linear(64, C)(O_proj_m(z_m))`` per modality (own ``O_proj`` and classifier);
* training: ``CE(logits_v) + CE(logits_a)``; test: ``(softmax(logits_v) + softmax(logits_a)) / 2`` with AV-DIFF's
  metric; the ``P_fsl`` protocol and AV-DIFF's per-dataset encoder / head values (§1.7).

Alternative (key ``gaussians``): G Gaussians per stream mixed by softmax weights from ``u`` ("normal
distributions", plural); default 1.

Parameters (cls features, H = 512): 2,852,160 + 130 x C (UCF 48 classes: 2,858,400; ActivityNet 198: 2,877,900;
VGGSound 271: 2,887,390).

Published (AV-DIFF Table 2, GFSL HM / FSL, 1 / 5 / 10-shot): VGGSound 16.83 / 17.57, 20.79 / 25.17, 24.11 / 29.48;
UCF 39.92 / 28.91, 36.47 / 28.56, 34.31 / 26.96; ActivityNet 13.57 / 10.30, 22.29 / 19.16, 27.81 / 25.35.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor, nn

from avlowshot.data.batching import Batch
from avlowshot.models.base import InputDims
from avlowshot.models.fusion import DIM_OUT, FusionBaseline, FusionConfig, normalised_sequences
from avlowshot.models.layers import EmbeddingNet

TOKEN_DIM = 300
SIGMA_MIN = 0.05
SIGMA_INIT = 0.3


class SLDGConfig(FusionConfig):
    head: str = Field("fsl", pattern="^fsl$", description="per-modality classifiers, late fusion (GFSL)")
    gaussians: int = Field(1, ge=1, description="Gaussians per stream (alternative: 3, softmax-mixed)")


class GaussianTemporalAttention(nn.Module):
    """Weights over a sequence's valid tokens from Gaussians whose mean and width depend on the contents and the
    length: ``u = [mean_t x_t ; log T]``, ``mu = sigmoid(W_mu u)``, ``sigma = 0.05 + softplus(W_sigma u + b)``."""

    def __init__(self, dim: int, gaussians: int = 1):
        super().__init__()
        self.mu = nn.Linear(dim + 1, gaussians)
        self.sigma = nn.Linear(dim + 1, gaussians)
        self.mix = nn.Linear(dim + 1, gaussians) if gaussians > 1 else None
        nn.init.zeros_(self.mu.bias)
        nn.init.constant_(self.sigma.bias, math.log(math.expm1(SIGMA_INIT - SIGMA_MIN)))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """``[B, L, D]`` tokens, ``[B, L]`` valid -> attention weights ``[B, L]`` (zero on padding, sum 1)."""
        w = valid.to(x.dtype)
        n = w.sum(1, keepdim=True)  # [B, 1]
        u = torch.cat(((x * w.unsqueeze(-1)).sum(1) / n.clamp_min(1), n.clamp_min(1).log()), dim=1)
        pos = torch.arange(x.shape[1], device=x.device, dtype=x.dtype).unsqueeze(0)
        tau = torch.where(n > 1, pos / (n - 1).clamp_min(1), torch.full_like(pos, 0.5))  # [B, L]
        mu = torch.sigmoid(self.mu(u)).unsqueeze(1)  # [B, 1, G]
        sigma = (SIGMA_MIN + F.softplus(self.sigma(u))).unsqueeze(1)
        g = torch.exp(-((tau.unsqueeze(-1) - mu) ** 2) / (2 * sigma**2))  # [B, L, G]
        if self.mix is not None:
            g = (g * torch.softmax(self.mix(u), dim=-1).unsqueeze(1)).sum(-1)
        else:
            g = g.squeeze(-1)
        g = g * w
        return g / g.sum(1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


class SLDG(FusionBaseline):
    name: ClassVar[str] = "sldg"
    config_class: ClassVar[type[BaseModel]] = SLDGConfig
    tasks: ClassVar[tuple[str, ...]] = ("gfsl",)
    layouts: ClassVar[tuple[str, ...]] = ("avdiff", "tcaf-cls", "tcaf-main")

    config: SLDGConfig

    def build_backbone(self, config: SLDGConfig, dims: InputDims) -> None:
        c, bn = config, config.embeddings_batch_norm
        self.V_enc = EmbeddingNet(dims.video, TOKEN_DIM, c.embedding_dropout, c.embeddings_hidden_size, hidden_bn=bn)
        self.A_enc = EmbeddingNet(dims.audio, TOKEN_DIM, c.embedding_dropout, c.embeddings_hidden_size, hidden_bn=bn)
        self.attend_v = GaussianTemporalAttention(TOKEN_DIM, c.gaussians)
        self.attend_a = GaussianTemporalAttention(TOKEN_DIM, c.gaussians)
        self.O_proj_v = EmbeddingNet(TOKEN_DIM, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)
        self.O_proj_a = EmbeddingNet(TOKEN_DIM, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)

    def build_head(self, n_classes: int) -> None:
        self.classifier = nn.Linear(DIM_OUT, n_classes)  # the video stream's
        self.classifier_a = nn.Linear(DIM_OUT, n_classes)

    def stream_logits(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(video logits, audio logits) ``[B, C]``."""
        a, v, am, vm, _, _ = normalised_sequences(batch, self.name, self.official, self.config.audio_divisor)
        xv, xa = self.rows(self.V_enc, v, vm), self.rows(self.A_enc, a, am)
        zv = (self.attend_v(xv, vm).unsqueeze(-1) * xv).sum(1)
        za = (self.attend_a(xa, am).unsqueeze(-1) * xa).sum(1)
        return self.classifier(self.O_proj_v(zv)), self.classifier_a(self.O_proj_a(za))

    def theta_o(self, batch: Batch, positions: bool = False):  # pragma: no cover - SLDG scores by stream logits
        raise NotImplementedError("SLDG fuses the two streams' probabilities, not an embedding")

    def losses(self, batch: Batch, text: Tensor, negative=None, negative_text=None, **_) -> dict[str, Tensor]:
        """``CE(logits_v, y) + CE(logits_a, y)``."""
        lv, la = self.stream_logits(batch)
        y = self.columns(batch.labels)
        out = {"l_ce_v": F.cross_entropy(lv, y), "l_ce_a": F.cross_entropy(la, y)}
        out["loss"] = out["l_ce_v"] + out["l_ce_a"]
        return out

    def encode_samples(self, batch: Batch) -> Tensor:
        """The mean of the two streams' softmax probabilities ``[B, C]``."""
        lv, la = self.stream_logits(batch)
        return (torch.softmax(lv, dim=-1) + torch.softmax(la, dim=-1)) / 2
