"""Shared-prefix text encoding equals the full computation (values and gradients)."""

from __future__ import annotations

import torch

from promptlab.methods import CoOp
from promptlab.prompts import build_prompt_layout, encode_context_prefix, encode_prompts, insert_context


def _setup(clip, n_ctx=3, groups=None):
    names = ["dog", "golden retriever", "cat", "a very_long class name with many tokens"]
    ids, pos, eot = build_prompt_layout(clip, names, n_ctx, "end")
    base = clip.embed_tokens(ids).detach().float()
    torch.manual_seed(0)
    shape = (n_ctx, clip.width) if groups is None else (groups, n_ctx, clip.width)
    ctx = (0.02 * torch.randn(shape)).requires_grad_(True)
    return base, pos, eot, ctx


def test_prefix_equals_full_unified(tiny_clip):
    base, pos, eot, ctx = _setup(tiny_clip)
    full = encode_prompts(tiny_clip, insert_context(base, ctx, pos), eot)
    (g_full,) = torch.autograd.grad(full.square().sum(), ctx)
    fast = encode_context_prefix(tiny_clip, base, ctx, eot)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), ctx)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fast, g_full, atol=1e-5 * g_full.abs().max().item(), rtol=1e-4)


def test_prefix_equals_full_per_group(tiny_clip):
    base, pos, eot, ctx = _setup(tiny_clip, groups=3)
    full = encode_prompts(tiny_clip, insert_context(base, ctx[:, None], pos), eot)  # [G, C, D]
    fast = encode_context_prefix(tiny_clip, base, ctx, eot)
    assert fast.shape == full.shape == (3, 4, tiny_clip.embed_dim)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    (g_full,) = torch.autograd.grad(full.sum(), ctx)
    (g_fast,) = torch.autograd.grad(fast.sum(), ctx)
    torch.testing.assert_close(g_fast, g_full, atol=1e-5 * g_full.abs().max().item(), rtol=1e-4)


def test_prefix_runs_short_suffixes(tiny_clip, monkeypatch):
    import promptlab.clip as C

    seen = []
    real = C._block_forward_prefixed

    def spy(b, xp, xs):
        seen.append((xp.shape[1], xs.shape[2]))
        return real(b, xp, xs)

    monkeypatch.setattr(C, "_block_forward_prefixed", spy)
    base, pos, eot, ctx = _setup(tiny_clip, n_ctx=16)
    encode_context_prefix(tiny_clip, base, ctx, eot)
    assert seen and all(p == 17 and s == int(eot.max()) + 1 - 17 for p, s in seen)


def test_checkpointing_changes_nothing(tiny_clip):
    m = CoOp(tiny_clip, ["dog", "cat", "bird"], n_ctx=4)
    feats = torch.randn(5, tiny_clip.embed_dim)
    labels = torch.tensor([0, 1, 2, 0, 1])
    loss = m.loss(m(image_features=feats), labels)
    (g,) = torch.autograd.grad(loss, m.ctx)
    tiny_clip.grad_checkpointing = True
    try:
        loss2 = m.loss(m(image_features=feats), labels)
        (g2,) = torch.autograd.grad(loss2, m.ctx)
    finally:
        tiny_clip.grad_checkpointing = False
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(g2, g)
