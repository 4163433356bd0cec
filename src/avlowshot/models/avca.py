"""AVCA (CVPR 2022): audio-visual cross-attention on averaged features, faithful to ``specs/avca.md`` §2.1 / §3.1.

Kept reference behaviour (specs §9, items 2-5), since the published numbers depend on it:

* only the video branch ``theta_v`` is scored at test, against ``theta_w = W_proj(text)``, by Euclidean distance;
* ``pos_emb1D`` stays at its seeded ``randn`` init (a frozen parameter: counted, saved, never optimised);
* the double residual after the transformer: tokens become ``2*phi + pos + deltas``;
* every sub-network call is its own BatchNorm batch, in the reference call order, including the calls whose
  outputs the loss never reads; they only move BN running statistics, and those are the eval-time statistics.

ClipClap table (``configs/avca/<ds>-clipclap.yaml``, PROPOSED: no code exists, specs/baselines.md §2.3.5 makes the
same choice for Hyper-multiple): 1024-d CLAP audio, 512-d CLIP video and the 1536-d CLIP ‖ CLAP text into
``W_proj`` / out of ``D`` (2,117,168 parameters); model values and protocol of the AVCA cls run scripts (from code).
Alternative: ClipClap's protocol constants (``--set batch_size=64 --set n_batches=300 --set lr=7e-5 --set
epochs=20 --set beta_grid=clipclap`` for UCF; lr 1e-4, 15 epochs for ActivityNet / VGGSound). Published (ClipClap
README, HM / ZSL): UCF 36.69 / 38.67, ActivityNet 21.76 / 20.88, VGGSound 11.26 / 8.16.

GFSL (AV-DIFF Table 2, ``--shots k``; baselines.md §3.7, PROPOSED: the adaptation is not public): AV-DIFF "uses a
classifier on the video output". ``model.head: classifier`` (the shipped ``<ds>-cls-<k>shot`` configs, AV-DIFF's
``--AVCA_cls``): ``Linear(64, C)`` on ``theta_v``, CE only, softmax probabilities at test with AV-DIFF's metric
(+ 65 x C parameters); ``classifier+avca`` (``--AVCA_cls_original``): AVCA's whole loss plus that CE; ``text``
(``--AVCA``, the GZSL default): nearest ``W_proj(w)`` with calibrated distances. AVCA's own optimisation and
dropouts of the cls configs, on the temporal averages of the avdiff / tcaf-cls features (or avca-cls). Published
GFSL HM / FSL (1 / 5 / 10-shot): VGGSound 6.29 / 10.29, 15.98 / 20.50, 18.08 / 28.27; UCF 43.61 / 31.24, 49.19 /
36.70, 50.53 / 39.17; ActivityNet 12.83 / 12.22, 20.09 / 21.65, 26.02 / 26.76.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from avlowshot.data.batching import Batch
from avlowshot.models.base import InputDims, Method, check_averaged
from avlowshot.models.layers import EmbeddingNet, PreNormTransformer, label_columns

# Hard-coded in the reference: token width (= its word-vector dim), attention shape and the joint space.
MODEL_DIM = 300
HEADS = 3
DIM_HEAD = 100
MLP_DIM = 64
DIM_OUT = 64


class AVCAConfig(BaseModel):
    """The ``model:`` block of an AVCA config: the reference's ``main.py`` flags, with its argparse defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    embeddings_hidden_size: int = Field(1024, ge=0, description="A_enc/V_enc hidden width; 0 = no hidden layer")
    decoder_hidden_size: int = Field(64, ge=0, description="A_proj/V_proj hidden width; 0 = no hidden layer")
    embedding_dropout: float = Field(0.8, ge=0, lt=1, description="r_enc: encoders and transformer")
    decoder_dropout: float = Field(0.5, ge=0, lt=1, description="r_proj: A_proj, V_proj")
    additional_dropout: float = Field(0.0, ge=0, lt=1, description="r_dec: W_proj, D, A_rec, V_rec")
    momentum: float = Field(0.99, ge=0, le=1, description="BN momentum of the output BN of hidden-layer nets only")
    depth_transformer: int = Field(1, ge=0)
    additional_triplets_loss: bool = False
    first_additional_triplet: float = 1.0
    second_additional_triplet: float = 1.0
    reg_loss: bool = False
    head: Literal["text", "classifier", "classifier+avca"] = Field(
        "text",
        description="text: AVCA's nearest W_proj(w) (GZSL; a distance GFSL); classifier: AV-DIFF's AVCA_cls, "
        "Linear(64, C) on theta_v with CE only (GFSL, PROPOSED default there); classifier+avca: AVCA_cls_original, "
        "AVCA's loss + that CE",
    )


