"""Attention Fusion and Perceiver, the transformer-era baselines of the TCAF table (and, with the GFSL head, of the
AV-DIFF table), after ``specs/baselines.md`` §1.2-§1.5, §2.1, §2.2, §3.1, §3.2.

Neither adaptation is public (TCAF, ClipClap and AV-DIFF keep only ``--attention_fusion`` / ``--perceiver`` flags),
so both are **PROPOSED** designs built from the TCAF / AV-DIFF parts that are [CODE]: the input normalisation
(audio / 255, video L2-normalised per frame; per channel over time under ``--compat official``), the per-token
encoders ``A_enc`` / ``V_enc = EmbeddingNet(D -> H -> 300)``, TCAF's modality + Fourier time + padding embedding, the
shared-norm transformer layer and the two heads. One implementation, two heads (``model.head``):

* ``zsl`` (``H_zsl``, TCAF's): ``theta_o`` [64] scored against ``theta_w = W_proj(w)`` by Euclidean distance;
  loss ``CE(theta_o W_proj(E)^T, y) + MSE(theta_o, theta_w) + MSE(w, D_o(theta_o)) + MSE(w, D_w(theta_w))`` over
  the classes of the training split (E), calibrated stacking on distances. GZSL (and a distance GFSL).
* ``fsl`` (``H_fsl``, AV-DIFF's): ``logits = Linear(64, C)(theta_o)`` over the stage's label space, CE, softmax
  probabilities at test with the AV-DIFF metric (beta subtracted from non-novel probabilities). GFSL only: a closed
  label set cannot score unseen classes.

**Attention Fusion** (Fayek & Kumar, IJCAI 2020; ``attention-fusion``). Averaged input: the mean of each video's
valid normalised rows (AV-DIFF §5.2: it "does not fully use the temporal information"). ``theta_a =
O_proj_a(A_enc(a))``, ``theta_v = O_proj_v(V_enc(v))`` (two ``EmbeddingNet(300 -> 512 -> 64)``), attention net
``Linear(128, 128) -> ReLU -> Linear(128, 2 * 64)`` on ``[theta_a; theta_v]``, softmax over the two modalities per
dimension, ``theta_o = alpha_a * theta_a + alpha_v * theta_v``; the heads read ``theta_o`` directly. The paper fuses
per-class outputs, impossible for unseen classes, hence the 64-d embedding space. Alternative: ``unimodal_losses``
(the head's CE on ``theta_a`` and ``theta_v`` too, in place of the paper's pre-trained unimodal models).

**Perceiver** (Jaegle et al., ICML 2021; ``perceiver``). Temporal input: ``X = [audio tokens; video tokens]`` from
the TCAF token front-end (no class token), ``N_lat = 32`` learned latents (``randn`` init) and ``L`` blocks of one
cross-attention (1 head x 64, separate LayerNorms for latents, context and feed-forward; padded tokens masked as
keys) and one latent self-attention layer (TCAF's shared-norm layer, 8 x 64, no mask), no weight tying; readout
``c = LayerNorm(mean over latents)``, then ``theta_o = O_proj(c)`` (``EmbeddingNet(300 -> 512 -> 64)``).
Alternatives: ``num_latents`` (grid 16 / 32 / 64), ``cross_heads``, ``feed_forward: geglu`` (lucidrains' GEGLU x 4
in place of TCAF's GELU MLP of ``transformer_mlp_dim``).

**Audio scale.** TCAF divides audio by 255 (meant for uint8 VGGish) also on SeLaVi floats. There the first
layer's output variance is of the order of BatchNorm's eps (1e-5) and the models fail: on synthetic UCF main (tiny
models, 3 epochs) val HM 0.0 vs 22.9 (Attention Fusion) and 6.4 vs 18.2 (Perceiver) with ``audio_divisor`` 255 vs 1,
so the main configs set ``audio_divisor: 1`` (``--set audio_divisor=255``: TCAF's rule).

**Time stamps.** The collator's seconds (0.96 s audio / 0.64 s video rows) in training and evaluation; under
``--compat official`` the ``zsl`` head evaluates at row indices 0, 1, 2, ... as TCAF's reference does (the ``fsl``
head keeps seconds, AV-DIFF's convention).

**Shipped configs.** GZSL ``<ds>-{cls,main}.yaml``: TCAF's best config of the dataset and feature set (optimiser,
epochs, batch, dropouts, depth L, heads, windows), 50 epochs, the TCAF protocol and grid. GFSL
``<ds>-cls-<k>shot.yaml`` (``head: fsl``, protocol ``P_fsl`` §1.6: one stage on base + k-shot novel, three stage-2
repeats): AV-DIFF's per-dataset values (§1.7: L = 4 / 5 / 8, dropouts per shot, lr 7e-5 / 7e-5 / 6e-5, bs 64 / 32 /
64, plateau on UCF and ActivityNet), 50 epochs, the AV-DIFF grid, beta of the best epoch (``--set beta_from=last``:
AV-DIFF's choice).

**Parameters** (cls features, H = 512): Attention Fusion GZSL 3,112,272; GFSL 2,887,096 (UCF, 48 classes) /
2,896,846 (ActivityNet, 198) / 2,901,591 (VGGSound, 271). Perceiver GZSL 8,216,640 (UCF, ActivityNet; L = 6) /
9,913,952 (VGGSound; L = 8); GFSL 6,294,152 (UCF; L = 4) / 7,152,558 (ActivityNet; L = 5) / 9,703,271 (VGGSound;
L = 8).

**Published** (TCAF README, cls features most likely), GZSL HM VGGSound / UCF / ActivityNet: Attention Fusion 4.95
/ 24.97 / 5.18 (ZSL 3.37 / 20.21 / 4.88), Perceiver 4.93 / 34.11 / 6.92 (ZSL 3.44 / 28.12 / 4.47). AV-DIFF Table 2
(GFSL HM, 1 / 5 / 10-shot): Attention Fusion VGGSound 15.46 / 28.22 / 30.73, UCF 37.39 / 51.68 / 57.91, ActivityNet
4.35 / 6.17 / 10.67; Perceiver VGGSound 17.97 / 29.92 / 33.65, UCF 44.12 / 48.60 / 55.33, ActivityNet 17.34 / 25.75 /
29.88.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from avlowshot.data.batching import Batch, SequenceWindow
from avlowshot.models.base import InputDims, Method
from avlowshot.models.layers import (
    AudioVisualEmbedding,
    CrossAttentionBlock,
    EmbeddingNet,
    GEGLUFeedForward,
    SharedNormLayer,
    embed_rows,
    label_columns,
)

DIM_OUT = 64  # the joint embedding width of the TCAF / AV-DIFF heads
GEGLU_MULT = 4


class FusionConfig(BaseModel):
    """Keys shared by the fusion baselines: the head and the TCAF encoder / head widths and dropouts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    head: Literal["zsl", "fsl"] = Field("zsl", description="zsl: TCAF's text head (GZSL); fsl: AV-DIFF's classifier")
    embeddings_hidden_size: int = Field(512, ge=1, description="A_enc/V_enc hidden width H")
    decoder_hidden_size: int = Field(512, ge=1, description="O_proj/D_o hidden width")
    embedding_dropout: float = Field(0.3, ge=0, lt=1, description="A_enc/V_enc")
    decoder_dropout: float = Field(0.1, ge=0, lt=1, description="O_proj/D_o")
    additional_dropout: float = Field(0.1, ge=0, lt=1, description="W_proj/D_w (zsl head)")
    embeddings_batch_norm: bool = Field(True, description="BN in the hidden layer of A_enc/V_enc/O_proj/D_o")
    cross_entropy_loss: bool = Field(True, description="zsl head: CE against the training classes' W_proj(w)")
    reg_loss: bool = Field(True, description="zsl head: MSE(theta_o, theta_w)")
    rec_loss: bool = Field(True, description="zsl head: MSE(w, D_o(theta_o)) + MSE(w, D_w(theta_w))")
    train_window: int | None = Field(None, ge=1, description="fixed training window, video rows (random start)")
    test_window: int | None = Field(None, ge=1, description="fixed evaluation window, video rows (centred)")
    audio_divisor: float = Field(
        255.0, gt=0, description="audio is divided by it (TCAF: 255, meant for uint8 VGGish, also on SeLaVi floats)"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.head == "zsl" and not (self.cross_entropy_loss or self.reg_loss or self.rec_loss):
            raise ValueError("head zsl: at least one of cross_entropy_loss, reg_loss, rec_loss must be true")
        return self


class AttentionFusionConfig(FusionConfig):
    attention_hidden: int = Field(128, ge=1, description="hidden width of the attention net")
    unimodal_losses: bool = Field(False, description="alternative: the head's CE on theta_a and theta_v as well")


class TokenConfig(FusionConfig):
    """The token front-end ``TF`` (baselines.md §1.2) and transformer widths of the temporal fusion baselines."""

    transformer_dim: int = Field(300, ge=1, description="token / latent width D")
    transformer_depth: int = Field(6, ge=1, description="L blocks / layers")
    transformer_heads: int = Field(8, ge=1, description="self-attention heads")
    transformer_dim_head: int = Field(64, ge=1)
    transformer_mlp_dim: int = Field(128, ge=1)
    transformer_dropout: float = Field(0.3, ge=0, lt=1, description="attention outputs and feed-forwards")
    transformer_embedding_dim: int = Field(64, ge=2, description="E: modality/time/padding embedding width (even)")
    transformer_embedding_dropout: float = Field(0.2, ge=0, lt=1)
    transformer_embedding_time_embed_type: Literal["sinusoid", "none"] = "sinusoid"
    transformer_embedding_fourier_scale: float = 10.0
    transformer_embedding_modality: bool = True

    @model_validator(mode="after")
    def _check_even(self):
        if self.transformer_embedding_dim % 2:
            raise ValueError(f"transformer_embedding_dim must be even, got {self.transformer_embedding_dim}")
        return self


class PerceiverConfig(TokenConfig):
    num_latents: int = Field(32, ge=1, description="N_lat (PROPOSED 32; grid 16, 32, 64)")
    cross_heads: int = Field(1, ge=1, description="cross-attention heads (the paper: 1)")
    cross_dim_head: int = Field(64, ge=1)
    feed_forward: Literal["gelu", "geglu"] = Field(
        "gelu", description="gelu: TCAF's MLP of transformer_mlp_dim; geglu: lucidrains' GEGLU x 4"
    )


# ----------------------------------------------------------------------------------------------------------------


def normalised_sequences(batch: Batch, method: str, official: bool, divisor: float = 255.0) -> tuple[Tensor, ...]:
    """(audio, video, audio valid, video valid, audio times, video times) of a temporal batch, normalised as TCAF /
    AV-DIFF do: audio / ``divisor`` (255), video L2 per row (``official``: per channel over time)."""
    if batch.audio.dim() != 3 or batch.video.dim() != 3 or batch.audio_mask is None or batch.video_mask is None:
        raise ValueError(
            f"{method} takes temporal features ([B, L, D] per modality with masks), got audio "
            f"{tuple(batch.audio.shape)} and video {tuple(batch.video.shape)}: use a tcaf-* or the avdiff layout"
        )
    a = batch.audio / divisor
    v = F.normalize(batch.video, dim=1 if official else -1)
    return a, v, batch.audio_mask, batch.video_mask, batch.audio_time, batch.video_time


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``x`` [B, L, D] over the valid rows ``valid`` [B, L] of each sample -> [B, D]."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class FusionBaseline(Method):
    """A fused audio-visual embedding ``theta_o`` [B, 64] (:meth:`theta_o`, the backbone of each subclass) read by
    the ``zsl`` or the ``fsl`` head (``model.head``). ``score_kind`` follows the head."""

    score_kind: ClassVar[str] = "distance"  # the zsl head's; the fsl head sets "probability" on the instance
    needs_negatives: ClassVar[bool] = False
    needs_class_table: ClassVar[bool] = True  # the zsl head's CE over the training classes
    needs_label_space: ClassVar[bool] = True  # built with classes= (the fsl head's classifier); per instance below
    tasks: ClassVar[tuple[str, ...]] = ("gzsl", "gfsl")
    layouts: ClassVar[tuple[str, ...]] = ("tcaf-cls", "tcaf-main", "avdiff")
    inputs: ClassVar[str] = "temporal"

    config: FusionConfig

    def __init__(self, config: FusionConfig, dims: InputDims, compat: str = "none", classes=None):
        super().__init__(config, dims, compat)
        self.official = compat == "official"
        self.fsl = config.head == "fsl"
        self.score_kind = "probability" if self.fsl else "distance"
        self.needs_label_space = self.fsl  # the zsl head scores any class text (e.g. new names at predict time)
        if self.fsl and classes is None:
            raise ValueError(f"{self.name} with head fsl needs the label space of its classifier (classes=...)")
        labels = np.sort(np.asarray(classes if classes is not None else [], dtype=np.int64))
        self.register_buffer("label_space", torch.as_tensor(labels, dtype=torch.int64), persistent=False)
        self.build_backbone(config, dims)
        c = config
        if self.fsl:
            self.build_head(len(labels))
        else:
            bn = c.embeddings_batch_norm
            self.D_o = EmbeddingNet(DIM_OUT, dims.text, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)
            self.W_proj = EmbeddingNet(dims.text, DIM_OUT, c.additional_dropout)
            self.D_w = EmbeddingNet(DIM_OUT, dims.text, c.additional_dropout)

    # Subclasses -------------------------------------------------------------------------------------------------

    def build_backbone(self, config, dims: InputDims) -> None:
        raise NotImplementedError

    def build_head(self, n_classes: int) -> None:
        """The ``fsl`` head's classifier over the label space (methods with several classifiers add theirs)."""
        self.classifier = nn.Linear(DIM_OUT, n_classes)

    def theta_o(self, batch: Batch, positions: bool = False) -> tuple[Tensor, list[Tensor]]:
        """``theta_o`` [B, 64] and the unimodal embeddings that extra CE terms may read (else ``[]``).
        ``positions``: evaluate at row indices 0, 1, 2, ... instead of the batch's seconds."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------------

    def sequence_window(self, training: bool, phase: str = "test") -> SequenceWindow | None:
        length = self.config.train_window if training else self.config.test_window
        return None if length is None else SequenceWindow(length, official=self.official)

    def rows(self, net: EmbeddingNet, x: Tensor, valid: Tensor) -> Tensor:
        """A per-row net on ``[B, L, D]``; in training BN sees the valid rows only (``official``: the padding too)."""
        return embed_rows(net, x, valid, include_padding=self.official)

    def columns(self, labels: Tensor) -> Tensor:
        """Global class ids -> classifier columns (ascending id order of the label space)."""
        return label_columns(self.label_space.to(labels.device), labels)

    def _zsl_ce(self, theta: Tensor, class_text: Tensor, class_ids: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(theta @ self.W_proj(class_text).t(), torch.searchsorted(class_ids, labels))

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
        c = self.config
        theta, unimodal = self.theta_o(batch)
        out: dict[str, Tensor] = {}
        if self.fsl:
            y = self.columns(batch.labels)
            out["l_ce"] = F.cross_entropy(self.classifier(theta), y)
            for name, t in zip(("a", "v"), unimodal, strict=False):
                out[f"l_ce_{name}"] = F.cross_entropy(self.classifier(t), y)
        else:
            if c.cross_entropy_loss and (class_text is None or class_ids is None):
                raise ValueError(f"{self.name}'s cross-entropy needs class_text and class_ids of the training split")
            # TCAF's head, its terms in its order (rec, reg, ce).
            rho_o = self.D_o(theta)
            theta_w = self.W_proj(text)
            rho_w = self.D_w(theta_w)
            if c.rec_loss:
                out["l_rec"] = F.mse_loss(rho_o, text) + F.mse_loss(rho_w, text)
            if c.reg_loss:
                out["l_reg"] = F.mse_loss(theta, theta_w)
            if c.cross_entropy_loss:
                out["l_ce"] = self._zsl_ce(theta, class_text, class_ids, batch.labels)
                for name, t in zip(("a", "v"), unimodal, strict=False):
                    out[f"l_ce_{name}"] = self._zsl_ce(t, class_text, class_ids, batch.labels)
        out["loss"] = sum(out.values())
        return out

    def encode_samples(self, batch: Batch) -> Tensor:
        """``zsl``: ``theta_o`` [B, 64]; ``fsl``: softmax probabilities over the label space [B, C]."""
        theta, _ = self.theta_o(batch, positions=self.official and not self.fsl)
        return torch.softmax(self.classifier(theta), dim=-1) if self.fsl else theta

    def encode_classes(self, text: Tensor, class_ids: Tensor | None = None) -> Tensor:
        """``zsl``: ``W_proj(text)`` [C, 64]; ``fsl``: the classifier columns of ``class_ids``."""
        if not self.fsl:
            return self.W_proj(text)
        if class_ids is None:
            raise ValueError(f"{self.name} (head fsl) scores classes by classifier column: pass class_ids")
        return self.columns(class_ids)

    def scores(self, sample_codes: Tensor, class_codes: Tensor) -> Tensor:
        if self.fsl:
            return sample_codes[:, class_codes.to(sample_codes.device)]
        return torch.cdist(sample_codes, class_codes)


# ----------------------------------------------------------------------------------------------------------------


class AttentionFusion(FusionBaseline):
    name: ClassVar[str] = "attention-fusion"
    config_class: ClassVar[type[BaseModel]] = AttentionFusionConfig

    config: AttentionFusionConfig

    def build_backbone(self, config: AttentionFusionConfig, dims: InputDims) -> None:
        c, d, bn = config, 300, config.embeddings_batch_norm
        self.A_enc = EmbeddingNet(dims.audio, d, c.embedding_dropout, c.embeddings_hidden_size, hidden_bn=bn)
        self.V_enc = EmbeddingNet(dims.video, d, c.embedding_dropout, c.embeddings_hidden_size, hidden_bn=bn)
        self.O_proj_a = EmbeddingNet(d, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)
        self.O_proj_v = EmbeddingNet(d, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)
        self.attention = nn.Sequential(
            nn.Linear(2 * DIM_OUT, c.attention_hidden), nn.ReLU(), nn.Linear(c.attention_hidden, 2 * DIM_OUT)
        )

    def fuse(self, theta_a: Tensor, theta_v: Tensor) -> Tensor:
        """``alpha = softmax over modalities of g([theta_a; theta_v])`` per dimension; ``sum_m alpha_m theta_m``."""
        g = self.attention(torch.cat((theta_a, theta_v), dim=-1)).view(-1, 2, DIM_OUT)
        alpha = torch.softmax(g, dim=1)
        return alpha[:, 0] * theta_a + alpha[:, 1] * theta_v

    def theta_o(self, batch: Batch, positions: bool = False) -> tuple[Tensor, list[Tensor]]:
        a, v, am, vm, _, _ = normalised_sequences(batch, "Attention Fusion", self.official, self.config.audio_divisor)
        theta_a = self.O_proj_a(self.A_enc(masked_mean(a, am)))
        theta_v = self.O_proj_v(self.V_enc(masked_mean(v, vm)))
        unimodal = [theta_a, theta_v] if self.config.unimodal_losses else []
        return self.fuse(theta_a, theta_v), unimodal


class TokenFusionBaseline(FusionBaseline):
    """A fusion baseline on the token front-end ``TF`` (baselines.md §1.2): per-token ``A_enc`` / ``V_enc`` and the
    modality + Fourier time + padding embedding, giving audio and video token sequences with their validity masks."""

    config: TokenConfig

    def build_front_end(self, config: TokenConfig, dims: InputDims) -> None:
        c, d, bn = config, config.transformer_dim, config.embeddings_batch_norm
        self.A_enc = EmbeddingNet(dims.audio, d, c.embedding_dropout, c.embeddings_hidden_size, hidden_bn=bn)
        self.V_enc = EmbeddingNet(dims.video, d, c.embedding_dropout, c.embeddings_hidden_size, hidden_bn=bn)
        self.position_encoder_block = AudioVisualEmbedding(
            d,
            d,
            d,
            c.transformer_embedding_dim,
            c.transformer_embedding_dropout,
            embed_modality=c.transformer_embedding_modality,
            time_embed=c.transformer_embedding_time_embed_type,
            fourier_scale=c.transformer_embedding_fourier_scale,
        )

    def tokens(self, batch: Batch, positions: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(audio tokens [B, La, D], video tokens [B, Lv, D], audio valid, video valid). ``positions``: times are
        row indices 0, 1, 2, ... instead of the batch's seconds."""
        a, v, am, vm, at, vt = normalised_sequences(batch, self.name, self.official, self.config.audio_divisor)
        fa = self.rows(self.A_enc, a, am)
        fv = self.rows(self.V_enc, v, vm)
        if positions:
            at = torch.arange(fa.shape[1], device=fa.device, dtype=fa.dtype).expand(fa.shape[:2])
            vt = torch.arange(fv.shape[1], device=fv.device, dtype=fv.dtype).expand(fv.shape[:2])
        emb = self.position_encoder_block
        return emb.embed(0, fa, am, at), emb.embed(1, fv, vm, vt), am, vm


class Perceiver(TokenFusionBaseline):
    name: ClassVar[str] = "perceiver"
    config_class: ClassVar[type[BaseModel]] = PerceiverConfig

    config: PerceiverConfig

    def build_backbone(self, config: PerceiverConfig, dims: InputDims) -> None:
        c, d, bn = config, config.transformer_dim, config.embeddings_batch_norm
        self.build_front_end(config, dims)
        self.latents = nn.Parameter(torch.randn(c.num_latents, d))
        p = c.transformer_dropout

        def ff() -> nn.Module | None:
            return GEGLUFeedForward(d, GEGLU_MULT, p) if c.feed_forward == "geglu" else None

        blocks = []
        for _ in range(c.transformer_depth):
            cross = CrossAttentionBlock(d, c.cross_heads, c.cross_dim_head, c.transformer_mlp_dim, p, ff=ff())
            latent = SharedNormLayer(d, c.transformer_heads, c.transformer_dim_head, c.transformer_mlp_dim, p)
            if c.feed_forward == "geglu":
                latent.ff = ff()
            blocks.append(nn.ModuleList([cross, latent]))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d)
        self.O_proj = EmbeddingNet(d, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)

    def fused(self, batch: Batch, positions: bool = False) -> Tensor:
        """``c = LayerNorm(mean over latents)`` [B, D] after the ``L`` cross / latent blocks."""
        xa, xv, am, vm = self.tokens(batch, positions)
        x = torch.cat((xa, xv), dim=1)
        valid = torch.cat((am, vm), dim=1)
        z = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for cross, latent in self.blocks:
            z = cross(z, x, valid)
            z = latent(z)
        return self.norm(z.mean(dim=1))

    def theta_o(self, batch: Batch, positions: bool = False) -> tuple[Tensor, list[Tensor]]:
        return self.O_proj(self.fused(batch, positions)), []
