"""The shared prompt maths of :mod:`promptlab.prompts`, pinned by values built without promptlab's helpers."""

from __future__ import annotations

import logging

import pytest
import torch

from promptlab.backbones import load_clip
from promptlab.clip import FrozenCLIP
from promptlab.prompts import (
    build_prompt_layout,
    deep_prompt_tokens,
    hand_crafted_features,
    independent_vl_prompts,
    init_context,
    knowledge_distance,
    leading_context,
    prompt_buffers,
)


def test_prompt_buffers_refuses_a_prefix_it_cannot_honour(tiny_clip: FrozenCLIP) -> None:
    with pytest.raises(ValueError, match="class_token_position='end', got 'front'"):
        prompt_buffers(tiny_clip, ["dog"], 2, position="front", prefix="a photo of a")
    with pytest.raises(ValueError, match=r"prefix 'a photo' has fewer than n_ctx=3 tokens"):
        prompt_buffers(tiny_clip, ["dog"], 3, prefix="a photo")


def test_knowledge_distance_is_computed_in_the_given_dtype() -> None:
    """KgCoOp / TCP score the knowledge term in the head's dtype (fp16 under reference_fp16), whatever dtype
    the text features arrive in: row-normalise, cosine with the hand-crafted rows, 1 - mean."""
    g = torch.Generator().manual_seed(0)
    txt, hand = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    hand = hand / hand.norm(dim=-1, keepdim=True)
    got = knowledge_distance(txt, hand, torch.float16)
    t16, h16 = txt.half(), hand.half()
    t16 = t16 / t16.norm(dim=-1, keepdim=True)
    want = 1.0 - ((t16 * h16).sum(-1) / (t16.norm(dim=-1) * h16.norm(dim=-1))).mean()
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    torch.testing.assert_close(
        knowledge_distance(hand * 3.0, hand, torch.float32), torch.tensor(0.0), atol=1e-6, rtol=0
    )


def test_visual_prompts_need_a_vit_only_when_asked_for() -> None:
    """A ResNet image tower takes text-only IVLP prompts (vision depth 0) and refuses any visual depth."""
    rn = load_clip("tiny-rn")
    prefix, tensors = independent_vl_prompts(rn, 2, 2, "a photo of a", 1, 0, "IVLP")
    assert prefix == "a photo of a" and tensors["vis_ctx"] is None and tensors["vis_deep"] is None
    assert tensors["ctx"].shape == (2, rn.width)
    with pytest.raises(ValueError, match="visual prompts need a ViT image tower"):
        independent_vl_prompts(rn, 2, 2, "a photo of a", 1, 1, "IVLP")
    with pytest.raises(ValueError, match="IVLP needs prompt_depth_text >= 1"):
        independent_vl_prompts(rn, 2, 2, "a photo of a", 0, 0, "IVLP")


def test_ivlp_prompts_per_depth(tiny_clip: FrozenCLIP) -> None:
    """Depth counts the input prompt: vision depth 1 is a shallow visual prompt (no deep tokens), depth d
    adds d - 1 layers of N(0, 0.02) tokens; depth beyond a tower names the tower."""
    torch.manual_seed(0)
    n_layers = tiny_clip.vision_layers
    _, shallow = independent_vl_prompts(tiny_clip, 2, 16, "a photo of a", 1, 1, "IVLP")
    assert shallow["vis_ctx"].shape == (16, tiny_clip.vision_width) and shallow["vis_deep"] is None
    assert shallow["text_deep"] is None
    assert 0.015 < float(shallow["vis_ctx"].detach().std()) < 0.025  # N(0, 0.02), as the reference
    _, deep = independent_vl_prompts(tiny_clip, 2, 16, "a photo of a", 2, n_layers, "IVLP")
    assert deep["vis_deep"].shape == (n_layers - 1, 16, tiny_clip.vision_width)
    assert deep["text_deep"].shape == (1, 2, tiny_clip.width)
    with pytest.raises(
        ValueError,
        match=rf"text prompt depth {tiny_clip.text_layers + 1}: expected 0\.\.{tiny_clip.text_layers}",
    ):
        independent_vl_prompts(tiny_clip, 2, 2, "a photo of a", tiny_clip.text_layers + 1, 1, "IVLP")
    with pytest.raises(ValueError, match=rf"vision prompt depth {n_layers + 1}: expected 0\.\.{n_layers}"):
        independent_vl_prompts(tiny_clip, 2, 2, "a photo of a", 1, n_layers + 1, "IVLP")


