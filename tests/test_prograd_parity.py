"""ProGrad against its reference computation, BeierZhu/Prompt-align (identical copies in htyao89/KgCoOp and
htyao89/Textual-based_Class-aware_prompt_tuning).

The reference side re-states ``ProGrad.public/trainers/prograd.py`` (PromptLearner L66-198 with
``CTX_INIT: True``, CustomCLIP L252-277, the zero-shot ``CLIP`` L220-249, ProGradLoss L280-293) and
``Dassl.ProGrad.pytorch/dassl/engine/trainer.py`` ``prograd_backward_and_update`` L311-349, on a fresh
open_clip model holding a copy of the tiny CLIP's weights (``ref_openclip``), with its own context
tensor loaded from a copy of promptlab's. Nothing of promptlab runs on the reference side.
"""

from __future__ import annotations

import copy
import warnings

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.methods import ProGrad
from promptlab.methods.prograd import project_conflicting

CLASSNAMES = ["cat", "sea_lion", "a very long class name with many words"]
PETS = "a type of pet, a photo of a {}."  # ProGrad's CUSTOM_TEMPLATES["OxfordPets"] (L202)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads cost more than they save


def ref_project(a_grad: torch.Tensor, b_grad: torch.Tensor, lambda_: float) -> tuple[torch.Tensor, bool]:
    """trainer.py ``prograd_backward_and_update`` L336-345 for one parameter: ``a_grad`` (the CE gradient)
    less ``lambda_`` times its component along ``b_grad`` (the KL gradient) when their cosine is negative.
    Returns (the gradient stepped, whether it was projected)."""
    b_grad_norm = b_grad / torch.linalg.norm(b_grad)
    a_grad_norm = a_grad / torch.linalg.norm(a_grad)
    if torch.dot(a_grad_norm.flatten(), b_grad_norm.flatten()) < 0:
        return a_grad - lambda_ * torch.dot(a_grad.flatten(), b_grad_norm.flatten()) * b_grad_norm, True
    return a_grad, False


