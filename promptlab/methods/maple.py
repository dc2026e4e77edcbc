"""MaPLe: Multi-modal Prompt Learning (Khattak et al., CVPR 2023, https://arxiv.org/abs/2210.03117).

Deep prompts in both towers, where the vision prompts are *functions of* the text prompts: at every
prompted depth j a linear map F_j (W -> Wv) turns the text tokens P_j into the vision tokens F_j(P_j),
so the two branches learn together (muzairkhattak/multimodal-prompt-learning ``trainers/maple.py``):
- block 0: the prompt "[SOS] [P_0] of a {class}." (P_0 initialised from "a photo", n_ctx=2) and
  vision tokens F_0(P_0) appended after the patch tokens (before ``ln_pre``);
- blocks 1..depth-1: P_j replaces the tokens after [SOS], F_j(P_j) replaces the appended vision tokens.
The maps F_1..F_{depth-1} start as copies of one random Linear, as in the reference. Injection goes
through FrozenCLIP's per-layer loop (``deep_prompts``), never a forked backbone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn

from promptlab.clip import FrozenCLIP
from promptlab.prompts import (
    PromptModule,
    deep_prompt_tokens,
    encode_prompts,
    insert_context,
    layer_prompts,
    leading_context,
    prompt_buffers,
)


class MaPLe(PromptModule):
    """Coupled vision-language deep prompts (image side trained: features are not cacheable).

    Args:
        n_ctx: learned text tokens per prompted layer (the vision tokens are as many).
        ctx_init: words whose first ``n_ctx`` tokens initialise the shallow text prompt; the remaining
            words stay in the prompt ("[SOS] [V1] [V2] of a {class}."). Empty: random context.
        prompt_depth: prompted layers counting the input (9: blocks 0..8), in both towers; >= 1.
    """

    image_side_frozen: ClassVar[bool] = False
    # PREC=fp16 in the reference (trainers/maple.py L95-117): ctx fp16, self.proj.half(); the compound
    # prompts and their projections are created fp32 and stay so (cast with .half() at use).
    fp32_in_reference: ClassVar[tuple[str, ...]] = ("text_deep", "deep_proj")

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        n_ctx: int = 2,
        ctx_init: str | None = "a photo of a",
        prompt_depth: int = 9,
    ):
        super().__init__(clip, classnames)
        if not clip.vision_layers:
            raise ValueError(f"{clip.arch}: MaPLe needs a ViT image tower")
        if prompt_depth < 1:
            raise ValueError("MaPLe needs prompt_depth >= 1 (1 = shallow coupled prompts)")
        n_layers = min(clip.text_layers, clip.vision_layers)
        ctx, self.prefix = leading_context(clip, n_ctx, ctx_init)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx)  # [n_ctx, W]
        self.proj = nn.Linear(clip.width, clip.vision_width)  # F_0: shallow text -> vision coupling
        self.text_deep = deep_prompt_tokens(n_layers, prompt_depth, n_ctx, clip.width, "MaPLe")  # [d-1, n, W]
        one = nn.Linear(clip.width, clip.vision_width)
        self.deep_proj = nn.ModuleList(copy.deepcopy(one) for _ in range(prompt_depth - 1))  # F_1..F_{d-1}
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.register_class_buffers(
            prompt_buffers(self.clip, self.classnames, self.n_ctx, prefix=self.prefix)
        )

    def text_features(self) -> torch.Tensor:
        prompts = insert_context(self._base, self.ctx, self._ctx_pos)  # [C, L, W]
        return encode_prompts(
            self.clip, prompts, self._eot, deep_prompts=layer_prompts(self.text_deep)
        )  # [C, D]

    def vision_prompts(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The coupled vision tokens: shallow F_0(P_0) [n, Wv] and deep [F_j(P_j) for j = 1..d-1]."""
        deep = [] if self.text_deep is None else [f(p) for f, p in zip(self.deep_proj, self.text_deep)]
        return self.proj(self.ctx), deep

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        shallow, deep = self.vision_prompts()
        return self.clip.encode_image(images, prompts=shallow, deep_prompts=layer_prompts(deep))  # [B, D]
