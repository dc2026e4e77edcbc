"""Tip-Adapter and Tip-Adapter-F: training-free CLIP adaptation with a key-value cache of few-shot
features (Zhang et al., ECCV 2022, https://arxiv.org/abs/2207.09519; gaopengcuhk/Tip-Adapter).

logits = s * f @ T^T + alpha * exp(-beta * (1 - f @ K^T)) @ V, with f the normalised test feature,
T the zero-shot text classifier, K the cache keys (each training image's feature averaged over
``views`` augmented views, then normalised) and V the one-hot training labels. alpha and beta are
searched on a grid on the validation split. Tip-Adapter-F (``finetune: true``) then trains K as a
parameter (the engine's loop, AdamW, the reference's per-iteration cosine) and searches alpha, beta
again with the trained keys.

Differences from the reference, on purpose: the grid is searched on promptlab's validation split
(the few-shot ``min(K, 4)`` shots per class) where the reference uses the full validation set (and
the *test* set for ImageNet); Tip-Adapter-F keeps its last epoch where the reference keeps the epoch
of best *test* accuracy (``main.py`` L103-107) and reports the better of two test accuracies (L124).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.prompts import FitData, FitFeatures, HandCraftedTextClassifier
from promptlab.templates import resolve_templates


def grid(scale: float, steps: int) -> list[float]:
    """Tip-Adapter's search grid (``utils.py`` search_hp): ``steps`` values from 0.1 towards ``scale``."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in %."""
    return 100.0 * float((logits.argmax(-1) == labels).float().mean())


class TipAdapter(HandCraftedTextClassifier):
    """The cache model on frozen image features; class-bound (the cache values are the training labels).

    Args:
        templates: the zero-shot classifier's prompts (``"dataset"``: the dataset's template; the reference
            uses the 7-template ensemble on ImageNet: ``"imagenet7"``).
        template: the dataset's template (filled in by the runner).
        views: augmented views per training image averaged into a key (``augment_epoch``, 10).
        init_alpha, init_beta: residual ratio and sharpness before the search (and while fine-tuning).
        search_scale, search_steps: the (beta, alpha) grids, ``search_steps[i]`` values from 0.1 up to
            ``search_scale[i]`` (exclusive); ``search: false`` keeps the initial values.
        finetune: Tip-Adapter-F: the keys become a trained parameter.
        logit_scale: the zero-shot logits' scale; ``None``: the backbone's temperature (100 for OpenAI
            CLIP, which the reference hard-codes).
    """

    text_classifier = False
    class_bound = True
    fitted_state = ("keys", "values", "alpha", "beta")

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        templates: str | list[str] = "dataset",
        template: str | None = None,
        views: int = 10,
        init_alpha: float = 1.17,
        init_beta: float = 1.0,
        search: bool = True,
        search_scale: Sequence[float] = (7.0, 3.0),
        search_steps: Sequence[int] = (200, 20),
        finetune: bool = False,
        logit_scale: float | None = None,
    ):
        super().__init__(clip, classnames)
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.templates = resolve_templates(templates, template)
        self.search, self.finetune = search, finetune
        self.search_scale, self.search_steps = (
            [float(s) for s in search_scale],
            [int(n) for n in search_steps],
        )
        self.scale = logit_scale
        self.fit_features = FitFeatures(views=views, augment=True)
        self.keys = nn.Parameter(torch.zeros(0, clip.embed_dim), requires_grad=finetune)  # [N*K, D]
        self.register_buffer("values", torch.zeros(0, len(classnames)))  # [N*K, C] one-hot labels
        self.register_buffer("alpha", torch.tensor(float(init_alpha)))
        self.register_buffer("beta", torch.tensor(float(init_beta)))
        self.init_alpha, self.init_beta = float(init_alpha), float(init_beta)
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None
        self.set_classnames(classnames)

    def _scale(self) -> torch.Tensor | float:
        return self.clip.logit_scale if self.scale is None else self.scale

    def tip_logits(
        self, f: torch.Tensor, alpha: float | torch.Tensor, beta: float | torch.Tensor
    ) -> torch.Tensor:
        """[B, D] normalised features -> [B, C]: zero-shot logits plus alpha x the cache's."""
        clip_logits = self._scale() * f @ self._text.t().to(f.dtype)
        affinity = f @ self.keys.t().to(f.dtype)  # [B, N*K]; Tip-Adapter-F's adapter(f)
        cache_logits = torch.exp(-1 * (beta - beta * affinity)) @ self.values.to(f.dtype)
        return clip_logits + cache_logits * alpha

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(image_features.float(), dim=-1)
        return self.tip_logits(f, self.alpha, self.beta)

    def fit(self, data: FitData) -> dict[str, Any]:
        # the cache: mean of the unnormalised views, normalised (utils.py build_cache_model)
        keys = F.normalize(data.train.float().mean(0), dim=-1)  # [N, D]
        self.keys = nn.Parameter(keys, requires_grad=self.finetune)
        self.values = F.one_hot(data.train_labels, len(self.classnames)).float()  # [N, C]
        self._val = (F.normalize(data.val.float(), dim=-1), data.val_labels)
        self.alpha.fill_(self.init_alpha)  # while fine-tuning: the initial values (main.py L60)
        self.beta.fill_(self.init_beta)
        return {"cache_size": int(keys.shape[0]), **({} if self.finetune else self._search())}

    def after_train(self) -> dict[str, Any]:
        """Tip-Adapter-F: search alpha and beta again with the trained keys (main.py L112)."""
        return self._search() if self.finetune else {}

    def _search(self) -> dict[str, Any]:
        """The (beta, alpha) grid on the validation features: first best wins (utils.py search_hp)."""
        with torch.no_grad():  # a with block, not a decorator: mutmut skips decorated functions
            if not self.search or self._val is None:
                return {"alpha": float(self.alpha), "beta": float(self.beta)}
            f, y = self._val
            clip_logits = self._scale() * f @ self._text.t().to(f.dtype)  # [M, C], the same for every cell
            affinity = f @ self.keys.t().to(f.dtype)  # [M, N*K]
            best = (0.0, 0.0, 0.0)  # accuracy, beta, alpha: the reference starts from 0, 0
            for beta in grid(self.search_scale[0], self.search_steps[0]):
                cache_logits = torch.exp(-1 * (beta - beta * affinity)) @ self.values.to(f.dtype)
                for alpha in grid(self.search_scale[1], self.search_steps[1]):
                    acc = accuracy(clip_logits + cache_logits * alpha, y)
                    if acc > best[0]:
                        best = (acc, beta, alpha)
            self.alpha.fill_(best[2])
            self.beta.fill_(best[1])
            grids = {
                "beta_grid": [self.search_scale[0], self.search_steps[0]],
                "alpha_grid": [self.search_scale[1], self.search_steps[1]],
            }
            return {"alpha": best[2], "beta": best[1], "val_accuracy": best[0], **grids}