class RefProGrad(nn.Module):
    def __init__(
        self, model: nn.Module, classnames: list[str], n_ctx: int, template: str, ctx_init: bool = True
    ):
        super().__init__()
        self.model = model
        ctx_dim = model.ln_final.weight.shape[0]
        # PromptLearner.__init__ L78-95 (CTX_INIT True): the template's words, right-aligned in zeros
        if ctx_init:
            ctx_init = template.replace(" {}.", "").replace("_", " ")
            prompt_n_ctx = len(ctx_init.split(" "))
            assert n_ctx >= prompt_n_ctx
            with torch.no_grad():
                embedding = model.token_embedding(open_clip.tokenize(ctx_init))
            ctx_vectors = torch.zeros(n_ctx, ctx_dim)
            ctx_vectors[n_ctx - prompt_n_ctx :, :] = embedding[0, 1 : 1 + prompt_n_ctx, :]
            prompt_prefix = " ".join(["X"] * (n_ctx - prompt_n_ctx))
            prompt_prefix = f"{prompt_prefix} {ctx_init}"
        else:  # L96-105: random initialisation of a generic context behind "X X ... X"
            ctx_vectors = torch.empty(n_ctx, ctx_dim)
            nn.init.normal_(ctx_vectors, std=0.02)
            prompt_prefix = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(ctx_vectors)
        names = [name.replace("_", " ") for name in classnames]
        prompts = [prompt_prefix + " " + name + "." for name in names]  # L112-116
        self.tokenized_prompts = torch.cat([open_clip.tokenize(p) for p in prompts])
        with torch.no_grad():
            embedding = model.token_embedding(self.tokenized_prompts)
        self.token_prefix = embedding[:, :1, :]  # L124-126
        self.token_suffix = embedding[:, 1 + n_ctx :, :]
        self.n_cls = len(names)
        # the zero-shot CLIP (L220-237): fp32 model, the same template, normalised text features
        zs = torch.cat([open_clip.tokenize(template.format(c.replace("_", " "))) for c in classnames])
        with torch.no_grad():
            t = model.encode_text(zs)
            self.zs_text = t / t.norm(dim=-1, keepdim=True)

    def text_features(self) -> torch.Tensor:
        """PromptLearner.forward ("end", L134-150) + TextEncoder.forward (L51-63)."""
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        x = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        x = x + self.model.positional_embedding
        x = self.model.transformer(x, attn_mask=self.model.attn_mask)
        x = self.model.ln_final(x)
        return x[torch.arange(x.shape[0]), self.tokenized_prompts.argmax(dim=-1)] @ self.model.text_projection

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """CustomCLIP.forward L262-277."""
        image_features = self.model.encode_image(image)
        text_features = self.text_features()
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * image_features @ text_features.t()

    def zs_logits(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP.forward L240-249."""
        image_features = self.model.encode_image(image)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * image_features @ self.zs_text.t()

    def step_gradient(
        self, image: torch.Tensor, label: torch.Tensor, lambda_: float = 1.0, T: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """forward_backward L375-383 + ProGradLoss L285-293 + prograd_backward_and_update L311-349, up to
        the optimizer step: returns (xe_loss, kl_loss, the gradient stepped, whether it was projected)."""
        output = self.logits(image)
        with torch.no_grad():
            zs_clip_output = self.zs_logits(image)
        xe_loss = F.cross_entropy(output, label)
        tea_prob = F.softmax(zs_clip_output.detach() / T, dim=-1)
        kl_loss = -tea_prob * F.log_softmax(output / T, -1) * T * T
        kl_loss = kl_loss.sum(1).mean()
        self.ctx.grad = None
        kl_loss.backward(retain_graph=True)
        b_grad = self.ctx.grad.clone()
        self.ctx.grad = None
        xe_loss.backward()
        self.ctx.grad, projected = ref_project(self.ctx.grad.clone(), b_grad, lambda_)
        return xe_loss.detach(), kl_loss.detach(), self.ctx.grad.clone(), projected


@pytest.mark.parametrize(
    "template,ctx_init,lam,T",
    [
        (PETS, True, 1.0, 1.0),  # the reference scripts' LOSS.LAMBDA and LOSS.T
        ("a texture_of {}.", True, 0.8, 2.0),  # the paper's lambda 0.8; an underscore in the words (L81)
        (PETS, False, 0.8, 2.0),  # CTX_INIT False: N(0, 0.02) behind "X X ... X" (L96-105)
    ],
)
def test_prograd_equals_reference(
    tiny_clip: FrozenCLIP,
    ref_openclip: nn.Module,
    images: torch.Tensor,
    template: str,
    ctx_init: bool,
    lam: float,
    T: float,
) -> None:
    """Initial context, logits, both losses and the stepped gradient, in both branches of the projection;
    a temperature and a lambda other than 1 so that a misplaced T or a dropped lambda shows."""
    m = ProGrad(tiny_clip, CLASSNAMES, n_ctx=16, ctx_init=ctx_init, lam=lam, temperature=T, template=template)
    ref = RefProGrad(ref_openclip, CLASSNAMES, n_ctx=16, template=template, ctx_init=ctx_init)
    if ctx_init:
        # the initial context (zero rows, then the template's words) and the text features (PETS: its last
        # "a" stays a fixed word after the 16 slots) are the reference's
        torch.testing.assert_close(m.ctx.detach(), ref.ctx.detach(), atol=0, rtol=0)
        words = len(template.replace(" {}.", "").replace("_", " ").split(" "))
        assert m.ctx[: 16 - words].abs().max() == 0 and m.ctx[16 - words :].abs().min() > 0
    else:
        assert m.ctx.shape == ref.ctx.shape and 0.015 < float(m.ctx.detach().std()) < 0.025
        with torch.no_grad():
            ref.ctx.copy_(m.ctx)
    torch.testing.assert_close(m.text_features(), ref.text_features(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        m.ctx.add_(0.3 * torch.randn(m.ctx.shape, generator=torch.Generator().manual_seed(3)))
        ref.ctx.copy_(m.ctx)
    outcomes = set()
    for labels in ([0, 1, 2], [2, 2, 0], [1, 0, 1], [2, 0, 0], [0, 0, 0], [1, 1, 1], [2, 2, 2]):
        labels = torch.tensor(labels)
        m.ctx.grad = None
        logits = m(images)
        torch.testing.assert_close(logits, ref.logits(images), atol=1e-5, rtol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. torch's "implicit dimension choice for softmax"
            xe = m.loss(logits, labels)
        kl = m._step_kl.detach()
        m.backward(xe)
        ref_xe, ref_kl, ref_grad, projected = ref.step_gradient(images, labels, lambda_=lam, T=T)
        torch.testing.assert_close(xe.detach(), ref_xe, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(kl, ref_kl, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m.ctx.grad, ref_grad, atol=1e-5 * float(ref_grad.abs().max()), rtol=1e-4)
        plain = torch.autograd.grad(F.cross_entropy(m(images), labels), m.ctx)[0]
        assert torch.allclose(m.ctx.grad, plain, atol=1e-7) != projected  # projected iff it changed
        outcomes.add(projected)
    assert outcomes == {True, False}  # both branches of the reference were exercised


def test_prograd_hook_adds_to_accumulated_gradients(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    """Under gradient accumulation each micro-batch's projected gradient is added, never overwritten,
    and the scale the engine puts on the loss (1 / accum, fp16 loss scaling) scales the result."""
    m = ProGrad(tiny_clip, CLASSNAMES, n_ctx=6, template="a photo of a {}.")
    labels = torch.tensor([2, 0, 1])

    def grad_of(scale: float) -> torch.Tensor:
        m.ctx.grad = None
        m.backward(scale * m.loss(m(images), labels))
        return m.ctx.grad.clone()

    one = grad_of(1.0)
    torch.testing.assert_close(grad_of(0.25), 0.25 * one, atol=1e-7, rtol=1e-5)
    m.ctx.grad = one.clone()
    m.backward(m.loss(m(images), labels))
    torch.testing.assert_close(m.ctx.grad, 2 * one, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "template,words", [("a photo of a {}.", 4), ("a centered satellite photo of {}.", 5), (PETS, 8)]
)
def test_prograd_context_from_the_template_words(tiny_clip: FrozenCLIP, template: str, words: int) -> None:
    m = ProGrad(tiny_clip, CLASSNAMES, n_ctx=16, template=template)
    assert m.ctx[: 16 - words].abs().max() == 0 and m.ctx[16 - words :].abs().min() > 0
    exact = ProGrad(tiny_clip, CLASSNAMES, n_ctx=words, template=template)  # as many slots as words: no zeros
    assert exact.ctx.abs().min() > 0 and exact.prefix.strip() == template.replace(" {}.", "")
    with pytest.raises(ValueError, match="fewer than"):
        ProGrad(tiny_clip, CLASSNAMES, n_ctx=3, template=template)
    assert ProGrad(tiny_clip, CLASSNAMES, n_ctx=4, ctx_init=False).ctx.abs().min() > 0


def test_project_conflicting_edge_cases() -> None:
    """The default lambda removes the whole conflicting component; in fp16 (``reference_fp16`` steps fp16
    gradients, loss-scaled or tiny) the decision depends on the angle only; a positive angle below fp32
    resolution is not a conflict, and a tensor that does not conflict is returned untouched."""
    gen = torch.Generator().manual_seed(0)
    general = torch.randn(4, 8, generator=gen)
    g = torch.randn(4, 8, generator=gen)
    g = -g if float(g.flatten() @ general.flatten()) > 0 else g  # cos(g, general) < 0
    assert float(g.flatten() @ general.flatten()) < -1e-3 * float(g.norm() * general.norm())
    full = project_conflicting(g, general)
    assert abs(float(full.flatten() @ general.flatten())) < 1e-5 * float(g.norm() * general.norm())
    torch.testing.assert_close(
        full.double(), ref_project(g.double(), general.double(), 1.0)[0], atol=1e-6, rtol=1e-5
    )
    for scale in (1e-4, 1.0, 1e2):  # |g| * |g| would leave fp16's range at both ends
        gh, want = (scale * g).half(), ref_project((scale * g).double(), general.double(), 0.8)[0]
        got = project_conflicting(gh, general.half(), 0.8)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.double(), want, atol=1e-2 * scale, rtol=1e-2)
    # cos = 1e-50 > 0 mathematically, 0 in fp32: no projection, the tiny component along general stays
    g = torch.tensor([1e15, 1e-35])
    out = project_conflicting(g, torch.tensor([0.0, 1.0]))
    assert out is g and float(out[1]) == float(torch.tensor(1e-35))


def test_prograd_loss_and_backward_outside_a_training_step(
    tiny_clip: FrozenCLIP, images: torch.Tensor
) -> None:
    """loss() needs the image features of a training forward pass (not one without gradient, nor none at
    all) and says so; backward() of a loss that did not come from loss() (no KL term of this step) is
    the plain backward."""
    labels = torch.tensor([2, 0, 1])
    m = ProGrad(tiny_clip, CLASSNAMES, n_ctx=6, template="a photo of a {}.")
    msg = r"^ProGrad\.loss\(\) follows a training forward pass \(it needs its image features\)$"
    with pytest.raises(RuntimeError, match=msg):
        m.loss(torch.zeros(3, 3), labels)  # nothing run yet
    with torch.no_grad():
        logits = m(images)
    with pytest.raises(RuntimeError, match=msg):
        m.loss(logits, labels)
    fresh = ProGrad(tiny_clip, CLASSNAMES, n_ctx=6, template="a photo of a {}.")
    ce = F.cross_entropy(fresh(images), labels)
    want = torch.autograd.grad(ce, fresh.ctx, retain_graph=True)[0]
    fresh.backward(ce)
    torch.testing.assert_close(fresh.ctx.grad, want, atol=0, rtol=0)


def test_prograd_projects_each_trainable_tensor(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    """With backbone parts made trainable (FrozenCLIP.unfreeze) each tensor's gradient is projected on its
    own KL gradient, as the reference's loop over parameters (trainer.py L333-345), and a trainable tensor
    the step does not reach (the token-embedding table: the prompts are embedded once) gets no gradient
    while those after it still get theirs. A term of the stepped loss that the KL does not reach (a
    regulariser a subclass adds to loss(), here on the image projection) keeps its plain gradient."""
    clip = copy.deepcopy(tiny_clip)
    clip.unfreeze(["model.visual.proj", "model.token_embedding", "model.ln_final"])
    m = ProGrad(clip, CLASSNAMES, n_ctx=6, lam=0.8, template="a photo of a {}.")
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names == [
        "ctx",
        "clip.model.visual.proj",
        "clip.model.token_embedding.weight",
        "clip.model.ln_final.weight",
        "clip.model.ln_final.bias",
    ]
    with torch.no_grad():
        m.ctx.add_(0.3 * torch.randn(m.ctx.shape, generator=torch.Generator().manual_seed(3)))
    labels = torch.tensor([2, 2, 0])
    logits = m(images)
    teacher = F.softmax(m.teacher_logits(m.encode_image(images)), dim=-1)
    kl = (-teacher * F.log_softmax(logits, dim=-1)).sum(1).mean()
    used = [m.ctx, clip.model.ln_final.weight, clip.model.ln_final.bias]
    g_kl = torch.autograd.grad(kl, used, retain_graph=True)
    g_ce = torch.autograd.grad(F.cross_entropy(logits, labels), used, retain_graph=True)
    proj = clip.model.visual.proj
    m.backward(m.loss(logits, labels) + 0.5 * proj.square().sum())
    assert clip.model.token_embedding.weight.grad is None
    torch.testing.assert_close(proj.grad, proj.detach(), atol=0, rtol=0)
    projected = 0
    for p, a, b in zip(used, g_ce, g_kl):
        want = ref_project(a.double(), b.double(), 0.8)[0]
        projected += not torch.allclose(want, a.double())
        torch.testing.assert_close(p.grad.double(), want, atol=1e-6 * float(want.abs().max()), rtol=1e-4)
    assert 0 < projected  # the check sees a projection
