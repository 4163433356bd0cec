"""ClipClap-GZSL (CVPRW 2024): MLP encoders on CLIP (video) + CLAP (audio) features and CLIP+CLAP class text,
faithful to ``specs/clipclap.md`` §3 / §4 / §5.3.

The sample ``x = [v ‖ a]`` (video first) goes ``O_enc -> O_proj`` to ``theta_o``; the class text ``w`` goes
``W_enc -> W_proj`` to ``theta_w``, both in a 64-d joint space. ``D_o`` and ``D_w`` decode the two codes back to
the 512-d ``W_enc`` space. Losses (all weights 1, summed in the reference order ``rec + reg + ce``):

* ``l_rec = MSE(W_enc(w), D_o(theta_o)) + MSE(W_enc(w), D_w(theta_w))``, the target not detached;
* ``l_reg = MSE(theta_o, theta_w)``;
* ``l_ce = CE(theta_o @ W_proj(W_enc(E_K))^T, y)`` over the K classes of the training split (dot-product logits),
  the class matrix run in train mode (BN batch statistics over the K classes, dropout on).

At test the classes are ranked by the Euclidean distance ``||theta_o - theta_w(c)||`` (``score_kind="distance"``).

Kept in both modes (the published method and its numbers are defined by them, specs §10 items 5 and 7): the
non-detached reconstruction target, the train-mode class matrix of the CE term, dot-product training logits against
distance scoring. ``--compat official`` adds the reference's extra train-mode ``get_embeddings`` pass after every
optimiser step (item 6), which only moves BN running statistics and draws dropout masks.

The CE term needs the text embeddings of all training classes: the trainer passes them (``needs_class_table``).
Called without them, the method collects the classes from the batches it sees (all K are known after the first few
class-balanced batches).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from avlowshot.data.batching import Batch
from avlowshot.errors import ConfigError
from avlowshot.models.base import InputDims, Method
from avlowshot.models.layers import EmbeddingNet

# Hard-coded in the reference: the encoders' width and dropout, and the joint space (``get_model_params``).
ENC_DIM = 512
ENC_DROPOUT = 0.1
DIM_OUT = 64
# The clipclap layout's class text: CLIP ViT-B/32 text (512) followed by WavCaps-CLAP text (1024).
CLIP_DIM = 512
CLAP_DIM = 1024

# ``text: auto`` = what the reference does for each modality (it ignores --word_embeddings unless modality is both).
_AUTO_TEXT = {"both": "both", "audio": "clap", "video": "clip"}


class ClipClapConfig(BaseModel):
    """The ``model:`` block of a ClipClap config. Defaults are the reference's ``config/clipclap.yaml``, the file
    every published run loads (the reference's ``default.yaml`` values are AVCA's and never reach this model)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    modality: Literal["both", "audio", "video"] = Field(
        "both", description="sample input: [video ‖ audio], audio (CLAP) only, or video (CLIP) only"
    )
    text: Literal["auto", "both", "clip", "clap"] = Field(
        "auto",
        description="class text: CLIP ‖ CLAP, CLIP only, CLAP only; auto = the reference's choice per modality "
        "(both -> both, audio -> clap, video -> clip)",
    )
    decoder_hidden_size: int = Field(512, ge=0, description="hidden width of O_proj and D_o; 0 = no hidden layer")
    decoder_dropout: float = Field(0.1, ge=0, lt=1, description="dropout of O_proj and D_o")
    additional_dropout: float = Field(0.1, ge=0, lt=1, description="dropout of W_proj and D_w")
    rec_loss: bool = True
    reg_loss: bool = True
    cross_entropy_loss: bool = True

    @model_validator(mode="after")
    def _some_loss(self) -> ClipClapConfig:
        if not (self.rec_loss or self.reg_loss or self.cross_entropy_loss):
            raise ValueError("rec_loss, reg_loss and cross_entropy_loss are all false: nothing to train")
        return self


