"""Deep prompts in both towers (FrozenCLIP's per-layer loop) and the methods built on them, IVLP and MaPLe.

The reference side transcribes muzairkhattak/multimodal-prompt-learning: ``clip/model.py``
(ResidualAttentionBlock_IVLP L191-256, ResidualAttentionBlock_MaPLe L287-331, VisionTransformer
L393-422, VisionTransformer_MaPLe L445-476): text prompts replace the tokens after [SOS] before
blocks 1..depth-1; vision prompts are appended after the positional embedding, *before* ``ln_pre``,
and replace the last n tokens before blocks 1..depth-1. ``RefMaPLe`` and ``RefIVLP`` re-state the
prompt learners and CustomCLIP of ``trainers/maple.py`` and ``trainers/independentVL.py`` with their
own parameters and coupling Linears, loaded from copies of promptlab's learned tensors, on a fresh
open_clip backbone holding a copy of the tiny CLIP's weights (``ref_openclip``). Nothing of promptlab
runs on the reference side; the comparison covers logits and the gradients of every learned tensor.
"""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.backbones import load_clip
from promptlab.clip import FrozenCLIP
from promptlab.methods import IVLP, MaPLe

CLASSNAMES = ["cat", "sea_lion", "a very long class name with many words"]


def ref_text(
    model: nn.Module, prompts: torch.Tensor, tokenized: torch.Tensor, deep: list[torch.Tensor]
) -> torch.Tensor:
    """TextEncoder (maple.py L52-66) + the blocks' text branch: deep[j] goes in before block j + 1."""
    x = prompts + model.positional_embedding
    for i, blk in enumerate(model.transformer.resblocks):
        if i > 0 and i - 1 < len(deep):  # ResidualAttentionBlock_MaPLe L313-328 / _IVLP L242-252
            n = deep[i - 1].shape[0]
            x = torch.cat([x[:, :1], deep[i - 1].expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
        x = blk(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection


def ref_image(
    model: nn.Module, images: torch.Tensor, shallow: torch.Tensor | None, deep: list[torch.Tensor]
) -> torch.Tensor:
    """VisionTransformer_MaPLe.forward L445-476: prompts appended before ln_pre, replaced before blocks 1..len(deep)."""
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
        if i > 0 and i - 1 < len(deep):  # ResidualAttentionBlock_MaPLe L299-312 / _IVLP L234-241
            n = deep[i - 1].shape[0]
            x = torch.cat([x[:, : x.shape[1] - n], deep[i - 1].expand(x.shape[0], -1, -1)], dim=1)
        x = blk(x)
    return v.ln_post(x[:, 0]) @ v.proj


class _RefPromptLearner(nn.Module):
    """The shared part of MultiModalPromptLearner (maple.py L69-167) and VLPromptLearner (independentVL.py
    L65-151): context from the first ``n_ctx`` tokens of ``ctx_init`` (n_ctx <= 4), the rest of the words
    kept in the 77-token prompt, prefix = [SOS], suffix = everything after the context."""

    def __init__(self, model: nn.Module, classnames: list[str], n_ctx: int, ctx_init: str):
        super().__init__()
        self.clip_model = model
        ctx_dim = model.ln_final.weight.shape[0]
        if ctx_init and n_ctx <= 4:
            ctx_init = ctx_init.replace("_", " ")
            with torch.no_grad():
                embedding = model.token_embedding(open_clip.tokenize(ctx_init))
            ctx_vectors = embedding[0, 1 : 1 + n_ctx, :].clone()
            prompt_prefix = ctx_init
        else:
            ctx_vectors = torch.empty(n_ctx, ctx_dim)
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx_vectors)
        names = [name.replace("_", " ") for name in classnames]
        self.tokenized_prompts = torch.cat([open_clip.tokenize(f"{prompt_prefix} {n}.") for n in names])
        with torch.no_grad():
            embedding = model.token_embedding(self.tokenized_prompts)
        self.token_prefix, self.token_suffix = embedding[:, :1], embedding[:, 1 + n_ctx :]
        self.n_cls = len(names)

    def prompts(self) -> torch.Tensor:
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # [C, 77, W]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """CustomCLIP.forward (maple.py L189-204, independentVL.py L164-175)."""
        txt = self.text_features()
        img = self.image_features(images)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.clip_model.logit_scale.exp() * img @ txt.t()


class RefMaPLe(_RefPromptLearner):
    """MultiModalPromptLearner (maple.py L103-117, L159-176): F_0 = ``proj``; the deep text prompts and
    their maps F_1..F_{d-1}, cloned from one Linear (``_get_clones`` L207-208)."""

    def __init__(self, model: nn.Module, classnames: list[str], n_ctx: int, ctx_init: str, depth: int):
        super().__init__(model, classnames, n_ctx, ctx_init)
        ctx_dim, vis_width = model.ln_final.weight.shape[0], model.visual.conv1.out_channels
        self.proj = nn.Linear(ctx_dim, vis_width)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, ctx_dim).normal_(std=0.02)) for _ in range(depth - 1)]
        )
        single_layer = nn.Linear(ctx_dim, vis_width)
        self.compound_prompt_projections = nn.ModuleList(
            [copy.deepcopy(single_layer) for _ in range(depth - 1)]
        )

    def load_promptlab(self, state: dict[str, torch.Tensor]) -> None:
        """promptlab's names -> the reference's: text_deep [d-1, n, W] is the ParameterList."""
        mine = {"ctx": state["ctx"], "proj.weight": state["proj.weight"], "proj.bias": state["proj.bias"]}
        for i in range(len(self.compound_prompts_text)):
            mine[f"compound_prompts_text.{i}"] = state["text_deep"][i]
            for k in ("weight", "bias"):
                mine[f"compound_prompt_projections.{i}.{k}"] = state[f"deep_proj.{i}.{k}"]
        _load_copies(self, mine)

    def text_features(self) -> torch.Tensor:
        return ref_text(
            self.clip_model, self.prompts(), self.tokenized_prompts, list(self.compound_prompts_text)
        )

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        deep = [layer(p) for layer, p in zip(self.compound_prompt_projections, self.compound_prompts_text)]
        return ref_image(self.clip_model, images, self.proj(self.ctx), deep)


