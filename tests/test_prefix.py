"""Shared-prefix text encoding equals the full computation (values and gradients)."""

from __future__ import annotations

import pytest
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


def test_prefix_runs_packed_suffixes(tiny_clip, monkeypatch):
    """Each block sees the prefix once and the suffixes packed: sum of suffix lengths, no padding tokens."""
    import promptlab.clip as C

    seen = []
    real = C._block_forward_prefixed

    def spy(b, xp, xs, layout, last=False):
        seen.append((xp.shape[1], xs.shape[1], last))
        return real(b, xp, xs, layout, last)

    monkeypatch.setattr(C, "_block_forward_prefixed", spy)
    base, pos, eot, ctx = _setup(tiny_clip, n_ctx=16)
    encode_context_prefix(tiny_clip, base, ctx, eot)
    packed = int((eot - 17 + 1).sum())
    assert packed < len(eot) * (int(eot.max()) + 1 - 17)  # the names differ in length: padding was saved
    assert [s for s in seen] == [(17, packed, False)] * (len(seen) - 1) + [(17, packed, True)]
    assert len(seen) == tiny_clip.text_layers


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


def _full_77_tokens(model, names: list[str], ctx: torch.Tensor) -> torch.Tensor:
    """The reference computation on its own open_clip copy: every prompt at the full 77 tokens, causal mask.

    ctx: [G, n_ctx, W] -> [G, C, D] projected features, EOT read at the argmax token (CoOp's TextEncoder).
    """
    import open_clip

    n_ctx = ctx.shape[1]
    ids = open_clip.tokenize([" ".join(["X"] * n_ctx) + " " + n.replace("_", " ") + "." for n in names])
    emb = model.token_embedding(ids)  # [C, 77, W]
    out = []
    for c in ctx:  # one group (image) at a time, as the reference loops
        x = torch.cat([emb[:, :1], c.unsqueeze(0).expand(len(names), -1, -1), emb[:, 1 + n_ctx :]], dim=1)
        x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        out.append(x[torch.arange(len(names)), ids.argmax(dim=-1)] @ model.text_projection)
    return torch.stack(out)


@pytest.mark.parametrize(
    "names",
    [
        ["dog", "cat", "cow"],  # every suffix the same length: nothing to pack
        ["dog", "golden retriever", "a very_long class name with many tokens", "cat"],  # long among short
        ["staffordshire bull terrier", "pug", "english cocker spaniel", "Bombay", "great pyrenees"],
        ["x"],  # one class
    ],
)
def test_packed_equals_full_77_tokens(tiny_clip, ref_openclip, names, one_thread):
    """Packed suffixes + shared prefix + EOT-only last block == 77-token prompts, values and gradients."""
    n_ctx, groups = 4, 3
    ids, _, eot = build_prompt_layout(tiny_clip, names, n_ctx, "end")
    base = tiny_clip.embed_tokens(ids).detach().float()[:, : int(eot.max()) + 1]
    g = torch.Generator().manual_seed(len(names))
    ctx = (0.5 * torch.randn(groups, n_ctx, tiny_clip.width, generator=g)).requires_grad_(True)
    fast = encode_context_prefix(tiny_clip, base, ctx, eot)  # [G, C, D]
    full = _full_77_tokens(ref_openclip, names, ctx)
    assert fast.shape == full.shape == (groups, len(names), tiny_clip.embed_dim)
    assert (full[0] - full[1]).abs().max() > 1e-3  # the groups' contexts matter: not a vacuous comparison
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    w = torch.randn(full.shape, generator=g)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), ctx)
    (g_full,) = torch.autograd.grad((full * w).sum(), ctx)
    torch.testing.assert_close(g_fast, g_full, atol=1e-5 * g_full.abs().max().item(), rtol=1e-4)
