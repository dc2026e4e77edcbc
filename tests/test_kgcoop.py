"""KgCoOp's knowledge-guided term against a hand computation (htyao89/KgCoOp ``trainers/kgcoop.py``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from promptlab.clip import FrozenCLIP
from promptlab.methods import KgCoOp
from promptlab.runner import dataset_kwargs

CLASSNAMES = ["cat", "sea_lion", "Yorkshire_terrier", "golden retriever"]
PETS = "a photo of a {}, a type of pet."


def _hand(clip: FrozenCLIP, template: str) -> torch.Tensor:
    """The reference: clip_model.encode_text of the filled template, divided by its norm."""
    with torch.no_grad():
        t = clip.model.encode_text(clip.tokenize([template.format(c.replace("_", " ")) for c in CLASSNAMES]))
    return t / t.norm(dim=-1, keepdim=True)


def _perturbed(clip: FrozenCLIP, **kw) -> KgCoOp:
    m = KgCoOp(clip, CLASSNAMES, template=PETS, **kw)
    with torch.no_grad():
        m.ctx.add_(0.3 * torch.randn(m.ctx.shape, generator=torch.Generator().manual_seed(0)))
    return m


def test_hand_features_are_the_dataset_template(tiny_clip: FrozenCLIP) -> None:
    m = KgCoOp(tiny_clip, CLASSNAMES, template=PETS)
    torch.testing.assert_close(m._hand, _hand(tiny_clip, PETS), atol=1e-5, rtol=0)
    assert "_hand" not in m.state_dict() and "_hand" not in m.prompt_state_dict()  # never saved
    m.set_classnames(["airliner", "fire_truck"])  # recomputed for the new classes
    with torch.no_grad():
        t = tiny_clip.model.encode_text(
            tiny_clip.tokenize([PETS.format("airliner"), PETS.format("fire truck")])
        )
    torch.testing.assert_close(m._hand, F.normalize(t, dim=-1), atol=1e-5, rtol=0)


def test_loss_equals_hand_computation(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    m = _perturbed(tiny_clip, w=8.0)
    labels = torch.tensor([0, 3, 1])
    logits = m(images)
    loss = m.loss(logits, labels)

    txt = m.text_features().detach()  # [C, D]
    txt = txt / txt.norm(dim=-1, keepdim=True)
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-07)(txt, _hand(tiny_clip, PETS))
    term = 1.0 - cos.mean()
    expected = F.cross_entropy(logits.detach(), labels) + 8.0 * term
    assert term > 1e-3  # a perturbed context is away from the hand-crafted features
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.knowledge_loss().detach(), term, atol=1e-6, rtol=0)
    loss.backward()
    assert m.ctx.grad is not None and m.ctx.grad.abs().max() > 0


def test_term_vanishes_when_prompt_is_the_template(tiny_clip: FrozenCLIP) -> None:
    """Context "a photo of a" before "{class}." is exactly the template "a photo of a {}.": cos = 1."""
    m = KgCoOp(tiny_clip, CLASSNAMES, ctx_init="a photo of a", template="a photo of a {}.")
    with torch.no_grad():
        assert abs(float(m.knowledge_loss())) < 1e-6
    m_pets = KgCoOp(tiny_clip, CLASSNAMES, template=PETS)
    with torch.no_grad():
        assert float(m_pets.knowledge_loss()) > 1e-4  # a different template: not zero


def test_weight_scales_the_term_and_text_pass_is_reused(
    tiny_clip: FrozenCLIP, images: torch.Tensor, monkeypatch
) -> None:
    labels = torch.tensor([0, 1, 2])
    losses, ces = {}, {}
    for w in (0.0, 8.0):
        m = _perturbed(tiny_clip, w=w)
        calls = []
        real = m.text_features
        monkeypatch.setattr(m, "text_features", lambda real=real, calls=calls: calls.append(1) or real())
        logits = m(images)
        losses[w] = m.loss(logits, labels)
        assert len(calls) == 1, "loss() must reuse the forward pass's text features"
        ces[w] = F.cross_entropy(logits, labels)
    torch.testing.assert_close(losses[0.0], ces[0.0])
    torch.testing.assert_close(ces[8.0], ces[0.0])  # same context: same logits, only the term differs
    assert losses[8.0] > losses[0.0] + 1e-3


def test_template_ensemble(tiny_clip: FrozenCLIP) -> None:
    templates = [PETS, "a blurry photo of a {}.", "{} texture."]
    m = KgCoOp(tiny_clip, CLASSNAMES, templates=templates)
    expected = F.normalize(torch.stack([_hand(tiny_clip, t) for t in templates]).mean(0), dim=-1)
    torch.testing.assert_close(m._hand, expected, atol=1e-5, rtol=0)


def test_runner_fills_the_dataset_template() -> None:
    ds = SimpleNamespace(template=PETS, name="oxford_pets")
    assert dataset_kwargs(KgCoOp, OmegaConf.create({"w": 8.0}), ds) == {"template": PETS}
    assert dataset_kwargs(KgCoOp, OmegaConf.create({"template": "{} x."}), ds) == {}  # the recipe wins


def test_recipe_uses_the_references_template_per_dataset(tiny_clip: FrozenCLIP) -> None:
    """htyao89/KgCoOp trainers/kgcoop.py L37-54 (CUSTOM_TEMPLATES): DTD's target is "a photo of a {}, a type
    of texture.", not CoOp's "{} texture."; every other benchmark dataset uses its CoOp template."""
    from promptlab.config import load_recipe
    from promptlab.data import get_spec
    from promptlab.runner import build_method
    from promptlab.sweep import BENCHMARK_DATASETS

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "base2new" / "kgcoop_vit_b16.yaml"
    reference = {"dtd": "a photo of a {}, a type of texture."}
    for name in BENCHMARK_DATASETS:
        cfg = load_recipe(recipe, [f"data.name={name}"], check_paths=False)
        spec = get_spec(name)
        ds = SimpleNamespace(template=spec.template, name=name, classnames=CLASSNAMES)
        m = build_method(cfg, tiny_clip, ds)
        expected = reference.get(name, spec.template)
        assert m.templates == [expected], name
    assert get_spec("dtd").template == "{} texture."  # the dataset keeps CoOp's template (zero-shot CLIP)
    torch.testing.assert_close(m._hand, _hand(tiny_clip, expected), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- independent reference
class RefKgCoOp(torch.nn.Module):
    """htyao89/KgCoOp ``KgCoOp/trainers/kgcoop.py`` as it runs for base-to-new, re-stated on a *copy* of
    the CLIP weights with open_clip's own modules (none of promptlab's prompt or encoding code).

    - PromptLearner.__init__ (L94-104, 127-129, 159-166): context = token embeddings of "a photo of a"
      (4 tokens); prompts "a photo of a {name}." tokenized to 77; SOS prefix / suffix buffers.
    - Hand-crafted target (L136-146): ``encode_text`` of ``CUSTOM_TEMPLATES[dataset].format(name)``,
      divided by its norm, under no_grad.
    - TextEncoder.forward (L68-79) and CustomCLIP.forward (L223-243): logits = exp(logit_scale) *
      cos(image, text); score = 1 - mean CosineSimilarity(dim=1, eps=1e-07)(text, target).
    - forward_backward (L309-311): loss = cross_entropy(output, label) + W * score.
    """

    def __init__(self, model: torch.nn.Module, classnames: list[str], template: str, w: float):
        super().__init__()
        import copy

        import open_clip

        self.model, self.w = copy.deepcopy(model).requires_grad_(False), w
        prompt = open_clip.tokenize("a photo of a")
        with torch.no_grad():
            self.ctx = torch.nn.Parameter(self.model.token_embedding(prompt)[0, 1:5, :].clone())
        names = [c.replace("_", " ") for c in classnames]
        self.tokenized = torch.cat([open_clip.tokenize("a photo of a " + n + ".") for n in names])
        with torch.no_grad():
            emb = self.model.token_embedding(self.tokenized)
            hand = self.model.encode_text(torch.cat([open_clip.tokenize(template.format(n)) for n in names]))
        self.prefix, self.suffix = emb[:, :1, :], emb[:, 5:, :]
        self.hand = hand / hand.norm(dim=-1, keepdim=True)

    def text_encoder(self, prompts: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = prompts + m.positional_embedding
        if not getattr(m.transformer, "batch_first", True):
            x = x.permute(1, 0, 2)
        x = m.transformer(x, attn_mask=m.attn_mask)
        if not getattr(m.transformer, "batch_first", True):
            x = x.permute(1, 0, 2)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0]), self.tokenized.argmax(dim=-1)]
        return x @ m.text_projection

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        text = self.text_encoder(torch.cat([self.prefix, ctx, self.suffix], dim=1))
        image = self.model.visual(images)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        logits = self.model.logit_scale.exp() * image @ text.t()
        score = 1.0 - torch.mean(torch.nn.CosineSimilarity(dim=1, eps=1e-07)(text, self.hand))
        return F.cross_entropy(logits, labels) + self.w * score