class RefIVLP(_RefPromptLearner):
    """VLPromptLearner + the per-block ``VPT_shallow`` tokens of ResidualAttentionBlock_IVLP (L210-221) and
    VisionTransformer's ``VPT`` (L373-378): independent learned tokens, no coupling."""

    def __init__(
        self,
        model: nn.Module,
        classnames: list[str],
        n_ctx_text: int,
        n_ctx_vision: int,
        depth_t: int,
        depth_v: int,
    ):
        super().__init__(model, classnames, n_ctx_text, "a photo of a")
        ctx_dim, vis_width = model.ln_final.weight.shape[0], model.visual.conv1.out_channels
        self.text_vpt = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx_text, ctx_dim)) for _ in range(depth_t - 1)]
        )
        self.vpt = nn.Parameter(torch.empty(n_ctx_vision, vis_width))
        self.vision_vpt = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx_vision, vis_width)) for _ in range(depth_v - 1)]
        )

    def load_promptlab(self, state: dict[str, torch.Tensor]) -> None:
        mine = {"ctx": state["ctx"], "vpt": state["vis_ctx"]}
        mine.update({f"text_vpt.{i}": t for i, t in enumerate(state["text_deep"])})
        mine.update({f"vision_vpt.{i}": t for i, t in enumerate(state["vis_deep"])})
        _load_copies(self, mine)

    def text_features(self) -> torch.Tensor:
        return ref_text(self.clip_model, self.prompts(), self.tokenized_prompts, list(self.text_vpt))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return ref_image(self.clip_model, images, self.vpt, list(self.vision_vpt))


def _load_copies(ref: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load copies of promptlab's tensors: every learned tensor of the reference, and nothing else."""
    learned = {n for n, _ in ref.named_parameters() if not n.startswith("clip_model.")}
    assert set(state) == learned, sorted(set(state) ^ learned)
    ref.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)


