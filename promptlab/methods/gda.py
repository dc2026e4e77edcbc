"""GDA: Gaussian discriminant analysis on CLIP features, training-free ("A Hard-to-Beat Baseline for
Training-free CLIP-based Adaptation", Wang et al., ICLR 2024, https://openreview.net/forum?id=Js5PJPHDyY;
mrflogs/ICLR24).

Each class is a Gaussian with its own mean and one shared covariance, estimated from the normalised
features of ``views`` augmented views of every training image. The resulting linear classifier
(W = mu P, b = log p - mu P mu^T / 2, P the precision) is added to the zero-shot logits with a weight
alpha searched on the validation split (``main_few_shots.py`` L45-77).

Few-shot (``main_few_shots.py`` L55-60): P is the "KS estimator" of the pooled within-class covariance
S of the n samples, ``D * pinv((n - 1) S + tr(S) I)``.

Base-to-new (``main_base2new.py``; the runner hands the dataset's ``all_classnames`` over, and the
classes among them the method has no images of are the new half):

- base classes (L55-61): P = ``pinv(mean over classes of each class's covariance)``, no shrinkage;
- new classes (L83-111), from their text embeddings t (the zero-shot classifier's rows): the ``knn``
  (64) base training samples most similar to t; the class mean is the mean of those neighbours and
  ``text_copies`` (16) copies of t; each class's covariance is the neighbours' scatter around t over
  k - 1, shrunk as above with n = k; P is the mean of those per-class precisions;
- alpha is searched on the base classes' validation split and used for both halves (L64-79).

Both classifiers are fitted at once and kept in one table with a row per class of ``all_classnames``;
evaluating on the new half (``subsample=new``) selects its rows. Differences from the reference: the
KS estimator's factor D is the feature width (the reference writes 512, ViT-B's, in the new-class
branch, L101/L104); alpha is searched on promptlab's validation split (``min(K, 4)`` shots per class)
where the reference uses the full validation set (and the test set on ImageNet, ``main_few_shots.py``
L137, ``main_base2new.py`` L180). ``knn_center="mean"`` centres each new class's scatter on its
synthesised mean instead of on its text embedding (the reference's choice puts the text-image gap,
the same for every neighbour, into the covariance).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.methods.tip_adapter import accuracy
from promptlab.prompts import FitData, FitFeatures, HandCraftedTextClassifier, hand_crafted_features
from promptlab.templates import resolve_templates

log = logging.getLogger(__name__)

#: main_few_shots.py L70 / main_base2new.py L67: the alpha grid, in this order (the first best wins).
ALPHAS = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
#: ``auto``: the reference's estimator for the protocol ("ks" on all classes, "class_mean" on a base half).
ESTIMATORS = ("auto", "ks", "class_mean")
KNN_CENTERS = ("text", "mean")


def shrunk_precision(cov: torch.Tensor, n: int) -> torch.Tensor:
    """The reference's "KS estimator" of a precision from a [D, D] covariance of n samples:
    ``D * pinv((n - 1) cov + tr(cov) I)`` (the scatter plus its trace on the diagonal: never singular)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return cov.shape[0] * torch.linalg.pinv((n - 1) * cov + cov.trace() * eye)


