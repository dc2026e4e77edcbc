"""CLIP-LoRA: low-rank adaptation of the attention projections of both CLIP towers (Zanella & Ben Ayed,
CVPRW 2024, https://arxiv.org/abs/2405.18541; MaxZanella/CLIP-LoRA).

Every chosen block's q, k and v projections get W x + s * B A dropout(x), A [r, W] (Kaiming-uniform),
B [W, r] (zeros, so training starts at zero-shot CLIP), s = alpha / sqrt(r) (``loralib/layers.py``
LoRALayer: the reference's scaling, not LoRA's alpha / r). The deltas enter through
:meth:`FrozenCLIP.attention_adapters`, only inside this method's own forward passes; the towers'
weights are never copied or changed, and only
A and B are learned and exported. Classification: the scaled cosine between the image feature and the
text feature of the dataset's template, both through the adapted towers (``lora.py``).

Written by hand rather than with PEFT: FrozenCLIP runs its own per-layer loop over q, k, v computed
from open_clip's packed ``in_proj_weight`` (or HF's three projections), so there is no ``nn.Linear``
per projection for PEFT to wrap; a callable per block is all the loop needs, and the reference's
scaling and per-projection dropout are three lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.prompts import PromptModule, hand_crafted_features
from promptlab.templates import resolve_templates

PROJECTIONS = ("q", "k", "v")


class LoRADelta(nn.Module):
    """One projection's low-rank update: x [..., d_in] -> s * dropout(x) A^T B^T [..., d_out]."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, d_in), a=math.sqrt(5)))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.scaling = alpha / math.sqrt(rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        return (x.to(self.A.dtype) @ self.A.t() @ self.B.t()) * self.scaling


class AttentionLoRA(nn.Module):
    """The deltas of one block's q, k, v (None for a projection left alone): FrozenCLIP's adapter callable."""

    def __init__(self, width: int, params: Sequence[str], rank: int, alpha: float, dropout: float):
        super().__init__()
        self.deltas = nn.ModuleDict({p: LoRADelta(width, width, rank, alpha, dropout) for p in params})

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return tuple(self.deltas[p](h) if p in self.deltas else None for p in PROJECTIONS)


class CLIPLoRA(PromptModule):
    """LoRA on the attention of the text and/or image tower, trained end to end through the frozen towers.

    Args:
        rank: r (``--r``, 2).
        alpha: the LoRA alpha (``--alpha``, 1); the scaling is alpha / sqrt(r).
        dropout: dropout on each LoRA input (``--dropout_rate``, 0.25).
        params: projections adapted, a subset of q, k, v (``--params``; the reference's ``o`` is not offered).
        encoder: ``"both"``, ``"text"`` or ``"vision"`` (``--encoder``).
        position: ``"all"`` blocks, or a list of 0-based block indices (the reference's named positions
            are lists of ViT-B indices: ``bottom`` = [0, 1, 2, 3], ...).
        templates: the text prompt (``"dataset"``: the dataset's first template, as ``lora.py``).
        template: the dataset's template (filled in by the runner).
        logit_scale: the logits' scale; ``None``: the backbone's temperature (100 for OpenAI CLIP, which the
            reference hard-codes).
    """

    #: LoRA layers are created in fp32 beside the fp16 CLIP in the reference (loralib LinearLoRA).
    fp32_in_reference = ("text_lora", "image_lora")

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        rank: int = 2,
        alpha: float = 1.0,
        dropout: float = 0.25,
        params: Sequence[str] = PROJECTIONS,
        encoder: str = "both",
        position: str | list[int] = "all",
        templates: str | list[str] = "dataset",
        template: str | None = None,
        logit_scale: float | None = None,
    ):
        super().__init__(clip, classnames)
        if encoder not in ("both", "text", "vision"):
            raise ValueError(f"encoder={encoder!r}: expected 'both', 'text' or 'vision'")
        if rank < 1 or not params or set(params) - set(PROJECTIONS):
            raise ValueError(
                f"rank must be >= 1 and params a non-empty subset of {PROJECTIONS}, got {rank}, {params}"
            )
        self.encoder, self.scale = encoder, logit_scale
        self.templates = resolve_templates(templates, template)[:1]  # lora.py: dataset.template[0]
        self.image_side_frozen = encoder == "text"  # type: ignore[misc]  # an instance's own capability

        def blocks(n: int) -> list[int]:
            return list(range(n)) if position == "all" else [int(i) for i in position]  # type: ignore[union-attr]

        def loras(n: int, width: int) -> nn.ModuleDict:
            return nn.ModuleDict(
                {str(i): AttentionLoRA(width, params, rank, alpha, dropout) for i in blocks(n)}
            )

        # text blocks first, then the image tower's (loralib/utils.py apply_lora)
        self.text_lora = loras(clip.text_layers, clip.width) if encoder != "vision" else nn.ModuleDict()
        if encoder != "text" and not clip.vision_layers:
            raise ValueError(f"{clip.arch}: LoRA on the image tower needs a ViT")
        self.image_lora = (
            loras(clip.vision_layers, clip.vision_width or 0) if encoder != "text" else nn.ModuleDict()
        )
        for tower, lora in (("text", self.text_lora), ("image", self.image_lora)):
            if lora:  # fail now, not at the first forward pass, on blocks the tower does not have
                with clip.attention_adapters(tower, self._adapters(lora)):
                    pass
        self.set_classnames(classnames)

    @staticmethod
    def _adapters(lora: nn.ModuleDict) -> dict[int, nn.Module]:
        return {int(i): m for i, m in lora.items()}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if not self.image_lora:
            return super().encode_image(images)
        with self.clip.attention_adapters("image", self._adapters(self.image_lora)):
            return self.clip.encode_image(images)  # [B, D] through the adapted image tower

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        names = [self.templates[0].format(n.replace("_", " ")) for n in self.classnames]
        self.register_class_buffers({"_ids": self.clip.tokenize(names)})  # [C, 77]

    def text_features(self) -> torch.Tensor:
        if not self.text_lora:  # encoder=vision: the frozen text tower, computed once
            return hand_crafted_features(self.clip, self.classnames, self.templates)
        with self.clip.attention_adapters("text", self._adapters(self.text_lora)):
            return self.clip.encode_text(self._ids)  # [C, D] through the adapted text tower

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        img = F.normalize(image_features.to(self.head_dtype), dim=-1)
        txt = F.normalize(self.class_text_features().to(self.head_dtype), dim=-1)
        scale = self.clip.logit_scale if self.scale is None else self.scale
        return scale * img @ txt.t()
