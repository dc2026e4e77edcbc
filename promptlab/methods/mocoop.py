"""MoCoOp: Mixture of Prompt Learning for Vision Language Models (Du et al., 2024, https://arxiv.org/abs/2409.12011).

One soft prompt cannot cover a dataset's styles (photos, renderings, low-resolution shots...), so
MoCoOp learns one soft-prompt expert per *group* of hand-crafted templates and lets a router pick
the top-2 experts per image. Everything below is what the reference code (dyabel/mocoop,
``prompting/moe.py`` and ``prompting/losses.py``) computes for the published numbers:

- expert e is its group's first template with every "." removed, split at ``{}``; the words before
  and after the class name become learned context, counted as the reference counts them,
  ``len(text.split(" "))`` (words, not BPE tokens; the part after ``{}`` starts with a space, so
  "{} texture." has 2 slots after the name: "texture" and the end token). The classification prompt
  has no final period (moe.py L151-211);
- a linear router on the normalised image feature scores the experts; the top-2 experts' text
  features are mixed with softmax weights over the selected two (moe.py L402-442);
- a learned correction vector, shared by all experts, is added to every expert text feature before
  normalisation (ENABLE_CORRECTION, moe.py L234-236, 426-429);
- text loss: each expert's class features against its group's hand-crafted class features
  (templates with a final "."), cross-entropy over *cosine* logits, no temperature
  (losses.py L87-108). When training on the base half, it covers every class name of the dataset,
  base and new (moe.py L213-217, 454-483);
- gate loss: cross-entropy of the router toward the *soft* target softmax(s + 10 on the top-2
  groups), s = image . hand-crafted group prototype of the image's class (moe.py L110-127, 510-523).

Template groups are data: ``datasets/template_groups/<dataset>.yaml`` (``default.yaml`` otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from promptlab.clip import FrozenCLIP
from promptlab.data.registry import datasets_dir
from promptlab.prompts import (
    PromptModule,
    encode_prompts,
    hand_crafted_features,
    insert_context,
    n_tokens,
)

log = logging.getLogger(__name__)

GROUPS_FOLDER = "template_groups"
GATE_BOOST = 10.0  # moe.py L513: increase_top2_logits(text_gating, increment=10.0)
GATE_TARGETS = ("shuffled", "own")


# ---------------------------------------------------------------------- template groups (data)
def load_template_groups(dataset_name: str | None) -> dict[str, list[str]]:
    """The template groups shipped for a dataset (``datasets/template_groups/<name>.yaml``), else ``default.yaml``.

    A file may hold ``same_as: <other dataset>`` instead of ``groups:``: datasets drawn from one world
    (the sandbox's, whose captions fix the words its CLIP knows) share one list rather than copies of it.
    """
    folder = datasets_dir() / GROUPS_FOLDER
    path = folder / f"{dataset_name}.yaml"
    if dataset_name is None or not path.is_file():
        if dataset_name is not None:
            log.warning("no template groups for dataset %r in %s: using default.yaml", dataset_name, folder)
        path = folder / "default.yaml"
    raw = yaml.safe_load(path.read_text())
    if isinstance(raw, dict) and set(raw) == {"same_as"}:
        name = str(raw["same_as"])
        target = folder / f"{name}.yaml"
        raw = yaml.safe_load(target.read_text()) if "/" not in name and target.is_file() else None
        if not isinstance(raw, dict) or not isinstance(raw.get("groups"), dict):
            raise ValueError(f"{path}: same_as must name a file of {folder} that lists its own 'groups:'")
    if not isinstance(raw, dict) or not isinstance(raw.get("groups"), dict):
        raise ValueError(f"{path}: expected a mapping 'groups: {{name: [template, ...]}}'")
    return check_groups(raw["groups"], source=str(path))


def check_groups(
    groups: dict[str, list[str]] | Sequence[Sequence[str]], source: str = "templates"
) -> dict[str, list[str]]:
    """Named groups of templates; a list of lists is named after each group's first template."""
    if not isinstance(groups, dict):
        groups = {str(g[0]) if g else str(i): list(g) for i, g in enumerate(groups)}
    out = {str(k): [str(t) for t in v] for k, v in groups.items()}
    bad = [k for k, v in out.items() if not v or any(t.count("{}") != 1 for t in v)]
    if not out or bad:
        raise ValueError(
            f"{source}: every group needs templates with exactly one '{{}}'; bad groups: {bad or 'none given'}"
        )
    return out


def template_parts(template: str) -> tuple[str, str]:
    """The reference's split (moe.py L151-152): every "." removed, the character before ``{}`` dropped.

    "a photo of a {}, a type of pet." -> ("a photo of a", ", a type of pet"); "{} texture." -> ("", " texture").
    """
    before, after = template.replace(".", "").split("{}")
    return before[:-1], after


def word_count(text: str) -> int:
    """Context slots for ``text`` as the reference counts them (moe.py L158-172): ``len(text.split(" "))``, 0 for ""."""
    return len(text.split(" ")) if text else 0


# ---------------------------------------------------------------------- shared maths of the mixture
def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, E] router logits -> (weights [B, k] softmax over the selected k, indices [B, k])."""
    top, idx = router_logits.topk(min(top_k, router_logits.shape[-1]), dim=-1)
    return top.softmax(dim=-1), idx


def mix_expert_logits(expert_logits: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, E, C] per-expert logits, top-k weights/indices [B, k] -> [B, C] mixed logits.

    Mixing the expert text features with convex weights (the reference) and mixing their logits
    are the same linear map, so only the selected experts' logits are gathered.
    """
    chosen = expert_logits.gather(1, idx[..., None].expand(-1, -1, expert_logits.shape[-1]))  # [B, k, C]
    return (weights[..., None] * chosen).sum(1)


