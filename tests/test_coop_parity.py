"""CoOp and zero-shot CLIP against a re-implementation of the reference formulation.

The reference below transcribes KaiyangZhou/CoOp ``trainers/coop.py`` (PromptLearner, TextEncoder,
CustomCLIP): full 77-token prompts tokenized per class, SOS prefix / suffix buffers, the three class
token positions, the text transformer run with open_clip's own modules and causal mask, features
taken at ``tokenized_prompts.argmax(-1)``, logits = exp(logit_scale) * cos. It deliberately uses none
of promptlab's prompt or encoding code.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

from promptlab.clip import FrozenCLIP
from promptlab.methods import CoOp, ZeroShotCLIP

_tokenizer = SimpleTokenizer()

# Names of different token lengths, with underscores (CoOp replaces them by spaces).
CLASSNAMES = ["cat", "sea_lion", "Yorkshire_terrier", "a very long class name with many words"]


# ---------------------------------------------------------------------- reference CoOp
def ref_prompt_learner(model, classnames, ctx_init: str, n_ctx: int):
    """PromptLearner.__init__: prefix text, name lengths, tokenized prompts, prefix/suffix buffers."""
    if ctx_init:
        ctx_init = ctx_init.replace("_", " ")
        n_ctx = len(ctx_init.split(" "))
        prompt = open_clip.tokenize(ctx_init)
        with torch.no_grad():
            embedding = model.token_embedding(prompt)
        init_vectors = embedding[0, 1 : 1 + n_ctx, :]
        prompt_prefix = ctx_init
    else:
        init_vectors = None
        prompt_prefix = " ".join(["X"] * n_ctx)
    classnames = [name.replace("_", " ") for name in classnames]
    name_lens = [len(_tokenizer.encode(name)) for name in classnames]
    prompts = [prompt_prefix + " " + name + "." for name in classnames]
    tokenized_prompts = torch.cat([open_clip.tokenize(p) for p in prompts])  # [C, 77]
    with torch.no_grad():
        embedding = model.token_embedding(tokenized_prompts)
    return dict(
        n_ctx=n_ctx,
        init=init_vectors,
        name_lens=name_lens,
        tokenized_prompts=tokenized_prompts,
        token_prefix=embedding[:, :1, :],  # SOS
        token_suffix=embedding[:, 1 + n_ctx :, :],  # CLS, ., EOS, padding
    )


def ref_prompts(pl: dict, ctx: torch.Tensor, position: str) -> torch.Tensor:
    """PromptLearner.forward: [C, 77, W] prompt embeddings."""
    prefix, suffix = pl["token_prefix"], pl["token_suffix"]
    n_cls, n_ctx = prefix.shape[0], pl["n_ctx"]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1)
    half_n_ctx = n_ctx // 2
    prompts = []
    for i in range(n_cls):
        name_len = pl["name_lens"][i]
        prefix_i = prefix[i : i + 1, :, :]
        class_i = suffix[i : i + 1, :name_len, :]
        suffix_i = suffix[i : i + 1, name_len:, :]
        if position == "middle":
            parts = [
                prefix_i,
                ctx[i : i + 1, :half_n_ctx, :],
                class_i,
                ctx[i : i + 1, half_n_ctx:, :],
                suffix_i,
            ]
        elif position == "front":
            parts = [prefix_i, class_i, ctx[i : i + 1, :, :], suffix_i]
        else:
            raise ValueError(position)
        prompts.append(torch.cat(parts, dim=1))
    return torch.cat(prompts, dim=0)


def ref_text_encoder(model, prompts: torch.Tensor, tokenized_prompts: torch.Tensor) -> torch.Tensor:
    """TextEncoder.forward over all 77 positions, with open_clip's modules and causal mask."""
    x = prompts + model.positional_embedding
    batch_first = getattr(model.transformer, "batch_first", True)
    if not batch_first:
        x = x.permute(1, 0, 2)  # NLD -> LND
    x = model.transformer(x, attn_mask=model.attn_mask)
    if not batch_first:
        x = x.permute(1, 0, 2)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)]
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Module) else x @ proj


