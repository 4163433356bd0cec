"""The speed paths give the numbers of the plain PyTorch calls they replace: the 16-bit dropout mask, the
attention routes (broadcast products, matrix products, fused kernel), the fused Adam of the trainer and the padded
one-gather collation; and the allocator setting that keeps freed memory for the next step."""

import os

import pytest
import torch
import torch.nn.functional as F

from avlowshot.models.avca import AVCA, AVCAConfig
from avlowshot.models.base import InputDims
from avlowshot.models.layers import MATMUL_ATTENTION_KEYS, Dropout, attend, short_attention
from avlowshot.train.trainer import adam


@pytest.mark.parametrize("p", [0.8, 0.5, 0.1])
def test_dropout_mask_is_unbiased(p):
    torch.manual_seed(0)
    x = torch.ones(301, 997)  # numel not a multiple of 4: the last 64-bit draw is cut
    y = Dropout(p).train()(x)
    kept = y != 0
    assert abs(float(kept.float().mean()) - (1 - p)) < 0.005
    assert abs(float(y.mean()) - 1.0) < 0.01  # E[dropout(x)] = x
    scale = y[kept].unique()
    assert scale.numel() == 1 and abs(float(scale) * (1 - p) - 1) < 2e-5  # keep probability rounded to 2^-16


