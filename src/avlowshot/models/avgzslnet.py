"""AVGZSLNet (Mazumder et al., WACV 2021) and CJME (Parida et al., WACV 2020) as re-implemented in the AVCA
repository (``ExplainableML/AVCA-GZSL`` @ ``2711aeb``, ``src/model.py`` / ``src/loss.py``), faithful to
``specs/avca.md`` §2.2, §2.3, §3.2, §3.3, §3.7, §4 and §5. Both embed audio, video and the class text into one
64-d space with three MLPs ``f_a``, ``f_v``, ``f_t`` and score by Euclidean distance (``score_kind="distance"``).

**AVGZSLNet** (``--method avgzslnet``). ``EmbeddingNet``: ``Linear(in,h) -> [BN(h)] -> ReLU -> Dropout ->
Linear(h,out)``, no output activation. ``f_a``: Da->1024->64, ``f_v``: Dv->1024->64, ``f_t``: Dt->300->64 (dropout
0.8); a decoder ``f_dec``: 64->64->Dt (dropout 0.5), its outputs L2-normalised. Loss (margin 1, all weights 1)::

    cmd = mean|f_dec(t1) - w1| + mean|f_dec(a1) - w1| + mean|f_dec(v1) - w1|           (row-wise L2, no eps)
          + TML(f_dec(t1), f_dec(a1), f_dec(a2)) + TML(f_dec(t1), f_dec(v1), f_dec(v2))
    ct  = TML(t1, a1, a2) + TML(a1, t1, t2) + TML(t1, v1, v2) + TML(v1, t1, t2)

with TML = ``nn.TripletMarginLoss(margin, p=2, eps=1e-6)``, index 1 = the positive sample / its class text, 2 = the
negative (a random sample of another class, and that class's text). Score ("both", the reported key):
``cdist(f_a(a), f_t(w)) + cdist(f_v(v), f_t(w))``.

**CJME** (``--method cjme``). The same three nets with a ReLU after the output layer (dropout 0.2), and an attention
``BN(Da+Dv) -> Linear(Da+Dv, 1) -> Sigmoid`` on the raw ``[a ‖ v]`` giving ``w``. Loss::

    E = f_t(text of every training class), detached;  p_m = softmax(m1 · Eᵀ) (m1 detached);  H_m = entropy(p_m)
    target = 1 if H_a - H_v > 0.1, 0 if H_v - H_a > 0.1, else 0.5
    loss = composite + MSE(a1, v1) + MSE(w, target)
    composite (reference) = mean((1-w)[B,1] * l_ta[B] + w[B,1] * l_tv[B])  -- broadcasts to [B, B]
                          = mean(1-w)·mean(l_ta) + mean(w)·mean(l_tv)

with ``l_ta = TML_none(t1, a1, a2)``, ``l_tv = TML_none(t1, v1, v2)``. Score: each sample uses the modality its own
attention picks, ``(1-[w>=0.5])·cdist(a, t) + [w>=0.5]·cdist(v, t)``.

**Exact** (from the code): layers, widths, BN placement, dropout placement, forward call order (f_a, f_v, f_t on the
positive, then on the negative, then the decoder; CJME: forward, then ``f_t`` on the class table in train mode),
losses and their margins, the row-wise L2 of the decoder loss, ``Categorical(probs).entropy()``, the CJME
broadcasting bug (kept by default, ``composite: per-sample`` fixes it), the scored branch ("both"), the run-script
hyper-parameters (§6.4: 50 epochs, Adam lr 1e-3 without weight decay, ReduceLROnPlateau on val HM, 500 class-balanced
batches of 256, beta grid linspace(0, 3, 16)). ``distance_fn: SquaredL2Loss`` changes the decoder loss only (the
reference's evaluation during training never squares; scores here are always plain L2).

**Differences**: negatives come from the shared sampler's generator (the reference's numpy draws repeat across
workers and epochs, §4.5); dropout masks come from another random stream. The test beta is the stage-1 beta of the
scored mode ("both"); ``--compat official`` uses the reference's: the mean of the betas searched on val for the
audio, video and both modes (§5.3; 0 -> 1e-10).

**PROPOSED** (no code exists): on the ``clipclap`` layout (1024-d CLAP audio, 512-d CLIP video, 1536-d CLIP ‖ CLAP
text) ``f_t`` takes the 1536-d text with the reference's hidden width 300 (``text_hidden_size``) and ``f_dec``
decodes to 1536 (the decoder loss compares with the raw class text). The configs ``<ds>-clipclap.yaml`` take the
model values of the AVCA repository's scripts and its training protocol (specs/baselines.md §2.3.5 makes the same
choice for Hyper-multiple); the alternative is ClipClap's protocol constants (``--set batch_size=64
n_batches=300 lr=7e-5 epochs=20 beta_grid=clipclap`` for UCF; lr 1e-4 and 15 epochs for ActivityNet / VGGSound).

**Layouts**: ``avca-cls`` / ``avca-main`` (AVCA table), ``tcaf-cls`` / ``tcaf-main`` (TCAF table; averaged over
each video's valid rows at load, the ``cls`` / ``main`` configs serve), ``clipclap`` (ClipClap table).

**Parameters** (all counted, BN affine included): AVGZSLNet main 1,319,872, cls 4,596,672, clipclap 2,295,300;
CJME main 1,299,157, cls 4,585,557, clipclap 2,195,781.

**Published numbers** (HM / ZSL, specs/results.md). AVGZSLNet: cls UCF 36.51 / 31.51, ActivityNet 8.30 / 6.39,
VGGSound 5.26 / 4.81; main UCF 18.05 / 13.65, ActivityNet 6.44 / 5.40, VGGSound 5.83 / 5.28; CLIP/CLAP (ClipClap
README) UCF 42.67 / 35.66, ActivityNet 12.70 / 12.39, VGGSound 4.71 / 5.44. CJME: cls UCF 28.65 / 29.01,
ActivityNet 7.32 / 6.29, VGGSound 3.68 / 3.72; main UCF 12.48 / 8.29, ActivityNet 5.12 / 5.84, VGGSound 6.17 / 5.16;
CLIP/CLAP UCF 25.87 / 20.46, ActivityNet 11.64 / 9.92, VGGSound 7.45 / 6.84. The TCAF table repeats the cls rows.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from avlowshot.data.batching import Batch
from avlowshot.models.base import InputDims, Method, check_averaged
from avlowshot.models.layers import Dropout, apply_each

DIM_OUT = 64  # hard-coded joint space of both models
ENTROPY_MARGIN = 0.1  # CJMELoss.epsilon
LAYOUTS = ("avca-cls", "avca-main", "tcaf-cls", "tcaf-main", "clipclap")


class BaselineEmbeddingNet(nn.Module):
    """The AVCA repository's baseline MLP: ``Linear(in,h) -> [BN(h)] -> ReLU -> Dropout -> Linear(h,out) [-> ReLU]``
    (``hidden=0``: one ``Linear``). No BN, activation or dropout after the output layer, except CJME's ReLU."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, use_bn: bool, hidden: int, out_relu: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Linear(in_dim, hidden)] + ([nn.BatchNorm1d(hidden)] if use_bn else [])
            layers += [nn.ReLU(), Dropout(dropout), nn.Linear(hidden, out_dim)]
            layers += [nn.ReLU()] if out_relu else []
        else:
            layers.append(nn.Linear(in_dim, out_dim))
        self.fc = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class TripletNet(nn.Module):
    """``f_a``, ``f_v``, ``f_t`` under the reference's names (``embedding_net1/2/3``), so its weights load as is."""

    def __init__(self, f_a: nn.Module, f_v: nn.Module, f_t: nn.Module):
        super().__init__()
        self.embedding_net1 = f_a
        self.embedding_net2 = f_v
        self.embedding_net3 = f_t