def soft_gate_target(image_features: torch.Tensor, group_features: torch.Tensor) -> torch.Tensor:
    """[B, E] router target: softmax(s + 10 on the top-2 groups), s = [B, D] image . [E, B, D] group features."""
    sim = torch.einsum("bd,ebd->be", image_features, group_features)  # [B, E]
    top = sim.topk(min(2, sim.shape[1]), dim=1).indices
    return (sim + torch.zeros_like(sim).scatter(1, top, GATE_BOOST)).softmax(dim=1)


def text_to_text_loss(expert_features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Each expert's class feature must pick its own class among its group's hand-crafted class features.

    expert_features, prototypes: [E, C, D], L2-normalised. Plain cosine logits (the reference has no
    temperature here); cross-entropy over classes, mean over experts and classes.
    """
    sims = expert_features @ prototypes.transpose(1, 2)  # [E, C, C]: expert e's class c vs its group's
    # cross-entropy toward class c for row c (the diagonal): the reference's CE with labels arange(C)
    return -sims.log_softmax(-1).diagonal(dim1=-2, dim2=-1).mean()


# ---------------------------------------------------------------------- the method
class MoCoOp(PromptModule):
    """Mixture of soft-prompt experts with an image router, hard-prompt gating and grouped text supervision.

    Args:
        templates: template groups ``{name: [template, ...]}`` or ``[[template, ...], ...]``; ``None``:
            the groups shipped for ``dataset_name`` (``datasets/template_groups/``).
        dataset_name: filled by the runner from the dataset, to look up its template groups.
        all_classnames: filled by the runner: every class name of the dataset. When they are more than
            ``classnames`` (training on the base half) the text loss covers all of them, as the reference does.
        n_ctx: random N(0, 0.02) context slots (before the name) for a group whose first template has no
            words besides ``{}`` (none of the shipped groups; the reference would learn nothing there).
        top_k: experts mixed per image.
        text_loss_weight: weight of the text-to-text loss (TEXT_LOSS_WEIGHT).
        gate_loss_weight: weight of the router's cross-entropy toward the hard prompts (GATE_LOSS_WEIGHT).
        text_correction: learn the correction vector added to every expert text feature (ENABLE_CORRECTION).
        gate_target: ``"shuffled"`` reproduces the published runs: on the base half the reference picks the
            image's group prototypes by its base label from a ``list(set(all names))``, so label y points
            at an arbitrary class (a permutation drawn here from the seeded RNG); ``"own"``: the image's class.
        tune_layernorm: also train the LayerNorms of the image tower's blocks (FINETUNE_VIT_LN; then image
            features are not cacheable). This switches ``requires_grad`` on in ``clip``: give the module a
            backbone of its own.
        layernorm_lr_scale: the LayerNorms' learning rate relative to the schedule's (moe.py L586-603: x 0.1).
    """

    text_depends_on_image = True  # the mixture is chosen per image
    fp32_in_reference = ("ctx", "router")  # the reference trains with AMP: fp32 learned tensors

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        templates: dict[str, list[str]] | list[list[str]] | None = None,
        dataset_name: str | None = None,
        all_classnames: Sequence[str] | None = None,
        n_ctx: int = 4,
        top_k: int = 2,
        text_loss_weight: float = 1.0,
        gate_loss_weight: float = 1.0,
        text_correction: bool = True,
        gate_target: str = "shuffled",
        tune_layernorm: bool = False,
        layernorm_lr_scale: float = 0.1,
    ):
        super().__init__(clip, classnames)
        self.groups = check_groups(templates) if templates is not None else load_template_groups(dataset_name)
        self.expert_names = list(self.groups)
        self.top_k, self.text_loss_weight, self.gate_loss_weight = (
            int(top_k),
            text_loss_weight,
            gate_loss_weight,
        )
        self.layernorm_lr_scale = float(layernorm_lr_scale)
        if self.top_k < 1:
            raise ValueError(f"top_k={top_k}: at least one expert must be chosen")
        if gate_target not in GATE_TARGETS:
            raise ValueError(f"gate_target={gate_target!r}: expected one of {GATE_TARGETS}")
        ctx, self._parts = [], []  # per expert: (text before, text after, slots before, slots after)
        for name, group in self.groups.items():
            before, after = template_parts(group[0])
            nb, na = word_count(before), word_count(after)
            if nb + na == 0:  # "{}.": no words to start from
                if n_ctx < 1:
                    raise ValueError(
                        f"group {name!r}: its first template has no words around '{{}}' and n_ctx={n_ctx}"
                    )
                before, nb = " ".join(["X"] * n_ctx), n_ctx
                init = nn.init.normal_(torch.empty(n_ctx, clip.width), std=0.02)
            else:  # the token embeddings of each part's first nb / na positions (moe.py L163-178)
                init = torch.cat(
                    [_leading_embeddings(clip, before, nb), _leading_embeddings(clip, after, na)]
                )
            self._parts.append((before, after, nb, na))
            ctx.append(nn.Parameter(init))
        self.ctx = nn.ParameterList(ctx)  # E x [n_e, W]
        self.router = nn.Linear(clip.embed_dim, len(ctx))
        # The reference sizes it by the text width (ctx_dim); it is added to the projected features.
        self.correction = nn.Parameter(torch.zeros(1, clip.embed_dim)) if text_correction else None
        self.all_classnames = list(all_classnames) if all_classnames is not None else None
        self.gate_target = gate_target
        self._set_order = None  # the stand-in for list(set(names)): a seeded permutation of all names
        if gate_target == "shuffled" and self._base_half():
            self._set_order = torch.randperm(len(self.all_classnames or ()))
        self._expert_cache: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._stats: torch.Tensor | None = None
        self._chosen: torch.Tensor | None = None  # [B, E] experts chosen for the last evaluation batch
        if tune_layernorm:
            # Pin the backbone's identity (cached) before its LayerNorms learn: exports and caches
            # name the pretrained weights; the tuned LayerNorms travel in prompt_state_dict.
            clip.fingerprint()
            self.image_side_frozen = False
            self.trainable_backbone_parts = _vision_layernorms(clip)
            for part in self.trainable_backbone_parts:
                clip.get_submodule(part).requires_grad_(True)
        log.info("MoCoOp: %d experts %s, top-%d", len(ctx), self.expert_names, self.top_k)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.register_class_buffers(self._layout(self.classnames, period=False, tag=""))
        self._supervision_ready = False  # text-loss prompts and prototypes: built on the first loss

    def _base_half(self) -> bool:
        """Training on part of the dataset's classes: the reference's SUBSAMPLE_CLASSES == "base" branch."""
        return self.all_classnames is not None and set(self.all_classnames) != set(self.classnames)

    def _text_classes(self) -> list[str]:
        """The class names of the text loss and of the router target (moe.py L213-217)."""
        return list(self.all_classnames or ()) if self._base_half() else self.classnames

    def _layout(self, names: Sequence[str], *, period: bool, tag: str) -> dict[str, torch.Tensor]:
        """Every expert's prompt embeddings for ``names``: the reference's token sequence of
        "before name after[.]" with its first ``nb`` slots after SOS and the ``na`` slots behind the
        name's tokens learned (moe.py L276-320)."""
        names = [n.replace("_", " ") for n in names]
        name_lens = [n_tokens(self.clip, n) for n in names]
        layouts = []
        st = self.clip.n_start_tokens  # 1 after CLIP's [SOS]; 0 for SigLIP's tokenizer
        for before, after, nb, na in self._parts:
            ids = self.clip.tokenize(
                [f"{before} {n}{after}{'.' if period else ''}" for n in names]
            )  # [C, 77]
            pos = torch.tensor(
                [list(range(st, st + nb)) + list(range(st + nb + k, st + nb + k + na)) for k in name_lens],
                dtype=torch.long,
                device=ids.device,
            ).reshape(len(names), nb + na)  # [C, n_e]
            layouts.append((ids, pos, self.clip.eot_index(ids)))
        L = max(max(int(eot.max()), int(pos.max())) for _, pos, eot in layouts) + 1
        L = L if self.clip.can_truncate_text else layouts[0][0].shape[1]  # bidirectional: full context
        with torch.no_grad():
            base = torch.stack([self.clip.embed_tokens(ids[:, :L]).float() for ids, _, _ in layouts])
        out = {
            f"_base{tag}": base,
            f"_eot{tag}": torch.stack([eot for _, _, eot in layouts]),
        }  # [E, C, L, W], [E, C]
        out.update({f"_pos{tag}_{e}": pos for e, (_, pos, _) in enumerate(layouts)})
        return out

    def _build_supervision(self) -> None:
        """Hand-crafted group prototypes [E, C_t, D] over the text-loss classes, the prompts of the text
        loss when those are more than the training classes, and where each label's prototype sits."""
        names = self._text_classes()
        missing = sorted(set(self.classnames) - set(names))
        if missing:
            raise ValueError(f"all_classnames lacks the training classes {missing[:5]}")
        protos = [
            hand_crafted_features(self.clip, names, [f"{b} {{}}{a}." for b, a in map(template_parts, group)])
            for group in self.groups.values()
        ]  # E x [C_t, D]: the reference's "before name after." prompts (moe.py L243-259)
        buffers = {"_protos": torch.stack(protos)}
        if self._base_half():  # the text loss encodes its own prompts over all names (moe.py L454-476)
            buffers.update(self._layout(names, period=True, tag="_all"))
        own = torch.tensor([names.index(c) for c in self.classnames])  # [C]: the label's own class
        buffers["_gate_cols"] = (
            self._set_order[: len(self.classnames)] if self._set_order is not None else own
        )
        self.register_class_buffers({k: v.to(self.router.weight.device) for k, v in buffers.items()})
        self._supervision_ready = True

    # ------------------------------------------------------------------ features and logits
    def _encode_experts(self, tag: str = "") -> torch.Tensor:
        """[E, C, D] L2-normalised class features of every expert (with the correction added first)."""
        base = getattr(self, f"_base{tag}")
        x = torch.stack(
            [insert_context(base[e], c, getattr(self, f"_pos{tag}_{e}")) for e, c in enumerate(self.ctx)]
        )
        feats = encode_prompts(self.clip, x, getattr(self, f"_eot{tag}")).float()
        return F.normalize(feats + self.correction if self.correction is not None else feats, dim=-1)

    def expert_text_features(self) -> torch.Tensor:
        """[E, C, D] L2-normalised class features of every expert, for the current classes."""
        return self._encode_experts()

    @contextmanager
    def cached_text_features(self) -> Iterator[None]:
        """The experts' features do not depend on the image (only their mixture does): compute them once."""
        with torch.no_grad():
            self._expert_cache = self.expert_text_features()
        try:
            yield
        finally:
            self._expert_cache = None

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        img = F.normalize(image_features.float(), dim=-1)  # [B, D]
        router_logits = self.router(img)  # [B, E]
        weights, idx = route(router_logits, self.top_k)  # [B, k]
        feats = self._expert_cache if self._expert_cache is not None else self.expert_text_features()
        per_expert = self.clip.logit_scale * torch.einsum("bd,ecd->bec", img, feats)  # [B, E, C]
        logits = mix_expert_logits(per_expert, weights, idx)
        self._last = (img, router_logits, feats)  # for loss(): the engine calls it right after forward
        if self._stats is not None:  # evaluation: observe_eval files the choices under the true classes
            self._chosen = (
                torch.zeros_like(router_logits, dtype=torch.long).scatter_(1, idx, 1).cpu()
            )  # [B, E]
        return logits

    # ------------------------------------------------------------------ objective
    def loss_terms(self, logits: torch.Tensor, labels: torch.Tensor, **aux: Any) -> dict[str, torch.Tensor]:
        """The unweighted terms: ``ce``, ``text`` (text-to-text) and ``gate`` (router toward the hard prompts)."""
        if self._last is None or self._last[0].shape[0] != labels.shape[0]:
            if "image_features" in aux:
                self.logits(aux["image_features"])
            elif "images" in aux:
                self.logits(self.encode_image(aux["images"]))
            else:
                raise ValueError("MoCoOp.loss needs the forward pass first, or image_features / images")
        if not self._supervision_ready:
            self._build_supervision()
        img, router_logits, feats = self._last
        text_feats = self._encode_experts("_all") if self._base_half() else feats  # [E, C_t, D]
        target = soft_gate_target(
            img, self._protos[:, self._gate_cols[labels]]
        )  # not detached, as in the reference
        return {
            "ce": F.cross_entropy(logits, labels),
            "text": text_to_text_loss(text_feats, self._protos),
            "gate": F.cross_entropy(router_logits, target),
        }

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **aux: Any) -> torch.Tensor:
        t = self.loss_terms(logits, labels, **aux)
        self._last = None  # do not hold the graph beyond the step
        return t["ce"] + self.text_loss_weight * t["text"] + self.gate_loss_weight * t["gate"]

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """The image tower's LayerNorms in a group of their own at ``layernorm_lr_scale`` x the lr."""
        ln = {
            id(p)
            for part in self.trainable_backbone_parts
            for p in self.clip.get_submodule(part).parameters()
        }
        params = self.trainable_parameters()
        groups = [{"params": [p for p in params if id(p) not in ln]}]
        if ln:
            groups.append({"params": [p for p in params if id(p) in ln], "lr_scale": self.layernorm_lr_scale})
        return groups

    # ------------------------------------------------------------------ routing statistics
    def begin_eval(self) -> None:
        self._stats = torch.zeros(len(self.classnames), len(self.expert_names), dtype=torch.long)
        self._chosen = None

    def observe_eval(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if self._stats is not None and self._chosen is not None:
            self._stats.index_add_(0, labels.cpu(), self._chosen)
            self._chosen = None

    def end_eval(self) -> dict[str, Any]:
        """How often each expert is among the chosen top-k, overall and per (true) class."""
        counts, self._stats = self._stats, None
        if counts is None:
            return {}
        n = int(counts.sum()) // min(self.top_k, counts.shape[1])
        return {
            "routing": {
                "experts": self.expert_names,
                "top_k": self.top_k,
                "images": n,
                "chosen_fraction": [round(float(c) / max(n, 1), 4) for c in counts.sum(0)],
                "per_class": {name: row.tolist() for name, row in zip(self.classnames, counts)},
            }
        }


def _leading_embeddings(clip: FrozenCLIP, text: str, n: int) -> torch.Tensor:
    """[n, W] token embeddings at positions 1..n (after the start token) of ``text`` tokenised alone (end and padding tokens
    included when the reference's word count exceeds the BPE tokens)."""
    if n == 0:
        return torch.empty(0, clip.width)
    with torch.no_grad():
        s = clip.n_start_tokens
        return clip.embed_tokens(clip.tokenize(text.replace("_", " ")))[0, s : s + n].float().clone()


def _vision_layernorms(clip: FrozenCLIP) -> tuple[str, ...]:
    """Names (under ``clip``) of the LayerNorms inside the image tower's blocks, whatever the backend."""
    trunk = getattr(clip, "_timm_trunk", None)
    if trunk is not None:  # timm ViT (EVA02, SigLIP, PE): each block's norm1 / norm2
        wanted = {id(getattr(blk, n)) for blk in trunk.blocks for n in ("norm1", "norm2")}
    elif not getattr(clip, "vision_is_transformer", False):
        raise ValueError(f"tune_layernorm needs a ViT image tower; {clip.arch} has none")
    else:
        wanted = {id(ln) for blk in clip._vis_blocks for ln in (blk.ln_1, blk.ln_2)}
    return tuple(name for name, mod in clip.named_modules() if id(mod) in wanted)
