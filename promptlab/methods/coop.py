"""CoOp: Learning to Prompt for Vision-Language Models (Zhou et al., IJCV 2022, https://arxiv.org/abs/2109.01134).

The class-name prompt "[SOS] [V]_1 ... [V]_M [CLASS]. [EOS]" has M learnable context vectors,
shared by all classes (unified) or one set per class (``csc``), and the class token can sit at
the end, in the middle or at the front of the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn

from promptlab.clip import FrozenCLIP
from promptlab.prompts import (
    PromptModule,
    encode_context_prefix,
    encode_prompts,
    init_context,
    insert_context,
    prompt_buffers,
)


class CoOp(PromptModule):
    """Context optimisation on the text side; the image side stays frozen (features are cacheable).

    Args:
        n_ctx: number of context vectors (ignored when ``ctx_init`` gives the words).
        ctx_init: words to initialise the context from (``"a photo of a"``); empty or null: N(0, 0.02).
        csc: class-specific context, ``ctx`` of shape [C, n_ctx, W] instead of [n_ctx, W].
        class_token_position: ``"end"``, ``"middle"`` or ``"front"``.
    """

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        n_ctx: int = 16,
        ctx_init: str | None = "",
        csc: bool = False,
        class_token_position: Literal["end", "middle", "front"] = "end",
    ):
        super().__init__(clip, classnames)
        self.csc, self.class_token_position = csc, class_token_position
        if csc and not ctx_init:  # one N(0, 0.02) draw of [C, n_ctx, W], as CoOp
            ctx = nn.init.normal_(torch.empty(len(classnames), n_ctx, clip.width), std=0.02)
        else:
            ctx = init_context(clip, n_ctx, ctx_init)  # [n, W]
            ctx = ctx.expand(len(classnames), -1, -1).clone() if csc else ctx
        self.n_ctx = ctx.shape[-2]
        self.ctx = nn.Parameter(ctx)  # [n_ctx, W] or [C, n_ctx, W]
        self.set_classnames(classnames)

    @property
    def class_bound(self) -> bool:  # type: ignore[override]
        """A class-specific context belongs to its classes (PromptModule.class_bound)."""
        return self.csc

    def set_classnames(self, classnames: Sequence[str]) -> None:
        if self.csc and len(classnames) != self.ctx.shape[0]:
            raise ValueError(
                f"CoOp with class-specific context learned {self.ctx.shape[0]} contexts and cannot serve "
                f"{len(classnames)} classes; use a unified context (csc=false) for base-to-new transfer"
            )
        super().set_classnames(classnames)
        # _base [C, L, W], _ctx_pos [C, n_ctx], _eot [C]
        self.register_class_buffers(
            prompt_buffers(self.clip, self.classnames, self.n_ctx, self.class_token_position)
        )

    def text_features(self) -> torch.Tensor:
        if not self.csc and self.class_token_position == "end":  # [SOS] + context shared by all classes
            return encode_context_prefix(self.clip, self._base, self.ctx, self._eot)  # [C, D]
        prompts = insert_context(self._base, self.ctx, self._ctx_pos)  # [C, L, W]
        return encode_prompts(self.clip, prompts, self._eot)  # [C, D]