def test_leading_context_from_words_and_from_noise(tiny_clip: FrozenCLIP) -> None:
    """IVLP / MaPLe's context: the first n_ctx token embeddings of ctx_init (underscores are spaces, the whole
    phrase stays the prefix), or N(0, 0.02) behind one "X" placeholder per context token."""
    ctx, prefix = leading_context(tiny_clip, 2, "a_photo_of_a")
    assert prefix == "a photo of a"
    ids = tiny_clip.tokenize("a photo of a")[0, tiny_clip.n_start_tokens : tiny_clip.n_start_tokens + 2]
    torch.testing.assert_close(ctx, tiny_clip.token_embedding_table[ids].detach().float(), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"ctx_init='a photo' has 2 tokens, fewer than n_ctx=3"):
        leading_context(tiny_clip, 3, "a photo")
    torch.manual_seed(0)
    noise, placeholder = leading_context(tiny_clip, 64, None)
    assert placeholder == " ".join(["X"] * 64) and noise.shape == (64, tiny_clip.width)
    assert 0.018 < float(noise.std()) < 0.022


def test_deep_prompt_tokens_are_small_noise() -> None:
    """N(0, 0.02) per deep layer, as MaPLe / IVLP initialise their deeper prompts; none at depth 0 or 1."""
    torch.manual_seed(0)
    deep = deep_prompt_tokens(12, 9, 4, 256, "text")
    assert deep.shape == (8, 4, 256) and deep.requires_grad
    assert 0.019 < float(deep.detach().std()) < 0.021 and abs(float(deep.detach().mean())) < 1e-3
    assert (
        deep_prompt_tokens(12, 1, 4, 256, "text") is None
        and deep_prompt_tokens(12, 0, 4, 256, "text") is None
    )


def _x_positions(clip: FrozenCLIP, ids: torch.Tensor) -> torch.Tensor:
    """Positions of the "X" placeholder token in each row (the reference side of a layout)."""
    x_id = int(clip.tokenize("X")[0, clip.n_start_tokens])
    return torch.stack([(row == x_id).nonzero().flatten() for row in ids])


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({}, "X X X X {}."),  # the default: CoOp's "end"
        ({"position": "front"}, "{} X X X X."),
        ({"position": "middle"}, "X X {} X X."),
        ({"n_before": 1}, "X {} X X X."),  # n_before overrides position
        ({"position": "end", "n_before": 0}, "{} X X X X."),
        ({"position": "front", "n_before": 4}, "X X X X {}."),
    ],
)
def test_prompt_layout_is_the_tokenized_template(tiny_clip: FrozenCLIP, kw: dict, text: str) -> None:
    """CoOp's layouts: the ids are those of the prompt written out with "X" in every context slot, and the
    context positions are where those X tokens sit, in order (a multi-token name shifts the slots after it)."""
    names = ["dog", "golden_retriever", "a very long class name"]
    ids, pos, eot = build_prompt_layout(tiny_clip, names, 4, **kw)
    want = tiny_clip.tokenize([text.format(n.replace("_", " ")) for n in names])
    assert torch.equal(ids, want)
    assert pos.dtype == torch.long and torch.equal(pos, _x_positions(tiny_clip, want))
    assert torch.equal(eot, want.argmax(dim=-1))  # CLIP's EOT has the largest id


def test_prompt_layout_without_context_is_the_bare_name(tiny_clip: FrozenCLIP) -> None:
    ids, pos, eot = build_prompt_layout(tiny_clip, ["dog", "red car"], 0)
    assert torch.equal(ids, tiny_clip.tokenize(["dog.", "red car."]))
    assert pos.shape == (2, 0) and pos.dtype == torch.long and eot.tolist() == [3, 4]


def test_prompt_layout_refuses_n_before_outside_the_context(tiny_clip: FrozenCLIP) -> None:
    for n_before in (-1, 5):
        with pytest.raises(ValueError, match=rf"n_before={n_before} must lie in \[0, n_ctx=4\]"):
            build_prompt_layout(tiny_clip, ["dog"], 4, n_before=n_before)


