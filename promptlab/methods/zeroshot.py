"""Zero-shot CLIP with hand-crafted prompts (Radford et al., 2021, https://arxiv.org/abs/2103.00020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.prompts import PromptModule, clean_classname
from promptlab.templates import resolve_templates


class ZeroShotCLIP(PromptModule):
    """Classifier = the mean normalised text feature of each class over the templates.

    Args:
        templates: ``"dataset"`` (the dataset's template, CoOp's zero-shot baseline), ``"imagenet80"``,
            ``"imagenet7"`` or a list of templates with ``{}`` for the class name.
        template: the dataset's template; the engine fills it from the dataset definition.
    """

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        templates: str | list[str] = "dataset",
        template: str | None = None,
    ):
        super().__init__(clip, classnames)
        self.templates = resolve_templates(templates, template)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        with torch.no_grad():
            feats = torch.stack(
                [
                    F.normalize(
                        self.clip.encode_text(
                            self.clip.tokenize([t.format(clean_classname(c)) for c in self.classnames])
                        ).float(),
                        dim=-1,
                    )
                    for t in self.templates
                ]
            )  # [T, C, D]
        self.register_buffer("_classifier", F.normalize(feats.mean(0), dim=-1), persistent=False)

    def text_features(self) -> torch.Tensor:
        return self._classifier