def _triplet(anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    # nn.TripletMarginLoss() defaults, as in the reference.
    return F.triplet_margin_loss(anchor, positive, negative, margin=1.0, p=2, eps=1e-6, reduction="mean")


class AVCA(Method):
    name: ClassVar[str] = "avca"
    score_kind: ClassVar[str] = "distance"
    needs_negatives: ClassVar[bool] = True
    config_class: ClassVar[type[BaseModel]] = AVCAConfig
    tasks: ClassVar[tuple[str, ...]] = ("gzsl", "gfsl")
    layouts: ClassVar[tuple[str, ...]] = ("avca-cls", "avca-main", "tcaf-cls", "tcaf-main", "clipclap", "avdiff")
    inputs: ClassVar[str] = "averaged"

    needs_label_space: ClassVar[bool] = True  # the classifier heads' label space; the text head ignores it

    config: AVCAConfig

    def __init__(self, config: AVCAConfig, dims: InputDims, compat: str = "none", classes=None):
        super().__init__(config, dims, compat)
        c = config
        self.needs_label_space = c.head != "text"
        if self.needs_label_space:
            if classes is None:
                raise ValueError(f"AVCA with head {c.head} needs the label space of its classifier (classes=...)")
            self.score_kind = "probability"

        def net(in_dim: int, out_dim: int, dropout: float, hidden: int = 0) -> EmbeddingNet:
            # The reference ignores --momentum for single-layer nets (their only BN keeps the default 0.1).
            return EmbeddingNet(in_dim, out_dim, dropout, hidden, out_momentum=c.momentum if hidden else 0.1)

        # Construction order = the reference's, so a seeded init draws the same numbers.
        self.A_enc = net(dims.audio, MODEL_DIM, c.embedding_dropout, c.embeddings_hidden_size)
        self.V_enc = net(dims.video, MODEL_DIM, c.embedding_dropout, c.embeddings_hidden_size)
        self.cross_attention = PreNormTransformer(
            MODEL_DIM, c.depth_transformer, HEADS, DIM_HEAD, MLP_DIM, c.embedding_dropout
        )
        self.W_proj = net(dims.text, DIM_OUT, c.additional_dropout)
        self.D = net(DIM_OUT, dims.text, c.additional_dropout)
        self.A_proj = net(MODEL_DIM, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size)
        self.V_proj = net(MODEL_DIM, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size)
        self.A_rec = net(DIM_OUT, MODEL_DIM, c.additional_dropout)
        self.V_rec = net(DIM_OUT, MODEL_DIM, c.additional_dropout)
        # Missing from the reference's optimiser, so it keeps its random init: frozen, but a Parameter so that it is
        # counted and saved under the reference's key.
        self.pos_emb1D = nn.Parameter(torch.randn(2, MODEL_DIM), requires_grad=False)
        if self.needs_label_space:  # AV-DIFF's AVCA adaptation: a classifier on the video output (baselines §3.7)
            space = np.sort(np.asarray(classes, dtype=np.int64))
            self.register_buffer("label_space", torch.as_tensor(space), persistent=False)
            self.classifier = nn.Linear(DIM_OUT, len(space))

    def _attend(self, phi_a: Tensor, phi_v: Tensor) -> tuple[Tensor, Tensor]:
        tokens = torch.stack((phi_a + self.pos_emb1D[0], phi_v + self.pos_emb1D[1]), dim=1)  # [B, 2, 300]
        y = self.cross_attention(tokens)
        # Second residual on top of the transformer's own (specs §9.4).
        return phi_a + y[:, 0], phi_v + y[:, 1]

    def losses(
        self, batch: Batch, text: Tensor, negative: Batch | None = None, negative_text: Tensor | None = None
    ) -> dict[str, Tensor]:
        if self.config.head == "classifier":  # AVCA_cls: the classifier's CE on theta_v only
            theta_v = self.encode_video(batch)
            l_ce = F.cross_entropy(self.classifier(theta_v), label_columns(self.label_space, batch.labels))
            return {"l_ce": l_ce, "loss": l_ce}
        if negative is None or negative_text is None:
            raise ValueError("AVCA needs a negative batch and its class text embeddings (needs_negatives=True)")
        check_averaged(batch, "AVCA")
        check_averaged(negative, "AVCA")
        c = self.config
        # Reference call order (specs §2.1); each call is one BN batch and draws its dropout masks in this order.
        phi_a = self.A_enc(batch.audio)
        phi_v = self.V_enc(batch.video)
        phi_a_neg = self.A_enc(negative.audio)
        phi_v_neg = self.V_enc(negative.video)
        theta_w = self.W_proj(text)
        theta_w_neg = self.W_proj(negative_text)
        rho_w = self.D(theta_w)
        with torch.no_grad():  # output unused by the loss; the call only moves D's BN statistics and dropout RNG
            self.D(theta_w_neg)
        # One transformer call for positives and negatives: it has no BatchNorm, so every row gets what its own
        # call would give (to rounding), in half the kernels.
        a_both, v_both = self._attend(torch.cat((phi_a, phi_a_neg)), torch.cat((phi_v, phi_v_neg)))
        sizes = (len(phi_a), len(phi_a_neg))
        (a_att, a_att_neg), (v_att, v_att_neg) = a_both.split(sizes), v_both.split(sizes)
        theta_v = self.V_proj(v_att)
        theta_v_neg = self.V_proj(v_att_neg)
        theta_a = self.A_proj(a_att)
        theta_a_neg = self.A_proj(a_att_neg)
        phi_v_rec = self.V_rec(theta_v)
        phi_a_rec = self.A_rec(theta_a)
        with torch.no_grad():  # the reference's unused "se_em_hat" passes: BN statistics of A_proj/V_proj only
            self.A_proj(phi_a_rec)
            self.V_proj(phi_v_rec)
        rho_a = self.D(theta_a)
        rho_a_neg = self.D(theta_a_neg)
        rho_v = self.D(theta_v)
        rho_v_neg = self.D(theta_v_neg)

        # Terms summed in the reference's order, so the total matches it to the last bit.
        out = {
            "l_rec": F.mse_loss(text, rho_v) + F.mse_loss(text, rho_a) + F.mse_loss(text, rho_w),
            "l_ct": _triplet(rho_w, rho_a, rho_a_neg) + _triplet(rho_w, rho_v, rho_v_neg),
            "l_w": _triplet(theta_w, theta_a, theta_a_neg)
            + _triplet(theta_a, theta_w, theta_w_neg)
            + _triplet(theta_w, theta_v, theta_v_neg)
            + _triplet(theta_v, theta_w, theta_w_neg),
        }
        if c.additional_triplets_loss:
            out["l_t"] = c.first_additional_triplet * (
                _triplet(theta_a, theta_w, theta_a_neg) + _triplet(theta_v, theta_w, theta_v_neg)
            ) + c.second_additional_triplet * (
                _triplet(theta_w, theta_a, theta_w_neg) + _triplet(theta_w, theta_v, theta_w_neg)
            )
        if c.reg_loss:
            out["l_r"] = (
                F.mse_loss(phi_v_rec, phi_v)
                + F.mse_loss(phi_a_rec, phi_a)
                + F.mse_loss(theta_v, theta_w)
                + F.mse_loss(theta_a, theta_w)
            )
        out.update(self.encoder_terms(phi_a, phi_v, phi_a_neg, phi_v_neg))
        if c.head == "classifier+avca":  # AVCA_cls_original: AVCA's loss and the classifier's CE on theta_v
            out["l_ce"] = F.cross_entropy(self.classifier(theta_v), label_columns(self.label_space, batch.labels))
        out["loss"] = sum(out.values())
        return out

    def encoder_terms(self, phi_a: Tensor, phi_v: Tensor, phi_a_neg: Tensor, phi_v_neg: Tensor) -> dict[str, Tensor]:
        """Extra loss terms on the encoder outputs (positives, negatives), added last; none for AVCA (a hook for
        its variants, e.g. the Hyper-AVZSL alignment loss)."""
        return {}

    @torch.no_grad()
    def after_step(self, batch: Batch, text: Tensor) -> None:
        """The reference re-runs ``get_embeddings`` in train mode after every optimiser step and discards the
        result: the pass only updates the BN running statistics of A_enc, V_enc, W_proj, V_proj, A_proj and draws
        dropout masks. Under ``no_grad`` those effects are identical and no graph is built."""
        phi_a = self.A_enc(batch.audio)
        phi_v = self.V_enc(batch.video)
        self.W_proj(text)
        a_att, v_att = self._attend(phi_a, phi_v)
        self.V_proj(v_att)
        self.A_proj(a_att)

    def encode_video(self, batch: Batch) -> Tensor:
        """``theta_v`` [B, 64], the video output."""
        check_averaged(batch, "AVCA")
        _, v_att = self._attend(self.A_enc(batch.audio), self.V_enc(batch.video))
        return self.V_proj(v_att)

    def encode_samples(self, batch: Batch) -> Tensor:
        """``theta_v`` [B, 64]: the reference scores the video branch only (specs §9.2); the classifier heads:
        softmax probabilities over the label space [B, C]."""
        theta_v = self.encode_video(batch)
        return torch.softmax(self.classifier(theta_v), dim=-1) if self.needs_label_space else theta_v

    def encode_classes(self, text: Tensor, class_ids: Tensor | None = None) -> Tensor:
        """``theta_w = W_proj(text)`` [C, 64]; the classifier heads: the columns of ``class_ids``."""
        if not self.needs_label_space:
            return self.W_proj(text)
        if class_ids is None:
            raise ValueError(f"AVCA (head {self.config.head}) scores classes by classifier column: pass class_ids")
        return label_columns(self.label_space, class_ids.to(self.label_space.device))

    def scores(self, sample_codes: Tensor, class_codes: Tensor) -> Tensor:
        if self.needs_label_space:
            return sample_codes[:, class_codes.to(sample_codes.device)]
        # Default compute mode (matmul path above 25 rows), as the reference, so that ties break the same way.
        return torch.cdist(sample_codes, class_codes)