def ref_logits(model, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CustomCLIP.forward."""
    image_features = model.visual(images)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image_features @ text_features.t()


def ref_coop(model, classnames, ctx, *, ctx_init: str, n_ctx: int, position: str, images: torch.Tensor):
    pl = ref_prompt_learner(model, classnames, ctx_init, n_ctx)
    prompts = ref_prompts(pl, ctx, position)
    assert prompts.shape[1] == 77
    return ref_logits(model, images, ref_text_encoder(model, prompts, pl["tokenized_prompts"])), pl


# ---------------------------------------------------------------------- parity
INITS = {"random4": dict(n_ctx=4, ctx_init=""), "words": dict(ctx_init="a photo of a")}


@pytest.mark.parametrize("init", sorted(INITS))
@pytest.mark.parametrize("csc", [False, True])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_matches_reference(
    tiny_clip: FrozenCLIP, ref_openclip, images, position: str, csc: bool, init: str
) -> None:
    kw = INITS[init]
    model = ref_openclip
    torch.manual_seed(123)
    coop = CoOp(tiny_clip, CLASSNAMES, csc=csc, class_token_position=position, **kw)
    n_ctx = coop.n_ctx
    assert n_ctx == 4
    shape = (len(CLASSNAMES), n_ctx, tiny_clip.width) if csc else (n_ctx, tiny_clip.width)
    assert tuple(coop.ctx.shape) == shape

    pl = ref_prompt_learner(model, CLASSNAMES, kw.get("ctx_init", ""), kw.get("n_ctx", 16))
    assert len(set(pl["name_lens"])) >= 3  # the names really differ in token length
    assert torch.equal(coop._eot.cpu(), pl["tokenized_prompts"].argmax(-1))
    if kw.get("ctx_init"):
        # initialised from the words' token embeddings (one copy per class when class-specific)
        torch.testing.assert_close(coop.ctx.detach(), pl["init"].expand(shape), atol=0, rtol=0)
    else:
        assert 0.014 < float(coop.ctx.detach().std()) < 0.026  # N(0, 0.02)

    # move away from the initialisation so that every context vector (and class) differs
    with torch.no_grad():
        coop.ctx.add_(0.05 * torch.randn_like(coop.ctx))
    labels = torch.tensor([0, 2, 3])
    assert labels.shape[0] == images.shape[0]

    logits = coop(images)
    assert logits.shape == (images.shape[0], len(CLASSNAMES))
    F.cross_entropy(logits, labels).backward()

    ref_ctx = coop.ctx.detach().clone().requires_grad_(True)
    ref, _ = ref_coop(
        model,
        CLASSNAMES,
        ref_ctx,
        ctx_init=kw.get("ctx_init", ""),
        n_ctx=kw.get("n_ctx", 16),
        position=position,
        images=images,
    )
    F.cross_entropy(ref, labels).backward()

    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    assert coop.ctx.grad is not None and ref_ctx.grad.abs().max() > 0
    torch.testing.assert_close(
        coop.ctx.grad, ref_ctx.grad, rtol=1e-4, atol=1e-4 * float(ref_ctx.grad.abs().max())
    )
    # the positions matter: another position gives other logits
    other = {"end": "front", "middle": "end", "front": "middle"}[position]
    with torch.no_grad():
        alt, _ = ref_coop(
            model,
            CLASSNAMES,
            ref_ctx,
            ctx_init=kw.get("ctx_init", ""),
            n_ctx=4,
            position=other,
            images=images,
        )
    assert (alt - ref).abs().max() > 1e-4


@pytest.mark.parametrize("n_ctx", [1, 5])
def test_coop_middle_odd_context(tiny_clip: FrozenCLIP, ref_openclip, images, n_ctx: int) -> None:
    """CoOp splits an odd context as n_ctx // 2 before the name and the rest after it."""
    torch.manual_seed(0)
    coop = CoOp(tiny_clip, CLASSNAMES, n_ctx=n_ctx, class_token_position="middle")
    with torch.no_grad():
        logits = coop(images)
        ref, _ = ref_coop(
            ref_openclip,
            CLASSNAMES,
            coop.ctx.detach().clone(),
            ctx_init="",
            n_ctx=n_ctx,
            position="middle",
            images=images,
        )
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_coop_csc_word_init_matches_reference_shared_context(
    tiny_clip: FrozenCLIP, ref_openclip, images
) -> None:
    """With ctx_init, the reference ignores CSC and learns one shared [n_ctx, W] context. promptlab gives
    each class its own copy of the same words: at initialisation the logits are identical, and the
    reference's gradient is the sum of promptlab's per-class gradients."""
    coop = CoOp(tiny_clip, CLASSNAMES, ctx_init="a photo of a", csc=True)
    labels = torch.tensor([1, 0, 3])
    logits = coop(images)
    F.cross_entropy(logits, labels).backward()
    pl = ref_prompt_learner(ref_openclip, CLASSNAMES, "a photo of a", 16)
    shared = pl["init"].clone().requires_grad_(True)  # [n_ctx, W], as the reference builds it
    ref, _ = ref_coop(
        ref_openclip, CLASSNAMES, shared, ctx_init="a photo of a", n_ctx=16, position="end", images=images
    )
    F.cross_entropy(ref, labels).backward()
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        coop.ctx.grad.sum(0), shared.grad, rtol=1e-4, atol=1e-4 * float(shared.grad.abs().max())
    )


