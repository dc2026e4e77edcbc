"""MoCoOp: template groups as data, expert initialisation, top-k routing, the gate target, the loss
terms, where gradients go (LayerNorms only when asked), routing statistics, export and a short run
in which the router follows the gate loss."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from promptlab.clip import FrozenCLIP, load_clip
from promptlab.data.registry import dataset_names
from promptlab.engine import FeatureBatches, evaluate, train
from promptlab.export import format_interpretation, interpret, load_prompts, save_prompts
from promptlab.methods import METHODS, MoCoOp
from promptlab.methods.mocoop import (
    check_groups,
    gate_targets,
    load_template_groups,
    mix_expert_logits,
    route,
    split_template,
    text_to_text_loss,
)
from promptlab.runner import dataset_kwargs
from promptlab.sweep import BENCHMARK_DATASETS

CLASSES = ["cat", "sea_lion", "golden retriever", "fire_truck"]
ELEVEN = sorted(BENCHMARK_DATASETS)
# Every kind of template: words on both sides, after only, before only, none (random context).
GROUPS = {
    "pet": ["a photo of a {}, a type of pet.", "a photo of the small {}."],
    "texture": ["{} texture."],
    "photo": ["a photo of a {}", "a good photo of the {}."],
    "bare": ["{}."],
}


def _hand_crafted(clip: FrozenCLIP, template: str, classes=CLASSES) -> torch.Tensor:
    """[C, D] normalised features of a template, straight from encode_text."""
    ids = clip.tokenize([template.format(c.replace("_", " ")) for c in classes])
    return F.normalize(clip.encode_text(ids).float(), dim=-1)


def test_registered() -> None:
    assert METHODS["mocoop"] is MoCoOp


# ---------------------------------------------------------------------- template groups (data)
def test_template_groups_shipped_for_the_eleven_datasets() -> None:
    assert set(ELEVEN) <= set(dataset_names())  # the files are named after the dataset YAMLs
    sizes = {name: [len(g) for g in load_template_groups(name).values()] for name in ELEVEN}
    # dyabel/mocoop configs/datasets/*.yaml GROUPS
    assert sizes["dtd"] == [1, 1, 1, 4, 2] and sizes["sun397"] == [1, 1, 4, 2]
    assert sizes["eurosat"] == [1, 1, 2, 2, 4, 2] and sizes["oxford_pets"] == [1, 2, 1, 1, 4, 2]
    assert sizes["imagenet"] == [1, 1, 1, 1, 2, 2, 3, 1, 1, 1, 7, 2, 1, 2, 1, 1, 1, 1, 1, 1]
    assert list(load_template_groups("fgvc_aircraft"))[0] == "aircraft"
    assert load_template_groups("fgvc_aircraft")["aircraft"] == ["a photo of a {}, a type of aircraft."]


def test_unknown_dataset_falls_back_to_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        groups = load_template_groups("my_custom_set")
    assert groups == load_template_groups(None) and "my_custom_set" in caplog.text
    assert len(groups) >= 2


def test_group_validation_and_template_split() -> None:
    assert split_template("a photo of a {}, a type of pet.") == ("a photo of a", ", a type of pet", ".")
    assert split_template("{} texture.") == ("", "texture", ".")
    assert split_template("itap of a {}") == ("itap of a", "", "")
    assert check_groups([["a {}."], ["b {}."]]) == {"a {}.": ["a {}."], "b {}.": ["b {}."]}
    with pytest.raises(ValueError, match="exactly one"):
        check_groups({"x": ["no placeholder"]})
    with pytest.raises(ValueError, match="exactly one"):
        check_groups({"x": []})


def test_runner_fills_dataset_name() -> None:
    ds = SimpleNamespace(template="a photo of a {}.", name="dtd")
    assert dataset_kwargs(MoCoOp, OmegaConf.create({"templates": None}), ds) == {"dataset_name": "dtd"}


# ---------------------------------------------------------------------- experts
def test_experts_start_as_their_first_template(tiny_clip: FrozenCLIP) -> None:
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS, n_ctx=3)
    assert m.expert_names == list(GROUPS)
    assert [c.shape[0] for c in m.ctx] == [
        9,
        1,
        4,
        3,
    ]  # "a photo of a" + ", a type of pet"; texture; ...; n_ctx
    with torch.no_grad():
        feats = m.expert_text_features()  # [E, C, D]
    for e, group in enumerate(list(GROUPS.values())[:3]):  # worded templates: exactly the hand-crafted prompt
        torch.testing.assert_close(feats[e], _hand_crafted(tiny_clip, group[0]), atol=1e-5, rtol=0)
    for e, group in enumerate(GROUPS.values()):  # prototypes: the mean of the group's templates
        mean = torch.stack([_hand_crafted(tiny_clip, t) for t in group]).mean(0)
        torch.testing.assert_close(m._protos[e], F.normalize(mean, dim=-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="n_ctx"):
        MoCoOp(tiny_clip, CLASSES, templates={"bare": ["{}."]}, n_ctx=0)


# ---------------------------------------------------------------------- routing
def test_top_k_routing_and_renormalisation() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.5, 0.2]])
    w, idx = route(logits, 2)
    assert idx.tolist() == [[1, 3], [0, 2]]
    full = logits.softmax(-1)
    torch.testing.assert_close(w, full.gather(1, idx) / full.gather(1, idx).sum(1, keepdim=True))
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    w1, idx1 = route(logits, 1)
    assert idx1.tolist() == [[1], [0]] and torch.equal(w1, torch.ones(2, 1))
    assert route(logits, 9)[1].shape == (2, 4)  # k is capped at the number of experts

    per_expert = torch.randn(2, 4, 5)  # [B, E, C]
    mixed = mix_expert_logits(per_expert, w, idx)
    manual = torch.stack([sum(w[b, j] * per_expert[b, idx[b, j]] for j in range(2)) for b in range(2)])
    torch.testing.assert_close(mixed, manual)


def test_module_mixes_top_k_expert_features(tiny_clip: FrozenCLIP) -> None:
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS, top_k=2)
    x = torch.randn(6, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = m(image_features=x)
        img = F.normalize(x, dim=-1)
        w, idx = route(m.router(img), 2)
        feats = m.expert_text_features()  # [E, C, D]
        text = (w[..., None, None] * feats[idx]).sum(1)  # [B, C, D]: the per-image mixture of text features
        expected = tiny_clip.logit_scale * torch.einsum("bd,bcd->bc", img, text)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        m.top_k = 1  # one expert: exactly its CLIP logits
        top1 = m.router(img).argmax(-1)
        torch.testing.assert_close(
            m(image_features=x),
            tiny_clip.logit_scale * torch.einsum("bd,bcd->bc", img, feats[top1]),
            atol=1e-5,
            rtol=0,
        )
    with pytest.raises(ValueError, match="top_k"):
        MoCoOp(tiny_clip, CLASSES, templates=GROUPS, top_k=0)


# ---------------------------------------------------------------------- gate target and loss terms
def test_gate_target_is_argmax_of_hard_prompt_similarity(tiny_clip: FrozenCLIP) -> None:
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS)
    x = torch.randn(8, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    img = F.normalize(x, dim=-1)
    protos = [
        F.normalize(torch.stack([_hand_crafted(tiny_clip, t) for t in g]).mean(0), dim=-1)
        for g in GROUPS.values()
    ]
    brute = [max(range(len(protos)), key=lambda e: float(img[b] @ protos[e][labels[b]])) for b in range(8)]
    target = gate_targets(img, m._protos, labels)
    assert target.tolist() == brute
    # an image equal to a group's hand-crafted feature of its class is routed to that group
    planted = torch.stack([m._protos[e, c] for e, c in [(0, 1), (2, 3), (3, 0)]])
    assert gate_targets(planted, m._protos, torch.tensor([1, 3, 0])).tolist() == [0, 2, 3]
    with torch.no_grad():
        logits = m(image_features=x)
        terms = m.loss_terms(logits, labels)
        torch.testing.assert_close(terms["gate"], F.cross_entropy(m.router(img), target))


def test_loss_terms_zero_and_positive(tiny_clip: FrozenCLIP) -> None:
    x = torch.randn(8, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(8) % 4
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS, text_loss_weight=7.0, gate_loss_weight=0.5)
    logits = m(image_features=x)
    t = m.loss_terms(logits, labels)
    assert all(float(v.detach()) > 0 for v in t.values()), t
    total = m.loss(m(image_features=x), labels)
    torch.testing.assert_close(total, t["ce"] + 7.0 * t["text"] + 0.5 * t["gate"])
    off = MoCoOp(tiny_clip, CLASSES, templates=GROUPS, text_loss_weight=0.0, gate_loss_weight=0.0)
    off.load_prompt_state_dict(m.prompt_state_dict())
    logits = off(image_features=x)
    assert torch.equal(off.loss(logits, labels), F.cross_entropy(logits, labels))
    # the text loss is a contrast among classes: one class leaves nothing to contrast; drifting raises it
    assert float(text_to_text_loss(m._protos[:, :1], m._protos[:, :1], 100.0)) == 0.0
    with torch.no_grad():
        before = float(t["text"])
        for c in m.ctx:
            c.add_(torch.randn(c.shape, generator=torch.Generator().manual_seed(3)))
        assert float(m.loss_terms(m(image_features=x), labels)["text"]) > before
    # a router that already picks the hard-prompt group has (almost) no gate loss
    one = MoCoOp(tiny_clip, ["cat"], templates=GROUPS)
    with torch.no_grad():
        one.router.weight.copy_(1e5 * one._protos[:, 0])  # logits = 1e5 * similarity to each group
        one.router.bias.zero_()
        terms = one.loss_terms(one(image_features=x), torch.zeros(8, dtype=torch.long))
    assert float(terms["gate"]) < 1e-4 and float(terms["ce"]) == 0.0 and float(terms["text"]) == 0.0


def test_loss_recomputes_without_a_forward(tiny_clip: FrozenCLIP) -> None:
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS)
    x = torch.randn(4, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = m(image_features=x)
        expected = m.loss(logits, torch.arange(4))  # the loss clears what the forward pass left
        assert torch.equal(m.loss(logits, torch.arange(4), image_features=x), expected)
        with pytest.raises(ValueError, match="forward pass first"):
            m.loss(logits, torch.arange(4))


# ---------------------------------------------------------------------- gradients
def _grads(m: MoCoOp, clip: FrozenCLIP, **inputs: torch.Tensor) -> tuple[set[str], set[str]]:
    m.zero_grad(set_to_none=True)
    labels = torch.arange(next(iter(inputs.values())).shape[0]) % len(CLASSES)
    m.loss(m(**inputs), labels).backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    return {n for n in got if not n.startswith("clip.")}, {n for n in got if n.startswith("clip.")}


def test_gradients_reach_exactly_contexts_and_router(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS)
    assert m.image_side_frozen and m.text_depends_on_image and m.trainable_backbone_parts == ()
    own, backbone = _grads(m, tiny_clip, images=images)
    assert own == {f"ctx.{e}" for e in range(4)} | {"router.weight", "router.bias"} and not backbone
    assert set(m.prompt_state_dict()) == own
    # each auxiliary term reaches its own tensors: the gate only the router, the text loss only the contexts
    x = torch.randn(5, tiny_clip.embed_dim)
    for term, reached in [
        ("gate", {"router.weight", "router.bias"}),
        ("text", {f"ctx.{e}" for e in range(4)}),
    ]:
        m.zero_grad(set_to_none=True)
        m.loss_terms(m(image_features=x), torch.arange(5) % 4)[term].backward()
        assert {
            n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().max() > 0
        } == reached


def test_layernorm_tuning_opens_the_image_side(images: torch.Tensor, tmp_path: Path) -> None:
    clip = load_clip("tiny")  # its own: requires_grad is switched on in the backbone
    m = MoCoOp(clip, CLASSES, templates=GROUPS, tune_layernorm=True)
    assert not m.image_side_frozen and m.trainable_backbone_parts
    assert all(p.rsplit(".", 1)[-1] in ("ln_1", "ln_2") and "visual" in p for p in m.trainable_backbone_parts)
    own, backbone = _grads(m, clip, images=images)
    ln_params = {f"clip.{part}.{w}" for part in m.trainable_backbone_parts for w in ("weight", "bias")}
    assert backbone == ln_params and len(own) == 6
    assert ln_params <= set(m.prompt_state_dict())
    assert m.encode_image(images).requires_grad  # no feature cache: the tower now learns
    # the tuned LayerNorms travel with the export; the backbone keeps its pretrained identity
    with torch.no_grad():
        for part in m.trainable_backbone_parts:
            clip.get_submodule(part).weight.add_(0.05)
        target = m(images)
    save_prompts(m, tmp_path)
    back = load_prompts(tmp_path, load_clip("tiny"))  # strict: same pretrained weights
    with torch.no_grad():
        torch.testing.assert_close(back(images), target, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- evaluation, export
def test_routing_statistics_in_evaluation(tiny_clip: FrozenCLIP) -> None:
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS, top_k=2)
    feats = torch.randn(1, 30, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(30) % 4
    out = evaluate(
        m, FeatureBatches(feats, labels, 8, torch.Generator(), shuffle=False), device=torch.device("cpu")
    )
    r = out["method_stats"]["routing"]
    assert r["experts"] == list(GROUPS) and r["top_k"] == 2 and r["images"] == 30
    per_class = torch.tensor(list(r["per_class"].values()))  # [C, E], rows by true class
    assert list(r["per_class"]) == CLASSES and per_class.sum() == 60
    with torch.no_grad():
        x = F.normalize(feats[0], dim=-1)
        chosen = torch.zeros(4, dtype=torch.long).index_add_(
            0, route(m.router(x), 2)[1].flatten(), torch.ones(60, dtype=torch.long)
        )
        idx = route(m.router(x), 2)[1]  # [30, 2]
        by_class = torch.zeros(4, 4, dtype=torch.long)
        for y, experts in zip(labels.tolist(), idx.tolist()):
            for e in experts:
                by_class[y, e] += 1
    assert per_class.sum(0).tolist() == chosen.tolist()
    assert per_class.tolist() == by_class.tolist()  # filed under the true labels, not the predictions
    assert sum(r["chosen_fraction"]) == pytest.approx(2.0, abs=1e-3)
    assert m.end_eval() == {}  # statistics end with the evaluation


def test_export_round_trip_and_interpret(tiny_clip: FrozenCLIP, tmp_path: Path) -> None:
    m = MoCoOp(tiny_clip, CLASSES, dataset_name="dtd")
    with torch.no_grad():
        for c in m.ctx:
            c.add_(0.01)
    save_prompts(m, tmp_path)
    back = load_prompts(tmp_path, tiny_clip)
    x = torch.randn(3, tiny_clip.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(back(image_features=x), m(image_features=x), atol=0, rtol=0)
    fresh = MoCoOp(tiny_clip, CLASSES, dataset_name="dtd")
    rows = interpret(fresh, tiny_clip, topk=2)
    assert [r["expert_name"] for r in rows if r["position"] == 0] == list(load_template_groups("dtd"))
    assert [r["l2"][0][0] for r in rows if r["expert"] == 0] == ["texture"]
    assert [r["l2"][0][0] for r in rows if r["expert"] == 1] == ["a", "photo", "of", "a"]
    text = format_interpretation(rows)
    assert "expert 0 (texture): nearest words (L2): texture" in text
    assert "expert 3 (low resolution): nearest words (L2): a low resolution photo of the" in text


# ---------------------------------------------------------------------- a short run
def test_router_follows_the_gate_loss(tiny_clip: FrozenCLIP, tmp_path: Path) -> None:
    feats = torch.randn(1, 128, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(128) % 4

    def agreement(m: MoCoOp) -> float:
        with torch.no_grad():
            img = F.normalize(feats[0], dim=-1)
            return float((m.router(img).argmax(-1) == gate_targets(img, m._protos, labels)).float().mean())

    result = {}
    for weight in (1.0, 0.0):
        torch.manual_seed(0)
        m = MoCoOp(tiny_clip, ["cat", "dog", "car", "tree"], gate_loss_weight=weight, text_loss_weight=1.0)
        start = agreement(m)
        opt = torch.optim.SGD(m.trainable_parameters(), lr=0.5, momentum=0.9)
        train(
            m,
            FeatureBatches(feats, labels, 32, torch.Generator().manual_seed(0)),
            opt,
            epochs=5,
            lr_fn=lambda e: 0.5,
            generator=torch.Generator().manual_seed(0),
            run_dir=tmp_path / str(weight),
            device=torch.device("cpu"),
            checkpoint_every=100,
        )
        result[weight] = (start, agreement(m))
    (start, with_gate), (_, without) = result[1.0], result[0.0]
    assert with_gate > 0.7 and with_gate > start + 0.3, result
    assert with_gate > without + 0.3, result
