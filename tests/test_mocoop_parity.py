"""MoCoOp against a re-statement of the reference code, dyabel/mocoop (HEAD 04b5d2a).

The ``ref_*`` functions below restate ``prompting/moe.py`` (PromptLearner, CustomCLIP) and
``prompting/losses.py`` (moe_contrastive_loss) line by line, on open_clip's own modules and
tokenizer, with none of promptlab's prompt, encoding or loss code. Line numbers cite moe.py / losses.py.
"""

from __future__ import annotations

import copy
import itertools

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

from promptlab.backbones import load_clip
from promptlab.methods import MoCoOp

_tokenizer = SimpleTokenizer()

# First templates of every shape the reference meets: words on both sides; a leading-space tail
# (" texture" counts 2 words for 1 token); a double space (Food101's "a photo of a  {}."); a
# hyphenated word (StanfordCars: 5 words, 7 tokens); a group of 3 templates.
TEMPLATES = [
    "a photo of a {}, a type of pet.",
    "a photo of the small {}.",
    "{} texture.",
    "a photo of a  {}.",
    "A photo of the high-performance {}.",
    "a photo of the modern {}.",
    "a photo of the fast {}.",
]
GROUP_SIZES = [2, 1, 1, 3]
ALL = ["cat", "sea_lion", "golden retriever", "fire_truck", "dog", "Yorkshire_terrier", "ox"]
BASE = ALL[:4]  # the first ceil(7 / 2) labels


def _groups() -> dict[str, list[str]]:
    out, i = {}, 0
    for k, n in enumerate(GROUP_SIZES):
        out[f"g{k}"] = TEMPLATES[i : i + n]
        i += n
    return out


# ---------------------------------------------------------------------- the reference, restated
def ref_text_encoder(model, prompts: torch.Tensor, tokenized: torch.Tensor) -> torch.Tensor:
    """TextEncoder.forward (moe.py L97-107) on open_clip's modules and causal mask."""
    x = prompts + model.positional_embedding
    if not getattr(model.transformer, "batch_first", True):
        x = model.transformer(x.permute(1, 0, 2), attn_mask=model.attn_mask).permute(1, 0, 2)
    else:
        x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)]
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Module) else x @ proj


def ref_prompt_learner(model, prompts_cfg, groups, classnames, all_classnames, subsample):
    """PromptLearner.__init__ (moe.py L130-236) and construct_references_lasp (L239-274)."""
    ctx_init = [0] + list(itertools.accumulate(groups))[:-1]  # L135
    before_all = [p.replace(".", "").split("{}")[0][:-1] for p in prompts_cfg]  # L151
    after_all = [p.replace(".", "").split("{}")[1] for p in prompts_cfg]  # L152
    pl = {"ctx_before": [], "ctx_after": [], "n_ctx_before": [], "n_ctx_after": [], "ctx_init": ctx_init}
    for idx in ctx_init:  # L157-179
        for part, key in ((before_all[idx], "before"), (after_all[idx], "after")):
            n_ctx = 0 if len(part) == 0 else len(part.split(" "))
            with torch.no_grad():
                emb = model.token_embedding(open_clip.tokenize(part.replace("_", " ")))
            pl[f"ctx_{key}"].append(emb[0, 1 : 1 + n_ctx, :].clone())
            pl[f"n_ctx_{key}"].append(n_ctx)
    classnames = [n.replace("_", " ") for n in classnames]  # L187-188
    all_classnames = [n.replace("_", " ") for n in all_classnames]

    def buffers(names, period):  # L200-211 (period=""), L262-271 (period=".")
        out = []
        for i in range(len(ctx_init)):
            b, a = before_all[ctx_init[i]], after_all[ctx_init[i]]
            tok = torch.cat([open_clip.tokenize(b + " " + n + a + period) for n in names])
            with torch.no_grad():
                emb = model.token_embedding(tok)
            out.append((tok, emb[:, :1, :], emb[:, 1 + pl["n_ctx_before"][i] :, :]))
        return out

    pl["cls"] = buffers(classnames, "")
    pl["name_lens"] = [len(_tokenizer.encode(n)) for n in classnames]  # L197
    ref_names = all_classnames if subsample == "base" else classnames  # L213-217
    feats = []
    for i in range(len(prompts_cfg)):  # L244-252
        tok = torch.cat([open_clip.tokenize(before_all[i] + " " + n + after_all[i] + ".") for n in ref_names])
        with torch.no_grad():
            feats.append(ref_text_encoder(model, model.token_embedding(tok), tok))
    feats = torch.stack(feats)
    feats = feats / feats.norm(dim=-1, keepdim=True)  # L255
    grouped = torch.stack([g.mean(dim=0) for g in torch.split(feats, groups)])  # L257
    pl["grouped_prototypes"] = grouped / grouped.norm(dim=-1, keepdim=True)  # L258
    pl["all"] = buffers(ref_names, ".")
    pl["all_name_lens"] = [len(_tokenizer.encode(n)) for n in ref_names]
    return pl


