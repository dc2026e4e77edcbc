"""Prompt export / import: round trips, backbone checks, nearest-token reading (reference checkpoints: test_importers)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from promptlab import export
from promptlab.backbones import TINY_CONFIGS, load_clip
from promptlab.clip import FrozenCLIP
from promptlab.export import (
    format_interpretation,
    interpret,
    load_prompts,
    save_prompts,
)
from promptlab.methods import CoOp, ZeroShotCLIP

CLASSES = ["cat", "golden_retriever", "sports car", "tree"]


@pytest.fixture(scope="module")
def eclip() -> FrozenCLIP:
    return load_clip("tiny")


@pytest.fixture(scope="module")
def feats(eclip: FrozenCLIP) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, eclip.embed_dim, generator=g)  # [B, D] image features


def _coop(clip: FrozenCLIP, classnames=CLASSES, **kw) -> CoOp:
    torch.manual_seed(1)
    m = CoOp(clip, classnames, **kw)
    with torch.no_grad():
        m.ctx.add_(0.05 * torch.randn_like(m.ctx))  # "trained": differs from any fresh init
    return m


def _other_clip(*, text_width: int = 32, seed: int = 1) -> FrozenCLIP:
    cfg = {**TINY_CONFIGS["tiny"], "text_cfg": dict(layers=2, width=text_width, heads=2)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(**cfg)
    return load_clip(model)


MODULES = {
    "coop-unified": lambda c: _coop(c, n_ctx=4),
    "coop-csc": lambda c: _coop(c, n_ctx=3, csc=True),
    "coop-middle": lambda c: _coop(c, n_ctx=4, class_token_position="middle"),
    "coop-front-init": lambda c: _coop(c, ctx_init="a photo of a", class_token_position="front"),
    "zeroshot": lambda c: ZeroShotCLIP(c, CLASSES, templates=["a photo of a {}.", "a drawing of a {}."]),
}


# ---------------------------------------------------------------------- round trip
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_round_trip_same_logits(kind: str, eclip: FrozenCLIP, feats: torch.Tensor, tmp_path: Path) -> None:
    m = MODULES[kind](eclip)
    cfg_path = save_prompts(m, tmp_path / "prompts", extra={"run": "r1"})
    assert cfg_path == tmp_path / "prompts" / "prompt_config.json"
    rng = torch.get_rng_state()
    back = load_prompts(tmp_path / "prompts", eclip)
    assert torch.equal(rng, torch.get_rng_state()), "loading must not consume the caller's RNG"
    assert type(back) is type(m) and back.classnames == m.classnames and back.hparams == m.hparams
    with torch.no_grad():
        torch.testing.assert_close(back(image_features=feats), m(image_features=feats), rtol=0, atol=0)
    for k, v in m.prompt_state_dict().items():
        assert torch.equal(back.prompt_state_dict()[k], v)
    cfg = json.loads(cfg_path.read_text())
    assert cfg["run"] == "r1" and cfg["method"] in ("coop", "zeroshot")
    assert cfg["arch"] == eclip.arch and cfg["fingerprint"] == eclip.fingerprint()
    assert cfg["width"] == eclip.width and cfg["embed_dim"] == eclip.embed_dim and "promptlab_version" in cfg
    # the config file itself and a run directory holding prompts/ are accepted too
    assert load_prompts(cfg_path, eclip).classnames == m.classnames
    assert load_prompts(tmp_path, eclip).classnames == m.classnames


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_class_embeddings_file(kind: str, eclip: FrozenCLIP, feats: torch.Tensor, tmp_path: Path) -> None:
    m = MODULES[kind](eclip)
    save_prompts(m, tmp_path)
    cfg = json.loads((tmp_path / "prompt_config.json").read_text())
    info = cfg["class_embeddings"]
    data = load_file(tmp_path / info["file"])
    W = data[info["key"]]  # [C, D]
    assert list(W.shape) == info["shape"] == [len(CLASSES), eclip.embed_dim]
    torch.testing.assert_close(W, m.class_embeddings(), rtol=0, atol=0)
    torch.testing.assert_close(W.norm(dim=-1), torch.ones(len(CLASSES)))
    # used without promptlab, as the JSON documents it
    logits = cfg["logit_scale"] * F.normalize(feats, dim=-1) @ W.T
    with torch.no_grad():
        ref = m(image_features=feats)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_only_learned_tensors_saved(kind: str, eclip: FrozenCLIP, tmp_path: Path) -> None:
    m = MODULES[kind](eclip)
    save_prompts(m, tmp_path)
    saved = load_file(tmp_path / "prompts.safetensors")
    expected = {"ctx"} if isinstance(m, CoOp) else set()
    assert set(saved) == expected
    assert not any(k.startswith("clip.") or k.startswith("_") for k in saved)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in saved.values())
    cfg = json.loads((tmp_path / "prompt_config.json").read_text())
    assert cfg["tensors"] == {k: list(v.shape) for k, v in saved.items()}


def test_set_classnames_on_load(eclip: FrozenCLIP, feats: torch.Tensor, tmp_path: Path) -> None:
    m = _coop(eclip, n_ctx=4)
    save_prompts(m, tmp_path)
    new = ["dog", "boat"]
    back = load_prompts(tmp_path, eclip, classnames=new)
    ref = _coop(eclip, classnames=new, n_ctx=4)
    with torch.no_grad():
        ref.ctx.copy_(m.ctx)
        torch.testing.assert_close(back(image_features=feats), ref(image_features=feats), rtol=0, atol=0)


def test_csc_onto_other_class_count_fails(eclip: FrozenCLIP, tmp_path: Path) -> None:
    save_prompts(_coop(eclip, n_ctx=2, csc=True), tmp_path)
    with pytest.raises(ValueError, match=r"prompt_config\.json.*4 contexts.*3 classes"):
        load_prompts(tmp_path, eclip, classnames=["a", "b", "c"])


# ---------------------------------------------------------------------- refusals
def test_different_width_fails_naming_file_and_widths(eclip: FrozenCLIP, tmp_path: Path) -> None:
    save_prompts(_coop(eclip, n_ctx=2), tmp_path)
    wide = _other_clip(text_width=48)
    assert wide.width == 48
    with pytest.raises(ValueError, match=r"prompt_config\.json.*width 32.*width 48"):
        load_prompts(tmp_path, wide)
    with pytest.raises(ValueError, match="width 32.*width 48"):  # shapes cannot be waived
        load_prompts(tmp_path, wide, strict_weights=False)


def test_fingerprint_mismatch(eclip: FrozenCLIP, feats: torch.Tensor, tmp_path: Path, caplog) -> None:
    m = _coop(eclip, n_ctx=2)
    save_prompts(m, tmp_path)
    other = _other_clip(seed=7)
    assert other.width == eclip.width and other.fingerprint() != eclip.fingerprint()
    with pytest.raises(ValueError, match=r"prompt_config\.json.*fingerprint.*strict_weights=False"):
        load_prompts(tmp_path, other)
    with caplog.at_level(logging.WARNING, logger="promptlab.export"):
        back = load_prompts(tmp_path, other, strict_weights=False)
    assert "fingerprint" in caplog.text
    assert torch.equal(back.ctx, m.ctx) and back.clip is other


def test_missing_files_and_unknown_method(eclip: FrozenCLIP, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prompt_config.json"):
        load_prompts(tmp_path / "nothing", eclip)
    save_prompts(_coop(eclip, n_ctx=2), tmp_path)
    cfg_path = tmp_path / "prompt_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "method": "telepathy", "component": None}))  # no import path
    with pytest.raises(ValueError, match=r"prompt_config\.json.*telepathy.*coop.*zeroshot"):
        load_prompts(tmp_path, eclip)
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "prompts.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"prompts\.safetensors"):
        load_prompts(tmp_path, eclip)


def test_mixed_exports_are_refused(eclip: FrozenCLIP, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    save_prompts(_coop(eclip, n_ctx=2), a)
    m2 = _coop(eclip, n_ctx=2)
    with torch.no_grad():
        m2.ctx.mul_(2)
    save_prompts(m2, b)
    (a / "prompts.safetensors").write_bytes((b / "prompts.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"prompts\.safetensors does not match"):
        load_prompts(a, eclip)


def test_extra_may_not_override_reserved_keys(eclip: FrozenCLIP, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_prompts(_coop(eclip, n_ctx=2), tmp_path, extra={"method": "x"})
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- atomic replacement
def test_failed_save_keeps_previous_export(eclip: FrozenCLIP, tmp_path: Path, monkeypatch) -> None:
    old = _coop(eclip, n_ctx=2)
    save_prompts(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = {"n": 0}
    real_stage = export.io.stage

    def flaky_stage(path, write):
        calls["n"] += 1
        if calls["n"] == 2:  # the first file is staged, the second dies half-written
            return real_stage(path, lambda f: (f.write(b"half"), (_ for _ in ()).throw(OSError("disk full"))))
        return real_stage(path, write)

    monkeypatch.setattr(export.io, "stage", flaky_stage)
    new = _coop(eclip, n_ctx=2)
    with torch.no_grad():
        new.ctx.mul_(3)
    with pytest.raises(OSError, match="disk full"):
        save_prompts(new, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # intact, no temp files
    assert torch.equal(load_prompts(tmp_path, eclip).ctx, old.ctx)
    monkeypatch.setattr(export.io, "stage", real_stage)
    save_prompts(new, tmp_path)
    assert torch.equal(load_prompts(tmp_path, eclip).ctx, new.ctx)


def test_stale_class_embeddings_removed(eclip: FrozenCLIP, tmp_path: Path, monkeypatch) -> None:
    save_prompts(_coop(eclip, n_ctx=2), tmp_path)
    assert (tmp_path / "class_embeddings.safetensors").exists()
    m = _coop(eclip, n_ctx=2)
    monkeypatch.setattr(type(m), "text_depends_on_image", True)
    save_prompts(m, tmp_path)
    assert not (tmp_path / "class_embeddings.safetensors").exists()
    assert "class_embeddings" not in json.loads((tmp_path / "prompt_config.json").read_text())


# ---------------------------------------------------------------------- interpretation
WORDS = ["photo", "dog", "car", "tree"]


def _word_ids(clip: FrozenCLIP, words: list[str]) -> list[int]:
    return [clip.tokenizer.encode(w)[0] for w in words]


def test_interpret_exact_words(eclip: FrozenCLIP) -> None:
    ids = _word_ids(eclip, WORDS)
    m = CoOp(eclip, CLASSES, n_ctx=len(WORDS))
    with torch.no_grad():
        m.ctx.copy_(eclip._tok_emb.weight[ids])
    rows = interpret(m, eclip, topk=3)
    assert [r["position"] for r in rows] == list(range(len(WORDS))) and all(r["class"] is None for r in rows)
    for row, w in zip(rows, WORDS):
        assert len(row["cosine"]) == len(row["l2"]) == 3
        assert row["cosine"][0][0] == w and row["cosine"][0][1] == pytest.approx(1.0, abs=1e-5)
        assert row["l2"][0][0] == w and row["l2"][0][1] == pytest.approx(0.0, abs=1e-5)
        assert row["l2"][1][1] >= row["l2"][0][1] and row["cosine"][1][1] <= row["cosine"][0][1]
    text = format_interpretation(rows)
    assert "nearest words (L2): photo dog car tree" in text and "'photo'" in text


def test_interpret_class_specific_tensor(eclip: FrozenCLIP) -> None:
    ids = torch.tensor(_word_ids(eclip, WORDS)).reshape(2, 2)  # [C=2, n_ctx=2]
    ctx = eclip._tok_emb.weight[ids].detach()  # [2, 2, W]
    rows = interpret(ctx, eclip, topk=2)
    assert [(r["class"], r["position"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["l2"][0][0] for r in rows] == WORDS and [r["cosine"][0][0] for r in rows] == WORDS
    assert "class 1" in format_interpretation(rows)
    with pytest.raises(ValueError, match="no 'ctx'"):
        interpret(ZeroShotCLIP(eclip, CLASSES), eclip)


def test_interpret_matches_coop_distance_with_ties_by_id_and_no_unlearned_tokens() -> None:
    """A vocabulary like the sandbox CLIP's: most rows zero (never learned), some rows equal.

    Reference: KaiyangZhou/CoOp interpret_prompt.py L45-48 (``torch.cdist(ctx, token_embedding)``,
    ``argsort``), restated here in float64 over the learned rows, equal distances by token id.
    """
    clip = load_clip("tiny")
    table = clip._tok_emb.weight  # [V, W]
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(table.shape[0], generator=g)[:300].sort().values  # the learned rows
    ids = _word_ids(clip, WORDS)  # photo, dog, car, tree
    with torch.no_grad():
        learned = table[keep].clone()
        table.zero_()
        table[keep] = learned
        table[ids] = torch.randn(table.shape[1], generator=g)  # four tokens with one embedding
    ctx = torch.stack(
        [
            table[ids[0]] + 1e-3 * torch.randn(table.shape[1], generator=g),  # next to the four twins
            1e-3 * torch.randn(table.shape[1], generator=g),  # nearer to every zero row than to any word
        ]
    ).detach()
    rows = interpret(ctx, clip, topk=6)

    emb = table.detach().double()
    dist = ((ctx.double()[:, None, :] - emb[None]) ** 2).sum(-1).sqrt()  # [2, V], term by term
    learned_ids = [i for i in range(emb.shape[0]) if emb[i].abs().sum() > 0]
    for row, d in zip(rows, dist):
        ranked = sorted(learned_ids, key=lambda i: (d[i].item(), i))[:6]
        assert [v for _, v in row["l2"]] == pytest.approx([d[i].item() for i in ranked], abs=1e-9)
    words = sorted(ids)  # equal distances: ascending token id, in both rankings
    names = {i: w for i, w in zip(ids, WORDS)}
    assert [t for t, _ in rows[0]["l2"][:4]] == [names[i] for i in words]
    assert [t for t, _ in rows[0]["cosine"][:4]] == [names[i] for i in words]
    l2 = [v for _, v in rows[0]["l2"][:4]]
    assert l2[0] == l2[1] == l2[2] == l2[3]
    # the tiny vector's neighbours are learned words, not zero rows tied at distance |ctx|
    assert len({v for _, v in rows[1]["l2"]}) == 6
    assert rows[1]["l2"][0][1] > ctx[1].norm().item() * 10