def triplet(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float, reduction: str = "mean") -> Tensor:
    # nn.TripletMarginLoss(margin) with its defaults p=2, eps=1e-6, as the reference.
    return F.triplet_margin_loss(anchor, positive, negative, margin=margin, p=2, eps=1e-6, reduction=reduction)


def row_distance(x: Tensor, y: Tensor, squared: bool) -> Tensor:
    """The reference's ``L2Loss`` / ``SquaredL2Loss``: ``sum((x-y)^2, 1)`` (``** 0.5`` for L2), no eps."""
    d = (x - y).pow(2).sum(1)
    return d if squared else d.pow(0.5)


def attention_targets(h_a: Tensor, h_v: Tensor) -> Tensor:
    """CJME's attention supervision from the class-posterior entropies: 1 (video) where the audio entropy exceeds
    the video one by more than 0.1, 0 (audio) in the opposite case, 0.5 otherwise."""
    target = torch.full_like(h_a, 0.5)
    target[h_a - h_v - ENTROPY_MARGIN > 0] = 1.0
    target[h_v - h_a - ENTROPY_MARGIN > 0] = 0.0
    return target


def _mode_scores(a: Tensor, v: Tensor, t: Tensor, mode: str, thr: Tensor | None = None) -> Tensor:
    """Distances ``[N, C]`` of the audio / video codes to the class codes for one evaluation mode."""
    if mode == "audio":
        return torch.cdist(a, t)
    if mode == "video":
        return torch.cdist(v, t)
    if thr is None:  # AVGZSLNet: the sum of both distances
        return torch.cdist(a, t) + torch.cdist(v, t)
    return (1 - thr) * torch.cdist(a, t) + thr * torch.cdist(v, t)  # CJME: the modality the attention picks


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    embeddings_hidden_size: int = Field(1024, ge=0, description="f_a / f_v hidden width; 0 = one Linear")
    text_hidden_size: int = Field(300, ge=0, description="f_t hidden width (hard-coded 300 in the reference)")
    embedding_use_bn: bool = Field(False, description="BN after the hidden Linear of f_a, f_v, f_t")
    margin: float = Field(1.0, gt=0, description="--margin of every triplet term")
    score_mode: Literal["both", "audio", "video"] = Field(
        "both", description="branch scored at evaluation; the reference reports 'both'"
    )


