"""IVLP: independent vision-language deep prompting, the baseline of MaPLe (Khattak et al., CVPR 2023,
https://arxiv.org/abs/2210.03117, section 4 / Table 6; muzairkhattak/multimodal-prompt-learning
``trainers/independentVL.py``).

Both towers get their own learnable tokens, with no link between them:
- text: the first ``n_ctx_text`` tokens after [SOS] are learned (initialised from ``ctx_init``) and, at
  blocks 1..depth-1, replaced by fresh learned tokens (the previous block's outputs there are dropped);
- vision: ``n_ctx_vision`` tokens appended after the patch tokens (before ``ln_pre``) and replaced at
  blocks 1..depth-1 (VPT-deep).
The injection is FrozenCLIP's per-layer loop (``deep_prompts``); the backbone code is not forked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from promptlab.clip import FrozenCLIP
from promptlab.prompts import (
    PromptModule,
    encode_prompts,
    independent_vl_prompts,
    insert_context,
    layer_prompts,
    prompt_buffers,
)


class IVLP(PromptModule):
    """Independent deep prompts in the text and the vision tower (image side trained: not cacheable).

    Args:
        n_ctx_text: learned text tokens per layer.
        n_ctx_vision: learned visual tokens per layer (0 with ``prompt_depth_vision=0``: text only).
        ctx_init: words whose first ``n_ctx_text`` tokens initialise the shallow text context; the rest of
            the words stay in the prompt ("[SOS] [V1] [V2] of a {class}."). Empty: random context.
        prompt_depth_text: shallow prompt plus deep prompts at blocks 1..depth-1 (12 = every ViT-B block).
        prompt_depth_vision: the same for the vision tower; 0 leaves the image tower untouched.
    """

    image_side_frozen: ClassVar[bool] = False
    # PREC=fp16 in the reference: the text context is fp16 (clip_model.dtype); the deep text prompts, the
    # visual prompts and the deep visual prompts are nn.Parameters created fp32 inside the CLIP model
    # (VPT / VPT_shallow, clip/model.py) and only cast with .half() where they are used.
    fp32_in_reference: ClassVar[tuple[str, ...]] = ("text_deep", "vis_ctx", "vis_deep")

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        n_ctx_text: int = 2,
        n_ctx_vision: int = 2,
        ctx_init: str | None = "a photo of a",
        prompt_depth_text: int = 12,
        prompt_depth_vision: int = 12,
    ):
        super().__init__(clip, classnames)
        self.n_ctx_text = n_ctx_text
        self.prefix, learned = independent_vl_prompts(
            clip, n_ctx_text, n_ctx_vision, ctx_init, prompt_depth_text, prompt_depth_vision, "IVLP"
        )
        for name, p in learned.items():  # ctx [n_t, W], text_deep, vis_ctx [n_v, Wv], vis_deep
            setattr(self, name, p)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.register_class_buffers(
            prompt_buffers(self.clip, self.classnames, self.n_ctx_text, prefix=self.prefix)
        )

    def text_features(self) -> torch.Tensor:
        prompts = insert_context(self._base, self.ctx, self._ctx_pos)  # [C, L, W]
        return encode_prompts(
            self.clip, prompts, self._eot, deep_prompts=layer_prompts(self.text_deep)
        )  # [C, D]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(
            images, prompts=self.vis_ctx, deep_prompts=layer_prompts(self.vis_deep)
        )  # [B, D]
