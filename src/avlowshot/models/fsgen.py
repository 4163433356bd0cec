"""Generative few-shot video baselines of AV-DIFF's GFSL table (Table 2): ProtoGAN and TSL, after
``specs/baselines.md`` §3.8 and §3.10. Both are GFSL-only, read temporal cls features (layouts ``avdiff``,
``tcaf-cls``), score with softmax probabilities and AV-DIFF's metric (calibrated stacking, beta 0..1 step 0.1 on
val, §1.5) and run through the shared two-stage protocol (§1.6: stage 1 on base + k-shot novel, three stage-2
repeats each retrained in full on its own shots).

Both train as a curriculum of substages (:meth:`GenerativeFewShot.curriculum`), every one on one class-uniform
stream over base and novel samples together (``Substage.joint``) except TSL's first:

* ``pretrain``: ``f_pre = Linear(F, C)`` (softmax classifier, N(0, 0.02) init) on the real training features
  (``substage_epochs.pretrain`` epochs, no validation), then frozen;
* ``generator``: a conditional WGAN-GP, per iteration ``critic_steps`` (5) critic steps and one generator step on
  the same batch (fresh noise each), ``epochs`` epochs without validation (the spec's GAN-epoch selection is
  replaced by a fixed count, ``--set epochs=N``); critic ``D(fake) - D(x) + 10 GP``, generator ``-D(G(z, c), c)
  + 0.01 CE(f_pre(G(z, c)), y)``, Adam lr 1e-4, betas (0.5, 0.999), batch 64;
* ``classifier``: a fresh ``Linear(F, C)`` on real base + real novel features plus synthetic novel features
  ``G(z, c_n)`` (fresh each batch, under ``no_grad``), NLL on log-softmax; the best epoch by val HM
  (``substage_epochs.classifier``). A batch adds, per novel class, the share of synthetic rows that a pooled set of
  ``n_syn`` fakes per novel class plus the real training set would have (``round(B n_syn / (N_real + n_syn |N|))``,
  at least 1). ``model.generation: false`` trains the classifier on real features only (the ablation; the test
  checks that it changes the novel columns).

ProtoGAN [PROPOSED, §3.8; no code exists]: ``x = L2norm([mean_t v_t ; mean_t a_t / 255])`` (4224; video rows
L2-normalised first, TCAF's normalisation, the mean over the valid rows of the untrimmed sequence, §1.1; computed
once per video when the data is loaded, ``inputs = "averaged"``; ``--compat official`` keeps the per-row video
normalisation);
prototypes ``p_c`` = mean of ``x`` over the class's training samples of the stage (base: all, novel: the k shots;
``observe_training_set``); ``G([z (128) ; p_c]) = L2norm(ReLU(Linear(4096, 4224)(LeakyReLU_0.2(Linear(4352,
4096)))))``, ``D([x ; p_c]) = Linear(4096, 1)(LeakyReLU_0.2(Linear(8448, 4096)))``; classifier Adam 1e-3 (0.5,
0.999), batch 128, 30 epochs, ``n_syn`` 300 (grid 100 / 300 / 1000). The CPTN alternative of the paper is not built.

TSL [PROPOSED, §3.10, after ``tsl_gfsv.py``]: ``S = min(10, T_v)`` contiguous near-equal chunks of the valid video
tokens; a segment's audio = the audio tokens j with ``0.96 j`` in its span ``[0.64 k0, 0.64 k1)`` (none: the one
nearest to the span's middle); ``x_s = L2norm([mean audio / 255 ; mean L2-normalised video rows])`` (4224).
Substage ``representation`` (first, base classes only): ``R = EmbeddingNet(4224 -> 512 -> 512)`` and a linear head,
CE on one random segment per video (label = the video's), Adam 1e-3, wd 1e-5, batch 256, 300 batches, up to 30
epochs, best by val base accuracy; then R is frozen (eval mode). The GAN works in R-space, conditioned on the class
word vector: ``G([z (300) ; w]) = ReLU(Linear(4096, 512)(LeakyReLU_0.2(Linear(600, 4096))))``, ``D([r ; w]) =
Linear(4096, 1)(LeakyReLU_0.2(Linear(812, 4096)))``; f_pre and the classifier are ``Linear(512, C)``; classifier
Adam 0.01 (0.5, 0.999), 10 epochs, ``n_syn`` 500. Test: the mean over the video's S segments of the softmax
probabilities. Deviation: the representation head is over the stage's whole label space (only base samples train
it; the spec's ``Linear(512, |B|)``), because the model is built before the base classes are known.

Deviations from the spec's text: the critic steps of one iteration share its real batch (fresh noise each); the GAN
epochs are fixed instead of selected; a classifier "epoch" is ``classifier_n_batches`` class-uniform batches (plus
the synthetic rows) rather than one pass over a pooled set. Not built: ProtoGAN's CPTN alternative and TSL's small
64-d generator alternative (§3.10).

Measured on the synthetic UCF 5-shot benchmark (scale 0.05, ``tests/test_fsgen.py`` settings: narrow GAN, a few
hundred steps; chance base / novel 2.1 %, FSL 16.7 %): TSL base 53.6, novel 49.1, HM 51.2, FSL 82.4; ProtoGAN
(3 GAN epochs of 20 iterations, 5 classifier epochs of 30 batches) base 47.2, novel 51.9, HM 49.4, FSL 88.9.

Parameter counts (cls features; C = the label space: stage 2 UCF 48, ActivityNet 198, VGGSound 271):

* ProtoGAN: G 35,135,616 + D 34,611,201 + f_pre and classifier 2 x 4,225 C (UCF 70,152,417; ActivityNet
  71,419,917; VGGSound 72,036,767).
* TSL: R 2,427,904 + G 4,559,360 + D 3,334,145 + representation head, f_pre and classifier 3 x 513 C (UCF
  10,395,281; ActivityNet 10,626,131; VGGSound 10,738,478).

Published (AV-DIFF Table 2, GFSL HM / FSL, 1 / 5 / 10-shot): ProtoGAN VGGSound 10.74 / 37.59, 10.50 / 38.14,
10.50 / 38.84; UCF 52.52 / 14.08, 29.66 / 25.06, 26.41 / 26.02; ActivityNet 2.77 / 4.40, 2.67 / 5.23, 2.13 / 3.89.
TSL VGGSound 18.73 / 9.49, 23.41 / 14.80, 25.21 / 17.82; UCF 44.43 / 13.72, 50.72 / 21.24, 52.43 / 25.05;
ActivityNet 10.77 / 10.39, 12.18 / 11.50, 13.32 / 13.77.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from avlowshot.data.batching import Batch
from avlowshot.models.base import InputDims, Method, Substage
from avlowshot.models.fusion import masked_mean, normalised_sequences
from avlowshot.models.fvaegan import no_param_grad
from avlowshot.models.layers import EmbeddingNet, gradient_penalty, label_columns, normal_init

AUDIO_STEP, VIDEO_STEP = 0.96, 0.64  # seconds per VGGish / C3D token


class GenerativeConfig(BaseModel):
    """The ``model:`` block shared by ProtoGAN and TSL. ``epochs`` of the run config = GAN epochs;
    ``substage_epochs.pretrain`` / ``.classifier`` (TSL: ``.representation``) the others."""

    model_config = ConfigDict(extra="forbid")

    noise_dim: int = Field(128, ge=1, description="z width")
    generator_hidden: int = Field(4096, ge=1)
    critic_hidden: int = Field(4096, ge=1)
    gp_lambda: float = Field(10.0, ge=0, description="gradient-penalty weight")
    critic_steps: int = Field(5, ge=1, description="critic steps per generator step")
    cls_weight: float = Field(0.01, ge=0, description="weight of CE(f_pre(G(z, c)), y) in the generator loss")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 of the GAN, f_pre and the classifier")
    gan_lr: float = Field(1e-4, gt=0)
    gan_batch_size: int = Field(64, ge=1)
    gan_n_batches: int | None = Field(None, ge=1, description="None: the run's n_batches")
    pretrain_lr: float = Field(1e-3, gt=0, description="f_pre")
    pretrain_batch_size: int = Field(128, ge=1)
    pretrain_n_batches: int | None = Field(100, ge=1)
    classifier_lr: float = Field(1e-3, gt=0)
    classifier_batch_size: int = Field(128, ge=1)
    classifier_n_batches: int | None = Field(100, ge=1, description="batches per classifier epoch")
    n_syn: int = Field(300, ge=1, description="synthetic features per novel class of the pooled set")
    generation: bool = Field(True, description="false: the classifier sees no synthetic features (ablation)")


class ProtoGANConfig(GenerativeConfig):
    pass


class TSLConfig(GenerativeConfig):
    noise_dim: int = Field(300, ge=1)
    n_syn: int = Field(500, ge=1)
    classifier_lr: float = Field(0.01, gt=0)
    segments: int = Field(10, ge=1, description="S = min(segments, T_v)")
    representation_dim: int = Field(512, ge=1, description="R's hidden and output width")
    embedding_dropout: float = Field(0.2, ge=0, lt=1, description="R's dropout")
    representation_lr: float = Field(1e-3, gt=0)
    representation_weight_decay: float = Field(1e-5, ge=0)
    representation_batch_size: int = Field(256, ge=1)
    representation_n_batches: int | None = Field(300, ge=1)


class ConditionalGenerator(nn.Module):
    """``[z ; c] -> Linear -> LeakyReLU(0.2) -> Linear -> ReLU`` (then L2-normalised if ``normalize``)."""

    def __init__(self, noise: int, cond: int, hidden: int, out: int, normalize: bool):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(noise + cond, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, out), nn.ReLU())
        self.normalize = normalize

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        x = self.fc(torch.cat((z, c), dim=-1))
        return F.normalize(x, dim=-1) if self.normalize else x


class ConditionalCritic(nn.Module):
    """``[x ; c] -> Linear -> LeakyReLU(0.2) -> Linear(., 1)``."""

    def __init__(self, dim: int, cond: int, hidden: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim + cond, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.fc(torch.cat((x, c), dim=-1))


def concat_average(batch: Batch, official: bool = False) -> Tensor:
    """ProtoGAN's input ``L2norm([mean_t v_t ; mean_t a_t / 255])`` [B, Dv + Da] over each video's valid rows (video
    rows L2-normalised first). An averaged batch (the protocol's ``average_normalized_video`` store) holds the
    means already."""
    if batch.audio.dim() == 2 and batch.video.dim() == 2:
        return F.normalize(torch.cat((batch.video, batch.audio / 255.0), dim=1), dim=1)
    a, v, am, vm, _, _ = normalised_sequences(batch, "ProtoGAN", official)
    return F.normalize(torch.cat((masked_mean(v, vm), masked_mean(a, am)), dim=1), dim=1)


def segment_features(batch: Batch, segments: int = 10, official: bool = False) -> tuple[Tensor, Tensor]:
    """TSL's segments: ``(x [B, S_max, Da + Dv], valid [B, S_max])`` with ``S = min(segments, T_v)`` per video,
    ``x_s = L2norm([mean audio / 255 ; mean L2-normalised video rows])`` (specs §3.10)."""
    a, v, am, vm, _, _ = normalised_sequences(batch, "TSL", official)
    dev, n = v.device, segments
    tv = vm.sum(1)  # [B] valid video tokens
    s = tv.clamp(max=n)
    tvc = tv.clamp(min=1)
    k = torch.arange(vm.shape[1], device=dev)
    seg_v = torch.where(vm, k[None] * s[:, None] // tvc[:, None], n)  # chunk of each video token (n = padding)
    onehot_v = F.one_hot(seg_v, n + 1)[..., :n].to(v.dtype)  # [B, Lv, n]
    v_seg = onehot_v.transpose(1, 2) @ v / onehot_v.sum(1).clamp(min=1).unsqueeze(-1)
    # audio token j starts at 0.96 j = 0.64 * 1.5 j: it lies in the span of video token floor(1.5 j)
    j = torch.arange(am.shape[1], device=dev)
    kj = (3 * j) // 2
    inside = am & (kj[None] < tv[:, None])
    seg_a = torch.where(inside, kj[None] * s[:, None] // tvc[:, None], n)
    onehot_a = F.one_hot(seg_a, n + 1)[..., :n].to(a.dtype)
    count_a = onehot_a.sum(1)  # [B, n]
    a_sum = onehot_a.transpose(1, 2) @ a
    # a segment without audio token: the one nearest to the middle of its span [0.64 k0, 0.64 k1)
    sidx = torch.arange(n, device=dev)[None]
    sc = s.clamp(min=1)[:, None]
    k0 = (sidx * tv[:, None] + sc - 1) // sc
    k1 = ((sidx + 1) * tv[:, None] + sc - 1) // sc
    mid = VIDEO_STEP * (k0 + k1).to(a.dtype) / 2
    ta = am.sum(1).clamp(min=1)[:, None]
    near = torch.minimum(torch.round(mid / AUDIO_STEP).long(), ta - 1)
    a_near = a.gather(1, near.unsqueeze(-1).expand(-1, -1, a.shape[-1]))
    a_seg = torch.where(count_a.unsqueeze(-1) > 0, a_sum / count_a.clamp(min=1).unsqueeze(-1), a_near)
    valid = sidx < s[:, None]
    x = F.normalize(torch.cat((a_seg, v_seg), dim=-1), dim=-1) * valid.unsqueeze(-1)
    return x, valid


class GenerativeFewShot(Method):
    """The shared part: f_pre, the conditional WGAN-GP, the classifier with synthetic novel features, and the
    curriculum. Subclasses give :meth:`train_features` (features and labels of a training batch), the generator's
    condition (:meth:`condition`) and :meth:`encode_samples`."""

    score_kind: ClassVar[str] = "probability"
    needs_negatives: ClassVar[bool] = False
    needs_label_space: ClassVar[bool] = True
    beta_family: ClassVar[str | None] = "avdiff"
    tasks: ClassVar[tuple[str, ...]] = ("gfsl",)
    layouts: ClassVar[tuple[str, ...]] = ("avdiff", "tcaf-cls")
    inputs: ClassVar[str] = "temporal"
    FIRST: ClassVar[tuple[Substage, ...]] = ()  # substages before pretrain (TSL: representation)
    FROZEN: ClassVar[dict[str, tuple[str, ...]]] = {
        "generator": ("f_pre",),
        "classifier": ("f_pre", "netG", "netD"),
    }

    config: GenerativeConfig

    def __init__(self, config, dims: InputDims, compat: str = "none", classes=None, *, feat: int, cond: int, norm):
        super().__init__(config, dims, compat)
        if classes is None:
            raise ValueError(f"{self.name} needs the label space of its classifier (classes=...)")
        c = config
        self.official = compat == "official"
        self.register_buffer("label_space", torch.as_tensor(np.sort(np.asarray(classes)), dtype=torch.int64), False)
        n = len(self.label_space)
        self.netG = normal_init(ConditionalGenerator(c.noise_dim, cond, c.generator_hidden, feat, norm))
        self.netD = normal_init(ConditionalCritic(feat, cond, c.critic_hidden))
        self.f_pre = normal_init(nn.Linear(feat, n))
        self.classifier = normal_init(nn.Linear(feat, n))
        self.register_buffer("novel_ids", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.n_real = 0
        self.phase = "classifier"  # which head trains / scores; set by enter_substage

    # ------------------------------------------------------------------------------------------------------------
    # Curriculum

    @classmethod
    def curriculum(cls, cfg, compat: str = "none") -> list[Substage]:
        m = cls.config_class.model_validate(cfg.model)
        betas = (m.beta1, 0.999)
        steps = tuple(f"critic-{i + 1}" for i in range(m.critic_steps)) + ("generator",)
        return [
            *cls.first_substages(m),
            Substage(
                "pretrain", joint=True, validate=False, epochs_key="pretrain", lr=m.pretrain_lr, adam_betas=betas,
                weight_decay=0.0, batch_size=m.pretrain_batch_size, n_batches=m.pretrain_n_batches,
            ),
            Substage(
                "generator", joint=True, validate=False, steps=steps, lr=m.gan_lr, adam_betas=betas,
                weight_decay=0.0, batch_size=m.gan_batch_size, n_batches=m.gan_n_batches,
            ),
            Substage(
                "classifier", joint=True, val_metric="hm", epochs_key="classifier", lr=m.classifier_lr,
                adam_betas=betas, weight_decay=0.0, batch_size=m.classifier_batch_size,
                n_batches=m.classifier_n_batches,
            ),
        ]  # fmt: skip

    @classmethod
    def first_substages(cls, m) -> list[Substage]:
        return []

    def enter_substage(self, name: str) -> None:
        """Freeze what the earlier substages trained; ``phase`` says which head trains and scores."""
        self.phase = name
        for attr in self.FROZEN.get(name, ()):
            getattr(self, attr).requires_grad_(False)

    def observe_training_set(self, store, indices) -> None:
        self.n_real = len(indices)

    def observe_novel_set(self, store, indices) -> None:
        """The classes to generate features of: those of the few-shot samples."""
        labels = store.labels[torch.as_tensor(np.asarray(indices), dtype=torch.int64)]
        self.novel_ids = torch.unique(labels).to(self.label_space.device)

    # ------------------------------------------------------------------------------------------------------------

    def train_features(self, batch: Batch) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def condition(self, labels: Tensor, text: Tensor | None, label_text: Tensor | None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def generate(self, cond: Tensor) -> Tensor:
        z = torch.randn(cond.shape[0], self.config.noise_dim, device=cond.device, dtype=cond.dtype)
        return self.netG(z, cond)

    def critic_loss(self, x: Tensor, cond: Tensor) -> dict[str, Tensor]:
        fake = self.generate(cond).detach()
        d_real, d_fake = self.netD(x, cond).mean(), self.netD(fake, cond).mean()
        gp = gradient_penalty(self.netD, x, fake, cond)
        return {"loss": d_fake - d_real + self.config.gp_lambda * gp, "wasserstein": (d_real - d_fake).detach()}

    def generator_loss(self, cond: Tensor, y: Tensor) -> dict[str, Tensor]:
        with no_param_grad(self.netD):
            fake = self.generate(cond)
            adv = -self.netD(fake, cond).mean()
        ce = F.cross_entropy(self.f_pre(fake), y)
        return {"loss": adv + self.config.cls_weight * ce, "l_adv": adv, "l_ce_pre": ce}

    def synthetic_per_class(self, batch_size: int) -> int:
        """Fakes per novel class in a classifier batch: the share the pooled set (real training samples + n_syn
        fakes per novel class) would give, at least one."""
        nn_ = len(self.novel_ids)
        pooled = self.n_real + self.config.n_syn * nn_
        return max(1, round(batch_size * self.config.n_syn / max(pooled, 1)))

    def classifier_loss(self, x: Tensor, y: Tensor, label_text: Tensor | None) -> dict[str, Tensor]:
        feats, cols = [x], [y]
        if self.config.generation and len(self.novel_ids):
            fake_labels = self.novel_ids.repeat_interleave(self.synthetic_per_class(x.shape[0]))
            with torch.no_grad():
                fake = self.generate(self.condition(fake_labels, None, label_text).to(x.dtype))
            feats.append(fake)
            cols.append(label_columns(self.label_space, fake_labels))
        nll = F.nll_loss(F.log_softmax(self.classifier(torch.cat(feats)), dim=-1), torch.cat(cols), reduction="none")
        out = {"loss": nll.mean(), "l_real": nll[: x.shape[0]].mean()}
        if len(feats) > 1:
            out["l_fake"] = nll[x.shape[0] :].mean()
        return out

    def losses(
        self,
        batch: Batch,
        text: Tensor,
        negative: Batch | None = None,
        negative_text: Tensor | None = None,
        *,
        stream: str = "base",
        step: str | None = None,
        label_text: Tensor | None = None,
        **_,
    ) -> dict[str, Tensor]:
        """By substage (``phase``): ``pretrain`` CE of f_pre; ``generator`` the critic (``step="critic-i"``) or the
        generator step; ``classifier`` NLL on real + synthetic novel features; TSL ``representation``."""
        x, labels = self.train_features(batch)
        y = label_columns(self.label_space, labels)
        if step is not None:
            seg_text = text if text.shape[0] == x.shape[0] else None
            cond = self.condition(labels, seg_text, label_text).to(x.dtype)
            if step.startswith("critic"):
                return self.critic_loss(x, cond)
            if step == "generator":
                return self.generator_loss(cond, y)
            raise ValueError(f"{self.name} has no step {step!r}")
        if self.phase == "pretrain":
            ce = F.cross_entropy(self.f_pre(x), y)
            return {"loss": ce}
        return self.classifier_loss(x, y, label_text)

    def encode_classes(self, text: Tensor, class_ids: Tensor | None = None) -> Tensor:
        if class_ids is None:
            raise ValueError(f"{self.name} scores classes by classifier column: pass class_ids")
        return label_columns(self.label_space, class_ids.to(self.label_space.device))

    def scores(self, sample_codes: Tensor, class_codes: Tensor) -> Tensor:
        return sample_codes[:, class_codes.to(sample_codes.device)]


class ProtoGAN(GenerativeFewShot):
    name: ClassVar[str] = "protogan"
    config_class: ClassVar[type[BaseModel]] = ProtoGANConfig
    inputs: ClassVar[str] = "averaged"  # the protocol averages each video once, video rows L2-normalised first
    average_normalized_video: ClassVar[bool] = True

    def __init__(self, config: ProtoGANConfig, dims: InputDims, compat: str = "none", classes=None):
        feat = dims.audio + dims.video
        super().__init__(config, dims, compat, classes, feat=feat, cond=feat, norm=True)
        self.register_buffer("prototypes", torch.zeros(0, feat), persistent=False)

    def observe_training_set(self, store, indices) -> None:
        """``p_c`` = mean of ``L2norm([v_bar ; a_bar / 255])`` over the class's training samples of the stage."""
        super().observe_training_set(store, indices)
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        v = store.video.means(idx, normalize_rows=store.temporal)  # an averaged store holds the normalised means
        x = F.normalize(torch.cat((v, store.audio.means(idx) / 255.0), dim=1), dim=1)
        labels = store.labels[idx]
        n = len(store.classes)
        sums = torch.zeros(n, x.shape[1]).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=n).clamp(min=1).unsqueeze(1)
        self.prototypes = (sums / counts).to(self.label_space.device)

    def condition(self, labels: Tensor, text: Tensor | None, label_text: Tensor | None) -> Tensor:
        if self.prototypes.shape[0] == 0:
            raise RuntimeError("ProtoGAN needs observe_training_set() (the class prototypes) before training")
        return self.prototypes[labels.to(self.prototypes.device)]

    def train_features(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return concat_average(batch, self.official), batch.labels

    def encode_samples(self, batch: Batch) -> Tensor:
        """Softmax probabilities over the label space ``[B, C]`` (f_pre's before the classifier substage)."""
        head = self.f_pre if self.phase == "pretrain" else self.classifier
        return torch.softmax(head(concat_average(batch, self.official)), dim=-1)


class TSL(GenerativeFewShot):
    name: ClassVar[str] = "tsl"
    config_class: ClassVar[type[BaseModel]] = TSLConfig
    needs_label_text: ClassVar[bool] = True  # the novel classes' word vectors to generate from
    FROZEN: ClassVar[dict[str, tuple[str, ...]]] = {
        "pretrain": ("R", "base_head"),
        "generator": ("R", "base_head", "f_pre"),
        "classifier": ("R", "base_head", "f_pre", "netG", "netD"),
    }

    config: TSLConfig

    def __init__(self, config: TSLConfig, dims: InputDims, compat: str = "none", classes=None):
        r = config.representation_dim
        super().__init__(config, dims, compat, classes, feat=r, cond=dims.text, norm=False)
        self.R = EmbeddingNet(dims.audio + dims.video, r, config.embedding_dropout, hidden=r)
        self.base_head = normal_init(nn.Linear(r, len(self.label_space)))

    @classmethod
    def first_substages(cls, m: TSLConfig) -> list[Substage]:
        """``representation``: R and its head on base segments (no novel stream), best by val base accuracy."""
        return [
            Substage(
                "representation", val_metric="seen", beta_grid="avdiff-base", epochs_key="representation",
                lr=m.representation_lr, weight_decay=m.representation_weight_decay,
                batch_size=m.representation_batch_size, n_batches=m.representation_n_batches,
            )
        ]  # fmt: skip

    def train(self, mode: bool = True) -> TSL:
        super().train(mode)
        if mode and self.phase != "representation":  # frozen R: no dropout, BN statistics kept
            self.R.eval()
        return self

    def enter_substage(self, name: str) -> None:
        super().enter_substage(name)
        self.train(self.training)

    def train_features(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``R(x_s)`` of one random segment per video, labelled with the video's class."""
        x, valid = segment_features(batch, self.config.segments, self.official)
        s = valid.sum(1)
        pick = (torch.rand(s.shape, device=s.device) * s).long().clamp(max=x.shape[1] - 1)
        xs = x[torch.arange(x.shape[0], device=x.device), pick]
        return self.R(xs), batch.labels

    def condition(self, labels: Tensor, text: Tensor | None, label_text: Tensor | None) -> Tensor:
        if text is not None:
            return text
        if label_text is None:
            raise ValueError("TSL generates from word vectors: pass label_text (the label space's)")
        return label_text[label_columns(self.label_space, labels.to(self.label_space.device))]

    def losses(self, batch: Batch, text: Tensor, *args, step: str | None = None, **kw) -> dict[str, Tensor]:
        if self.phase == "representation" and step is None:
            x, labels = self.train_features(batch)
            return {"loss": F.cross_entropy(self.base_head(x), label_columns(self.label_space, labels))}
        return super().losses(batch, text, *args, step=step, **kw)

    def encode_samples(self, batch: Batch) -> Tensor:
        """The mean over each video's segments of the softmax probabilities ``[B, C]``."""
        x, valid = segment_features(batch, self.config.segments, self.official)
        heads = {"representation": self.base_head, "pretrain": self.f_pre}
        head = heads.get(self.phase, self.classifier)
        p = torch.softmax(head(self.R(x.flatten(0, 1))), dim=-1).view(*x.shape[:2], -1)
        w = valid.to(p.dtype).unsqueeze(-1)
        return (p * w).sum(1) / w.sum(1).clamp(min=1)