def test_init_context_from_words_noise_or_nothing(tiny_clip: FrozenCLIP) -> None:
    """CoOp's context init: ctx_init's token embeddings (underscores are spaces; one word is one token),
    N(0, 0.02) by default, and an error for words that tokenize to nothing."""
    s = tiny_clip.n_start_tokens
    table = tiny_clip.token_embedding_table.detach().float()
    ids = tiny_clip.tokenize("a photo of a")[0, s : s + 4]
    torch.testing.assert_close(init_context(tiny_clip, 4, "a_photo_of_a"), table[ids], atol=0, rtol=0)
    one = tiny_clip.tokenize("photo")[0, s : s + 1]
    torch.testing.assert_close(init_context(tiny_clip, 1, "photo"), table[one], atol=0, rtol=0)
    torch.manual_seed(0)
    noise = init_context(tiny_clip, 64)
    assert noise.shape == (64, tiny_clip.width) and 0.018 < float(noise.std()) < 0.022
    with pytest.raises(ValueError, match=r"ctx_init=' ' has no tokens"):
        init_context(tiny_clip, 4, " ")


def test_init_context_warns_when_the_words_override_n_ctx(
    tiny_clip: FrozenCLIP, caplog: pytest.LogCaptureFixture
) -> None:
    """CoOp's rule (the words set the length) is applied loudly: the recorded n_ctx is the words' count."""
    with caplog.at_level(logging.WARNING, logger="promptlab.prompts"):
        assert init_context(tiny_clip, 4, "a photo of a").shape[0] == 4
        assert not caplog.records
        assert init_context(tiny_clip, 16, "a photo of a").shape[0] == 4
    (record,) = caplog.records
    assert record.getMessage() == (
        "n_ctx=16 is not used: ctx_init='a photo of a' gives 4 context tokens (CoOp's rule: the words set the "
        "length; the run records n_ctx=4). For 16 random context vectors set ctx_init to ''."
    )
    for bad in (0, -2, 2.0):
        with pytest.raises(
            ValueError, match=rf"n_ctx must be a positive number of context tokens, got {bad}"
        ):
            init_context(tiny_clip, bad, "")


def test_hand_crafted_features_are_clips_prompt_ensemble(tiny_clip: FrozenCLIP) -> None:
    """CLIP's prompt ensembling: each template's text features normalised, averaged over the templates, the
    mean normalised again; ``normalize_each=False`` (PromptSRC's frozen features) averages the raw features.
    Class names lose their underscores and outer spaces (CoOp's cleaning)."""
    templates = ["a photo of a {}.", "{} texture.", "a sketch of the {}"]
    clean = ("golden retriever", "cat")
    raw = torch.stack(
        [tiny_clip.encode_text(tiny_clip.tokenize([t.format(n) for n in clean])) for t in templates]
    )
    raw = raw.float()  # [T, C, D]
    each = raw / raw.norm(dim=-1, keepdim=True)
    want = each.mean(0) / each.mean(0).norm(dim=-1, keepdim=True)
    plain = raw.mean(0) / raw.mean(0).norm(dim=-1, keepdim=True)
    assert (want - plain).abs().max() > 1e-4  # the two rules differ on these features
    names = ["golden_retriever", " cat "]
    torch.testing.assert_close(hand_crafted_features(tiny_clip, names, templates), want, atol=1e-6, rtol=0)
    got = hand_crafted_features(tiny_clip, names, templates, normalize_each=False)
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=0)


def test_frozen_features_hold_no_graph(tiny_clip: FrozenCLIP, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exported classifier (``class_embeddings``), PromptSRC's zero-shot teacher
    (``frozen_image_features``) and the hand-crafted text features are constants: computed without autograd
    even while the context and the input require grad, with grad mode back on afterwards.
    ``class_embeddings`` are the learned text features, row-normalised, in float32."""
    from promptlab.methods import CoOp

    m = CoOp(tiny_clip, ["dog", "red car", "cat"], n_ctx=2)
    text = m.text_features()
    assert text.requires_grad
    emb = m.class_embeddings()
    assert not emb.requires_grad and emb.dtype == torch.float32 and torch.is_grad_enabled()
    want = text.detach().float()
    torch.testing.assert_close(emb, want / want.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)

    images = torch.randn(2, 3, tiny_clip.image_size, tiny_clip.image_size, requires_grad=True)
    feats = m.frozen_image_features(images)
    assert not feats.requires_grad and torch.is_grad_enabled()
    torch.testing.assert_close(feats, tiny_clip.encode_image(images.detach()), atol=0, rtol=0)

    modes = []
    encode_text = tiny_clip.encode_text

    def recording(ids: torch.Tensor) -> torch.Tensor:
        modes.append(torch.is_grad_enabled())
        return encode_text(ids)

    monkeypatch.setattr(tiny_clip, "encode_text", recording)
    hand_crafted_features(tiny_clip, ["dog"], ["a photo of a {}.", "a {}."])
    assert modes == [False, False] and torch.is_grad_enabled()
