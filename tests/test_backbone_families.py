"""Backbone families beyond OpenAI's ViT, offline: each family's tiny random configuration
(``promptlab.backbones.TINY_CONFIGS``: the family's real tower classes, masks and pooling at toy size).

What is pinned here:
- FrozenCLIP's one per-layer loop computes what the library's own forward computes, per family;
- the text fast paths (truncation to the longest prompt, a shared prefix run once) switch on only where
  they are exact, and are exact there (== the library's full 77 / 64 / 32-token computation);
- CoOp-family prompts compute what the model computes on hand-written words (SigLIP: no start token,
  last-token pooling; MobileCLIP: bidirectional text);
- SigLIP's tokenizer is built offline and promptlab takes a local tokenizer folder; nothing is fetched.
"""

from __future__ import annotations

import pytest
import torch

from promptlab.backbones import TINY_CONFIGS, UnknownBackbone, load_clip, tiny_hf_tokenizer
from promptlab.clip import FrozenCLIP
from promptlab.methods import CoCoOp, CoOp
from promptlab.prompts import hand_crafted_features

FAMILIES = [a for a in TINY_CONFIGS if a != "tiny"] + ["tiny"]
# family -> (causal text tower, fast paths exact, start tokens)
EXPECTED = {
    "tiny": (True, True, 1),
    "tiny-quickgelu": (True, True, 1),
    "tiny-rn": (True, True, 1),
    "tiny-eva02": (True, True, 1),
    "tiny-pe": (True, True, 1),
    "tiny-siglip": (False, False, 0),  # bidirectional, pooled at position 63
    "tiny-mobileclip": (False, False, 1),  # bidirectional: padding is attended
}
TEXTS = ["a photo of a dog.", "x", "an image of the 3 tiny red cars"]
NAMES = ["dog", "red car", "zebra crossing"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> FrozenCLIP:
    return load_clip(request.param)


def test_families_match_the_library(family: FrozenCLIP) -> None:
    """Text through FrozenCLIP's loop == the library's encode_text (full context); images likewise."""
    ids = family.tokenize(TEXTS)
    assert ids.shape[1] == family.context_length
    with torch.no_grad():
        torch.testing.assert_close(
            family.encode_text(ids), family.model.encode_text(ids), atol=1e-5, rtol=1e-5
        )
        images = torch.randn(
            2, 3, family.image_size, family.image_size, generator=torch.Generator().manual_seed(0)
        )
        torch.testing.assert_close(family.encode_image(images), family.model.encode_image(images))
    assert (family.is_causal, family.can_truncate_text, family.n_start_tokens) == EXPECTED[family.arch]
    assert family.can_share_prefix == family.can_truncate_text


def test_truncation_is_inexact_where_it_is_switched_off(family: FrozenCLIP) -> None:
    """Where the flag is off, cutting the prompts to max EOT + 1 would change the features: the flag is
    needed (this is what the tower computed before the flags existed), not a precaution."""
    ids = family.tokenize(TEXTS)
    L = int(family.eot_index(ids).max()) + 1
    with torch.no_grad():
        full = family.model.encode_text(ids)
        x = family.embed_tokens(ids[:, :L]) + family._pos_emb[:L]
        for blk in family._text_blocks:
            x = family._run_block(blk, x, causal=family.text_causal)
        x = family._ln_final(x)
        at = family.eot_index(ids) if family.text_pool == "eot" else torch.full((len(TEXTS),), L - 1)
        cut = family._project_text(x[torch.arange(len(TEXTS)), at])
    assert torch.allclose(cut, full, atol=1e-5) == family.can_truncate_text


def test_shared_prefix_equals_full_computation(family: FrozenCLIP) -> None:
    """encode_text_prefixed (fast path where exact, full prompts otherwise) == the library on the same ids."""
    ids = family.tokenize([f"a photo of a {n}." for n in NAMES])
    emb = family.embed_tokens(ids)
    P = family.n_start_tokens + 2  # start token(s) + "a photo"
    with torch.no_grad():
        got = family.encode_text_prefixed(emb[:1, :P], emb[:, P:], family.eot_index(ids))[0]
        torch.testing.assert_close(got, family.model.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_coop_prompts_compute_what_the_model_computes(family: FrozenCLIP) -> None:
    """CoOp initialised from "a photo of a" == the model on "a photo of a {name}." (all families), by the
    shared-prefix path, the class-specific path and CoCoOp's image-conditioned path (meta-net zeroed)."""
    want = hand_crafted_features(family, NAMES, ["a photo of a {}."])
    with torch.no_grad():  # the library's own text forward on the same words
        lib = family.model.encode_text(family.tokenize([f"a photo of a {n}." for n in NAMES]))
    torch.testing.assert_close(want, torch.nn.functional.normalize(lib, dim=-1), atol=1e-5, rtol=1e-5)
    for csc in (False, True):  # shared prefix / one prompt per class through insert_context
        m = CoOp(family, NAMES, ctx_init="a photo of a", csc=csc)
        with torch.no_grad():
            got = torch.nn.functional.normalize(m.text_features(), dim=-1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    cocoop = CoCoOp(family, NAMES, ctx_init="a photo of a")
    for p in cocoop.meta_net.parameters():
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        feats = torch.randn(2, family.embed_dim)
        logits = cocoop.logits(feats)
        expect = family.logit_scale * torch.nn.functional.normalize(feats, dim=-1) @ want.t()
    torch.testing.assert_close(logits, expect, atol=1e-4, rtol=1e-4)


def test_siglip_logit_bias_leaves_softmax_and_argmax_unchanged() -> None:
    """SigLIP's learned bias is exposed, and adding it changes neither the cross-entropy nor the argmax
    promptlab uses (it shifts every class's logit alike)."""
    clip = load_clip("tiny-siglip")
    assert clip.logit_bias is not None and float(clip.logit_bias) == -10.0
    assert load_clip("tiny").logit_bias is None
    m = CoOp(clip, NAMES, ctx_init="a photo of a")
    feats = torch.randn(4, clip.embed_dim)
    labels = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        logits = m.logits(feats)
    biased = logits + clip.logit_bias
    torch.testing.assert_close(m.loss(biased, labels), m.loss(logits, labels))
    assert torch.equal(biased.argmax(-1), logits.argmax(-1))


def test_siglip_tokenizer_offline_and_from_a_local_folder(tmp_path) -> None:
    """The tiny SigLIP tokenizer is built in memory; saved to a folder it loads through model.tokenizer."""
    clip = load_clip("tiny-siglip")
    ids = clip.tokenize(["A photo of a Dog."])
    assert ids.shape == (1, 64)
    toks = clip.tokenizer.tokenizer.convert_ids_to_tokens(ids[0, :9].tolist())
    # no start token; canonicalized (lower case, no punctuation); </s> ends and pads
    assert toks == ["a", "photo", "of", "a", "d", "##o", "##g", "</s>", "</s>"]
    assert int(clip.eot_index(ids)[0]) == 7
    tiny_hf_tokenizer().save_pretrained(str(tmp_path / "tok"))
    again = load_clip("tiny-siglip", tokenizer=str(tmp_path / "tok"))
    assert torch.equal(again.tokenize(["A photo of a Dog."]), ids)
    with pytest.raises(FileNotFoundError, match="model.tokenizer"):
        load_clip("tiny-siglip", tokenizer=str(tmp_path / "missing"))


def test_unknown_tag_fails_before_any_download(monkeypatch) -> None:
    """An unknown open_clip tag or architecture is refused by name; open_clip is never asked to load."""
    import open_clip

    def no_load(*a, **k):
        raise AssertionError("create_model must not be reached")

    monkeypatch.setattr(open_clip, "create_model", no_load)
    with pytest.raises(UnknownBackbone, match="model.pretrained"):
        load_clip("ViT-B-16-SigLIP", "no_such_tag")
    with pytest.raises(UnknownBackbone, match="model.arch"):
        load_clip("EVA02-B-17", None)


@pytest.mark.slow
def test_real_siglip_architecture_with_a_local_tokenizer(tmp_path) -> None:
    """ViT-B-16-SigLIP (random weights) builds offline with a local tokenizer: the Hub tokenizer is never built."""
    tiny_hf_tokenizer().save_pretrained(str(tmp_path / "tok"))
    clip = load_clip("ViT-B-16-SigLIP", tokenizer=str(tmp_path / "tok"))
    assert (clip.context_length, clip.is_causal, clip.text_pool, clip.n_start_tokens) == (
        64,
        False,
        "last",
        0,
    )
    assert clip.logit_bias is not None


@pytest.mark.parametrize("arch", ["tiny-eva02", "tiny-siglip", "tiny-pe"])
def test_timm_visual_prompts_through_timm_blocks(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Visual prompts on timm ViT towers (EVA02 / PE: rotary embeddings; SigLIP: attention-pool head).

    No prompt tokens: the library's own encode_image. With prompts: equal to an independent
    computation where timm itself treats the prompt tokens as extra prefix tokens (which its rotary
    attention leaves unrotated, ``num_prefix_tokens``) and the head pools the image's tokens only:
    this pins the identity rotary rows FrozenCLIP appends for them. Gradients reach shallow and deep prompts.
    """
    clip = load_clip(arch)
    t = clip._timm_trunk
    assert t is not None and clip.vision_layers == 2
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, clip.image_size, clip.image_size, generator=g)
    p = torch.randn(3, clip.vision_width, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            clip.encode_image(images, prompts=p[:0]), clip.model.encode_image(images), atol=0, rtol=0
        )
        got = clip.encode_image(images, prompts=p)
        # reference: prompts as prefix tokens, via timm's modules
        out = t.patch_embed(images)
        x, rope = out if isinstance(out := t._pos_embed(out), tuple) else (out, None)
        npt = t.num_prefix_tokens
        x = t.norm_pre(torch.cat([x[:, :npt], p.expand(2, -1, -1), x[:, npt:]], dim=1))
        for blk in t.blocks:
            if rope is not None:
                monkeypatch.setattr(blk.attn, "num_prefix_tokens", npt + 3)
            x = blk(x, rope=rope) if rope is not None else blk(x)
        x = t.norm(torch.cat([x[:, :npt], x[:, npt + 3 :]], dim=1))
        want = clip.model.visual.head(t.forward_head(x))
        monkeypatch.undo()
    scale = float(want.abs().max())  # the tiny PE's random head gives features of size ~1e-6
    torch.testing.assert_close(got / scale, want / scale, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, clip.model.encode_image(images), atol=0, rtol=1e-3)  # prompts act
    shallow = p.clone().requires_grad_(True)
    deep = torch.randn(3, clip.vision_width, generator=g).requires_grad_(True)
    clip.encode_image(images, prompts=shallow, deep_prompts={1: deep}).sum().backward()
    assert shallow.grad.abs().sum() > 0 and deep.grad.abs().sum() > 0


def test_prompt_buffers_keep_the_whole_context_where_truncation_is_off(family: FrozenCLIP) -> None:
    """A bidirectional tower attends its padding, so the learned-prompt buffers keep all of its context
    positions; a causal one's are cut to the longest prompt (max EOT + 1), as the shared fast path is."""
    from promptlab.prompts import prompt_buffers

    for prefix in ("", "a photo of a"):
        bufs = prompt_buffers(family, NAMES, 2, prefix=prefix)
        full = family.context_length
        expected = int(bufs["_eot"].max()) + 1 if family.can_truncate_text else full
        assert bufs["_base"].shape[1] == expected
        assert expected < full or not family.can_truncate_text  # the cut is real where it is on
