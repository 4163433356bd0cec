"""TCAF (ECCV 2022): temporal cross-attention over audio and video token sequences, after ``specs/tcaf.md`` §2-3.

One joint transformer over ``[CLS; audio tokens; video tokens]``. Every token is a per-row embedding of its feature
(A_enc / V_enc), concatenated with a modality + Fourier time + padding embedding and projected back to the token
width. The default attention is cross-modal: an audio token sees the class token and the video tokens, a video token
the class token and the audio tokens, the class token everything. The class-token output ``theta_o = O_proj(c_o)`` is
scored against ``theta_w = W_proj(text)`` by Euclidean distance. Losses: cross-entropy of ``theta_o`` against every
class of the split, ``MSE(theta_o, theta_w)`` and the reconstructions ``MSE(w, D_o(theta_o)) + MSE(w, D_w(theta_w))``.

Reference quirks (specs §10) that live in the model, fixed by default and reproduced with ``compat="official"``:

* evaluation time positions: the reference evaluates with row indices 0, 1, 2, ... as time stamps while it trains
  with seconds (0.96 s audio / 0.64 s video rows); the default uses seconds in both;
* video normalisation: ``F.normalize(v)`` on ``[B, T, D]`` normalises every channel over *time*; the default
  normalises every row (frame);
* BatchNorm of A_enc / V_enc sees padded rows in training; the default feeds it the valid rows only;
* an extra train-mode ``get_embeddings`` pass after every optimiser step, whose output is discarded (it only moves
  BN running statistics and dropout RNG); the default skips it;
* the ActivityNet window collation (audio rows ``round(L * 0.64 * 0.96)``, the last random offset never drawn):
  :meth:`TCAF.sequence_window` returns a window with ``official=True``.

Kept in both modes: audio divided by 255 (also for SeLaVi floats), one LayerNorm shared by both sub-blocks of a layer,
post-ReLU ``rho`` compared with signed word vectors.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from avlowshot.data.batching import Batch, SequenceWindow
from avlowshot.errors import ConfigError
from avlowshot.models.base import InputDims, Method
from avlowshot.models.layers import EmbeddingNet, embed_rows, token_attention_mask, token_fusion

DIM_OUT = 64  # hard-coded in the reference (utils_improvements.get_model_params)
CLS, AUDIO, VIDEO = 0, 1, 2  # token kinds of the attention mask


class TCAFConfig(BaseModel):
    """The ``model:`` block of a TCAF config: the reference's model flags, under their names.

    Defaults are the values every shipped best config shares (specs/tcaf.md §6.3); for the keys the best configs set
    per benchmark, the reference's ``config/default.yaml``. ``train_window`` / ``test_window`` are the reference's
    ``batch_seqlen_{train,test}_maxlen`` with mode ``fixed`` (``None`` = mode ``max``: pad to the batch's longest
    sequence); training windows start at random, test windows are centred (``*_trim`` random / center).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    embeddings_hidden_size: int = Field(1024, ge=1, description="A_enc/V_enc hidden width")
    decoder_hidden_size: int = Field(512, ge=1, description="O_proj/D_o hidden width")
    embedding_dropout: float = Field(0.8, ge=0, lt=1, description="A_enc/V_enc")
    decoder_dropout: float = Field(0.5, ge=0, lt=1, description="O_proj/D_o")
    additional_dropout: float = Field(0.0, ge=0, lt=1, description="W_proj/D_w")
    embeddings_batch_norm: bool = Field(True, description="BN in the hidden layer of A_enc/V_enc/O_proj/D_o")
    cross_entropy_loss: bool = True
    reg_loss: bool = True
    rec_loss: bool = True
    transformer_use_embedding_net: bool = Field(True, description="A_enc/V_enc before the token embedding")
    transformer_dim: int = Field(300, ge=1, description="token width D (= text dim when rec_loss)")
    transformer_depth: int = Field(5, ge=1)
    transformer_heads: int = Field(4, ge=1)
    transformer_dim_head: int = Field(64, ge=1)
    transformer_mlp_dim: int = Field(128, ge=1)
    transformer_dropout: float = Field(0.5, ge=0, lt=1, description="attention output and feed-forward")
    transformer_embedding_dim: int = Field(64, ge=2, description="E: modality/time/padding embedding width (even)")
    transformer_embedding_dropout: float = Field(0.1, ge=0, lt=1, description="after the token projection")
    transformer_embedding_time_embed_type: Literal["sinusoid", "none"] = "sinusoid"
    transformer_embedding_fourier_scale: float = 10.0
    transformer_embedding_modality: bool = True
    attention: Literal["cross", "self", "full"] = Field(
        "cross", description="cross: use_cross_attention only (all best configs); self: use_self_attention only; full"
    )
    train_window: int | None = Field(None, ge=1, description="fixed training window, video rows (random start)")
    test_window: int | None = Field(None, ge=1, description="fixed evaluation window, video rows (centred)")
    average_inputs: bool = Field(False, description="baseline: one time-averaged token per modality")

    @model_validator(mode="after")
    def _check(self) -> TCAFConfig:
        if not (self.cross_entropy_loss or self.reg_loss or self.rec_loss):
            raise ValueError("at least one of cross_entropy_loss, reg_loss, rec_loss must be true")
        if self.transformer_embedding_dim % 2:
            raise ValueError(f"transformer_embedding_dim must be even, got {self.transformer_embedding_dim}")
        return self