def ref_construct_prompts(n_ctx_after, ctx_before, ctx_after, prefix, suffix, name_lens):
    """PromptLearner.construct_prompts (moe.py L297-320), ctx_* given per class."""
    prompts = []
    for i in range(len(prefix)):
        name_len = name_lens[i]
        prompts.append(
            torch.cat(
                [
                    prefix[i : i + 1],
                    ctx_before[i].unsqueeze(0),
                    suffix[i : i + 1, :name_len],
                    ctx_after[i].unsqueeze(0),
                    suffix[i : i + 1, name_len + n_ctx_after :],
                ],
                dim=1,
            )
        )
    return torch.cat(prompts, dim=0)


def ref_expert_features(model, pl, ctx_before, ctx_after, w, which: str) -> torch.Tensor:
    """PromptLearner.forward (L325-347) + the per-expert encoding, correction and norm (L420-429, L457-475)."""
    lens = pl["name_lens"] if which == "cls" else pl["all_name_lens"]
    out = []
    for i, (tok, prefix, suffix) in enumerate(pl[which]):
        n = len(prefix)
        p = ref_construct_prompts(
            pl["n_ctx_after"][i],
            ctx_before[i].unsqueeze(0).expand(n, -1, -1),
            ctx_after[i].unsqueeze(0).expand(n, -1, -1),
            prefix,
            suffix,
            lens,
        )
        assert p.shape[1] == 77
        f = ref_text_encoder(model, p, tok)
        if w is not None:
            f = f + w
        out.append(f / f.norm(dim=-1, keepdim=True))
    return torch.stack(out)  # [E, C, D]


def ref_forward(model, pl, gate, ctx_before, ctx_after, w, images, label, subsample, text_w, gate_w):
    """CustomCLIP.forward (moe.py L495-527) with the training branch: the loss and the logits."""
    image_features = model.visual(images)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    gating = gate(image_features)  # L405
    top, indices = torch.topk(gating, k=2)  # L413
    experts = ref_expert_features(model, pl, ctx_before, ctx_after, w, "cls")
    stacked = torch.stack([torch.stack([experts[j] for j in indices[b]]) for b in range(len(images))])
    text_features = torch.einsum("bk,bkcd->bcd", torch.softmax(top, dim=1), stacked)  # L439-441
    # forward_text_to_text (L445-491) and moe_contrastive_loss's non-instance branch (losses.py L87-108)
    t_feats = (
        ref_expert_features(model, pl, ctx_before, ctx_after, w, "all") if subsample == "base" else experts
    )
    grouped = pl["grouped_prototypes"]
    n_all = grouped.shape[1]
    t_label = torch.arange(n_all).unsqueeze(0).expand(len(t_feats), -1).reshape(-1)  # L483, losses.py L100
    t_logits = torch.einsum("gcd, ged->gce", t_feats, grouped).view(-1, t_feats.shape[1], n_all)  # no t.exp()
    loss_text = F.cross_entropy(t_logits.reshape(len(t_label), -1), t_label)  # losses.py L108
    # the router target (L510-513, increase_top2_logits L110-127)
    text_gating = torch.einsum("bd, gbd->bg", image_features, grouped[:, label])
    _, top2 = torch.topk(text_gating, k=2)
    text_gating = text_gating + torch.zeros_like(text_gating).scatter(1, top2, 10.0)
    logits = model.logit_scale.exp() * torch.einsum(
        "bd, bcd->bc", image_features, text_features
    )  # losses.py L97
    loss = F.cross_entropy(logits, label) + text_w * loss_text  # L515-519
    loss = loss + gate_w * F.cross_entropy(gating, F.softmax(text_gating, dim=1))  # L523
    return loss, logits


