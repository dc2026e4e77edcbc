"""CoCoOp: Conditional Prompt Learning for Vision-Language Models (Zhou et al., CVPR 2022,
https://arxiv.org/abs/2203.05557).

A small meta-net turns each (normalised) image feature into a bias added to every context token, so
the prompt, and hence the classifier, depends on the image: "[SOS] [V_1 + pi(x)] ... [V_M + pi(x)]
[CLASS]. [EOS]". The reference (KaiyangZhou/CoOp ``trainers/cocoop.py``) loops over the images of a
batch in Python and runs the text tower on 77 tokens per image; here all B x C prompts of a batch go
through the text tower in one call, cut to the longest prompt, with the same result.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.prompts import PromptModule, encode_context_prefix, init_context, prompt_buffers


class CoCoOp(PromptModule):
    """Image-conditioned context: learned context plus a meta-net bias per image.

    The image tower is neither prompted nor tuned, so image features stay cacheable
    (``image_side_frozen``); the text features depend on the image (``text_depends_on_image``), so
    they are recomputed for every batch, at evaluation too.

    Args:
        n_ctx: number of context vectors (ignored when ``ctx_init`` gives the words).
        ctx_init: words to initialise the context from; empty or null: N(0, 0.02).
    """

    text_depends_on_image: ClassVar[bool] = True
    #: Upper bound on prompts per text-tower call: a test batch of 100 images x 1000 classes is cut
    #: into chunks of whole images so that memory stays bounded (the result does not change).
    max_prompts_per_call: ClassVar[int] = 8192

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
    ):
        super().__init__(clip, classnames)
        self.ctx = nn.Parameter(init_context(clip, n_ctx, ctx_init))  # [n_ctx, W]
        self.n_ctx = self.ctx.shape[0]
        vis_dim = clip.embed_dim  # the reference's visual.output_dim: the meta-net reads projected features
        self.meta_net = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(vis_dim, vis_dim // 16),
                relu=nn.ReLU(),
                linear2=nn.Linear(vis_dim // 16, clip.width),
            )
        )
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.register_class_buffers(prompt_buffers(self.clip, self.classnames, self.n_ctx))

    def conditioned_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """[B, D] normalised image features -> [B, C, D] text features of each image's prompts."""
        bias = self.meta_net(image_features.to(self.ctx.dtype))  # [B, W]; fp16 meta-net under reference_fp16
        ctx = self.ctx.unsqueeze(0) + bias.unsqueeze(1)  # [B, n_ctx, W]
        # [SOS] + an image's context is shared by its C prompts: run it once per image, not C times.
        return encode_context_prefix(self.clip, self._base, ctx, self._eot)  # [B, C, D]

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        # [B, D]; normalised before the meta-net, as the reference
        img = F.normalize(image_features.to(self.head_dtype), dim=-1)
        step = max(1, self.max_prompts_per_call // max(1, len(self.classnames)))
        out = []
        for chunk in img.split(step):
            txt = F.normalize(self.conditioned_text_features(chunk).to(self.head_dtype), dim=-1)  # [b, C, D]
            out.append(torch.einsum("bd,bcd->bc", chunk, txt))
        return self.clip.logit_scale * torch.cat(out)  # [B, C]