class AVGZSLNetConfig(_Common):
    """The ``model:`` block of an AVGZSLNet config: the reference's ``main.py`` flags, argparse defaults."""

    embedding_dropout: float = Field(0.8, ge=0, lt=1, description="dropout of f_a, f_v, f_t")
    decoder_hidden_size: int = Field(64, ge=0, description="f_dec hidden width; 0 = one Linear")
    decoder_dropout: float = Field(0.5, ge=0, lt=1)
    decoder_use_bn: bool = False
    normalize_decoder_outputs: bool = Field(False, description="L2-normalise every f_dec output")
    distance_fn: Literal["L2Loss", "SquaredL2Loss"] = Field("L2Loss", description="distance of the decoder loss")


class CJMEConfig(_Common):
    """The ``model:`` block of a CJME config: the reference's ``main.py`` flags, argparse defaults."""

    dropout_baselines: float = Field(0.2, ge=0, lt=1, description="dropout of f_a, f_v, f_t")
    composite: Literal["reference", "per-sample"] = Field(
        "reference",
        description="reference: the [B,1]x[B] broadcast, mean(1-w)·mean(l_ta) + mean(w)·mean(l_tv); "
        "per-sample: mean((1-w_i)·l_ta_i + w_i·l_tv_i)",
    )


class _TripletBaseline(Method):
    score_kind: ClassVar[str] = "distance"
    needs_negatives: ClassVar[bool] = True
    layouts: ClassVar[tuple[str, ...]] = LAYOUTS
    inputs: ClassVar[str] = "averaged"
    beta_family: ClassVar[str] = "avca"  # --compat official converts the test beta as the AVCA repository does
    # --compat official: the test beta is the mean of the val betas of these modes (specs §5.3).
    reference_beta_modes: ClassVar[tuple[str, ...]] = ("audio", "video", "both")

    triplet_net: TripletNet
    score_mode: str | None = None  # set by the protocol to score another mode than the config's

    def _mode(self) -> str:
        return self.score_mode or self.config.score_mode

    def encode_classes(self, text: Tensor) -> Tensor:
        """``f_t(text)`` ``[C, 64]``."""
        return self.triplet_net.embedding_net3(text)

    def _embed(self, batch: Batch, negative: Batch, text: Tensor, negative_text: Tensor, name: str):
        check_averaged(batch, name)
        check_averaged(negative, name)
        net = self.triplet_net
        # TripletNet.forward: positive a, v, t, then negative a, v, t, each call one BN batch (apply_each keeps
        # that with BN and stacks positives and negatives without).
        a1, a2 = apply_each(net.embedding_net1, batch.audio, negative.audio)
        v1, v2 = apply_each(net.embedding_net2, batch.video, negative.video)
        t1, t2 = apply_each(net.embedding_net3, text, negative_text)
        return a1, v1, t1, a2, v2, t2


