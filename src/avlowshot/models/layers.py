"""Layers shared by the methods: the BN embedding MLP and the pre-norm transformer with optional attention masks.

Module and attribute names follow the reference implementations (``fc``, ``layers.i.0.fn.to_qkv``, ...) and modules
are created in the reference order, so that seeded initialisation draws the same numbers. AVCA's and ClipClap's
released ``state_dict`` files load as they are; TCAF's and AV-DIFF's need the key map of
``avlowshot.importers.references`` (the reference registers its embedding block twice, keeps the Fourier time
features directly in it, and names the epsilon network's Sequential ``fc``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask on the CPU. The CPU generator is serial and the mask is its main cost:
    ``F.dropout``'s ``bernoulli_`` and even ``rand_like`` draw one 32-bit number per element, so the mask is taken
    from 16-bit slices of 64-bit draws instead (a quarter of the draws; measured on [256, 1024], 2 threads: 0.37 ms
    against 1.1 ms for ``rand_like``, and ``rand_like`` was 15 % of a TCAF step). The drop probability is rounded
    to a multiple of 1/65536 and the kept values are scaled by the rounded keep probability, so the mask stays
    unbiased (p = 0.8 drops with probability 0.799997). Another random stream than PyTorch's; on CUDA its fused
    kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.p == 1 or x.is_cuda:
            return super().forward(x)
        return x * dropout_keep_mask(x, self.p)


def dropout_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout mask of ``x``'s shape and dtype: 0 with probability ~``p``, else ``1 / keep probability``."""
    dropped = min(max(round(p * 65536), 1), 65535)  # of the 65536 16-bit values, this many drop
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)  # all 64 bits
    bits = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    keep = bits.ge(dropped - 32768).to(x.dtype)
    return keep.mul_(65536.0 / (65536 - dropped))


class EmbeddingNet(nn.Module):
    """``[Linear(in,h) -> BN(h) -> ReLU -> Dropout] -> Linear(.,out) -> BN(out, out_momentum) -> ReLU -> Dropout``.

    The bracketed hidden block exists only when ``hidden > 0``; its BN can be left out (``hidden_bn=False``, TCAF's
    ``embeddings_batch_norm``). It always uses PyTorch's default momentum 0.1;
    ``out_momentum`` sets the momentum of the output BN only, because that is the one knob the references expose.
    Outputs are post-ReLU, hence non-negative.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        dropout: float,
        hidden: int = 0,
        out_momentum: float = 0.1,
        hidden_bn: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Linear(in_dim, hidden)] + ([nn.BatchNorm1d(hidden)] if hidden_bn else [])
            layers += [nn.ReLU(), Dropout(dropout)]
            in_dim = hidden
        out_bn = nn.BatchNorm1d(out_dim, momentum=out_momentum)
        layers += [nn.Linear(in_dim, out_dim), out_bn, nn.ReLU(), Dropout(dropout)]
        self.fc = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def apply_each(net: nn.Module, *xs: torch.Tensor) -> list[torch.Tensor]:
    """``[net(x) for x in xs]``. A net without BatchNorm treats rows independently, so it runs once on the
    concatenated rows (fewer, larger matrix products; the same outputs to rounding, other dropout draws); with
    BatchNorm every ``x`` stays its own batch, as in separate calls."""
    if len(xs) == 1 or any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return [net(x) for x in xs]
    return list(net(torch.cat(xs)).split([len(x) for x in xs]))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``[B, N, N]`` mask (True = query i may attend to key j) -> additive ``[B, 1, N, N]`` float mask.

    Blocked pairs get ``-finfo.max`` like the references' ``masked_fill``, not ``-inf``: a query whose keys are all
    blocked (a padded token) then gets a uniform softmax instead of NaN, exactly as in the references.
    """
    blocked = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return blocked.unsqueeze(1)


# Up to this many tokens attention runs as broadcast products: AVCA's two tokens (audio, video) in [256, 3, 2, 100]
# took 1.4 ms per forward in the CPU flash kernel against 0.2 ms this way (forward + backward 3.5 vs 1.5 ms).
SHORT_SEQUENCE = 4
# Up to this many keys, attention on the CPU runs as two batched matrix products around a softmax: the flash
# kernel's tiling only pays off for long sequences. [64, 8, N, 64] with a mask, forward (forward + backward), ms:
# N = 20: 1.0 against 2.0 (5.2 against 10.6); N = 40: 2.9 against 5.5 (11.0 against 27.0); N = 80: 13.8 against
# 15.3; N = 160: 115 against 42, where the [N, N] weights leave the cache.
MATMUL_ATTENTION_KEYS = 80