@pytest.mark.parametrize("w", [8.0, 1.0])
def test_loss_and_gradient_match_the_reference(tiny_clip: FrozenCLIP, images: torch.Tensor, w: float) -> None:
    """Value and context gradient of the whole loss against the reference from copied weights. The
    knowledge term's own gradient is checked too: cross-entropy alone cannot pass for it."""
    m = _perturbed(tiny_clip, w=w)
    ref = RefKgCoOp(tiny_clip.model, CLASSNAMES, PETS, w)
    with torch.no_grad():
        ref.ctx.copy_(m.ctx)  # the same perturbed context
    labels = torch.tensor([0, 3, 1])
    loss = m.loss(m(images), labels)
    loss.backward()
    ref_loss = ref(images, labels)
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.ctx.grad, ref.ctx.grad, atol=1e-6, rtol=1e-4)

    # the regulariser's gradient alone: reference loss with W and with W = 0, the difference
    ref.zero_grad()
    ref.w = 0.0
    ref(images, labels).backward()
    term_grad = m.ctx.grad - ref.ctx.grad  # [n_ctx, W]: w * d(score)/d(ctx)
    assert term_grad.norm() > 1e-3 * m.ctx.grad.norm()  # a real contribution
    m.ctx.grad = None
    (w * m.knowledge_loss()).backward()
    torch.testing.assert_close(m.ctx.grad, term_grad, atol=1e-6, rtol=1e-4)


