"""TempCoOp: CoOp's unified context plus a learnable temperature — a user's own method, in full.

Copy this file next to your recipe (e.g. as ``mymethods.py``), point ``method._component_`` at
``mymethods.TempCoOp`` and run it with ``PYTHONPATH=.`` and ``promptlab --trust-module mymethods``.
Everything else (training, evaluation on new classes, export, ``promptlab.load_prompts``, sweeps,
reports) works as for the built-in methods; the README's "Write your own method" walks through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab import FrozenCLIP, PromptModule
from promptlab.prompts import encode_prompts, init_context, insert_context, prompt_buffers


class TempCoOp(PromptModule):
    """Learned context "[V]_1 ... [V]_M {class}." and a learned logit scale (CLIP's is frozen at 100).

    Args:
        n_ctx: number of context vectors (``ctx_init``'s token count when it gives words).
        ctx_init: words to initialise the context from; empty: N(0, 0.02).
        init_scale: the starting logit scale (CLIP's own: 100).
    """

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        n_ctx: int = 4,
        ctx_init: str = "a photo of a",
        init_scale: float = 100.0,
    ):
        super().__init__(clip, classnames)
        ctx = init_context(clip, n_ctx, ctx_init)  # [n_ctx, W]
        self.n_ctx = ctx.shape[0]
        self.ctx = nn.Parameter(ctx)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))  # learned with the context
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)  # keeps what was learned; rebuilds class-derived buffers
        self.register_class_buffers(prompt_buffers(self.clip, self.classnames, self.n_ctx))

    def text_features(self) -> torch.Tensor:
        prompts = insert_context(self._base, self.ctx, self._ctx_pos)  # [C, L, W]
        return encode_prompts(self.clip, prompts, self._eot)  # [C, D]

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        img = F.normalize(image_features.float(), dim=-1)  # [B, D]
        txt = F.normalize(self.class_text_features().float(), dim=-1)  # [C, D]
        return self.log_scale.exp() * img @ txt.t()  # [B, C]
