"""Layers shared by the methods: the BN embedding MLP and the pre-norm transformer with optional attention masks.

Module and attribute names follow the reference implementations (``fc``, ``layers.i.0.fn.to_qkv``, ...) so that
their released ``state_dict`` files load without a key map, and modules are created in the reference order so that
seeded initialisation draws the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingNet(nn.Module):
    """``[Linear(in,h) -> BN(h) -> ReLU -> Dropout] -> Linear(.,out) -> BN(out, out_momentum) -> ReLU -> Dropout``.

    The bracketed hidden block exists only when ``hidden > 0``. Its BN always uses PyTorch's default momentum 0.1;
    ``out_momentum`` sets the momentum of the output BN only, because that is the one knob the references expose.
    Outputs are post-ReLU, hence non-negative.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float, hidden: int = 0, out_momentum: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = hidden
        out_bn = nn.BatchNorm1d(out_dim, momentum=out_momentum)
        layers += [nn.Linear(in_dim, out_dim), out_bn, nn.ReLU(), nn.Dropout(dropout)]
        self.fc = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``[B, N, N]`` mask (True = query i may attend to key j) -> additive ``[B, 1, N, N]`` float mask.

    Blocked pairs get ``-finfo.max`` like the references' ``masked_fill``, not ``-inf``: a query whose keys are all
    blocked (a padded token) then gets a uniform softmax instead of NaN, exactly as in the references.
    """
    blocked = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return blocked.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused bias-free ``to_qkv`` (vit-pytorch style), run by
    ``scaled_dot_product_attention`` with the default scale ``dim_head ** -0.5`` and no dropout on the weights."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        # [B, N, 3*H*Dh] -> 3 x [B, H, N, Dh]; the chunk order (q, k, v) then heads matches the reference's rearrange.
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else additive_mask(mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """``Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim) -> Dropout``."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
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
