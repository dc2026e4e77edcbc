"""One battery over every registered method (``promptlab.methods.METHODS``): a new method is tested
here for free. Methods are built with their default hyperparameters; a method whose ``__init__`` has
required extra arguments gets them from ``EXTRA_KWARGS``."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from promptlab.backbones import load_clip
from promptlab.clip import FrozenCLIP
from promptlab.methods import METHODS, CoOp
from promptlab.prompts import FitData, PromptModule

CLASSNAMES = ["cat", "sea_lion", "Yorkshire_terrier", "golden retriever"]
OTHER_CLASSNAMES = ["airliner", "fire_truck"]

#: Required arguments of methods that have some (beyond clip and classnames). Keep it small.
EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    # the tiny CLIP has 2 blocks per tower: the papers' depths (9, 12) are refused there
    "ivlp": {"prompt_depth_text": 2, "prompt_depth_vision": 2},
    "maple": {"prompt_depth": 2},
    "vificlip": {"prompt_depth_text": 2, "prompt_depth_vision": 2},  # prompt stage (the default)
    "tcp": {"insert_layer": 1},
    "promptsrc": {"prompt_depth_text": 2, "prompt_depth_vision": 2},  # the reference's block 8 of 12
}

NAMES = sorted(METHODS)


def build(name: str, clip: FrozenCLIP, classnames=CLASSNAMES, seed: int = 0, **kw: Any) -> PromptModule:
    cls = METHODS[name]
    kwargs = {**EXTRA_KWARGS.get(name, {}), **kw}
    required = [
        p.name
        for p in list(inspect.signature(cls.__init__).parameters.values())[3:]
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    missing = [r for r in required if r not in kwargs]
    assert not missing, f"method {name!r} needs {missing}: add them to EXTRA_KWARGS in tests/test_methods.py"
    torch.manual_seed(seed)
    return cls(clip, classnames, **kwargs).eval()  # deterministic (dropout off) unless a test trains


def _fit(module: PromptModule, seed: int = 5) -> None:
    """Run a training-free method's fit on random features (a method without ``fit_features``: no-op)."""
    if module.fit_features is None:
        return
    g = torch.Generator().manual_seed(seed)
    n, d = 2 * len(module.classnames), module.clip.embed_dim
    labels = torch.arange(n) % len(module.classnames)
    feats = torch.randn(module.fit_features.views, n, d, generator=g)
    with torch.no_grad():
        module.fit(FitData(feats, labels, feats[0], labels))


def _perturb(module: PromptModule, seed: int = 7) -> None:
    """Move every learned tensor away from its initialisation (so round trips are not vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))


@pytest.fixture
def fresh_clip() -> FrozenCLIP:
    """A backbone of one's own, for tests that step an optimizer (the shared one must stay pristine)."""
    return load_clip("tiny")