def short_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask)`` (additive mask, scale ``Dh ** -0.5``) for a few tokens:
    ``[B, H, N, Dh]`` in and out, without the GEMM / kernel set-up that dominates at N = 2."""
    scores = (q.unsqueeze(3) * k.unsqueeze(2)).sum(-1) * q.shape[-1] ** -0.5  # [B, H, Nq, Nk]
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    return (weights.unsqueeze(-1) * v.unsqueeze(2)).sum(3)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask)`` (scale ``Dh ** -0.5``, no dropout) on ``[B, H, N, Dh]``,
    by the fastest route for the shape: broadcast products for a few tokens, matrix products for short CPU
    sequences, the fused kernel otherwise. ``attn_mask``: boolean (True = may attend) or additive, broadcastable
    to ``[B, H, Nq, Nk]``. Callers let a query with every key blocked through to every key (the fused kernels
    may return NaN for it)."""
    nq, nk = q.shape[-2], k.shape[-2]
    if q.device.type != "cpu" or nk > MATMUL_ATTENTION_KEYS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~attn_mask, torch.finfo(q.dtype).min
        )
    if nq <= SHORT_SEQUENCE and nk <= SHORT_SEQUENCE:
        return short_attention(q, k, v, attn_mask)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class Attention(nn.Module):
    """Multi-head self-attention with a fused bias-free ``to_qkv`` (vit-pytorch style), run by
    ``scaled_dot_product_attention`` with the default scale ``dim_head ** -0.5`` and no dropout on the weights."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        # [B, N, 3*H*Dh] -> 3 x [B, H, N, Dh]; the chunk order (q, k, v) then heads matches the reference's rearrange.
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else additive_mask(mask, q.dtype)
        return self.to_out(attend(q, k, v, attn_mask).transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """``Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim) -> Dropout``."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, dim), Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreNorm(nn.Module):
    """``fn(LayerNorm(x))`` with its own LayerNorm (eps 1e-5)."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class PreNormTransformer(nn.Module):
    """``depth`` layers of ``x = x + Attn(LN(x), mask); x = x + FF(LN(x))``, separate LayerNorms, no final norm.

    The output includes the input through the residuals. ``mask`` (bool ``[B, N, N]``, True = may attend) is used
    by every layer; ``None`` means full attention.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreNorm(dim, Attention(dim, heads, dim_head, dropout)),
                    PreNorm(dim, FeedForward(dim, mlp_dim, dropout)),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x, mask=mask) + x
            x = ff(x) + x
        return x


# ----------------------------------------------------------------------------------------------------------------
# Token sequences: attention-mask rules, Fourier time embedding, modality/time/padding embeddings, and a transformer
# with one LayerNorm per layer (TCAF, AV-DIFF).

ATTENTION_RULES = ("full", "self", "cross")


def token_attention_mask(
    kinds: torch.Tensor, rule: str, valid: torch.Tensor | None = None, global_kind: int | None = 0
) -> torch.Tensor:
    """Boolean attention mask (True = query i may attend to key j) over a token sequence with per-token kinds.

    ``kinds`` ``[N]`` (int): the group of every token, e.g. 0 = class token, 1 = audio, 2 = video.
    ``rule``: ``"full"`` every pair; ``"self"`` pairs of the same kind (within-modality); ``"cross"`` pairs of
    different kinds (an audio token sees video tokens only, and the reverse). Tokens of ``global_kind`` (class
    tokens; ``None`` for none) attend to and are attended by every token under every rule, themselves included.
    ``valid`` ``[B, N]`` (True = real token): pairs with a padded query or key are blocked, so a padded query row is
    all False. Returns ``[N, N]`` without ``valid``, else ``[B, N, N]``.
    """
    if rule not in ATTENTION_RULES:
        raise ValueError(f"attention rule {rule!r}: expected one of {', '.join(ATTENTION_RULES)}")
    same = kinds.unsqueeze(1) == kinds.unsqueeze(0)
    if rule == "full":
        mask = torch.ones_like(same)
    elif rule == "self":
        mask = same
    else:
        mask = ~same
    if global_kind is not None:
        glob = kinds == global_kind
        mask = mask | glob.unsqueeze(1) | glob.unsqueeze(0)
    if valid is None:
        return mask
    return mask.unsqueeze(0) & valid.unsqueeze(2) & valid.unsqueeze(1)