class AVGZSLNet(_TripletBaseline):
    name: ClassVar[str] = "avgzslnet"
    config_class: ClassVar[type[BaseModel]] = AVGZSLNetConfig

    config: AVGZSLNetConfig

    def __init__(self, config: AVGZSLNetConfig, dims: InputDims, compat: str = "none"):
        super().__init__(config, dims, compat)
        c = config

        def enc(in_dim: int, hidden: int) -> BaselineEmbeddingNet:
            return BaselineEmbeddingNet(in_dim, DIM_OUT, c.embedding_dropout, c.embedding_use_bn, hidden)

        # Construction order = the reference's (f_a, f_v, f_t, then f_dec).
        self.triplet_net = TripletNet(
            enc(dims.audio, c.embeddings_hidden_size),
            enc(dims.video, c.embeddings_hidden_size),
            enc(dims.text, c.text_hidden_size),
        )
        self.decoder_net = nn.Module()
        self.decoder_net.embedding_net = BaselineEmbeddingNet(
            DIM_OUT, dims.text, c.decoder_dropout, c.decoder_use_bn, c.decoder_hidden_size
        )

    def _decode(self, *xs: Tensor) -> list[Tensor]:
        outs = apply_each(self.decoder_net.embedding_net, *xs)
        return [F.normalize(o, dim=1) for o in outs] if self.config.normalize_decoder_outputs else outs

    def losses(
        self, batch: Batch, text: Tensor, negative: Batch | None = None, negative_text: Tensor | None = None
    ) -> dict[str, Tensor]:
        if negative is None or negative_text is None:
            raise ValueError("AVGZSLNet needs a negative batch and its class text (needs_negatives=True)")
        c = self.config
        a1, v1, t1, a2, v2, t2 = self._embed(batch, negative, text, negative_text, "AVGZSLNet")
        # DecoderNet order: a_p, v_p, t_p, a_q, v_q.
        x_ta1, x_tv1, x_tt1, x_ta2, x_tv2 = self._decode(a1, v1, t1, a2, v2)
        sq = c.distance_fn == "SquaredL2Loss"
        m = c.margin
        out = {
            "l_rec": row_distance(x_tt1, text, sq).mean()
            + row_distance(x_ta1, text, sq).mean()
            + row_distance(x_tv1, text, sq).mean(),
        }
        out["l_cta"] = triplet(x_tt1, x_ta1, x_ta2, m)
        out["l_ctv"] = triplet(x_tt1, x_tv1, x_tv2, m)
        out["l_ct"] = triplet(t1, a1, a2, m) + triplet(a1, t1, t2, m) + triplet(t1, v1, v2, m) + triplet(v1, t1, t2, m)
        out["loss"] = (out["l_rec"] + out["l_cta"] + out["l_ctv"]) + out["l_ct"]  # cmd + ct, the reference's sums
        return out

    def encode_samples(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(f_a(a), f_v(v))``, each ``[B, 64]``."""
        check_averaged(batch, "AVGZSLNet")
        return self.triplet_net.embedding_net1(batch.audio), self.triplet_net.embedding_net2(batch.video)

    def scores(self, sample_codes: tuple[Tensor, Tensor], class_codes: Tensor) -> Tensor:
        a, v = sample_codes
        return _mode_scores(a, v, class_codes, self._mode())


class CJME(_TripletBaseline):
    name: ClassVar[str] = "cjme"
    config_class: ClassVar[type[BaseModel]] = CJMEConfig
    needs_class_table: ClassVar[bool] = True  # the entropy targets score against every training class

    config: CJMEConfig

    def __init__(self, config: CJMEConfig, dims: InputDims, compat: str = "none"):
        super().__init__(config, dims, compat)
        c = config

        def enc(in_dim: int, hidden: int) -> BaselineEmbeddingNet:
            return BaselineEmbeddingNet(in_dim, DIM_OUT, c.dropout_baselines, c.embedding_use_bn, hidden, True)

        self.triplet_net = TripletNet(
            enc(dims.audio, c.embeddings_hidden_size),
            enc(dims.video, c.embeddings_hidden_size),
            enc(dims.text, c.text_hidden_size),
        )
        both = dims.audio + dims.video
        self.attention_model = nn.Sequential(nn.BatchNorm1d(both), nn.Linear(both, 1), nn.Sigmoid())

    def _attention(self, batch: Batch) -> Tensor:
        """``w`` ``[B, 1]`` from the raw ``[audio ‖ video]``."""
        return self.attention_model(torch.cat((batch.audio, batch.video), dim=1))

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
        """``class_text`` ``[K, Dt]``: every class of the training split (the trainer passes it)."""
        if negative is None or negative_text is None:
            raise ValueError("CJME needs a negative batch and its class text (needs_negatives=True)")
        if class_text is None:
            raise ValueError("CJME needs class_text, the text of every training class (needs_class_table=True)")
        c = self.config
        a1, v1, t1, a2, v2, _t2 = self._embed(batch, negative, text, negative_text, "CJME")
        w = self._attention(batch)
        with torch.no_grad():  # the class table in train mode, detached (BN statistics and dropout as the reference)
            e = self.triplet_net.embedding_net3(class_text)
            # float32: under bf16 autocast the probabilities would fail Categorical's simplex check
            h_a = torch.distributions.Categorical(probs=torch.softmax((a1 @ e.t()).float(), dim=1)).entropy()
            h_v = torch.distributions.Categorical(probs=torch.softmax((v1 @ e.t()).float(), dim=1)).entropy()
            target = attention_targets(h_a, h_v)
        l_ta = triplet(t1, a1, a2, c.margin, reduction="none")
        l_tv = triplet(t1, v1, v2, c.margin, reduction="none")
        if c.composite == "reference":
            composite = ((1 - w) * l_ta + w * l_tv).mean()  # [B,1] * [B] -> [B,B], the reference's broadcast
        else:
            composite = ((1 - w[:, 0]) * l_ta + w[:, 0] * l_tv).mean()
        out = {"l_ct": composite, "l_av": F.mse_loss(a1, v1), "l_sup": F.mse_loss(w, target.unsqueeze(1))}
        out["loss"] = out["l_ct"] + out["l_av"] + out["l_sup"]
        return out

    def encode_samples(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """``(f_a(a), f_v(v), [w >= 0.5])``: ``[B, 64]``, ``[B, 64]``, ``[B, 1]`` (1 = video)."""
        check_averaged(batch, "CJME")
        thr = (self._attention(batch) >= 0.5).to(batch.audio.dtype)
        return self.triplet_net.embedding_net1(batch.audio), self.triplet_net.embedding_net2(batch.video), thr

    def scores(self, sample_codes: tuple[Tensor, Tensor, Tensor], class_codes: Tensor) -> Tensor:
        a, v, thr = sample_codes
        return _mode_scores(a, v, class_codes, self._mode(), thr.to(a.dtype))