class TCAF(Method):
    name: ClassVar[str] = "tcaf"
    score_kind: ClassVar[str] = "distance"
    needs_negatives: ClassVar[bool] = False
    needs_class_table: ClassVar[bool] = True  # the trainer passes class_text / class_ids of the training split
    config_class: ClassVar[type[BaseModel]] = TCAFConfig
    tasks: ClassVar[tuple[str, ...]] = ("gzsl", "gfsl")
    layouts: ClassVar[tuple[str, ...]] = ("tcaf-cls", "tcaf-main")
    inputs: ClassVar[str] = "temporal"
    text_dim_keys: ClassVar[tuple[str, ...]] = ("transformer_dim",)  # rec_loss: D_o outputs the class text

    config: TCAFConfig

    def __init__(self, config: TCAFConfig, dims: InputDims, compat: str = "none"):
        super().__init__(config, dims, compat)
        c = config
        d = c.transformer_dim
        if c.rec_loss and d != dims.text:
            raise ConfigError(
                f"model.transformer_dim: rec_loss compares D_o's {d}-d output with the {dims.text}-d class text "
                f"embedding; set transformer_dim: {dims.text}"
            )
        self.official = compat == "official"
        bn = c.embeddings_batch_norm
        # Construction order = the reference's (specs §2.3), so a seeded init draws the same numbers.
        if c.transformer_use_embedding_net:
            self.A_enc = EmbeddingNet(dims.audio, d, c.embedding_dropout, c.embeddings_hidden_size, hidden_bn=bn)
            self.V_enc = EmbeddingNet(dims.video, d, c.embedding_dropout, c.embeddings_hidden_size, hidden_bn=bn)
            audio_dim = video_dim = d
        else:
            self.A_enc = self.V_enc = None
            audio_dim, video_dim = dims.audio, dims.video
        self.W_proj = EmbeddingNet(dims.text, DIM_OUT, c.additional_dropout)
        self.D_w = EmbeddingNet(DIM_OUT, dims.text, c.additional_dropout)
        self.cls_token, self.position_encoder_block, self.Audio_visual_transformer = token_fusion(
            c, audio_dim, video_dim
        )
        self.O_proj = EmbeddingNet(d, DIM_OUT, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)
        self.D_o = EmbeddingNet(DIM_OUT, d, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)

    # ------------------------------------------------------------------------------------------------------------
    # Collation hook (trainer.sequence_window)

    def sequence_window(self, training: bool, phase: str = "test") -> SequenceWindow | None:
        length = self.config.train_window if training else self.config.test_window
        return None if length is None else SequenceWindow(length, official=self.official)

    # ------------------------------------------------------------------------------------------------------------

    def _sequences(self, batch: Batch) -> tuple[Tensor, ...]:
        """(audio, video, audio valid, video valid, audio times, video times), normalised as the reference does."""
        if batch.audio.dim() != 3 or batch.video.dim() != 3 or batch.audio_mask is None or batch.video_mask is None:
            raise ValueError(
                f"TCAF takes temporal features ([B, L, D] per modality with masks), got audio "
                f"{tuple(batch.audio.shape)} and video {tuple(batch.video.shape)}: use a tcaf-* layout"
            )
        a, v, am, vm = batch.audio, batch.video, batch.audio_mask, batch.video_mask
        at, vt = batch.audio_time, batch.video_time
        if self.config.average_inputs:  # baseline: the masked mean over time, one token per modality at t = 0
            a = ((a * am.unsqueeze(-1)).sum(1) / am.sum(1, keepdim=True).clamp(min=1)).unsqueeze(1)
            v = ((v * vm.unsqueeze(-1)).sum(1) / vm.sum(1, keepdim=True).clamp(min=1)).unsqueeze(1)
            am = am.any(1, keepdim=True)
            vm = vm.any(1, keepdim=True)
            at = vt = torch.zeros_like(a[..., 0])
        a = a / 255.0  # meant for uint8 VGGish; also applied to SeLaVi floats (kept: A_enc's BN absorbs the scale)
        v = F.normalize(v, dim=1 if self.official else -1)  # official: each channel over time (specs §2.5)
        return a, v, am, vm, at, vt

    def _rows(self, net: EmbeddingNet | None, x: Tensor, valid: Tensor) -> Tensor:
        """A per-row embedding net on ``[B, L, D]``. In training the default feeds BN the valid rows only; the
        reference (and eval mode, where BN uses running statistics) runs every row, padding included."""
        if net is None:
            return x
        return embed_rows(net, x, valid, include_padding=self.official)

    def _theta_o(self, batch: Batch, positions: bool) -> Tensor:
        """The audio-visual embedding ``theta_o`` ``[B, 64]``. ``positions``: time stamps 0, 1, 2, ... (the
        reference's ``get_embeddings``) instead of the batch's seconds."""
        a, v, am, vm, at, vt = self._sequences(batch)
        fa = self._rows(self.A_enc, a, am)
        fv = self._rows(self.V_enc, v, vm)
        if positions:
            at = torch.arange(fa.shape[1], device=fa.device, dtype=fa.dtype).expand(fa.shape[:2])
            vt = torch.arange(fv.shape[1], device=fv.device, dtype=fv.dtype).expand(fv.shape[:2])
        emb = self.position_encoder_block
        za = emb.embed(0, fa, am, at)
        zv = emb.embed(1, fv, vm, vt)
        b, la, lv = za.shape[0], za.shape[1], zv.shape[1]
        x = torch.cat((self.cls_token.expand(b, -1, -1).to(za.dtype), za, zv), dim=1)
        valid = torch.cat((am.new_ones(b, 1), am, vm), dim=1)
        kinds = torch.tensor([CLS] + [AUDIO] * la + [VIDEO] * lv, device=x.device)
        mask = token_attention_mask(kinds, self.config.attention, valid, global_kind=CLS)
        x = self.Audio_visual_transformer(x, mask, first_only=True)  # only the class token is read
        return self.O_proj(x[:, 0])

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
        """``class_text`` ``[C, Dt]`` / ``class_ids`` ``[C]`` (ascending): every class of the training split, the
        cross-entropy's label space. ``negative`` is not used (TCAF has no triplet terms)."""
        c = self.config
        if c.cross_entropy_loss and (class_text is None or class_ids is None):
            raise ValueError("TCAF's cross-entropy needs class_text and class_ids of the training split")
        # Reference call order (forward, then compute_loss): each call is one BN batch and draws its dropout masks.
        theta_o = self._theta_o(batch, positions=False)
        rho_o = self.D_o(theta_o)
        theta_w = self.W_proj(text)
        rho_w = self.D_w(theta_w)
        out: dict[str, Tensor] = {}
        if c.rec_loss:
            out["l_rec"] = F.mse_loss(rho_o, text) + F.mse_loss(rho_w, text)
        if c.reg_loss:
            out["l_reg"] = F.mse_loss(theta_o, theta_w)
        if c.cross_entropy_loss:
            logits = theta_o @ self.W_proj(class_text).t()
            out["l_ce"] = F.cross_entropy(logits, torch.searchsorted(class_ids, batch.labels))
        out["loss"] = sum(out.values())
        return out

    @torch.no_grad()
    def after_step(self, batch: Batch, text: Tensor) -> None:
        """``compat="official"``: the reference's discarded train-mode ``get_embeddings`` pass after every step
        (time positions 0, 1, 2, ...). It only moves the BN statistics of A_enc, V_enc, O_proj and W_proj and draws
        dropout masks; under ``no_grad`` those effects are the same."""
        if self.official:
            self._theta_o(batch, positions=True)
            self.W_proj(text)

    def encode_samples(self, batch: Batch) -> Tensor:
        """``theta_o`` [B, 64]; the reference evaluates at time positions 0, 1, 2, ... (``official``)."""
        return self._theta_o(batch, positions=self.official)

    def encode_classes(self, text: Tensor) -> Tensor:
        """``theta_w = W_proj(text)`` [C, 64]."""
        return self.W_proj(text)

    def scores(self, sample_codes: Tensor, class_codes: Tensor) -> Tensor:
        return torch.cdist(sample_codes, class_codes)
