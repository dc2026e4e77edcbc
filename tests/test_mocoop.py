"""MoCoOp: template groups as data, expert initialisation, top-k routing, the gate target, the loss
terms, where gradients go (LayerNorms only when asked, at a tenth of the lr), routing statistics,
export, the recipes, and a short run in which the router follows the gate loss. The whole
computation against a re-statement of the reference code is in test_mocoop_parity.py."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import promptlab.methods.mocoop as mocoop_module
from promptlab.backbones import load_clip
from promptlab.clip import FrozenCLIP
from promptlab.config import load_recipe
from promptlab.data import DatasetSplits, Item, subsample_classes
from promptlab.data.registry import dataset_names
from promptlab.engine import FeatureBatches, evaluate, lr_at, train
from promptlab.export import format_interpretation, interpret, load_prompts, save_prompts
from promptlab.methods import METHODS, MoCoOp
from promptlab.methods.mocoop import (
    check_groups,
    load_template_groups,
    mix_expert_logits,
    route,
    soft_gate_target,
    template_parts,
    text_to_text_loss,
    word_count,
)
from promptlab.prompts import encode_prompts, insert_context
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
    # configs/datasets/food101.yaml: "a photo of a  {}." with two spaces, 5 words to the reference
    assert list(load_template_groups("food101").values())[0] == ["a photo of a  {}."]


def test_a_groups_file_can_share_another_dataset_s_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``same_as: <dataset>``: the sandbox datasets share sandbox_shapes' groups (one list, not copies);
    a target that is missing, outside the folder or itself an alias is refused, naming the file."""
    shapes = load_template_groups("sandbox_shapes")
    assert len(shapes) == 4
    assert load_template_groups("sandbox_lamp") == shapes == load_template_groups("sandbox_clean")
    folder = tmp_path / "template_groups"
    folder.mkdir()
    (folder / "real.yaml").write_text("groups: {a: ['a {}.'], b: ['the {}.', 'one {}.']}\n")
    (tmp_path / "real.yaml").write_text((folder / "real.yaml").read_text())  # what "../real" would reach
    for name, target in (("alias", "real"), ("chain", "alias"), ("gone", "nowhere"), ("out", "../real")):
        (folder / f"{name}.yaml").write_text(f"same_as: {target}\n")
    monkeypatch.setattr(mocoop_module, "datasets_dir", lambda: tmp_path)
    assert load_template_groups("alias") == {"a": ["a {}."], "b": ["the {}.", "one {}."]}
    for name in ("chain", "gone", "out"):
        with pytest.raises(ValueError, match=rf"{name}\.yaml: same_as must name a file of .* own 'groups:'"):
            load_template_groups(name)


def test_unknown_dataset_falls_back_to_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        groups = load_template_groups("my_custom_set")
    assert groups == load_template_groups(None) and "my_custom_set" in caplog.text
    assert len(groups) >= 2


def test_group_validation_and_template_split() -> None:
    # dyabel/mocoop prompting/moe.py L151-152: every "." removed, the character before {} dropped
    assert template_parts("a photo of a {}, a type of pet.") == ("a photo of a", ", a type of pet")
    assert template_parts("{} texture.") == ("", " texture")
    assert template_parts("itap of a {}") == ("itap of a", "")
    assert template_parts("a photo of a  {}.") == ("a photo of a ", "")
    # moe.py L158-172: len(text.split(" ")), 0 for "": words and empty strings, not BPE tokens
    assert [word_count(t) for t in ("", "a photo of a", " texture", "a photo of a ", ", a type of pet")] == [
        0,
        4,
        2,
        5,
        5,
    ]
    assert word_count("A photo of the high-performance") == 5  # 7 BPE tokens
    assert check_groups([["a {}."], ["b {}."]]) == {"a {}.": ["a {}."], "b {}.": ["b {}."]}
    with pytest.raises(ValueError, match="exactly one"):
        check_groups({"x": ["no placeholder"]})
    with pytest.raises(ValueError, match="exactly one"):
        check_groups({"x": []})


