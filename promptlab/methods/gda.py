"""GDA: Gaussian discriminant analysis on CLIP features, training-free ("A Hard-to-Beat Baseline for
Training-free CLIP-based Adaptation", Wang et al., ICLR 2024, https://openreview.net/forum?id=Js5PJPHDyY;
mrflogs/ICLR24).

Each class is a Gaussian with its own mean and one shared covariance, estimated from the normalised
features of ``views`` augmented views of every training image; the covariance's inverse is shrunk
(the reference's "KS estimator": ``D * pinv((n - 1) * S + tr(S) * I)``). The resulting linear
classifier (W = mu Sigma^-1, b = log p - mu Sigma^-1 mu^T / 2) is added to the zero-shot logits with
a weight alpha searched on the validation split (``main_few_shots.py`` L45-77).

Difference from the reference, on purpose: alpha is searched on promptlab's validation split (the few-shot
``min(K, 4)`` shots per class) where the reference uses the full validation set (and the test set on
ImageNet, ``main_few_shots.py`` L124).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.methods.tip_adapter import accuracy
from promptlab.prompts import FitData, FitFeatures, HandCraftedTextClassifier
from promptlab.templates import resolve_templates

#: main_few_shots.py L63: the alpha grid, in this order (the first best wins).
ALPHAS = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


def gaussian_classifier(
    vecs: torch.Tensor, labels: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means + shared shrunk precision -> the linear discriminant (W [C, D], b [C]), uniform prior.

    Args:
        vecs: [n, D] normalised features (every view of every training image).
        labels: [n] their classes.
    """
    mus = torch.stack([vecs[labels == c].mean(0) for c in range(n_classes)])  # [C, D]
    centered = vecs - mus[labels]  # [n, D]
    cov = torch.cov(centered.t())  # [D, D], unbiased (n - 1)
    d, n = vecs.shape[1], vecs.shape[0]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    precision = d * torch.linalg.pinv((n - 1) * cov + cov.trace() * eye)  # [D, D]
    w = mus @ precision  # [C, D]
    prior = torch.full((n_classes,), 1.0 / n_classes, dtype=vecs.dtype, device=vecs.device)
    b = prior.log() - (w * mus).sum(-1) / 2  # [C]
    return w, b


class GDA(HandCraftedTextClassifier):
    """Zero-shot logits + alpha x a Gaussian discriminant fitted on the few-shot features.

    Args:
        templates: the zero-shot classifier's prompts (``"dataset"``; ImageNet in the reference: the
            7-template ensemble, ``"imagenet7"``).
        template: the dataset's template (filled in by the runner).
        views: augmented views per training image (``augment_epoch``, 10), each a sample of its class.
        alpha: the weight used when ``search`` is off (the reference's fallback, 0.1).
        search: search alpha on the validation split.
        logit_scale: the zero-shot logits' scale; ``None``: the backbone's temperature (100 for OpenAI
            CLIP, which the reference hard-codes).
    """

    text_classifier = False
    class_bound = True
    fitted_state = ("weight", "bias", "mix")

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        templates: str | list[str] = "dataset",
        template: str | None = None,
        views: int = 10,
        alpha: float = 0.1,
        search: bool = True,
        logit_scale: float | None = None,
    ):
        super().__init__(clip, classnames)
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.templates = resolve_templates(templates, template)
        self.search, self.scale = search, logit_scale
        self.fit_features = FitFeatures(views=views, augment=True)
        self.register_buffer("weight", torch.zeros(len(classnames), clip.embed_dim))  # [C, D]
        self.register_buffer("bias", torch.zeros(len(classnames)))  # [C]
        self.register_buffer("mix", torch.tensor(float(alpha)))  # the alpha in use
        self.set_classnames(classnames)

    def gda_logits(self, f: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
        """[B, D] normalised features -> [B, C]."""
        scale = self.clip.logit_scale if self.scale is None else self.scale
        return scale * f @ self._text.t() + alpha * (f @ self.weight.t() + self.bias)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.gda_logits(F.normalize(image_features.float(), dim=-1), self.mix)

    def fit(self, data: FitData) -> dict[str, Any]:
        vecs = F.normalize(data.train.float(), dim=-1).flatten(0, 1)  # [V * N, D]: every view is a sample
        labels = data.train_labels.repeat(data.train.shape[0])
        w, b = gaussian_classifier(vecs, labels, len(self.classnames))
        self.weight.copy_(w)
        self.bias.copy_(b)
        if not self.search:
            return {"alpha": float(self.mix)}
        f, y = F.normalize(data.val.float(), dim=-1), data.val_labels
        best_acc, best_alpha = 0.0, 0.1  # main_few_shots.py L61-62
        tried = []
        for alpha in ALPHAS:
            acc = accuracy(self.gda_logits(f, alpha), y)
            tried.append({"alpha": alpha, "val_accuracy": acc})
            if acc > best_acc:
                best_acc, best_alpha = acc, alpha
        self.mix.fill_(best_alpha)
        return {"alpha": best_alpha, "val_accuracy": best_acc, "search": tried}
