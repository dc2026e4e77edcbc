"""Deep prompts in both towers (FrozenCLIP's per-layer loop) and the methods built on them, IVLP and MaPLe.

The reference encoders below transcribe muzairkhattak/multimodal-prompt-learning ``clip/model.py``
(ResidualAttentionBlock_MaPLe / _IVLP, VisionTransformer_MaPLe): text prompts replace the tokens after
[SOS] before blocks 1..depth-1; vision prompts are appended after the positional embedding, *before*
``ln_pre``, and replace the last n tokens before blocks 1..depth-1. They run open_clip's own blocks.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn as nn

from promptlab.clip import FrozenCLIP, load_clip
from promptlab.methods import IVLP, MaPLe

CLASSNAMES = ["cat", "sea_lion", "a very long class name with many words"]


def ref_text(
    model: nn.Module, prompts: torch.Tensor, tokenized: torch.Tensor, deep: list[torch.Tensor]
) -> torch.Tensor:
    """TextEncoder + ResidualAttentionBlock_MaPLe: 77-token prompts, deep[j] goes in before block j + 1."""
    x = prompts + model.positional_embedding
    for i, blk in enumerate(model.transformer.resblocks):
        if i > 0 and i - 1 < len(deep):
            n = deep[i - 1].shape[0]
            x = torch.cat([x[:, :1], deep[i - 1].expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
        x = blk(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection


def ref_image(
    model: nn.Module, images: torch.Tensor, shallow: torch.Tensor | None, deep: list[torch.Tensor]
) -> torch.Tensor:
    """VisionTransformer_MaPLe.forward: prompts appended before ln_pre, replaced before blocks 1..len(deep)."""
    v = model.visual
    x = v.conv1(images).reshape(images.shape[0], v.conv1.out_channels, -1).permute(0, 2, 1)
    x = (
        torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        + v.positional_embedding
    )
    if shallow is not None:
        x = torch.cat([x, shallow.expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x)
    for i, blk in enumerate(v.transformer.resblocks):
        if i > 0 and i - 1 < len(deep):
            n = deep[i - 1].shape[0]
            x = torch.cat([x[:, : x.shape[1] - n], deep[i - 1].expand(x.shape[0], -1, -1)], dim=1)
        x = blk(x)
    return v.ln_post(x[:, 0]) @ v.proj


def ref_prompts(model: nn.Module, prefix: str, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MultiModalPromptLearner: "[SOS] ctx <rest of prefix> name. [EOT]" at 77 tokens."""
    n_ctx = ctx.shape[0]
    tokenized = torch.cat([open_clip.tokenize(f"{prefix} {c.replace('_', ' ')}.") for c in CLASSNAMES])
    with torch.no_grad():
        emb = model.token_embedding(tokenized)
    x = torch.cat([emb[:, :1], ctx.expand(len(CLASSNAMES), -1, -1), emb[:, 1 + n_ctx :]], dim=1)
    return x, tokenized