def test_group_errors_name_the_file_and_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A groups file that is not ``groups: {name: [template, ...]}`` or holds a bad group is refused with
    its path and the group at fault; an unnamed group is named by its index; a dataset with no file
    says which folder it looked in before falling back to default.yaml."""
    folder = tmp_path / "template_groups"
    folder.mkdir()
    files = {
        "default": "groups: {a: ['a {}.']}\n",
        "listed": "- a {}.\n- the {}.\n",  # not a mapping at all
        "flat": "groups: ['a {}.', 'the {}.']\n",  # groups, but not named
        "bad": "groups: {fine: ['a {}.'], broken: ['no placeholder.']}\n",
    }
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
    monkeypatch.setattr(mocoop_module, "datasets_dir", lambda: tmp_path)
    for name in ("listed", "flat"):
        path = re.escape(str(folder / f"{name}.yaml"))
        with pytest.raises(
            ValueError, match=rf"^{path}: expected a mapping 'groups: {{name: \[template, \.\.\.\]}}'$"
        ):
            load_template_groups(name)
    path = re.escape(str(folder / "bad.yaml"))
    with pytest.raises(
        ValueError,
        match=rf"^{path}: every group needs templates with exactly one '{{}}'; bad groups: \['broken'\]$",
    ):
        load_template_groups("bad")
    with caplog.at_level(logging.WARNING, logger="promptlab.methods.mocoop"):
        assert load_template_groups("nowhere") == {"a": ["a {}."]}
    assert [r.getMessage() for r in caplog.records] == [
        f"no template groups for dataset 'nowhere' in {folder}: using default.yaml"
    ]
    # in-code groups: the source defaults to "templates"; an empty group is named by its index
    with pytest.raises(ValueError, match=r"^templates: every group needs .*; bad groups: \['x'\]$"):
        check_groups({"x": ["no placeholder"]})
    with pytest.raises(ValueError, match=r"; bad groups: \['1'\]$"):
        check_groups([["a {}."], []])
    with pytest.raises(ValueError, match=r"^mine: every group needs .*; bad groups: none given$"):
        check_groups({}, source="mine")


def test_runner_fills_dataset_name_and_all_class_names() -> None:
    """Base training still hands the method every class name of the dataset (moe.py L213-217, L538-543)."""
    items = [Item(f"{c}.png", y, c) for y, c in enumerate(CLASSES)]
    ds = DatasetSplits("dtd", items, [], items, list(CLASSES), "a photo of a {}.")
    base = subsample_classes(ds, "base")
    assert base.classnames == CLASSES[:2] and base.all_classnames == CLASSES
    got = dataset_kwargs(MoCoOp, OmegaConf.create({"templates": None}), base)
    assert got == {"dataset_name": "dtd", "all_classnames": CLASSES}
    assert (
        dataset_kwargs(MoCoOp, OmegaConf.create({}), ds)["all_classnames"] == CLASSES
    )  # few-shot: the same list
    ns = SimpleNamespace(template="a photo of a {}.", name="dtd")  # a method that asks for less needs less
    assert dataset_kwargs(
        type("T", (), {"__init__": lambda self, template: None}), OmegaConf.create({}), ns
    ) == {"template": "a photo of a {}."}


# ---------------------------------------------------------------------- experts
def test_expert_prompts_drop_the_period_and_count_words(tiny_clip: FrozenCLIP) -> None:
    """moe.py L151-211: the classification prompt is the first template without its ".", and the
    learned slots are counted in words: " texture" holds "texture" and the end token."""
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS, n_ctx=3)
    assert m.expert_names == list(GROUPS)
    # "a photo of a" + ", a type of pet"; " texture" (2 words); "a photo of a"; n_ctx random slots
    assert [c.shape[0] for c in m.ctx] == [9, 2, 4, 3]
    ids = tiny_clip.tokenize(" texture")
    with torch.no_grad():
        torch.testing.assert_close(m.ctx[1], tiny_clip.embed_tokens(ids)[0, 1:3].float(), atol=0, rtol=0)
        feats = m.expert_text_features()  # [E, C, D]
    for e, first in [(0, "a photo of a {}, a type of pet"), (1, "{} texture"), (2, "a photo of a {}")]:
        torch.testing.assert_close(feats[e], _hand_crafted(tiny_clip, first), atol=1e-5, rtol=0)
        assert (feats[e] - _hand_crafted(tiny_clip, first + ".")).abs().max() > 1e-3  # the period matters
    with (
        torch.no_grad()
    ):  # prototypes (built for the first loss): the mean of the group's templates, with "."
        m.loss_terms(m(image_features=torch.randn(2, tiny_clip.embed_dim)), torch.arange(2))
    for e, group in enumerate(GROUPS.values()):
        ends = [t if t.endswith(".") else t + "." for t in group]
        mean = torch.stack([_hand_crafted(tiny_clip, t) for t in ends]).mean(0)
        torch.testing.assert_close(m._protos[e], F.normalize(mean, dim=-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="n_ctx"):
        MoCoOp(tiny_clip, CLASSES, templates={"bare": ["{}."]}, n_ctx=0)


def test_expert_initialisation_edge_cases(
    tiny_clip: FrozenCLIP, caplog: pytest.LogCaptureFixture, one_thread: None
) -> None:
    """moe.py L157-179: each part's first nb / na token embeddings, the part tokenised alone with "_" as
    " " (one word; as many words before as after is no special case); "{}." alone gets n_ctx N(0, 0.02)
    slots behind a placeholder of n_ctx tokens, so context set to words computes those words' prompt.
    One expert per image and one random slot are allowed."""
    groups = {
        "one": ["the {} itself."],  # 1 word before, 2 after (" itself": the word and the end slot)
        "even": ["a b {} c."],  # 2 and 2
        "under": ["a photo_of the {}."],  # 3 words; the init reads "a photo of the"
        "bare": ["{}."],
    }
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="promptlab.methods.mocoop"):
        m = MoCoOp(tiny_clip, CLASSES, templates=groups, n_ctx=3, top_k=1)
    assert [r.getMessage() for r in caplog.records] == [
        "MoCoOp: 4 experts ['one', 'even', 'under', 'bare'], top-1"
    ]

    def emb(text: str, n: int) -> torch.Tensor:
        return tiny_clip.embed_tokens(tiny_clip.tokenize(text))[0, 1 : 1 + n].float()

    with torch.no_grad():
        for e, want in enumerate(
            [
                torch.cat([emb("the", 1), emb(" itself", 2)]),
                torch.cat([emb("a b", 2), emb(" c", 2)]),
                emb("a photo of the", 3),
            ]
        ):
            torch.testing.assert_close(m.ctx[e], want, atol=0, rtol=0)
    bare = m.ctx[3]
    assert bare.shape == (3, tiny_clip.width) and 0.012 < float(bare.detach().std()) < 0.03
    with torch.no_grad():
        bare.copy_(emb("a photo of", 3))
        torch.testing.assert_close(
            m.expert_text_features()[3], _hand_crafted(tiny_clip, "a photo of {}"), atol=1e-5, rtol=0
        )
    one = MoCoOp(tiny_clip, CLASSES, templates={"bare": ["{}."]}, n_ctx=1)
    assert one.ctx[0].shape == (1, tiny_clip.width)
    # the prompts are cut to the longest one (max end-of-text + 1): the causal tower gives the same features
    assert m._base.shape[2] == int(m._eot.max()) + 1 < tiny_clip.context_length


def test_experts_on_a_bidirectional_tower_keep_the_whole_context(one_thread: None) -> None:
    """SigLIP (no start token, bidirectional, pooled at the last position): the prompts keep every context
    position, and a single "{}." expert whose context is set to words computes those words' prompt
    (its placeholder is n_ctx tokens on SigLIP's tokenizer too)."""
    clip = load_clip("tiny-siglip")
    assert not clip.can_truncate_text and clip.n_start_tokens == 0
    m = MoCoOp(clip, CLASSES, templates={"bare": ["{}."]}, n_ctx=3)
    assert m._base.shape[2] == clip.context_length
    words = clip.tokenize("a photo of")
    assert int(clip.eot_index(words)[0]) == 3
    with torch.no_grad():
        m.ctx[0].copy_(clip.embed_tokens(words)[0, :3].float())
        torch.testing.assert_close(
            m.expert_text_features()[0], _hand_crafted(clip, "a photo of {}"), atol=1e-5, rtol=0
        )


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
def test_gate_target_is_soft_top2(tiny_clip: FrozenCLIP) -> None:
    """moe.py L510-523 with increase_top2_logits (L110-127): softmax(s + 10 on the two best groups)."""
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS)
    x = torch.randn(8, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    img = F.normalize(x, dim=-1)
    protos = [  # the hand-crafted group prototypes, templates ending with "."
        F.normalize(torch.stack([_hand_crafted(tiny_clip, t.rstrip(".") + ".") for t in g]).mean(0), dim=-1)
        for g in GROUPS.values()
    ]
    target = []
    for b in range(8):
        s = [float(img[b] @ p[labels[b]]) for p in protos]
        best = sorted(range(len(s)), key=lambda e: -s[e])[:2]
        boosted = torch.tensor([v + (10.0 if e in best else 0.0) for e, v in enumerate(s)])
        target.append(boosted.softmax(0))
    target = torch.stack(target)
    assert target.max(1).values.max() < 0.6  # soft: the two best groups share the mass
    with torch.no_grad():
        terms = m.loss_terms(m(image_features=x), labels)
        torch.testing.assert_close(
            soft_gate_target(img, torch.stack(protos)[:, labels]), target, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(terms["gate"], F.cross_entropy(m.router(img), target), atol=1e-5, rtol=0)


def test_gate_target_class_on_the_base_half(tiny_clip: FrozenCLIP) -> None:
    """The reference looks the image's prototype up by its base label in ``list(set(all names))``
    (datasets/oxford_pets.py L142-147, moe.py L511): an arbitrary class, fixed per run. ``"shuffled"``
    reproduces it with a seeded permutation; ``"own"`` is the fix."""
    allc = CLASSES + ["dog", "ox", "fern"]
    orders = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        m = MoCoOp(tiny_clip, CLASSES[:4], templates=GROUPS, all_classnames=allc)
        orders.append(m._set_order.tolist())
    assert sorted(orders[0]) == list(range(7)) and orders[0] == orders[2] and orders[0] != orders[1]
    own = MoCoOp(tiny_clip, CLASSES[2:4], templates=GROUPS, all_classnames=allc, gate_target="own")
    with torch.no_grad():
        own.loss_terms(own(image_features=torch.randn(2, tiny_clip.embed_dim)), torch.arange(2))
    assert own._set_order is None and own._gate_cols.tolist() == [2, 3]
    assert MoCoOp(tiny_clip, CLASSES, templates=GROUPS, all_classnames=CLASSES)._set_order is None  # few-shot
    with pytest.raises(ValueError, match="gate_target"):
        MoCoOp(tiny_clip, CLASSES, templates=GROUPS, gate_target="best")


def test_text_loss_has_no_temperature(tiny_clip: FrozenCLIP) -> None:
    """losses.py L87-108: the non-instance branch never uses ``t``: cross-entropy over plain cosines."""
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS)
    x = torch.randn(4, tiny_clip.embed_dim)
    with torch.no_grad():
        terms = m.loss_terms(m(image_features=x), torch.arange(4))
        feats = m.expert_text_features()  # [E, C, D]
        cos = torch.einsum("ecd,ekd->eck", feats, m._protos)  # [E, C, C]
        plain = F.cross_entropy(cos.reshape(-1, 4), torch.arange(4).repeat(len(GROUPS)))
        torch.testing.assert_close(terms["text"], plain, atol=1e-6, rtol=0)
        scaled = F.cross_entropy(100 * cos.reshape(-1, 4), torch.arange(4).repeat(len(GROUPS)))
        assert abs(float(scaled - plain)) > 0.1


def test_text_loss_covers_all_class_names(tiny_clip: FrozenCLIP) -> None:
    """moe.py L213-217, L454-483: on the base half the text loss runs over every class name, base and new."""
    allc = CLASSES + ["dog", "ox", "fern"]
    m = MoCoOp(tiny_clip, CLASSES[:2], templates=GROUPS, all_classnames=allc)
    few = MoCoOp(tiny_clip, allc, templates=GROUPS)
    few.load_prompt_state_dict(m.prompt_state_dict())
    x = torch.randn(4, tiny_clip.embed_dim)
    with torch.no_grad():
        text = m.loss_terms(m(image_features=x), torch.tensor([0, 1, 1, 0]))["text"]
        few.loss_terms(few(image_features=x), torch.arange(4))
        assert m._protos.shape[1] == 7
        torch.testing.assert_close(m._protos, few._protos)
        # the base run's text loss is the loss over all 7 names, with the "." prompts of moe.py L264
        feats = m._encode_experts("_all")  # [E, 7, D]
        torch.testing.assert_close(text, text_to_text_loss(feats, few._protos))
        for e, first in [(0, "a photo of a {}, a type of pet."), (2, "a photo of a {}.")]:  # at the start
            torch.testing.assert_close(feats[e], _hand_crafted(tiny_clip, first, allc), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="lacks the training classes"):
        MoCoOp(tiny_clip, ["whale"], templates=GROUPS, all_classnames=allc).loss(
            torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), image_features=x[:1]
        )