class ClipClap(Method):
    name: ClassVar[str] = "clipclap"
    score_kind: ClassVar[str] = "distance"
    needs_negatives: ClassVar[bool] = False
    needs_class_table: ClassVar[bool] = True  # losses() takes the split's class_text / class_ids (CE term)
    config_class: ClassVar[type[BaseModel]] = ClipClapConfig
    tasks: ClassVar[tuple[str, ...]] = ("gzsl", "gfsl")
    layouts: ClassVar[tuple[str, ...]] = ("clipclap",)
    inputs: ClassVar[str] = "any"

    config: ClipClapConfig

    def __init__(self, config: ClipClapConfig, dims: InputDims, compat: str = "none"):
        super().__init__(config, dims, compat)
        c = config
        self.text_source = _AUTO_TEXT[c.modality] if c.text == "auto" else c.text
        self._text_cols = self._text_columns(dims.text, c.text, self.text_source)
        in_o = {"both": dims.video + dims.audio, "audio": dims.audio, "video": dims.video}[c.modality]
        in_w = self._text_cols.stop - self._text_cols.start

        # Construction order = the reference's, so a seeded init draws the same numbers. The reference's
        # `embeddings_batch_norm` (hidden BN of O_proj / D_o) is true in every published run: always on here.
        self.O_enc = EmbeddingNet(in_o, ENC_DIM, ENC_DROPOUT)
        self.W_enc = EmbeddingNet(in_w, ENC_DIM, ENC_DROPOUT)
        self.O_proj = EmbeddingNet(ENC_DIM, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size)
        self.D_o = EmbeddingNet(DIM_OUT, ENC_DIM, c.decoder_dropout, c.decoder_hidden_size)
        self.W_proj = EmbeddingNet(ENC_DIM, DIM_OUT, c.additional_dropout)
        self.D_w = EmbeddingNet(DIM_OUT, ENC_DIM, c.additional_dropout)

    @staticmethod
    def _text_columns(dim: int, requested: str, source: str) -> slice:
        if dim == CLIP_DIM + CLAP_DIM:
            return {"both": slice(0, dim), "clip": slice(0, CLIP_DIM), "clap": slice(CLIP_DIM, dim)}[source]
        if requested == "auto" or source == "both":  # another benchmark's class table: use it whole
            return slice(0, dim)
        raise ConfigError(
            f"model.text: {requested!r} selects part of the CLIP ‖ CLAP class table ({CLIP_DIM} + {CLAP_DIM} = "
            f"{CLIP_DIM + CLAP_DIM} dims, the clipclap layout), but this benchmark's class table has {dim} dims; "
            "use text: auto or both"
        )

    # ------------------------------------------------------------------------------------------------------------
    # Inputs

    def _sample_input(self, batch: Batch) -> Tensor:
        """``[B, Din]``: video first, as the reference. Temporal batches (other layouts) are averaged over their
        valid rows; the clipclap layout has one vector per video and passes through."""
        a, v = _pool(batch.audio, batch.audio_mask), _pool(batch.video, batch.video_mask)
        if self.config.modality == "audio":
            return a
        if self.config.modality == "video":
            return v
        return torch.cat((v, a), dim=1)

    def _text(self, text: Tensor) -> Tensor:
        return text[:, self._text_cols]

    # ------------------------------------------------------------------------------------------------------------
    # Training classes for the CE term

    @torch.no_grad()
    def _class_matrix(
        self, labels: Tensor, text: Tensor, class_text: Tensor | None, class_ids: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(``E_K`` ``[K, Dt]`` in ascending class id, the labels re-indexed to ``0..K-1``)."""
        if class_text is None or class_ids is None:
            raise ValueError("the cross-entropy term needs class_text and class_ids of every training class")
        return class_text, torch.searchsorted(class_ids.to(labels.device), labels)

    # ------------------------------------------------------------------------------------------------------------

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
        """``class_text`` ``[K, Dt]`` / ``class_ids`` ``[K]`` (ascending): every class of the training split, for
        the CE term (the trainer passes them to methods with ``needs_class_table``)."""
        c = self.config
        # Reference call order (forward, then compute_loss); each call is one BN batch and draws its dropout masks.
        x = self._sample_input(batch)
        o = self.O_enc(x)
        w_e = self.W_enc(self._text(text))
        theta_o = self.O_proj(o)
        rho_o = self.D_o(theta_o)
        theta_w = self.W_proj(w_e)
        rho_w = self.D_w(theta_w)

        out: dict[str, Tensor] = {}
        if c.rec_loss:  # the target w_e is not detached (specs §4.3)
            out["l_rec"] = F.mse_loss(w_e, rho_o) + F.mse_loss(w_e, rho_w)
        if c.reg_loss:
            out["l_reg"] = F.mse_loss(theta_o, theta_w)
        if c.cross_entropy_loss:
            e_k, target = self._class_matrix(batch.labels, text, class_text, class_ids)
            class_codes = self.W_proj(self.W_enc(self._text(e_k)))  # train mode, as the reference
            out["l_ce"] = F.cross_entropy(theta_o @ class_codes.t(), target)
        # Summed in the reference's order: rec + reg + ce.
        total = None
        for v in out.values():
            total = v if total is None else total + v
        out["loss"] = total
        return out

    @torch.no_grad()
    def after_step(self, batch: Batch, text: Tensor) -> None:
        """``--compat official``: the reference's train-mode ``get_embeddings`` call after every optimiser step
        (result discarded). It updates the BN running statistics of O_enc, W_enc, O_proj and W_proj once more and
        draws dropout masks; under ``no_grad`` the effect is the same. Skipped by default."""
        if self.compat != "official":
            return
        o = self.O_enc(self._sample_input(batch))
        w_e = self.W_enc(self._text(text))
        self.O_proj(o)
        self.W_proj(w_e)

    def encode_samples(self, batch: Batch) -> Tensor:
        """``theta_o`` ``[B, 64]``."""
        return self.O_proj(self.O_enc(self._sample_input(batch)))

    def encode_classes(self, text: Tensor) -> Tensor:
        """``theta_w = W_proj(W_enc(text))`` ``[C, 64]``."""
        return self.W_proj(self.W_enc(self._text(text)))

    def scores(self, sample_codes: Tensor, class_codes: Tensor) -> Tensor:
        # Plain (not squared) Euclidean distance, torch.cdist's default compute mode as the reference.
        return torch.cdist(sample_codes, class_codes)


def _pool(x: Tensor, mask: Tensor | None) -> Tensor:
    """``[B, D]`` as is; ``[B, L, D]`` -> the mean over the valid rows of ``mask`` ``[B, L]`` (all rows if None)."""
    if x.dim() == 2:
        return x
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)
