"""CoCoOp, batched, against the reference per-image formulation.

``RefCoCoOp`` below transcribes KaiyangZhou/CoOp ``trainers/cocoop.py`` (TextEncoder L39-59,
PromptLearner L62-161, CustomCLIP L164-194): the image features normalised, the meta-net
Linear -> ReLU -> Linear bias added to every context token, then a Python loop over the images, each
running all C prompts of 77 tokens through the text transformer with its causal mask, EOT feature at
``tokenized_prompts.argmax(-1)``. It builds its own context and meta-net and loads copies of
promptlab's learned tensors into them; its backbone is a fresh open_clip model holding a copy of the
tiny CLIP's weights (``ref_openclip``). Nothing of promptlab runs on the reference side.
"""

from __future__ import annotations

from collections import OrderedDict

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.methods import CoCoOp

# Names of different token lengths, with underscores (replaced by spaces, as the reference does).
CLASSNAMES = ["cat", "sea_lion", "Yorkshire_terrier", "a very long class name with many words", "dog"]


class RefCoCoOp(nn.Module):
    """PromptLearner + CustomCLIP of the reference (fp32), on its own copy of the backbone."""

    def __init__(self, clip_model: nn.Module, classnames: list[str], n_ctx: int, ctx_init: str):
        super().__init__()
        self.clip_model = clip_model
        ctx_dim = clip_model.ln_final.weight.shape[0]
        vis_dim = clip_model.visual.output_dim
        if ctx_init:  # cocoop.py L75-83
            ctx_init = ctx_init.replace("_", " ")
            n_ctx = len(ctx_init.split(" "))
            with torch.no_grad():
                embedding = clip_model.token_embedding(open_clip.tokenize(ctx_init))
            ctx_vectors = embedding[0, 1 : 1 + n_ctx, :].clone()
            prompt_prefix = ctx_init
        else:  # L84-88
            ctx_vectors = torch.empty(n_ctx, ctx_dim)
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx_vectors)
        self.meta_net = nn.Sequential(  # L95-99
            OrderedDict(
                [
                    ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
                ]
            )
        )
        classnames = [name.replace("_", " ") for name in classnames]  # L104-120
        prompts = [prompt_prefix + " " + name + "." for name in classnames]
        self.tokenized_prompts = torch.cat([open_clip.tokenize(p) for p in prompts])  # [C, 77]
        with torch.no_grad():
            embedding = clip_model.token_embedding(self.tokenized_prompts)
        self.token_prefix = embedding[:, :1, :]  # SOS
        self.token_suffix = embedding[:, 1 + n_ctx :, :]  # CLS, EOS
        self.n_cls, self.n_ctx = len(classnames), n_ctx

    def prompts(self, im_features: torch.Tensor) -> torch.Tensor:
        """PromptLearner.forward (L144-161): [B, C, 77, W]."""
        bias = self.meta_net(im_features).unsqueeze(1)  # [B, 1, W]
        ctx_shifted = self.ctx.unsqueeze(0) + bias  # [B, n_ctx, W]
        out = []
        for ctx_shifted_i in ctx_shifted:
            ctx_i = ctx_shifted_i.unsqueeze(0).expand(self.n_cls, -1, -1)
            out.append(torch.cat([self.token_prefix, ctx_i, self.token_suffix], dim=1))
        return torch.stack(out)

    def text_encoder(self, prompts: torch.Tensor) -> torch.Tensor:
        """TextEncoder.forward (L48-59), with the backbone's causal mask."""
        m = self.clip_model
        x = prompts + m.positional_embedding
        batch_first = getattr(m.transformer, "batch_first", True)
        x = x if batch_first else x.permute(1, 0, 2)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = x if batch_first else x.permute(1, 0, 2)
        x = m.ln_final(x)
        return x[torch.arange(x.shape[0]), self.tokenized_prompts.argmax(dim=-1)] @ m.text_projection

    def forward_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """CustomCLIP.forward (L174-194) from the image encoder's output on: [B, C] logits."""
        logit_scale = self.clip_model.logit_scale.exp()
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        logits = []
        for pts_i, imf_i in zip(self.prompts(image_features), image_features):
            text_features = self.text_encoder(pts_i)
            text_features = text_features / text_features.norm(dim=-1, keepdim=True)
            logits.append(logit_scale * imf_i @ text_features.t())
        return torch.stack(logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.clip_model.visual(images))


def _module(clip: FrozenCLIP, ctx_init: str = "a photo of a") -> CoCoOp:
    torch.manual_seed(0)
    m = CoCoOp(clip, CLASSNAMES, ctx_init=ctx_init)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the context off its initialisation and make the bias large enough to matter
        m.ctx.add_(0.1 * torch.randn(m.ctx.shape, generator=g))
        for p in m.meta_net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _reference(model: nn.Module, m: CoCoOp, ctx_init: str) -> RefCoCoOp:
    """The reference, its learned tensors loaded from copies of promptlab's (names as the reference's)."""
    ref = RefCoCoOp(model, CLASSNAMES, n_ctx=4, ctx_init=ctx_init)
    state = {k: v.detach().clone() for k, v in m.prompt_state_dict().items()}
    ref.load_state_dict(state, strict=False)  # strict=False: the backbone copy is not in the prompt state
    assert set(state) == {n for n, _ in ref.named_parameters() if not n.startswith("clip_model.")}
    return ref


@pytest.mark.parametrize("ctx_init", ["a photo of a", ""])
def test_logits_and_grads_equal_reference_loop(
    tiny_clip: FrozenCLIP, ref_openclip: nn.Module, ctx_init: str
) -> None:
    m = _module(tiny_clip, ctx_init)
    ref_m = _reference(ref_openclip, m, ctx_init)
    feats = torch.randn(6, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])

    ours = m(image_features=feats)
    ref = ref_m.forward_features(feats)
    assert ours.shape == (6, len(CLASSNAMES))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ours.std() > 1e-2  # logits that differ between classes: the comparison is not vacuous

    names = ["ctx", *(f"meta_net.{k}" for k, _ in m.meta_net.named_parameters())]
    g_ours = torch.autograd.grad(m.loss(ours, labels), [m.get_parameter(n) for n in names])
    g_ref = torch.autograd.grad(F.cross_entropy(ref, labels), [ref_m.get_parameter(n) for n in names])
    for a, b in zip(g_ours, g_ref):
        assert b.abs().max() > 1e-6
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_initial_context_equals_reference(tiny_clip: FrozenCLIP, ref_openclip: nn.Module) -> None:
    """Before training, the word-initialised context is the reference's (cocoop.py L75-83)."""
    m = CoCoOp(tiny_clip, CLASSNAMES, ctx_init="a_photo of a")
    ref = RefCoCoOp(ref_openclip, CLASSNAMES, n_ctx=16, ctx_init="a_photo of a")
    assert m.n_ctx == ref.n_ctx == 4
    torch.testing.assert_close(m.ctx.detach(), ref.ctx.detach(), atol=0, rtol=0)


def test_from_images_equals_reference(
    tiny_clip: FrozenCLIP, ref_openclip: nn.Module, images: torch.Tensor
) -> None:
    """End to end from pixels: the reference's image encoder is open_clip's own ``visual``."""
    m = _module(tiny_clip)
    ref_m = _reference(ref_openclip, m, "a photo of a")
    with torch.no_grad():
        torch.testing.assert_close(m(images), ref_m(images), atol=1e-5, rtol=1e-5)


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