def test_knowledge_term_is_fp16_under_reference_fp16(images: torch.Tensor) -> None:
    """Under PREC=fp16 the reference's prompt features and its hand-crafted ones both come out of fp16
    CLIPs (htyao89/KgCoOp trainers/kgcoop.py L132-143, L229-241): the score is an fp16 number, and so is
    the whole loss (L310), not an fp32 promotion of it."""
    from promptlab.backbones import load_clip

    m = KgCoOp(load_clip("tiny", precision="reference_fp16"), CLASSNAMES, template=PETS)
    m.match_backbone_precision()
    term = m.knowledge_loss()
    assert term.dtype == torch.float16 and 0 < float(term.detach()) < 1
    assert m.loss(m(images), torch.tensor([0, 3, 1])).dtype == torch.float16


def test_knowledge_term_is_the_references_formula_in_float64(tiny_clip: FrozenCLIP, monkeypatch) -> None:
    """In float64, where rounding cannot hide a 1e-7 change, the term is exactly the reference's
    ``1 - mean(CosineSimilarity(dim=1, eps=1e-07)(t / |t|, hand))`` (trainers/kgcoop.py L238-241)."""
    monkeypatch.setattr(KgCoOp, "head_dtype", property(lambda self: torch.float64))
    m = KgCoOp(tiny_clip, CLASSNAMES, template=PETS)
    hand = m._hand.double()  # [C, D], normalised
    g = torch.Generator().manual_seed(3)
    for t in (hand, 7.0 * (hand + 0.05 * torch.randn(hand.shape, generator=g, dtype=torch.float64))):
        cos = torch.nn.CosineSimilarity(dim=1, eps=1e-07)(t / t.norm(dim=-1, keepdim=True), hand)
        assert abs(float(m.knowledge_loss(t)) - float(1.0 - torch.mean(cos))) < 1e-12
    assert abs(float(m.knowledge_loss(hand))) < 1e-12  # the template itself: cos = 1, the term vanishes