def layer_masks(masks: dict[str, torch.Tensor], rules: list[str]) -> list[torch.Tensor]:
    """One mask per transformer layer from named masks, e.g. AV-DIFF's hybrid attention
    ``layer_masks({"self": m_self, "full": m_full}, ["self"] * z + ["full"] * (depth - z))``."""
    return [masks[r] for r in rules]


class FourierTimeEmbedding(nn.Module):
    """Random Fourier features of time stamps, then a learned ``Linear(dim, dim)`` (TCAF's ``'sinusoid'`` type).

    ``fourier_randn = scale * randn(2, dim / 2)`` is a fixed buffer (saved, not trained). For times ``t`` of any
    shape: ``proj = (2 pi [t, t]) @ fourier_randn``, ``out = Linear(cat[sin(proj), cos(proj)])`` ``[..., dim]``.
    """

    def __init__(self, dim: int, scale: float = 10.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the Fourier time embedding needs an even dim, got {dim}")
        self.fourier_embeddings = nn.Linear(dim, dim)
        self.register_buffer("fourier_randn", scale * torch.randn(2, dim // 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.fourier_randn.dtype)
        proj = (2 * torch.pi * torch.stack((t, t), dim=-1)) @ self.fourier_randn
        return self.fourier_embeddings(torch.cat((proj.sin(), proj.cos()), dim=-1))


class AudioVisualEmbedding(nn.Module):
    """Per-token embedding of the audio and video sequences before the joint transformer (TCAF's block).

    For modality m with features ``f [B, T, Dm]``, validity ``valid [B, T]`` and times ``t [B, T]``:
    ``e = modal_embedding[m] + time(t) + pad_embedding * (~valid)``, ``z = Dropout(Proj_m(cat[f, e]))`` ``[B, T, out]``.
    ``Proj_m`` is a kernel-1 ``Conv1d`` (the reference module, so its weights load as they are), applied as a
    per-token linear map. ``time_embed``: ``"sinusoid"`` (Fourier) or ``"none"`` (zeros).
    """

    def __init__(
        self,
        audio_dim: int,
        video_dim: int,
        out_dim: int,
        embed_dim: int,
        dropout: float,
        *,
        embed_modality: bool = True,
        time_embed: str = "sinusoid",
        fourier_scale: float = 10.0,
    ):
        super().__init__()
        if time_embed not in ("sinusoid", "none"):
            raise ValueError(f"time embedding {time_embed!r}: expected sinusoid or none")
        self.embed_dim = embed_dim
        # Construction order of the reference block (modality, time, padding, projections).
        self.modal_embedding = nn.Embedding(2, embed_dim) if embed_modality else None
        self.time_embedding = FourierTimeEmbedding(embed_dim, fourier_scale) if time_embed == "sinusoid" else None
        self.pad_embedding = nn.Embedding(1, embed_dim)
        self.out_proj_audio = nn.Conv1d(audio_dim + embed_dim, out_dim, kernel_size=1)
        self.out_proj_video = nn.Conv1d(video_dim + embed_dim, out_dim, kernel_size=1)
        self.dropout = Dropout(dropout)

    def embed(self, modality: int, f: torch.Tensor, valid: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``modality`` 0 = audio, 1 = video."""
        e = self.pad_embedding.weight[0] * (~valid).unsqueeze(-1).to(f.dtype)
        if self.time_embedding is not None:
            e = self.time_embedding(t) + e
        if self.modal_embedding is not None:
            e = self.modal_embedding.weight[modality] + e
        proj = self.out_proj_audio if modality == 0 else self.out_proj_video
        z = F.linear(torch.cat((f, e.to(f.dtype)), dim=-1), proj.weight.squeeze(-1), proj.bias)
        return self.dropout(z)


class MaskedAttention(nn.Module):
    """Multi-head attention with separate bias-free ``to_q``, ``to_k``, ``to_v`` (TCAF's ``NewAttention``), run by
    ``scaled_dot_product_attention`` with a boolean mask (True = may attend), scale ``dim_head ** -0.5``.

    A query row whose keys are all blocked (a padded token) is let through to every key, so that no backend returns
    NaN; such rows are never read (no valid token attends to a padded key).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, queries: int | None = None) -> torch.Tensor:
        """``queries``: only the first ``queries`` tokens attend (every token is still a key); the output holds
        those tokens."""
        b, n, _ = x.shape
        nq = n if queries is None else queries
        q = self.to_q(x[:, :nq]).view(b, nq, self.heads, -1).transpose(1, 2)
        k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_k, self.to_v))
        if mask is not None:
            mask = (mask | ~mask.any(dim=-1, keepdim=True))[..., :nq, :]
            mask = mask.unsqueeze(-3) if mask.dim() == 3 else mask  # [B, 1, Nq, N] broadcast over heads
        out = attend(q, k, v, mask)
        return self.to_out(out.transpose(1, 2).reshape(b, nq, -1))


class SharedNormLayer(nn.Module):
    """``x = x + Attn(LN(x), mask); x = x + FF(LN(x))`` with ONE LayerNorm shared by both sub-blocks (TCAF)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MaskedAttention(dim, heads, dim_head, dropout)
        self.ff = FeedForward(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, queries: int | None = None) -> torch.Tensor:
        x = self.attn(self.norm(x), mask=mask, queries=queries) + x[:, :queries]
        return self.ff(self.norm(x)) + x


class SharedNormTransformer(nn.Module):
    """``depth`` :class:`SharedNormLayer` s, no final norm. ``mask``: one boolean mask for every layer (``[N, N]``
    or ``[B, N, N]``), a list with one mask per layer (e.g. :func:`layer_masks`), or ``None`` (full attention).

    ``first_only``: return the first token only (``[B, 1, D]``), for models that read the class token alone
    (TCAF, AV-DIFF); the last layer then runs its queries, output projection and feed-forward for that token only
    (every token stays a key). The same numbers to rounding; about 1/6 of the last layer's work."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(SharedNormLayer(dim, heads, dim_head, mlp_dim, dropout) for _ in range(depth))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | list[torch.Tensor] | None = None, first_only: bool = False
    ) -> torch.Tensor:
        masks = mask if isinstance(mask, list | tuple) else [mask] * len(self.layers)
        if len(masks) != len(self.layers):
            raise ValueError(f"{len(masks)} attention masks for {len(self.layers)} layers")
        last = len(self.layers) - 1
        for i, (layer, m) in enumerate(zip(self.layers, masks, strict=True)):
            x = layer(x, mask=m, queries=1 if first_only and i == last else None)
        return x


def token_fusion(
    config, audio_dim: int, video_dim: int
) -> tuple[nn.Parameter, AudioVisualEmbedding, SharedNormTransformer]:
    """TCAF's token fusion (shared by AV-DIFF), built in the reference's order from a config with the reference's
    ``transformer_*`` keys: the class token ``[1, 1, D]``, the modality / time / padding embedding block that maps
    audio and video rows to ``D``-wide tokens, and the shared-norm transformer."""
    c, d = config, config.transformer_dim
    cls_token = nn.Parameter(torch.randn(1, 1, d))
    embedding = AudioVisualEmbedding(
        audio_dim,
        video_dim,
        d,
        c.transformer_embedding_dim,
        c.transformer_embedding_dropout,
        embed_modality=c.transformer_embedding_modality,
        time_embed=c.transformer_embedding_time_embed_type,
        fourier_scale=c.transformer_embedding_fourier_scale,
    )
    transformer = SharedNormTransformer(
        d,
        c.transformer_depth,
        c.transformer_heads,
        c.transformer_dim_head,
        c.transformer_mlp_dim,
        c.transformer_dropout,
    )
    return cls_token, embedding, transformer


def embed_rows(
    net: nn.Module, x: torch.Tensor, valid: torch.Tensor, *, include_padding: bool, masked: bool | None = None
) -> torch.Tensor:
    """A per-row network (e.g. an :class:`EmbeddingNet` with BatchNorm) on ``[B, L, D]`` rows. A training-mode
    net sees only the ``valid`` rows (padding would skew its BN batch statistics) unless ``include_padding`` (the
    references' behaviour); in eval mode BN uses running statistics, so every row runs at once.

    Two ways to leave the padding out of training: gather the valid rows (the CPU default: no FLOPs on padding), or
    run every row with masked BN statistics (``masked``; the default on CUDA and under ``torch.compile``, where the
    gather's data-dependent shape would sync the host or break the graph). Both give the same numbers, except that
    dropout draws its mask for every row in the masked form."""
    b, n, _ = x.shape
    if include_padding or not net.training:
        return net(x.reshape(b * n, -1)).view(b, n, -1)
    if masked is None:
        masked = x.is_cuda or torch.compiler.is_compiling()
    if masked and isinstance(net, EmbeddingNet):
        keep = valid.reshape(b * n, 1).to(x.dtype)
        h = x.reshape(b * n, -1)
        for layer in net.fc:
            h = masked_batch_norm(layer, h, keep) if isinstance(layer, nn.BatchNorm1d) else layer(h)
        return (h * keep).view(b, n, -1)
    rows = net(x[valid])
    out = rows.new_zeros(b, n, rows.shape[-1])
    out[valid] = rows
    return out


def masked_batch_norm(bn: nn.BatchNorm1d, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Training-mode ``bn`` on the rows of ``h`` [N, C] where ``keep`` [N, 1] is 1: the batch statistics (biased
    variance to normalise, unbiased for the running estimate, as ``nn.BatchNorm1d``) come from those rows only."""
    n = keep.sum()
    mean = (h * keep).sum(0) / n
    var = ((h - mean) ** 2 * keep).sum(0) / n
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum
            bn.running_mean.mul_(1 - m).add_(m * mean.detach())
            bn.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
    out = (h - mean) * torch.rsqrt(var + bn.eps)
    return out * bn.weight + bn.bias if bn.affine else out


# ----------------------------------------------------------------------------------------------------------------
# Latent cross-attention (Perceiver-style baselines, specs/baselines.md §1.3 ``XB``)


class GEGLUFeedForward(nn.Module):
    """``Linear(dim, 2 * mult * dim) -> a * GELU(gate) -> Linear(mult * dim, dim) -> Dropout`` (the Perceiver's
    feed-forward in lucidrains' ``perceiver-pytorch``)."""

    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * mult * dim)
        self.w_out = nn.Linear(mult * dim, dim)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.w_in(x).chunk(2, dim=-1)
        return self.dropout(self.w_out(a * F.gelu(gate)))


class CrossAttentionBlock(nn.Module):
    """Queries attend to a context sequence, then a feed-forward, each pre-normed with its own LayerNorm::

        q = q + to_out(softmax((LN_q(q) Wq)(LN_kv(x) Wk)^T dh^-0.5, keys masked) (LN_kv(x) Wv))
        q = q + FF(LN_ff(q))

    ``key_valid`` ``[B, M]`` (True = real token): padded context tokens are never attended, so appending padding
    does not change the output. ``ff``: a feed-forward module (default :class:`FeedForward` ``(dim, mlp_dim)``).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float, ff: nn.Module | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), Dropout(dropout))
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = ff if ff is not None else FeedForward(dim, mlp_dim, dropout)

    def forward(self, q: torch.Tensor, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = q.shape
        m = x.shape[1]
        kv = self.norm_kv(x)
        qh = self.to_q(self.norm_q(q)).view(b, n, self.heads, -1).transpose(1, 2)
        kh = self.to_k(kv).view(b, m, self.heads, -1).transpose(1, 2)
        vh = self.to_v(kv).view(b, m, self.heads, -1).transpose(1, 2)
        mask = None if key_valid is None else key_valid[:, None, None, :]  # [B, 1, 1, M] over heads and queries
        out = attend(qh, kh, vh, mask)
        q = self.to_out(out.transpose(1, 2).reshape(b, n, -1)) + q
        return self.ff(self.norm_ff(q)) + q


def label_columns(label_space: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Global class ids -> columns of a classifier over ``label_space`` (ascending global ids). On the CPU a label
    outside the label space is an error; on CUDA the check is skipped (it would read a value back every step)."""
    col = torch.searchsorted(label_space, labels)
    if labels.is_cuda:
        return col
    n = len(label_space)
    if bool((col >= n).any()) or not bool((label_space[col.clamp(max=n - 1)] == labels).all()):
        raise ValueError("a label is outside the classifier's label space")
    return col


def normal_init(module: nn.Module, std: float = 0.02) -> nn.Module:
    """The GAN references' ``weights_init``: every Linear weight ~ N(0, std), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: ``mean((||grad_x critic(x_hat, *cond)||_2 - 1)^2)`` with ``x_hat = a * real + (1 - a) * fake``,
    ``a ~ U(0, 1)`` per row; differentiable (``create_graph``) so that it trains the critic."""
    alpha = torch.rand(real.shape[0], 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out = critic(x_hat, *cond)
    (grad,) = torch.autograd.grad(out, x_hat, grad_outputs=torch.ones_like(out), create_graph=True)
    return ((grad.norm(2, dim=1) - 1) ** 2).mean()