# ---------------------------------------------------------------------- parity
def _perturb(t: torch.Tensor, seed: int) -> torch.Tensor:
    return 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["base_published", "base_own_class", "all"])
def test_mocoop_matches_reference(mode: str) -> None:
    """Logits, the whole loss (CE + text + gate) and every gradient, LayerNorms tuned, as moe.py computes them."""
    clip = load_clip("tiny")  # its own: the LayerNorms learn
    model = copy.deepcopy(clip.model)  # the reference's CLIP, with the same weights
    base = mode != "all"
    classnames = BASE if base else ALL
    torch.manual_seed(7)
    m = MoCoOp(
        clip,
        classnames,
        templates=_groups(),
        all_classnames=ALL,
        tune_layernorm=True,
        text_loss_weight=1.0,
        gate_target="own" if mode == "base_own_class" else "shuffled",
    )
    # the reference's list(set(names)) order: label y points at names[order[y]] (moe.py L511)
    order = m._set_order.tolist() if mode == "base_published" else list(range(len(ALL)))
    assert (m._set_order is not None) == (mode == "base_published")
    ref_all = [ALL[j] for j in order]
    pl = ref_prompt_learner(model, TEMPLATES, GROUP_SIZES, classnames, ref_all, "base" if base else "all")

    # initialisation: the expert contexts are the reference's ctx_before / ctx_after, w starts at 0
    for e, c in enumerate(m.ctx):
        ref_init = torch.cat([pl["ctx_before"][e], pl["ctx_after"][e]])
        torch.testing.assert_close(c.detach(), ref_init, atol=0, rtol=0)
    assert [c.shape[0] for c in m.ctx] == [4 + 5, 0 + 2, 5 + 0, 5 + 0]
    assert torch.equal(m.correction.detach(), torch.zeros(1, clip.embed_dim))

    with torch.no_grad():  # move away from the initialisation, the same way on both sides
        for e, c in enumerate(m.ctx):
            c.add_(_perturb(c, e))
        m.correction.add_(_perturb(m.correction, 99))
        for part in m.trainable_backbone_parts:
            clip.get_submodule(part).weight.add_(_perturb(clip.get_submodule(part).weight, 50))
        model.load_state_dict(clip.model.state_dict())
    nb = [len(t) for t in pl["ctx_before"]]
    ctx_before = [c.detach()[: nb[e]].clone().requires_grad_(True) for e, c in enumerate(m.ctx)]
    ctx_after = [c.detach()[nb[e] :].clone().requires_grad_(True) for e, c in enumerate(m.ctx)]
    w = m.correction.detach().clone().requires_grad_(True)
    gate = torch.nn.Linear(clip.embed_dim, len(m.ctx))
    gate.load_state_dict(m.router.state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    ref_ln = [model.get_submodule(part.removeprefix("model.")) for part in m.trainable_backbone_parts]
    for ln in ref_ln:
        ln.requires_grad_(True)

    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    logits = m(images)
    loss = m.loss(logits, labels)
    loss.backward()
    ref_loss, ref_logits = ref_forward(
        model, pl, gate, ctx_before, ctx_after, w, images, labels, "base" if base else "all", 1.0, 1.0
    )
    ref_loss.backward()

    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)

    def close(got: torch.Tensor, ref: torch.Tensor) -> None:
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))

    for e, c in enumerate(m.ctx):
        close(c.grad, torch.cat([ctx_before[e].grad, ctx_after[e].grad]))
    close(m.correction.grad, w.grad)
    close(m.router.weight.grad, gate.weight.grad)
    close(m.router.bias.grad, gate.bias.grad)
    for part, ln in zip(m.trainable_backbone_parts, ref_ln):
        close(clip.get_submodule(part).weight.grad, ln.weight.grad)
        close(clip.get_submodule(part).bias.grad, ln.bias.grad)
