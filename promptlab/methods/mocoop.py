"""MoCoOp: Mixture of Prompt Learning for Vision Language Models (Du et al., 2024, https://arxiv.org/abs/2409.12011).

One soft prompt cannot cover a dataset's styles (photos, renderings, low-resolution shots...), so
MoCoOp learns one soft-prompt expert per *group* of hand-crafted templates and lets a router pick
the top-k experts per image:

- expert e is CoOp-style context around the class name, initialised from the words around ``{}``
  in its group's first template ("a photo of a {}, a type of pet." -> 4 words before, 5 after);
- a linear router on the normalised image feature scores the experts; the top-k experts' logits
  are mixed with softmax weights renormalised over the selected k;
- gate loss: cross-entropy of the router toward the group whose hand-crafted feature (mean of its
  templates, for the image's class) is most similar to the image, so routing stays anchored to
  the templates;
- text loss: a contrastive loss between each expert's class features and its group's hand-crafted
  class features, so experts keep their hand-crafted meaning (fights overfitting).

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
    build_prompt_layout,
    encode_prompts,
    hand_crafted_features,
    insert_context,
    word_embeddings,
)

log = logging.getLogger(__name__)

GROUPS_FOLDER = "template_groups"


# ---------------------------------------------------------------------- template groups (data)
def load_template_groups(dataset_name: str | None) -> dict[str, list[str]]:
    """The template groups shipped for a dataset (``datasets/template_groups/<name>.yaml``), else ``default.yaml``."""
    folder = datasets_dir() / GROUPS_FOLDER
    path = folder / f"{dataset_name}.yaml"
    if dataset_name is None or not path.is_file():
        if dataset_name is not None:
            log.warning("no template groups for dataset %r in %s: using default.yaml", dataset_name, folder)
        path = folder / "default.yaml"
    raw = yaml.safe_load(path.read_text())
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


def split_template(template: str) -> tuple[str, str, str]:
    """Words before and after ``{}`` and the final period: "a {}, a pet." -> ("a", ", a pet", ".")."""
    before, after = (" ".join(s.split()) for s in template.split("{}"))
    suffix = "." if after.endswith(".") else ""
    after = after[: len(after) - len(suffix)].rstrip()
    return before, after, suffix


# ---------------------------------------------------------------------- shared maths of the mixture
def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, E] router logits -> (weights [B, k] softmax over the selected k, indices [B, k])."""
    top, idx = router_logits.topk(min(top_k, router_logits.shape[-1]), dim=-1)
    return top.softmax(dim=-1), idx