def test_dropout_gradient_is_the_mask_and_eval_is_identity():
    torch.manual_seed(1)
    drop = Dropout(0.2).train()
    x = torch.ones(200, 500, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(1)
    assert torch.equal(Dropout(0.2).train()(x), y)  # seeded: the same mask


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_short_attention_equals_sdpa(n, masked):
    torch.manual_seed(n)
    q, k, v = (torch.randn(5, 3, n, 16, requires_grad=True) for _ in range(3))
    mask = None
    if masked:
        blocked = torch.rand(5, 1, n, n) < 0.3
        blocked[..., 0] = False  # every query keeps one key
        mask = torch.zeros(5, 1, n, n).masked_fill_(blocked, torch.finfo(torch.float32).min)
    ours = short_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(ours, ref, atol=1e-6)
    g_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


KEYS = MATMUL_ATTENTION_KEYS


@pytest.mark.parametrize("nq, nk", [(1, 3), (6, 6), (20, 20), (1, KEYS), (7, KEYS + 1)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_attend_equals_sdpa_on_every_route(nq, nk, mask_kind):
    """Broadcast products (a few tokens), matrix products (short CPU sequences) and the fused kernel (longer) give
    sdpa's outputs and gradients."""
    torch.manual_seed(nq * 100 + nk)
    q = torch.randn(3, 2, nq, 16, requires_grad=True)
    k, v = (torch.randn(3, 2, nk, 16, requires_grad=True) for _ in range(2))
    mask = None
    if mask_kind != "none":
        mask = torch.rand(3, 1, nq, nk) > 0.3
        mask[..., 0] = True  # every query keeps one key
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    ours = attend(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ours.shape == (3, 2, nq, 16)
    assert torch.allclose(ours, ref, atol=1e-6)
    g_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def _weights_after(steps: int, fused: bool, resume_from_loop_at: int | None = None) -> list[torch.Tensor]:
    """A tiny MLP (weight decay) trained by ``steps`` Adam steps on fixed data; ``resume_from_loop_at``: the
    loop Adam runs the first steps and its state is loaded into the fused one (a checkpoint of an older run)."""
    torch.manual_seed(0)
    # no BN: the bias before a BN gets a gradient of pure rounding noise, which Adam scales up to lr per step
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    params = list(model.parameters())
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 1e-5}
    opt = adam(params, **kwargs) if fused and resume_from_loop_at is None else torch.optim.Adam(params, **kwargs)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
    for step in range(steps):
        if step == resume_from_loop_at:
            state = opt.state_dict()
            opt = adam(params, **kwargs)
            opt.load_state_dict(state)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert bool(opt.defaults["fused"]) == fused
    return [p.detach().clone() for p in model.parameters()]


def test_fused_adam_gives_the_weights_of_the_loop_adam():
    start = _weights_after(0, fused=False)
    loop = _weights_after(50, fused=False)
    moved = max(float((a - s).abs().max()) for a, s in zip(loop, start, strict=True))
    assert moved > 0.1  # the steps did move the weights
    for fused in (_weights_after(50, fused=True), _weights_after(50, fused=True, resume_from_loop_at=20)):
        diff = max(float((a - b).abs().max()) for a, b in zip(loop, fused, strict=True))
        assert diff < 1e-5, diff


def test_the_trainer_optimiser_is_fused_on_the_cpu():
    model = AVCA(AVCAConfig(embeddings_hidden_size=32), InputDims(audio=12, video=10, text=8))
    opt = adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert opt.defaults["fused"] is True


@pytest.mark.parametrize("per_layer_masks", [False, True])
def test_class_token_only_last_layer_equals_the_full_transformer(per_layer_masks):
    from avlowshot.models.layers import SharedNormTransformer, token_attention_mask

    torch.manual_seed(3)
    net = SharedNormTransformer(dim=24, depth=3, heads=2, dim_head=8, mlp_dim=16, dropout=0.0).eval()
    kinds = torch.tensor([0] + [1] * 5 + [2] * 4)
    valid = torch.ones(6, 10, dtype=torch.bool)
    valid[:3, 4:6] = False  # padded audio rows
    valid[4:, 8:] = False  # padded video rows
    mask = token_attention_mask(kinds, "cross", valid, global_kind=0)
    if per_layer_masks:
        mask = [token_attention_mask(kinds, rule, valid, global_kind=0) for rule in ("self", "full", "cross")]
    x = torch.randn(6, 10, 24, requires_grad=True)
    full = net(x, mask)[:, :1]
    first = net(x, mask, first_only=True)
    assert first.shape == (6, 1, 24) and torch.allclose(first, full, atol=1e-6)
    g_full, g_first = (torch.autograd.grad(y.square().sum(), x)[0] for y in (full, first))
    assert torch.allclose(g_first, g_full, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize(
    "max_len, tight, cropped", [(None, False, False), (4, False, True), (4, True, True), (9, True, False)]
)
def test_padded_gather_equals_per_sample_copies(dtype, max_len, tight, cropped):
    """The one-gather padded layout holds each sample's rows (cropped from its start) and zeros after them."""
    from avlowshot.data.batching import _gather_temporal
    from avlowshot.data.store import Modality

    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([3, 1, 7, 5, 2])
    offsets = torch.cat((torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)))
    data = (torch.rand(int(lengths.sum()), 6, generator=g) * 200).to(dtype)
    mod = Modality(data, offsets, step_seconds=0.5)
    idx = torch.tensor([4, 2, 0, 2])  # repeats allowed, any order
    starts = torch.tensor([1, 2, 0, 3]) if cropped else None
    out, mask, time = _gather_temporal(mod, idx, max_len, starts, tight)
    begin = offsets[idx] + (0 if starts is None else starts)
    length = offsets[idx + 1] - begin
    length = length if max_len is None else length.clamp(max=max_len)
    width = int(length.max()) if max_len is None or tight else max_len
    assert out.shape == (4, width, 6) and out.dtype == torch.float32
    for i in range(4):
        n = int(length[i])
        assert torch.equal(out[i, :n], data[begin[i] : begin[i] + n].float())
        assert torch.equal(out[i, n:], torch.zeros(width - n, 6))
        assert mask[i].tolist() == [j < n for j in range(width)]
    assert torch.equal(time[0], torch.arange(width, dtype=torch.float32) * 0.5)


FAULTS_SCRIPT = """
import resource, torch
from avlowshot.train.allocator import keep_freed_memory
from avlowshot.train.threads import pinned
n = 64 * 2**20 // 4
faults = []
with pinned():
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(n).fill_(1.0)  # freed at once, as a step's temporaries are
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(keep_freed_memory().replace(" ", "_"), *faults)
"""


@pytest.mark.parametrize("keep", ["1", "0"])
def test_freed_memory_is_kept_for_the_next_step(keep, monkeypatch):
    """A run (``threads.pinned``) keeps freed memory: a freed 64 MiB tensor's pages are reused by the next one of
    its size instead of being faulted in again; glibc's default (``AVLOWSHOT_KEEP_FREED_MEMORY=0``) gives them
    back to the kernel at every free (above its 32 MiB mmap threshold). glibc's own variables also win."""
    import platform
    import resource
    import subprocess
    import sys

    from avlowshot.train import allocator

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert "MALLOC" in allocator._set_thresholds()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    env = {**os.environ, allocator.ENV: keep}
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True, check=True)
    state, *faults = out.stdout.split()
    faults = [int(f) for f in faults]
    pages = 64 * 2**20 // resource.getpagesize()
    if keep == "1":
        if state != "kept":
            pytest.skip(f"this glibc: {state}")
        assert max(faults[-4:]) < 0.1 * pages, faults  # the heap settles within a few steps, then no faults
    else:
        assert min(faults) > 0.9 * pages, faults
