"""CLIP-Adapter: a residual bottleneck MLP on the image features (Gao et al., IJCV 2024,
https://arxiv.org/abs/2110.04544; gaopengcuhk/CLIP-Adapter ``clip_adapter.py``).

f' = ratio * MLP(f) + (1 - ratio) * f with MLP = Linear(D, D/r) -> ReLU -> Linear(D/r, D) -> ReLU
(no biases), then CLIP's scaled cosine against the hand-crafted text features of the dataset's
template. The image tower stays frozen, so its features may be cached. The reference hard-codes
D = 1024 (RN50's width); here D is the backbone's embedding width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.prompts import HandCraftedTextClassifier
from promptlab.templates import resolve_templates


class CLIPAdapter(HandCraftedTextClassifier):
    """The visual adapter (the variant the reference code ships).

    Args:
        reduction: bottleneck factor r (``Adapter(1024, 4)``).
        ratio: residual ratio of the adapted feature (clip_adapter.py L104, 0.2).
        templates: the text classifier's prompts (``"dataset"``: CUSTOM_TEMPLATES, the dataset's template).
        template: the dataset's template (filled in by the runner).
    """

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        reduction: int = 4,
        ratio: float = 0.2,
        templates: str | list[str] = "dataset",
        template: str | None = None,
    ):
        super().__init__(clip, classnames)
        d = clip.embed_dim
        if reduction < 1 or d // reduction < 1:
            raise ValueError(f"reduction={reduction}: expected 1..{d} for embedding width {d}")
        self.ratio = ratio
        self.templates = resolve_templates(templates, template)
        self.adapter = nn.Sequential(
            nn.Linear(d, d // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(d // reduction, d, bias=False),
            nn.ReLU(inplace=True),
        )
        self.set_classnames(classnames)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        f = image_features.to(self.adapter[0].weight.dtype)
        f = self.ratio * self.adapter(f) + (1 - self.ratio) * f  # [B, D]
        f = F.normalize(f.to(self.head_dtype), dim=-1)
        return self.clip.logit_scale * f @ self.class_text_features().to(self.head_dtype).t()