def mix_expert_logits(expert_logits: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, E, C] per-expert logits, top-k weights/indices [B, k] -> [B, C] mixed logits.

    Mixing the (normalised) expert text features with convex weights and mixing their cosine logits
    are the same thing, so only the selected experts' logits are gathered.
    """
    chosen = expert_logits.gather(1, idx[..., None].expand(-1, -1, expert_logits.shape[-1]))  # [B, k, C]
    return (weights[..., None] * chosen).sum(1)


def gate_targets(
    image_features: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """[B] index of the group whose hand-crafted feature of the image's class is most similar to the image.

    image_features [B, D] and prototypes [E, C, D] L2-normalised; labels [B].
    """
    sim = torch.einsum("bd,ebd->be", image_features, prototypes[:, labels])  # [B, E]
    return sim.argmax(-1)


def text_to_text_loss(
    expert_features: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """Each expert's class feature must pick its own class among its group's hand-crafted class features.

    expert_features, prototypes: [E, C, D], L2-normalised. Cross-entropy over classes, mean over experts.
    """
    E, C, _ = prototypes.shape
    sims = scale * expert_features @ prototypes.transpose(1, 2)  # [E, C, C]
    return F.cross_entropy(sims.reshape(E * C, C), torch.arange(C, device=sims.device).repeat(E))


# ---------------------------------------------------------------------- the method
class MoCoOp(PromptModule):
    """Mixture of soft-prompt experts with an image router, hard-prompt gating and grouped text supervision.

    Args:
        templates: template groups ``{name: [template, ...]}`` or ``[[template, ...], ...]``; ``None``:
            the groups shipped for ``dataset_name`` (``datasets/template_groups/``).
        dataset_name: filled by the runner from the dataset, to look up its template groups.
        n_ctx: context vectors (random N(0, 0.02), before the class name) for a group whose first
            template has no words besides the class name.
        top_k: experts mixed per image.
        text_loss_weight: weight of the text-to-text contrastive loss.
        gate_loss_weight: weight of the router's cross-entropy toward the hard-prompt choice.
        tune_layernorm: also train the LayerNorms of the image tower's blocks (then image features are
            not cacheable). This switches ``requires_grad`` on in ``clip``: give the module a backbone of its own.
    """

    text_depends_on_image = True  # the mixture is chosen per image
    fp32_in_reference = ("ctx", "router")  # the reference trains with AMP: fp32 learned tensors

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        templates: dict[str, list[str]] | list[list[str]] | None = None,
        dataset_name: str | None = None,
        n_ctx: int = 4,
        top_k: int = 2,
        text_loss_weight: float = 5.0,
        gate_loss_weight: float = 1.0,
        tune_layernorm: bool = False,
    ):
        super().__init__(clip, classnames)
        self.groups = check_groups(templates) if templates is not None else load_template_groups(dataset_name)
        self.expert_names = list(self.groups)
        self.top_k, self.text_loss_weight, self.gate_loss_weight = (
            int(top_k),
            float(text_loss_weight),
            float(gate_loss_weight),
        )
        if self.top_k < 1:
            raise ValueError(f"top_k={top_k}: at least one expert must be chosen")
        ctx, self._layout = [], []  # per expert: (n_before, suffix)
        for name, group in self.groups.items():
            before, after, suffix = split_template(group[0])
            parts = [word_embeddings(clip, w) for w in (before, after) if w]  # [n, W] each
            if not parts:  # "{}." has no words to start from
                if n_ctx < 1:
                    raise ValueError(
                        f"group {name!r}: its first template has no words around '{{}}' and n_ctx={n_ctx}"
                    )
                parts = [nn.init.normal_(torch.empty(n_ctx, clip.width), std=0.02)]
            self._layout.append(
                (parts[0].shape[0] if before or not after else 0, suffix)
            )  # slots before the name
            ctx.append(nn.Parameter(torch.cat(parts)))
        self.ctx = nn.ParameterList(ctx)  # E x [n_e, W]
        self.router = nn.Linear(clip.embed_dim, len(ctx))
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
        layouts = [
            build_prompt_layout(self.clip, self.classnames, c.shape[0], suffix=sfx, n_before=nb)
            for c, (nb, sfx) in zip(self.ctx, self._layout)
        ]
        L = max(int(eot.max()) + 1 for _, _, eot in layouts)  # one length for all experts: one encoder call
        with torch.no_grad():
            base = torch.stack(
                [self.clip.embed_tokens(ids[:, :L]).float() for ids, _, _ in layouts]
            )  # [E, C, L, W]
        protos = [
            hand_crafted_features(self.clip, self.classnames, group) for group in self.groups.values()
        ]  # E x [C, D]
        self.register_buffer("_base", base, persistent=False)
        self.register_buffer("_eot", torch.stack([eot for _, _, eot in layouts]), persistent=False)  # [E, C]
        for e, (_, pos, _) in enumerate(layouts):
            self.register_buffer(f"_pos_{e}", pos, persistent=False)  # [C, n_e]
        self.register_buffer("_protos", torch.stack(protos), persistent=False)  # [E, C, D] hand-crafted

    # ------------------------------------------------------------------ features and logits
    def expert_text_features(self) -> torch.Tensor:
        """[E, C, D] L2-normalised class features of every expert."""
        x = torch.stack(
            [insert_context(self._base[e], c, getattr(self, f"_pos_{e}")) for e, c in enumerate(self.ctx)]
        )
        return F.normalize(encode_prompts(self.clip, x, self._eot).float(), dim=-1)

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
        feats = (
            self._expert_cache if self._expert_cache is not None else self.expert_text_features()
        )  # [E, C, D]
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
        img, router_logits, feats = self._last
        target = gate_targets(img.detach(), self._protos, labels)
        return {
            "ce": F.cross_entropy(logits, labels),
            "text": text_to_text_loss(feats, self._protos, self.clip.logit_scale),
            "gate": F.cross_entropy(router_logits, target),
        }

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **aux: Any) -> torch.Tensor:
        t = self.loss_terms(logits, labels, **aux)
        self._last = None  # do not hold the graph beyond the step
        return t["ce"] + self.text_loss_weight * t["text"] + self.gate_loss_weight * t["gate"]

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


def _vision_layernorms(clip: FrozenCLIP) -> tuple[str, ...]:
    """Names (under ``clip``) of the LayerNorms inside the image tower's blocks, whatever the backend."""
    if not getattr(clip, "vision_is_transformer", False):
        raise ValueError(f"tune_layernorm needs a ViT image tower; {clip.arch} has none")
    wanted = {id(ln) for blk in clip._vis_blocks for ln in (blk.ln_1, blk.ln_2)}
    return tuple(name for name, mod in clip.named_modules() if id(mod) in wanted)