def discriminant(mus: torch.Tensor, precision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means [C, D] + shared precision [D, D] -> (W [C, D], b [C]) under a uniform prior over the C."""
    w = mus @ precision  # [C, D]
    prior = torch.full((mus.shape[0],), 1.0 / mus.shape[0], dtype=mus.dtype, device=mus.device)
    return w, prior.log() - (w * mus).sum(-1) / 2


def gaussian_classifier(
    vecs: torch.Tensor, labels: torch.Tensor, n_classes: int, estimator: str = "ks"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means + a shared precision -> the linear discriminant (W [C, D], b [C]), uniform prior.

    Args:
        vecs: [n, D] normalised features (every view of every training image).
        labels: [n] their classes.
        estimator: ``"ks"``: the shrunk precision of the pooled within-class covariance (few-shot);
            ``"class_mean"``: ``pinv`` of the mean of the per-class covariances (base-to-new's base half).
    """
    mus = torch.stack([vecs[labels == c].mean(0) for c in range(n_classes)])  # [C, D]
    if estimator == "class_mean":
        covs = torch.stack([torch.cov(vecs[labels == c].t()) for c in range(n_classes)])  # [C, D, D]
        return discriminant(mus, torch.linalg.pinv(covs.mean(0)))
    centered = vecs - mus[labels]  # [n, D]
    return discriminant(mus, shrunk_precision(torch.cov(centered.t()), vecs.shape[0]))


def synthesized_classifier(
    vecs: torch.Tensor, text: torch.Tensor, knn: int, text_copies: int, center: str = "text"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear discriminant (W [C, D], b [C]) of classes seen only through their text embeddings.

    Args:
        vecs: [n, D] normalised features of the training images (other classes).
        text: [C, D] the classes' normalised text embeddings.
        knn: neighbours of each text embedding among ``vecs`` (at most n).
        text_copies: copies of the text embedding averaged with the neighbours into the class mean.
        center: ``"text"``: each class's scatter around its text embedding (the reference);
            ``"mean"``: around its synthesised mean.
    """
    precision = torch.zeros(vecs.shape[1], vecs.shape[1], dtype=vecs.dtype, device=vecs.device)
    mus = []
    for t in text:  # one [D, D] scatter at a time: 500 ImageNet classes would not fit at once
        nbrs = vecs[(t @ vecs.t()).topk(knn).indices]  # [k, D]
        mu = (nbrs.sum(0) + text_copies * t) / (knn + text_copies)  # [D]
        diff = nbrs - (t if center == "text" else mu)
        precision += shrunk_precision(diff.t() @ diff / (knn - 1), knn)
        mus.append(mu)
    return discriminant(torch.stack(mus), precision / len(text))


class GDA(HandCraftedTextClassifier):
    """Zero-shot logits + alpha x a Gaussian discriminant fitted on the few-shot features; on a base half,
    a second discriminant for the new classes synthesised from their text features.

    Args:
        templates: the zero-shot classifier's prompts (``"dataset"``; ImageNet in the reference: the
            7-template ensemble, ``"imagenet7"``).
        template: the dataset's template (filled in by the runner).
        all_classnames: filled in by the runner: every class of the dataset. Those without training
            images (the new half) get the synthesised classifier; ``None``: the training classes only.
        views: augmented views per training image (``augment_epoch``, 10), each a sample of its class.
        alpha: the weight used when ``search`` is off (the reference's fallback, 0.1).
        search: search alpha on the validation split.
        logit_scale: the zero-shot logits' scale; ``None``: the backbone's temperature (100 for OpenAI
            CLIP, which the reference hard-codes).
        estimator: the training classes' precision, one of ``ESTIMATORS`` (see the module docstring).
        knn: neighbours per new class (main_base2new.py L85).
        text_copies: copies of the text embedding in a new class's mean (L89).
        knn_center: where a new class's scatter is centred, one of ``KNN_CENTERS`` (reference: ``"text"``).
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
        all_classnames: Sequence[str] | None = None,
        views: int = 10,
        alpha: float = 0.1,
        search: bool = True,
        logit_scale: float | None = None,
        estimator: str = "auto",
        knn: int = 64,
        text_copies: int = 16,
        knn_center: str = "text",
    ):
        super().__init__(clip, classnames)
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        if estimator not in ESTIMATORS or knn_center not in KNN_CENTERS:
            raise ValueError(
                f"estimator={estimator!r}, knn_center={knn_center!r}: expected one of {ESTIMATORS}, {KNN_CENTERS}"
            )
        if knn < 2 or text_copies < 0:
            raise ValueError(f"knn={knn} (at least 2), text_copies={text_copies} (at least 0)")
        self.templates = resolve_templates(templates, template)
        self.search, self.scale = search, logit_scale
        self.knn, self.text_copies, self.knn_center = int(knn), int(text_copies), knn_center
        self._estimator = estimator
        # The classifier's rows: one per class it can serve, in the dataset's order (not the current names').
        self.all_classnames = list(all_classnames) if all_classnames is not None else None
        self._rows = self.all_classnames or list(classnames)
        missing = sorted(set(classnames) - set(self._rows))
        if missing:
            raise ValueError(f"all_classnames lacks the training classes {missing[:5]}")
        self.fit_features = FitFeatures(views=views, augment=True)
        self.register_buffer("weight", torch.zeros(len(self._rows), clip.embed_dim))  # [C_rows, D]
        self.register_buffer("bias", torch.zeros(len(self._rows)))  # [C_rows]
        self.register_buffer("mix", torch.tensor(float(alpha)))  # the alpha in use
        self.set_classnames(classnames)

    def can_serve(self, classnames: list[str], learned_for: list[str]) -> bool:
        """Any classes the fitted table has a row for (the training ones and any synthesised)."""
        return set(classnames) <= set(self._rows)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        names = self.classnames
        if names == self._rows:
            rows = list(range(len(names)))
        else:  # looked up by name: each must name one row
            twice = sorted({n for n in names if self._rows.count(n) > 1})
            if twice:
                raise ValueError(
                    f"GDA's fitted classes name {twice[:5]} more than once: cannot tell their rows apart"
                )
            rows = [self._rows.index(n) for n in names]
        self.register_class_buffers({"_row": torch.tensor(rows, dtype=torch.long, device=self.weight.device)})

    def gda_logits(self, f: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
        """[B, D] normalised features -> [B, C] over the current classes."""
        scale = self.clip.logit_scale if self.scale is None else self.scale
        return scale * f @ self._text.t() + alpha * (f @ self.weight[self._row].t() + self.bias[self._row])

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.gda_logits(F.normalize(image_features.float(), dim=-1), self.mix)

    def fit(self, data: FitData) -> dict[str, Any]:
        vecs = F.normalize(data.train.float(), dim=-1).flatten(0, 1)  # [V * N, D]: every view is a sample
        labels = data.train_labels.repeat(data.train.shape[0])
        new = [n for n in self._rows if n not in set(self.classnames)]  # classes without images
        estimator = self._estimator if self._estimator != "auto" else ("class_mean" if new else "ks")
        w, b = gaussian_classifier(vecs, labels, len(self.classnames), estimator)
        self.weight[self._row], self.bias[self._row] = w.to(self.weight), b.to(self.bias)
        record: dict[str, Any] = {"estimator": estimator}
        if new:
            knn = min(self.knn, vecs.shape[0])
            if knn < self.knn:
                log.warning("GDA: knn=%d but only %d training samples: using %d", self.knn, knn, knn)
            text = hand_crafted_features(self.clip, new, self.templates).float().to(vecs.device)  # [C_new, D]
            w_new, b_new = synthesized_classifier(vecs, text, knn, self.text_copies, self.knn_center)
            at = torch.tensor([self._rows.index(n) for n in new], device=vecs.device)
            self.weight[at], self.bias[at] = w_new.to(self.weight), b_new.to(self.bias)
            record["new_classes"] = {
                "n": len(new),
                "knn": knn,
                "text_copies": self.text_copies,
                "center": self.knn_center,
            }
        if not self.search:
            return {"alpha": float(self.mix), **record}
        f, y = F.normalize(data.val.float(), dim=-1), data.val_labels
        best_acc, best_alpha = 0.0, 0.1  # main_few_shots.py L68-69
        tried = []
        for alpha in ALPHAS:
            acc = accuracy(self.gda_logits(f, alpha), y)
            tried.append({"alpha": alpha, "val_accuracy": acc})
            if acc > best_acc:
                best_acc, best_alpha = acc, alpha
        self.mix.fill_(best_alpha)
        return {"alpha": best_alpha, "val_accuracy": best_acc, "search": tried, **record}
