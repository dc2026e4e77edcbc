"""CoCoOp, batched, against the reference per-image formulation.

The reference below transcribes KaiyangZhou/CoOp ``trainers/cocoop.py`` (PromptLearner.forward and
CustomCLIP.forward): image features normalised, meta-net bias added to every context token, then a
Python loop over the images, each running all C prompts of 77 tokens through open_clip's own text
transformer with its causal mask, EOT feature at ``tokenized_prompts.argmax(-1)``. It uses none of
promptlab's prompt or encoding code. Both sides share the same ctx and meta-net tensors.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.methods import CoCoOp

# Names of different token lengths, with underscores (replaced by spaces, as the reference does).
CLASSNAMES = ["cat", "sea_lion", "Yorkshire_terrier", "a very long class name with many words", "dog"]


def ref_cocoop_logits(
    model: nn.Module,
    classnames: list[str],
    ctx_init: str,
    ctx: torch.Tensor,
    meta_net: nn.Module,
    image_features: torch.Tensor,
) -> torch.Tensor:
    """CustomCLIP.forward of the reference, from the image features on: [B, C] logits."""
    n_ctx = ctx.shape[0]
    prompt_prefix = ctx_init if ctx_init else " ".join(["X"] * n_ctx)
    names = [c.replace("_", " ") for c in classnames]
    tokenized = torch.cat([open_clip.tokenize(f"{prompt_prefix} {n}.") for n in names])  # [C, 77]
    with torch.no_grad():
        emb = model.token_embedding(tokenized)
    prefix, suffix = emb[:, :1], emb[:, 1 + n_ctx :]
    imf = image_features / image_features.norm(dim=-1, keepdim=True)
    ctx_shifted = ctx.unsqueeze(0) + meta_net(imf).unsqueeze(1)  # [B, n_ctx, W]
    logits = []
    for ctx_i, imf_i in zip(ctx_shifted, imf):
        pts = torch.cat([prefix, ctx_i.unsqueeze(0).expand(len(names), -1, -1), suffix], dim=1)  # [C, 77, W]
        x = pts + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        tf = x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection
        tf = tf / tf.norm(dim=-1, keepdim=True)
        logits.append(model.logit_scale.exp() * imf_i @ tf.t())
    return torch.stack(logits)


def _module(clip: FrozenCLIP, ctx_init: str = "a photo of a") -> CoCoOp:
    torch.manual_seed(0)
    m = CoCoOp(clip, CLASSNAMES, ctx_init=ctx_init)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the context off its initialisation and make the bias large enough to matter
        m.ctx.add_(0.1 * torch.randn(m.ctx.shape, generator=g))
        for p in m.meta_net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("ctx_init", ["a photo of a", ""])
def test_logits_and_grads_equal_reference_loop(tiny_clip: FrozenCLIP, ctx_init: str) -> None:
    m = _module(tiny_clip, ctx_init)
    feats = torch.randn(6, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    params = [m.ctx, *m.meta_net.parameters()]

    ours = m(image_features=feats)
    ref = ref_cocoop_logits(tiny_clip.model, CLASSNAMES, ctx_init, m.ctx, m.meta_net, feats)
    assert ours.shape == (6, len(CLASSNAMES))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ours.std() > 1e-2  # logits that differ between classes: the comparison is not vacuous

    g_ours = torch.autograd.grad(m.loss(ours, labels), params)
    g_ref = torch.autograd.grad(F.cross_entropy(ref, labels), params)
    for a, b in zip(g_ours, g_ref):
        assert b.abs().max() > 1e-6
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_from_images_equals_reference(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    """End to end from pixels: the reference's image encoder is open_clip's own ``encode_image``."""
    m = _module(tiny_clip)
    with torch.no_grad():
        ref = ref_cocoop_logits(
            tiny_clip.model,
            CLASSNAMES,
            "a photo of a",
            m.ctx,
            m.meta_net,
            tiny_clip.model.encode_image(images),
        )
        torch.testing.assert_close(m(images), ref, atol=1e-5, rtol=1e-5)


def test_one_text_tower_call_per_batch(tiny_clip: FrozenCLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _module(tiny_clip)
    feats = torch.randn(4, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = m(image_features=feats)
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = tiny_clip.encode_text_prefixed

    def counting(prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor, **kw):
        calls.append((tuple(prefix.shape), tuple(suffix.shape)))
        return real(prefix, suffix, eot, **kw)

    monkeypatch.setattr(tiny_clip, "encode_text_prefixed", counting)
    with torch.no_grad():
        torch.testing.assert_close(m(image_features=feats), expected, atol=0, rtol=0)
    n_prefix = 1 + m.n_ctx  # [SOS] + the image's context: run once per image, shared by its C prompts
    assert len(calls) == 1 and calls[0][0] == (4, n_prefix, tiny_clip.width)
    assert calls[0][1][-3] == len(
        CLASSNAMES
    )  # the C class suffixes, shared by the 4 images, in the same call

    calls.clear()
    m.max_prompts_per_call = 2 * len(CLASSNAMES)  # chunks of 2 images: same logits, 2 calls
    with torch.no_grad():
        torch.testing.assert_close(m(image_features=feats), expected, atol=1e-5, rtol=0)
    assert [c[0][0] for c in calls] == [2, 2]


def test_batched_equals_each_image_alone(tiny_clip: FrozenCLIP) -> None:
    m = _module(tiny_clip)
    feats = torch.randn(3, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        batched = m(image_features=feats)
        alone = torch.cat([m(image_features=f[None]) for f in feats])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert (batched[0] - batched[1]).abs().max() > 1e-4  # the classifier depends on the image


def test_capabilities_and_meta_net_shape(tiny_clip: FrozenCLIP) -> None:
    m = CoCoOp(tiny_clip, CLASSNAMES)
    assert m.text_depends_on_image
    assert m.image_side_frozen  # the image tower gets no gradient: its features stay cacheable
    D, W = tiny_clip.embed_dim, tiny_clip.width
    assert m.meta_net.linear1.weight.shape == (D // 16, D)
    assert m.meta_net.linear2.weight.shape == (W, D // 16)
    assert m.n_ctx == 4 and m.ctx.shape == (4, W)
    assert set(m.prompt_state_dict()) == {"ctx", *(f"meta_net.{k}" for k in m.meta_net.state_dict())}