def test_correction_vector(tiny_clip: FrozenCLIP) -> None:
    """ENABLE_CORRECTION (on in the published config; moe.py L234-236, L426-429): one learned [1, D]
    vector, zero at start, added to every expert's text feature before normalisation."""
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS)
    assert torch.equal(m.correction.detach(), torch.zeros(1, tiny_clip.embed_dim))
    off = MoCoOp(tiny_clip, CLASSES, templates=GROUPS, text_correction=False)
    assert off.correction is None and "correction" not in off.prompt_state_dict()
    with torch.no_grad():
        raw = torch.stack([F.normalize(f, dim=-1) for f in off.expert_text_features()])
        m.correction.fill_(0.3)
        off.load_prompt_state_dict({k: v for k, v in m.prompt_state_dict().items() if k != "correction"})
        unnormalised = []
        for e, c in enumerate(off.ctx):  # the same experts' features before normalisation, + 0.3
            base = off._base[e]
            x = insert_context(base, c, getattr(off, f"_pos_{e}"))
            unnormalised.append(encode_prompts(tiny_clip, x, off._eot[e]).float() + 0.3)
        torch.testing.assert_close(m.expert_text_features(), F.normalize(torch.stack(unnormalised), dim=-1))
        assert (m.expert_text_features() - raw).abs().max() > 1e-3


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
    assert float(text_to_text_loss(m._protos[:, :1], m._protos[:, :1])) == 0.0
    with torch.no_grad():
        before = float(t["text"])
        for c in m.ctx:
            c.add_(torch.randn(c.shape, generator=torch.Generator().manual_seed(3)))
        assert float(m.loss_terms(m(image_features=x), labels)["text"]) > before