def _assert_grads_match(ours: nn.Module, ref: nn.Module, pairs: dict[str, str], images, labels) -> None:
    """CE gradients of every learned tensor agree (``pairs``: promptlab name -> reference name)."""
    F.cross_entropy(ours(images), labels).backward()
    F.cross_entropy(ref.logits(images), labels).backward()
    grads = dict(ours.named_parameters())
    for mine, theirs in pairs.items():
        a, b = grads[mine].grad, ref.get_parameter(theirs).grad
        assert b is not None and b.abs().max() > 1e-7, theirs
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4, msg=mine)


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
def test_maple_equals_reference(tiny_clip: FrozenCLIP, ref_openclip: nn.Module, images: torch.Tensor) -> None:
    m = MaPLe(tiny_clip, CLASSNAMES, n_ctx=2, ctx_init="a photo of a", prompt_depth=2)
    ref = RefMaPLe(ref_openclip, CLASSNAMES, n_ctx=2, ctx_init="a photo of a", depth=2)
    torch.testing.assert_close(m.ctx.detach(), ref.ctx.detach(), atol=0, rtol=0)  # same initial words
    _perturb(m)
    ref.load_promptlab(m.prompt_state_dict())
    torch.testing.assert_close(m.text_features(), ref.text_features(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.encode_image(images), ref.image_features(images), atol=1e-5, rtol=1e-5)
    pairs = {
        "ctx": "ctx",
        "proj.weight": "proj.weight",
        "proj.bias": "proj.bias",
        "deep_proj.0.weight": "compound_prompt_projections.0.weight",
        "deep_proj.0.bias": "compound_prompt_projections.0.bias",
    }
    _assert_grads_match(m, ref, pairs, images, torch.tensor([0, 2, 1]))
    torch.testing.assert_close(
        m.text_deep.grad[0],
        ref.compound_prompts_text[0].grad,
        atol=1e-5 * float(m.text_deep.grad.abs().max()),
        rtol=1e-4,
    )
    # without the deep prompts the results differ: they are used
    no_deep = ref_text(ref_openclip, ref.prompts(), ref.tokenized_prompts, [])
    assert (no_deep - ref.text_features()).abs().max() > 1e-4


def test_ivlp_equals_reference(tiny_clip: FrozenCLIP, ref_openclip: nn.Module, images: torch.Tensor) -> None:
    m = IVLP(tiny_clip, CLASSNAMES, n_ctx_text=2, n_ctx_vision=3, prompt_depth_text=2, prompt_depth_vision=2)
    ref = RefIVLP(ref_openclip, CLASSNAMES, n_ctx_text=2, n_ctx_vision=3, depth_t=2, depth_v=2)
    torch.testing.assert_close(m.ctx.detach(), ref.ctx.detach(), atol=0, rtol=0)
    _perturb(m)
    ref.load_promptlab(m.prompt_state_dict())
    torch.testing.assert_close(m.text_features(), ref.text_features(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.encode_image(images), ref.image_features(images), atol=1e-5, rtol=1e-5)
    _assert_grads_match(m, ref, {"ctx": "ctx", "vis_ctx": "vpt"}, images, torch.tensor([1, 0, 2]))
    for mine, theirs in ((m.text_deep, ref.text_vpt), (m.vis_deep, ref.vision_vpt)):
        assert theirs[0].grad.abs().max() > 0
        torch.testing.assert_close(
            mine.grad[0], theirs[0].grad, atol=1e-5 * float(theirs[0].grad.abs().max()), rtol=1e-4
        )
    no_deep = ref_image(ref_openclip, images, ref.vpt, [])
    assert (no_deep - ref.image_features(images)).abs().max() > 1e-4


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
    """Each refusal names the method (or tower), the value at fault and what is accepted."""
    with pytest.raises(
        ValueError, match=r"^MaPLe prompt depth 9: expected 0\.\.2 \(the tower has 2 blocks\)$"
    ):
        MaPLe(tiny_clip, CLASSNAMES)  # the paper's depth 9 on a 2-block tower
    with pytest.raises(ValueError, match=r"^MaPLe needs prompt_depth >= 1 \(1 = shallow coupled prompts\)$"):
        MaPLe(tiny_clip, CLASSNAMES, prompt_depth=0)
    with pytest.raises(ValueError, match=r"^vision prompt depth 12: expected 0\.\.2"):
        IVLP(tiny_clip, CLASSNAMES, prompt_depth_text=2)
    with pytest.raises(ValueError, match=r"^IVLP needs prompt_depth_text >= 1 \(the text prompt"):
        IVLP(tiny_clip, CLASSNAMES, prompt_depth_text=0, prompt_depth_vision=2)
    rn = load_clip("tiny-rn")
    with pytest.raises(ValueError, match=r"^tiny-rn: MaPLe needs a ViT image tower$"):
        MaPLe(rn, CLASSNAMES, prompt_depth=1)
    with pytest.raises(ValueError, match="ctx_init"):
        MaPLe(tiny_clip, CLASSNAMES, n_ctx=5, prompt_depth=2)


def test_maple_at_depth_one_has_no_deep_prompts(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    """prompt_depth=1: only the coupled shallow prompt; the image side gets its projection and no deep list."""
    m = MaPLe(tiny_clip, CLASSNAMES, prompt_depth=1)
    shallow, deep = m.vision_prompts()
    assert m.text_deep is None and deep == []
    torch.testing.assert_close(shallow, m.proj(m.ctx), rtol=0, atol=0)
    assert m(images).shape == (images.shape[0], len(CLASSNAMES))
