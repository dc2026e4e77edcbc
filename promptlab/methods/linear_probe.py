"""Linear-probe CLIP (Radford et al., 2021, https://arxiv.org/abs/2103.00020, appendix A.3), as CoOp's
``lpclip/`` runs it for the few-shot baselines (Zhou et al., IJCV 2022, https://arxiv.org/abs/2109.01134).

L2-regularised logistic regression (scikit-learn, L-BFGS, 1000 iterations) on the frozen image
features of the training images (evaluation transform, not normalised); the inverse regularisation
C is searched on the validation split: a coarse sweep over 1e6 .. 1e-6, then eight rounds that
compare the two ends of a shrinking interval in log10(C) (``lpclip/linear_probe.py``). As there, the
classifier kept is the one chosen in the *last* round, not the best of all rounds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from promptlab.clip import FrozenCLIP
from promptlab.prompts import FitData, FitFeatures, PromptModule

#: lpclip/linear_probe.py L56: the coarse sweep of C, in this order (the first best wins).
COARSE_C = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int = 1000) -> Any:
    """scikit-learn's L2 logistic regression (L-BFGS) with inverse regularisation ``c``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():  # large C rarely converges in max_iter; lpclip runs it anyway
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c).fit(x, y)


def _accuracy(clf: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((clf.predict(x) == y).mean())


def search_c(
    x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, steps: int = 8, max_iter: int = 1000
) -> tuple[Any, list[dict[str, float]]]:
    """lpclip's search for C: the fitted classifier of the last round and every (C, val accuracy) tried."""
    tried: list[dict[str, float]] = []

    def fit(c: float) -> tuple[Any, float]:
        clf = fit_logistic(x, y, c, max_iter)
        acc = _accuracy(clf, xv, yv)
        tried.append({"C": float(c), "val_accuracy": 100.0 * acc})
        return clf, acc

    accs = [fit(c)[1] for c in COARSE_C]
    peak = COARSE_C[int(np.argmax(accs))]
    lo, hi = 0.1 * peak, 10.0 * peak
    clf = None
    for _ in range(steps):
        (clf_lo, acc_lo), (clf_hi, acc_hi) = fit(lo), fit(hi)
        if acc_lo < acc_hi:  # the right end wins; the interval becomes [middle, right] in log10
            clf, lo, hi = clf_hi, 0.5 * (math.log10(hi) + math.log10(lo)), math.log10(hi)
        else:  # ties go left
            clf, lo, hi = clf_lo, math.log10(lo), 0.5 * (math.log10(hi) + math.log10(lo))
        lo, hi = 10.0**lo, 10.0**hi
    if clf is None:  # steps=0: the coarse sweep's best
        clf = fit(peak)[0]
    return clf, tried


class LinearProbe(PromptModule):
    """A linear classifier on frozen image features: logits = features @ W.T + b.

    No prompt, no text: the class names only fix the classes. The fitted W [C, D] and b [C] are the
    exported state; they belong to the training classes (``class_bound``).

    Args:
        search_steps: rounds of lpclip's interval search after the coarse sweep (``--num_step``, 8).
        max_iter: L-BFGS iterations per fit (lpclip: 1000).
    """

    text_classifier = False
    fitted_state = ("weight", "bias")
    class_bound = True

    def __init__(
        self, clip: FrozenCLIP, classnames: Sequence[str], search_steps: int = 8, max_iter: int = 1000
    ):
        super().__init__(clip, classnames)
        if search_steps < 0 or max_iter < 1:
            raise ValueError(f"search_steps must be >= 0 and max_iter >= 1, got {search_steps}, {max_iter}")
        self.search_steps, self.max_iter = search_steps, max_iter
        self.fit_features = FitFeatures(views=1, augment=False)  # lpclip: build_transform(is_train=False)
        self.register_buffer("weight", torch.zeros(len(classnames), clip.embed_dim))  # [C, D]
        self.register_buffer("bias", torch.zeros(len(classnames)))  # [C]
        self.set_classnames(classnames)

    def fit(self, data: FitData) -> dict[str, Any]:
        def arrays(f: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            return f.double().cpu().numpy(), y.cpu().numpy()

        x, y = arrays(data.train[0], data.train_labels)  # lpclip: one un-augmented feature per image
        clf, tried = search_c(x, y, *arrays(data.val, data.val_labels), self.search_steps, self.max_iter)
        w, b = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
        if w.shape[0] == 1:  # two classes: scikit-learn keeps one row, the score of class 1
            w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
        full_w = torch.zeros_like(self.weight, device="cpu")
        full_b = torch.full_like(
            self.bias, -torch.inf, device="cpu"
        )  # a class absent from training never wins
        full_w[torch.as_tensor(clf.classes_)], full_b[torch.as_tensor(clf.classes_)] = w, b
        self.weight.copy_(full_w)
        self.bias.copy_(full_b)
        return {"C": float(clf.C), "search": tried}

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        return image_features.float() @ self.weight.float().t() + self.bias.float()  # [B, C]