def test_coop_truncates_to_longest_prompt(tiny_clip: FrozenCLIP, ref_openclip) -> None:
    coop = CoOp(tiny_clip, CLASSNAMES, n_ctx=4)
    pl = ref_prompt_learner(ref_openclip, CLASSNAMES, "", 4)
    L = int(pl["tokenized_prompts"].argmax(-1).max()) + 1
    assert coop._base.shape == (len(CLASSNAMES), L, tiny_clip.width)
    assert L < 77


# ---------------------------------------------------------------------- zero-shot CLIP
TEMPLATES = ["a photo of a {}.", "a sketch of the {}.", "itap of my {}, which is quite large."]


@torch.no_grad()
def test_zeroshot_ensemble(tiny_clip: FrozenCLIP, ref_openclip, images) -> None:
    """KaiyangZhou/CoOp ``trainers/zsclip.py`` ZeroshotCLIP2.build_model (L70-99): per template, the library's
    ``encode_text`` of ``clip.tokenize(template.format(name))``, normalised; the mean over templates,
    normalised again; logits = exp(logit_scale) * image_features @ text_features.T."""
    zs = ZeroShotCLIP(tiny_clip, CLASSNAMES, templates=TEMPLATES)
    per_template = []
    for t in TEMPLATES:
        ids = open_clip.tokenize([t.format(c.replace("_", " ")) for c in CLASSNAMES])
        per_template.append(F.normalize(ref_openclip.encode_text(ids), dim=-1))
    expected = F.normalize(torch.stack(per_template).mean(0), dim=-1)  # [C, D]
    torch.testing.assert_close(zs.text_features(), expected, atol=1e-5, rtol=0)
    assert (per_template[0] - expected).abs().max() > 1e-4  # the ensemble is not one template

    img = F.normalize(ref_openclip.encode_image(images), dim=-1)
    ref = ref_openclip.logit_scale.exp() * img @ expected.t()
    torch.testing.assert_close(zs(images), ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_zeroshot_template_choices(tiny_clip: FrozenCLIP) -> None:
    assert len(ZeroShotCLIP(tiny_clip, CLASSNAMES[:2], templates="imagenet7").templates) == 7
    assert len(ZeroShotCLIP(tiny_clip, CLASSNAMES[:2], templates="imagenet80").templates) == 80
    ds = ZeroShotCLIP(tiny_clip, CLASSNAMES, templates="dataset", template="a photo of a {}, a type of pet.")
    single = ZeroShotCLIP(tiny_clip, CLASSNAMES, templates=["a photo of a {}, a type of pet."])
    torch.testing.assert_close(ds.text_features(), single.text_features(), atol=0, rtol=0)
    default = ZeroShotCLIP(tiny_clip, CLASSNAMES)
    assert default.templates == ["a photo of a {}."]
    with pytest.raises(ValueError, match="templates"):
        ZeroShotCLIP(tiny_clip, CLASSNAMES, templates="nonsense")
    with pytest.raises(ValueError, match="class name"):
        ZeroShotCLIP(tiny_clip, CLASSNAMES, templates=["no placeholder"])
