"""The knowledge-guided loss KgCoOp introduced and TCP reuses: cross-entropy plus
``w * (1 - mean_c cos(t_c, t_c^hand))``, which keeps the learned class text features near those of the
hand-crafted prompt (htyao89/KgCoOp ``trainers/kgcoop.py``; htyao89/Textual-based_Class-aware_prompt_tuning
``trainers/tcp.py`` L254-258).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from promptlab.prompts import PromptModule, knowledge_distance


class KnowledgeGuided(PromptModule):
    """Base of a method whose loss adds the knowledge-guided term (KgCoOp, TCP).

    A subclass sets ``self.w`` (the term's weight) and registers ``_hand`` [C, D], the hand-crafted
    prompt's text features, in its ``set_classnames``. Why a base class: the term needs this step's text
    features, with their graph; the references compute them once per step and use them for both the
    logits and the term, and so does this class (the text tower is most of a step's cost), which takes a
    little state that two copies of the code would have to keep alike.
    """

    w: float
    _hand: torch.Tensor
    #: this training step's text features (with their graph), kept by the logits for :meth:`loss`
    _step_text: torch.Tensor | None = None

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self._step_text = None  # the old classes' features are of no use to the next loss

    def class_text_features(self) -> torch.Tensor:
        txt = super().class_text_features()  # [C, D]
        # kept only when a loss can use them: with a graph, and not the evaluation cache
        self._step_text = txt if torch.is_grad_enabled() and txt.requires_grad else None
        return txt

    def knowledge_loss(self, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """``1 - mean_c cos(t_c, t_c^hand)``: scalar, 0 when the prompt reproduces the hand-crafted features."""
        txt = self.text_features() if text_features is None else text_features  # [C, D]
        return knowledge_distance(txt, self._hand, self.head_dtype)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **aux: Any) -> torch.Tensor:
        """CE + w * knowledge term, on the text features of this step's logits when there are some (else
        computed here: a loss right after building, ``set_classnames`` or a pass without a graph)."""
        txt, self._step_text = self._step_text, None
        return F.cross_entropy(logits, labels) + self.w * self.knowledge_loss(txt)