def test_loss_recomputes_without_a_forward(tiny_clip: FrozenCLIP, images: torch.Tensor) -> None:
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS)
    x = torch.randn(4, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = m(image_features=x)
        expected = m.loss(logits, torch.arange(4))  # the loss clears what the forward pass left
        assert torch.equal(m.loss(logits, torch.arange(4), image_features=x), expected)
        labels = torch.arange(images.shape[0])  # from images: the loss encodes them as the forward pass did
        logits = m(images)
        expected = m.loss(logits, labels)
        assert torch.equal(m.loss(logits, labels, images=images), expected)
        message = "^MoCoOp.loss needs the forward pass first, or image_features / images$"
        with pytest.raises(ValueError, match=message):
            m.loss(logits, torch.arange(4))


def test_supervision_is_built_once_and_cached_experts_are_used(
    tiny_clip: FrozenCLIP, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """The prototypes (every template x every text-loss class through the text tower) are built by the
    first loss and kept, not rebuilt each step; under ``cached_text_features`` the experts are encoded
    once for all batches; a base half missing training classes names (the first five of) them."""
    m = MoCoOp(tiny_clip, CLASSES, templates=GROUPS)
    x = torch.randn(4, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(6))
    m.loss(m(image_features=x), torch.arange(4))
    protos, cols = m._protos, m._gate_cols
    m.loss(m(image_features=x), torch.arange(4))
    assert m._protos is protos and m._gate_cols is cols
    calls = []
    encode = m.expert_text_features
    monkeypatch.setattr(m, "expert_text_features", lambda: calls.append(1) or encode())
    with torch.no_grad():
        plain = m(image_features=x)
        with m.cached_text_features():
            cached = [m(image_features=x[i : i + 2]) for i in (0, 2)]
    assert len(calls) == 2  # one for the plain forward, one for both cached batches
    torch.testing.assert_close(torch.cat(cached), plain, atol=1e-6, rtol=0)
    names = [f"class{i}" for i in range(7)]
    with pytest.raises(
        ValueError,
        match=r"^all_classnames lacks the training classes \['class0', 'class1', 'class2', 'class3', 'class4'\]$",
    ):
        MoCoOp(tiny_clip, names, templates=GROUPS, all_classnames=CLASSES).loss(
            torch.zeros(1, 7), torch.zeros(1, dtype=torch.long), image_features=x[:1]
        )


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
    learned = {f"ctx.{e}" for e in range(4)} | {"router.weight", "router.bias", "correction"}
    assert own == learned and not backbone
    assert set(m.prompt_state_dict()) == own
    # each auxiliary term reaches its own tensors: the gate only the router, the text loss the text side
    x = torch.randn(5, tiny_clip.embed_dim)
    for term, reached in [
        ("gate", {"router.weight", "router.bias"}),
        ("text", {f"ctx.{e}" for e in range(4)} | {"correction"}),
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
    assert backbone == ln_params and len(own) == 7
    # the gate loss alone reaches the LayerNorms too: its soft target is not detached (moe.py L511-523)
    m.zero_grad(set_to_none=True)
    m.loss_terms(m(images), torch.arange(3))["gate"].backward()
    assert all(clip.get_submodule(p).weight.grad.abs().max() > 0 for p in m.trainable_backbone_parts)
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


def test_layernorm_tuning_on_timm_and_resnet_towers(one_thread: None) -> None:
    """A timm ViT (EVA02) tunes every block's norm1 / norm2 (its LayerNorms before attention and MLP, as
    ln_1 / ln_2 in OpenAI's blocks); a ResNet image tower has none, and the error says so."""
    clip = load_clip("tiny-eva02")
    m = MoCoOp(clip, CLASSES, templates=GROUPS, tune_layernorm=True)
    want = {n for n, _ in clip.named_modules() if re.search(r"\.blocks\.\d+\.norm[12]$", n)}
    assert len(want) == 2 * len(clip._timm_trunk.blocks) and set(m.trainable_backbone_parts) == want
    assert all(clip.get_submodule(n).weight.requires_grad for n in want)
    with pytest.raises(ValueError, match=r"^tune_layernorm needs a ViT image tower; tiny-rn has none$"):
        MoCoOp(load_clip("tiny-rn"), CLASSES, templates=GROUPS, tune_layernorm=True)


def test_layernorms_train_at_a_tenth_of_the_lr() -> None:
    """moe.py L586-603: the LayerNorms in a parameter group of their own at OPTIM.LR x 0.1, everything
    else at OPTIM.LR; Dassl's scheduler then runs each group's cosine from its own base lr."""
    clip = load_clip("tiny")
    m = MoCoOp(clip, CLASSES, templates=GROUPS, tune_layernorm=True)
    rest, ln = m.optimizer_param_groups()
    assert ln["lr_scale"] == 0.1 and "lr_scale" not in rest
    ln_ids = {id(p) for part in m.trainable_backbone_parts for p in clip.get_submodule(part).parameters()}
    assert {id(p) for p in ln["params"]} == ln_ids and not ln_ids & {id(p) for p in rest["params"]}
    assert len(ln["params"]) + len(rest["params"]) == len(m.trainable_parameters())
    assert len(MoCoOp(load_clip("tiny"), CLASSES, templates=GROUPS).optimizer_param_groups()) == 1
    # Dassl (ConstantWarmupScheduler over CosineAnnealingLR) on the reference's two groups, 50 epochs,
    # 5 warm-up at 1e-5, replayed with torch's scheduler; the engine sets lr_at(e) x lr_scale.
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.0032},
        {"params": [torch.nn.Parameter(torch.zeros(1))]},
    ]
    opt = torch.optim.SGD(groups, lr=0.032)
    opt.step()
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    for e in range(50):
        if e >= 5:  # after the warm-up every group follows its own cosine: ours is the same
            dassl = [g["lr"] for g in opt.param_groups]
            assert dassl == pytest.approx([0.1 * lr_at(e, 0.032, 50, 5), lr_at(e, 0.032, 50, 5)], rel=1e-9)
            opt.step()
            cosine.step()
    # During the 5 warm-up epochs Dassl holds every group at 1e-5; the engine scales it (1e-6 on the
    # LayerNorms), the one difference, documented in the recipes.


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


def test_routing_statistics_hooks(tiny_clip: FrozenCLIP, one_thread: None) -> None:
    """The hooks alone: nothing is filed outside an evaluation or twice for one forward pass; the
    fractions are the per-expert counts over the images, to 4 places; ``images`` is an integer."""
    m = MoCoOp(tiny_clip, CLASSES[:3], templates=GROUPS, top_k=2)  # 3 classes, 4 experts
    x = torch.randn(3, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(8))
    labels = torch.tensor([2, 0, 2])
    with torch.no_grad():
        m.observe_eval(m(image_features=x), labels)  # not evaluating: nothing kept
        assert m.end_eval() == {}
        m.begin_eval()
        m.observe_eval(torch.zeros(3, 3), labels)  # no forward pass since the evaluation began
        m.observe_eval(m(image_features=x), labels)
        m.observe_eval(torch.zeros(3, 3), labels)  # the same batch is not filed twice
        idx = route(m.router(F.normalize(x, dim=-1)), 2)[1]
    r = m.end_eval()["routing"]
    counts = [int((idx == e).sum()) for e in range(4)]
    assert type(r["images"]) is int and r["images"] == 3
    assert r["chosen_fraction"] == [round(c / 3, 4) for c in counts]
    assert any(round(c / 3, 4) != round(c / 3, 5) for c in counts)  # the rounding is seen
    assert r["per_class"] == {
        c: [int((idx[labels == y] == e).sum()) for e in range(4)] for y, c in enumerate(CLASSES[:3])
    }
    with torch.no_grad():  # one image: each chosen expert's fraction is 1
        m.begin_eval()
        m.observe_eval(m(image_features=x[:1]), labels[:1])
    r = m.end_eval()["routing"]
    assert r["images"] == 1 and sorted(r["chosen_fraction"]) == [0.0, 0.0, 1.0, 1.0]


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
    # " texture" is 2 words to the reference: the word and the end token's slot (moe.py L169-178)
    assert [r["l2"][0][0] for r in rows if r["expert"] == 0] == ["texture", "<end_of_text>"]
    assert [r["l2"][0][0] for r in rows if r["expert"] == 1] == ["a", "photo", "of", "a"]
    text = format_interpretation(rows)
    assert "expert 0 (texture): nearest words (L2): texture <end_of_text>" in text
    assert "expert 3 (low resolution): nearest words (L2): a low resolution photo of the" in text


# ---------------------------------------------------------------------- a short run
def test_router_follows_the_gate_loss(tiny_clip: FrozenCLIP, tmp_path: Path) -> None:
    feats = torch.randn(1, 128, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(128) % 4

    def agreement(m: MoCoOp) -> float:
        with torch.no_grad():
            img = F.normalize(feats[0], dim=-1)
            if not m._supervision_ready:
                m._build_supervision()
            top2 = (
                soft_gate_target(img, m._protos[:, labels]).topk(2, dim=1).indices
            )  # the soft target's mass
            return float((m.router(img).argmax(-1)[:, None] == top2).any(1).float().mean())

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
            lr_schedule=lambda k: 0.5,
            generator=torch.Generator().manual_seed(0),
            run_dir=tmp_path / str(weight),
            device=torch.device("cpu"),
            checkpoint_every=100,
        )
        result[weight] = (start, agreement(m))
    (start, with_gate), (_, without) = result[1.0], result[0.0]
    assert with_gate > 0.7 and with_gate > start + 0.3, result
    assert with_gate > without + 0.3, result


# ---------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    "name", ["base2new/mocoop_vit_b16", "fewshot/mocoop_vit_b16", "sandbox/mocoop_base2new"]
)
def test_recipes_hold_the_reference_configuration(name: str) -> None:
    """dyabel/mocoop configs/MoCoOp/vit_b16_c4_ep50_batch32_cls_t2t_10_wcl_25_g1_b_lr32.yaml as the code reads it."""
    cfg = load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.yaml", check_paths=False)
    m, t = cfg.method, cfg.train
    assert (m.top_k, m.gate_loss_weight, m.text_correction, m.gate_target) == (2, 1.0, True, "shuffled")
    assert m.text_loss_weight == 1.0  # TEXT_LOSS_WEIGHT is never set: train.py's default
    assert m.tune_layernorm and m.layernorm_lr_scale == 0.1  # FINETUNE_VIT_LN, lr x 0.1
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.032, 0.9, 5e-4)
    assert (t.epochs, t.warmup_epochs, t.warmup_lr, t.warmup_type, t.batch_size) == (
        50,
        5,
        1e-5,
        "constant",
        32,
    )
    assert t.grad_clip == 1.0 and t.amp == ("fp32" if name.startswith("sandbox") else "fp16")  # PREC amp