def test_registry() -> None:
    assert {"coop", "zeroshot"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert issubclass(cls, PromptModule), name
        assert cls.__doc__, f"{name}: document the method (paper link)"


@pytest.mark.parametrize("name", NAMES)
def test_logits_from_images_and_features(name: str, tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    m = build(name, tiny_clip)
    B, C = images.shape[0], len(CLASSNAMES)
    logits = m(images)
    assert logits.shape == (B, C)
    assert torch.isfinite(logits).all()
    feats = m.encode_image(images)
    assert feats.shape == (B, tiny_clip.embed_dim)
    from_feats = m(image_features=feats)
    assert from_feats.shape == (B, C)
    if m.image_side_frozen:
        torch.testing.assert_close(from_feats, logits, atol=1e-6, rtol=0)
        assert not feats.requires_grad  # cacheable: no graph into the image tower
    with pytest.raises(ValueError):
        m()
    loss = m.loss(logits, torch.arange(B) % C)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_sgd_step_touches_only_learned_tensors(
    name: str, fresh_clip: FrozenCLIP, images: torch.Tensor
) -> None:
    m = build(name, fresh_clip)
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    backbone_parts = tuple(f"clip.{part}" for part in m.trainable_backbone_parts)
    for n in trainable:
        assert not n.startswith("clip.") or n.startswith(backbone_parts), f"{n}: a CLIP weight is trainable"
    if not trainable:
        # nothing to learn: no step to take, and nothing to save but what a training-free fit sets
        assert m.trainable_parameters() == []
        assert set(m.prompt_state_dict()) == set(m.fitted_state)
        return

    before = {k: v.clone() for k, v in m.state_dict(keep_vars=False).items()}
    clip_before = {k: v.clone() for k, v in fresh_clip.model.state_dict().items()}
    opt = torch.optim.SGD(m.trainable_parameters(), lr=1.0)
    labels = torch.arange(images.shape[0]) % len(CLASSNAMES)
    m.train()
    got_grad: set[str] = set()
    for _ in range(2):  # two steps: LoRA's A gets its first gradient once B (zero at init) has moved
        opt.zero_grad()
        loss = m.loss(m(images), labels)
        loss.backward()
        got_grad |= {k for k, p in trainable.items() if p.grad is not None and p.grad.abs().max() > 0}
        opt.step()

    after = m.state_dict()
    for k, v in before.items():
        if k in trainable:
            assert k in got_grad, f"{k}: no gradient"
            assert not torch.equal(after[k], v), f"{k}: trainable tensor did not move"
        elif not k.startswith(backbone_parts):  # (startswith(()) is False)
            assert torch.equal(after[k], v), f"{k} changed but is not trainable"
    for k, v in fresh_clip.model.state_dict().items():
        if not f"clip.model.{k}".startswith(backbone_parts):
            assert torch.equal(v, clip_before[k]), f"CLIP weight {k} changed"
    for n, p in fresh_clip.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"CLIP weight {n} received a gradient"
    assert not any(mod.training for mod in fresh_clip.modules())  # m.train() did not reach the backbone


@pytest.mark.parametrize("name", NAMES)
def test_reference_fp16_step(name: str, images: torch.Tensor) -> None:
    """Every method trains on the references' fp16 backbone (model.precision=reference_fp16): learned
    tensors take fp16 unless the method declares the reference keeps them fp32, and a step moves them."""
    m = build(name, load_clip("tiny", precision="reference_fp16"))
    m.match_backbone_precision()
    kept = m.fp32_in_reference
    for n, p in m.named_parameters():
        if p.requires_grad and not n.startswith("clip."):
            fp32 = any(n == k or n.startswith(k + ".") for k in kept)
            assert p.dtype == (torch.float32 if fp32 else torch.float16), n
    if not m.trainable_parameters():
        return
    before = [p.detach().clone() for p in m.trainable_parameters()]
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    m.train()
    loss = m.loss(m(images), torch.arange(images.shape[0]) % len(CLASSNAMES))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, m.trainable_parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_prompt_state_dict_round_trip(name: str, tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    m = build(name, tiny_clip, seed=0)
    _fit(m)
    _perturb(m)
    state = m.prompt_state_dict()
    learned = {n for n, p in m.named_parameters() if p.requires_grad} | set(m.fitted_state)
    assert set(state) == learned, "prompt_state_dict must hold exactly the learned tensors"
    parts = tuple(f"clip.{part}" for part in m.trainable_backbone_parts)
    assert not any(k.startswith("clip.") and not k.startswith(parts) for k in state)
    assert all(not v.requires_grad for v in state.values())

    fresh = build(name, tiny_clip, seed=1)
    with torch.no_grad():
        target = m(images)
        if state:
            assert (fresh(images) - target).abs().max() > 1e-5  # different before loading
        fresh.load_prompt_state_dict({k: v.clone() for k, v in state.items()})
        torch.testing.assert_close(fresh(images), target, atol=0, rtol=0)
    for k, v in fresh.prompt_state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_set_classnames_keeps_learned_tensors(name: str, tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    m = build(name, tiny_clip)
    _fit(m)
    _perturb(m)
    state = {k: v.clone() for k, v in m.prompt_state_dict().items()}
    assert m(images).shape == (images.shape[0], len(CLASSNAMES))
    if m.class_bound:  # what was learned belongs to its classes: other names are refused
        with pytest.raises(ValueError, match="cannot serve"):
            m.set_classnames(OTHER_CLASSNAMES)
        return
    m.set_classnames(OTHER_CLASSNAMES)
    assert m.classnames == OTHER_CLASSNAMES
    with torch.no_grad():
        logits = m(images)
    assert logits.shape == (images.shape[0], len(OTHER_CLASSNAMES))
    for k, v in m.prompt_state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed on set_classnames"
    # the same as a module built for the new classes directly, with the learned tensors loaded
    direct = build(name, tiny_clip, classnames=OTHER_CLASSNAMES, seed=3)
    direct.load_prompt_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(direct(images), logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_load_prompt_state_dict_errors(name: str, tiny_clip: FrozenCLIP) -> None:
    m = build(name, tiny_clip)
    state = m.prompt_state_dict()
    with pytest.raises(KeyError, match="bogus_tensor"):
        m.load_prompt_state_dict({**state, "bogus_tensor": torch.zeros(1)})
    for key, value in state.items():
        if key in m.fitted_state:  # shaped by fit(): loads at the saved shape (test_fit_contract)
            continue
        wrong = torch.zeros(value.shape[0] + 1, *value.shape[1:]) if value.dim() else torch.zeros(2)
        with pytest.raises(ValueError, match=key):
            m.load_prompt_state_dict({**state, key: wrong})
        without = {k: v for k, v in state.items() if k != key}
        with pytest.raises(KeyError, match=key):
            m.load_prompt_state_dict(without)


@pytest.mark.parametrize("name", NAMES)
def test_hparams_recorded(name: str, tiny_clip: FrozenCLIP) -> None:
    m = build(name, tiny_clip)
    params = list(inspect.signature(METHODS[name].__init__).parameters.values())[3:]
    expected = {p.name: p.default for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    expected.update(EXTRA_KWARGS.get(name, {}))
    assert m.hparams == expected
    # the record rebuilds the same module (what an export relies on)
    again = build(name, tiny_clip, **m.hparams)
    assert again.hparams == m.hparams
    assert {k: v.shape for k, v in again.prompt_state_dict().items()} == {
        k: v.shape for k, v in m.prompt_state_dict().items()
    }


def test_hparams_record_overrides(tiny_clip: FrozenCLIP) -> None:
    m = CoOp(tiny_clip, CLASSNAMES, n_ctx=3, csc=True, class_token_position="front")
    assert m.hparams == dict(n_ctx=3, ctx_init="", csc=True, class_token_position="front")


def test_a_method_defined_after_import_records_its_hparams(tiny_clip: FrozenCLIP) -> None:
    """Every subclass's own ``__init__`` is wrapped when the class is created (a user's method defined in a
    script too): its keyword arguments with defaults applied, ``**hparams`` merged in, clip and class
    names left out; a subclass's record is its own arguments (not those it passes up); one without an
    ``__init__`` records its parent's."""

    class Scaled(PromptModule):
        def __init__(self, clip, classnames, scale: float = 2.0, tag: str = "s", **hparams: Any):
            super().__init__(clip, classnames)
            self.scale = torch.nn.Parameter(torch.tensor(scale))

    class Deeper(Scaled):
        def __init__(self, clip, classnames, depth: int = 1):
            super().__init__(clip, classnames, scale=5.0)

    class Same(Scaled):
        pass

    assert Scaled(tiny_clip, ["a", "b"], scale=3.0, extra=1).hparams == {
        "scale": 3.0,
        "tag": "s",
        "extra": 1,
    }
    deeper = Deeper(tiny_clip, ["a", "b"])
    assert deeper.hparams == {"depth": 1} and deeper.scale.item() == 5.0
    assert deeper.classnames == ["a", "b"]  # the base records the names even without set_classnames
    assert Same(tiny_clip, ["a"], tag="t").hparams == {"scale": 2.0, "tag": "t"}


@pytest.mark.parametrize("name", NAMES)
def test_cached_text_features(name: str, tiny_clip: FrozenCLIP, images: torch.Tensor, monkeypatch) -> None:
    m = build(name, tiny_clip)
    _fit(m)
    _perturb(m)
    with torch.no_grad():
        plain = m(images)
    calls = []
    real = m.text_features
    monkeypatch.setattr(m, "text_features", lambda: calls.append(1) or real())
    with m.cached_text_features(), torch.no_grad():
        cached = m(images)
        cached_again = m(images[:1])
    # rtol: GDA's logits reach ~1e2, where a batch of 1 and a batch of 2 round the matmul differently
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(cached_again, plain[:1], atol=1e-5, rtol=1e-6)
    # a classifier made of other tensors (linear probe, caches) has no text features to cache
    cacheable = m.text_classifier and not m.text_depends_on_image
    if cacheable:
        assert len(calls) == 1, "text features must be computed once inside cached_text_features()"
    n = len(calls)
    with torch.no_grad():
        m(images)
    assert len(calls) == n + (1 if cacheable else 0), "the cache must end with the context"


def test_coop_csc_refuses_other_class_count(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    m = CoOp(tiny_clip, CLASSNAMES, n_ctx=3, csc=True)  # 3 tokens each, so the count of contexts is the 4
    ctx = m.ctx.detach().clone()
    with pytest.raises(ValueError, match=r"learned 4 contexts.*2 classes"):
        m.set_classnames(OTHER_CLASSNAMES)
    assert torch.equal(m.ctx, ctx) and m.classnames == CLASSNAMES
    assert m(images).shape == (images.shape[0], len(CLASSNAMES))  # still usable after the refusal
    renamed = ["dog", "horse", "fire_truck", "lion"]  # same count, other classes: refused too (issue 15)
    with pytest.raises(ValueError, match=r"specific to the 4 classes.*first difference"):
        m.set_classnames(renamed)
    m.set_classnames(list(CLASSNAMES))  # its own classes again: fine
    assert m(images).shape == (images.shape[0], 4) and torch.equal(m.ctx, ctx)


def test_class_bound_refusal_says_which_classes_and_the_first_difference(tiny_clip: FrozenCLIP) -> None:
    """A class-bound method refuses other names with a message naming the method, both counts and the
    first name that differs (none when one list extends the other); the first names given fix what the
    learned state belongs to, so serving a subset (where ``can_serve`` allows it) does not narrow it."""

    class Bound(PromptModule):
        class_bound = True

        def __init__(self, clip, classnames):
            super().__init__(clip, classnames)
            self.set_classnames(classnames)

    class Subsets(Bound):
        def can_serve(self, classnames: list[str], learned_for: list[str]) -> bool:
            return set(classnames) <= set(learned_for)

    m = Bound(tiny_clip, ["a", "b"])
    tail = "; evaluate it on those classes, or learn a class-independent one for transfer"
    with pytest.raises(ValueError) as e:
        m.set_classnames(["a", "x"])
    assert str(e.value) == (
        "Bound's learned state is specific to the 2 classes it was learned on and cannot serve 2 other ones"
        " (first difference: 'b' -> 'x')" + tail
    )
    with pytest.raises(ValueError) as e:
        m.set_classnames(["a", "b", "c"])
    assert str(e.value) == (
        "Bound's learned state is specific to the 2 classes it was learned on and cannot serve 3 other ones"
        + tail
    )
    assert m.classnames == ["a", "b"]
    s = Subsets(tiny_clip, ["a", "b", "c"])
    s.set_classnames(["c"])
    s.set_classnames(["a", "b", "c"])  # still the classes it was learned on
    assert s.classnames == ["a", "b", "c"]
    with pytest.raises(ValueError, match="specific to the 3 classes"):
        s.set_classnames(["a", "d"])


class _Probe(PromptModule):
    """A minimal method on the base class's defaults: one learned text feature per class."""

    def __init__(self, clip: FrozenCLIP, classnames: list[str]):
        super().__init__(clip, classnames)
        self.w = torch.nn.Parameter(torch.randn(len(classnames), clip.embed_dim))
        self.seen: list[str] = []

    def text_features(self) -> torch.Tensor:
        return self.w

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **aux: Any) -> torch.Tensor:
        self.seen = sorted(aux)
        return super().loss(logits, labels)


def test_base_training_step_forward_and_image_grad_mode(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    """The defaults a new method inherits: training_step hands the batch's inputs on to ``loss`` (MoCoOp,
    PromptSRC read them there); forward names what it needs; a method without image-independent text
    features says so; ``encode_image`` builds a graph only for a method that trains the image side and
    only where gradients are enabled (a frozen tower is computed without one even from inputs that have one)."""
    torch.manual_seed(0)
    m = _Probe(tiny_clip, ["a", "b", "c"])
    feats, labels = torch.randn(4, tiny_clip.embed_dim), torch.tensor([0, 2, 1, 2])
    logits, loss = m.training_step({"image_features": feats}, labels)
    assert m.seen == ["image_features"]
    torch.testing.assert_close(logits, m(image_features=feats))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match=r"^forward\(\) needs images or image_features$"):
        m()
    with pytest.raises(NotImplementedError, match="^PromptModule has no image-independent text features$"):
        PromptModule(tiny_clip, ["a"]).text_features()
    with pytest.raises(
        NotImplementedError, match=r"^_Probe sets fit_features but does not implement fit\(\)$"
    ):
        m.fit(FitData(feats[None], labels, feats, labels))

    class Tuned(_Probe):
        image_side_frozen = False

    x = images[:2].clone().requires_grad_(True)  # stands for a tuned image tower's graph
    assert not m.encode_image(x).requires_grad
    tuned = Tuned(tiny_clip, ["a"])
    assert tuned.encode_image(x).requires_grad
    with torch.no_grad():
        assert not tuned.encode_image(x).requires_grad


def test_load_prompt_state_dict_messages_and_kept_parameters(tiny_clip: FrozenCLIP) -> None:
    """Errors name the source, the method and the tensors at fault; a load at the module's shapes copies
    into its own tensors, fitted ones included (an optimizer built before a resume keeps stepping them)."""
    from promptlab.methods import TipAdapter

    m = _Probe(tiny_clip, ["a", "b"])
    d = tiny_clip.embed_dim
    with pytest.raises(KeyError) as e:
        m.load_prompt_state_dict({"v": torch.zeros(1)})
    assert e.value.args[0] == "state dict does not match _Probe: missing ['w'], unexpected ['v']"
    with pytest.raises(ValueError) as e:
        m.load_prompt_state_dict({"w": torch.zeros(3, d)}, source="run/last.pt")
    assert str(e.value) == (
        f"run/last.pt: 'w' has shape [3, {d}], _Probe expects [2, {d}] (different backbone width or class count?)"
    )
    tip = TipAdapter(tiny_clip, ["a", "b"], template="a photo of a {}.", views=1, search=False, finetune=True)
    feats = torch.randn(1, 4, d, generator=torch.Generator().manual_seed(0))
    tip.fit(FitData(feats, torch.tensor([0, 1, 0, 1]), feats[0], torch.tensor([0, 1, 0, 1])))
    own = dict(tip.named_parameters())
    state = {k: v + 1 for k, v in tip.prompt_state_dict().items()}
    tip.load_prompt_state_dict(state)
    assert all(p is own[n] for n, p in tip.named_parameters())
    assert all(torch.equal(v, state[k]) for k, v in tip.prompt_state_dict().items())
    for finetune in (False, True):  # an empty cache takes the saved one's shape, trained or not as before
        other = TipAdapter(tiny_clip, ["a", "b"], template="a photo of a {}.", views=1, finetune=finetune)
        other.load_prompt_state_dict(state)
        assert other.keys.shape == (4, d) and other.keys.requires_grad is finetune
        assert torch.equal(other.keys, state["keys"]) and len(other.trainable_parameters()) == int(finetune)


def test_coop_unified_context_transfers(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    m = CoOp(tiny_clip, CLASSNAMES, n_ctx=4, csc=False)
    m.set_classnames(OTHER_CLASSNAMES)
    assert m(images).shape == (images.shape[0], 2)
    with pytest.raises(ValueError, match="class_token_position"):
        CoOp(tiny_clip, CLASSNAMES, class_token_position="back")


def test_hparams_record_what_was_used_not_what_was_asked(tiny_clip, tmp_path, caplog):
    """CoOp's rule (ctx_init sets the context length) wins over n_ctx; the export records the length used."""
    import json

    from promptlab.export import load_prompts, save_prompts
    from promptlab.methods import CoOp

    with caplog.at_level("WARNING", logger="promptlab.prompts"):
        m = CoOp(tiny_clip, ["cat", "dog"], n_ctx=8, ctx_init="a photo of a")
    assert m.ctx.shape[0] == 4 and m.hparams["n_ctx"] == 4
    assert "n_ctx=8 is not used" in caplog.text
    save_prompts(m, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "prompt_config.json").read_text())["hparams"]["n_ctx"] == 4
    assert load_prompts(tmp_path / "p", tiny_clip).ctx.shape == m.ctx.shape


@pytest.mark.parametrize("name", NAMES)
def test_reference_fp16_head_takes_fp32_features(name: str, images: torch.Tensor) -> None:
    """Under ``reference_fp16`` the head is the reference's fp16 head whatever the features' dtype: cached
    image features arrive fp32, and a head that skipped its ``.to(head_dtype)`` would compute in fp32 (or
    refuse an fp16 @ fp32 product) where the reference computed in fp16."""
    m = build(name, load_clip("tiny", precision="reference_fp16"))
    m.match_backbone_precision()
    _fit(m)
    with torch.no_grad():
        feats = m.encode_image(images).float()
        got, want = m(image_features=feats), m(image_features=feats.to(m.head_dtype))
    assert m.head_dtype == torch.float16
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


#: Each method's reference recipe: its ``method:`` section is the published configuration, and a method
#: built in Python with no arguments must be that configuration (a default that drifted from it would
#: change every result of a user who builds the method by hand, silently).
REFERENCE_RECIPES = {
    "clip_adapter": "fewshot/clip_adapter_vit_b16.yaml",
    "clip_lora": "fewshot/clip_lora_vit_b16.yaml",
    "cocoop": "base2new/cocoop_vit_b16.yaml",
    "coop": "fewshot/coop_vit_b16.yaml",
    "gda": "fewshot/gda_vit_b16.yaml",
    "ivlp": "base2new/ivlp_vit_b16.yaml",
    "kgcoop": "base2new/kgcoop_vit_b16.yaml",
    "linear_probe": "fewshot/linear_probe_vit_b16.yaml",
    "maple": "base2new/maple_vit_b16.yaml",
    "mocoop": "base2new/mocoop_vit_b16.yaml",
    "prograd": "base2new/prograd_vit_b16.yaml",
    "promptsrc": "base2new/promptsrc_vit_b16.yaml",
    "tcp": "base2new/tcp_vit_b16.yaml",
    "tip_adapter": "fewshot/tip_adapter_vit_b16.yaml",
    "vificlip": "video/vificlip_prompt_base2novel.yaml",
    "zeroshot": "zeroshot/clip_vit_b16.yaml",
}
#: Where the recipe deliberately says more than the default, and why the default is right.
DEFAULT_IS_NOT_THE_RECIPE = {
    # None: the backbone's own learned scale, which is 100.0 on OpenAI's weights (what the recipes load)
    ("clip_lora", "logit_scale"): None,
    ("gda", "logit_scale"): None,
    ("tip_adapter", "logit_scale"): None,
    # it switches requires_grad on in the backbone it is given: opt-in, with a backbone of one's own
    ("mocoop", "tune_layernorm"): False,
}


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_the_reference_recipe(name: str) -> None:
    import yaml

    from promptlab.resources import RECIPES_DIR

    assert name in REFERENCE_RECIPES, f"{name}: name its reference recipe in REFERENCE_RECIPES"
    section = yaml.safe_load((RECIPES_DIR / REFERENCE_RECIPES[name]).read_text())["method"]
    assert section.pop("_component_").rsplit(".", 1)[1] == METHODS[name].__name__
    defaults = {p.name: p.default for p in inspect.signature(METHODS[name].__init__).parameters.values()}
    assert section, f"{REFERENCE_RECIPES[name]} sets no hyperparameter"
    for key, value in section.items():
        expected = DEFAULT_IS_NOT_THE_RECIPE.get((name, key), value)
        default = defaults[key]
        if isinstance(default, tuple):
            default = list(default)
        assert default == expected, f"{name}.{key}: default {default!r}, {REFERENCE_RECIPES[name]} {value!r}"


@pytest.mark.parametrize("precision", ["fp32", "reference_fp16"])
@pytest.mark.parametrize("name", ["kgcoop", "tcp"])
def test_knowledge_term_without_this_steps_logits(name: str, precision: str, images: torch.Tensor) -> None:
    """KgCoOp's and TCP's ``loss`` reuse the text features of the step's own ``logits`` call; with none (a
    loss right after building or after ``set_classnames``, or after a no-grad evaluation pass or one on the
    evaluation's cached text features) they compute them, with gradient, in the head's dtype:
    CE + w * (1 - mean_c cos(t_c, hand_c)), restated here."""
    m = build(name, load_clip("tiny", precision=precision))
    m.match_backbone_precision()
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(images.shape[0]) % len(CLASSNAMES)
    logits = torch.randn(images.shape[0], len(CLASSNAMES), generator=g).to(m.head_dtype)
    dt = m.head_dtype

    def restated() -> torch.Tensor:
        txt = F.normalize(m.text_features().to(dt), dim=-1)
        cos = F.cosine_similarity(txt, m._hand.to(dt), dim=-1, eps=1e-7)
        return F.cross_entropy(logits, labels) + m.w * (1.0 - cos.mean())

    for before in ("built", "set_classnames", "no-grad logits", "cached-text logits"):
        if before == "set_classnames":
            m.set_classnames(OTHER_CLASSNAMES + CLASSNAMES[: len(CLASSNAMES) - 2])
        if before == "no-grad logits":
            with torch.no_grad():
                m(images)
        if before == "cached-text logits":  # grad enabled, but the text comes from the evaluation cache
            with m.cached_text_features():
                m(images)
        got = m.loss(logits, labels)
        want = restated()
        assert got.dtype == want.dtype == dt, before
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=before)
        m.ctx.grad = None
        got.backward()
        assert m.ctx.grad is not None and m.ctx.grad.abs().max() > 0, before


def _twelve_block_tiny() -> FrozenCLIP:
    """The tiny CLIP's widths with 12 blocks per tower (ViT-B/16's depth), random weights, seed 0."""
    import open_clip

    from promptlab.backbones import TINY_CONFIGS

    cfg = TINY_CONFIGS["tiny"]
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg={**cfg["vision_cfg"], "layers": 12},
        text_cfg={**cfg["text_cfg"], "layers": 12},
    )
    return load_clip(model)


def _observed(m: PromptModule, images: torch.Tensor) -> dict[str, Any]:
    """What a module computes and keeps: its plain attributes, tensors, an evaluation pass (logits and what
    ``end_eval`` reports) and one training step's logits, loss and gradients (dropout from the same seed)."""
    labels = torch.arange(images.shape[0]) % len(m.classnames)
    _fit(m)
    seen: dict[str, Any] = {
        f"attr.{k}": v
        for k, v in vars(m).items()
        if isinstance(v, (bool, int, float, str, tuple, type(None)))
    }
    seen.update(
        {f"state.{k}": v.detach().clone() for k, v in m.state_dict().items() if not k.startswith("clip.")}
    )
    with torch.no_grad():
        m.begin_eval()
        seen["eval.logits"] = m(images)
        m.observe_eval(seen["eval.logits"], labels)
        seen["eval.end"] = m.end_eval()
    if m.trainable_parameters():
        m.train()
        torch.manual_seed(3)
        logits, loss = m.training_step({"images": images}, labels)
        m.backward(loss)
        seen.update({"train.logits": logits.detach(), "train.loss": loss.detach()})
        seen.update({f"grad.{n}": p.grad for n, p in m.named_parameters() if p.requires_grad})
    return seen


#: Options under which some other default first acts (GDA's alpha is used only when it is not searched).
DEFAULTS_ALSO_WITH: dict[str, list[dict[str, Any]]] = {"gda": [{"search": False}]}


@pytest.mark.parametrize("name", NAMES)
def test_defaults_spelled_out_build_the_same_module(name: str, images: torch.Tensor) -> None:
    """A method built with no hyperparameters computes exactly what one built with every documented default
    spelled out computes: the defaults a user reads in the signature (and that the test above holds to the
    reference recipe) are the ones the code uses, in the attributes, tensors, logits, loss and gradients
    of a training step. (Mutation testing: a default changed inside the function body's copy of the
    signature, which the signature test cannot see, changes what is built.)"""
    params = list(inspect.signature(METHODS[name].__init__).parameters.values())[3:]
    documented = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    # the papers' prompt depths (9, 12) need a 12-block tower: no EXTRA_KWARGS there
    clip = _twelve_block_tiny if name in EXTRA_KWARGS else lambda: load_clip("tiny")
    for option in [{}, *DEFAULTS_ALSO_WITH.get(name, [])]:
        torch.manual_seed(0)
        implicit = _observed(METHODS[name](clip(), CLASSNAMES, **option).eval(), images)
        torch.manual_seed(0)
        explicit = _observed(METHODS[name](clip(), CLASSNAMES, **{**documented, **option}).eval(), images)
        assert implicit.keys() == explicit.keys()
        for key, value in implicit.items():
            _assert_identical(value, explicit[key], f"{name} {option}: {key}")


def _assert_identical(a: Any, b: Any, where: str) -> None:
    """Equal values of equal types, tensors bit for bit (dtype included), through dicts, lists and tuples."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_coop_unified_end_context_takes_the_shared_prefix_path(
    tiny_clip: FrozenCLIP, images: torch.Tensor, monkeypatch
) -> None:
    """CoOp's default (one context for all classes, class token at the end) encodes the shared [SOS] +
    context once and only the class tails per class (promptlab.prompts.encode_context_prefix): the text-side
    speed-up the README measures. The general path gives the same features (tests/test_prefix.py), so only
    which path runs tells them apart; every other layout takes the general one."""
    import promptlab.methods.coop as coop

    calls: list[str] = []
    for fn in ("encode_context_prefix", "encode_prompts"):
        real = getattr(coop, fn)
        monkeypatch.setattr(coop, fn, lambda *a, _f=real, _n=fn: calls.append(_n) or _f(*a))
    for kw, path in (({}, "encode_context_prefix"), ({"csc": True}, "encode_prompts")):
        for position in ("end", "middle", "front"):
            calls.clear()
            CoOp(tiny_clip, CLASSNAMES, class_token_position=position, **kw).text_features()
            want = path if position == "end" else "encode_prompts"
            assert calls == [want], (kw, position)


def test_cocoop_cuts_the_batch_into_chunks_of_whole_images(tiny_clip: FrozenCLIP, monkeypatch) -> None:
    """CoCoOp's text tower sees at most ``max_prompts_per_call`` prompts per call: the batch is cut into
    chunks of ``max(1, max_prompts_per_call // C)`` images (at least one image when C alone is over the
    bound), and the chunked logits equal the unchunked ones."""
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for classnames, bound, sizes in (
        (CLASSNAMES, 8, [2, 2, 1]),  # 8 // 4 classes = 2 images per call
        (CLASSNAMES, 3, [1, 1, 1, 1, 1]),  # fewer than C: one image per call
        (CLASSNAMES[:1], 3, [3, 2]),  # one class: 3 images per call
    ):
        m = build("cocoop", tiny_clip, classnames=classnames)
        whole = m(images)
        seen: list[int] = []
        real = m.conditioned_text_features
        monkeypatch.setattr(
            m, "conditioned_text_features", lambda f, _s=seen, _r=real: _s.append(f.shape[0]) or _r(f)
        )
        monkeypatch.setattr(type(m), "max_prompts_per_call", bound)
        torch.testing.assert_close(m(images), whole, rtol=0, atol=1e-5)
        assert seen == sizes, (len(classnames), bound)


@pytest.mark.parametrize("name", NAMES)
def test_half_backbone_keeps_an_fp32_head(name: str, images: torch.Tensor) -> None:
    """model.precision=bf16 (or fp16) halves the backbone's weights only: the learned tensors, the head
    (normalised features, logits) and the loss stay fp32, and a training step gives fp32 gradients; the
    default head's logits are logit_scale * cos(image, text) from the towers' half-precision features
    cast to fp32 before normalising, exactly."""
    clip = load_clip("tiny", precision="bf16")
    m = build(name, clip)
    _fit(m)
    assert m.head_dtype == torch.float32
    with torch.no_grad():
        assert m(images).dtype == torch.float32
        feats = m.encode_image(images)
        logits = m(image_features=feats)
        assert logits.dtype == torch.float32
        if type(m).logits is PromptModule.logits:  # the default head: cos(image, text) computed in fp32
            txt = m.class_text_features()  # from the bf16 text tower, cast before normalising (restated)
            want = (
                clip.logit_scale * F.normalize(feats.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).t()
            )
            torch.testing.assert_close(logits, want, rtol=0, atol=0)
    m.train()
    logits, loss = m.training_step({"images": images}, torch.arange(images.shape[0]) % len(CLASSNAMES))
    assert logits.dtype == loss.dtype == torch.float32 and torch.isfinite(loss)
    if m.trainable_parameters():
        m.backward(loss)
        for n, p in m.named_parameters():
            if p.requires_grad and not n.startswith("clip."):
                assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n


def test_cocoop_meta_net_takes_features_of_any_dtype(images: torch.Tensor) -> None:
    """``conditioned_text_features`` casts the image features to the meta-net's dtype itself: under
    reference_fp16 (fp16 meta-net) fp32 cached features give what their fp16 cast gives."""
    m = build("cocoop", load_clip("tiny", precision="reference_fp16"))
    m.match_backbone_precision()
    feats = F.normalize(m.encode_image(images).float(), dim=-1)
    with torch.no_grad():
        got = m.conditioned_text_features(feats)
        want = m.conditioned_text_features(feats.half())
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_method_name_is_the_registry_key(tiny_clip: FrozenCLIP) -> None:
    """A class or an instance gives its registry key (what run directories and exports are named by); an
    unregistered subclass gives its class name, lower-cased."""
    from promptlab.methods import method_name

    for key, cls in METHODS.items():
        assert method_name(cls) == key
    assert method_name(CoOp(tiny_clip, CLASSNAMES)) == "coop"

    class MyPrompts(CoOp):
        pass

    assert method_name(MyPrompts) == "myprompts"
    assert method_name(MyPrompts(tiny_clip, CLASSNAMES)) == "myprompts"


@pytest.mark.parametrize("name", ["kgcoop", "tcp"])
def test_knowledge_term_reuses_the_steps_text_features(
    name: str, tiny_clip: FrozenCLIP, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training step (logits, loss, backward) runs the text tower once: ``loss`` takes the text features
    of the step's own ``logits`` call (with their graph) instead of a second pass, which would double the
    text side's cost per step (a loss with no such logits: test_knowledge_term_without_this_steps_logits)."""
    m = build(name, tiny_clip).train()
    with torch.no_grad():
        feats = tiny_clip.encode_image(images)
    labels = torch.arange(images.shape[0]) % len(CLASSNAMES)
    passes: list[int] = []
    tower = tiny_clip.encode_text_embeddings
    monkeypatch.setattr(
        tiny_clip, "encode_text_embeddings", lambda *a, **k: passes.append(len(a[0])) or tower(*a, **k)
    )
    logits = m(image_features=feats)
    m.loss(logits, labels).backward()
    assert passes == [len(CLASSNAMES)]
    assert m.ctx.grad is not None and m.ctx.grad.abs().max() > 0