def _perturb(m: nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(params=["open_clip", "hf"])
def any_clip(request: pytest.FixtureRequest, hf_clip_dir: Path) -> FrozenCLIP:
    return load_clip("hf-tiny", str(hf_clip_dir)) if request.param == "hf" else load_clip("tiny")


# ---------------------------------------------------------------------- FrozenCLIP hooks
@torch.no_grad()
def test_depth_zero_is_the_plain_encoder(any_clip: FrozenCLIP, images: torch.Tensor) -> None:
    ids = any_clip.tokenize(["a photo of a dog.", "a photo of a very small cat on a mat."])
    plain = any_clip.encode_text(ids)
    x, eot = any_clip.embed_tokens(ids), any_clip.eot_index(ids)
    assert torch.equal(any_clip.encode_text_embeddings(x, eot, deep_prompts={}), plain)
    assert torch.equal(
        any_clip.encode_image(images, prompts=None, deep_prompts={}), any_clip.encode_image(images)
    )
    if (
        any_clip.backend == "open_clip"
    ):  # and the plain loop is the library's own forward (test_clip covers HF)
        torch.testing.assert_close(plain, any_clip.model.encode_text(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            any_clip.encode_image(images), any_clip.model.encode_image(images), atol=1e-5, rtol=1e-5
        )


@torch.no_grad()
def test_methods_at_depth_zero_reproduce_plain_clip(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    """IVLP with text depth 1 (shallow only, context = the init words) and no vision prompts is plain CLIP."""
    m = IVLP(
        tiny_clip,
        CLASSNAMES,
        n_ctx_text=2,
        ctx_init="a photo of a",
        prompt_depth_text=1,
        prompt_depth_vision=0,
    )
    assert m.text_deep is None and m.vis_ctx is None and m.vis_deep is None
    ids = tiny_clip.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])
    assert torch.equal(m.text_features(), tiny_clip.encode_text(ids))
    assert torch.equal(m.encode_image(images), tiny_clip.encode_image(images))


def test_layer_keys_and_token_counts_are_checked(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    ids = tiny_clip.tokenize(["a photo of a dog."])
    x, eot = tiny_clip.embed_tokens(ids), tiny_clip.eot_index(ids)
    with pytest.raises(ValueError, match="start at 1"):
        tiny_clip.encode_text_embeddings(x, eot, deep_prompts={0: torch.zeros(2, tiny_clip.width)})
    p = torch.zeros(2, tiny_clip.vision_width)
    with pytest.raises(ValueError, match="start at 1"):
        tiny_clip.encode_image(images, prompts=p, deep_prompts={0: p})
    with pytest.raises(ValueError, match="must match"):
        tiny_clip.encode_image(images, prompts=p, deep_prompts={1: torch.zeros(3, tiny_clip.vision_width)})
    with pytest.raises(ValueError, match="prompts"):  # deep tokens need appended tokens to replace
        tiny_clip.encode_image(images, deep_prompts={1: p})
    assert tiny_clip.text_layers == 2 and tiny_clip.vision_layers == 2


# ---------------------------------------------------------------------- methods against the reference
def test_maple_equals_reference(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    m = MaPLe(tiny_clip, CLASSNAMES, n_ctx=2, ctx_init="a photo of a", prompt_depth=2)
    _perturb(m)
    prompts, tokenized = ref_prompts(tiny_clip.model, "a photo of a", m.ctx)
    deep_text = list(m.text_deep)
    ref_t = ref_text(tiny_clip.model, prompts, tokenized, deep_text)
    ref_i = ref_image(tiny_clip.model, images, m.proj(m.ctx), [f(p) for f, p in zip(m.deep_proj, deep_text)])
    torch.testing.assert_close(m.text_features(), ref_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.encode_image(images), ref_i, atol=1e-5, rtol=1e-5)
    # without the deep prompts the results differ: they are used
    no_deep = ref_text(tiny_clip.model, prompts, tokenized, [])
    assert (no_deep - ref_t).abs().max() > 1e-4


def test_ivlp_equals_reference(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    m = IVLP(tiny_clip, CLASSNAMES, n_ctx_text=2, n_ctx_vision=3, prompt_depth_text=2, prompt_depth_vision=2)
    _perturb(m)
    prompts, tokenized = ref_prompts(tiny_clip.model, "a photo of a", m.ctx)
    torch.testing.assert_close(
        m.text_features(),
        ref_text(tiny_clip.model, prompts, tokenized, list(m.text_deep)),
        atol=1e-5,
        rtol=1e-5,
    )
    ref_i = ref_image(tiny_clip.model, images, m.vis_ctx, list(m.vis_deep))
    torch.testing.assert_close(m.encode_image(images), ref_i, atol=1e-5, rtol=1e-5)
    assert (ref_image(tiny_clip.model, images, m.vis_ctx, []) - ref_i).abs().max() > 1e-4


def test_maple_couples_vision_to_text(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    """A loss on the image features alone reaches the text prompts through the coupling maps."""
    m = MaPLe(tiny_clip, CLASSNAMES, prompt_depth=2)
    assert len(m.deep_proj) == 1 and m.text_deep.shape == (1, 2, tiny_clip.width)
    m.encode_image(images).pow(2).sum().backward()
    assert m.ctx.grad.abs().max() > 0 and m.text_deep.grad.abs().max() > 0
    assert m.proj.weight.grad.abs().max() > 0 and m.deep_proj[0].weight.grad.abs().max() > 0
    assert not m.image_side_frozen and not m.text_depends_on_image
    assert not IVLP.image_side_frozen


def test_maple_deep_maps_start_as_copies(make_openclip) -> None:
    """The reference clones one Linear for F_1..F_{d-1} (``_get_clones``); a 3-block tower has two."""
    clip = load_clip(
        make_openclip(
            vision_cfg=dict(layers=3, width=32, head_width=16, patch_size=8, image_size=32),
            text_cfg=dict(layers=3, width=32, heads=2),
        )
    )
    m = MaPLe(clip, CLASSNAMES, prompt_depth=3)
    assert len(m.deep_proj) == 2 and m.text_deep.shape == (2, 2, clip.width)
    assert torch.equal(m.deep_proj[0].weight, m.deep_proj[1].weight)
    assert not torch.equal(m.deep_proj[0].weight, m.proj.weight)
    assert m.deep_proj[0].weight.data_ptr() != m.deep_proj[1].weight.data_ptr()  # copies, not shared


def test_maple_initial_prompt_layout(tiny_clip: FrozenCLIP) -> None:
    """n_ctx=2 from "a photo of a": ctx = embeddings of "a photo", "of a" stays as fixed words."""
    m = MaPLe(tiny_clip, ["dog"], n_ctx=2, prompt_depth=1)
    assert m.text_deep is None and len(m.deep_proj) == 0
    ids = tiny_clip.tokenize("a photo of a dog.")
    with torch.no_grad():
        emb = tiny_clip.embed_tokens(ids)[0]
    torch.testing.assert_close(m.ctx.detach(), emb[1:3])
    L = int(tiny_clip.eot_index(ids)[0]) + 1
    assert torch.equal(m._base[0], emb[:L]) and m._ctx_pos.tolist() == [[1, 2]]


def test_depth_beyond_the_tower_is_refused(tiny_clip: FrozenCLIP) -> None:
    with pytest.raises(ValueError, match="prompt depth 9"):
        MaPLe(tiny_clip, CLASSNAMES)  # the paper's depth 9 on a 2-block tower
    with pytest.raises(ValueError, match="prompt depth 12"):
        IVLP(tiny_clip, CLASSNAMES, prompt_depth_text=2)
    with pytest.raises(ValueError, match="ctx_init"):
        MaPLe(tiny_clip, CLASSNAMES, n_ctx=5, prompt_depth=2)
