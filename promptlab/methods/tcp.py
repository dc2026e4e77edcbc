"""TCP: Textual-based Class-aware Prompt tuning for Visual-Language Model (Yao et al., CVPR 2024,
https://arxiv.org/abs/2311.18231).

CoOp's unified context plus *class-aware* tokens: a small net (the "Textual Knowledge Embedding",
D -> D/4 -> QuickGELU -> n_ctx x W) maps each class's frozen hand-crafted text feature to n_ctx tokens,
which replace the context tokens' hidden states in front of one middle block of the text tower (block 8
of 12 in ViT-B/16), so new classes get their own tokens from their names; the loss adds KgCoOp's
``8.0 * (1 - mean cos(learned, hand-crafted))`` (htyao89/Textual-based_Class-aware_prompt_tuning
``trainers/tcp.py`` L113-260, ``trainers/clip_text/model.py`` ResidualAttentionBlock_MaPLe L113-133).
The insertion is FrozenCLIP's per-layer ``deep_prompts`` with per-class tokens [C, n, W]; the text tower
is not forked. The truncation fast path stays exact (the tokens sit before every EOT); the shared-prefix
path does not apply (the tokens differ per class from the insertion block on).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

from promptlab.clip import FrozenCLIP
from promptlab.methods.knowledge import KnowledgeGuided
from promptlab.prompts import (
    clean_classname,
    encode_prompts,
    hand_crafted_features,
    init_context,
    insert_context,
    n_tokens,
)
from promptlab.templates import DEFAULT_TEMPLATE


class QuickGELU(nn.Module):
    """CLIP's ``x * sigmoid(1.702 x)`` (the reference's meta-net activation, tcp.py L109-111)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TCP(KnowledgeGuided):
    """Class-aware prompt tuning (text side only; image features are cacheable).

    Args:
        n_ctx: learned context tokens, and class-aware tokens per class (4 in the reference script).
        ctx_init: words to initialise the context from; empty: N(0, 0.02) (the config's CTX_INIT False).
        w: weight of the knowledge-guided term (the reference hard-codes 8.0, tcp.py L257).
        insert_layer: the text block in front of which the class-aware tokens replace the context tokens'
            hidden states (8: the reference's ``layers=[8]``, the 9th of ViT-B/16's 12 blocks); 1..depth-1.
        prompt_template: the prompt's layout, whose first ``n_ctx`` tokens are the context slots (TCP's
            ``CUSTOM_TEMPLATES``, e.g. "X X X X {}, a type of pet."); default "X .. X {}." (``n_ctx`` X).
        template: the hand-crafted prompt of the class features (``CUSTOM_TEMPLATES_ori``); the runner
            fills in the dataset's, the recipes' ``per_dataset`` section sets TCP's where they differ.
    """

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        n_ctx: int = 4,
        ctx_init: str | None = "",
        w: float = 8.0,
        insert_layer: int = 8,
        prompt_template: str | None = None,
        template: str | None = None,
    ):
        super().__init__(clip, classnames)
        if not 1 <= insert_layer < clip.text_layers:
            raise ValueError(
                f"TCP insert_layer={insert_layer}: expected 1..{clip.text_layers - 1} (the text tower has "
                f"{clip.text_layers} blocks; the reference's 8 is for 12)"
            )
        self.ctx = nn.Parameter(init_context(clip, n_ctx, ctx_init))  # [n_ctx, W]
        self.n_ctx, self.w, self.insert_layer = self.ctx.shape[0], float(w), insert_layer
        self.prompt_template = prompt_template or " ".join(["X"] * self.n_ctx) + " {}."
        head = self.prompt_template.split("{}")[0]
        if "{}" not in self.prompt_template or n_tokens(self.clip, head) < self.n_ctx:
            raise ValueError(
                f"TCP prompt_template={self.prompt_template!r} needs a '{{}}' after at least n_ctx={self.n_ctx} "
                "tokens (the context slots)"
            )
        self.template = template or DEFAULT_TEMPLATE
        D, W = clip.embed_dim, clip.width
        self.meta_net = nn.Sequential(  # tcp.py L168-175
            OrderedDict(
                [
                    ("linear1", nn.Linear(D, D // 4, bias=True)),
                    ("relu", QuickGELU()),
                    ("linear2", nn.Linear(D // 4, self.n_ctx * W, bias=True)),
                ]
            )
        )
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        names = [clean_classname(c) for c in self.classnames]
        ids = self.clip.tokenize([self.prompt_template.format(n) for n in names])  # [C, 77]
        eot = self.clip.eot_index(ids)
        with torch.no_grad():
            base = self.clip.embed_tokens(ids[:, : int(eot.max()) + 1]).float()  # [C, L, W]
        st = self.clip.n_start_tokens  # context right after [SOS] (SigLIP's tokenizer has none: 0)
        pos = torch.arange(st, st + self.n_ctx, device=ids.device).expand(len(names), -1).contiguous()
        self.register_class_buffers(
            {
                "_base": base,
                "_ctx_pos": pos,
                "_eot": eot,
                "_hand": hand_crafted_features(self.clip, self.classnames, [self.template]),  # [C, D]
            }
        )

    def class_tokens(self) -> torch.Tensor:
        """[C, n_ctx, W] class-aware tokens from the normalised hand-crafted features (tcp.py L193-195)."""
        p = self.meta_net.linear1.weight
        out = self.meta_net(self._hand.to(p.dtype))  # [C, n_ctx * W]
        return out.reshape(out.shape[0], self.n_ctx, -1)

    def text_features(self) -> torch.Tensor:
        prompts = insert_context(self._base, self.ctx, self._ctx_pos)  # [C, L, W]
        return encode_prompts(
            self.clip, prompts, self._eot, deep_prompts={self.insert_layer: self.class_tokens()}
        )  # [C, D]
