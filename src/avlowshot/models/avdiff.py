"""AV-DIFF (GCPR 2023): text-conditioned feature diffusion for audio-visual generalised few-shot learning, after
``specs/avdiff.md`` §2-5.

The fusion part is TCAF's (shared layers): per-token encoders A_enc / V_enc, a modality + Fourier time + padding
embedding concatenated to every token and projected back, a class token and a pre-LN transformer with **hybrid
attention**: the first ``layer_change_attention`` layers attend within a modality (plus the class token), the rest
attend fully. The class-token output goes through Proj_net (``O_proj``) to ``theta_o`` [B, 64] and a linear
classifier over the stage's label space (C1 = B1 + N1 classes in stage 1, C2 = every class in stage 2). Scores are
softmax probabilities over that label space (``score_kind = "probability"``), read at the split's columns.

A DDPM (linear schedule 1e-4..0.02 over ``diffusion_steps``) is trained on ``x0 = theta_o`` conditioned on the class
word vector ``w`` with the simple epsilon loss; its epsilon network is an MLP on ``[x_t, t, w]``. On novel batches
``diffusion_steps`` ancestral steps, batched over the whole batch (one network call per step), generate one
synthetic ``theta_o`` per real sample, and the classifier is trained on them with the real labels; as in the
reference, that cross-entropy back-propagates through the whole sampling chain into the epsilon network.
``model.diffusion: false`` switches the diffusion part off (no L_diff, no synthetic features): the ablation.

Curriculum (:meth:`AVDiff.curriculum`, run by the shared protocol): substage ``base`` trains the whole model on base
classes (validation score: base accuracy, beta grid {0}); substage ``full`` freezes the fusion part (encoders,
embedding block, transformer, class token) and alternates a base-batch step and a novel-batch step (two optimiser
steps per iteration; validation: HM on the 0..1 grid). Run directory::

    stage-1/base/, stage-1/full/          each: checkpoints/epoch-NNN/, history.json, summary.json
    stage-2/base/                         retrain on B2 for best(base) + 1 epochs, stage-1 base LR drops replayed
    stage-2/repeat-0/, repeat-1/, repeat-2/   the full substage per repeat for best(full) + 1 epochs

Reference quirks (specs §10) that live in the model, fixed by default and reproduced with ``compat="official"``:

* novel word vectors (§1.5): the reference pairs a novel sample of class c with the vector at position
  ``list(set(targets)).index(c)`` of the sorted novel vectors (another novel class's); handled by the protocol, which
  hands the novel stream a permuted text table (:func:`official_novel_text`);
* video normalised over time per channel (default: per frame), BatchNorm of A_enc / V_enc on padded rows (default:
  valid rows only), as TCAF;
* frozen modules stay in train mode in the full substage (dropout on, BN statistics moving); the default puts them
  in eval mode;
* the extra train-mode ``get_embeddings`` pass after each step (BN statistics, dropout RNG), skipped by default;
* diffusion sampled in every training forward even where the output is unused (base batches): default samples only
  on novel batches (same numbers up to RNG, far less time);
* ActivityNet stage-1 validation on 30-row windows (``val_window``) instead of the 300-row test window;
* the ActivityNet window collation (audio rows ``round(L * 0.64 * 0.96)``, last random offset never drawn).

Kept in both modes: the short linear schedule (q(x_T|x_0) is not N(0, I)), noise added at the last step, the raw
integer time step and a LeakyReLU on the epsilon network's input, L_diff not detached from ``theta_o``, the CE
through the sampler, the dead CalibrationNet (built for the parameter count and the init RNG, never called).

Ablations of the paper (Tables 3-6; the reference code has none of them), each a shipped variant
(``avlowshot run --method avdiff --shots 5 --variant NAME``; ``configs/avdiff/variants/``) and a model key:

* Table 3 fusion (``fusion``): ``full-attention`` (full attention in every layer), ``cross-attention`` (cross-modal
  + class token), ``self-attention`` (within-modality + class token), ``alternate`` (within-modality and full
  layers alternating; PROPOSED reading, ``fusion: cross`` / ``self`` / ``full`` give the other schedules).
  Published 5-shot HM: UCF 54.90 / 57.77 / 47.18 / 56.00 against AV-DIFF's 59.96.
* Table 4 generator (``generator: wgan``, variant ``av-gan``): a conditional WGAN-GP in the 64-d theta_o space
  (PROPOSED, baselines.md §3.11): G ``[z (latent_generator) ; w] -> generator_hidden_size -> 64``, critic
  ``[theta ; w] -> discriminator_hidden_size -> 1``, LeakyReLU 0.2, gradient penalty 10, one critic step per
  generator step under the run's single Adam (the critic's loss sees detached fakes, the generator's loss a detached
  copy of the critic). Published UCF 5-shot HM 50.56.
* Table 5 inputs (``modalities: audio|video``, variants ``audio`` / ``visual``): one modality's tokens and the class
  token, full attention in every layer, as the paper says. Published UCF 5-shot HM 45.87 / 42.14.
* Table 6 condition (``conditioning: av_prot``, variant ``av-prot``): the generator is conditioned on class
  prototypes instead of word2vec: per class, the mean over the stage's training samples (base: all, novel: the k
  shots) of each video's mean audio / 255 and mean L2-normalised video row, concatenated (4224-d) and
  L2-normalised (PROPOSED normalisation). Published UCF 5-shot HM 56.26.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from avlowshot.data.batching import Batch, SequenceWindow
from avlowshot.models.base import InputDims, Method, Substage
from avlowshot.models.layers import (
    Dropout,
    EmbeddingNet,
    embed_rows,
    label_columns,
    layer_masks,
    token_attention_mask,
    token_fusion,
)

CLS, AUDIO, VIDEO = 0, 1, 2  # token kinds of the attention masks


class AVDiffConfig(BaseModel):
    """The ``model:`` block of an AV-DIFF config, under the reference's flag names (specs §7.3).

    ``train_window`` / ``val_window`` / ``test_window``: fixed collation windows in video rows (``None`` = pad to the
    batch's longest sequence). ``val_window`` is used for stage-1 validation under ``--compat official`` only; the
    default validates on ``test_window`` windows.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    embeddings_hidden_size: int = Field(512, ge=1, description="A_enc/V_enc hidden width")
    decoder_hidden_size: int = Field(512, ge=1, description="O_proj hidden width")
    embedding_dropout: float = Field(0.2, ge=0, lt=1, description="A_enc/V_enc")
    decoder_dropout: float = Field(0.1, ge=0, lt=1, description="O_proj")
    embeddings_batch_norm: bool = Field(True, description="BN in the hidden layer of A_enc/V_enc/O_proj")
    transformer_dim: int = Field(300, ge=1, description="token width D")
    transformer_depth: int = Field(4, ge=1, description="L")
    layer_change_attention: int = Field(2, ge=0, description="Z: the first Z layers attend within a modality")
    transformer_heads: int = Field(8, ge=1)
    transformer_dim_head: int = Field(64, ge=1)
    transformer_mlp_dim: int = Field(128, ge=1)
    transformer_dropout: float = Field(0.1, ge=0, lt=1)
    transformer_embedding_dim: int = Field(64, ge=2, description="E (even)")
    transformer_embedding_dropout: float = Field(0.1, ge=0, lt=1)
    transformer_embedding_time_embed_type: Literal["sinusoid", "none"] = "sinusoid"
    transformer_embedding_fourier_scale: float = 10.0
    transformer_embedding_modality: bool = True
    output_dimension_transformer: int = Field(64, ge=1, description="O: theta_o width (paper d_out)")
    fusion: Literal["hybrid", "full", "cross", "self", "alternate"] = Field(
        "hybrid",
        description="attention per layer (Table 3): hybrid = within-modality for the first layer_change_attention "
        "layers then full; full / cross / self in every layer (class token always global); alternate = self, full, "
        "self, ... (PROPOSED)",
    )
    modalities: Literal["both", "audio", "video"] = Field(
        "both", description="Table 5: one modality's tokens only (with full attention, as the paper)"
    )
    conditioning: Literal["word2vec", "av_prot"] = Field(
        "word2vec",
        description="Table 6: the generator's condition; av_prot = concatenated audio and visual class means of the "
        "stage's training samples (PROPOSED: inputs normalised as the model's, L2-normalised)",
    )
    generator: Literal["diffusion", "wgan"] = Field(
        "diffusion", description="Table 4: the DDPM, or a conditional WGAN-GP in the theta_o space (AV-GAN, PROPOSED)"
    )
    latent_generator: int = Field(64, ge=1, description="wgan: noise width (the reference's dead key)")
    discriminator_hidden_size: int = Field(64, ge=1, description="wgan: critic hidden width (reference's dead key)")
    gan_gradient_penalty: float = Field(10.0, ge=0, description="wgan: lambda of the gradient penalty")
    diffusion: bool = Field(True, description="false: no generator loss and no synthetic novel features (ablation)")
    diffusion_steps: int = Field(100, ge=1, description="T")
    generator_hidden_size: int = Field(128, ge=1, description="epsilon network hidden width H")
    number_layers_diffusion: int = Field(1, ge=1)
    use_diffusion_batch_norm: bool = False
    diffusion_dropout_value: float = Field(0.0, ge=0, lt=1)
    calibration_net_hidden_size: int = Field(32, ge=1, description="dead CalibrationNet (parameter count, init RNG)")
    train_window: int | None = Field(None, ge=1, description="fixed training window, video rows (random start)")
    val_window: int | None = Field(None, ge=1, description="stage-1 validation window (official mode only)")
    test_window: int | None = Field(None, ge=1, description="fixed evaluation window, video rows (centred)")

    @model_validator(mode="after")
    def _check(self) -> AVDiffConfig:
        if self.transformer_embedding_dim % 2:
            raise ValueError(f"transformer_embedding_dim must be even, got {self.transformer_embedding_dim}")
        if self.layer_change_attention > self.transformer_depth:
            raise ValueError(
                f"layer_change_attention ({self.layer_change_attention}) exceeds transformer_depth "
                f"({self.transformer_depth})"
            )
        return self


# ----------------------------------------------------------------------------------------------------------------
# DDPM


class EpsilonNet(nn.Module):
    """The reference's ``GeneratorNetDiffusion``: ``LeakyReLU(cat[x_t, t, w])`` then ``n`` blocks
    ``Linear(prev, H // (i+1)) [-> BN] -> LeakyReLU [-> Dropout]`` and ``Linear(prev, out)``. ``t`` enters as the
    raw integer step value."""

    def __init__(self, x_dim: int, w_dim: int, hidden: int, layers: int, batch_norm: bool, dropout: float):
        super().__init__()
        mods: list[nn.Module] = [nn.LeakyReLU(0.01)]
        prev = x_dim + 1 + w_dim
        for i in range(layers):
            width = hidden // (i + 1)
            mods.append(nn.Linear(prev, width))
            if batch_norm:
                mods.append(nn.BatchNorm1d(width))
            mods.append(nn.LeakyReLU(0.01))
            if dropout:
                mods.append(Dropout(dropout))
            prev = width
        mods.append(nn.Linear(prev, x_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor, t: Tensor, w: Tensor) -> Tensor:
        return self.net(torch.cat((x, t.to(x.dtype).unsqueeze(-1), w.to(x.dtype)), dim=-1))


class DenoiseDiffusion(nn.Module):
    """Linear-schedule DDPM (``beta = linspace(1e-4, 0.02, T)``, ``sigma^2 = beta``), steps t = 0..T-1."""

    def __init__(self, eps_model: nn.Module, steps: int, official: bool = False):
        super().__init__()
        self.eps_model = eps_model
        self.steps = steps
        self.official = official
        beta = torch.linspace(1e-4, 0.02, steps)
        alpha = 1.0 - beta
        self.register_buffer("beta", beta, persistent=False)
        self.register_buffer("alpha", alpha, persistent=False)
        self.register_buffer("alpha_bar", torch.cumprod(alpha, dim=0), persistent=False)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``."""
        ab = self.alpha_bar[t].unsqueeze(-1)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps

    def p_sample(self, x: Tensor, t: Tensor, w: Tensor, z: Tensor | None = None) -> Tensor:
        """One ancestral step ``x_{t-1} = (x - beta_t / sqrt(1 - abar_t) eps_hat) / sqrt(alpha_t) + sqrt(beta_t) z``
        for the whole batch (noise also at t = 0, as the reference). ``official``: the reference's float32 operation
        order, ``1 / sqrt(alpha_t) * (x - (1 - alpha_t) / sqrt(1 - abar_t) * eps_hat)`` (1 - alpha_t equals beta_t
        in exact arithmetic, not in float32)."""
        eps_hat = self.eps_model(x, t, w)
        beta, alpha, ab = (v[t].unsqueeze(-1) for v in (self.beta, self.alpha, self.alpha_bar))
        if self.official:
            mean = 1.0 / alpha.sqrt() * (x - (1.0 - alpha) / (1.0 - ab).sqrt() * eps_hat)
        else:
            mean = (x - beta / (1.0 - ab).sqrt() * eps_hat) / alpha.sqrt()
        if z is None:
            z = torch.randn_like(x)
        return mean + beta.sqrt() * z

    def sample(self, w: Tensor, dim: int) -> Tensor:
        """``T`` ancestral steps from ``x_T ~ N(0, I)`` ``[B, dim]``, one epsilon-network call per step for the whole
        batch. Not under ``no_grad``: the caller's loss back-propagates through the chain."""
        b = w.shape[0]
        x = torch.randn(b, dim).to(w.device)  # CPU RNG, as the reference's x_T
        for step in range(self.steps - 1, -1, -1):
            t = torch.full((b,), step, dtype=torch.int64, device=w.device)
            x = self.p_sample(x, t, w)
        return x

    def loss(self, x0: Tensor, w: Tensor) -> Tensor:
        """The simple loss ``mean((eps - eps_theta(x_t, t, w))^2)``, ``t ~ U{0..T-1}`` per sample."""
        t = torch.randint(0, self.steps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        return F.mse_loss(self.eps_model(self.q_sample(x0, t, eps), t, w), eps)


class CalibrationNet(nn.Module):
    """Dead in the reference (built, optimised, never called): ``LeakyReLU -> Linear(in, h) -> LeakyReLU ->
    Linear(h, 1)``."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LeakyReLU(0.01), nn.Linear(in_dim, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, 1)
        )

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never called, as in the reference
        return self.net(x)


class ConditionalWGAN(nn.Module):
    """AV-GAN (AV-DIFF Table 4, PROPOSED after baselines.md §3.11): ``G([z ; w]) -> hidden -> theta`` and the
    critic ``D([theta ; w]) -> hidden -> 1`` (LeakyReLU 0.2), trained by WGAN-GP in the 64-d theta_o space.

    One optimiser steps both: :meth:`loss` adds the critic loss (fakes detached) and the generator loss read
    through a detached copy of the critic's weights, so each network only gets its own gradient."""

    def __init__(self, x_dim: int, w_dim: int, latent: int, g_hidden: int, d_hidden: int, gp: float):
        super().__init__()
        self.latent, self.gp = latent, gp
        self.G = nn.Sequential(nn.Linear(latent + w_dim, g_hidden), nn.LeakyReLU(0.2), nn.Linear(g_hidden, x_dim))
        self.D = nn.Sequential(nn.Linear(x_dim + w_dim, d_hidden), nn.LeakyReLU(0.2), nn.Linear(d_hidden, 1))

    def sample(self, w: Tensor, dim: int | None = None) -> Tensor:
        z = torch.randn(w.shape[0], self.latent).to(w.device)
        return self.G(torch.cat((z, w.to(z.dtype)), dim=-1))

    def critic(self, x: Tensor, w: Tensor, frozen: bool = False) -> Tensor:
        inp = torch.cat((x, w.to(x.dtype)), dim=-1)
        if not frozen:
            return self.D(inp)
        params = {k: v.detach() for k, v in self.D.named_parameters()}
        return torch.func.functional_call(self.D, params, (inp,))

    def loss(self, x0: Tensor, w: Tensor, fake: Tensor | None = None) -> Tensor:
        """Critic ``D(fake) - D(real) + gp * (|grad D(mix)| - 1)^2`` plus generator ``-D(fake)``."""
        real = x0.detach()
        if fake is None:
            fake = self.sample(w)
        mix_w = torch.rand(real.shape[0], 1, device=real.device)
        mix = (mix_w * real + (1 - mix_w) * fake.detach()).requires_grad_(True)
        grad = torch.autograd.grad(self.critic(mix, w).sum(), mix, create_graph=True)[0]
        penalty = ((grad.norm(dim=1) - 1) ** 2).mean()
        l_critic = self.critic(fake.detach(), w).mean() - self.critic(real, w).mean() + self.gp * penalty
        return l_critic - self.critic(fake, w, frozen=True).mean()


def fusion_rules(c: AVDiffConfig) -> list[str]:
    """The attention rule of every layer (Table 3 variants; unimodal inputs use full attention, Table 5)."""
    depth = c.transformer_depth
    if c.modalities != "both" or c.fusion == "full":
        return ["full"] * depth
    if c.fusion == "hybrid":
        return ["self"] * c.layer_change_attention + ["full"] * (depth - c.layer_change_attention)
    if c.fusion == "alternate":
        return [("self", "full")[i % 2] for i in range(depth)]
    return [c.fusion] * depth


def official_novel_text(text: Tensor, novel_labels: np.ndarray) -> Tensor:
    """The reference's novel-loader text table (specs §1.5): a copy of ``text`` [K, Dt] in which novel class c
    (in ``novel_labels``, the labels of the novel split in sample order) gets the vector of the class at position
    ``list(set(novel_labels)).index(c)`` of the sorted novel classes. CPython's set order of small ints is what the
    reference iterates; it is reproduced by building the same set here."""
    order = list(set(int(c) for c in novel_labels))
    ranked = sorted(order)
    out = text.clone()
    for c in ranked:
        out[c] = text[ranked[order.index(c)]]
    return out


# ----------------------------------------------------------------------------------------------------------------


class AVDiff(Method):
    name: ClassVar[str] = "avdiff"
    score_kind: ClassVar[str] = "probability"
    needs_negatives: ClassVar[bool] = False
    needs_label_space: ClassVar[bool] = True
    config_class: ClassVar[type[BaseModel]] = AVDiffConfig
    tasks: ClassVar[tuple[str, ...]] = ("gfsl",)
    layouts: ClassVar[tuple[str, ...]] = ("avdiff", "tcaf-cls")
    inputs: ClassVar[str] = "temporal"

    config: AVDiffConfig

    def __init__(self, config: AVDiffConfig, dims: InputDims, compat: str = "none", classes=None):
        super().__init__(config, dims, compat)
        if classes is None:
            raise ValueError("AV-DIFF needs the label space of its classifier (classes=...)")
        c = config
        d, o = c.transformer_dim, c.output_dimension_transformer
        self.official = compat == "official"
        self.register_buffer("label_space", torch.as_tensor(np.sort(np.asarray(classes)), dtype=torch.int64), False)
        bn = c.embeddings_batch_norm
        # Construction order = the reference's (specs §3.11), so a seeded init draws the same numbers.
        self.A_enc = EmbeddingNet(dims.audio, d, c.embedding_dropout, c.embeddings_hidden_size, hidden_bn=bn)
        self.V_enc = EmbeddingNet(dims.video, d, c.embedding_dropout, c.embeddings_hidden_size, hidden_bn=bn)
        self.cls_token, self.position_encoder_block, self.Audio_visual_transformer = token_fusion(c, d, d)
        self.classifier = nn.Linear(o, len(self.label_space))
        self.O_proj = EmbeddingNet(d, o, c.decoder_dropout, c.decoder_hidden_size, hidden_bn=bn)
        w_dim = dims.audio + dims.video if c.conditioning == "av_prot" else dims.text
        if c.generator == "diffusion":
            self.generator = EpsilonNet(
                o, w_dim, c.generator_hidden_size, c.number_layers_diffusion, c.use_diffusion_batch_norm,
                c.diffusion_dropout_value,
            )  # fmt: skip
        self.discriminator_seen_novel = CalibrationNet(o, c.calibration_net_hidden_size)
        if c.generator == "diffusion":
            self.diffusion = DenoiseDiffusion(self.generator, c.diffusion_steps, official=self.official)
        else:
            self.diffusion = ConditionalWGAN(
                o, w_dim, c.latent_generator, c.generator_hidden_size, c.discriminator_hidden_size,
                c.gan_gradient_penalty,
            )  # fmt: skip
        self.rules = fusion_rules(c)
        # av_prot conditioning: class prototypes of the stage's training samples (observe_training_set)
        self.register_buffer("prototypes", torch.zeros(0, w_dim), persistent=False)
        self.frozen = False

    # ------------------------------------------------------------------------------------------------------------
    # Curriculum hooks (the shared protocol / trainer call these)

    FUSION = ("A_enc", "V_enc", "cls_token", "position_encoder_block", "Audio_visual_transformer")

    @classmethod
    def curriculum(cls, cfg, compat: str = "none") -> list[Substage]:
        """Substage ``base`` (whole model, base classes, val = base accuracy at beta 0), then ``full`` (fusion
        frozen, base + novel streams, val = HM on the run's grid; a fresh Adam and schedule when the config has a
        scheduler, else the base substage's Adam carries over, as the reference's ``reset_lr``)."""
        return [
            Substage("base", novel_stream=False, val_metric="seen", beta_grid="avdiff-base"),
            Substage(
                "full",
                novel_stream=True,
                val_metric="hm",
                beta_grid=None,
                epochs_key="full",
                reset_optimizer=bool(cfg.lr_scheduler),
                reference_beta_from="last",
                reference_beta_zero_search=True,
            ),
        ]

    def enter_substage(self, name: str) -> None:
        """``full``: freeze the fusion part (``requires_grad = False``)."""
        if name == "full":
            for attr in self.FUSION:
                mod = getattr(self, attr)
                for p in [mod] if isinstance(mod, nn.Parameter) else mod.parameters():
                    p.requires_grad_(False)
            self.frozen = True
            self.train(self.training)

    def observe_training_set(self, store, indices) -> None:
        """av_prot: the prototype of every class trained on = the mean over its training samples of the
        concatenated per-video means of the model's inputs (audio / 255, video rows L2-normalised), L2-normalised."""
        if self.config.conditioning != "av_prot":
            return
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        x = torch.cat((store.audio.means(idx) / 255.0, store.video.means(idx, normalize_rows=True)), dim=1)
        labels = store.labels[idx]
        n_classes = len(store.classes)
        sums = torch.zeros(n_classes, x.shape[1]).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).unsqueeze(1)
        self.prototypes = F.normalize(sums / counts, dim=1).to(self.label_space.device)

    def _condition(self, text: Tensor, labels: Tensor) -> Tensor:
        """The generator's condition of each sample: its word vector, or its class prototype (av_prot)."""
        if self.config.conditioning == "word2vec":
            return text
        if self.prototypes.shape[0] == 0:
            raise RuntimeError("av_prot conditioning needs observe_training_set() before training")
        return self.prototypes[labels.to(self.prototypes.device)]

    def stream_text(self, text: Tensor, labels) -> Tensor:
        """Official mode: the reference's novel-loader pairing of samples and word vectors (specs §1.5)."""
        return official_novel_text(text, np.asarray(labels)) if self.official else text

    def train(self, mode: bool = True) -> AVDiff:
        super().train(mode)
        if mode and self.frozen and not self.official:  # frozen modules: no dropout, BN statistics kept
            for attr in self.FUSION:
                mod = getattr(self, attr)
                if isinstance(mod, nn.Module):
                    mod.eval()
        return self

    def sequence_window(self, training: bool, phase: str = "test") -> SequenceWindow | None:
        c = self.config
        if training:
            length = c.train_window
        elif self.official and phase == "val":
            length = c.val_window
        else:
            length = c.test_window
        return None if length is None else SequenceWindow(length, official=self.official)

    # ------------------------------------------------------------------------------------------------------------

    def _rows(self, net: EmbeddingNet, x: Tensor, valid: Tensor) -> Tensor:
        return embed_rows(net, x, valid, include_padding=self.official)

    def attention_masks(self, la: int, lv: int, valid: Tensor) -> list[Tensor]:
        """One boolean mask per layer ``[B, N, N]`` (N = 1 + la + lv, True = may attend): within-modality plus the
        class token for the first Z layers, full attention after; pairs with a padded token blocked."""
        kinds = torch.tensor([CLS] + [AUDIO] * la + [VIDEO] * lv, device=valid.device)
        masks = {r: token_attention_mask(kinds, r, valid, global_kind=CLS) for r in set(self.rules)}
        return layer_masks(masks, self.rules)

    def _theta_o(self, batch: Batch) -> Tensor:
        if batch.audio.dim() != 3 or batch.video.dim() != 3 or batch.audio_mask is None or batch.video_mask is None:
            raise ValueError(
                f"AV-DIFF takes temporal features ([B, L, D] per modality with masks), got audio "
                f"{tuple(batch.audio.shape)} and video {tuple(batch.video.shape)}: use the avdiff or a tcaf-* layout"
            )
        am, vm = batch.audio_mask, batch.video_mask
        emb = self.position_encoder_block
        use = self.config.modalities
        za = zv = None
        if use != "video":
            fa = self._rows(self.A_enc, batch.audio / 255.0, am)
            za = emb.embed(0, fa, am, batch.audio_time)
        if use != "audio":
            v = F.normalize(batch.video, dim=1 if self.official else -1)  # official: each channel over time (§3.1)
            fv = self._rows(self.V_enc, v, vm)
            zv = emb.embed(1, fv, vm, batch.video_time)
        if za is None:  # unimodal (Table 5): the other modality contributes no tokens
            za, am = zv[:, :0], vm[:, :0]
        if zv is None:
            zv, vm = za[:, :0], am[:, :0]
        b = za.shape[0]
        x = torch.cat((self.cls_token.expand(b, -1, -1).to(za.dtype), za, zv), dim=1)
        valid = torch.cat((am.new_ones(b, 1), am, vm), dim=1)
        masks = self.attention_masks(za.shape[1], zv.shape[1], valid)
        x = self.Audio_visual_transformer(x, masks, first_only=True)  # only the class token is read
        return self.O_proj(x[:, 0])

    def columns(self, labels: Tensor) -> Tensor:
        """Global class ids -> classifier columns (ascending id order of the label space)."""
        return label_columns(self.label_space, labels)

    def losses(
        self,
        batch: Batch,
        text: Tensor,
        negative: Batch | None = None,
        negative_text: Tensor | None = None,
        *,
        stream: str = "base",
    ) -> dict[str, Tensor]:
        """``stream="base"``: CE + L_diff; ``"novel"``: CE(real) + CE(synthetic, same labels) + L_diff (specs §4).
        ``text`` [B, 300]: the word vector paired with each sample."""
        c = self.config
        theta_o = self._theta_o(batch)
        y = self.columns(batch.labels)
        cond = self._condition(text, batch.labels)
        fake = None
        if c.diffusion and (stream == "novel" or self.official):  # official: sampled in every forward (quirk 5)
            fake = self.diffusion.sample(cond, theta_o.shape[-1])
        out = {"l_ce": F.cross_entropy(self.classifier(theta_o), y)}
        if fake is not None and stream == "novel":
            out["l_ce_fake"] = F.cross_entropy(self.classifier(fake), y)
        if c.diffusion and c.generator == "diffusion":
            out["l_diff"] = self.diffusion.loss(theta_o, cond)
        elif c.diffusion:
            out["l_gan"] = self.diffusion.loss(theta_o, cond, fake)
        out["loss"] = sum(out.values())
        return out

    @torch.no_grad()
    def after_step(self, batch: Batch, text: Tensor) -> None:
        """``compat="official"``: the reference's discarded train-mode ``get_embeddings`` pass."""
        if self.official:
            self.classifier(self._theta_o(batch))

    def encode_samples(self, batch: Batch) -> Tensor:
        """Softmax probabilities over the label space ``[B, C]``."""
        return torch.softmax(self.classifier(self._theta_o(batch)), dim=-1)

    def encode_classes(self, text: Tensor, class_ids: Tensor | None = None) -> Tensor:
        """The classifier columns of ``class_ids`` (the split's classes)."""
        if class_ids is None:
            raise ValueError("AV-DIFF scores classes by classifier column: pass class_ids")
        return self.columns(class_ids.to(self.label_space.device))

    def scores(self, sample_codes: Tensor, class_codes: Tensor) -> Tensor:
        return sample_codes[:, class_codes.to(sample_codes.device)]
