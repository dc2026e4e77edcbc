"""KgCoOp: Visual-Language Prompt Tuning with Knowledge-guided Context Optimization (Yao et al., CVPR 2023,
https://arxiv.org/abs/2303.13283).

CoOp's unified context, plus a regulariser that keeps the learned class text features close to the
features of the hand-crafted prompt ("a photo of a {}, a type of pet."), so that the prompt does not
forget what CLIP knows about the classes it never trains on:
``loss = CE + w * (1 - mean_c cos(t_c, t_c^hand))`` (htyao89/KgCoOp ``trainers/kgcoop.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from promptlab.clip import FrozenCLIP
from promptlab.methods.knowledge import KnowledgeGuided
from promptlab.prompts import (
    encode_prompts,
    hand_crafted_features,
    init_context,
    insert_context,
    prompt_buffers,
)
from promptlab.templates import resolve_templates


class KgCoOp(KnowledgeGuided):
    """Knowledge-guided context optimisation (text side only; image features are cacheable).

    Args:
        n_ctx: number of context vectors (ignored when ``ctx_init`` gives the words).
        ctx_init: words to initialise the context from; empty or null: N(0, 0.02).
        w: weight of the knowledge-guided term (the paper's lambda, 8.0 for base-to-new).
        templates: hand-crafted prompts for the guidance features: ``"dataset"`` (the dataset's
            template, as the reference), ``"imagenet80"``, ``"imagenet7"`` or a list (ensembled).
        template: the dataset's template; the runner fills it from the dataset definition.
    """

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        w: float = 8.0,
        templates: str | list[str] = "dataset",
        template: str | None = None,
    ):
        super().__init__(clip, classnames)
        self.ctx = nn.Parameter(init_context(clip, n_ctx, ctx_init))  # [n_ctx, W]
        self.n_ctx, self.w = self.ctx.shape[0], float(w)
        self.templates = resolve_templates(templates, template)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.register_class_buffers(prompt_buffers(self.clip, self.classnames, self.n_ctx))
        # computed once per class set; a buffer so that it follows .to(device) but is never saved
        self.register_buffer(
            "_hand", hand_crafted_features(self.clip, self.classnames, self.templates), persistent=False
        )

    def text_features(self) -> torch.Tensor:
        prompts = insert_context(self._base, self.ctx, self._ctx_pos)  # [C, L, W]
        return encode_prompts(self.clip, prompts, self._eot)  # [C, D]
