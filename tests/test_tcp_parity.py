"""TCP against its reference computation, htyao89/Textual-based_Class-aware_prompt_tuning.

The reference side re-states ``trainers/tcp.py`` (PromptLearner L113-208 with CTX_INIT False, TextEncoder
L82-104, CustomCLIP.forward L240-260) and the text blocks of ``trainers/clip_text/model.py``
(ResidualAttentionBlock_MaPLe.forward L113-133: at ``counter in layers`` the n_ctx tokens after [SOS] become
``weight * class_feature + (1 - weight) * midfix`` with ``weights=[1.0]``), on a fresh open_clip model holding
a copy of the tiny CLIP's weights (``ref_openclip``; 2 text blocks, so the reference's ``layers=[8]`` is
``[1]`` here), with its own context and meta-net loaded from copies of promptlab's. Nothing of promptlab runs
on the reference side; the comparison covers logits, the loss and the gradients of every learned tensor.
"""

from __future__ import annotations

from collections import OrderedDict

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.backbones import load_clip
from promptlab.clip import FrozenCLIP
from promptlab.methods import TCP

CLASSNAMES = ["cat", "sea_lion", "a very long class name with many words"]
NEW = ["airliner", "fire_truck"]
LAYOUT = "X X X X {}, a type of pet."  # tcp.py CUSTOM_TEMPLATES["OxfordPets"] L61
ORI = "a photo of a {}, a type of pet."  # CUSTOM_TEMPLATES_ori["OxfordPets"] L43


class _QuickGELU(nn.Module):  # tcp.py L109-111
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class RefTCP(nn.Module):
    def __init__(self, model: nn.Module, classnames: list[str], n_ctx: int, layers: list[int]):
        super().__init__()
        self.model, self.layers, self.n_ctx = model, layers, n_ctx
        ctx_dim = model.ln_final.weight.shape[0]
        self.ctx = nn.Parameter(torch.empty(n_ctx, ctx_dim).normal_(std=0.02))  # L139-154 (random init)
        vis_dim = model.visual.output_dim
        self.meta_net = nn.Sequential(  # L168-173
            OrderedDict(
                [
                    ("linear1", nn.Linear(vis_dim, vis_dim // 4, bias=True)),
                    ("relu", _QuickGELU()),
                    ("linear2", nn.Linear(vis_dim // 4, 4 * ctx_dim, bias=True)),
                ]
            )
        )
        self.set_classnames(classnames)

    def set_classnames(self, classnames: list[str]) -> None:
        """What PromptLearner.__init__ derives from the class names (L156-190)."""
        prompts_ = torch.cat([open_clip.tokenize(ORI.format(c.replace("_", " "))) for c in classnames])
        with torch.no_grad():
            text_features = self.model.encode_text(prompts_)
            self.text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        names = [name.replace("_", " ") for name in classnames]
        self.tokenized_prompts = torch.cat([open_clip.tokenize(LAYOUT.format(c)) for c in names])
        with torch.no_grad():
            embedding = self.model.token_embedding(self.tokenized_prompts)
        self.token_prefix, self.token_suffix = embedding[:, :1, :], embedding[:, 1 + self.n_ctx :, :]
        self.n_cls = len(names)

    def text(self) -> torch.Tensor:
        class_feature = self.meta_net(self.text_features)  # PromptLearner.forward L193-208
        class_feature = class_feature.reshape(class_feature.shape[0], -1, self.ctx.shape[1])  # 512 in ViT-B
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        x = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        x = x + self.model.positional_embedding  # TextEncoder.forward L91-104
        weights = [1.0]
        for counter, blk in enumerate(self.model.transformer.resblocks):
            if counter in self.layers:  # ResidualAttentionBlock_MaPLe.forward L121-129 (batch-first here)
                textual_context = class_feature
                n_ctx = textual_context.shape[1]
                prefix, suffix, midfix = x[:, :1], x[:, 1 + n_ctx :], x[:, 1 : 1 + n_ctx]
                weight = weights[self.layers.index(counter)]
                x = torch.cat([prefix, weight * textual_context + (1 - weight) * midfix, suffix], dim=1)
            x = blk(x, attn_mask=self.model.attn_mask)
        x = self.model.ln_final(x)
        return x[torch.arange(x.shape[0]), self.tokenized_prompts.argmax(dim=-1)] @ self.model.text_projection

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None):
        """CustomCLIP.forward L240-260."""
        image_features = self.model.encode_image(image)
        text_features_old = self.text_features
        cos = torch.nn.CosineSimilarity(dim=1, eps=1e-07)
        text_features_old = text_features_old / text_features_old.norm(dim=-1, keepdim=True)
        logit_scale = self.model.logit_scale.exp()
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = self.text()
        text_features_norm = text_features / text_features.norm(dim=-1, keepdim=True)
        logits = logit_scale.detach() * image_features.detach() @ text_features_norm.t()
        if label is None:
            return logits
        score = cos(text_features_norm, text_features_old)
        score = 1.0 - torch.mean(score)
        return logits, F.cross_entropy(logits, label) + 8.0 * score


def test_tcp_equals_reference(tiny_clip: FrozenCLIP, ref_openclip: nn.Module, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    m = TCP(tiny_clip, CLASSNAMES, n_ctx=4, insert_layer=1, prompt_template=LAYOUT, template=ORI)
    ref = RefTCP(ref_openclip, CLASSNAMES, n_ctx=4, layers=[1])
    with torch.no_grad():  # move everything off its initialisation, then give the reference copies
        g = torch.Generator().manual_seed(4)
        for p in m.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    ref.load_state_dict({k: v.detach().clone() for k, v in m.prompt_state_dict().items()}, strict=False)
    labels = torch.tensor([2, 0, 1])
    logits = m(images)
    ref_logits, ref_loss = ref(images, labels)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    loss = m.loss(logits, labels)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    loss.backward()
    ref_loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in m.named_parameters():
        if not p.requires_grad:
            continue
        b = theirs[name].grad
        assert b is not None and b.abs().max() > 1e-7, name
        torch.testing.assert_close(p.grad, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4, msg=name)
    # the class-aware tokens matter (the meta-net's output changes the features) ...
    with torch.no_grad():
        without = ref.text()
        kept = ref.meta_net.linear2.bias.clone()
        ref.meta_net.linear2.bias.add_(torch.randn(kept.shape, generator=g))
        assert (ref.text() - without).abs().max() > 1e-3
        ref.meta_net.linear2.bias.copy_(kept)
    # ... and new classes get their own, from their names, with what was learned
    m.set_classnames(NEW)
    ref.set_classnames(NEW)
    with torch.no_grad():
        torch.testing.assert_close(m(images), ref(images), atol=1e-5, rtol=1e-5)


def test_tcp_checks_its_layout_and_block(tiny_clip: FrozenCLIP) -> None:
    """The class-aware tokens go in front of a block that exists after the first: 1..depth-1 (the last
    block's output is pooled, nothing replaces tokens after it); the messages name the range and why."""
    for block in (8, 2, 0):  # the tiny tower has 2 blocks: 2 is its depth, not a block in front of one
        with pytest.raises(
            ValueError,
            match=rf"^TCP insert_layer={block}: expected 1\.\.1 \(the text tower has 2 blocks; the reference's 8 is for 12\)$",
        ):
            TCP(tiny_clip, CLASSNAMES, insert_layer=block)
    with pytest.raises(
        ValueError,
        match=r"^TCP prompt_template='X X \{\}\.' needs a '\{\}' after at least n_ctx=4 tokens \(the context slots\)$",
    ):
        TCP(tiny_clip, CLASSNAMES, insert_layer=1, prompt_template="X X {}.")  # fewer slots than n_ctx
    m = TCP(tiny_clip, CLASSNAMES, insert_layer=1)
    assert m.prompt_template == "X X X X {}." and m.image_side_frozen


def test_tcp_context_from_words_is_the_references(tiny_clip: FrozenCLIP, ref_openclip: nn.Module) -> None:
    """CTX_INIT set: the context starts as the words' token embeddings after [SOS], one per token
    (tcp.py L125-134: ``token_embedding(clip.tokenize(ctx_init))[0, 1 : 1 + n_ctx]``; the reference
    hard-codes "a photo of a", L127); it sets the count whatever ``n_ctx`` says, as CoOp's rule."""
    m = TCP(tiny_clip, CLASSNAMES, n_ctx=2, ctx_init="a photo of a", insert_layer=1)
    with torch.no_grad():
        want = ref_openclip.token_embedding(open_clip.tokenize("a photo of a"))[0, 1:5]
    assert m.n_ctx == 4 and m.prompt_template == "X X X X {}."
    torch.testing.assert_close(m.ctx.detach(), want, rtol=0, atol=0)


def test_tcp_default_block_is_the_references(make_openclip) -> None:
    """Built without ``insert_layer``, TCP puts the class-aware tokens in front of block 8, the reference's
    ``layers=[8]`` (trainers/clip_text/model.py L268): the same text features as ``insert_layer=8`` spelled
    out, and not those of block 9 (a 10-block text tower, so that both blocks exist)."""
    clip = load_clip(make_openclip(text_cfg=dict(layers=10, width=32, heads=2)))
    feats = {}
    for kw in ({}, {"insert_layer": 8}, {"insert_layer": 9}):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            m = TCP(clip, CLASSNAMES, **kw)
        with torch.no_grad():
            m.meta_net.linear2.bias.normal_(
                0, 1, generator=torch.Generator().manual_seed(1)
            )  # tokens that show
            feats[kw.get("insert_layer")] = m.text_features()
    torch.testing.assert_close(feats[None], feats[8], rtol=0, atol=0)
    assert (feats[9] - feats[8]).abs().max() > 1e-3
